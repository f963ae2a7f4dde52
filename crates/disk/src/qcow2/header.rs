//! The qcow2 header (versions 2 and 3) and its extensions. Parsing validates every field a
//! later table walk relies on, so a hostile header fails here with the offending offset.

use crate::host::{be32, be64, HostFile};
use crate::Result;

pub const MAGIC: &[u8; 4] = b"QFI\xfb";
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 104;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Field offsets inside the header, for in-place updates that leave extensions untouched.
pub mod field {
    pub const SIZE: u64 = 24;
    pub const L1_SIZE: u64 = 36;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const INCOMPATIBLE: u64 = 72;
    pub const AUTOCLEAR: u64 = 88;
}

/// qemu's limits (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE); an image beyond them is refused
/// rather than trusted to allocate that much.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parses and validates the header from `buf`, the image's first cluster (or as much of it
    /// as the file holds, zero-padded).
    pub fn parse(host: &HostFile, buf: &[u8], file_len: u64) -> Result<Header> {
        let bad = |off: u64, why: String| Err(host.corrupt(off, why));
        if buf.len() < V2_HEADER_LEN as usize || file_len < V2_HEADER_LEN as u64 {
            return bad(
                0,
                format!("file is {file_len} bytes, shorter than a qcow2 header"),
            );
        }
        if &buf[0..4] != MAGIC {
            return bad(0, "no qcow2 magic".into());
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(host.unsupported(format!("qcow2 version {version} (only 2 and 3)")));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return bad(20, format!("cluster_bits {cluster_bits} outside 9..=21"));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
        };
        if version == 3 {
            if buf.len() < V3_HEADER_LEN as usize {
                return bad(0, "truncated version 3 header".into());
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_LEN || h.header_length as u64 > cluster_size {
                return bad(100, format!("header_length {} invalid", h.header_length));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
            }
        }
        if h.refcount_order > 6 {
            return bad(96, format!("refcount_order {} > 6", h.refcount_order));
        }
        if h.crypt_method != 0 {
            return Err(host.unsupported("encryption (decrypt with qemu-img convert first)"));
        }
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(host.unsupported("external data file"));
        }
        if h.incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(host.unsupported("extended L2 entries (subclusters)"));
        }
        if h.incompatible & !known != 0 {
            return Err(host.unsupported(format!(
                "unknown incompatible feature bits {:#x}",
                h.incompatible & !known
            )));
        }
        if h.compression_type != 0 {
            return Err(host.unsupported(format!(
                "compression type {} (only zlib)",
                h.compression_type
            )));
        }
        // The size must be addressable by the L1 table it declares.
        let l2_entries = cluster_size / 8;
        let per_l1 = cluster_size * l2_entries;
        if h.size > (1u64 << 62) {
            return bad(24, format!("virtual size {:#x} is absurd", h.size));
        }
        let needed = h.size.div_ceil(per_l1);
        if (h.l1_size as u64) < needed {
            return bad(
                36,
                format!(
                    "L1 table of {} entries cannot address a {}-byte disk (needs {needed})",
                    h.l1_size, h.size
                ),
            );
        }
        if h.l1_size as u64 * 8 > MAX_L1_BYTES {
            return bad(
                36,
                format!("L1 table of {} entries is too large", h.l1_size),
            );
        }
        for (field, off) in [
            (h.l1_table_offset, 40u64),
            (h.refcount_table_offset, 48),
            (h.snapshots_offset, 64),
        ] {
            if field % cluster_size != 0 {
                return bad(
                    off,
                    format!("table offset {field:#x} is not cluster-aligned"),
                );
            }
        }
        if h.l1_size > 0 && h.l1_table_offset == 0 {
            return bad(40, "L1 table at offset 0 overlaps the header".into());
        }
        if h.refcount_table_offset == 0 {
            return bad(48, "refcount table at offset 0 overlaps the header".into());
        }
        if h.refcount_table_clusters as u64 * cluster_size > MAX_REFTABLE_BYTES
            || h.refcount_table_clusters == 0
        {
            return bad(
                56,
                format!("refcount table of {} clusters", h.refcount_table_clusters),
            );
        }
        if h.backing_file_offset != 0 {
            let end = h.backing_file_offset + h.backing_file_size as u64;
            if h.backing_file_size > 1023 || end > cluster_size.min(buf.len() as u64) {
                return bad(
                    8,
                    "backing file name lies outside the header cluster".into(),
                );
            }
            let name = &buf[h.backing_file_offset as usize..end as usize];
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        h.parse_extensions(host, buf)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, host: &HostFile, buf: &[u8]) -> Result<()> {
        let limit = (self.cluster_size() as usize).min(buf.len());
        let mut off = self.header_length as usize;
        loop {
            if off + 8 > limit {
                // qemu tolerates a missing end marker when the extensions fill the cluster.
                return Ok(());
            }
            let ty = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            if ty == EXT_END {
                return Ok(());
            }
            let data = off + 8;
            if data + len > limit {
                return Err(host.corrupt(
                    off as u64,
                    format!("header extension {ty:#x} of {len} bytes runs past the header cluster"),
                ));
            }
            if ty == EXT_BACKING_FORMAT {
                self.backing_format =
                    Some(String::from_utf8_lossy(&buf[data..data + len]).into_owned());
            }
            off = data + len.div_ceil(8) * 8;
        }
    }

    /// Serialises a fresh header with its extensions and backing name into one cluster.
    pub fn to_cluster(&self) -> Vec<u8> {
        let mut b = vec![0u8; self.cluster_size() as usize];
        let put32 =
            |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_be_bytes());
        b[0..4].copy_from_slice(MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, 0);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, 0);
        put64(&mut b, 64, 0);
        let mut off = V2_HEADER_LEN as usize;
        if self.version == 3 {
            put64(&mut b, 72, self.incompatible);
            put64(&mut b, 80, self.compatible);
            put64(&mut b, 88, self.autoclear);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, 112);
            off = 112;
        }
        if let Some(fmt) = &self.backing_format {
            put32(&mut b, off, EXT_BACKING_FORMAT);
            put32(&mut b, off + 4, fmt.len() as u32);
            b[off + 8..off + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
            off += 8 + fmt.len().div_ceil(8) * 8;
        }
        put32(&mut b, off, EXT_END);
        put32(&mut b, off + 4, 0);
        off += 8;
        if let Some(name) = &self.backing_file {
            put64(&mut b, 8, off as u64);
            put32(&mut b, 16, name.len() as u32);
            b[off..off + name.len()].copy_from_slice(name.as_bytes());
        }
        b
    }
}
