//! `convert`: copy any readable image into a new raw or qcow2 image. Holes and zero extents of
//! the source (from its map) are skipped, and zero blocks inside data extents are not written,
//! so a sparse source stays sparse. A reader thread overlaps source reads with output writes.

use crate::qcow2::{CreateOptions, Qcow2};
use crate::raw::RawImage;
use crate::{is_zero, BlockRead, BlockWrite, DiskError, ExtentKind, Format, Result};
use std::path::Path;
use std::sync::mpsc;

/// Bytes per read/write request: large sequential I/O, few syscalls.
const CHUNK: u64 = 2 << 20;
/// Buffers in flight between the reader and the writer.
const DEPTH: usize = 4;

/// What a conversion did.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ConvertStats {
    pub virtual_size: u64,
    /// Bytes read from data extents of the source.
    pub bytes_read: u64,
    /// Bytes written to the output.
    pub bytes_written: u64,
}

/// Creates an empty output image of `format`.
pub fn create_output(
    path: &Path,
    format: Format,
    size: u64,
    qcow2: &CreateOptions,
) -> Result<Box<dyn BlockWrite>> {
    Ok(match format {
        Format::Raw => Box::new(RawImage::create(path, size)?),
        Format::Qcow2 => Box::new(Qcow2::create(path, Some(size), qcow2)?),
        other => {
            return Err(DiskError::Invalid(format!(
                "cannot write {other} images; use -O raw or -O qcow2"
            )))
        }
    })
}

enum Msg {
    Data(u64, Vec<u8>),
    /// Everything before this offset has been handed over.
    Skipped(u64),
}

/// Copies `src` into the freshly created (all-zero) `dst`. `zero_granularity` is the block size
/// for zero detection (the output's cluster size for qcow2, 4 KiB for raw). `progress` gets
/// (bytes done, total).
pub fn copy(
    src: &mut dyn BlockRead,
    dst: &mut dyn BlockWrite,
    zero_granularity: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    let size = src.size();
    let mut stats = ConvertStats {
        virtual_size: size,
        ..Default::default()
    };
    let (tx, rx) = mpsc::sync_channel::<Result<Msg>>(DEPTH);
    let (recycle_tx, recycle_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| -> Result<()> {
        let reader = s.spawn(move || -> u64 {
            let mut read = 0u64;
            let mut off = 0u64;
            while off < size {
                let e = match src.extent(off, size - off) {
                    Ok(e) if e.length > 0 => e,
                    Ok(_) => {
                        let _ = tx.send(Err(DiskError::Invalid(format!(
                            "source map returned an empty extent at {off:#x}"
                        ))));
                        return read;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return read;
                    }
                };
                let end = off + e.length;
                if e.kind == ExtentKind::Zero {
                    off = end;
                    if tx.send(Ok(Msg::Skipped(off))).is_err() {
                        return read;
                    }
                    continue;
                }
                while off < end {
                    let n = (end - off).min(CHUNK - off % CHUNK) as usize;
                    let mut buf = recycle_rx.try_recv().unwrap_or_default();
                    buf.resize(n, 0);
                    if let Err(e) = src.read_at(&mut buf, off) {
                        let _ = tx.send(Err(e));
                        return read;
                    }
                    read += n as u64;
                    if tx.send(Ok(Msg::Data(off, buf))).is_err() {
                        return read;
                    }
                    off += n as u64;
                }
            }
            read
        });
        let mut result = Ok(());
        for msg in rx.iter() {
            match msg {
                Err(e) => {
                    result = Err(e);
                    break;
                }
                Ok(Msg::Skipped(done)) => progress(done, size),
                Ok(Msg::Data(off, buf)) => {
                    match write_nonzero(dst, &buf, off, zero_granularity) {
                        Ok(n) => stats.bytes_written += n,
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                    progress(off + buf.len() as u64, size);
                    let _ = recycle_tx.send(buf);
                }
            }
        }
        drop(rx);
        stats.bytes_read = reader.join().unwrap_or(0);
        result
    })?;
    dst.flush()?;
    Ok(stats)
}

/// Writes the runs of `buf` that are not all-zero blocks; returns bytes written.
fn write_nonzero(dst: &mut dyn BlockWrite, buf: &[u8], off: u64, gran: usize) -> Result<u64> {
    let gran = gran.max(512);
    let mut written = 0u64;
    let mut i = 0usize;
    // Blocks are aligned to the guest offset so they match output clusters.
    while i < buf.len() {
        let block_end = |p: usize| -> usize {
            let g = off as usize + p;
            (p + gran - g % gran).min(buf.len())
        };
        // Skip zero blocks.
        let mut j = i;
        while j < buf.len() {
            let e = block_end(j);
            if !is_zero(&buf[j..e]) {
                break;
            }
            j = e;
        }
        if j >= buf.len() {
            break;
        }
        // Take non-zero blocks.
        let mut k = j;
        while k < buf.len() {
            let e = block_end(k);
            if is_zero(&buf[k..e]) {
                break;
            }
            k = e;
        }
        dst.write_at(&buf[j..k], off + j as u64)?;
        written += (k - j) as u64;
        i = k;
    }
    Ok(written)
}

/// Converts the image `src` into a new image at `out` of `format`.
pub fn convert(
    src: &mut dyn BlockRead,
    out: &Path,
    format: Format,
    qcow2: &CreateOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    let size = src.size();
    let mut dst = create_output(out, format, size, qcow2)?;
    let gran = match format {
        Format::Qcow2 => qcow2.cluster_size as usize,
        _ => 4096,
    };
    copy(src, &mut *dst, gran, progress)
}
