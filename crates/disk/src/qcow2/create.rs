//! Creating empty qcow2 images (optionally on top of a backing file).

use super::header::{Header, V3_HEADER_LEN};
use super::Qcow2;
use crate::host::HostFile;
use crate::storage::{FileStorage, Storage};
use crate::{DiskError, Format, Open, Result};
use std::path::Path;

/// `-o` options of `create`, as qemu-img names them.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub cluster_size: u64,
    /// 2 ("compat=0.10") or 3 ("compat=1.1").
    pub version: u32,
    pub refcount_bits: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<Format>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            backing_file: None,
            backing_format: None,
        }
    }
}

impl Qcow2 {
    /// Creates an empty image at `path`. With a backing file and `size` = None, the size is the
    /// backing file's.
    pub fn create(path: &Path, size: Option<u64>, opts: &CreateOptions) -> Result<Qcow2> {
        let size = match (size, &opts.backing_file) {
            (Some(s), _) => s,
            (None, Some(b)) => {
                let bpath = super::resolve_backing(path, b);
                let img = crate::open(
                    &bpath,
                    Open {
                        format: opts.backing_format,
                        write: false,
                    },
                )?;
                crate::DiskSize::size(&img)
            }
            (None, None) => {
                return Err(DiskError::Invalid(
                    "an image size is required (or a backing file to take it from)".into(),
                ))
            }
        };
        if let Some(b) = &opts.backing_file {
            // Fail now, not at first use, if the backing file cannot be opened.
            let bpath = super::resolve_backing(path, b);
            crate::open(
                &bpath,
                Open {
                    format: opts.backing_format,
                    write: false,
                },
            )?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| DiskError::io(path, "create", 0, e))?;
        let storage = Box::new(FileStorage::new(file));
        Self::format_storage(path, storage, size, opts)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| DiskError::io(path, "open", 0, e))?;
        Qcow2::open(
            path,
            Box::new(FileStorage::new(file)),
            true,
            &mut Vec::new(),
        )
    }

    /// Writes an empty image's metadata into `storage`: header, refcount table, one refcount
    /// block, and a zeroed L1 table, in clusters 0, 1, 2 and 3.. as qemu-img lays them out.
    pub fn format_storage(
        path: &Path,
        storage: Box<dyn Storage>,
        size: u64,
        opts: &CreateOptions,
    ) -> Result<()> {
        let cs = opts.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(DiskError::Invalid(format!(
                "cluster_size {cs} must be a power of two between 512 and 2M"
            )));
        }
        if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
            return Err(DiskError::Invalid(format!(
                "refcount_bits {} must be a power of two up to 64",
                opts.refcount_bits
            )));
        }
        if opts.version == 2 && opts.refcount_bits != 16 {
            return Err(DiskError::Invalid(
                "compat=0.10 images only support refcount_bits=16".into(),
            ));
        }
        if size > (1 << 56) {
            return Err(DiskError::Invalid(format!(
                "size {size} is too large for qcow2"
            )));
        }
        let cluster_bits = cs.trailing_zeros();
        let per_l1 = cs * (cs / 8);
        let l1_size = size.div_ceil(per_l1);
        let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
        let refcount_order = opts.refcount_bits.trailing_zeros();
        let rb_entries = cs * 8 / opts.refcount_bits as u64;
        let used = 3 + l1_clusters;
        if used > rb_entries || l1_size * 8 > super::header::MAX_L1_BYTES {
            return Err(DiskError::Invalid(format!(
                "size {size} needs more metadata than cluster_size {cs} allows; use larger clusters"
            )));
        }
        if let Some(b) = &opts.backing_file {
            if b.len() > 1023 {
                return Err(DiskError::Invalid(
                    "backing file name longer than 1023 bytes".into(),
                ));
            }
        }
        let h = Header {
            version: opts.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: l1_size as u32,
            l1_table_offset: 3 * cs,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order,
            header_length: if opts.version == 3 { 112 } else { 72 },
            compression_type: 0,
            backing_file: opts.backing_file.clone(),
            backing_format: opts.backing_format.map(|f| f.name().to_string()),
        };
        debug_assert!(h.header_length == 72 || h.header_length >= V3_HEADER_LEN);
        let head = h.to_cluster();
        let used_header = 112 + 8 + 8 + 16 + h.backing_file.as_ref().map_or(0, |b| b.len());
        if used_header as u64 > cs {
            return Err(DiskError::Invalid(
                "header and backing file name do not fit in one cluster".into(),
            ));
        }
        let host = HostFile::new(path, "qcow2", storage);
        host.write(&head, 0)?;
        let mut rt = vec![0u8; cs as usize];
        rt[..8].copy_from_slice(&(2 * cs).to_be_bytes());
        host.write(&rt, cs)?;
        // The refcount block: clusters 0..used each have refcount 1.
        let mut rb = vec![0u8; cs as usize];
        let w = opts.refcount_bits as usize;
        for i in 0..used as usize {
            if w >= 8 {
                let b = w / 8;
                rb[i * b + b - 1] = 1;
            } else {
                let per = 8 / w;
                rb[i / per] |= 1 << ((i % per) * w);
            }
        }
        host.write(&rb, 2 * cs)?;
        host.set_len(used * cs)?;
        host.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockRead, BlockWrite, Discard, DiskSize, ExtentKind, Resizable};

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn create_write_read_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.qcow2");
        let mut q = Qcow2::create(&p, Some(10 << 20), &CreateOptions::default()).unwrap();
        let data = pattern(200_000, 3);
        q.write_at(&data, 12345).unwrap();
        q.write_at(&[9u8; 100], 70000).unwrap();
        q.flush().unwrap();
        drop(q);
        let mut img = crate::open(&p, Open::default()).unwrap();
        let mut back = vec![0u8; 200_000];
        img.read_at(&mut back, 12345).unwrap();
        let mut want = data.clone();
        want[70000 - 12345..70100 - 12345].fill(9);
        assert_eq!(back, want);
        let mut z = vec![1u8; 1000];
        img.read_at(&mut z, 5 << 20).unwrap();
        assert!(z.iter().all(|b| *b == 0));
        assert_eq!(img.extent(0, u64::MAX).unwrap().kind, ExtentKind::Data);
        let e = img.extent(1 << 20, u64::MAX).unwrap();
        assert_eq!(e.kind, ExtentKind::Zero);
        assert_eq!(e.start + e.length, 10 << 20);
    }

    #[test]
    fn small_clusters_grow_refcount_table_and_check_clean() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.qcow2");
        let opts = CreateOptions {
            cluster_size: 512,
            refcount_bits: 64,
            ..Default::default()
        };
        let mut q = Qcow2::create(&p, Some(8 << 20), &opts).unwrap();
        // 64-bit refcounts in 512-byte blocks cover 64 clusters = 32 KiB per block, and one
        // table cluster holds 64 blocks (2 MiB): writing 4 MiB forces new blocks and a larger
        // refcount table.
        let data = pattern(4 << 20, 7);
        q.write_at(&data, 0).unwrap();
        let r = q.check(super::super::Repair::None).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
        let mut back = vec![0u8; 4 << 20];
        q.read_at(&mut back, 0).unwrap();
        assert!(back == data);
    }

    #[test]
    fn discard_resize_and_leak_repair() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.qcow2");
        let mut q = Qcow2::create(&p, Some(4 << 20), &CreateOptions::default()).unwrap();
        q.write_at(&pattern(1 << 20, 1), 0).unwrap();
        q.discard(65536, 3 * 65536).unwrap();
        let mut b = vec![1u8; 3 * 65536];
        q.read_at(&mut b, 65536).unwrap();
        assert!(b.iter().all(|x| *x == 0));
        q.resize(64 << 30).unwrap();
        assert_eq!(q.size(), 64 << 30);
        q.write_at(&[5u8; 512], (64 << 30) - 512).unwrap();
        let r = q.check(super::super::Repair::None).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
        // Leak a cluster on purpose: count one that nothing references.
        let off = q.alloc(1).unwrap();
        let r = q.check(super::super::Repair::None).unwrap();
        assert_eq!(r.leaks, 1, "{:?}", r.messages);
        let r = q.check(super::super::Repair::Leaks).unwrap();
        assert_eq!(r.leaks_fixed, 1);
        assert_eq!(q.host_refcount(off).unwrap(), 0);
        q.resize(1 << 20).unwrap();
        let r = q.check(super::super::Repair::None).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    }
}
