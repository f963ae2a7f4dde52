//! Waiting for a container to end, recording how, and on daemon start finding the containers
//! that run.
//!
//! A container recorded as running still runs when its shim is alive (same pid and start time).
//! When the shim is gone but the init still runs (someone killed the shim), the daemon watches
//! the init itself and cleans up after it. Otherwise the container ended while nobody watched:
//! the shim's exit record, if any, gives the reason.

use std::sync::Arc;

use corefour_api::VmState;

use super::shim::{read_exit, read_pids};
use super::Cts;
use crate::error::DaemonError;
use crate::inventory::InventoryError;
use crate::lifecycle::registry;
use crate::lifecycle::{process_alive, wait_pid};

pub(super) enum Watched {
    /// A shim this daemon started.
    Child(tokio::process::Child),
    /// A shim inherited from an earlier daemon, or (shim gone) the init itself.
    Pid { pid: i32, is_shim: bool },
}

/// Whether the container's init (as the runtime recorded it, start time checked) still runs.
fn init_running(cts: &Cts, name: &str) -> Option<i32> {
    let info = cts.sys().info(name).ok()?;
    (info.status != "stopped").then_some(info.pid).flatten()
}

impl Cts {
    pub(super) fn spawn_watcher(
        self: &Arc<Self>,
        name: String,
        watched: Watched,
        done: tokio::sync::watch::Sender<bool>,
    ) {
        let cts = Arc::clone(self);
        tokio::spawn(async move {
            let mut watched = watched;
            let reason = loop {
                let is_shim = match watched {
                    Watched::Child(mut c) => {
                        let _ = c.wait().await;
                        true
                    }
                    Watched::Pid { pid, is_shim } => {
                        wait_pid(pid).await;
                        is_shim
                    }
                };
                let dir = cts.sys().dir(&name);
                if let Some(x) = read_exit(&dir) {
                    break (x.reason(), x.code, true);
                }
                if is_shim {
                    if let Some(pid) = init_running(&cts, &name) {
                        tracing::warn!(ct = %name, init_pid = pid, "the container's shim died; watching its init");
                        let _ = cts.inv().add_event(
                            &name,
                            "reconciled",
                            "the shim died while the container runs; the daemon watches its init",
                        );
                        watched = Watched::Pid {
                            pid,
                            is_shim: false,
                        };
                        continue;
                    }
                    break (
                        "the container's shim died without recording the init's exit".to_string(),
                        None,
                        false,
                    );
                }
                break (
                    "init exited; its status was lost with its shim".to_string(),
                    None,
                    false,
                );
            };
            let (mut reason, code, cleaned) = reason;
            if !cleaned {
                let sys = cts.sys();
                let n = name.clone();
                let _ = tokio::task::spawn_blocking(move || sys.cleanup(&n)).await;
            }
            let requested = cts
                .stop_requested
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&name);
            if requested {
                reason = format!("stopped on request ({reason})");
            }
            cts.record_stop(&name, &reason, code);
            let _ = done.send(true);
        });
    }

    fn record_stop(&self, name: &str, reason: &str, code: Option<i32>) {
        match self.inv().set_ct_stopped(name, reason, code) {
            Ok(()) | Err(InventoryError::NotFound(_)) => {}
            Err(e) => tracing::error!(ct = name, "cannot record the container's stop: {e}"),
        }
        registry::untrack(&self.running, name);
        tracing::info!(ct = name, "stopped: {reason}");
    }

    pub(super) async fn reconcile_all(self: &Arc<Self>) -> Result<(), DaemonError> {
        for mut rec in self.inv().list_cts()? {
            let name = rec.name.clone();
            let dir = self.sys().dir(&name);
            if !rec.state.is_active() {
                // A daemon killed between starting a shim and recording it: adopt the container.
                match read_pids(&dir) {
                    Some(p) if process_alive(p.shim_pid, p.shim_start) => {
                        self.inv().set_ct_running(&name, p)?;
                        self.inv().add_event(
                            &name,
                            "reconciled",
                            "adopted a container started just before the daemon died",
                        )?;
                        rec.state = VmState::Running;
                        rec.pids = Some(p);
                    }
                    _ => continue,
                }
            }
            let shim_alive = rec
                .pids
                .is_some_and(|p| process_alive(p.shim_pid, p.shim_start));
            let watched = if shim_alive {
                rec.pids.map(|p| Watched::Pid {
                    pid: p.shim_pid,
                    is_shim: true,
                })
            } else {
                init_running(self, &name).map(|pid| Watched::Pid {
                    pid,
                    is_shim: false,
                })
            };
            let Some(watched) = watched else {
                let (reason, code) = match read_exit(&dir) {
                    Some(x) => (
                        format!("{} (while the daemon was down)", x.reason()),
                        x.code,
                    ),
                    None => (
                        "the container's init vanished while the daemon was down (no exit status recorded)"
                            .to_string(),
                        None,
                    ),
                };
                let sys = self.sys();
                let n = name.clone();
                let _ = tokio::task::spawn_blocking(move || sys.cleanup(&n)).await;
                self.inv().set_ct_stopped(&name, &reason, code)?;
                tracing::info!(ct = %name, "reconciled: stopped: {reason}");
                continue;
            };
            let init_pid = match &watched {
                Watched::Pid {
                    pid,
                    is_shim: false,
                } => *pid,
                _ => rec.pids.map(|p| p.vmm_pid).unwrap_or(0),
            };
            let tx = registry::track(&self.running, &name, init_pid);
            self.spawn_watcher(name.clone(), watched, tx);
            // The freezer knows whether it is paused; the inventory may have missed a change.
            if let Ok(i) = self.sys().info(&name) {
                let live = if i.status == "paused" {
                    VmState::Paused
                } else {
                    VmState::Running
                };
                if live != rec.state {
                    self.inv().set_ct_state(&name, live)?;
                }
            }
            let how = if shim_alive {
                ""
            } else {
                " (its shim is gone)"
            };
            self.inv().add_event(
                &name,
                "reconciled",
                &format!("init pid {init_pid} still running{how}"),
            )?;
            tracing::info!(ct = %name, init_pid, "reconciled: still running{how}");
        }
        Ok(())
    }
}
