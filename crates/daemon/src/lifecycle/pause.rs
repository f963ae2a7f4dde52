//! `POST /v1/vms/{name}/pause` and `.../resume`, through the VMM's API socket.

use std::sync::Arc;

use corefour_api::{VmInfo, VmState};

use super::{active_conflict, Daemon};
use crate::error::DaemonError;

impl Daemon {
    pub async fn pause(self: &Arc<Self>, name: &str) -> Result<VmInfo, DaemonError> {
        self.pause_resume(name, true).await
    }

    pub async fn resume(self: &Arc<Self>, name: &str) -> Result<VmInfo, DaemonError> {
        self.pause_resume(name, false).await
    }

    async fn pause_resume(
        self: &Arc<Self>,
        name: &str,
        pause: bool,
    ) -> Result<VmInfo, DaemonError> {
        let _g = self.op_lock(name).await;
        self.running_handle(name)?;
        let rec = self.inv.get_vm(name)?;
        let (from, to, path, verb) = if pause {
            (VmState::Running, VmState::Paused, "/vm/pause", "pause")
        } else {
            (VmState::Paused, VmState::Running, "/vm/resume", "resume")
        };
        if rec.state != from {
            return Err(active_conflict(name, rec.state, verb));
        }
        self.vmm_put(name, path).await?;
        self.inv
            .set_state(name, to, if pause { "paused" } else { "resumed" })?;
        self.info(name)
    }
}
