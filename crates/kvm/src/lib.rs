//! The KVM backend of the hypervisor traits (kvm-ioctls).
//!
//! Every vCPU starts runnable at the registers the VMM sets: there is no INIT/SIPI wait, so the
//! VMM can start application processors directly at their entry point (the simplest thing that
//! works on kvm_pvm, where real-mode trampolines would be emulated instruction by instruction).

pub mod convert;
mod kick;
pub mod state;
mod vcpu;
mod vm;

use std::fs::OpenOptions;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Arc;

use corefour_hypervisor::{Hypervisor, HypervisorError, Result, Vm};
use kvm_ioctls::Kvm as KvmSys;

pub use vcpu::KvmVcpu;
pub use vm::KvmVm;

/// KVM_CAP_IMMEDIATE_EXIT is required by the kicker; every kernel since 4.11 has it.
const REQUIRED_CAPS: &[(kvm_ioctls::Cap, &str)] = &[
    (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (kvm_ioctls::Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (kvm_ioctls::Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (kvm_ioctls::Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

/// The KVM backend: an open /dev/kvm.
pub struct Kvm {
    sys: KvmSys,
}

impl std::fmt::Debug for Kvm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kvm").finish_non_exhaustive()
    }
}

pub(crate) fn os_err(op: &'static str, e: vmm_sys_util::errno::Error) -> HypervisorError {
    HypervisorError::Os {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

impl Kvm {
    /// Opens /dev/kvm and checks the capabilities the VMM relies on.
    pub fn new() -> Result<Self> {
        // Opened by hand (not `Kvm::new`) to keep the path in the error the user sees.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|source| HypervisorError::Os {
                op: "open /dev/kvm",
                source,
            })?;
        // SAFETY: the fd was just opened from /dev/kvm and ownership moves into `KvmSys`.
        let sys = unsafe { KvmSys::from_raw_fd(file.into_raw_fd()) };
        let api = sys.get_api_version();
        if api != 12 {
            return Err(HypervisorError::Invalid(format!(
                "/dev/kvm reports API version {api}, expected 12"
            )));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !sys.check_extension(*cap) {
                return Err(HypervisorError::Unsupported(name));
            }
        }
        kick::install_handler()?;
        Ok(Self { sys })
    }

    /// The most vCPUs one VM may have on this host.
    pub fn max_vcpus(&self) -> u32 {
        u32::try_from(self.sys.get_max_vcpus()).unwrap_or(u32::MAX)
    }
}

impl Hypervisor for Kvm {
    fn create_vm(&self, vcpus: u32) -> Result<Arc<dyn Vm>> {
        let max = self.max_vcpus();
        if vcpus == 0 || vcpus > max {
            return Err(HypervisorError::Invalid(format!(
                "{vcpus} vCPUs requested; KVM on this host supports 1 to {max}"
            )));
        }
        Ok(Arc::new(KvmVm::new(&self.sys, vcpus)?))
    }

    fn name(&self) -> &'static str {
        "kvm"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corefour_hypervisor::{VmExit, VmOps};

    struct NoDevices;
    impl VmOps for NoDevices {
        fn pio_read(&self, _: u16, d: &mut [u8]) {
            d.fill(0xff);
        }
        fn pio_write(&self, _: u16, _: &[u8]) {}
        fn mmio_read(&self, _: u64, d: &mut [u8]) {
            d.fill(0xff);
        }
        fn mmio_write(&self, _: u64, _: &[u8]) {}
    }

    fn kvm() -> Option<Kvm> {
        match Kvm::new() {
            Ok(k) => Some(k),
            Err(e) => {
                eprintln!("SKIP: KVM unavailable: {e}");
                None
            }
        }
    }

    #[test]
    fn vcpu_counts_are_checked() {
        let Some(k) = kvm() else { return };
        assert!(matches!(k.create_vm(0), Err(HypervisorError::Invalid(_))));
        assert!(matches!(
            k.create_vm(k.max_vcpus() + 1),
            Err(HypervisorError::Invalid(_))
        ));
        let vm = k.create_vm(2).unwrap();
        assert_eq!(vm.backend_name(), "kvm");
        assert!(vm.create_vcpu(2, Arc::new(NoDevices)).is_err());
    }

    #[test]
    fn msis_go_to_the_in_kernel_irqchip() {
        let Some(k) = kvm() else { return };
        let vm = k.create_vm(1).unwrap();
        let _vcpu = vm.create_vcpu(0, Arc::new(NoDevices)).unwrap();
        // The APIC is still software-disabled, so KVM accepts the message and drops it.
        vm.signal_msi(0xfee0_0000, 0x40).unwrap();
    }

    #[test]
    fn a_kick_before_run_makes_run_return_interrupted() {
        let Some(k) = kvm() else { return };
        let vm = k.create_vm(1).unwrap();
        let mut vcpu = vm.create_vcpu(0, Arc::new(NoDevices)).unwrap();
        let kicker = vcpu.kicker();
        kicker.kick();
        assert_eq!(vcpu.run().unwrap(), VmExit::Interrupted);
        // The kick is consumed: registers are still readable and the kicker outlives the vCPU.
        assert!(vcpu.regs().is_ok());
        drop(vcpu);
        kicker.kick();
    }

    /// Records port writes; a write to port 0x11 kicks the vCPU out of `run`.
    #[derive(Default)]
    struct Recorder {
        writes: std::sync::Mutex<Vec<(u16, u8)>>,
        kicker: std::sync::OnceLock<Arc<dyn corefour_hypervisor::VcpuKicker>>,
    }
    impl VmOps for Recorder {
        fn pio_read(&self, _: u16, d: &mut [u8]) {
            d.fill(0xff);
        }
        fn pio_write(&self, port: u16, d: &[u8]) {
            self.writes.lock().unwrap().push((port, d[0]));
            if port == 0x11 {
                if let Some(k) = self.kicker.get() {
                    k.kick();
                }
            }
        }
        fn mmio_read(&self, _: u64, d: &mut [u8]) {
            d.fill(0xff);
        }
        fn mmio_write(&self, _: u64, _: &[u8]) {}
    }

    #[test]
    fn an_ioeventfd_takes_matching_writes_and_irqfds_register() {
        use corefour_hypervisor::{Datamatch, EventFd, IoEventAddress, MemoryRegion};
        let Some(k) = kvm() else { return };
        let vm = k.create_vm(1).unwrap();
        const MEM: usize = 0x10000;
        // SAFETY: a fresh anonymous mapping, checked below and leaked for the VM's lifetime.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED);
        // mov al,1; out 0x80,al; mov al,2; out 0x80,al; out 0x11,al; jmp $
        let code = [
            0xb0, 0x01, 0xe6, 0x80, 0xb0, 0x02, 0xe6, 0x80, 0xe6, 0x11, 0xeb, 0xfe,
        ];
        // SAFETY: the mapping holds MEM bytes; the code goes at 0x1000.
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), mem.cast::<u8>().add(0x1000), code.len())
        };
        // SAFETY: the mapping is never unmapped (leaked for the test's lifetime).
        unsafe {
            vm.set_memory_region(MemoryRegion {
                slot: 0,
                guest_phys_addr: 0,
                size: MEM as u64,
                host_addr: mem as u64,
                log_dirty: false,
                read_only: false,
            })
        }
        .unwrap();
        let ev = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_ioevent(IoEventAddress::Pio(0x80), Datamatch::U8(1), &ev)
            .unwrap();
        let ops = Arc::new(Recorder::default());
        let mut vcpu = vm.create_vcpu(0, ops.clone()).unwrap();
        let _ = ops.kicker.set(vcpu.kicker());
        let mut sregs = vcpu.sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&corefour_hypervisor::Regs {
            rip: 0x1000,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(vcpu.run().unwrap(), VmExit::Interrupted);
        assert_eq!(
            ev.read().unwrap(),
            1,
            "the matching write signalled the eventfd"
        );
        assert_eq!(
            *ops.writes.lock().unwrap(),
            vec![(0x80, 2), (0x11, 2)],
            "the matching write never reached VmOps, the others did"
        );
        vm.unregister_ioevent(IoEventAddress::Pio(0x80), Datamatch::U8(1), &ev)
            .unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_irqfd(&irq, 5).unwrap();
        irq.write(1).unwrap();
        vm.unregister_irqfd(&irq, 5).unwrap();
    }
}
