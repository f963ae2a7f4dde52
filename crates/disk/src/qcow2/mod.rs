//! qcow2 versions 2 and 3: read and write, backing chains, zero and compressed clusters,
//! refcounts, check and leak repair.
//!
//! Crash consistency: metadata is written through (no write-back cache), in the order
//! refcount -> data -> L2 entry -> L1 entry. A crash between any two steps leaves at worst a
//! cluster whose refcount is one too high (a leak, repaired by `check -r leaks`), never a
//! reference to a cluster the refcounts call free. Freed clusters are not reused in the same
//! session, so new clusters always come from fresh space past the end of the file, which reads as
//! zeros without being written.

mod check;
mod create;
mod header;
mod l2cache;
mod refcount;
mod write;

pub use check::{CheckReport, Repair};
pub use create::CreateOptions;

use crate::host::HostFile;
use crate::storage::Storage;
use crate::{
    check_range, open_in_chain, BlockRead, DiskError, DiskSize, Extent, ExtentKind, Format, Image,
    ImageInfo, Open, Result,
};
use header::Header;
use l2cache::L2Cache;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;

/// A guest cluster's state, decoded from its L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cluster {
    /// Not allocated here: read from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `prealloc` is a host cluster still owned by the entry.
    Zero {
        prealloc: Option<u64>,
    },
    Normal {
        host: u64,
        copied: bool,
    },
    Compressed {
        host: u64,
        len: u64,
    },
}

/// A run of guest clusters handled the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    /// Stored contiguously at `host` (for the run's first byte).
    Data {
        host: u64,
        copied: bool,
    },
    Zero,
    Backing,
    Compressed {
        host: u64,
        len: u64,
    },
}

pub struct Qcow2 {
    host: HostFile,
    h: Header,
    cluster_bits: u32,
    cluster_size: u64,
    /// log2 of the number of entries in an L2 table.
    l2_bits: u32,
    l1: Vec<u64>,
    l2: L2Cache,
    /// The refcount table, as many entries as its clusters hold.
    reftable: Vec<u64>,
    /// Entries of `reftable` that exist on disk (the rest are being built during growth).
    reftable_disk_entries: usize,
    refblocks: HashMap<u64, Vec<u8>>,
    backing: Option<Box<Image>>,
    writable: bool,
    /// Next fresh cluster for allocation (always at or past the end of the file).
    next_free: u64,
    file_len: u64,
    /// The last decompressed cluster, keyed by its L2 entry.
    decompressed: Option<(u64, Vec<u8>)>,
}

impl Qcow2 {
    /// Opens a qcow2 image; `chain` holds the images above it (for loop detection).
    pub fn open(
        path: &Path,
        storage: Box<dyn Storage>,
        writable: bool,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Qcow2> {
        Self::open_inner(path, storage, writable, false, chain)
    }

    /// Opens an image for `check -r`: writable even when marked corrupt or holding snapshots
    /// (repair only touches refcounts and flags), and without its backing file.
    pub fn open_for_repair(path: &Path) -> Result<Qcow2> {
        Self::open_for_check(path, true)
    }

    /// Opens an image for `check`, without its backing chain; `write` allows repairs.
    pub fn open_for_check(path: &Path, write: bool) -> Result<Qcow2> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| DiskError::io(path, "open", 0, e))?;
        let storage = Box::new(crate::storage::FileStorage::new(file));
        Self::open_inner(path, storage, write, true, &mut Vec::new())
    }

    fn open_inner(
        path: &Path,
        storage: Box<dyn Storage>,
        writable: bool,
        repair: bool,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Qcow2> {
        let host = HostFile::new(path, "qcow2", storage);
        let file_len = host.len()?;
        let mut first = vec![0u8; 4096];
        host.read_data(&mut first, 0)?;
        if first.starts_with(header::MAGIC) && (9..=21).contains(&crate::host::be32(&first, 20)) {
            let cs = 1usize << crate::host::be32(&first, 20);
            if cs > first.len() {
                first.resize(cs, 0);
                host.read_data(&mut first, 0)?;
            }
        }
        let h = Header::parse(&host, &first, file_len)?;
        let cluster_bits = h.cluster_bits;
        let cluster_size = 1u64 << cluster_bits;

        let mut l1_raw = vec![0u8; h.l1_size as usize * 8];
        host.read_exact(&mut l1_raw, h.l1_table_offset, "L1 table")?;
        let l1: Vec<u64> = l1_raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();

        let rt_bytes = h.refcount_table_clusters as u64 * cluster_size;
        let mut rt_raw = vec![0u8; rt_bytes as usize];
        host.read_exact(&mut rt_raw, h.refcount_table_offset, "refcount table")?;
        let reftable: Vec<u64> = rt_raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();

        if writable && !repair {
            if h.incompatible & header::INCOMPAT_CORRUPT != 0 {
                return Err(host.unsupported(
                    "image is marked corrupt; repair it with `corefour disk check -r all` first",
                ));
            }
            if h.nb_snapshots != 0 {
                return Err(host.unsupported("writing to an image with internal snapshots"));
            }
        }

        let backing = match &h.backing_file {
            // Checking and repairing look at this file's metadata only; a missing backing
            // file must not stop them.
            Some(_) if repair => None,
            Some(name) if !name.is_empty() => {
                let bpath = resolve_backing(path, name);
                let format = match &h.backing_format {
                    Some(f) => Some(Format::parse(f)?),
                    None => None,
                };
                let img = open_in_chain(
                    &bpath,
                    Open {
                        format,
                        write: false,
                    },
                    chain,
                )
                .map_err(|e| match e {
                    e @ (DiskError::BackingLoop { .. } | DiskError::Corrupt { .. }) => e,
                    other => DiskError::Invalid(format!(
                        "{}: cannot open backing file {}: {other}",
                        path.display(),
                        bpath.display()
                    )),
                })?;
                Some(Box::new(img))
            }
            _ => None,
        };

        let l2_capacity = ((32u64 << 20) / cluster_size).max(16) as usize;
        let reftable_disk_entries = reftable.len();
        let mut q = Qcow2 {
            host,
            cluster_bits,
            cluster_size,
            l2_bits: cluster_bits - 3,
            l1,
            l2: L2Cache::new(l2_capacity),
            reftable,
            reftable_disk_entries,
            refblocks: HashMap::new(),
            backing,
            writable,
            next_free: file_len.div_ceil(cluster_size) * cluster_size,
            file_len,
            decompressed: None,
            h,
        };
        if writable && !repair {
            q.prepare_for_writing()?;
        }
        Ok(q)
    }

    /// Repairs a dirty image (lazy refcounts) and drops autoclear bits we do not maintain.
    fn prepare_for_writing(&mut self) -> Result<()> {
        if self.h.incompatible & header::INCOMPAT_DIRTY != 0 {
            let report = self.check(check::Repair::All)?;
            if report.corruptions > report.corruptions_fixed {
                return Err(self.host.corrupt(
                    0,
                    "dirty image could not be repaired; run `corefour disk check -r all`",
                ));
            }
            self.h.incompatible &= !header::INCOMPAT_DIRTY;
            self.write_header_u64(header::field::INCOMPATIBLE, self.h.incompatible)?;
        }
        if self.h.version == 3 && self.h.autoclear != 0 {
            self.h.autoclear = 0;
            self.write_header_u64(header::field::AUTOCLEAR, 0)?;
        }
        Ok(())
    }

    fn write_header_u64(&mut self, off: u64, v: u64) -> Result<()> {
        self.host.write(&v.to_be_bytes(), off)
    }

    pub fn version(&self) -> u32 {
        self.h.version
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    pub fn backing_file(&self) -> Option<&str> {
        self.h.backing_file.as_deref()
    }

    fn decode(&self, entry: u64, entry_off: u64) -> Result<Cluster> {
        if entry & COMPRESSED != 0 {
            let shift = 62 - (self.cluster_bits - 8);
            let host = entry & ((1u64 << shift) - 1);
            let sectors = ((entry >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
            let len = sectors * 512 - (host & 511);
            if host >= self.file_len {
                return Err(self.host.corrupt(
                    entry_off,
                    format!(
                        "compressed cluster at {host:#x} is past the end of the file ({:#x})",
                        self.file_len
                    ),
                ));
            }
            return Ok(Cluster::Compressed { host, len });
        }
        let host = entry & OFFSET_MASK;
        if self.h.version >= 3 && entry & ZERO != 0 {
            return Ok(Cluster::Zero {
                prealloc: (host != 0).then_some(host),
            });
        }
        if host == 0 {
            return Ok(Cluster::Unallocated);
        }
        if host & (self.cluster_size - 1) != 0 {
            return Err(self.host.corrupt(
                entry_off,
                format!("L2 entry points to unaligned host offset {host:#x}"),
            ));
        }
        if host >= self.file_len {
            return Err(self.host.corrupt(
                entry_off,
                format!(
                    "L2 entry points to host offset {host:#x}, past the end of the file ({:#x})",
                    self.file_len
                ),
            ));
        }
        Ok(Cluster::Normal {
            host,
            copied: entry & COPIED != 0,
        })
    }

    /// Validates an L1 entry; returns the L2 table's host offset, 0 for none.
    fn l2_offset(&self, l1_index: usize) -> Result<u64> {
        let entry = self.l1[l1_index];
        let off = entry & OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let entry_off = self.h.l1_table_offset + l1_index as u64 * 8;
        if off & (self.cluster_size - 1) != 0 {
            return Err(self.host.corrupt(
                entry_off,
                format!("L1 entry points to unaligned L2 table offset {off:#x}"),
            ));
        }
        if off >= self.file_len {
            return Err(self.host.corrupt(
                entry_off,
                format!(
                    "L1 entry points to L2 table at {off:#x}, past the end of the file ({:#x})",
                    self.file_len
                ),
            ));
        }
        Ok(off)
    }

    /// Makes sure the L2 table at `off` is cached.
    fn load_l2(&mut self, off: u64) -> Result<()> {
        if self.l2.contains(off) {
            return Ok(());
        }
        let mut raw = vec![0u8; self.cluster_size as usize];
        self.host.read_exact(&mut raw, off, "L2 table")?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        self.l2.insert(off, table);
        Ok(())
    }

    /// The run of same-kind clusters starting at guest `offset`, at most `max_len` bytes and
    /// never crossing an L2 table.
    fn run(&mut self, offset: u64, max_len: u64) -> Result<(Run, u64)> {
        let cs = self.cluster_size;
        let in_cluster = offset & (cs - 1);
        let table_span = cs << self.l2_bits;
        let to_table_end = table_span - (offset & (table_span - 1));
        let max_len_all = max_len.min(self.h.size - offset);
        let max_len = max_len_all.min(to_table_end);
        let l1_index = (offset >> (self.cluster_bits + self.l2_bits)) as usize;
        let no_table_kind = if self.backing.is_some() {
            Run::Backing
        } else {
            Run::Zero
        };
        if l1_index >= self.l1.len() {
            return Ok((no_table_kind, max_len_all));
        }
        let l2_off = self.l2_offset(l1_index)?;
        if l2_off == 0 {
            // Skip every following L1 entry without a table too, so a huge hole is one run.
            let mut len = to_table_end.min(max_len_all);
            let mut i = l1_index + 1;
            while len < max_len_all && i < self.l1.len() && self.l1[i] & OFFSET_MASK == 0 {
                len = (len + table_span).min(max_len_all);
                i += 1;
            }
            if i >= self.l1.len() {
                len = max_len_all;
            }
            return Ok((no_table_kind, len));
        }
        self.load_l2(l2_off)?;
        let first = ((offset >> self.cluster_bits) & ((1 << self.l2_bits) - 1)) as usize;
        let entry_off = |i: usize| l2_off + i as u64 * 8;
        let entries = self.l2.get(l2_off).unwrap_or(&[]);
        let e0 = entries.get(first).copied().unwrap_or(0);
        let c0 = self.decode(e0, entry_off(first))?;
        let kind_of = |c: Cluster, backing: bool| match c {
            Cluster::Unallocated if backing => Run::Backing,
            Cluster::Unallocated | Cluster::Zero { prealloc: None } => Run::Zero,
            Cluster::Zero { .. } => Run::Zero,
            Cluster::Normal { host, copied } => Run::Data { host, copied },
            Cluster::Compressed { host, len } => Run::Compressed { host, len },
        };
        let has_backing = self.backing.is_some();
        let kind0 = kind_of(c0, has_backing);
        if let Run::Compressed { .. } = kind0 {
            return Ok((kind0, (cs - in_cluster).min(max_len)));
        }
        let mut len = (cs - in_cluster).min(max_len);
        let mut i = first + 1;
        while len < max_len {
            let e = entries.get(i).copied().unwrap_or(0);
            let c = self.decode(e, entry_off(i))?;
            let k = kind_of(c, has_backing);
            let same = match (kind0, k) {
                (
                    Run::Data {
                        host: h0,
                        copied: c0,
                    },
                    Run::Data { host, copied },
                ) => copied == c0 && host == (h0 & !(cs - 1)) + (i - first) as u64 * cs,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            len = (len + cs).min(max_len);
            i += 1;
        }
        let kind = match kind0 {
            Run::Data { host, copied } => Run::Data {
                host: host + in_cluster,
                copied,
            },
            k => k,
        };
        Ok((kind, len))
    }

    fn read_compressed(&mut self, host: u64, len: u64, entry_key: u64) -> Result<&[u8]> {
        let cs = self.cluster_size as usize;
        if self.decompressed.as_ref().map(|d| d.0) != Some(entry_key) {
            let len = len.min(2 * self.cluster_size);
            let mut comp = vec![0u8; len as usize];
            self.host.read_data(&mut comp, host)?;
            let mut out = vec![0u8; cs];
            let mut d = flate2::Decompress::new(false);
            let status = d.decompress(&comp, &mut out, flate2::FlushDecompress::Finish);
            let ok = match status {
                Ok(_) => d.total_out() as usize == cs,
                Err(_) => false,
            };
            if !ok {
                return Err(self.host.corrupt(
                    host,
                    format!(
                        "compressed cluster does not inflate to {cs} bytes (got {})",
                        d.total_out()
                    ),
                ));
            }
            self.decompressed = Some((entry_key, out));
        }
        Ok(self.decompressed.as_ref().map(|d| &d.1[..]).unwrap_or(&[]))
    }

    fn read_backing(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self.backing.as_mut() {
            None => buf.fill(0),
            Some(b) => {
                let bsize = b.size();
                let avail = bsize.saturating_sub(offset).min(buf.len() as u64) as usize;
                if avail > 0 {
                    b.read_at(&mut buf[..avail], offset)?;
                }
                buf[avail..].fill(0);
            }
        }
        Ok(())
    }

    /// Reads guest bytes without the range check (callers have checked).
    fn read_inner(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let goff = offset + pos as u64;
            let (run, len) = self.run(goff, (buf.len() - pos) as u64)?;
            let len = len as usize;
            let out = &mut buf[pos..pos + len];
            match run {
                Run::Data { host, .. } => self.host.read_data(out, host)?,
                Run::Zero => out.fill(0),
                Run::Backing => self.read_backing(out, goff)?,
                Run::Compressed { host, len: clen } => {
                    let key = host ^ (clen << 56);
                    let in_cluster = (goff & (self.cluster_size - 1)) as usize;
                    let data = self.read_compressed(host, clen, key)?;
                    out.copy_from_slice(&data[in_cluster..in_cluster + len]);
                }
            }
            pos += len;
        }
        Ok(())
    }
}

/// A relative backing name is relative to the directory of the image that names it.
pub(crate) fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}

impl DiskSize for Qcow2 {
    fn size(&self) -> u64 {
        self.h.size
    }
}

impl BlockRead for Qcow2 {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.host.path, offset, buf.len() as u64, self.h.size)?;
        self.read_inner(buf, offset)
    }

    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent> {
        let max_len = max_len.min(self.h.size.saturating_sub(offset));
        if max_len == 0 {
            return Ok(Extent {
                start: offset,
                length: 0,
                kind: ExtentKind::Zero,
                depth: 0,
                offset: None,
            });
        }
        // Merge runs across L2 tables so a large hole is one extent.
        let mut first: Option<(Run, u64)> = None;
        let mut total = 0u64;
        while total < max_len {
            let (run, len) = self.run(offset + total, max_len - total)?;
            match first {
                None => first = Some((run, len)),
                Some((r0, _)) => {
                    let same = match (r0, run) {
                        (Run::Zero, Run::Zero) | (Run::Backing, Run::Backing) => true,
                        (Run::Data { host: h0, .. }, Run::Data { host, .. }) => host == h0 + total,
                        _ => false,
                    };
                    if !same {
                        break;
                    }
                }
            }
            total += len;
            if matches!(run, Run::Compressed { .. }) {
                break;
            }
        }
        let (run, _) = first.unwrap_or((Run::Zero, 0));
        let mk = |kind, depth, off| Extent {
            start: offset,
            length: total,
            kind,
            depth,
            offset: off,
        };
        Ok(match run {
            Run::Data { host, .. } => mk(ExtentKind::Data, 0, Some(host)),
            Run::Compressed { .. } => mk(ExtentKind::Data, 0, None),
            Run::Zero => mk(ExtentKind::Zero, 0, None),
            Run::Backing => {
                let Some(b) = self.backing.as_mut() else {
                    return Ok(mk(ExtentKind::Zero, 0, None));
                };
                let bsize = b.size();
                if offset >= bsize {
                    return Ok(mk(ExtentKind::Zero, 0, None));
                }
                let mut e = b.extent(offset, total.min(bsize - offset))?;
                e.depth += 1;
                e
            }
        })
    }

    fn info(&self) -> ImageInfo {
        let mut info = ImageInfo::new(&self.host.path, Format::Qcow2, self.h.size);
        info.cluster_size = Some(self.cluster_size);
        info.backing_filename = self.h.backing_file.clone();
        info.backing_filename_format = self.h.backing_format.clone();
        let fs = &mut info.format_specific;
        fs.insert(
            "compat".into(),
            if self.h.version >= 3 { "1.1" } else { "0.10" }.into(),
        );
        fs.insert(
            "refcount-bits".into(),
            (1u32 << self.h.refcount_order).to_string(),
        );
        fs.insert(
            "corrupt".into(),
            (self.h.incompatible & header::INCOMPAT_CORRUPT != 0).to_string(),
        );
        fs.insert(
            "dirty".into(),
            (self.h.incompatible & header::INCOMPAT_DIRTY != 0).to_string(),
        );
        fs.insert("snapshots".into(), self.h.nb_snapshots.to_string());
        info.backing_image = self.backing.as_ref().map(|b| Box::new(b.info()));
        info
    }
}
