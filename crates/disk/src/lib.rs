//! Disk image formats: raw, qcow2 with backing files, import of vmdk/vdi/vhd/vhdx, conversion.
//!
//! Each format lives in its own folder and implements the small capability traits below:
//! every format reads ([`BlockRead`]); raw and qcow2 also write ([`BlockWrite`]), discard
//! ([`Discard`]) and resize ([`Resizable`]). [`Image`] is the opened image of any format, and
//! hands out the capabilities it has.

mod blockmap;
mod error;
mod host;
pub mod storage;

pub mod convert;
#[doc(hidden)]
pub mod fuzzing;
pub mod p2v;
pub mod qcow2;
pub mod raw;
pub mod size;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use error::{DiskError, Result};
pub use host::is_zero;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use storage::{FileStorage, Storage};

/// How a run of guest bytes is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentKind {
    /// Bytes stored somewhere in the chain (may still happen to be zero).
    Data,
    /// Reads as zeros without storing anything.
    Zero,
}

/// A run of guest bytes with one storage kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub kind: ExtentKind,
    /// 0 = this image, 1 = its backing file, ...
    pub depth: u32,
    /// Host file offset of the data, when it is stored contiguously in one file.
    pub offset: Option<u64>,
}

/// The virtual size of a disk.
pub trait DiskSize {
    fn size(&self) -> u64;
}

/// Reading guest data and its allocation map.
pub trait BlockRead: DiskSize + Send {
    /// Fills `buf` with guest bytes from `offset`. The range must lie inside the disk.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// The extent starting at `offset`, at most `max_len` long (and never past the disk end).
    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent>;
    /// What `disk info` prints.
    fn info(&self) -> ImageInfo;
}

/// Writing guest data.
pub trait BlockWrite: BlockRead {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes every acknowledged write durable.
    fn flush(&mut self) -> Result<()>;
}

/// Dropping data: the range reads as zeros afterwards and its space is freed where possible.
pub trait Discard {
    fn discard(&mut self, offset: u64, len: u64) -> Result<()>;
}

/// Changing the virtual size.
pub trait Resizable {
    fn resize(&mut self, new_size: u64) -> Result<()>;
}

/// The supported formats, named as qemu-img names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
    Vmdk,
    Vdi,
    /// VHD (qemu calls it "vpc").
    Vpc,
    Vhdx,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
            Format::Vpc => "vpc",
            Format::Vhdx => "vhdx",
        }
    }

    pub fn parse(s: &str) -> Result<Format> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vmdk" => Format::Vmdk,
            "vdi" => Format::Vdi,
            "vpc" | "vhd" => Format::Vpc,
            "vhdx" => Format::Vhdx,
            other => {
                return Err(DiskError::Invalid(format!(
                    "unknown image format '{other}' (known: raw, qcow2, vmdk, vdi, vpc/vhd, vhdx)"
                )))
            }
        })
    }

    /// Whether corefour can create and write images of this format.
    pub fn writable(self) -> bool {
        matches!(self, Format::Raw | Format::Qcow2)
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What `disk info` reports about one image (and, nested, its backing chain).
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub filename: String,
    pub format: Format,
    pub virtual_size: u64,
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub format_specific: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_image: Option<Box<ImageInfo>>,
}

impl ImageInfo {
    pub(crate) fn new(path: &Path, format: Format, virtual_size: u64) -> Self {
        ImageInfo {
            filename: path.display().to_string(),
            format,
            virtual_size,
            actual_size: actual_size(path),
            cluster_size: None,
            backing_filename: None,
            backing_filename_format: None,
            format_specific: BTreeMap::new(),
            backing_image: None,
        }
    }
}

fn actual_size(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// An opened image of any format.
pub enum Image {
    Raw(raw::RawImage),
    Qcow2(Box<qcow2::Qcow2>),
    Vmdk(vmdk::Vmdk),
    Vdi(vdi::Vdi),
    Vpc(vhd::Vhd),
    Vhdx(vhdx::Vhdx),
}

impl Image {
    pub fn format(&self) -> Format {
        match self {
            Image::Raw(_) => Format::Raw,
            Image::Qcow2(_) => Format::Qcow2,
            Image::Vmdk(_) => Format::Vmdk,
            Image::Vdi(_) => Format::Vdi,
            Image::Vpc(_) => Format::Vpc,
            Image::Vhdx(_) => Format::Vhdx,
        }
    }

    pub fn reader(&mut self) -> &mut dyn BlockRead {
        match self {
            Image::Raw(i) => i,
            Image::Qcow2(i) => &mut **i,
            Image::Vmdk(i) => i,
            Image::Vdi(i) => i,
            Image::Vpc(i) => i,
            Image::Vhdx(i) => i,
        }
    }

    fn read_only(&self) -> DiskError {
        DiskError::ReadOnly {
            path: PathBuf::from(self.info_ref().filename),
            format: self.format().name(),
        }
    }

    fn info_ref(&self) -> ImageInfo {
        match self {
            Image::Raw(i) => i.info(),
            Image::Qcow2(i) => i.info(),
            Image::Vmdk(i) => i.info(),
            Image::Vdi(i) => i.info(),
            Image::Vpc(i) => i.info(),
            Image::Vhdx(i) => i.info(),
        }
    }

    pub fn writer(&mut self) -> Result<&mut dyn BlockWrite> {
        match self {
            Image::Raw(i) => Ok(i),
            Image::Qcow2(i) => Ok(&mut **i),
            _ => Err(self.read_only()),
        }
    }

    pub fn discarder(&mut self) -> Result<&mut dyn Discard> {
        match self {
            Image::Raw(i) => Ok(i),
            Image::Qcow2(i) => Ok(&mut **i),
            _ => Err(self.read_only()),
        }
    }

    pub fn resizer(&mut self) -> Result<&mut dyn Resizable> {
        match self {
            Image::Raw(i) => Ok(i),
            Image::Qcow2(i) => Ok(&mut **i),
            _ => Err(self.read_only()),
        }
    }
}

impl DiskSize for Image {
    fn size(&self) -> u64 {
        match self {
            Image::Raw(i) => i.size(),
            Image::Qcow2(i) => i.size(),
            Image::Vmdk(i) => i.size(),
            Image::Vdi(i) => i.size(),
            Image::Vpc(i) => i.size(),
            Image::Vhdx(i) => i.size(),
        }
    }
}

impl BlockRead for Image {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.reader().read_at(buf, offset)
    }
    fn extent(&mut self, offset: u64, max_len: u64) -> Result<Extent> {
        self.reader().extent(offset, max_len)
    }
    fn info(&self) -> ImageInfo {
        self.info_ref()
    }
}

/// How to open an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct Open {
    /// `None` probes the format from the file's contents.
    pub format: Option<Format>,
    pub write: bool,
}

/// Backing chains deeper than this are refused (qemu has no limit; a loop is caught earlier,
/// this bounds a pathological but loop-free chain).
pub const MAX_CHAIN_DEPTH: usize = 256;

/// Opens the image at `path`, with its backing chain (read-only).
pub fn open(path: &Path, opts: Open) -> Result<Image> {
    let mut chain = Vec::new();
    open_in_chain(path, opts, &mut chain)
}

/// Opens one link of a backing chain; `chain` holds the canonical paths of the images above it.
pub(crate) fn open_in_chain(path: &Path, opts: Open, chain: &mut Vec<PathBuf>) -> Result<Image> {
    let canon = std::fs::canonicalize(path).map_err(|e| DiskError::io(path, "open", 0, e))?;
    if chain.contains(&canon) {
        let mut names: Vec<String> = chain.iter().map(|p| p.display().to_string()).collect();
        names.push(canon.display().to_string());
        return Err(DiskError::BackingLoop {
            path: path.to_path_buf(),
            chain: names.join(" -> "),
        });
    }
    if chain.len() >= MAX_CHAIN_DEPTH {
        return Err(DiskError::Invalid(format!(
            "{}: backing chain deeper than {MAX_CHAIN_DEPTH} images",
            path.display()
        )));
    }
    chain.push(canon);
    let file = OpenOptions::new()
        .read(true)
        .write(opts.write)
        .open(path)
        .map_err(|e| DiskError::io(path, "open", 0, e))?;
    let storage: Box<dyn Storage> = Box::new(FileStorage::new(file));
    let format = match opts.format {
        Some(f) => f,
        None => probe(&*storage, path)?,
    };
    if opts.write && !format.writable() {
        return Err(DiskError::ReadOnly {
            path: path.to_path_buf(),
            format: format.name(),
        });
    }
    let img = open_storage(path, format, storage, opts.write, chain)?;
    chain.pop();
    Ok(img)
}

/// Opens an image held by `storage` (a file, or memory in tests and fuzzing).
pub fn open_storage(
    path: &Path,
    format: Format,
    storage: Box<dyn Storage>,
    write: bool,
    chain: &mut Vec<PathBuf>,
) -> Result<Image> {
    Ok(match format {
        Format::Raw => Image::Raw(raw::RawImage::open(path, storage, write)?),
        Format::Qcow2 => Image::Qcow2(Box::new(qcow2::Qcow2::open(path, storage, write, chain)?)),
        Format::Vmdk => Image::Vmdk(vmdk::Vmdk::open(path, storage)?),
        Format::Vdi => Image::Vdi(vdi::Vdi::open(path, storage)?),
        Format::Vpc => Image::Vpc(vhd::Vhd::open(path, storage)?),
        Format::Vhdx => Image::Vhdx(vhdx::Vhdx::open(path, storage)?),
    })
}

/// Guesses the format from signatures; anything unrecognised is raw, as with qemu-img.
pub fn probe(storage: &dyn Storage, path: &Path) -> Result<Format> {
    let mut head = [0u8; 512];
    let n =
        storage::read_full(storage, &mut head, 0).map_err(|e| DiskError::io(path, "read", 0, e))?;
    let head = &head[..n];
    if head.starts_with(b"QFI\xfb") {
        return Ok(Format::Qcow2);
    }
    if head.starts_with(b"KDMV") || vmdk::looks_like_descriptor(head) {
        return Ok(Format::Vmdk);
    }
    if head.len() >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe] {
        return Ok(Format::Vdi);
    }
    if head.starts_with(b"vhdxfile") {
        return Ok(Format::Vhdx);
    }
    if head.starts_with(b"conectix") {
        return Ok(Format::Vpc);
    }
    let len = storage
        .len()
        .map_err(|e| DiskError::io(path, "stat", 0, e))?;
    if len >= 512 && !storage.is_block_device() {
        let mut tail = [0u8; 512];
        let n = storage::read_full(storage, &mut tail, len - 512)
            .map_err(|e| DiskError::io(path, "read", len - 512, e))?;
        if n == 512 && tail.starts_with(b"conectix") && vhd::fixed_footer_plausible(&tail, len) {
            return Ok(Format::Vpc);
        }
    }
    Ok(Format::Raw)
}

/// Checks that `[offset, offset+len)` lies in a disk of `size` bytes.
pub(crate) fn check_range(path: &Path, offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange {
            path: path.to_path_buf(),
            offset,
            len,
            size,
        }),
    }
}
