//! Reading an archive: unpack into staging while hashing, then verify against the manifest.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::export::SPARSE_SUFFIX;
use crate::manifest::{check_name, Encoding, Manifest, MANIFEST_NAME};
use crate::sparse::Decoder;
use crate::{hex, io_err, ArchiveError};

const MAX_MANIFEST: u64 = 16 << 20;

struct Got {
    encoding: Encoding,
    size: u64,
    logical: u64,
    sha256: String,
}

/// Hashes what is written through it.
struct Tap<'a, W> {
    inner: W,
    hash: Sha256,
    count: u64,
    progress: &'a mut dyn FnMut(u64),
}

impl<W: Write> Write for Tap<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        (self.progress)(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Unpacks `archive` into the new directory `staging` and verifies every member. On success
/// the caller owns `staging` and everything in it is exactly what the exporter hashed; on any
/// failure `staging` is removed and the error says why.
pub fn import(
    archive: &Path,
    staging: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<Manifest, ArchiveError> {
    if staging.exists() {
        return Err(ArchiveError::StagingExists(staging.display().to_string()));
    }
    std::fs::create_dir_all(staging).map_err(io_err("create", staging))?;
    let r = unpack(archive, staging, progress);
    if r.is_err() {
        let _ = std::fs::remove_dir_all(staging);
    }
    r
}

fn stream_err(archive: &Path, e: std::io::Error) -> ArchiveError {
    ArchiveError::Stream(archive.display().to_string(), e.to_string())
}

fn unpack(
    archive: &Path,
    staging: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<Manifest, ArchiveError> {
    let file = File::open(archive).map_err(io_err("open", archive))?;
    let z = zstd::Decoder::new(file).map_err(|e| stream_err(archive, e))?;
    let mut tar = tar::Archive::new(z);
    let mut got: BTreeMap<String, Got> = BTreeMap::new();
    let mut manifest: Option<Manifest> = None;
    for entry in tar.entries().map_err(|e| stream_err(archive, e))? {
        let mut entry = entry.map_err(|e| stream_err(archive, e))?;
        let raw = entry.path_bytes().into_owned();
        let tar_name = String::from_utf8(raw).map_err(|_| ArchiveError::BadMember {
            name: "(non-UTF-8)".into(),
            reason: "member name is not UTF-8".into(),
        })?;
        if manifest.is_some() {
            return Err(ArchiveError::BadMember {
                name: tar_name,
                reason: "member after the manifest".into(),
            });
        }
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(ArchiveError::BadMember {
                name: tar_name,
                reason: format!(
                    "only regular files are allowed, this is {:?}",
                    entry.header().entry_type()
                ),
            });
        }
        if tar_name == MANIFEST_NAME {
            if entry.size() > MAX_MANIFEST {
                return Err(ArchiveError::BadManifest(format!(
                    "{} bytes is more than a manifest needs",
                    entry.size()
                )));
            }
            let mut json = Vec::new();
            entry
                .read_to_end(&mut json)
                .map_err(|e| stream_err(archive, e))?;
            let m: Manifest = serde_json::from_slice(&json)
                .map_err(|e| ArchiveError::BadManifest(e.to_string()))?;
            m.validate()?;
            manifest = Some(m);
            continue;
        }
        let (name, encoding) = match tar_name.strip_suffix(SPARSE_SUFFIX) {
            Some(n) => (n.to_string(), Encoding::Sparse),
            None => (tar_name.clone(), Encoding::Plain),
        };
        check_name(&name)?;
        if got.contains_key(&name) {
            return Err(ArchiveError::BadMember {
                name,
                reason: "appears twice".into(),
            });
        }
        let dest = staging.join(&name);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }
        let out = File::create(&dest).map_err(io_err("create", &dest))?;
        let (size, sha256, file) = match encoding {
            Encoding::Plain => {
                let mut tap = Tap {
                    inner: out,
                    hash: Sha256::new(),
                    count: 0,
                    progress,
                };
                std::io::copy(&mut entry, &mut tap).map_err(|e| stream_err(archive, e))?;
                (tap.count, hex(&tap.hash.finalize()), tap.inner)
            }
            Encoding::Sparse => {
                let mut tap = Tap {
                    inner: Decoder::new(out),
                    hash: Sha256::new(),
                    count: 0,
                    progress,
                };
                std::io::copy(&mut entry, &mut tap).map_err(|e| ArchiveError::BadMember {
                    name: name.clone(),
                    reason: e.to_string(),
                })?;
                let f = tap.inner.finish().map_err(|e| ArchiveError::BadMember {
                    name: name.clone(),
                    reason: e.to_string(),
                })?;
                (tap.count, hex(&tap.hash.finalize()), f)
            }
        };
        let logical = file.metadata().map_err(io_err("stat", &dest))?.len();
        got.insert(
            name,
            Got {
                encoding,
                size,
                logical,
                sha256,
            },
        );
    }
    // Read the stream to its end: the tar reader stops at the end-of-archive blocks, and a
    // stream cut after them (or with a bad frame checksum) must still be refused.
    std::io::copy(&mut tar.into_inner(), &mut std::io::sink())
        .map_err(|e| stream_err(archive, e))?;
    let manifest = manifest.ok_or(ArchiveError::NoManifest)?;
    for m in &manifest.members {
        let Some(g) = got.remove(&m.name) else {
            return Err(ArchiveError::Missing(m.name.clone()));
        };
        if g.sha256 != m.sha256 {
            return Err(ArchiveError::Checksum {
                name: m.name.clone(),
                expected: m.sha256.clone(),
                actual: g.sha256,
            });
        }
        if g.encoding != m.encoding || g.size != m.size || g.logical != m.logical_size {
            return Err(ArchiveError::BadMember {
                name: m.name.clone(),
                reason: format!(
                    "manifest says {:?} {} bytes ({} unpacked), archive holds {:?} {} ({})",
                    m.encoding, m.size, m.logical_size, g.encoding, g.size, g.logical
                ),
            });
        }
    }
    if let Some(extra) = got.keys().next() {
        return Err(ArchiveError::BadMember {
            name: extra.clone(),
            reason: "not listed in the manifest".into(),
        });
    }
    Ok(manifest)
}
