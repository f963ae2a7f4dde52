//! 64-bit long mode set up by the VMM: identity-mapped page tables (2 MiB pages, user-accessible
//! so guests can drop to ring 3 without building their own), a GDT with kernel and user
//! segments and a TSS, and each vCPU's registers at the entry.

use corefour_hypervisor::{DescriptorTable, Regs, Result, Segment, Vcpu};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::BootPlan;
use crate::layout::{
    BOOT_INFO_ADDR, GDT_ADDR, HIGH_RAM_START, MMIO_HOLE_START, PAGE_TABLES_END, PDPT_ADDR, PD_ADDR,
    PML4_ADDR, STACK_SIZE, TSS_ADDR,
};
use crate::memory::GuestMem;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const GIB: u64 = 1 << 30;
const TWO_MIB: u64 = 2 << 20;

/// Selectors of the VMM's GDT (guests/CONTRACT.md lists them).
pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_CS: u16 = 0x18 | 3;
pub const USER_DS: u16 = 0x20 | 3;
pub const TSS_SEL: u16 = 0x28;

const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08 kernel code, 64-bit
    0x00cf_9300_0000_ffff, // 0x10 kernel data
    0x00af_fb00_0000_ffff, // 0x18 user code, 64-bit, DPL 3
    0x00cf_f300_0000_ffff, // 0x20 user data, DPL 3
];
const TSS_LIMIT: u32 = 0x67;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// How many GiB the identity map covers: all RAM, and at least the 4 GiB that hold the MMIO hole.
pub fn mapped_gib(mem_bytes: u64) -> u64 {
    let top = if mem_bytes > MMIO_HOLE_START {
        HIGH_RAM_START + (mem_bytes - MMIO_HOLE_START)
    } else {
        HIGH_RAM_START
    };
    top.div_ceil(GIB)
}

/// Writes PML4, PDPT, page directories, GDT and TSS.
pub fn write_tables(mem: &GuestMem, mem_bytes: u64) -> std::result::Result<(), GuestMemoryError> {
    let gib = mapped_gib(mem_bytes);
    // The config's memory cap keeps this far below PAGE_TABLES_END; checked in a unit test.
    debug_assert!(PD_ADDR + gib * 4096 <= PAGE_TABLES_END);
    let table = USER | WRITABLE | PRESENT;
    mem.write_obj(PDPT_ADDR | table, GuestAddress(PML4_ADDR))?;
    let mut pdpt = vec![0u8; 4096];
    for g in 0..gib {
        let e = (PD_ADDR + g * 4096) | table;
        let at = usize::try_from(g * 8).unwrap_or(0);
        pdpt[at..at + 8].copy_from_slice(&e.to_le_bytes());
    }
    mem.write_slice(&pdpt, GuestAddress(PDPT_ADDR))?;
    let mut pd = vec![0u8; usize::try_from(gib * 4096).unwrap_or(0)];
    for (i, e) in pd.chunks_exact_mut(8).enumerate() {
        let addr = i as u64 * TWO_MIB;
        let mut flags = HUGE | table;
        if (MMIO_HOLE_START..HIGH_RAM_START).contains(&addr) {
            flags |= PCD | PWT;
        }
        e.copy_from_slice(&(addr | flags).to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PD_ADDR))?;

    let mut gdt: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    gdt.extend_from_slice(&tss_descriptor(TSS_ADDR, TSS_LIMIT));
    mem.write_slice(&gdt, GuestAddress(GDT_ADDR))?;
    // A zeroed TSS: no ring-0 stack. Guests that take interrupts from ring 3 load their own.
    mem.write_slice(&[0u8; TSS_LIMIT as usize + 1], GuestAddress(TSS_ADDR))?;
    Ok(())
}

/// The 16-byte system descriptor of an available 64-bit TSS.
fn tss_descriptor(base: u64, limit: u32) -> [u8; 16] {
    let low = u64::from(limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40) // present, DPL 0, type 9
        | (u64::from((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    let high = base >> 32;
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&low.to_le_bytes());
    d[8..].copy_from_slice(&high.to_le_bytes());
    d
}

fn code_segment() -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: KERNEL_CS,
        type_: 0xb,
        present: true,
        dpl: 0,
        db: false,
        s: true,
        l: true,
        g: true,
        avl: false,
        unusable: false,
    }
}

fn data_segment() -> Segment {
    Segment {
        selector: KERNEL_DS,
        type_: 0x3,
        db: true,
        l: false,
        ..code_segment()
    }
}

pub fn setup_vcpu(vcpu: &mut dyn Vcpu, plan: &BootPlan, index: u32) -> Result<()> {
    let mut s = vcpu.sregs()?;
    s.cs = code_segment();
    let data = data_segment();
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = Segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT,
        selector: TSS_SEL,
        type_: 0xb, // busy 64-bit TSS, as after LTR
        present: true,
        dpl: 0,
        db: false,
        s: false,
        l: false,
        g: false,
        avl: false,
        unusable: false,
    };
    s.gdt = DescriptorTable {
        base: GDT_ADDR,
        limit: u16::try_from(GDT.len() * 8 + 16 - 1).unwrap_or(u16::MAX),
    };
    s.idt = DescriptorTable { base: 0, limit: 0 };
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    s.cr3 = PML4_ADDR;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&s)?;

    let stack_top = plan.stacks_base + (u64::from(index) + 1) * STACK_SIZE;
    vcpu.set_regs(&Regs {
        rip: plan.entry,
        rsp: stack_top,
        rdi: BOOT_INFO_ADDR,
        rsi: u64::from(index),
        rflags: 0x2,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MAX_MEMORY_MIB;

    #[test]
    fn page_tables_fit_for_the_largest_memory() {
        let gib = mapped_gib(MAX_MEMORY_MIB << 20);
        assert!(PD_ADDR + gib * 4096 <= PAGE_TABLES_END, "{gib} GiB");
        assert_eq!(mapped_gib(64 << 20), 4);
        assert_eq!(mapped_gib(4 << 30), 5);
    }

    #[test]
    fn identity_map_entries() {
        let mem = crate::memory::allocate(8).unwrap();
        write_tables(&mem, 8 << 20).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 3 * 8)).unwrap();
        assert_eq!(pdpt3 & !0xfff, PD_ADDR + 3 * 4096);
        // 0xd000_0000 (the sys MMIO page) is mapped, uncached.
        let idx = 0xd000_0000u64 / TWO_MIB;
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + idx * 8)).unwrap();
        assert_eq!(pde & !0xfff, 0xd000_0000);
        assert_ne!(pde & PCD, 0);
        assert_ne!(pde & USER, 0);
    }

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let d = tss_descriptor(0x1234_5678_9abc_def0, 0x67);
        let low = u64::from_le_bytes(d[..8].try_into().unwrap());
        assert_eq!(low & 0xffff, 0x67);
        assert_eq!((low >> 16) & 0xff_ffff, 0xbc_def0);
        assert_eq!((low >> 56) & 0xff, 0x9a);
        assert_eq!((low >> 40) & 0xff, 0x89);
        assert_eq!(u64::from_le_bytes(d[8..].try_into().unwrap()), 0x1234_5678);
    }
}
