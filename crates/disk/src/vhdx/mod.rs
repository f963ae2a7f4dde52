//! VHDX import (read-only): fixed and dynamic disks without a parent. Headers and region tables
//! are CRC-32C checked; an image with a pending log is refused (replaying it would write to the
//! source).

use crate::blockmap::{self, read_table, BlockMap};
use crate::host::{le16, le32, le64, HostFile};
use crate::storage::Storage;
use crate::{BlockRead, DiskSize, Extent, Format, ImageInfo, Result};
use std::path::Path;

const KIB64: u64 = 64 * 1024;
const HEADER1: u64 = KIB64;
const HEADER2: u64 = 2 * KIB64;
const REGION1: u64 = 3 * KIB64;
const REGION2: u64 = 4 * KIB64;
const MIB: u64 = 1 << 20;

/// GUIDs in their on-disk byte order (first three fields little-endian).
const BAT_GUID: [u8; 16] = guid(
    0x2DC27766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
const METADATA_GUID: [u8; 16] = guid(
    0x8B7CA206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA16737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const VIRTUAL_DISK_SIZE: [u8; 16] = guid(
    0x2FA54224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const LOGICAL_SECTOR_SIZE: [u8; 16] = guid(
    0x8141BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);

const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

const PAYLOAD_FULLY_PRESENT: u64 = 6;
const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;

pub struct Vhdx {
    host: HostFile,
    size: u64,
    block_size: u64,
    chunk_ratio: u64,
    bat: Vec<u64>,
    file_len: u64,
    logical_sector: u32,
}

/// Verifies a CRC-32C over `buf` with the 4-byte checksum field at offset 4 taken as zero.
fn crc_ok(buf: &[u8]) -> bool {
    let want = le32(buf, 4);
    let mut b = buf.to_vec();
    b[4..8].fill(0);
    crc32c::crc32c(&b) == want
}

impl Vhdx {
    pub fn open(path: &Path, storage: Box<dyn Storage>) -> Result<Vhdx> {
        let host = HostFile::new(path, "vhdx", storage);
        let file_len = host.len()?;
        let mut ident = [0u8; 8];
        host.read_exact(&mut ident, 0, "file type identifier")?;
        if &ident != b"vhdxfile" {
            return Err(host.corrupt(0, "no vhdxfile identifier"));
        }
        // The valid header with the higher sequence number is current.
        let mut best: Option<(u64, Vec<u8>, u64)> = None;
        for at in [HEADER1, HEADER2] {
            let mut h = vec![0u8; 4096];
            if host.read_exact(&mut h, at, "header").is_err() {
                continue;
            }
            if &h[..4] != b"head" || !crc_ok(&h) {
                continue;
            }
            let seq = le64(&h, 8);
            if best.as_ref().is_none_or(|b| seq > b.0) {
                best = Some((seq, h, at));
            }
        }
        let Some((_, h, h_at)) = best else {
            return Err(host.corrupt(HEADER1, "neither header is valid (signature or CRC-32C)"));
        };
        if h[48..64].iter().any(|b| *b != 0) {
            return Err(host.unsupported(
                "a pending log (the image was not closed cleanly); open it once with Hyper-V or `qemu-img check -r all` to replay the log",
            ));
        }
        let version = le16(&h, 66);
        if version != 1 {
            return Err(host.unsupported(format!("header version {version}")));
        }
        let _ = h_at;
        let mut regions = None;
        for at in [REGION1, REGION2] {
            let mut r = vec![0u8; KIB64 as usize];
            if host.read_exact(&mut r, at, "region table").is_err() {
                continue;
            }
            if &r[..4] == b"regi" && crc_ok(&r) {
                regions = Some((r, at));
                break;
            }
        }
        let Some((r, r_at)) = regions else {
            return Err(host.corrupt(
                REGION1,
                "neither region table is valid (signature or CRC-32C)",
            ));
        };
        let count = le32(&r, 8) as usize;
        if count > 2047 {
            return Err(host.corrupt(r_at + 8, format!("{count} region entries")));
        }
        let (mut bat_region, mut meta_region) = (None, None);
        for i in 0..count {
            let e = &r[16 + i * 32..16 + i * 32 + 32];
            let off = le64(e, 16);
            let len = le32(e, 24) as u64;
            let required = le32(e, 28) & 1 != 0;
            let at = r_at + 16 + i as u64 * 32;
            if !off.is_multiple_of(MIB) || off.saturating_add(len) > file_len {
                return Err(host.corrupt(
                    at,
                    format!(
                        "region at {off:#x}+{len:#x} is misaligned or past the end of the file"
                    ),
                ));
            }
            if e[..16] == BAT_GUID {
                bat_region = Some((off, len));
            } else if e[..16] == METADATA_GUID {
                meta_region = Some((off, len));
            } else if required {
                return Err(host.unsupported("an unknown required region"));
            }
        }
        let (Some((bat_off, bat_len)), Some((meta_off, meta_len))) = (bat_region, meta_region)
        else {
            return Err(host.corrupt(r_at, "region table lacks the BAT or metadata region"));
        };
        // Metadata table.
        let mut m = vec![0u8; KIB64.min(meta_len) as usize];
        host.read_exact(&mut m, meta_off, "metadata table")?;
        if m.len() < 32 || &m[..8] != b"metadata" {
            return Err(host.corrupt(meta_off, "no metadata table signature"));
        }
        let entries = le16(&m, 10) as usize;
        if 32 + entries * 32 > m.len() {
            return Err(host.corrupt(
                meta_off + 10,
                format!("{entries} metadata entries overflow the table"),
            ));
        }
        let item = |id: &[u8; 16], need: usize| -> Result<Option<Vec<u8>>> {
            for i in 0..entries {
                let e = &m[32 + i * 32..64 + i * 32];
                if e[..16] != id[..] {
                    continue;
                }
                let off = le32(e, 16) as u64;
                let len = le32(e, 20) as usize;
                if len < need || off + len as u64 > meta_len {
                    return Err(host.corrupt(
                        meta_off + 32 + i as u64 * 32,
                        "metadata item outside its region",
                    ));
                }
                let mut v = vec![0u8; need];
                host.read_exact(&mut v, meta_off + off, "metadata item")?;
                return Ok(Some(v));
            }
            Ok(None)
        };
        let fp = item(&FILE_PARAMETERS, 8)?
            .ok_or_else(|| host.corrupt(meta_off, "no file parameters item"))?;
        let block_size = le32(&fp, 0) as u64;
        let has_parent = le32(&fp, 4) & 2 != 0;
        if has_parent {
            return Err(
                host.unsupported("differencing disks (merge the chain into its parent first)")
            );
        }
        if !(MIB..=256 * MIB).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(host.corrupt(meta_off, format!("block size {block_size} is invalid")));
        }
        let size = le64(
            &item(&VIRTUAL_DISK_SIZE, 8)?
                .ok_or_else(|| host.corrupt(meta_off, "no virtual disk size item"))?,
            0,
        );
        let logical_sector = le32(
            &item(&LOGICAL_SECTOR_SIZE, 4)?
                .ok_or_else(|| host.corrupt(meta_off, "no logical sector size item"))?,
            0,
        );
        if logical_sector != 512 && logical_sector != 4096 {
            return Err(host.corrupt(meta_off, format!("logical sector size {logical_sector}")));
        }
        if size > (64u64 << 40) {
            return Err(host.corrupt(
                meta_off,
                format!("virtual size {size} beyond the 64 TiB VHDX limit"),
            ));
        }
        let chunk_ratio = ((1u64 << 23) * logical_sector as u64) / block_size;
        let data_blocks = size.div_ceil(block_size);
        let total = if data_blocks == 0 {
            0
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        if total * 8 > bat_len {
            return Err(host.corrupt(
                bat_off,
                format!("BAT region of {bat_len} bytes cannot hold {total} entries"),
            ));
        }
        let bat = read_table(&host, bat_off, total, 8, "BAT", le64)?;
        Ok(Vhdx {
            host,
            size,
            block_size,
            chunk_ratio,
            bat,
            file_len,
            logical_sector,
        })
    }
}

impl BlockMap for Vhdx {
    fn host(&self) -> &HostFile {
        &self.host
    }
    fn block_size(&self) -> u64 {
        self.block_size
    }
    fn locate(&self, b: u64) -> Result<Option<u64>> {
        let idx = b + b / self.chunk_ratio;
        let e = self.bat.get(idx as usize).copied().unwrap_or(0);
        let state = e & 7;
        if state != PAYLOAD_FULLY_PRESENT && state != PAYLOAD_PARTIALLY_PRESENT {
            return Ok(None);
        }
        let off = (e >> 20) << 20;
        if off < MIB || off >= self.file_len {
            return Err(self.host.corrupt(
                0,
                format!(
                    "block {b} maps to {off:#x}, outside the file ({:#x})",
                    self.file_len
                ),
            ));
        }
        Ok(Some(off))
    }
}

impl DiskSize for Vhdx {
    fn size(&self) -> u64 {
        self.size
    }
}

impl BlockRead for Vhdx {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        blockmap::read(self, buf, offset)
    }

    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent> {
        blockmap::extent(self, offset, max_len)
    }

    fn info(&self) -> ImageInfo {
        let mut info = ImageInfo::new(&self.host.path, Format::Vhdx, self.size);
        info.cluster_size = Some(self.block_size);
        info.format_specific.insert(
            "logical-sector-size".into(),
            self.logical_sector.to_string(),
        );
        info
    }
}
