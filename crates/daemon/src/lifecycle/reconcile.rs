//! On daemon start: make the inventory match the processes that really run.
//!
//! A VM recorded as running is still running when its shim is alive (same pid *and* start time, so
//! a recycled pid is not mistaken for it); the daemon then watches the shim through a pidfd and
//! asks the VMM whether it is paused. Otherwise the VMM ended while no daemon was watching: the exit
//! the shim recorded becomes the stop reason.

use std::sync::Arc;

use corefour_api::VmState;
use hyper::Method;

use super::watch::Watched;
use super::{proc, registry, Daemon};
use crate::error::DaemonError;
use crate::shim;

impl Daemon {
    pub(super) async fn reconcile_all(self: &Arc<Self>) -> Result<(), DaemonError> {
        for mut rec in self.inv.list_vms()? {
            let name = rec.name.clone();
            if !rec.state.is_active() {
                // A daemon killed between spawning a VMM and recording it leaves a live shim and
                // a row that says otherwise: adopt the VM.
                match shim::read_pids(&self.vm_dir(&name)) {
                    Some(p) if proc::process_alive(p.shim_pid, p.shim_start) => {
                        self.inv.set_running(&name, p)?;
                        self.inv.add_event(
                            &name,
                            "reconciled",
                            "adopted a VMM started just before the daemon died",
                        )?;
                        rec.state = VmState::Running;
                        rec.pids = Some(p);
                    }
                    _ => continue,
                }
            }
            let shim_alive = rec
                .pids
                .is_some_and(|p| proc::process_alive(p.shim_pid, p.shim_start));
            let vmm_alive = rec.pids.is_some_and(|p| {
                proc::start_time(p.vmm_pid).is_some() && !shim_alive && vmm_is_ours(p.vmm_pid)
            });
            let Some(pids) = rec.pids.filter(|_| shim_alive || vmm_alive) else {
                let dir = self.vm_dir(&name);
                let (reason, code) = match shim::read_exit(&dir) {
                    Some(x) => (
                        format!("{} (while the daemon was down)", x.reason()),
                        x.code,
                    ),
                    None => (
                        "the VMM vanished while the daemon was down (no exit status recorded)"
                            .to_string(),
                        None,
                    ),
                };
                self.release(&name);
                self.inv.set_stopped(&name, &reason, code)?;
                tracing::info!(vm = %name, "reconciled: stopped: {reason}");
                continue;
            };
            let tx = registry::track(&self.running, &name, pids.vmm_pid);
            let watched = if shim_alive {
                Watched::Pid {
                    pid: pids.shim_pid,
                    is_shim: true,
                }
            } else {
                Watched::Pid {
                    pid: pids.vmm_pid,
                    is_shim: false,
                }
            };
            self.spawn_watcher(name.clone(), watched, tx);
            // The VMM knows whether it is paused; the inventory may have missed a transition.
            let sock = self.api_sock(&name);
            let live = match crate::client::call(&sock, Method::GET, "/vm", None).await {
                Ok((s, body)) if s.is_success() => {
                    serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| {
                            v.get("state")
                                .and_then(|s| s.as_str())
                                .and_then(VmState::parse)
                        })
                }
                _ => None,
            };
            if let Some(live) = live {
                if live != rec.state && live.is_active() {
                    self.inv.set_state(&name, live, "reconciled")?;
                }
            }
            self.inv.add_event(
                &name,
                "reconciled",
                &format!("VMM pid {} still running", pids.vmm_pid),
            )?;
            tracing::info!(vm = %name, vmm_pid = pids.vmm_pid, "reconciled: still running");
        }
        Ok(())
    }
}

/// Whether the process is a `corefour vmm` (the shim is gone, so the start time cannot vouch for it).
fn vmm_is_ours(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|&b| b == 0).nth(1).is_some_and(|arg| arg == b"vmm"))
        .unwrap_or(false)
}
