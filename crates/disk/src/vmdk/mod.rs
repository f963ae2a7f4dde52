//! stub
use crate::storage::Storage;
use crate::{BlockRead, DiskSize, Extent, ImageInfo, Result};
use std::path::Path;
pub struct Vmdk {
    size: u64,
}
impl Vmdk {
    pub fn open(path: &Path, _s: Box<dyn Storage>) -> Result<Self> {
        Err(crate::DiskError::unsupported(path, "vmdk", "todo"))
    }
}
impl DiskSize for Vmdk {
    fn size(&self) -> u64 {
        self.size
    }
}
impl BlockRead for Vmdk {
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
pub fn looks_like_descriptor(_b: &[u8]) -> bool {
    false
}
