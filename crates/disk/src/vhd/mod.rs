//! VHD (Virtual PC / Hyper-V gen 1, qemu's "vpc") import (read-only): fixed and dynamic disks.

use crate::blockmap::{self, past_end, read_table, BlockMap};
use crate::host::{be16, be32, be64, HostFile};
use crate::storage::Storage;
use crate::{check_range, BlockRead, DiskSize, Extent, ExtentKind, Format, ImageInfo, Result};
use std::path::Path;

const COOKIE: &[u8; 8] = b"conectix";
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;
const BAT_FREE: u32 = 0xffff_ffff;

pub struct Vhd {
    host: HostFile,
    size: u64,
    disk_type: u32,
    block_size: u64,
    /// Bytes of sector bitmap before each block's data.
    bitmap_size: u64,
    bat: Vec<u32>,
    file_len: u64,
}

/// The footer's checksum: one's complement of the byte sum, checksum field excluded.
fn checksum(footer: &[u8]) -> u32 {
    let sum: u32 = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |a, (_, b)| a.wrapping_add(*b as u32));
    !sum
}

/// Whether `tail` (the last 512 bytes of a `len`-byte file) is a fixed VHD's footer.
pub fn fixed_footer_plausible(tail: &[u8], len: u64) -> bool {
    tail.len() >= 512
        && &tail[..8] == COOKIE
        && be32(tail, 60) == TYPE_FIXED
        && be32(tail, 64) == checksum(&tail[..512])
        && be64(tail, 48) <= len - 512
}

/// The disk size qemu would use: Virtual PC sizes disks by CHS geometry, everyone else by the
/// "current size" field.
fn disk_size(footer: &[u8]) -> u64 {
    let current = be64(footer, 48);
    let creator = &footer[28..32];
    let (cyl, heads, spt) = (
        be16(footer, 56) as u64,
        footer[58] as u64,
        footer[59] as u64,
    );
    let chs = cyl * heads * spt * 512;
    let chs_max = cyl == 65535 && heads == 16 && spt == 255;
    if (creator == b"vpc " || creator == b"vs  ") && !chs_max && chs > 0 {
        chs
    } else {
        current
    }
}

impl Vhd {
    pub fn open(path: &Path, storage: Box<dyn Storage>) -> Result<Vhd> {
        let host = HostFile::new(path, "vhd", storage);
        let file_len = host.len()?;
        if file_len < 512 {
            return Err(host.corrupt(
                0,
                format!("file is {file_len} bytes, shorter than a VHD footer"),
            ));
        }
        let mut footer = [0u8; 512];
        let mut at = file_len - 512;
        host.read_exact(&mut footer, at, "VHD footer")?;
        if &footer[..8] != COOKIE {
            // Some writers leave a 511-byte footer or none at the end; use the copy at the start.
            at = 0;
            host.read_exact(&mut footer, 0, "VHD footer copy")?;
            if &footer[..8] != COOKIE {
                return Err(host.corrupt(file_len - 512, "no VHD footer (conectix cookie)"));
            }
        }
        if be32(&footer, 64) != checksum(&footer) {
            return Err(host.corrupt(at + 64, "footer checksum mismatch"));
        }
        let disk_type = be32(&footer, 60);
        let size = disk_size(&footer);
        match disk_type {
            TYPE_FIXED => {
                if size > file_len - 512 {
                    return Err(host.corrupt(
                        at + 48,
                        format!("fixed disk of {size} bytes in a {file_len}-byte file"),
                    ));
                }
                Ok(Vhd {
                    host,
                    size,
                    disk_type,
                    block_size: 0,
                    bitmap_size: 0,
                    bat: Vec::new(),
                    file_len,
                })
            }
            TYPE_DYNAMIC => {
                let dyn_off = be64(&footer, 16);
                let mut d = [0u8; 1024];
                if dyn_off >= file_len {
                    return Err(host.corrupt(
                        at + 16,
                        format!("dynamic header offset {dyn_off:#x} past the end of the file"),
                    ));
                }
                host.read_exact(&mut d, dyn_off, "dynamic disk header")?;
                if &d[..8] != DYN_COOKIE {
                    return Err(host.corrupt(dyn_off, "no dynamic disk header (cxsparse cookie)"));
                }
                let table = be64(&d, 16);
                let entries = be32(&d, 28) as u64;
                let block_size = be32(&d, 32) as u64;
                if block_size < 512 || !block_size.is_power_of_two() || block_size > (256 << 20) {
                    return Err(
                        host.corrupt(dyn_off + 32, format!("block size {block_size} is invalid"))
                    );
                }
                if entries * block_size < size {
                    return Err(host.corrupt(
                        dyn_off + 28,
                        format!("{entries} blocks of {block_size} bytes cannot hold {size} bytes"),
                    ));
                }
                if table.saturating_add(entries * 4) > file_len {
                    return Err(host.corrupt(
                        dyn_off + 16,
                        format!(
                            "block table at {table:#x} ({entries} entries) lies outside the file"
                        ),
                    ));
                }
                let bat = read_table(&host, table, entries, 4, "block allocation table", be32)?;
                let bitmap_size = (block_size / 512).div_ceil(8).div_ceil(512) * 512;
                Ok(Vhd {
                    host,
                    size,
                    disk_type,
                    block_size,
                    bitmap_size,
                    bat,
                    file_len,
                })
            }
            TYPE_DIFFERENCING => {
                Err(host.unsupported("differencing disks (merge the chain into its parent first)"))
            }
            t => Err(host.corrupt(at + 60, format!("disk type {t}"))),
        }
    }
}

impl BlockMap for Vhd {
    /// Each block's sector bitmap sits between data blocks, so runs carry no host offset.
    const HOST_OFFSETS: bool = false;

    fn host(&self) -> &HostFile {
        &self.host
    }
    fn block_size(&self) -> u64 {
        self.block_size
    }
    fn locate(&self, b: u64) -> Result<Option<u64>> {
        let e = self.bat.get(b as usize).copied().unwrap_or(BAT_FREE);
        if e == BAT_FREE {
            return Ok(None);
        }
        let off = e as u64 * 512 + self.bitmap_size;
        if off >= self.file_len {
            return Err(past_end(&self.host, b, off, self.file_len));
        }
        Ok(Some(off))
    }
}

impl DiskSize for Vhd {
    fn size(&self) -> u64 {
        self.size
    }
}

impl BlockRead for Vhd {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.disk_type == TYPE_FIXED {
            check_range(&self.host.path, offset, buf.len() as u64, self.size)?;
            return self.host.read_data(buf, offset);
        }
        blockmap::read(self, buf, offset)
    }

    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent> {
        let max_len = max_len.min(self.size.saturating_sub(offset));
        if self.disk_type == TYPE_FIXED {
            return Ok(Extent {
                start: offset,
                length: max_len,
                kind: ExtentKind::Data,
                depth: 0,
                offset: Some(offset),
            });
        }
        blockmap::extent(self, offset, max_len)
    }

    fn info(&self) -> ImageInfo {
        let mut info = ImageInfo::new(&self.host.path, Format::Vpc, self.size);
        if self.disk_type == TYPE_DYNAMIC {
            info.cluster_size = Some(self.block_size);
        }
        info.format_specific.insert(
            "subformat".into(),
            if self.disk_type == TYPE_FIXED {
                "fixed"
            } else {
                "dynamic"
            }
            .into(),
        );
        info
    }
}
