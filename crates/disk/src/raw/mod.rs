//! Raw images: the guest disk byte for byte. Holes in the host file are the zero extents
//! (found with SEEK_DATA/SEEK_HOLE) and discard punches new ones.

use crate::host::HostFile;
use crate::storage::Storage;
use crate::{
    check_range, BlockRead, BlockWrite, Discard, DiskSize, Extent, ExtentKind, Format, ImageInfo,
    Resizable, Result,
};
use std::path::Path;

pub struct RawImage {
    host: HostFile,
    size: u64,
    writable: bool,
}

impl RawImage {
    pub fn open(path: &Path, storage: Box<dyn Storage>, writable: bool) -> Result<Self> {
        let host = HostFile::new(path, "raw", storage);
        let size = host.len()?;
        Ok(RawImage {
            host,
            size,
            writable,
        })
    }

    /// Creates (or truncates) a sparse raw image of `size` bytes.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| crate::DiskError::io(path, "create", 0, e))?;
        let img = RawImage::open(path, Box::new(crate::storage::FileStorage::new(file)), true)?;
        img.host.set_len(size)?;
        Ok(RawImage { size, ..img })
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(crate::DiskError::Invalid(format!(
                "{}: image was opened read-only",
                self.host.path.display()
            )))
        }
    }
}

impl DiskSize for RawImage {
    fn size(&self) -> u64 {
        self.size
    }
}

impl BlockRead for RawImage {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.host.path, offset, buf.len() as u64, self.size)?;
        self.host.read_data(buf, offset)
    }

    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent> {
        let end = offset.saturating_add(max_len).min(self.size);
        let zero = |len| Extent {
            start: offset,
            length: len,
            kind: ExtentKind::Zero,
            depth: 0,
            offset: None,
        };
        let next = self
            .host
            .storage
            .next_data(offset)
            .map_err(|e| crate::DiskError::io(&self.host.path, "seek data", offset, e))?;
        Ok(match next {
            None => zero(end.saturating_sub(offset)),
            Some((s, _)) if s > offset => zero(s.min(end) - offset),
            Some((_, e)) => Extent {
                start: offset,
                length: match e.min(end).saturating_sub(offset) {
                    0 => end - offset,
                    l => l,
                },
                kind: ExtentKind::Data,
                depth: 0,
                offset: Some(offset),
            },
        })
    }

    fn info(&self) -> ImageInfo {
        ImageInfo::new(&self.host.path, Format::Raw, self.size)
    }
}

impl BlockWrite for RawImage {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        check_range(&self.host.path, offset, buf.len() as u64, self.size)?;
        self.host.write(buf, offset)
    }

    fn flush(&mut self) -> Result<()> {
        self.host.sync()
    }
}

impl Discard for RawImage {
    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        check_range(&self.host.path, offset, len, self.size)?;
        self.host.punch_hole(offset, len)
    }
}

impl Resizable for RawImage {
    fn resize(&mut self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        self.host.set_len(new_size)?;
        self.size = new_size;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_map_and_punch_hole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.raw");
        let mut img = RawImage::create(&p, 8 << 20).unwrap();
        img.write_at(&[7u8; 65536], 1 << 20).unwrap();
        let e = img.extent(0, u64::MAX).unwrap();
        assert_eq!(e.kind, ExtentKind::Zero);
        assert_eq!(e.length, 1 << 20);
        let e = img.extent(1 << 20, u64::MAX).unwrap();
        assert_eq!(e.kind, ExtentKind::Data);
        assert!(e.length >= 65536);
        img.discard(1 << 20, 65536).unwrap();
        let mut buf = [1u8; 16];
        img.read_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(buf, [0u8; 16]);
        assert_eq!(img.extent(0, u64::MAX).unwrap().length, 8 << 20);
        assert!(img.read_at(&mut buf, (8 << 20) - 8).is_err());
    }
}
