//! Waiting for a VMM to end, and recording how it ended.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::Daemon;
use crate::inventory::InventoryError;
use crate::network;
use crate::shim;

/// What the watcher waits on.
pub(super) enum Watched {
    /// A shim this daemon started: reaped with wait().
    Child(tokio::process::Child),
    /// A shim (or, when the shim is gone, the VMM itself) inherited from a previous daemon: not
    /// our child, so watched through a pidfd, which turns readable when the process exits.
    Pid { pid: i32, is_shim: bool },
}

/// Opens a pidfd (Linux 5.3+).
fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Returns once `pid` has exited (a pidfd turns readable; /proc is polled where that fails).
/// VM and container watchers share it.
pub(crate) async fn wait_pid(pid: i32) {
    let Ok(fd) = pidfd_open(pid) else {
        return; // Already gone.
    };
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and the same for the
    // AsyncFd's whole life.
    match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => {
            // No reactor support: poll /proc instead.
            while super::proc::start_time(pid).is_some() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

impl Daemon {
    pub(super) fn spawn_watcher(
        self: &Arc<Self>,
        name: String,
        watched: Watched,
        done: tokio::sync::watch::Sender<bool>,
    ) {
        let d = Arc::clone(self);
        tokio::spawn(async move {
            let shim_watched = match watched {
                Watched::Child(mut c) => {
                    let _ = c.wait().await;
                    true
                }
                Watched::Pid { pid, is_shim } => {
                    wait_pid(pid).await;
                    is_shim
                }
            };
            d.record_exit(&name, shim_watched);
            let _ = done.send(true);
        });
    }

    /// Marks the VM stopped with the reason the shim recorded, and releases its host resources.
    pub(super) fn record_exit(&self, name: &str, shim_watched: bool) {
        let dir = self.vm_dir(name);
        let requested = self
            .stop_requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let (reason, code) = match shim::read_exit(&dir) {
            Some(rec) => {
                let mut reason = rec.reason();
                if requested && rec.code == Some(0) {
                    reason = "shut down on request (exit code 0)".to_string();
                }
                if rec.code == Some(1) {
                    let tail = super::start::console_tail(&dir.join(shim::CONSOLE_LOG));
                    if !tail.is_empty() {
                        reason = format!("VMM error: {tail}");
                    }
                }
                (reason, rec.code)
            }
            None if shim_watched => (
                "the VMM's shim died without recording an exit status".to_string(),
                None,
            ),
            None => (
                "the VMM exited; its status was lost with its shim".to_string(),
                None,
            ),
        };
        self.release(name);
        match self.inv.set_stopped(name, &reason, code) {
            Ok(()) | Err(InventoryError::NotFound(_)) => {}
            Err(e) => tracing::error!(vm = name, "cannot record the VM's stop: {e}"),
        }
        super::registry::untrack(&self.running, name);
        tracing::info!(vm = name, "stopped: {reason}");
    }

    /// Removes the VM's cgroup, taps and API socket (whatever of them exists).
    pub(super) fn release(&self, name: &str) {
        if let Some(cgs) = &self.cgroups {
            cgs.vm(name).remove();
        }
        if let Ok(rec) = self.inv.get_vm(name) {
            for nic in &rec.nics {
                network::delete_tap(&nic.tap);
            }
        }
        let _ = std::fs::remove_file(self.vm_dir(name).join(shim::API_SOCK));
        let _ = std::fs::remove_file(self.vm_dir(name).join(shim::PIDS_FILE));
        // The jail's mounts lived in the VMM's own mount namespace and are gone with it; what is
        // left are empty mount points and the rewritten config.
        if let Err(e) = crate::jail::remove_root(&self.vm_dir(name)) {
            tracing::warn!(vm = name, "jail left in place: {e}");
        }
    }
}
