//! The software CPU backend: an x86-64 interpreter behind the hypervisor traits, for hosts
//! without VT-x/SVM. See shared/EMU-NOTES.md for the design goals.
//!
//! Shape: iced-x86 decodes each guest-physical page's code once into blocks (`decode`), a
//! software TLB with a one-compare hit path translates addresses (`mmu`), arithmetic flags are
//! computed lazily (`flags`), and `exec` holds the instruction semantics. Ports and MMIO go to
//! the VMM's `VmOps`; local APICs and the I/O APIC live here (`platform`), as KVM keeps them
//! in the kernel. Blocks that run often are translated to host x86-64 code (`jit`);
//! `COREFOUR_EMU_JIT=0` keeps everything on the interpreter.
//!
//! Set `COREFOUR_EMU_TRACE_UNIMPL=1` (or build the backend with [`Emu::with_trace_unimpl`]) to
//! have every instruction and MSR the CPU does not implement named on stderr before the guest
//! gets its #UD/#GP.

pub mod cpu;
pub mod cpuid;
pub mod decode;
mod exec;
pub mod flags;
mod io;
pub mod jit;
pub mod mem;
pub mod mmu;
mod msr;
pub mod platform;
mod profile;
pub mod vcpu;
pub mod vm;

use std::sync::Arc;

use corefour_hypervisor::{Hypervisor, Result, Vm};

pub use vcpu::EmuVcpu;
pub use vm::EmuVm;

/// Runs of a block before the JIT translates it.
pub const JIT_THRESHOLD: u32 = 50;

/// The software CPU backend.
#[derive(Debug, Clone)]
pub struct Emu {
    trace_unimpl: bool,
    jit_threshold: u32,
}

impl Default for Emu {
    fn default() -> Self {
        Emu::new()
    }
}

impl Emu {
    /// A backend; tracing of unimplemented instructions follows `COREFOUR_EMU_TRACE_UNIMPL`,
    /// the JIT `COREFOUR_EMU_JIT` (`0` turns it off) and `COREFOUR_EMU_JIT_THRESHOLD` (runs of
    /// a block before it is translated).
    pub fn new() -> Self {
        let trace = std::env::var_os("COREFOUR_EMU_TRACE_UNIMPL")
            .is_some_and(|v| v != "0" && !v.is_empty());
        let jit_off = std::env::var_os("COREFOUR_EMU_JIT").is_some_and(|v| v == "0");
        let threshold = std::env::var("COREFOUR_EMU_JIT_THRESHOLD")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(JIT_THRESHOLD);
        Emu {
            trace_unimpl: trace,
            jit_threshold: if jit_off { 0 } else { threshold },
        }
    }

    /// Translates blocks to host code after `runs` runs (`0`: never, interpreter only).
    pub fn with_jit_threshold(mut self, runs: u32) -> Self {
        self.jit_threshold = runs;
        self
    }

    /// Names unimplemented instructions and MSRs on stderr.
    pub fn with_trace_unimpl(mut self, on: bool) -> Self {
        self.trace_unimpl = on;
        self
    }
}

impl Hypervisor for Emu {
    fn create_vm(&self, vcpus: u32) -> Result<Arc<dyn Vm>> {
        Ok(Arc::new(EmuVm::new(
            vcpus,
            self.trace_unimpl,
            self.jit_threshold,
        )?))
    }

    fn name(&self) -> &'static str {
        "emu"
    }
}
