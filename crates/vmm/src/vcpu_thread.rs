//! One thread per vCPU: run until something the VMM must decide on, then decide.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use corefour_hypervisor::{Vcpu, VmExit};

use crate::control::{Control, Directive, Outcome};

/// vCPU threads do little besides the run call; a small stack keeps the VMM's footprint small.
const STACK: usize = 256 * 1024;

/// A vCPU shared between its thread (which locks it around each run) and the snapshot code
/// (which locks it while the VM is paused, when the thread is parked outside `run`).
pub type SharedVcpu = Arc<Mutex<Box<dyn Vcpu>>>;

pub fn spawn(
    index: u32,
    vcpu: SharedVcpu,
    control: Arc<Control>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .stack_size(STACK)
        .spawn(move || {
            run_loop(index, vcpu, &control);
            // The vCPU (and its kick target) is dropped inside run_loop before this.
            control.vcpu_exited();
        })
}

fn run_loop(index: u32, vcpu: SharedVcpu, control: &Control) {
    drive(index, &vcpu, control);
    // The final state, for differential tests (KVM vs the software CPU): after a debug exit
    // the vCPU stops right after its OUT, since `finish` kicks it before it runs again.
    let regs = vcpu.lock().unwrap_or_else(|p| p.into_inner()).regs().ok();
    control.record_regs(index, regs);
}

fn drive(index: u32, vcpu: &SharedVcpu, control: &Control) {
    while control.wait_runnable() == Directive::Run {
        let result = vcpu.lock().unwrap_or_else(|p| p.into_inner()).run();
        let outcome = match result {
            Ok(VmExit::Interrupted) => continue,
            Ok(VmExit::Halt) => {
                control.halt_forever();
                return;
            }
            Ok(VmExit::DebugExit(code)) => Outcome::GuestExit(code),
            Ok(VmExit::Reset) => Outcome::Reset {
                vcpu: Some(index),
                what: "the guest asked for a reset".into(),
            },
            Ok(VmExit::Shutdown) => Outcome::Reset {
                vcpu: Some(index),
                what: "triple fault (shutdown)".into(),
            },
            Ok(VmExit::Unhandled(what)) => Outcome::Error(format!("vCPU {index}: {what}")),
            Err(e) => Outcome::Error(format!("vCPU {index}: {e}")),
        };
        control.finish(outcome);
        return;
    }
}
