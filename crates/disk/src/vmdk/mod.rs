//! VMDK import (read-only): monolithic sparse (including streamOptimized, whose grains are
//! deflate-compressed), and descriptor files naming FLAT, SPARSE and ZERO extents (monolithicFlat,
//! twoGbMaxExtentSparse/Flat, vmfs).

mod descriptor;
mod sparse;

use crate::host::HostFile;
use crate::storage::{FileStorage, Storage};
use crate::{
    check_range, BlockRead, DiskError, DiskSize, Extent, ExtentKind, Format, ImageInfo, Result,
};
pub use descriptor::{looks_like_descriptor, Descriptor, ExtentLine, ExtentType};
use sparse::SparseExtent;
use std::path::Path;

enum Backend {
    Flat { host: HostFile, offset: u64 },
    Sparse(Box<SparseExtent>),
    Zero,
}

struct VmdkExtent {
    /// Guest byte where this extent starts.
    start: u64,
    len: u64,
    backend: Backend,
}

pub struct Vmdk {
    path: std::path::PathBuf,
    size: u64,
    create_type: String,
    extents: Vec<VmdkExtent>,
}

/// Descriptor files are text and small; a bigger one is not a descriptor.
const MAX_DESCRIPTOR: usize = 1 << 20;

impl Vmdk {
    pub fn open(path: &Path, storage: Box<dyn Storage>) -> Result<Vmdk> {
        let mut magic = [0u8; 4];
        let n = crate::storage::read_full(&*storage, &mut magic, 0)
            .map_err(|e| DiskError::io(path, "read", 0, e))?;
        if n == 4 && &magic == sparse::MAGIC {
            let host = HostFile::new(path, "vmdk", storage);
            let sp = SparseExtent::open(host)?;
            let create_type = if sp.compressed() {
                "streamOptimized"
            } else {
                "monolithicSparse"
            };
            let len = sp.capacity();
            return Ok(Vmdk {
                path: path.to_path_buf(),
                size: len,
                create_type: create_type.into(),
                extents: vec![VmdkExtent {
                    start: 0,
                    len,
                    backend: Backend::Sparse(Box::new(sp)),
                }],
            });
        }
        let flen = storage
            .len()
            .map_err(|e| DiskError::io(path, "stat", 0, e))?;
        if flen as usize > MAX_DESCRIPTOR {
            return Err(DiskError::corrupt(
                path,
                "vmdk",
                0,
                "neither a sparse extent (KDMV) nor a text descriptor",
            ));
        }
        let mut text = vec![0u8; flen as usize];
        crate::storage::read_full(&*storage, &mut text, 0)
            .map_err(|e| DiskError::io(path, "read", 0, e))?;
        let desc = Descriptor::parse(path, &text)?;
        Self::from_descriptor(path, desc)
    }

    fn from_descriptor(path: &Path, desc: Descriptor) -> Result<Vmdk> {
        if desc.has_parent {
            return Err(DiskError::unsupported(
                path,
                "vmdk",
                "delta disks with a parent (consolidate the snapshot chain first)",
            ));
        }
        let mut extents = Vec::new();
        let mut start = 0u64;
        for line in &desc.extents {
            let len = line
                .sectors
                .checked_mul(512)
                .ok_or_else(|| DiskError::corrupt(path, "vmdk", 0, "extent size overflows"))?;
            let backend = match line.kind {
                ExtentType::Zero => Backend::Zero,
                ExtentType::Flat | ExtentType::Sparse => {
                    let fname = line.file.as_deref().unwrap_or("");
                    let fpath = crate::qcow2::resolve_backing(path, fname);
                    let file = std::fs::File::open(&fpath)
                        .map_err(|e| DiskError::io(&fpath, "open extent", 0, e))?;
                    let host = HostFile::new(&fpath, "vmdk", Box::new(FileStorage::new(file)));
                    if line.kind == ExtentType::Flat {
                        Backend::Flat {
                            host,
                            offset: line.offset.saturating_mul(512),
                        }
                    } else {
                        let sp = SparseExtent::open(host)?;
                        if sp.capacity() < len {
                            return Err(DiskError::corrupt(
                                &fpath,
                                "vmdk",
                                12,
                                format!(
                                    "sparse extent holds {} bytes, descriptor says {len}",
                                    sp.capacity()
                                ),
                            ));
                        }
                        Backend::Sparse(Box::new(sp))
                    }
                }
            };
            extents.push(VmdkExtent {
                start,
                len,
                backend,
            });
            start = start
                .checked_add(len)
                .ok_or_else(|| DiskError::corrupt(path, "vmdk", 0, "disk size overflows"))?;
        }
        if extents.is_empty() {
            return Err(DiskError::corrupt(
                path,
                "vmdk",
                0,
                "descriptor lists no extents",
            ));
        }
        Ok(Vmdk {
            path: path.to_path_buf(),
            size: start,
            create_type: desc.create_type,
            extents,
        })
    }

    fn find(&self, offset: u64) -> usize {
        self.extents
            .partition_point(|e| e.start + e.len <= offset)
            .min(self.extents.len() - 1)
    }
}

impl DiskSize for Vmdk {
    fn size(&self) -> u64 {
        self.size
    }
}

impl BlockRead for Vmdk {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.path, offset, buf.len() as u64, self.size)?;
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let i = self.find(off);
            let ext = &mut self.extents[i];
            let rel = off - ext.start;
            let n = ((ext.len - rel) as usize).min(buf.len() - pos);
            let out = &mut buf[pos..pos + n];
            match &mut ext.backend {
                Backend::Zero => out.fill(0),
                Backend::Flat { host, offset } => host.read_data(out, *offset + rel)?,
                Backend::Sparse(sp) => sp.read(out, rel)?,
            }
            pos += n;
        }
        Ok(())
    }

    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent> {
        let max_len = max_len.min(self.size.saturating_sub(offset));
        let i = self.find(offset);
        let ext = &mut self.extents[i];
        let rel = offset.saturating_sub(ext.start);
        let limit = max_len.min(ext.len.saturating_sub(rel));
        let (kind, len, host) = match &mut ext.backend {
            Backend::Zero => (ExtentKind::Zero, limit, None),
            Backend::Flat { offset: o, .. } => (ExtentKind::Data, limit, Some(*o + rel)),
            Backend::Sparse(sp) => sp.extent(rel, limit)?,
        };
        Ok(Extent {
            start: offset,
            length: len,
            kind,
            depth: 0,
            offset: host,
        })
    }

    fn info(&self) -> ImageInfo {
        let mut info = ImageInfo::new(&self.path, Format::Vmdk, self.size);
        info.format_specific
            .insert("create-type".into(), self.create_type.clone());
        info.format_specific
            .insert("extents".into(), self.extents.len().to_string());
        if let Some(VmdkExtent {
            backend: Backend::Sparse(sp),
            ..
        }) = self.extents.first()
        {
            info.cluster_size = Some(sp.grain_size());
        }
        info
    }
}
