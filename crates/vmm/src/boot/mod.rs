//! Putting a guest into memory and the vCPUs at its entry: image loading (ELF64 or flat
//! binary), the boot-info page, and 64-bit long mode set up by the VMM (no real-mode code).

pub mod image;
pub mod info;
pub mod linux;
pub mod longmode;

use std::path::Path;

use corefour_hypervisor::{HypervisorError, Vcpu};

use crate::config::VmConfig;
use crate::layout::{self, align_up, PAGE_SIZE, STACK_SIZE};
use crate::memory::GuestMem;

pub use image::ImageError;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Linux(#[from] linux::LinuxError),
    #[error(
        "memory too small: {have_mib} MiB given, the image, initrd and {vcpus} vCPU stacks need \
         {need_kib} KiB (raise --memory)"
    )]
    TooSmall {
        have_mib: u64,
        need_kib: u64,
        vcpus: u32,
    },
    #[error("command line is {0} bytes; the limit is {max}", max = layout::CMDLINE_MAX)]
    CmdlineTooLong(usize),
    #[error("cannot read initrd {path}: {source}")]
    Initrd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write boot data into guest memory: {0}")]
    Memory(String),
    #[error("cannot set up vCPU {index}: {source}")]
    Vcpu {
        index: u32,
        #[source]
        source: HypervisorError,
    },
}

/// What the vCPUs need to start, once memory is laid out.
#[derive(Debug, Clone)]
pub struct BootPlan {
    pub entry: u64,
    pub stacks_base: u64,
    pub vcpus: u32,
    /// Set for a Linux bzImage: the boot protocol's registers instead of the guest contract's.
    pub linux: Option<linux::LinuxPlan>,
}

/// Loads the kernel (and initrd), writes the boot-info page, command line, GDT and page tables.
pub fn prepare(mem: &GuestMem, config: &VmConfig) -> Result<BootPlan, BootError> {
    if linux::is_bzimage(&config.kernel) {
        return linux::prepare(mem, config);
    }
    let cmdline = config.cmdline.as_bytes();
    if cmdline.len() > layout::CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let mem_bytes = config.memory_mib << 20;
    let low_end = mem_bytes.min(layout::MMIO_HOLE_START);
    let loaded = image::load(mem, &config.kernel, low_end)?;

    let too_small = |need: u64| BootError::TooSmall {
        have_mib: config.memory_mib,
        need_kib: need.div_ceil(1024),
        vcpus: config.vcpus,
    };
    let stacks_base = align_up(loaded.end, PAGE_SIZE).ok_or_else(|| too_small(u64::MAX))?;
    let stacks_end = STACK_SIZE
        .checked_mul(u64::from(config.vcpus))
        .and_then(|s| s.checked_add(stacks_base))
        .ok_or_else(|| too_small(u64::MAX))?;
    let (initrd, free_start) = match &config.initrd {
        None => (None, stacks_end),
        Some(path) => {
            let data = std::fs::read(path).map_err(|source| BootError::Initrd {
                path: path.display().to_string(),
                source,
            })?;
            let end = stacks_end
                .checked_add(data.len() as u64)
                .and_then(|e| align_up(e, PAGE_SIZE))
                .ok_or_else(|| too_small(u64::MAX))?;
            if end > low_end {
                return Err(too_small(end));
            }
            write(mem, stacks_end, &data)?;
            (Some((stacks_end, data.len() as u64)), end)
        }
    };
    if free_start > low_end {
        return Err(too_small(free_start));
    }

    write(mem, layout::CMDLINE_ADDR, cmdline)?;
    write(mem, layout::CMDLINE_ADDR + cmdline.len() as u64, &[0])?;
    let info = info::BootInfo {
        vcpus: config.vcpus,
        cmdline_len: cmdline.len() as u32,
        mem_bytes,
        low_end,
        free_start,
        stacks_base,
        initrd,
        kernel: (loaded.start, loaded.end),
    };
    write(mem, layout::BOOT_INFO_ADDR, &info.to_bytes())?;
    longmode::write_tables(mem, mem_bytes).map_err(|e| BootError::Memory(e.to_string()))?;
    Ok(BootPlan {
        entry: loaded.entry,
        stacks_base,
        vcpus: config.vcpus,
        linux: None,
    })
}

/// Sets vCPU `index` at the entry in long mode with its stack and registers per the contract.
pub fn setup_vcpu(vcpu: &mut dyn Vcpu, plan: &BootPlan, index: u32) -> Result<(), BootError> {
    if let Some(l) = &plan.linux {
        return linux::setup_vcpu(vcpu, plan, l, index);
    }
    longmode::setup_vcpu(vcpu, plan, index).map_err(|source| BootError::Vcpu { index, source })
}

fn write(mem: &GuestMem, addr: u64, data: &[u8]) -> Result<(), BootError> {
    use vm_memory::{Bytes, GuestAddress};
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|e| BootError::Memory(format!("{e} at {addr:#x}")))
}

/// For error messages that name the kernel.
pub(crate) fn shown(p: &Path) -> String {
    p.display().to_string()
}
