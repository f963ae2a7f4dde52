//! The export archive of a VM: `tar` compressed with `zstd` (frame checksums on), holding the
//! VM's config, its disks (sparse-aware), optionally a memory snapshot, and last a
//! `manifest.json` with the size and SHA-256 of every member.
//!
//! Import unpacks into a staging directory while hashing, then checks the manifest: every
//! member listed, none missing, none extra, every size and SHA-256 equal. Only then does it
//! return; the caller registers the VM by moving the staging directory into place. A truncated,
//! corrupted or tampered archive is refused with the reason, and the staging directory removed.
//!
//! Disks go in as a small "sparse" encoding (see `sparse`) so a 10 GiB disk holding 200 MiB is
//! read and stored as 200 MiB, and comes back out as a sparse file. The tar crate writes no GNU
//! sparse headers, hence the encoding of our own.

mod export;
mod import;
mod manifest;
pub mod sparse;

pub use export::{export, total_len, Member, Source};
pub use import::import;
pub use manifest::{Encoding, Manifest, ManifestMember, FORMAT, MANIFEST_NAME, VERSION};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("archive {0} is truncated or its compressed stream is corrupt: {1}")]
    Stream(String, String),
    #[error("archive has no {MANIFEST_NAME}: it is truncated or not a corefour export")]
    NoManifest,
    #[error("archive manifest is invalid: {0}")]
    BadManifest(String),
    #[error("archive format {found} version {version} is not supported (this corefour reads {FORMAT} version {VERSION})")]
    Version { found: String, version: u32 },
    #[error("archive member {name:?} refused: {reason}")]
    BadMember { name: String, reason: String },
    #[error("archive member {name} fails its checksum (manifest {expected}, content {actual}): the archive was modified or corrupted")]
    Checksum {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("archive member {0} is listed in the manifest but missing: the archive is truncated")]
    Missing(String),
    #[error("staging directory {0} already exists; remove it or pick another name")]
    StagingExists(String),
}

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// Lowercase hex of a digest.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
