//! Writing an archive.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::manifest::{
    check_name, Encoding, Manifest, ManifestMember, FORMAT, MANIFEST_NAME, VERSION,
};
use crate::sparse::Encoder;
use crate::{hex, io_err, ArchiveError};

/// The tar name of a sparse-encoded member: the importer sees the encoding before the manifest
/// (which comes last, after every member has been hashed on the way in).
pub(crate) const SPARSE_SUFFIX: &str = ".c4sparse";

pub enum Source {
    File(PathBuf),
    Bytes(Vec<u8>),
}

pub struct Member {
    /// Where it unpacks, relative to the staging directory.
    pub name: String,
    pub kind: String,
    pub source: Source,
    /// Store holes as holes (disks, memory files).
    pub sparse: bool,
}

/// Hashes and counts what passes through.
struct Tap<'a, R> {
    inner: R,
    hash: Sha256,
    count: u64,
    progress: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Tap<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        (self.progress)(n as u64);
        Ok(n)
    }
}

fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o600);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    h
}

/// Bytes the members will occupy in the tar, for a progress bar's length.
pub fn total_len(members: &[Member]) -> u64 {
    members
        .iter()
        .map(|m| match &m.source {
            Source::Bytes(b) => b.len() as u64,
            Source::File(p) => File::open(p)
                .and_then(|f| {
                    if m.sparse {
                        Encoder::new(f).map(|e| e.len())
                    } else {
                        f.metadata().map(|md| md.len())
                    }
                })
                .unwrap_or(0),
        })
        .sum()
}

/// Writes `members` and then the manifest to `out` (through `out.partial` and a rename, so a
/// failed export never leaves a plausible-looking archive). `progress` gets byte counts.
pub fn export(
    out: &Path,
    members: &[Member],
    meta: serde_json::Value,
    progress: &mut dyn FnMut(u64),
) -> Result<Manifest, ArchiveError> {
    let mut seen = std::collections::BTreeSet::new();
    for m in members {
        check_name(&m.name)?;
        if m.name == MANIFEST_NAME || !seen.insert(m.name.clone()) {
            return Err(ArchiveError::BadMember {
                name: m.name.clone(),
                reason: "duplicate or reserved name".into(),
            });
        }
    }
    let partial = out.with_extension("partial");
    let result = write_all(&partial, members, meta, progress);
    match result {
        Ok(manifest) => {
            std::fs::rename(&partial, out).map_err(io_err("rename into place", out))?;
            Ok(manifest)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

fn write_all(
    path: &Path,
    members: &[Member],
    meta: serde_json::Value,
    progress: &mut dyn FnMut(u64),
) -> Result<Manifest, ArchiveError> {
    let file = File::create(path).map_err(io_err("create", path))?;
    let mut z = zstd::Encoder::new(file, 3).map_err(io_err("start zstd for", path))?;
    z.include_checksum(true)
        .map_err(io_err("configure zstd for", path))?;
    let mut tar = tar::Builder::new(z);
    let mut listed = Vec::with_capacity(members.len());
    for m in members {
        let (reader, size, logical, encoding, tar_name): (
            Box<dyn Read>,
            u64,
            u64,
            Encoding,
            String,
        ) = match &m.source {
            Source::Bytes(b) => (
                Box::new(std::io::Cursor::new(b.clone())),
                b.len() as u64,
                b.len() as u64,
                Encoding::Plain,
                m.name.clone(),
            ),
            Source::File(p) => {
                let f = File::open(p).map_err(io_err("open", p))?;
                let logical = f.metadata().map_err(io_err("stat", p))?.len();
                if m.sparse {
                    let e = Encoder::new(f).map_err(io_err("map extents of", p))?;
                    let size = e.len();
                    (
                        Box::new(e),
                        size,
                        logical,
                        Encoding::Sparse,
                        format!("{}{SPARSE_SUFFIX}", m.name),
                    )
                } else {
                    (
                        Box::new(f),
                        logical,
                        logical,
                        Encoding::Plain,
                        m.name.clone(),
                    )
                }
            }
        };
        let mut tap = Tap {
            inner: reader.take(size),
            hash: Sha256::new(),
            count: 0,
            progress,
        };
        tar.append_data(&mut header(size), &tar_name, &mut tap)
            .map_err(io_err("write member", Path::new(&m.name)))?;
        if tap.count != size {
            return Err(ArchiveError::BadMember {
                name: m.name.clone(),
                reason: format!(
                    "changed size while exported ({size} expected, {} read)",
                    tap.count
                ),
            });
        }
        listed.push(ManifestMember {
            name: m.name.clone(),
            kind: m.kind.clone(),
            encoding,
            size,
            logical_size: logical,
            sha256: hex(&tap.hash.finalize()),
        });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        meta,
        members: listed,
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| ArchiveError::BadManifest(e.to_string()))?;
    tar.append_data(
        &mut header(json.len() as u64),
        MANIFEST_NAME,
        json.as_slice(),
    )
    .map_err(io_err("write manifest to", path))?;
    let z = tar.into_inner().map_err(io_err("finish tar", path))?;
    let mut file = z.finish().map_err(io_err("finish zstd", path))?;
    file.flush().map_err(io_err("flush", path))?;
    file.sync_all().map_err(io_err("fsync", path))?;
    Ok(manifest)
}
