//! `POST /v1/vms/{name}/restore`: start a stopped VM from one of its snapshots. A warm VMM of the
//! VM's shape takes it when the pool has one (`warm_pool`); otherwise the daemon leaves a marker
//! naming the snapshot in the VM's directory; the shim consumes it and runs the VMM with
//! `--restore DIR` instead of `--config`, so only the next start restores.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use corefour_api::VmInfo;
use serde::Deserialize;

use super::{active_conflict, Daemon};
use crate::error::DaemonError;

/// The marker file in the VM's directory: one line, the snapshot directory.
const RESTORE_MARKER: &str = "restore-from";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// Absolute path of a snapshot directory written by `corefour vm snapshot`.
    pub path: PathBuf,
}

/// Makes the VM's next start restore `snap` (an absolute snapshot directory).
pub(super) fn write_restore_marker(vm_dir: &Path, snap: &Path) -> Result<(), DaemonError> {
    let marker = vm_dir.join(RESTORE_MARKER);
    std::fs::write(&marker, snap.display().to_string())
        .map_err(|e| DaemonError::io(format!("cannot write {}", marker.display()), e))
}

/// Called by the shim: the snapshot to restore, if the daemon asked for one; the marker is
/// removed so a later start boots normally.
pub fn take_restore_marker(vm_dir: &Path) -> Option<PathBuf> {
    let p = vm_dir.join(RESTORE_MARKER);
    let text = std::fs::read_to_string(&p).ok()?;
    let _ = std::fs::remove_file(&p);
    let dir = text.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

impl Daemon {
    pub async fn restore(
        self: &Arc<Self>,
        name: &str,
        req: RestoreRequest,
    ) -> Result<VmInfo, DaemonError> {
        if !req.path.is_absolute() {
            return Err(DaemonError::BadRequest(format!(
                "snapshot path {} must be absolute (the daemon resolves no relative paths)",
                req.path.display()
            )));
        }
        if self.cfg.jail {
            return Err(DaemonError::Conflict(
                "restore is not supported for jailed VMMs yet: run the daemon without --jail"
                    .into(),
            ));
        }
        let snap = std::fs::canonicalize(&req.path)
            .ok()
            .filter(|p| p.is_dir())
            .ok_or_else(|| {
                DaemonError::BadRequest(format!(
                    "snapshot {} is not a directory: give one written by `corefour vm snapshot`",
                    req.path.display()
                ))
            })?;
        if let Some(info) = self.restore_warm(name, &snap).await? {
            return Ok(info);
        }
        let marker = self.vm_dir(name).join(RESTORE_MARKER);
        {
            let _g = self.op_lock(name).await;
            let rec = self.inv.get_vm(name)?;
            if rec.state.is_active() || self.is_active(name) {
                return Err(active_conflict(name, rec.state, "restore"));
            }
            std::fs::create_dir_all(self.vm_dir(name)).map_err(|e| {
                DaemonError::io(format!("cannot create {}", self.vm_dir(name).display()), e)
            })?;
            // Frozen disks (a same-instant disk snapshot): fresh overlays on them.
            let snap = self.fresh_restore_point(name, &snap)?;
            std::fs::write(&marker, snap.display().to_string())
                .map_err(|e| DaemonError::io(format!("cannot write {}", marker.display()), e))?;
        }
        let r = self.start(name).await;
        // A start that failed before the shim consumed the marker must not restore later.
        let _ = std::fs::remove_file(&marker);
        r
    }
}
