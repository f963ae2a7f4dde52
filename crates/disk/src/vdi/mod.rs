//! stub
use crate::storage::Storage;
use crate::{BlockRead, DiskSize, Extent, ImageInfo, Result};
use std::path::Path;
pub struct Vdi {
    size: u64,
}
impl Vdi {
    pub fn open(path: &Path, _s: Box<dyn Storage>) -> Result<Self> {
        Err(crate::DiskError::unsupported(path, "vdi", "todo"))
    }
}
impl DiskSize for Vdi {
    fn size(&self) -> u64 {
        self.size
    }
}
impl BlockRead for Vdi {
    fn read_at(&mut self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        todo!()
    }
    fn extent(&mut self, _offset: u64, _max_len: u64) -> Result<Extent> {
        todo!()
    }
    fn info(&self) -> ImageInfo {
        todo!()
    }
}
