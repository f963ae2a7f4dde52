//! A tiny machine for tests: page-aligned guest RAM, a 64-bit (or other) initial state, and a
//! `VmOps` that records port and MMIO traffic and stops the vCPU on a write to `STOP_MMIO`.
#![allow(dead_code)]

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::{Arc, Mutex};

use corefour_hypervisor::{
    DescriptorTable, Hypervisor, MemoryRegion, Regs, Segment, SpecialRegs, Vcpu, VcpuKicker,
    VmExit, VmOps,
};

pub const RAM: usize = 4 << 20;
pub const PML4: u64 = 0x10_0000;
pub const GDT: u64 = 0x500;
pub const IDT: u64 = 0x4000;
pub const TSS: u64 = 0x5000;
pub const CODE: u64 = 0x10000;
pub const DATA: u64 = 0x90000;
pub const STACK: u64 = 0x80000;
pub const KSTACK: u64 = 0x70000;
pub const STOP_MMIO: u64 = 0xd000_0000;

/// Page-aligned, zeroed host memory.
pub struct Ram {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory owned by the test; the vCPU accesses it through raw pointers only while
// the test holds the `Ram`.
unsafe impl Send for Ram {}
// SAFETY: as above.
unsafe impl Sync for Ram {}

impl Ram {
    pub fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Ram { ptr, len }
    }
    pub fn slice(&self) -> &[u8] {
        // SAFETY: owned allocation of `len` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn host(&self) -> u64 {
        self.ptr as u64
    }
    pub fn w64(&self, at: u64, v: u64) {
        self.put(at, &v.to_le_bytes());
    }
    pub fn r64(&self, at: u64) -> u64 {
        u64::from_le_bytes(
            self.slice()[at as usize..at as usize + 8]
                .try_into()
                .unwrap(),
        )
    }
    pub fn put(&self, at: u64, b: &[u8]) {
        assert!(at as usize + b.len() <= self.len);
        // SAFETY: bounds checked above; the guest is not running while tests write.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.add(at as usize), b.len()) };
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, Layout::from_size_align(self.len, 4096).unwrap()) };
    }
}

#[derive(Default)]
pub struct Log {
    pub pio: Vec<(u16, Vec<u8>)>,
    pub mmio: Vec<(u64, Vec<u8>)>,
}

pub struct Ops {
    pub log: Mutex<Log>,
    pub kicker: Mutex<Option<Arc<dyn VcpuKicker>>>,
}

impl Ops {
    pub fn new() -> Arc<Self> {
        Arc::new(Ops {
            log: Mutex::new(Log::default()),
            kicker: Mutex::new(None),
        })
    }
    pub fn serial(&self) -> String {
        let l = self.log.lock().unwrap();
        l.pio
            .iter()
            .filter(|(p, _)| *p == 0x3f8)
            .map(|(_, d)| d[0] as char)
            .collect()
    }
}

impl VmOps for Ops {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.log.lock().unwrap().pio.push((port, data.to_vec()));
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.log.lock().unwrap().mmio.push((addr, data.to_vec()));
        if addr == STOP_MMIO {
            if let Some(k) = self.kicker.lock().unwrap().as_ref() {
                k.kick();
            }
        }
    }
}

fn seg(sel: u16, code: bool, dpl: u8, long: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_: if code { 0xb } else { 3 },
        present: true,
        dpl,
        db: !long || !code,
        s: true,
        l: long && code,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// GDT: 0x08 kernel code64, 0x10 kernel data, 0x18 user data (STAR layout), 0x20 user code64,
/// 0x28 user data, 0x30 TSS (16 bytes), 0x40 code32, 0x48 code16.
pub fn write_gdt(ram: &Ram) {
    let d = |base: u64, limit: u64, access: u64, flags: u64| {
        (limit & 0xffff)
            | (base & 0xff_ffff) << 16
            | access << 40
            | ((limit >> 16) & 0xf) << 48
            | flags << 52
            | ((base >> 24) & 0xff) << 56
    };
    ram.w64(GDT, 0);
    ram.w64(GDT + 0x08, d(0, 0xfffff, 0x9b, 0xa));
    ram.w64(GDT + 0x10, d(0, 0xfffff, 0x93, 0xc));
    ram.w64(GDT + 0x18, d(0, 0xfffff, 0xf3, 0xc));
    ram.w64(GDT + 0x20, d(0, 0xfffff, 0xfb, 0xa));
    ram.w64(GDT + 0x28, d(0, 0xfffff, 0xf3, 0xc));
    ram.w64(GDT + 0x30, d(TSS, 0x67, 0x89, 0));
    ram.w64(GDT + 0x38, 0);
    ram.w64(GDT + 0x40, d(0, 0xfffff, 0x9b, 0xc));
    ram.w64(GDT + 0x48, d(0, 0xffff, 0x9b, 0));
    // TSS: RSP0 and IST1.
    ram.w64(TSS + 4, KSTACK);
    ram.w64(TSS + 0x24, KSTACK - 0x1000);
}

/// Identity-maps the first 4 GiB with 2 MiB pages (user-accessible, writable).
pub fn write_page_tables(ram: &Ram) {
    ram.w64(PML4, (PML4 + 0x1000) | 7);
    for g in 0..4u64 {
        ram.w64(PML4 + 0x1000 + g * 8, (PML4 + 0x2000 + g * 0x1000) | 7);
        for k in 0..512u64 {
            ram.w64(
                PML4 + 0x2000 + g * 0x1000 + k * 8,
                ((g * 512 + k) << 21) | 0x87,
            );
        }
    }
}

/// Long-mode special registers at CPL `cpl` (0 or 3).
pub fn long_sregs(cpl: u8) -> SpecialRegs {
    let (cs, ds) = if cpl == 3 {
        (seg(0x23, true, 3, true), seg(0x2b, false, 3, true))
    } else {
        (seg(0x08, true, 0, true), seg(0x10, false, 0, true))
    };
    SpecialRegs {
        cs,
        ds,
        es: ds,
        fs: ds,
        gs: ds,
        ss: ds,
        tr: Segment {
            base: TSS,
            limit: 0x67,
            selector: 0x30,
            type_: 0xb,
            present: true,
            ..Segment::default()
        },
        ldt: Segment {
            unusable: true,
            type_: 2,
            ..Segment::default()
        },
        gdt: DescriptorTable {
            base: GDT,
            limit: 0x4f,
        },
        idt: DescriptorTable {
            base: IDT,
            limit: 0xfff,
        },
        cr0: 0x8005_0033,
        cr2: 0,
        cr3: PML4,
        cr4: 0x620,
        cr8: 0,
        efer: 0xd01,
        apic_base: 0xfee0_0900,
    }
}

/// Writes a 64-bit interrupt gate for `vec` to `handler`.
pub fn idt_gate(ram: &Ram, vec: u64, handler: u64, ist: u64, dpl: u64) {
    let lo = (handler & 0xffff)
        | 0x08 << 16
        | ist << 32
        | (0x8e | dpl << 5) << 40
        | ((handler >> 16) & 0xffff) << 48;
    ram.w64(IDT + vec * 16, lo);
    ram.w64(IDT + vec * 16 + 8, handler >> 32);
}

/// Tests translate every block on its first run, so the JIT covers what they execute;
/// `EMU_TEST_JIT_THRESHOLD=0` runs them on the interpreter alone.
pub fn jit_threshold() -> u32 {
    std::env::var("EMU_TEST_JIT_THRESHOLD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// An emu VM with `vcpus` vCPU slots and `ram` as its memory at guest physical 0, translating
/// blocks after `threshold` runs (0: interpreter only).
///
/// # Safety
/// `ram` must outlive the VM and every vCPU made from it.
pub unsafe fn emu_vm(ram: &Ram, vcpus: u32, threshold: u32) -> Arc<dyn corefour_hypervisor::Vm> {
    let emu = corefour_emu::Emu::new()
        .with_trace_unimpl(true)
        .with_jit_threshold(threshold);
    let vm = emu.create_vm(vcpus).unwrap();
    // SAFETY: the caller keeps `ram` alive as long as the VM.
    unsafe {
        vm.set_memory_region(MemoryRegion {
            slot: 0,
            guest_phys_addr: 0,
            size: RAM as u64,
            host_addr: ram.host(),
            log_dirty: false,
            read_only: false,
        })
        .unwrap()
    };
    vm
}

pub struct Machine {
    pub ram: Ram,
    pub ops: Arc<Ops>,
    pub vcpu: Box<dyn Vcpu>,
    pub vm: Arc<dyn corefour_hypervisor::Vm>,
}

impl Machine {
    /// A long-mode machine with `code` at CODE, at CPL `cpl`.
    pub fn long(code: &[u8], cpl: u8) -> Machine {
        Machine::long_prepared(code, cpl, jit_threshold(), |_| {})
    }

    /// A long-mode machine with `code` at CODE, at CPL `cpl`, the JIT translating blocks after
    /// `threshold` runs (0: off), and `prep` run on the RAM before the vCPU starts.
    pub fn long_prepared(code: &[u8], cpl: u8, threshold: u32, prep: impl FnOnce(&Ram)) -> Machine {
        let ram = Ram::new(RAM);
        write_gdt(&ram);
        write_page_tables(&ram);
        ram.put(CODE, code);
        prep(&ram);
        let mut m = Machine::bare_with_jit(ram, threshold);
        m.vcpu.set_sregs(&long_sregs(cpl)).unwrap();
        m.vcpu
            .set_regs(&Regs {
                rip: CODE,
                rsp: STACK,
                rflags: 2,
                ..Regs::default()
            })
            .unwrap();
        m
    }

    pub fn bare(ram: Ram) -> Machine {
        Machine::bare_with_jit(ram, jit_threshold())
    }

    /// Like `bare`, translating blocks after `threshold` runs (0: interpreter only).
    pub fn bare_with_jit(ram: Ram, threshold: u32) -> Machine {
        // SAFETY: `ram` lives in the Machine as long as the VM.
        let vm = unsafe { emu_vm(&ram, 1, threshold) };
        let ops = Ops::new();
        let vcpu = vm.create_vcpu(0, ops.clone()).unwrap();
        *ops.kicker.lock().unwrap() = Some(vcpu.kicker());
        Machine { ram, ops, vcpu, vm }
    }

    /// Runs until HLT / stop-MMIO / another exit.
    pub fn run(&mut self) -> VmExit {
        self.vcpu.run().unwrap()
    }

    pub fn regs(&self) -> Regs {
        self.vcpu.regs().unwrap()
    }
}

/// Assembles 64-bit code placed at `ip`.
pub fn asm64(ip: u64, f: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler)) -> Vec<u8> {
    let mut a = iced_x86::code_asm::CodeAssembler::new(64).unwrap();
    f(&mut a);
    a.assemble(ip).unwrap()
}
