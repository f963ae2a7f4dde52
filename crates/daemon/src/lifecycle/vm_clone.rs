//! `POST /v1/vms/{name}/clone`: a new VM from a stopped one. The clone gets its own name and
//! freshly generated MACs (and tap names); each writable disk becomes a qcow2 overlay whose
//! backing file is the source's disk, so cloning copies no data and the clone's writes stay in
//! its overlay. Read-only disks are shared as they are.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use corefour_api::VmInfo;
use corefour_disk::qcow2::{CreateOptions, Qcow2};
use serde::Deserialize;

use super::{active_conflict, remove_dir_if_exists, to_info, Daemon};
use crate::error::DaemonError;
use crate::names::validate_name;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// The clone's name.
    pub name: String,
    /// Start the clone once it is registered.
    #[serde(default)]
    pub start: bool,
}

impl Daemon {
    pub async fn clone_vm(
        self: &Arc<Self>,
        src: &str,
        req: CloneRequest,
    ) -> Result<VmInfo, DaemonError> {
        validate_name(&req.name)?;
        if req.name == src {
            return Err(DaemonError::BadRequest(format!(
                "the clone needs a name other than its source's ({src:?})"
            )));
        }
        let dst = req.name.clone();
        {
            // Both locks, in name order, so two clones in opposite directions cannot deadlock.
            // The source's lock is held until its disks are overlaid: it must not start meanwhile.
            let (first, second) = if src < dst.as_str() {
                (src, dst.as_str())
            } else {
                (dst.as_str(), src)
            };
            let _g1 = self.op_lock(first).await;
            let _g2 = self.op_lock(second).await;
            let rec = self.inv.get_vm(src)?;
            if rec.state.is_active() || self.is_active(src) {
                return Err(DaemonError::Conflict(format!(
                    "{}: stop it first (its disks must not change under the clone's overlays)",
                    active_conflict(src, rec.state, "clone")
                )));
            }
            let dir = self.vm_dir(&dst);
            let mut spec = rec.spec.clone();
            spec.name = dst.clone();
            spec.start = false;
            let mut overlays = Vec::new();
            for (i, d) in spec.disks.iter_mut().enumerate() {
                if d.read_only {
                    continue;
                }
                let overlay = dir.join(format!("disk{i}.qcow2"));
                overlays.push((PathBuf::from(&d.path), overlay.clone()));
                d.path = overlay.display().to_string();
            }
            for n in &mut spec.nets {
                // The inventory generates a unique MAC (and tap) for each NIC without one.
                n.mac = None;
            }
            let created = self.inv.insert_vm(&spec)?;
            let undo = |e: DaemonError| {
                let _ = remove_dir_if_exists(&dir);
                let _ = self.inv.delete_vm(&dst);
                e
            };
            // A directory left by a delete that crashed half way belongs to nobody now.
            remove_dir_if_exists(&dir).map_err(undo)?;
            std::fs::create_dir_all(&dir).map_err(|e| {
                undo(DaemonError::io(
                    format!("cannot create {}", dir.display()),
                    e,
                ))
            })?;
            for (base, overlay) in &overlays {
                make_overlay(base, overlay).map_err(undo)?;
            }
            let _ = self.inv.add_event(&dst, "cloned", &format!("from {src}"));
            tracing::info!(vm = dst, from = src, disks = overlays.len(), "cloned");
            if !req.start {
                return Ok(to_info(self.inv.get_vm(&dst).unwrap_or(created)));
            }
        }
        self.start(&dst).await
    }
}

/// A qcow2 image at `overlay` as large as `base`, reading through to it.
fn make_overlay(base: &Path, overlay: &Path) -> Result<(), DaemonError> {
    let fail = |e: corefour_disk::DiskError| {
        DaemonError::BadRequest(format!(
            "cannot make a qcow2 overlay of {} at {}: {e}",
            base.display(),
            overlay.display()
        ))
    };
    let format = corefour_disk::open(
        base,
        corefour_disk::Open {
            format: None,
            write: false,
        },
    )
    .map_err(fail)?
    .format();
    let opts = CreateOptions {
        backing_file: Some(base.display().to_string()),
        backing_format: Some(format),
        ..CreateOptions::default()
    };
    Qcow2::create(overlay, None, &opts).map_err(fail)?;
    Ok(())
}
