//! `--copy-storage`: the VM's writable disks are mirrored live to the target.
//!
//! The VMMs move the bytes (`corefour_vmm::migration::disks`: a first pass while the guest runs,
//! dirty chunks re-sent with each memory round, the last ones in the stop phase). The daemons
//! only agree on the copies: the source announces each writable disk's index, format and
//! virtual size in PREPARE; the target creates an empty copy of each (raw: a sparse file;
//! qcow2: an empty image) inside the VM's directory, so a failed migration or a later delete
//! removes it with the rest, and points the incoming VMM's config at it. Read-only disks stay
//! on shared storage (same path on the target).

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use corefour_api::{DiskSpec, VmCreate};
use serde::{Deserialize, Serialize};

/// File name endings the VMM opens as formatted images (as virtio-blk decides; anything else
/// is raw).
const IMAGE_SUFFIXES: &[&str] = &["qcow2", "qcow", "vmdk", "vdi", "vhd", "vpc", "vhdx"];

/// One disk the source mirrors, as PREPARE announces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MirrorDisk {
    pub index: usize,
    /// "raw" or "qcow2".
    pub format: String,
    /// Guest-visible bytes.
    pub size: u64,
}

/// What `--copy-storage` moved, in the migration report (from the source VMM's figures).
#[derive(Debug, Default, Clone, Serialize)]
pub struct StorageReport {
    pub disks: usize,
    /// The disks' virtual sizes.
    pub bytes: u64,
    /// Bytes sent in all rounds (holes and zero blocks skipped in the first pass).
    pub bytes_sent: u64,
    /// The first pass, while the guest ran.
    pub first_pass_ms: f64,
    /// Dirty 64 KiB chunks sent again, per round; the last entry went during the downtime.
    pub chunks_per_round: Vec<u64>,
    /// How long the guest was paused (the migration's downtime, disks included).
    pub guest_paused_ms: f64,
}

impl StorageReport {
    /// Reads the `disks` and `downtime_ms` parts of the source VMM's migration report.
    pub(super) fn from_vmm(v: &serde_json::Value) -> StorageReport {
        let d = &v["disks"];
        StorageReport {
            disks: d["disks"].as_u64().unwrap_or(0) as usize,
            bytes: d["bytes"].as_u64().unwrap_or(0),
            bytes_sent: d["bytes_sent"].as_u64().unwrap_or(0),
            first_pass_ms: d["first_pass_ms"].as_f64().unwrap_or(0.0),
            chunks_per_round: d["chunks_per_round"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
                .unwrap_or_default(),
            guest_paused_ms: v["downtime_ms"].as_f64().unwrap_or(0.0),
        }
    }
}

/// The disks `--copy-storage` copies: every writable one, with its index in the spec.
pub(super) fn writable(spec: &VmCreate) -> impl Iterator<Item = (usize, &DiskSpec)> {
    spec.disks.iter().enumerate().filter(|(_, d)| !d.read_only)
}

/// Where the target keeps its copy of disk `index` (inside the VM's directory). The name keeps
/// the source's, extension included: the VMM picks the format by it.
pub(super) fn local_copy(vm_dir: &Path, index: usize, src: &str) -> PathBuf {
    let base = Path::new(src)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("disk");
    vm_dir.join("disks").join(format!("{index}-{base}"))
}

fn image_by_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_SUFFIXES.iter().any(|s| e.eq_ignore_ascii_case(s)))
}

/// Describes every writable disk for the target, refusing before anything moves a disk the
/// mirror cannot carry: unreadable, or in a format corefour cannot write.
pub(super) fn describe(spec: &VmCreate) -> Result<Vec<MirrorDisk>, String> {
    let mut out = Vec::new();
    for (index, d) in writable(spec) {
        let path = Path::new(&d.path);
        let (format, size) = if image_by_name(path) {
            let img = corefour_disk::open(path, corefour_disk::Open::default())
                .map_err(|e| format!("cannot open disk {}: {e}", d.path))?;
            if img.format() != corefour_disk::Format::Qcow2 {
                return Err(format!(
                    "disk {} is {}, which the guest sees read-only and --copy-storage cannot \
                     write on the target: mark it read_only (shared storage) or convert it to \
                     qcow2",
                    d.path,
                    img.format().name()
                ));
            }
            // An overlay (a clone's, a snapshot's) is fine: the mirror reads the guest's view
            // through the whole chain, and the target's copy is one flat image.
            ("qcow2", corefour_disk::DiskSize::size(&img))
        } else {
            // Raw: a file or a block device; both report their size at the end.
            let mut f = std::fs::File::open(path)
                .map_err(|e| format!("cannot open disk {}: {e}", d.path))?;
            let size = f
                .seek(SeekFrom::End(0))
                .map_err(|e| format!("cannot size disk {}: {e}", d.path))?;
            ("raw", size)
        };
        out.push(MirrorDisk {
            index,
            format: format.into(),
            size,
        });
    }
    Ok(out)
}

/// The target side: creates an empty copy of each announced disk in `vm_dir/disks/` and points
/// `spec` at it. On error the caller removes `vm_dir` (and so every copy).
pub(super) fn create_copies(
    announced: &[MirrorDisk],
    spec: &mut VmCreate,
    vm_dir: &Path,
) -> Result<(), String> {
    let wanted: Vec<usize> = writable(spec).map(|(i, _)| i).collect();
    let got: Vec<usize> = announced.iter().map(|d| d.index).collect();
    if wanted != got {
        return Err(format!(
            "the source announced disks {got:?} but the VM's writable disks are {wanted:?}"
        ));
    }
    let dir = vm_dir.join("disks");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for d in announced {
        let path = local_copy(vm_dir, d.index, &spec.disks[d.index].path);
        let by_name = if image_by_name(&path) { "qcow2" } else { "raw" };
        if d.format != by_name {
            return Err(format!(
                "disk {} is announced as {} but its name says {by_name}",
                d.index, d.format
            ));
        }
        if d.format == "qcow2" {
            let opts = corefour_disk::qcow2::CreateOptions::default();
            corefour_disk::qcow2::Qcow2::create(&path, Some(d.size), &opts)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        } else {
            let f = std::fs::File::create(&path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            f.set_len(d.size)
                .map_err(|e| format!("cannot size {}: {e}", path.display()))?;
        }
        spec.disks[d.index].path = path.to_string_lossy().into_owned();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_live_in_the_vm_directory() {
        let p = local_copy(Path::new("/s/vms/a"), 2, "/x/y/root.qcow2");
        assert_eq!(p, Path::new("/s/vms/a/disks/2-root.qcow2"));
        assert_eq!(
            local_copy(Path::new("/d"), 0, "/"),
            Path::new("/d/disks/0-disk")
        );
    }

    #[test]
    fn described_disks_become_empty_copies_of_the_same_size_and_format() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a.raw");
        std::fs::write(&raw, vec![1u8; 3 << 20]).unwrap();
        let q = dir.path().join("b.qcow2");
        let opts = corefour_disk::qcow2::CreateOptions::default();
        corefour_disk::qcow2::Qcow2::create(&q, Some(5 << 20), &opts).unwrap();
        let spec: VmCreate = serde_json::from_value(serde_json::json!({
            "name": "v", "kernel": "/k",
            "disks": [{"path": raw}, {"path": "/ro", "read_only": true}, {"path": q}]
        }))
        .unwrap();
        let d = describe(&spec).unwrap();
        assert_eq!(
            d,
            vec![
                MirrorDisk {
                    index: 0,
                    format: "raw".into(),
                    size: 3 << 20
                },
                MirrorDisk {
                    index: 2,
                    format: "qcow2".into(),
                    size: 5 << 20
                }
            ]
        );
        let mut target = spec.clone();
        let vm_dir = dir.path().join("vm");
        create_copies(&d, &mut target, &vm_dir).unwrap();
        assert_eq!(target.disks[1].path, "/ro");
        let c0 = Path::new(&target.disks[0].path);
        assert!(c0.starts_with(&vm_dir));
        assert_eq!(std::fs::metadata(c0).unwrap().len(), 3 << 20);
        let img =
            corefour_disk::open(Path::new(&target.disks[2].path), Default::default()).unwrap();
        assert_eq!(img.format(), corefour_disk::Format::Qcow2);
        assert_eq!(corefour_disk::DiskSize::size(&img), 5 << 20);

        // A source that announces other disks than the spec's is refused.
        let mut t2 = spec.clone();
        let err = create_copies(&d[..1], &mut t2, &dir.path().join("vm2")).unwrap_err();
        assert!(err.contains("announced"), "{err}");

        // An overlay travels as one flat image of its virtual size.
        let o = dir.path().join("o.qcow2");
        let opts = corefour_disk::qcow2::CreateOptions {
            backing_file: Some(q.to_string_lossy().into_owned()),
            ..Default::default()
        };
        corefour_disk::qcow2::Qcow2::create(&o, None, &opts).unwrap();
        let spec: VmCreate = serde_json::from_value(serde_json::json!({
            "name": "v", "kernel": "/k", "disks": [{"path": o}]
        }))
        .unwrap();
        assert_eq!(
            describe(&spec).unwrap(),
            vec![MirrorDisk {
                index: 0,
                format: "qcow2".into(),
                size: 5 << 20
            }]
        );
        // A format the guest sees read-only cannot be a writable copy.
        let v = dir.path().join("x.vdi");
        std::fs::write(&v, b"not a vdi").unwrap();
        let spec: VmCreate = serde_json::from_value(serde_json::json!({
            "name": "v", "kernel": "/k", "disks": [{"path": v}]
        }))
        .unwrap();
        assert!(describe(&spec).is_err());
    }
}
