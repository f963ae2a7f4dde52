//! An image's host file together with its path and format name, so every read and write
//! produces an error that names the image and offset.

use crate::error::{DiskError, Result};
use crate::storage::{read_full, Storage};
use std::path::{Path, PathBuf};

pub(crate) struct HostFile {
    pub path: PathBuf,
    pub format: &'static str,
    pub storage: Box<dyn Storage>,
}

impl HostFile {
    pub fn new(path: &Path, format: &'static str, storage: Box<dyn Storage>) -> Self {
        HostFile {
            path: path.to_path_buf(),
            format,
            storage,
        }
    }

    /// Reads a metadata structure that must lie entirely inside the file.
    pub fn read_exact(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        let n = read_full(&*self.storage, buf, offset)
            .map_err(|e| DiskError::io(&self.path, "read", offset, e))?;
        if n < buf.len() {
            let len = self.storage.len().unwrap_or(0);
            return Err(self.corrupt(
                offset,
                format!(
                    "{what} ({} bytes) extends past the end of the file ({len} bytes); the image is truncated",
                    buf.len()
                ),
            ));
        }
        Ok(())
    }

    /// Reads guest data; bytes past the end of the file read as zeros (sparse tails).
    pub fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = read_full(&*self.storage, buf, offset)
            .map_err(|e| DiskError::io(&self.path, "read", offset, e))?;
        buf[n..].fill(0);
        Ok(())
    }

    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.storage
            .write_all_at(buf, offset)
            .map_err(|e| DiskError::io(&self.path, "write", offset, e))
    }

    pub fn len(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| DiskError::io(&self.path, "stat", 0, e))
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        self.storage
            .set_len(len)
            .map_err(|e| DiskError::io(&self.path, "truncate", len, e))
    }

    pub fn sync(&self) -> Result<()> {
        self.storage
            .sync()
            .map_err(|e| DiskError::io(&self.path, "fsync", 0, e))
    }

    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.storage
            .punch_hole(offset, len)
            .map_err(|e| DiskError::io(&self.path, "punch hole", offset, e))
    }

    pub fn corrupt(&self, offset: u64, reason: impl Into<String>) -> DiskError {
        DiskError::corrupt(&self.path, self.format, offset, reason)
    }

    pub fn unsupported(&self, feature: impl Into<String>) -> DiskError {
        DiskError::unsupported(&self.path, self.format, feature)
    }
}

pub(crate) fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
pub(crate) fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub(crate) fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}
#[allow(dead_code)]
pub(crate) fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
#[allow(dead_code)]
pub(crate) fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
#[allow(dead_code)]
pub(crate) fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// True if every byte is zero; written over u64 words because convert calls it on every chunk.
pub fn is_zero(buf: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u64 has no invalid bit patterns, so viewing aligned bytes as u64 is sound.
        unsafe { buf.align_to::<u64>() }
    };
    pre.iter().all(|b| *b == 0)
        && post.iter().all(|b| *b == 0)
        && mid.chunks(8).all(|c| c.iter().fold(0, |a, w| a | w) == 0)
}
