//! `POST /v1/vms/{name}/clone`: a new VM from another. The clone gets its own name and freshly
//! generated MACs (and tap names); each writable disk becomes a qcow2 overlay whose backing file
//! is the source's disk, so cloning copies no data and the clone's writes stay in its overlay.
//! Read-only disks are shared as they are.
//!
//! A running source is snapshotted (memory and device state, a brief pause) and the clone starts
//! from that snapshot. When it has writable disks, their contents must freeze at the snapshot
//! instant for both: the source stays paused after the snapshot, its VMM is replaced by one
//! restored from the same snapshot onto its own new overlay, and both overlays back onto the
//! now unchanging disk. The guest in the source continues exactly where it was (a new VMM
//! process, the same console log).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use corefour_api::VmInfo;
use corefour_disk::qcow2::{CreateOptions, Qcow2};
use serde::Deserialize;

use corefour_vmm::snapshot::derive;
use hyper::Method;

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
            if self.is_active(src) && rec.state == corefour_api::VmState::Running {
                drop((_g1, _g2));
                return self.clone_running(src, req).await;
            }
            if rec.state.is_active() || self.is_active(src) {
                return Err(DaemonError::Conflict(format!(
                    "{}: resume it or stop it first",
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

impl Daemon {
    /// The clone of a running VM (see the module comment).
    async fn clone_running(
        self: &Arc<Self>,
        src: &str,
        req: CloneRequest,
    ) -> Result<VmInfo, DaemonError> {
        let dst = req.name.clone();
        let (first, second) = if src < dst.as_str() {
            (src, dst.as_str())
        } else {
            (dst.as_str(), src)
        };
        let g1 = self.op_lock(first).await;
        let g2 = self.op_lock(second).await;
        let h = self.running_handle(src)?;
        let rec = self.inv.get_vm(src)?;
        if self.cfg.jail {
            return Err(DaemonError::Conflict(
                "cloning a running VM is not supported for jailed VMMs yet (restore is not): \
                 run the daemon without --jail, or stop the VM first"
                    .into(),
            ));
        }
        let stamp = crate::inventory::now_ms();
        let dir = self.vm_dir(&dst);
        let src_dir = self.vm_dir(src);
        let writable: Vec<usize> = (0..rec.spec.disks.len())
            .filter(|&i| !rec.spec.disks[i].read_only)
            .collect();
        let mut spec = rec.spec.clone();
        spec.name = dst.clone();
        spec.start = false;
        for &i in &writable {
            spec.disks[i].path = dir.join(format!("disk{i}.qcow2")).display().to_string();
        }
        for n in &mut spec.nets {
            n.mac = None;
        }
        let created = self.inv.insert_vm(&spec)?;
        let undo = |e: DaemonError| {
            let _ = remove_dir_if_exists(&dir);
            let _ = self.inv.delete_vm(&dst);
            e
        };
        remove_dir_if_exists(&dir).map_err(undo)?;
        std::fs::create_dir_all(&dir).map_err(|e| {
            undo(DaemonError::io(
                format!("cannot create {}", dir.display()),
                e,
            ))
        })?;
        let vmm = |path: &'static str, body: Option<serde_json::Value>| {
            let sock = self.api_sock(src);
            async move {
                let (status, resp) = crate::client::call(
                    &sock,
                    Method::PUT,
                    path,
                    body.map(|b| b.to_string().into_bytes()),
                )
                .await
                .map_err(|source| DaemonError::VmmUnreachable {
                    name: src.to_string(),
                    source,
                })?;
                if !status.is_success() {
                    return Err(DaemonError::Vmm {
                        name: src.to_string(),
                        message: crate::client::fault_text(&resp),
                    });
                }
                Ok(())
            }
        };
        // With writable disks the source stays paused from the snapshot on: its disks must not
        // change any more.
        let freeze = !writable.is_empty();
        if freeze {
            vmm("/vm/pause", None).await.map_err(undo)?;
        }
        let snap = dir.join(format!("snapshot-{stamp}"));
        if let Err(e) = vmm("/vm/snapshot", Some(serde_json::json!({ "path": snap }))).await {
            if freeze {
                let _ = vmm("/vm/resume", None).await;
            }
            return Err(undo(e));
        }
        let mut src_snap = None;
        let mut src_overlays = Vec::new();
        if freeze {
            // From here the paused source's VMM goes; a failure leaves the source stopped with
            // a snapshot that restores it (named in the error).
            self.kill_and_wait(src, &h).await.map_err(undo)?;
            let mut paths: Vec<String> = rec.spec.disks.iter().map(|d| d.path.clone()).collect();
            for &i in &writable {
                let base = PathBuf::from(&rec.spec.disks[i].path);
                let mine = src_dir.join(format!("disk{i}-{stamp}.qcow2"));
                make_overlay(&base, &mine).map_err(undo)?;
                make_overlay(&base, Path::new(&spec.disks[i].path)).map_err(undo)?;
                paths[i] = mine.display().to_string();
                src_overlays.push(mine);
            }
            let s = src_dir.join("snapshots").join(format!("clone-{stamp}"));
            let _ = std::fs::create_dir_all(src_dir.join("snapshots"));
            derive(&snap, &s, |c| {
                for (d, p) in c.disks.iter_mut().zip(&paths) {
                    d.path = PathBuf::from(p);
                }
            })
            .map_err(|e| undo(snap_err(e)))?;
            self.inv
                .set_disk_paths(src, &paths)
                .map_err(|e| undo(e.into()))?;
            super::vm_restore::write_restore_marker(&src_dir, &s)?;
            src_snap = Some(s);
        }
        // The clone's own copy of the snapshot: its disks and identity.
        let clone_rec = self.inv.get_vm(&dst).unwrap_or(created);
        let clone_snap = dir.join("snapshot");
        let nets = clone_rec.nics.clone();
        derive(&snap, &clone_snap, |c| {
            for (d, s) in c.disks.iter_mut().zip(&spec.disks) {
                d.path = PathBuf::from(&s.path);
            }
            for (n, nic) in c.nets.iter_mut().zip(&nets) {
                n.tap = nic.tap.clone();
                n.mac = Some(nic.mac.clone());
            }
        })
        .map_err(|e| undo(snap_err(e)))?;
        let _ = std::fs::remove_dir_all(&snap);
        super::vm_restore::write_restore_marker(&dir, &clone_snap).map_err(undo)?;
        let _ = self
            .inv
            .add_event(&dst, "cloned", &format!("from running {src}"));
        tracing::info!(
            vm = dst,
            from = src,
            frozen_disks = writable.len(),
            "cloned a running VM"
        );
        drop((g1, g2));
        if let Some(s) = src_snap {
            // The source continues from the same instant, on its own overlays.
            self.start(src).await.map_err(|e| {
                DaemonError::Conflict(format!(
                    "the clone {dst:?} is registered, but the source {src:?} did not come back \
                     ({e}); restore it with `corefour vm restore {src} --from {}`",
                    s.display()
                ))
            })?;
        }
        if req.start {
            self.start(&dst).await
        } else {
            Ok(to_info(self.inv.get_vm(&dst)?))
        }
    }
}

fn snap_err(e: corefour_vmm::snapshot::SnapshotError) -> DaemonError {
    DaemonError::Conflict(format!("cannot make the clone's snapshot: {e}"))
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
