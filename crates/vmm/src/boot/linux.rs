//! The Linux x86 boot protocol (Documentation/arch/x86/boot.rst), 64-bit entry: a bzImage's
//! protected-mode part is loaded at its preferred address, the zero page (`boot_params`) gets
//! the setup header, an e820 map, the command line and the initrd, and the boot vCPU enters
//! `startup_64` (load address + 0x200) in long mode with RSI = the zero page. Shared by every
//! backend; the other vCPUs are left for the kernel to start with INIT/SIPI.

use std::path::Path;

use corefour_hypervisor::{DescriptorTable, Regs, Segment, Vcpu};

use super::{longmode, shown, write, BootError, BootPlan};
use crate::config::VmConfig;
use crate::layout::{self, align_up, PAGE_SIZE};
use crate::memory::GuestMem;

/// Where the zero page goes (below the VMM's GDT/boot-info pages, above the real-mode IVT).
pub const ZERO_PAGE: u64 = 0x7000;
/// A GDT with the selectors the 64-bit protocol requires: __BOOT_CS = 0x10, __BOOT_DS = 0x18.
const LINUX_GDT: u64 = 0x6000;
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("{path}: {what}")]
    Bad { path: String, what: String },
    #[error("cannot read kernel {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Whether `path` is a bzImage (boot sector signature and the "HdrS" setup header magic).
pub fn is_bzimage(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 0x206];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && head[0x1fe..0x200] == [0x55, 0xaa]
        && &head[0x202..0x206] == b"HdrS"
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | u64::from(u32_at(b, o + 4)) << 32
}

/// Loads the kernel, initrd and zero page; returns the plan for the boot vCPU.
pub fn prepare(mem: &GuestMem, config: &VmConfig) -> Result<BootPlan, BootError> {
    let path = shown(&config.kernel);
    let bad = |what: String| {
        BootError::Memory(
            LinuxError::Bad {
                path: path.clone(),
                what,
            }
            .to_string(),
        )
    };
    let img = std::fs::read(&config.kernel).map_err(|source| {
        BootError::Memory(
            LinuxError::Read {
                path: path.clone(),
                source,
            }
            .to_string(),
        )
    })?;
    if img.len() < 0x1000 {
        return Err(bad("too short for a bzImage".into()));
    }
    let version = u16_at(&img, 0x206);
    if version < 0x020c {
        return Err(bad(format!(
            "boot protocol {}.{} is too old; 2.12 (64-bit entry) is needed",
            version >> 8,
            version & 0xff
        )));
    }
    let xloadflags = u16_at(&img, 0x236);
    if xloadflags & 1 == 0 {
        return Err(bad(
            "the kernel has no 64-bit entry point (XLF_KERNEL_64)".into()
        ));
    }
    let setup_sects = match img[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let setup_len = (setup_sects + 1) * 512;
    if setup_len >= img.len() {
        return Err(bad("setup sectors run past the end of the file".into()));
    }
    let kernel = &img[setup_len..];
    let pref = u64_at(&img, 0x258);
    let init_size = u64::from(u32_at(&img, 0x260));
    let load = if pref >= layout::KERNEL_MIN_ADDR {
        pref
    } else {
        layout::KERNEL_MIN_ADDR
    };

    let mem_bytes = config.memory_mib << 20;
    let low_end = mem_bytes.min(layout::MMIO_HOLE_START);
    let kernel_end = load + init_size.max(kernel.len() as u64);
    if kernel_end > low_end {
        return Err(BootError::TooSmall {
            have_mib: config.memory_mib,
            need_kib: kernel_end.div_ceil(1024),
            vcpus: config.vcpus,
        });
    }
    write(mem, load, kernel)?;

    let mut zp = vec![0u8; 4096];
    // The setup header: from 0x1f1 to the end announced by the jump at 0x200.
    let hdr_end = (0x202 + usize::from(img[0x201])).min(0x290);
    zp[0x1f1..hdr_end].copy_from_slice(&img[0x1f1..hdr_end]);
    zp[0x210] = 0xff; // type_of_loader: undefined
    zp[0x211] |= 0x01 | 0x80; // LOADED_HIGH | CAN_USE_HEAP
    zp[0x214..0x218].copy_from_slice(&(load as u32).to_le_bytes());
    zp[0x224..0x226].copy_from_slice(&0xfe00u16.to_le_bytes());
    zp[0x228..0x22c].copy_from_slice(&(layout::CMDLINE_ADDR as u32).to_le_bytes());

    let cmdline = config.cmdline.as_bytes();
    if cmdline.len() > layout::CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    write(mem, layout::CMDLINE_ADDR, cmdline)?;
    write(mem, layout::CMDLINE_ADDR + cmdline.len() as u64, &[0])?;

    if let Some(p) = &config.initrd {
        let data = std::fs::read(p).map_err(|source| BootError::Initrd {
            path: p.display().to_string(),
            source,
        })?;
        let max = u64::from(u32_at(&img, 0x22c)).max(0x37ff_ffff);
        let top = low_end.min(max + 1);
        let at = top
            .checked_sub(data.len() as u64)
            .map(|a| a & !(PAGE_SIZE - 1))
            .filter(|&a| a >= align_up(kernel_end, PAGE_SIZE).unwrap_or(u64::MAX))
            .ok_or(BootError::TooSmall {
                have_mib: config.memory_mib,
                need_kib: (kernel_end + data.len() as u64).div_ceil(1024),
                vcpus: config.vcpus,
            })?;
        write(mem, at, &data)?;
        zp[0x218..0x21c].copy_from_slice(&(at as u32).to_le_bytes());
        zp[0x21c..0x220].copy_from_slice(&(data.len() as u32).to_le_bytes());
        zp[0xc0..0xc4].copy_from_slice(&((at >> 32) as u32).to_le_bytes());
        zp[0xc4..0xc8].copy_from_slice(&((data.len() as u64 >> 32) as u32).to_le_bytes());
    }

    let mut e820: Vec<(u64, u64, u32)> = vec![
        (0, 0x9_fc00, E820_RAM),
        (0x9_fc00, 0x400, E820_RESERVED),
        (0xf_0000, 0x1_0000, E820_RESERVED),
        (0x10_0000, low_end - 0x10_0000, E820_RAM),
    ];
    if mem_bytes > layout::MMIO_HOLE_START {
        e820.push((
            layout::HIGH_RAM_START,
            mem_bytes - layout::MMIO_HOLE_START,
            E820_RAM,
        ));
    }
    zp[0x1e8] = e820.len() as u8;
    for (k, (addr, size, ty)) in e820.iter().enumerate() {
        let o = 0x2d0 + k * 20;
        zp[o..o + 8].copy_from_slice(&addr.to_le_bytes());
        zp[o + 8..o + 16].copy_from_slice(&size.to_le_bytes());
        zp[o + 16..o + 20].copy_from_slice(&ty.to_le_bytes());
    }
    write(mem, ZERO_PAGE, &zp)?;

    // Null, null, __BOOT_CS (64-bit code), __BOOT_DS.
    let gdt: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    write(mem, LINUX_GDT, &bytes)?;
    longmode::write_tables(mem, mem_bytes).map_err(|e| BootError::Memory(e.to_string()))?;
    Ok(BootPlan {
        entry: load + 0x200,
        stacks_base: 0,
        vcpus: config.vcpus,
        linux: true,
    })
}

/// The boot vCPU enters `startup_64`; the others wait for the kernel's INIT/SIPI.
pub fn setup_vcpu(vcpu: &mut dyn Vcpu, plan: &BootPlan, index: u32) -> Result<(), BootError> {
    if index != 0 {
        return Ok(());
    }
    let err = |source| BootError::Vcpu { index, source };
    longmode::setup_vcpu(vcpu, plan, index).map_err(err)?;
    let mut s = vcpu.sregs().map_err(err)?;
    s.cs.selector = BOOT_CS;
    let ds = Segment {
        selector: BOOT_DS,
        ..s.ds
    };
    s.ds = ds;
    s.es = ds;
    s.ss = ds;
    s.fs = ds;
    s.gs = ds;
    s.gdt = DescriptorTable {
        base: LINUX_GDT,
        limit: 4 * 8 - 1,
    };
    vcpu.set_sregs(&s).map_err(err)?;
    vcpu.set_regs(&Regs {
        rip: plan.entry,
        rsi: ZERO_PAGE,
        rsp: ZERO_PAGE,
        rflags: 0x2,
        ..Regs::default()
    })
    .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_and_junk_are_not_bzimages() {
        let dir = std::env::temp_dir().join(format!("c4-linux-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("junk");
        std::fs::write(&p, vec![0u8; 0x300]).unwrap();
        assert!(!is_bzimage(&p));
        let mut b = vec![0u8; 0x300];
        b[0x1fe] = 0x55;
        b[0x1ff] = 0xaa;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&p, &b).unwrap();
        assert!(is_bzimage(&p));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
