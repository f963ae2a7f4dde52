//! `DELETE /v1/vms/{name}[?force=true]`.

use std::sync::Arc;

use super::{remove_dir_if_exists, Daemon};
use crate::error::DaemonError;

impl Daemon {
    /// Deletes a VM; a running one only with `force` (it is killed first).
    pub async fn delete(self: &Arc<Self>, name: &str, force: bool) -> Result<(), DaemonError> {
        let g = self.op_lock(name).await;
        let rec = self.inv.get_vm(name)?;
        if let Some(h) = self.handle(name) {
            if !force {
                return Err(DaemonError::Conflict(format!(
                    "VM {name:?} is {}: stop it first, or delete it with --force (?force=true)",
                    rec.state
                )));
            }
            self.kill_and_wait(name, &h).await?;
        }
        self.release(name);
        // Directory first, row second: a crash in between leaves a row whose directory `start`
        // recreates, never a directory nobody owns.
        crate::jail::remove_root(&self.vm_dir(name))
            .map_err(|e| DaemonError::Conflict(format!("cannot delete VM {name:?}: {e}")))?;
        remove_dir_if_exists(&self.vm_dir(name))?;
        self.inv.delete_vm(name)?;
        drop(g);
        self.forget_lock(name);
        tracing::info!(vm = name, "deleted");
        Ok(())
    }
}
