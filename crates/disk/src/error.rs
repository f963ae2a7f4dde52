//! The one error type of the disk layer. Every variant names the image it concerns, and where an
//! offset is known, the offset, so an operator can find the damaged structure with a hex dump.

use std::io;
use std::path::{Path, PathBuf};

/// What went wrong with a disk image. Callers match on the variant (the kind); the message is
/// meant for a human.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    /// The host file could not be read or written; the errno is kept in `source`.
    #[error("{}: {op} at offset {offset:#x} failed", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// A structure inside the image is inconsistent or points outside the file.
    #[error("{}: corrupt {format} image at offset {offset:#x}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        format: &'static str,
        offset: u64,
        reason: String,
    },
    /// A valid image that uses a feature this implementation does not handle.
    #[error("{}: unsupported {format} feature: {feature}", path.display())]
    Unsupported {
        path: PathBuf,
        format: &'static str,
        feature: String,
    },
    /// The backing-file chain refers back to an image already in it.
    #[error("{}: backing file loop: {chain}", path.display())]
    BackingLoop { path: PathBuf, chain: String },
    /// No known format signature was found.
    #[error("{}: unknown image format (pass -f raw if it is a raw disk)", path.display())]
    UnknownFormat { path: PathBuf },
    /// A write to an image opened read-only or of a read-only format.
    #[error("{}: {format} images are opened read-only here; convert to qcow2 or raw to modify", path.display())]
    ReadOnly { path: PathBuf, format: &'static str },
    /// A guest access outside the virtual disk.
    #[error("{}: access at {offset:#x}+{len:#x} is beyond the virtual size {size:#x}", path.display())]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A bad argument from the caller (size, option, format name).
    #[error("{0}")]
    Invalid(String),
}

/// Result alias for the disk layer.
pub type Result<T> = std::result::Result<T, DiskError>;

impl DiskError {
    pub(crate) fn io(path: &Path, op: &'static str, offset: u64, source: io::Error) -> Self {
        DiskError::Io {
            path: path.to_path_buf(),
            op,
            offset,
            source,
        }
    }

    pub(crate) fn corrupt(
        path: &Path,
        format: &'static str,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        DiskError::Corrupt {
            path: path.to_path_buf(),
            format,
            offset,
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(
        path: &Path,
        format: &'static str,
        feature: impl Into<String>,
    ) -> Self {
        DiskError::Unsupported {
            path: path.to_path_buf(),
            format,
            feature: feature.into(),
        }
    }

    /// The OS error number behind this error, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            DiskError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
