//! The config-independent part of a VM: the backend VM, its vCPUs and the run control, made
//! before the devices exist. The vCPUs reach the devices through `LateOps`, which the restore
//! points at the machine once it is built; so a pre-warmed VMM (`warm`) can create everything
//! KVM makes slowly before it knows which snapshot it will run.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use corefour_hypervisor::{Vcpu, Vm, VmOps};

use super::restore::RestoreError;
use crate::backend;
use crate::builder::VmmError;
use crate::config::BackendKind;
use crate::control::Control;
use crate::machine::Machine;

/// The machine, once it is there. Before that (no vCPU runs yet) reads see an empty bus.
#[derive(Default)]
pub(crate) struct LateOps(OnceLock<Arc<Machine>>);

impl LateOps {
    /// Points the vCPUs at `machine`; only the first call counts.
    pub(crate) fn set(&self, machine: Arc<Machine>) -> bool {
        self.0.set(machine).is_ok()
    }
}

impl VmOps for LateOps {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        match self.0.get() {
            Some(m) => m.pio_read(port, data),
            None => data.fill(0xff),
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if let Some(m) = self.0.get() {
            m.pio_write(port, data);
        }
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.0.get() {
            Some(m) => m.mmio_read(addr, data),
            None => data.fill(0xff),
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some(m) = self.0.get() {
            m.mmio_write(addr, data);
        }
    }
}

/// Time spent per phase of a restore, in order (ms).
#[derive(Debug, Clone, Default)]
pub struct Phases(pub Vec<(&'static str, f64)>);

impl Phases {
    /// Records the time since `since` as `name` and returns now (the next phase's start).
    pub fn mark(&mut self, name: &'static str, since: Instant) -> Instant {
        let now = Instant::now();
        self.0
            .push((name, now.duration_since(since).as_secs_f64() * 1e3));
        now
    }

    /// "name 1.23, name 0.45" for notes.
    pub fn describe(&self) -> String {
        self.0
            .iter()
            .map(|(n, ms)| format!("{n} {ms:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A VM with memory registered and vCPUs made, no devices and no state.
pub(crate) struct Shell {
    pub backend: &'static str,
    pub vm: Arc<dyn Vm>,
    pub control: Arc<Control>,
    pub vcpus: Vec<Box<dyn Vcpu>>,
    pub ops: Arc<LateOps>,
}

/// Opens the backend, creates the VM, lets `register` give it memory, then creates `vcpus`
/// vCPUs. Memory goes in before the vCPUs: KVM_CREATE_VCPU and KVM_SET_USER_MEMORY_REGION
/// each take a VM-wide lock, and a memory slot waits for an SRCU grace period (up to a jiffy),
/// so nothing is gained by running them side by side.
pub(crate) fn build(
    kind: BackendKind,
    vcpus: u32,
    register: impl FnOnce(&dyn Vm) -> Result<(), RestoreError>,
    phases: &mut Phases,
) -> Result<Shell, RestoreError> {
    let t = Instant::now();
    let picked = backend::open(kind).map_err(VmmError::from)?;
    let t = phases.mark("open backend", t);
    let name = picked.hypervisor.name();
    let vm = picked
        .hypervisor
        .create_vm(vcpus)
        .map_err(|source| VmmError::CreateVm {
            backend: name,
            source,
        })?;
    let t = phases.mark("create VM", t);
    register(vm.as_ref())?;
    let t = phases.mark("memory slots", t);
    let control = Control::new(vcpus);
    let ops = Arc::new(LateOps::default());
    let mut made = Vec::with_capacity(vcpus as usize);
    for index in 0..vcpus {
        let vcpu = vm
            .create_vcpu(index, ops.clone())
            .map_err(|source| VmmError::CreateVcpu { index, source })?;
        control.add_kicker(vcpu.kicker());
        made.push(vcpu);
    }
    phases.mark("vCPUs", t);
    Ok(Shell {
        backend: name,
        vm,
        control,
        vcpus: made,
        ops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_ops_read_an_empty_bus_until_set() {
        let ops = LateOps::default();
        let mut b = [0u8; 2];
        ops.pio_read(0x3f8, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        ops.mmio_write(0xd000_0000, &[1]);
        let mut p = Phases::default();
        let t = p.mark("a", Instant::now());
        p.mark("b", t);
        assert_eq!(p.0.len(), 2);
        assert!(p.describe().starts_with("a "));
    }
}
