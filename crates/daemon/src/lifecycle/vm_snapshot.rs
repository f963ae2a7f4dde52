//! `POST /v1/vms/{name}/snapshot`: a snapshot of a running VM through its VMM's API socket
//! (`PUT /vm/snapshot`), into the VM's state directory unless a path is given.
//!
//! The writable disks are snapshotted at the same instant as memory, as libvirt's external
//! snapshots do: while the guest is paused its disks move onto new qcow2 overlays in the VM's
//! `disks/` directory and the files they were in freeze (`corefour_vmm::disk_overlay`); the
//! record then names the overlays, so the VM's next boot continues on them. `vm restore` of such
//! a snapshot starts each time from fresh overlays on the frozen files
//! (`Daemon::fresh_restore_point`), so the guest sees exactly the disk it had at the snapshot.
//! Every snapshot adds one overlay to each disk's chain.

use std::path::{Path, PathBuf};

use corefour_vmm::disk_overlay::{self, FrozenDisk};
use std::sync::Arc;

use hyper::Method;
use serde::Deserialize;

use super::Daemon;
use crate::error::DaemonError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Where to write it (a new or empty directory); default `VMDIR/snapshots/<unix ms>`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Only the pages written since this VMM's previous snapshot.
    #[serde(default)]
    pub diff: bool,
    /// Leave the disks out: the snapshot records memory and devices only, and a restore uses
    /// the disks as they are then.
    #[serde(default)]
    pub memory_only: bool,
}

impl Daemon {
    pub async fn snapshot(
        self: &Arc<Self>,
        name: &str,
        req: SnapshotRequest,
    ) -> Result<serde_json::Value, DaemonError> {
        let _g = self.op_lock(name).await;
        self.running_handle(name)?;
        let rec = self.inv.get_vm(name)?;
        let freeze = !req.memory_only && rec.spec.disks.iter().any(|d| !d.read_only);
        let path = match req.path {
            Some(p) if p.is_absolute() => p,
            Some(p) => {
                return Err(DaemonError::BadRequest(format!(
                    "snapshot path {} must be absolute (the daemon resolves no relative paths)",
                    p.display()
                )))
            }
            None => {
                let ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0);
                self.vm_dir(name).join("snapshots").join(ms.to_string())
            }
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| DaemonError::io(format!("cannot create {}", parent.display()), e))?;
        }
        let mut body = serde_json::json!({"path": path, "diff": req.diff});
        if freeze {
            body["disk_overlays"] = self.vm_dir(name).join("disks").display().to_string().into();
        }
        let body = body.to_string();
        let (status, resp) = crate::client::call(
            &self.api_sock(name),
            Method::PUT,
            "/vm/snapshot",
            Some(body.into_bytes()),
        )
        .await
        .map_err(|source| DaemonError::VmmUnreachable {
            name: name.to_string(),
            source,
        })?;
        if !status.is_success() {
            return Err(DaemonError::Vmm {
                name: name.to_string(),
                message: crate::client::fault_text(&resp),
            });
        }
        let report: serde_json::Value =
            serde_json::from_slice(&resp).map_err(|e| DaemonError::Vmm {
                name: name.to_string(),
                message: format!("malformed snapshot report: {e}"),
            })?;
        if freeze {
            // The VM runs on the overlays now: its record (and so its next boot) follows.
            let frozen: Vec<FrozenDisk> =
                serde_json::from_value(report["disks"].clone()).map_err(|e| DaemonError::Vmm {
                    name: name.to_string(),
                    message: format!("malformed disk list in the snapshot report: {e}"),
                })?;
            let mut paths: Vec<String> = rec.spec.disks.iter().map(|d| d.path.clone()).collect();
            for f in &frozen {
                if let Some(p) = paths.get_mut(f.index) {
                    *p = f.running.display().to_string();
                }
            }
            self.inv.set_disk_paths(name, &paths)?;
            let _ = self.inv.add_event(
                name,
                "snapshot",
                &format!("{} with {} frozen disk(s)", path.display(), frozen.len()),
            );
        }
        Ok(report)
    }

    /// The snapshot `vm restore` should start: for a snapshot with frozen disks, a copy of it
    /// (memory hard-linked) whose disks are fresh overlays on the frozen files, in the VM's
    /// directory, with the record pointing at them; any other snapshot as it is.
    pub(super) fn fresh_restore_point(
        &self,
        name: &str,
        snap: &Path,
    ) -> Result<PathBuf, DaemonError> {
        let bad =
            |why: String| DaemonError::BadRequest(format!("snapshot {}: {why}", snap.display()));
        let Some(frozen) = disk_overlay::manifest(snap).map_err(bad)? else {
            return Ok(snap.to_path_buf());
        };
        let rec = self.inv.get_vm(name)?;
        let mut paths: Vec<String> = rec.spec.disks.iter().map(|d| d.path.clone()).collect();
        let diff = corefour_vmm::snapshot::VmSnapshot::read(snap)
            .map_err(|e| bad(e.to_string()))?
            .memory
            .diff
            .is_some();
        if diff {
            // A diff snapshot cannot be copied with new disks: it restores on its own layers
            // (a second restore of it sees what the first one wrote).
            for f in &frozen {
                if let Some(p) = paths.get_mut(f.index) {
                    *p = f.layer.display().to_string();
                }
            }
            self.inv.set_disk_paths(name, &paths)?;
            return Ok(snap.to_path_buf());
        }
        let stamp = crate::inventory::now_ms();
        let dir = self.vm_dir(name);
        let disks_dir = dir.join("disks");
        std::fs::create_dir_all(&disks_dir)
            .map_err(|e| DaemonError::io(format!("cannot create {}", disks_dir.display()), e))?;
        let mut made = Vec::new();
        let undo = |made: &[PathBuf], e: DaemonError| {
            made.iter().for_each(|p| {
                let _ = std::fs::remove_file(p);
            });
            e
        };
        for f in &frozen {
            let p = disks_dir.join(format!("disk{}-restored-{stamp}.qcow2", f.index));
            disk_overlay::fresh_overlay(&f.frozen, &p).map_err(|e| undo(&made, bad(e)))?;
            made.push(p.clone());
            match paths.get_mut(f.index) {
                Some(slot) => *slot = p.display().to_string(),
                None => {
                    return Err(undo(
                        &made,
                        bad(format!("it has disk {} but the VM has not", f.index)),
                    ))
                }
            }
        }
        let restores = dir.join("restores");
        std::fs::create_dir_all(&restores)
            .map_err(|e| DaemonError::io(format!("cannot create {}", restores.display()), e))?;
        let point = restores.join(stamp.to_string());
        let fresh: Vec<(usize, PathBuf)> = frozen
            .iter()
            .zip(&made)
            .map(|(f, p)| (f.index, p.clone()))
            .collect();
        corefour_vmm::snapshot::derive(snap, &point, |c| {
            for (i, p) in &fresh {
                if let Some(d) = c.disks.get_mut(*i) {
                    d.path = p.clone();
                }
            }
        })
        .map_err(|e| undo(&made, bad(e.to_string())))?;
        self.inv.set_disk_paths(name, &paths)?;
        Ok(point)
    }
}
