//! The CPU-backend traits shared by the KVM backend (`corefour-kvm`) and the software CPU
//! (`corefour-emu`). The VMM only ever names these traits; a factory in the VMM picks the backend.
//!
//! Port and MMIO accesses do not come back as exits: a backend hands them to the [`VmOps`]
//! callback it was given, so the software CPU never depends on the device crate and both
//! backends reach the devices the same way. [`VmExit`] lists only what the VMM must decide on.

pub mod eventfd;
mod regs;

pub use eventfd::{Datamatch, IoEventAddress};
pub use regs::{CpuState, DescriptorTable, Regs, Segment, SpecialRegs};
/// The eventfd type the ioeventfd/irqfd hooks take (vmm-sys-util's, as kvm-ioctls uses).
pub use vmm_sys_util::eventfd::EventFd;

use std::sync::Arc;

/// Errors a backend reports. The errno is kept where there is one.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("{op} failed: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("guest state is invalid: {0}")]
    GuestState(String),
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// How a vCPU reaches guest devices. Implemented by the VMM's bus.
pub trait VmOps: Send + Sync {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]);
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Why `Vcpu::run` returned. Only what the VMM must decide on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest halted with interrupts it cannot leave (HLT with IF=0 or no in-kernel irqchip).
    Halt,
    /// The guest asked for a reset (i8042 0xFE, triple fault, port 0xCF9).
    Reset,
    /// The guest shut the machine down (triple fault on backends that report it as such).
    Shutdown,
    /// `run` was interrupted by a kick from another thread (pause, stop, timeout).
    Interrupted,
    /// The guest did something the backend cannot emulate; the string names it.
    Unhandled(String),
    /// The guest wrote to the debug-exit device; the VMM exits with this code.
    DebugExit(u32),
}

/// One guest RAM region as the host sees it.
#[derive(Debug, Clone, Copy)]
pub struct MemoryRegion {
    pub slot: u32,
    pub guest_phys_addr: u64,
    pub size: u64,
    /// Start of the host mapping that backs the region; it must stay mapped while the VM lives.
    pub host_addr: u64,
    pub log_dirty: bool,
    pub read_only: bool,
}

/// The first GSI free for message-signalled routes: 0..23 are the I/O APIC's pins.
pub const MSI_GSI_BASE: u32 = 24;

/// One message-signalled route: an irqfd on `gsi` sends (`address`, `data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiRoute {
    pub gsi: u32,
    pub address: u64,
    pub data: u32,
}

/// Lets another thread stop a running vCPU (pause, shutdown, timeout).
pub trait VcpuKicker: Send + Sync {
    fn kick(&self);
}

/// A virtual machine of one backend.
pub trait Vm: Send + Sync {
    /// Maps host memory into the guest's physical address space.
    ///
    /// # Safety
    /// `region.host_addr .. + size` must be a valid mapping that outlives the VM.
    unsafe fn set_memory_region(&self, region: MemoryRegion) -> Result<()>;

    /// Creates vCPU `index`; device accesses go to `ops`.
    fn create_vcpu(&self, index: u32, ops: Arc<dyn VmOps>) -> Result<Box<dyn Vcpu>>;

    /// Raises or lowers a platform interrupt line (GSI).
    fn set_irq_line(&self, irq: u32, level: bool) -> Result<()>;

    /// Delivers a message-signalled interrupt: what a device's MSI/MSI-X write of `data` to
    /// `address` (0xFEEx_xxxx, the local APICs) does on real hardware.
    fn signal_msi(&self, _address: u64, _data: u32) -> Result<()> {
        Err(HypervisorError::Unsupported("MSI delivery"))
    }

    /// Returns and clears the dirty bitmap of a slot (one bit per 4 KiB page).
    fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>>;

    /// A short name for messages: "kvm", "emu".
    fn backend_name(&self) -> &'static str;

    /// Signals `event` when the guest writes to `addr` (with `datamatch`: only that value of
    /// that width), instead of handing the write to the `VmOps` callback. On KVM the vCPU then
    /// does not leave the kernel for a virtio queue notification. Backends without it return
    /// `Unsupported`; the caller keeps the `VmOps` path, which must stay correct either way.
    fn register_ioevent(
        &self,
        _addr: IoEventAddress,
        _datamatch: Datamatch,
        _event: &EventFd,
    ) -> Result<()> {
        Err(HypervisorError::Unsupported("ioeventfd"))
    }
    fn unregister_ioevent(
        &self,
        _addr: IoEventAddress,
        _datamatch: Datamatch,
        _event: &EventFd,
    ) -> Result<()> {
        Err(HypervisorError::Unsupported("ioeventfd"))
    }

    /// A write to `event` raises an edge on interrupt line `gsi` (as `set_irq_line` true then
    /// false), without a call into the VMM's thread. `Unsupported` where the backend lacks it.
    fn register_irqfd(&self, _event: &EventFd, _gsi: u32) -> Result<()> {
        Err(HypervisorError::Unsupported("irqfd"))
    }
    fn unregister_irqfd(&self, _event: &EventFd, _gsi: u32) -> Result<()> {
        Err(HypervisorError::Unsupported("irqfd"))
    }

    /// A level-triggered irqfd: a write to `event` asserts line `gsi` until the guest's EOI
    /// of that interrupt; the backend then lowers the line and writes `resample`, so the
    /// device can assert it again if it still has something pending (PCI INTx). Unregister
    /// with `unregister_irqfd`. `Unsupported` where the backend lacks it.
    fn register_irqfd_resample(
        &self,
        _event: &EventFd,
        _resample: &EventFd,
        _gsi: u32,
    ) -> Result<()> {
        Err(HypervisorError::Unsupported("irqfd with resample"))
    }

    /// Replaces the VM's message-signalled routes: afterwards an irqfd registered on
    /// `route.gsi` delivers that message (a device's MSI-X vector costs one eventfd write).
    /// The platform's own lines (GSIs below [`MSI_GSI_BASE`]) keep their routing. `Unsupported`
    /// where the backend has no routing table; the caller then uses `signal_msi`.
    fn set_msi_routes(&self, _routes: &[MsiRoute]) -> Result<()> {
        Err(HypervisorError::Unsupported("MSI routing"))
    }

    /// VM-wide state beyond the vCPUs (in-kernel irqchip, PIT, clock), for snapshots and
    /// migration (opaque to the VMM).
    fn save_state(&self) -> Result<CpuState> {
        Err(HypervisorError::Unsupported("VM state save"))
    }
    fn restore_state(&self, _state: &CpuState) -> Result<()> {
        Err(HypervisorError::Unsupported("VM state restore"))
    }
}

/// One virtual CPU.
pub trait Vcpu: Send {
    fn regs(&self) -> Result<Regs>;
    fn set_regs(&mut self, regs: &Regs) -> Result<()>;
    fn sregs(&self) -> Result<SpecialRegs>;
    fn set_sregs(&mut self, sregs: &SpecialRegs) -> Result<()>;
    /// Runs until something the VMM must decide on happens.
    fn run(&mut self) -> Result<VmExit>;
    /// A handle that makes `run` return `VmExit::Interrupted` soon.
    fn kicker(&self) -> Arc<dyn VcpuKicker>;
    /// The whole architectural state, for snapshots and migration (opaque to the VMM).
    fn save_state(&self) -> Result<CpuState> {
        Err(HypervisorError::Unsupported("vcpu state save"))
    }
    fn restore_state(&mut self, _state: &CpuState) -> Result<()> {
        Err(HypervisorError::Unsupported("vcpu state restore"))
    }
}

/// A CPU backend: KVM or the software CPU. The VMM picks one in its factory and names no
/// backend type elsewhere.
pub trait Hypervisor: Send + Sync {
    /// Creates an empty VM (no memory, no vCPUs) that will have `vcpus` vCPUs.
    fn create_vm(&self, vcpus: u32) -> Result<std::sync::Arc<dyn Vm>>;
    /// As `create_vm`, with `memory` registered before anything else. A backend where the
    /// order costs time (KVM: the first memory slot of a fresh VM is cheap, one added after the
    /// irqchip and PIT waits for SRCU grace periods) overrides it.
    ///
    /// # Safety
    /// As `Vm::set_memory_region`, for every region.
    unsafe fn create_vm_with_memory(
        &self,
        vcpus: u32,
        memory: &[MemoryRegion],
    ) -> Result<std::sync::Arc<dyn Vm>> {
        let vm = self.create_vm(vcpus)?;
        for r in memory {
            // SAFETY: the caller's promise, passed on.
            unsafe { vm.set_memory_region(*r)? };
        }
        Ok(vm)
    }
    /// A short name for messages: "kvm", "emu".
    fn name(&self) -> &'static str;
}
