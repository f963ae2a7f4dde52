//! A VMDK sparse extent ("KDMV" header): grain directory -> grain tables -> grains, optionally
//! deflate-compressed grains with markers (streamOptimized).

use crate::blockmap::read_table;
use crate::host::{le32, le64, HostFile};
use crate::{ExtentKind, Result};
use std::collections::HashMap;

pub const MAGIC: &[u8; 4] = b"KDMV";
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const GD_AT_END: u64 = u64::MAX;
/// Grain-table entry meaning "reads as zeros" when FLAG_ZERO_GRAIN is set.
const GTE_ZEROED: u32 = 1;

pub struct SparseExtent {
    host: HostFile,
    capacity: u64,
    grain: u64,
    gtes: u64,
    gd: Vec<u32>,
    gts: HashMap<usize, Vec<u32>>,
    flags: u32,
    file_len: u64,
    last_grain: Option<(u64, Vec<u8>)>,
}

struct Header {
    flags: u32,
    capacity: u64,
    grain: u64,
    gtes: u32,
    gd_offset: u64,
}

fn parse_header(host: &HostFile, b: &[u8], at: u64) -> Result<Header> {
    if &b[0..4] != MAGIC {
        return Err(host.corrupt(at, "no KDMV magic"));
    }
    let version = le32(b, 4);
    if !(1..=3).contains(&version) {
        return Err(host.unsupported(format!("sparse extent version {version}")));
    }
    Ok(Header {
        flags: le32(b, 8),
        capacity: le64(b, 12),
        grain: le64(b, 20),
        gtes: le32(b, 44),
        gd_offset: le64(b, 56),
    })
}

impl SparseExtent {
    pub fn open(host: HostFile) -> Result<SparseExtent> {
        let file_len = host.len()?;
        let mut b = [0u8; 512];
        host.read_exact(&mut b, 0, "sparse extent header")?;
        let mut h = parse_header(&host, &b, 0)?;
        if h.gd_offset == GD_AT_END {
            // streamOptimized written in one pass: the real header is the footer.
            if file_len < 1536 {
                return Err(host.corrupt(0, "grain directory at end, but no footer"));
            }
            let at = file_len - 1024;
            host.read_exact(&mut b, at, "footer header")?;
            h = parse_header(&host, &b, at)?;
        }
        let compressed = h.flags & FLAG_COMPRESSED != 0;
        if compressed && le16_at(&b, 77) > 1 {
            return Err(host.unsupported(format!("compression algorithm {}", le16_at(&b, 77))));
        }
        if h.grain == 0 || !h.grain.is_power_of_two() || h.grain > 32768 {
            return Err(host.corrupt(20, format!("grain size {} sectors is invalid", h.grain)));
        }
        if h.gtes == 0 || h.gtes > 65536 {
            return Err(host.corrupt(44, format!("{} entries per grain table is invalid", h.gtes)));
        }
        if h.capacity > (1u64 << 50) {
            return Err(host.corrupt(12, format!("capacity of {} sectors is absurd", h.capacity)));
        }
        let grain = h.grain * 512;
        let span = grain * h.gtes as u64;
        let capacity = h.capacity * 512;
        let gd_entries = capacity.div_ceil(span);
        let gd_off = h.gd_offset.saturating_mul(512);
        if gd_entries * 4 > file_len || gd_off >= file_len {
            return Err(host.corrupt(
                56,
                format!(
                    "grain directory at {gd_off:#x} ({gd_entries} entries) lies outside the file"
                ),
            ));
        }
        let gd = read_table(&host, gd_off, gd_entries, 4, "grain directory", le32)?;
        Ok(SparseExtent {
            host,
            capacity,
            grain,
            gtes: h.gtes as u64,
            gd,
            gts: HashMap::new(),
            flags: h.flags,
            file_len,
            last_grain: None,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }
    pub fn grain_size(&self) -> u64 {
        self.grain
    }
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    /// The grain-table entry for grain number `g` (0 = unallocated).
    fn gte(&mut self, g: u64) -> Result<u32> {
        let gdi = (g / self.gtes) as usize;
        let Some(&gt_sector) = self.gd.get(gdi) else {
            return Ok(0);
        };
        if gt_sector == 0 {
            return Ok(0);
        }
        if !self.gts.contains_key(&gdi) {
            let off = gt_sector as u64 * 512;
            if off >= self.file_len {
                return Err(self.host.corrupt(
                    off,
                    format!(
                        "grain table {gdi} points past the end of the file ({:#x})",
                        self.file_len
                    ),
                ));
            }
            let gt = read_table(&self.host, off, self.gtes, 4, "grain table", le32)?;
            if self.gts.len() >= 64 {
                self.gts.clear();
            }
            self.gts.insert(gdi, gt);
        }
        Ok(self.gts[&gdi][(g % self.gtes) as usize])
    }

    fn is_zero_entry(&self, e: u32) -> bool {
        e == 0 || (e == GTE_ZEROED && self.flags & FLAG_ZERO_GRAIN != 0)
    }

    /// File offset of grain `g` whose table entry is `e`, checked against the file's end.
    fn grain_offset(&self, g: u64, e: u32) -> Result<u64> {
        let off = e as u64 * 512;
        if off >= self.file_len {
            return Err(self.host.corrupt(
                off,
                format!(
                    "grain {g} points past the end of the file ({:#x})",
                    self.file_len
                ),
            ));
        }
        Ok(off)
    }

    fn grain_data(&mut self, g: u64, e: u32) -> Result<&[u8]> {
        let off = self.grain_offset(g, e)?;
        if self.last_grain.as_ref().map(|l| l.0) != Some(g) {
            let mut hdr = [0u8; 12];
            self.host
                .read_exact(&mut hdr, off, "compressed grain marker")?;
            let size = le32(&hdr, 8) as u64;
            if size > 2 * self.grain + 4096 {
                return Err(self
                    .host
                    .corrupt(off, format!("compressed grain of {size} bytes")));
            }
            let mut comp = vec![0u8; size as usize];
            self.host
                .read_exact(&mut comp, off + 12, "compressed grain")?;
            let mut out = vec![0u8; self.grain as usize];
            let mut d = flate2::Decompress::new(true);
            let ok = d
                .decompress(&comp, &mut out, flate2::FlushDecompress::Finish)
                .is_ok();
            // A last grain may be short: the rest of it reads as zeros.
            if !ok || d.total_out() == 0 && size > 0 {
                return Err(self.host.corrupt(off, "compressed grain does not inflate"));
            }
            self.last_grain = Some((g, out));
        }
        Ok(self.last_grain.as_ref().map(|l| &l.1[..]).unwrap_or(&[]))
    }

    pub fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let g = off / self.grain;
            let in_grain = off % self.grain;
            let n = ((self.grain - in_grain) as usize).min(buf.len() - pos);
            let e = self.gte(g)?;
            let out = &mut buf[pos..pos + n];
            if self.is_zero_entry(e) {
                out.fill(0);
            } else if self.compressed() {
                let data = self.grain_data(g, e)?;
                out.copy_from_slice(&data[in_grain as usize..in_grain as usize + n]);
            } else {
                let host = self.grain_offset(g, e)?;
                self.host.read_data(out, host + in_grain)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// (kind, length, host offset) of the run starting at `offset`, at most `max_len`.
    pub fn extent(&mut self, offset: u64, max_len: u64) -> Result<(ExtentKind, u64, Option<u64>)> {
        let g0 = offset / self.grain;
        let e0 = self.gte(g0)?;
        let zero0 = self.is_zero_entry(e0);
        let mut len = (self.grain - offset % self.grain).min(max_len);
        let mut g = g0 + 1;
        while len < max_len {
            let e = self.gte(g)?;
            let same = if zero0 {
                self.is_zero_entry(e)
            } else {
                !self.is_zero_entry(e)
                    && (self.compressed() || e as u64 == e0 as u64 + (g - g0) * (self.grain / 512))
            };
            if !same {
                break;
            }
            len = (len + self.grain).min(max_len);
            g += 1;
        }
        Ok(if zero0 {
            (ExtentKind::Zero, len, None)
        } else if self.compressed() {
            (ExtentKind::Data, len, None)
        } else {
            (
                ExtentKind::Data,
                len,
                Some(e0 as u64 * 512 + offset % self.grain),
            )
        })
    }
}

fn le16_at(b: &[u8], o: usize) -> u16 {
    crate::host::le16(b, o)
}
