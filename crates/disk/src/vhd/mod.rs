//! stub
use crate::storage::Storage;
use crate::{BlockRead, DiskSize, Extent, ImageInfo, Result};
use std::path::Path;
pub struct Vhd {
    size: u64,
}
impl Vhd {
    pub fn open(path: &Path, _s: Box<dyn Storage>) -> Result<Self> {
        Err(crate::DiskError::unsupported(path, "vhd", "todo"))
    }
}
impl DiskSize for Vhd {
    fn size(&self) -> u64 {
        self.size
    }
}
impl BlockRead for Vhd {
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
pub fn fixed_footer_plausible(_b: &[u8], _l: u64) -> bool {
    false
}
