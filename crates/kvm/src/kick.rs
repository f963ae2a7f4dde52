//! Making a vCPU leave KVM_RUN from another thread.
//!
//! The kicker sets `kvm_run.immediate_exit` (so a vCPU that is between two KVM_RUN calls returns
//! at once from the next one) and then sends a real-time signal to the thread that runs the vCPU
//! (so one that is inside KVM_RUN, or waiting in the kernel on HLT, leaves it with EINTR). The
//! signal handler does nothing; it is installed without SA_RESTART so the ioctl is interrupted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};

use corefour_hypervisor::{Result, VcpuKicker};

/// SIGRTMIN+0 is left to libraries that want it; the VMM uses the next one.
pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

pub(crate) fn install_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick) {
            result = Err(crate::os_err("sigaction(vCPU kick signal)", e));
        }
    });
    result
}

/// What a kick needs to reach: the vCPU's `immediate_exit` byte and the thread running it.
struct Target {
    /// Points into the vCPU's kvm_run mapping; `None` once the vCPU is dropped.
    immediate_exit: Option<*mut u8>,
}

// SAFETY: the pointer is only dereferenced under the mutex, and only while the vCPU that owns
// the mapping is alive (its Drop clears it under the same mutex first).
unsafe impl Send for Target {}

pub(crate) struct KickState {
    target: Mutex<Target>,
    /// pthread_t of the thread inside `run`, 0 when none.
    thread: AtomicU64,
}

impl KickState {
    pub(crate) fn new(immediate_exit: *mut u8) -> Arc<Self> {
        Arc::new(Self {
            target: Mutex::new(Target {
                immediate_exit: Some(immediate_exit),
            }),
            thread: AtomicU64::new(0),
        })
    }

    /// Called by the vCPU thread on entering `run`.
    pub(crate) fn set_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as u64;
        self.thread.store(me, Ordering::Release);
    }

    /// Called by the vCPU thread on leaving `run` for good (drop).
    pub(crate) fn detach(&self) {
        let mut t = self.target.lock().unwrap_or_else(|p| p.into_inner());
        t.immediate_exit = None;
        self.thread.store(0, Ordering::Release);
    }
}

pub(crate) struct KvmKicker(pub(crate) Arc<KickState>);

impl VcpuKicker for KvmKicker {
    fn kick(&self) {
        let t = self.0.target.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ptr) = t.immediate_exit else { return };
        // SAFETY: the vCPU (and so its kvm_run mapping) is alive while `immediate_exit` is set,
        // and we hold the lock its Drop takes before unmapping. A volatile byte store is what
        // the kernel reads on the next KVM_RUN.
        unsafe { std::ptr::write_volatile(ptr, 1) };
        let thread = self.0.thread.load(Ordering::Acquire);
        if thread != 0 {
            // SAFETY: the thread is alive: it owns the vCPU, which detaches (under the lock we
            // hold) before the thread can exit.
            // A failure leaves nothing to do: immediate_exit still stops the next KVM_RUN.
            let _ = unsafe { libc::pthread_kill(thread as libc::pthread_t, kick_signal()) };
        }
    }
}
