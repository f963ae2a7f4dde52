//! `POST /v1/vms/{name}/stop` (graceful, then SIGKILL after a timeout) and `.../kill`.

use std::sync::Arc;
use std::time::Duration;

use corefour_api::VmInfo;
use hyper::Method;

use super::{Daemon, RunHandle};
use crate::error::DaemonError;

pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGKILLed VMM or container init may take to be reaped and recorded.
const KILL_GRACE: Duration = Duration::from_secs(10);

impl Daemon {
    pub async fn stop(
        self: &Arc<Self>,
        name: &str,
        timeout: Duration,
    ) -> Result<VmInfo, DaemonError> {
        let _g = self.op_lock(name).await;
        let h = self.running_handle(name)?;
        self.stop_requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
        // Graceful: the VMM's own shutdown verb; if its socket does not answer, SIGTERM, which
        // the contract defines as the same thing.
        if let Err(e) = self.vmm_put(name, "/vm/shutdown").await {
            tracing::debug!(
                vm = name,
                "shutdown over the API socket failed ({e}); sending SIGTERM"
            );
            signal(h.vmm_pid, libc::SIGTERM);
        }
        wait_or_kill(&h, timeout, &format!("VM {name:?}")).await?;
        self.info(name)
    }

    pub async fn kill(self: &Arc<Self>, name: &str) -> Result<VmInfo, DaemonError> {
        let _g = self.op_lock(name).await;
        let h = self.running_handle(name)?;
        self.kill_and_wait(name, &h).await?;
        self.info(name)
    }

    pub(super) async fn kill_and_wait(&self, name: &str, h: &RunHandle) -> Result<(), DaemonError> {
        kill_and_wait(h, &format!("VM {name:?}")).await
    }

    pub(super) fn running_handle(&self, name: &str) -> Result<RunHandle, DaemonError> {
        let rec = self.inv.get_vm(name)?;
        self.handle(name).ok_or_else(|| {
            DaemonError::Conflict(format!("VM {name:?} is {}: it is not running", rec.state))
        })
    }
}

/// Waits up to `timeout` for the instance (`what`: `VM "a"`, `container "b"`) to end; past
/// that, SIGKILL.
pub(crate) async fn wait_or_kill(
    h: &RunHandle,
    timeout: Duration,
    what: &str,
) -> Result<(), DaemonError> {
    if wait_done(h, timeout).await {
        return Ok(());
    }
    tracing::info!("{what}: no exit within {timeout:?}: SIGKILL");
    kill_and_wait(h, what).await
}

/// SIGKILL, and the wait for the watcher to record the end.
pub(crate) async fn kill_and_wait(h: &RunHandle, what: &str) -> Result<(), DaemonError> {
    signal(h.vmm_pid, libc::SIGKILL);
    if wait_done(h, KILL_GRACE).await {
        Ok(())
    } else {
        Err(DaemonError::Conflict(format!(
            "{what} did not exit after SIGKILL within {KILL_GRACE:?}"
        )))
    }
}

pub(crate) async fn wait_done(h: &RunHandle, timeout: Duration) -> bool {
    let mut rx = h.done.clone();
    let done = tokio::time::timeout(timeout, rx.wait_for(|d| *d))
        .await
        .is_ok();
    done
}

pub(crate) fn signal(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill() takes plain integers; a stale pid is guarded by the caller holding a
        // live RunHandle (the shim has not reaped the VMM, nor the container runtime its init).
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

impl Daemon {
    /// `PUT path` on the VM's API socket, retrying briefly while a just-started VMM creates it.
    pub(super) async fn vmm_put(&self, name: &str, path: &str) -> Result<(), DaemonError> {
        let sock = self.api_sock(name);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            match crate::client::call(&sock, Method::PUT, path, None).await {
                Ok((status, _)) if status.is_success() => return Ok(()),
                Ok((_, body)) => {
                    return Err(DaemonError::Vmm {
                        name: name.to_string(),
                        message: crate::client::fault_text(&body),
                    })
                }
                Err(e) if e.is_unreachable() && tokio::time::Instant::now() < deadline => {
                    if !self.is_active(name) {
                        return Err(DaemonError::VmmUnreachable {
                            name: name.to_string(),
                            source: e,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    return Err(DaemonError::VmmUnreachable {
                        name: name.to_string(),
                        source: e,
                    })
                }
            }
        }
    }
}
