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
/// (bytes done, total). Nothing is flushed: callers that need durability call `dst.flush()`.
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

/// Converts the image `src` into a new image at `out` of `format`. With `sync`, the output is
/// flushed to stable storage before returning (qemu-img's default, cache=unsafe, does not).
pub fn convert(
    src: &mut dyn BlockRead,
    out: &Path,
    format: Format,
    qcow2: &CreateOptions,
    sync: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    let size = src.size();
    let mut dst = create_output(out, format, size, qcow2)?;
    let gran = match format {
        Format::Qcow2 => qcow2.cluster_size as usize,
        _ => 4096,
    };
    let stats = copy(src, &mut *dst, gran, progress)?;
    if sync {
        dst.flush()?;
    }
    Ok(stats)
}

/// Data chunks of the source, from its map: (guest offset, length), each at most CHUNK.
fn data_chunks(src: &mut dyn BlockRead) -> Result<Vec<(u64, usize)>> {
    let size = src.size();
    let mut chunks = Vec::new();
    let mut off = 0u64;
    while off < size {
        let e = src.extent(off, size - off)?;
        if e.length == 0 {
            return Err(DiskError::Invalid(format!(
                "source map returned an empty extent at {off:#x}"
            )));
        }
        let end = off + e.length;
        if e.kind == ExtentKind::Data {
            while off < end {
                let n = (end - off).min(CHUNK - off % CHUNK);
                // Merge with the previous chunk when contiguous and still small.
                match chunks.last_mut() {
                    Some((o, l)) if *o + *l as u64 == off && (*l as u64) + n <= CHUNK => {
                        *l += n as usize
                    }
                    _ => chunks.push((off, n as usize)),
                }
                off += n;
            }
        }
        off = end;
    }
    Ok(chunks)
}

/// Converts the image at `src` (opened with `open`, once per reader thread) into a new image
/// at `out`. Several threads read in parallel, as qemu-img keeps several requests in flight;
/// one writer writes in guest order, so a new qcow2 is laid out sequentially. (Writing raw
/// output from the readers too measured no faster: writers of one file share its inode lock.)
#[allow(clippy::too_many_arguments)]
pub fn convert_path(
    src: &Path,
    open: crate::Open,
    out: &Path,
    format: Format,
    qcow2: &CreateOptions,
    sync: bool,
    threads: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let open = crate::Open {
        write: false,
        ..open
    };
    let mut first = crate::open(src, open)?;
    let size = crate::DiskSize::size(&first);
    let chunks = data_chunks(first.reader())?;
    drop(first);
    let data_total: u64 = chunks.iter().map(|c| c.1 as u64).sum();
    let mut out_img = match format {
        Format::Qcow2 => {
            let mut q = Qcow2::create(out, Some(size), qcow2)?;
            // Data plus its L2 tables and refcounts (well under 1/64 of the data).
            q.reserve_tail(data_total + data_total / 64 + (4 << 20))?;
            Output::Qcow2(Box::new(q))
        }
        Format::Raw => Output::Raw(RawImage::create(out, size)?),
        other => {
            return Err(DiskError::Invalid(format!(
                "cannot write {other} images; use -O raw or -O qcow2"
            )))
        }
    };
    let threads = threads.clamp(1, 16).min(chunks.len().max(1));
    let gran = match format {
        Format::Qcow2 => qcow2.cluster_size as usize,
        _ => 4096,
    };
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let mut stats = ConvertStats {
        virtual_size: size,
        ..Default::default()
    };
    // Credits bound how far readers run ahead of the in-order writer.
    let window = threads * 2;
    let (credit_tx, credit_rx) = mpsc::sync_channel::<()>(window);
    for _ in 0..window {
        let _ = credit_tx.send(());
    }
    let credit_rx = std::sync::Mutex::new(credit_rx);
    let pool: std::sync::Mutex<Vec<Vec<u8>>> = Default::default();
    let (tx, rx) = mpsc::sync_channel::<Result<(usize, Vec<u8>)>>(window);
    let result = std::thread::scope(|s| -> Result<()> {
        let dst = out_img.writer();
        let mut handles = Vec::new();
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, abort, chunks, credit_rx, pool) =
                (&next, &abort, &chunks, &credit_rx, &pool);
            handles.push(s.spawn(move || {
                let mut img = match crate::open(src, open) {
                    Ok(i) => i,
                    Err(e) => {
                        abort.store(true, Ordering::Relaxed);
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                loop {
                    if abort.load(Ordering::Relaxed) {
                        return;
                    }
                    // The writer goes in guest order: wait for a credit before taking a chunk.
                    let got = credit_rx.lock().map(|r| r.recv().is_ok()).unwrap_or(false);
                    if !got {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(off, len)) = chunks.get(i) else {
                        return;
                    };
                    // Reuse buffers: fresh 2 MiB allocations are mmap/munmap pairs whose page
                    // faults and TLB shootdowns cost more than the copy itself.
                    let mut buf = pool
                        .lock()
                        .ok()
                        .and_then(|mut p| p.pop())
                        .unwrap_or_default();
                    buf.resize(len, 0);
                    if let Err(e) = img.read_at(&mut buf, off) {
                        abort.store(true, Ordering::Relaxed);
                        let _ = tx.send(Err(e));
                        return;
                    }
                    let msg = Ok((i, buf));
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
            }));
        }
        drop(tx);
        let mut pending: std::collections::BTreeMap<usize, Vec<u8>> = Default::default();
        let mut next_write = 0usize;
        let mut done = 0u64;
        let mut result = Ok(());
        for msg in rx.iter() {
            match msg {
                Err(e) => {
                    abort.store(true, Ordering::Relaxed);
                    result = Err(e);
                    break;
                }
                Ok((i, buf)) => {
                    stats.bytes_read += chunks[i].1 as u64;
                    {
                        pending.insert(i, buf);
                        while let Some(b) = pending.remove(&next_write) {
                            let off = chunks[next_write].0;
                            match write_nonzero(dst, &b, off, gran) {
                                Ok(n) => stats.bytes_written += n,
                                Err(e) => {
                                    abort.store(true, Ordering::Relaxed);
                                    result = Err(e);
                                    break;
                                }
                            }
                            done += b.len() as u64;
                            if let Ok(mut p) = pool.lock() {
                                p.push(b);
                            }
                            next_write += 1;
                            let _ = credit_tx.send(());
                        }
                        if result.is_err() {
                            break;
                        }
                    }
                    // Progress in guest bytes: the data done, scaled over the whole disk.
                    if let Some(p) = (done as u128 * size as u128).checked_div(data_total as u128) {
                        progress(p as u64, size);
                    }
                }
            }
        }
        abort.store(true, Ordering::Relaxed);
        drop(credit_tx);
        drop(rx);
        for h in handles {
            let _ = h.join();
        }
        result
    });
    if let Output::Qcow2(q) = &mut out_img {
        q.trim_tail()?;
    }
    result?;
    progress(size, size);
    if sync {
        out_img.writer().flush()?;
    }
    Ok(stats)
}

enum Output {
    Raw(RawImage),
    Qcow2(Box<Qcow2>),
}

impl Output {
    fn writer(&mut self) -> &mut dyn BlockWrite {
        match self {
            Output::Raw(r) => r,
            Output::Qcow2(q) => &mut **q,
        }
    }
}
