//! One KVM vCPU: registers, CPUID, and the KVM_RUN loop that hands port and MMIO accesses to
//! the VMM's `VmOps`.

use std::cell::Cell;
use std::sync::Arc;

use corefour_hypervisor::{Regs, Result, SpecialRegs, Vcpu, VcpuKicker, VmExit, VmOps};
use kvm_bindings::{
    kvm_mp_state, kvm_sregs, CpuId, KVM_MP_STATE_RUNNABLE, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::convert::{regs_from_kvm, regs_to_kvm, sregs_from_kvm, sregs_to_kvm};
use crate::kick::{KickState, KvmKicker};
use crate::os_err;

pub struct KvmVcpu {
    fd: VcpuFd,
    ops: Arc<dyn VmOps>,
    kick: Arc<KickState>,
    /// The special registers as last read or written while the vCPU did not run: `set_sregs`
    /// needs KVM's full struct (the neutral type lacks the interrupt bitmap), and every vCPU
    /// ioctl costs a vcpu_load, which is slow on nested kvm_pvm.
    sregs: Cell<Option<kvm_sregs>>,
}

/// The supported CPUID, with this vCPU's APIC id where the guest looks for it.
fn cpuid_for(base: &CpuId, index: u32) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            // EBX[31:24]: initial APIC id.
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((index & 0xff) << 24),
            // EDX: x2APIC id, on every sub-leaf of the topology leaves.
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    cpuid
}

impl KvmVcpu {
    pub(crate) fn new(
        fd: VcpuFd,
        index: u32,
        cpuid: &CpuId,
        irqchip: bool,
        ops: Arc<dyn VmOps>,
    ) -> Result<Self> {
        fd.set_cpuid2(&cpuid_for(cpuid, index))
            .map_err(|e| os_err("KVM_SET_CPUID2", e))?;
        if irqchip && index != 0 {
            // With an in-kernel LAPIC an AP would wait for INIT/SIPI; the VMM starts every
            // vCPU directly at its entry instead.
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(|e| os_err("KVM_SET_MP_STATE", e))?;
        }
        let mut fd = fd;
        let immediate_exit: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
        Ok(Self {
            fd,
            ops,
            kick: KickState::new(immediate_exit),
            sregs: Cell::new(None),
        })
    }

    fn kvm_sregs(&self) -> Result<kvm_sregs> {
        if let Some(s) = self.sregs.get() {
            return Ok(s);
        }
        let s = self
            .fd
            .get_sregs()
            .map_err(|e| os_err("KVM_GET_SREGS", e))?;
        self.sregs.set(Some(s));
        Ok(s)
    }

    fn internal_error(&mut self) -> String {
        // SAFETY: called only right after KVM_EXIT_INTERNAL_ERROR, which fills this union arm.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let what = match suberror {
            1 => "instruction emulation failed",
            2 => "simultaneous exceptions",
            3 => "delivery event",
            _ => "internal error",
        };
        format!("KVM internal error (suberror {suberror}: {what}) at rip {rip:#x}")
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        self.kick.detach();
    }
}

impl Vcpu for KvmVcpu {
    fn regs(&self) -> Result<Regs> {
        let r = self.fd.get_regs().map_err(|e| os_err("KVM_GET_REGS", e))?;
        Ok(regs_from_kvm(&r))
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<()> {
        self.fd
            .set_regs(&regs_to_kvm(regs))
            .map_err(|e| os_err("KVM_SET_REGS", e))
    }

    fn sregs(&self) -> Result<SpecialRegs> {
        let s = self.kvm_sregs()?;
        Ok(sregs_from_kvm(&s))
    }

    fn set_sregs(&mut self, sregs: &SpecialRegs) -> Result<()> {
        let mut k = self.kvm_sregs()?;
        sregs_to_kvm(sregs, &mut k);
        self.sregs.set(None);
        self.fd
            .set_sregs(&k)
            .map_err(|e| os_err("KVM_SET_SREGS", e))?;
        self.sregs.set(Some(k));
        Ok(())
    }

    fn run(&mut self) -> Result<VmExit> {
        self.sregs.set(None);
        self.kick.set_thread();
        loop {
            let ops = &*self.ops;
            let exit = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    ops.pio_write(port, data);
                    continue;
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    ops.pio_read(port, data);
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    ops.mmio_write(addr, data);
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    ops.mmio_read(addr, data);
                    continue;
                }
                Ok(VcpuExit::Hlt) => VmExit::Halt,
                // KVM reports a triple fault as a shutdown.
                Ok(VcpuExit::Shutdown) => VmExit::Shutdown,
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Shutdown,
                    other => VmExit::Unhandled(format!("KVM system event {other}")),
                },
                Ok(VcpuExit::Intr) => VmExit::Interrupted,
                Ok(VcpuExit::InternalError) => VmExit::Unhandled(self.internal_error()),
                Ok(VcpuExit::FailEntry(reason, cpu)) => VmExit::Unhandled(format!(
                    "KVM could not enter the guest (hardware reason {reason:#x}, host cpu {cpu})"
                )),
                Ok(other) => VmExit::Unhandled(format!("KVM exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR => {
                    self.fd.set_kvm_immediate_exit(0);
                    VmExit::Interrupted
                }
                Err(e) if e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(os_err("KVM_RUN", e)),
            };
            return Ok(exit);
        }
    }

    fn save_state(&self) -> Result<corefour_hypervisor::CpuState> {
        crate::state::save_vcpu_state(&self.fd, None)
    }

    fn restore_state(&mut self, state: &corefour_hypervisor::CpuState) -> Result<()> {
        crate::state::restore_vcpu_state(&self.fd, state)
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::new(KvmKicker(self.kick.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_lands_in_leaf_1_and_0xb() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xab00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let base = CpuId::from_entries(&entries).unwrap();
        let c = cpuid_for(&base, 3);
        let s = c.as_slice();
        assert_eq!(s[0].ebx, 0x0300_0800);
        assert_eq!(s[1].edx, 3);
    }
}
