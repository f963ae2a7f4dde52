//! The software CPU backend: an x86-64 interpreter behind the hypervisor traits, for hosts
//! without VT-x/SVM. See shared/EMU-NOTES.md for the design goals.

use std::sync::Arc;

use corefour_hypervisor::{Hypervisor, HypervisorError, Result, Vm};

/// The software CPU backend.
#[derive(Debug, Default)]
pub struct Emu;

impl Emu {
    pub fn new() -> Self {
        Emu
    }
}

impl Hypervisor for Emu {
    fn create_vm(&self, _vcpus: u32) -> Result<Arc<dyn Vm>> {
        Err(HypervisorError::Unsupported(
            "the software CPU (not built yet)",
        ))
    }

    fn name(&self) -> &'static str {
        "emu"
    }
}
