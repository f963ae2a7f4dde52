//! VirtualBox VDI import (read-only): dynamic and fixed images, version 1.1 headers.

use crate::blockmap::{self, past_end, read_table, BlockMap};
use crate::host::{le32, le64, HostFile};
use crate::storage::Storage;
use crate::{BlockRead, DiskSize, Extent, Format, ImageInfo, Result};
use std::path::Path;

const SIGNATURE: u32 = 0xbeda_107f;
const TYPE_DYNAMIC: u32 = 1;
const TYPE_FIXED: u32 = 2;
/// Block-map entries meaning "never written" and "written as zeros".
const BLOCK_FREE: u32 = 0xffff_ffff;
const BLOCK_ZERO: u32 = 0xffff_fffe;

pub struct Vdi {
    host: HostFile,
    size: u64,
    block_size: u64,
    data_offset: u64,
    bmap: Vec<u32>,
    image_type: u32,
    file_len: u64,
}

impl Vdi {
    pub fn open(path: &Path, storage: Box<dyn Storage>) -> Result<Vdi> {
        let host = HostFile::new(path, "vdi", storage);
        let file_len = host.len()?;
        let mut h = [0u8; 512];
        host.read_exact(&mut h, 0, "VDI header")?;
        if le32(&h, 0x40) != SIGNATURE {
            return Err(host.corrupt(0x40, "no VDI signature"));
        }
        let version = le32(&h, 0x44);
        if version >> 16 != 1 {
            return Err(host.unsupported(format!("VDI version {:#x} (only 1.x)", version)));
        }
        let header_size = le32(&h, 0x48);
        if header_size < 0x190 - 0x48 {
            return Err(host.corrupt(0x48, format!("header size {header_size} too small")));
        }
        let image_type = le32(&h, 0x4c);
        if image_type != TYPE_DYNAMIC && image_type != TYPE_FIXED {
            return Err(
                host.unsupported(format!("image type {image_type} (only dynamic and fixed)"))
            );
        }
        let bmap_offset = le32(&h, 0x154) as u64;
        let data_offset = le32(&h, 0x158) as u64;
        let sector_size = le32(&h, 0x168);
        let size = le64(&h, 0x170);
        let block_size = le32(&h, 0x178) as u64;
        let block_extra = le32(&h, 0x17c);
        let blocks = le32(&h, 0x180) as u64;
        if sector_size != 512 {
            return Err(host.unsupported(format!("sector size {sector_size}")));
        }
        if block_size == 0 || !block_size.is_power_of_two() || block_size > (256 << 20) {
            return Err(host.corrupt(0x178, format!("block size {block_size} is invalid")));
        }
        if block_extra != 0 {
            return Err(host.unsupported(format!("{block_extra} extra bytes per block")));
        }
        if blocks.checked_mul(block_size).is_none_or(|b| b < size) {
            return Err(host.corrupt(
                0x180,
                format!("{blocks} blocks of {block_size} bytes cannot hold {size} bytes"),
            ));
        }
        if bmap_offset < 0x190 || bmap_offset.saturating_add(blocks * 4) > file_len {
            return Err(host.corrupt(
                0x154,
                format!("block map at {bmap_offset:#x} ({blocks} entries) lies outside the file"),
            ));
        }
        let bmap = read_table(&host, bmap_offset, blocks, 4, "block map", le32)?;
        Ok(Vdi {
            host,
            size,
            block_size,
            data_offset,
            bmap,
            image_type,
            file_len,
        })
    }
}

impl BlockMap for Vdi {
    fn host(&self) -> &HostFile {
        &self.host
    }
    fn block_size(&self) -> u64 {
        self.block_size
    }
    fn locate(&self, b: u64) -> Result<Option<u64>> {
        let e = self.bmap.get(b as usize).copied().unwrap_or(BLOCK_FREE);
        if e == BLOCK_FREE || e == BLOCK_ZERO {
            return Ok(None);
        }
        let off = self.data_offset + e as u64 * self.block_size;
        if off >= self.file_len {
            return Err(past_end(&self.host, b, off, self.file_len));
        }
        Ok(Some(off))
    }
}

impl DiskSize for Vdi {
    fn size(&self) -> u64 {
        self.size
    }
}

impl BlockRead for Vdi {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        blockmap::read(self, buf, offset)
    }

    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent> {
        blockmap::extent(self, offset, max_len)
    }

    fn info(&self) -> ImageInfo {
        let mut info = ImageInfo::new(&self.host.path, Format::Vdi, self.size);
        info.cluster_size = Some(self.block_size);
        info.format_specific.insert(
            "type".into(),
            if self.image_type == TYPE_FIXED {
                "fixed"
            } else {
                "dynamic"
            }
            .into(),
        );
        info
    }
}
