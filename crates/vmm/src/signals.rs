//! SIGTERM and SIGINT end the VM gracefully (as `PUT /vm/shutdown`): they are blocked in every
//! thread and taken by one thread with sigwait, which may then use ordinary locks.

use std::sync::Arc;

use crate::control::{Control, Outcome};

#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("cannot block SIGTERM/SIGINT: {0}")]
    Mask(#[source] std::io::Error),
    #[error("cannot start the signal thread: {0}")]
    Thread(#[source] std::io::Error),
}

fn term_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM/SIGINT in the calling thread. Call it before any other thread starts, so
/// all of them inherit the mask; signals that arrive before `spawn_handler` stay pending.
pub fn block() -> Result<(), SignalError> {
    let set = term_set();
    // SAFETY: `set` is a valid signal set; blocking signals in this thread has no other effect.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(SignalError::Mask(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

/// Starts the thread that turns SIGTERM/SIGINT into `Outcome::Shutdown`.
pub fn spawn_handler(control: Arc<Control>) -> Result<(), SignalError> {
    let set = term_set();
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` and `sig` are valid for the call.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                // Only EINVAL is possible, and it would repeat: give up on signals.
                return;
            }
            control.finish(Outcome::Shutdown);
        })
        .map_err(SignalError::Thread)?;
    Ok(())
}
