//! Same-instant disk snapshots (libvirt's external snapshots): while a snapshot holds the VM
//! paused with its devices parked, every writable disk moves onto a new qcow2 overlay and the
//! file it was in freezes.
//!
//! For each writable disk, with F the file it lives in now:
//! - `OVERLAY_DIR/disk<i>-<ms>.qcow2`, backing F: the running VM writes here from now on
//!   (its virtio-blk backend is switched through `blk_dirty::swap_backend`);
//! - `SNAPSHOT/disk<i>.qcow2`, backing F: the snapshot's own layer, which its recorded config
//!   names, so `corefour vmm --restore SNAPSHOT` sees the disk as it was and writes only there;
//! - `SNAPSHOT/disks.json`: F per disk, so a restorer can start each time from a fresh overlay
//!   on the frozen file instead (the daemon's `vm restore` does).
//!
//! Nothing writes F afterwards. On any failure every switched disk goes back to its file (the
//! devices are still parked, nothing was written since) and the new files are removed.

use std::path::{Path, PathBuf};

use corefour_devices::virtio::blk_dirty::{self, Swapped, TrackedDisk};
use corefour_disk::qcow2::{CreateOptions, Qcow2};
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// The manifest a snapshot with frozen disks carries.
pub const MANIFEST: &str = "disks.json";

/// One disk of a same-instant snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenDisk {
    /// Its index in the VM config's `disks`.
    pub index: usize,
    /// The file the disk was in at the snapshot instant; nothing writes it any more.
    pub frozen: PathBuf,
    /// The overlay the running VM continues on.
    pub running: PathBuf,
    /// The snapshot's own layer on `frozen` (what its config names).
    pub layer: PathBuf,
}

/// A qcow2 overlay at `path` reading through to `base`.
fn overlay(base: &Path, path: &Path) -> Result<(), String> {
    let format = corefour_disk::open(base, corefour_disk::Open::default())
        .map_err(|e| format!("cannot open {}: {e}", base.display()))?
        .format();
    let opts = CreateOptions {
        backing_file: Some(base.display().to_string()),
        backing_format: Some(format),
        ..CreateOptions::default()
    };
    Qcow2::create(path, None, &opts)
        .map(|_| ())
        .map_err(|e| format!("cannot create the overlay {}: {e}", path.display()))
}

struct Done {
    disk: std::sync::Arc<TrackedDisk>,
    swapped: Swapped,
    files: [PathBuf; 2],
}

/// Freezes every writable disk of `config` at this instant (see the module comment); the VM
/// must be paused with its devices parked, and `snapshot` already written. `overlay_dir` takes
/// the running overlays.
pub fn freeze(
    snapshot: &Path,
    overlay_dir: &Path,
    config: &VmConfig,
) -> Result<Vec<FrozenDisk>, String> {
    std::fs::create_dir_all(overlay_dir)
        .map_err(|e| format!("cannot create {}: {e}", overlay_dir.display()))?;
    let stamp = crate::snapshot::now_ms();
    let mut done: Vec<Done> = Vec::new();
    let mut out = Vec::new();
    let undo = |done: Vec<Done>| {
        for d in done.into_iter().rev() {
            d.disk.swap_back(d.swapped);
            for f in &d.files {
                let _ = std::fs::remove_file(f);
            }
        }
    };
    for (i, d) in config.disks.iter().enumerate() {
        if d.read_only {
            continue;
        }
        let step = || -> Result<(Done, FrozenDisk), String> {
            let disk = blk_dirty::find(&d.path)
                .ok_or_else(|| format!("disk {} is not attached here", d.path.display()))?;
            let frozen = disk.current_path();
            // What the device wrote so far must be in F before anything reads F through an
            // overlay.
            disk.flush().map_err(|e| e.to_string())?;
            let running = overlay_dir.join(format!("disk{i}-{stamp}.qcow2"));
            let layer = snapshot.join(format!("disk{i}.qcow2"));
            overlay(&frozen, &running)?;
            let made = |e: String| {
                let _ = std::fs::remove_file(&running);
                e
            };
            overlay(&frozen, &layer).map_err(made)?;
            let made = |e: String| {
                let _ = std::fs::remove_file(&running);
                let _ = std::fs::remove_file(&layer);
                e
            };
            let img = corefour_disk::open(
                &running,
                corefour_disk::Open {
                    format: Some(corefour_disk::Format::Qcow2),
                    write: true,
                },
            )
            .map_err(|e| made(format!("cannot open {}: {e}", running.display())))?;
            let swapped = disk
                .swap_backend(img, &running)
                .map_err(|e| made(e.to_string()))?;
            Ok((
                Done {
                    disk,
                    swapped,
                    files: [running.clone(), layer.clone()],
                },
                FrozenDisk {
                    index: i,
                    frozen,
                    running,
                    layer,
                },
            ))
        };
        match step() {
            Ok((d, f)) => {
                done.push(d);
                out.push(f);
            }
            Err(e) => {
                undo(done);
                return Err(e);
            }
        }
    }
    if let Err(e) = record(snapshot, &out) {
        undo(done);
        return Err(e);
    }
    Ok(out)
}

/// Points the snapshot's config at its layers and writes the manifest.
fn record(snapshot: &Path, frozen: &[FrozenDisk]) -> Result<(), String> {
    let mut s = crate::snapshot::VmSnapshot::read(snapshot).map_err(|e| e.to_string())?;
    let mut config: VmConfig = serde_json::from_value(s.machine.config.clone())
        .map_err(|e| format!("the snapshot's VM config: {e}"))?;
    for f in frozen {
        let d = config
            .disks
            .get_mut(f.index)
            .ok_or_else(|| format!("the snapshot's config has no disk {}", f.index))?;
        d.path = f.layer.clone();
        // The layer is qcow2 whatever the frozen file is.
        d.format = None;
        d.direct = false;
    }
    s.machine.config = serde_json::to_value(&config).map_err(|e| e.to_string())?;
    s.write(snapshot).map_err(|e| e.to_string())?;
    let m = snapshot.join(MANIFEST);
    let text = serde_json::to_vec_pretty(frozen).map_err(|e| e.to_string())?;
    std::fs::write(&m, text).map_err(|e| format!("cannot write {}: {e}", m.display()))
}

/// The frozen disks a snapshot recorded, if it took any (`None` for a snapshot without).
pub fn manifest(snapshot: &Path) -> Result<Option<Vec<FrozenDisk>>, String> {
    let m = snapshot.join(MANIFEST);
    match std::fs::read(&m) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| format!("{}: {e}", m.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", m.display())),
    }
}

/// Makes a qcow2 overlay at `path` on a frozen file (a fresh start for a restore).
pub fn fresh_overlay(frozen: &Path, path: &Path) -> Result<(), String> {
    overlay(frozen, path)
}
