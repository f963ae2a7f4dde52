//! Which parts of each virtio-blk disk the guest wrote, for live block mirroring
//! (`vm migrate --copy-storage`) and for anyone who wants an incremental copy (the VMM API's
//! `/vm/disks/dirty`).
//!
//! It wraps the block backend from outside instead of living in `blk.rs`'s request path: a disk
//! registers itself when it opens (`register`), and the request path makes one call,
//! [`mark`], after every write, write-zeroes or discard has reached the backend. Marking after
//! the write is what makes a fetch-and-clear race-free: a write that completes after a reader
//! cleared the map sets its bit again, so the reader that copied the chunk before that write
//! landed copies it once more in its next round. When no disk is tracked, `mark` is one relaxed
//! atomic load.
//!
//! The map has one bit per [`CHUNK`] bytes of guest-visible disk (not of the host file: a qcow2
//! image's clusters move around, the guest's sectors do not), so the same map drives a copy of
//! any writable format. One registry per process, like the device page log in `dirty`: a VMM
//! process runs one VM, and the request path has no handle to the VMM.
//!
//! The registry also lets the VMM switch a disk to another image while the devices are parked
//! (`swap_backend`): a snapshot's same-instant qcow2 overlay. A formatted image is replaced
//! inside the lock the device shares; a raw disk gets an image the request path picks up
//! through [`reopened`] at its next batch (one relaxed load while no disk was switched).
//!
//! [`DiskIo`] reads and writes the guest-visible bytes of a registered disk beside the device:
//! a raw file through its own descriptor (the device may hold its file with O_DIRECT), a
//! formatted image through the device's own image handle (a second handle would keep a second,
//! diverging copy of the image's metadata).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Bytes per dirty bit: large enough that the map of a 1 TiB disk is 2 MiB, small enough that
/// a 4 KiB write costs 64 KiB of copy.
pub const CHUNK: u64 = 64 << 10;

/// The device's formatted image, shared with it.
pub type SharedImage = Arc<Mutex<corefour_disk::Image>>;

#[derive(Debug, thiserror::Error)]
pub enum BlkDirtyError {
    #[error("disk {path} is already tracked by {owner}")]
    Busy { path: PathBuf, owner: &'static str },
    #[error("disk {path} is not tracked: start tracking first")]
    NotTracked { path: PathBuf },
    #[error("disk {path}: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: corefour_disk::DiskError,
    },
    #[error("disk {path}: cannot flush it: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {path}: the image lock was poisoned by an earlier failure")]
    Poisoned { path: PathBuf },
    #[error("disk {path}: {off}+{len} lies outside its {size} bytes")]
    Range {
        path: PathBuf,
        off: u64,
        len: u64,
        size: u64,
    },
}

/// One registered disk.
pub struct TrackedDisk {
    /// The descriptor the device does its I/O on: how `mark` finds the disk.
    fd: i32,
    path: PathBuf,
    size: u64,
    image: Option<SharedImage>,
    /// A raw disk switched to an image (`swap_backend`): the device serves it from then on.
    reopened: RwLock<Option<SharedImage>>,
    /// The file the guest's disk lives in now (the registered path until a swap).
    current: RwLock<PathBuf>,
    /// `Some(owner, bits)` while tracking.
    map: RwLock<Option<(&'static str, Vec<AtomicU64>)>>,
}

/// Whether any disk is tracked: the fast path of `mark`.
static ANY: AtomicBool = AtomicBool::new(false);
/// Whether any raw disk was switched to an image: the fast path of `reopened`.
static ANY_REOPENED: AtomicBool = AtomicBool::new(false);
static DISKS: RwLock<Vec<Arc<TrackedDisk>>> = RwLock::new(Vec::new());

fn disks() -> std::sync::RwLockReadGuard<'static, Vec<Arc<TrackedDisk>>> {
    DISKS.read().unwrap_or_else(|e| e.into_inner())
}

fn refresh_any() {
    let any = disks().iter().any(|d| d.tracking());
    ANY.store(any, Ordering::SeqCst);
}

/// Called by the device when it opens its disk: `fd` is the descriptor its requests name in
/// [`mark`], `size` the guest-visible bytes, `image` the format layer for non-raw images.
/// A disk registered again under the same path replaces the old entry.
pub fn register(fd: i32, path: &Path, size: u64, image: Option<SharedImage>) {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let d = Arc::new(TrackedDisk {
        fd,
        current: RwLock::new(path.clone()),
        path,
        size,
        image,
        reopened: RwLock::new(None),
        map: RwLock::new(None),
    });
    let mut all = DISKS.write().unwrap_or_else(|e| e.into_inner());
    all.retain(|o| o.path != d.path && o.fd != fd);
    all.push(d);
}

/// The hook in the request path: bytes `off..off+len` of the disk on `fd` were written (or
/// zeroed, or discarded). Call it after the backend returned, whatever it returned.
#[inline]
pub fn mark(fd: i32, off: u64, len: u64) {
    if !ANY.load(Ordering::Relaxed) || len == 0 {
        return;
    }
    for d in disks().iter() {
        if d.fd == fd {
            d.mark(off, len);
        }
    }
}

/// The request path's second hook: the image a raw disk on `fd` was switched to, if any.
/// Read once per batch of requests, so a switch made while the device is parked applies to
/// every request after it.
#[inline]
pub fn reopened(fd: i32) -> Option<SharedImage> {
    if !ANY_REOPENED.load(Ordering::Relaxed) {
        return None;
    }
    disks()
        .iter()
        .find(|d| d.fd == fd)
        .and_then(|d| d.reopened.read().unwrap_or_else(|e| e.into_inner()).clone())
}

/// The registered disk at `path` (compared after resolving links).
pub fn find(path: &Path) -> Option<Arc<TrackedDisk>> {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    disks().iter().find(|d| d.path == path).cloned()
}

/// Every registered disk, in registration (config) order.
pub fn all() -> Vec<Arc<TrackedDisk>> {
    disks().clone()
}

fn chunks(size: u64) -> u64 {
    size.div_ceil(CHUNK)
}

impl TrackedDisk {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Guest-visible bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file the guest's disk lives in now.
    pub fn current_path(&self) -> PathBuf {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The image the device serves this disk from, if not the raw file.
    fn shared(&self) -> Option<SharedImage> {
        self.image.clone().or_else(|| {
            self.reopened
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        })
    }

    /// Makes everything the device wrote to the current file durable.
    pub fn flush(&self) -> Result<(), BlkDirtyError> {
        let path = self.current_path();
        match self.shared() {
            Some(img) => {
                let mut g = img
                    .lock()
                    .map_err(|_| BlkDirtyError::Poisoned { path: path.clone() })?;
                g.writer()
                    .and_then(|w| w.flush())
                    .map_err(|source| BlkDirtyError::Image { path, source })
            }
            None => {
                // SAFETY: fdatasync on the device's descriptor, which lives as long as the
                // device; no memory is passed.
                if unsafe { libc::fdatasync(self.fd) } != 0 {
                    return Err(BlkDirtyError::Sync {
                        path,
                        source: std::io::Error::last_os_error(),
                    });
                }
                Ok(())
            }
        }
    }

    /// Switches the disk to `new` (at `new_path`), flushing the current file first. The
    /// devices must be parked: a request batch in flight would finish on the old file. Returns
    /// what `swap_back` needs to undo it.
    pub fn swap_backend(
        &self,
        new: corefour_disk::Image,
        new_path: &Path,
    ) -> Result<Swapped, BlkDirtyError> {
        self.flush()?;
        let old_path = self.current_path();
        let old = match self.shared() {
            Some(img) => {
                let mut g = img.lock().map_err(|_| BlkDirtyError::Poisoned {
                    path: old_path.clone(),
                })?;
                Some(std::mem::replace(&mut *g, new))
            }
            None => {
                *self.reopened.write().unwrap_or_else(|e| e.into_inner()) =
                    Some(Arc::new(Mutex::new(new)));
                ANY_REOPENED.store(true, Ordering::SeqCst);
                None
            }
        };
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = new_path.to_path_buf();
        Ok(Swapped { old, old_path })
    }

    /// Undoes a `swap_backend` (the devices still parked, nothing written since).
    pub fn swap_back(&self, s: Swapped) {
        match s.old {
            Some(old) => {
                if let Some(img) = self.shared() {
                    if let Ok(mut g) = img.lock() {
                        *g = old;
                    }
                }
            }
            None => *self.reopened.write().unwrap_or_else(|e| e.into_inner()) = None,
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = s.old_path;
    }

    pub fn tracking(&self) -> bool {
        self.map.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Who tracks it now, if anyone.
    pub fn owner(&self) -> Option<&'static str> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(o, _)| *o)
    }

    fn mark(&self, off: u64, len: u64) {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let Some((_, bits)) = map.as_ref() else {
            return;
        };
        let first = off / CHUNK;
        let last = off.saturating_add(len - 1) / CHUNK;
        for c in first..=last.min(chunks(self.size).saturating_sub(1)) {
            if let Some(w) = bits.get((c / 64) as usize) {
                w.fetch_or(1 << (c % 64), Ordering::SeqCst);
            }
        }
    }

    /// Starts tracking with an empty map, for `owner` (named in the error another would-be
    /// owner gets).
    pub fn start(&self, owner: &'static str) -> Result<(), BlkDirtyError> {
        {
            let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
            if let Some((o, _)) = map.as_ref() {
                return Err(BlkDirtyError::Busy {
                    path: self.path.clone(),
                    owner: o,
                });
            }
            let words = chunks(self.size).div_ceil(64);
            *map = Some((owner, (0..words).map(|_| AtomicU64::new(0)).collect()));
        }
        ANY.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Stops tracking (by `owner` only) and frees the map.
    pub fn stop(&self, owner: &'static str) {
        {
            let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
            if map.as_ref().is_some_and(|(o, _)| *o == owner) {
                *map = None;
            }
        }
        refresh_any();
    }

    /// Returns the chunks written since tracking started or since the last call, and clears
    /// them: one bit per [`CHUNK`], LSB first.
    pub fn take(&self, owner: &'static str) -> Result<Vec<u64>, BlkDirtyError> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        match map.as_ref() {
            Some((o, bits)) if *o == owner => {
                Ok(bits.iter().map(|w| w.swap(0, Ordering::SeqCst)).collect())
            }
            Some((o, _)) => Err(BlkDirtyError::Busy {
                path: self.path.clone(),
                owner: o,
            }),
            None => Err(BlkDirtyError::NotTracked {
                path: self.path.clone(),
            }),
        }
    }

    /// Byte ranges `(offset, len)` of the chunks set in `bits`, merged where they touch and
    /// clipped to the disk.
    pub fn ranges(&self, bits: &[u64]) -> Vec<(u64, u64)> {
        let n = chunks(self.size);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (wi, &w) in bits.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let b = u64::from(w.trailing_zeros());
                w &= w - 1;
                let c = wi as u64 * 64 + b;
                if c >= n {
                    break;
                }
                let off = c * CHUNK;
                let len = CHUNK.min(self.size - off);
                match out.last_mut() {
                    Some((o, l)) if *o + *l == off => *l += len,
                    _ => out.push((off, len)),
                }
            }
        }
        out
    }

    /// Opens the guest-visible bytes for a copy; `write` for the receiving side.
    pub fn io(&self, write: bool) -> Result<DiskIo, BlkDirtyError> {
        let io = match self.shared() {
            Some(img) => Io::Shared(img),
            None => Io::Own(
                corefour_disk::open(
                    &self.path,
                    corefour_disk::Open {
                        format: Some(corefour_disk::Format::Raw),
                        write,
                    },
                )
                .map_err(|source| BlkDirtyError::Image {
                    path: self.path.clone(),
                    source,
                })?,
            ),
        };
        Ok(DiskIo {
            io,
            path: self.path.clone(),
            size: self.size,
        })
    }
}

enum Io {
    Own(corefour_disk::Image),
    Shared(SharedImage),
}

/// What `swap_back` restores.
pub struct Swapped {
    old: Option<corefour_disk::Image>,
    old_path: PathBuf,
}

/// The guest-visible bytes of one disk (see the module comment).
pub struct DiskIo {
    io: Io,
    path: PathBuf,
    size: u64,
}

impl DiskIo {
    pub fn size(&self) -> u64 {
        self.size
    }

    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut corefour_disk::Image) -> corefour_disk::Result<T>,
    ) -> Result<T, BlkDirtyError> {
        let path = &self.path;
        let r = match &mut self.io {
            Io::Own(i) => f(i),
            Io::Shared(s) => {
                let mut g = s
                    .lock()
                    .map_err(|_| BlkDirtyError::Poisoned { path: path.clone() })?;
                f(&mut g)
            }
        };
        r.map_err(|source| BlkDirtyError::Image {
            path: path.clone(),
            source,
        })
    }

    fn check(&self, off: u64, len: u64) -> Result<(), BlkDirtyError> {
        if off.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(BlkDirtyError::Range {
                path: self.path.clone(),
                off,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    pub fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<(), BlkDirtyError> {
        self.check(off, buf.len() as u64)?;
        self.with(|i| corefour_disk::BlockRead::read_at(i, buf, off))
    }

    pub fn write_at(&mut self, buf: &[u8], off: u64) -> Result<(), BlkDirtyError> {
        self.check(off, buf.len() as u64)?;
        self.with(|i| i.writer()?.write_at(buf, off))
    }

    pub fn flush(&mut self) -> Result<(), BlkDirtyError> {
        self.with(|i| i.writer()?.flush())
    }

    /// The next run at or after `off` that may hold data, at most `max` long: `None` past the
    /// last one. Holes (raw) and unallocated clusters (qcow2) are skipped: they read as zeros,
    /// which a fresh copy already holds.
    pub fn next_data(&mut self, off: u64, max: u64) -> Result<Option<(u64, u64)>, BlkDirtyError> {
        let size = self.size;
        self.with(|i| {
            let mut at = off;
            while at < size {
                let e = corefour_disk::BlockRead::extent(i, at, size - at)?;
                if e.length == 0 {
                    break;
                }
                if e.kind == corefour_disk::ExtentKind::Data {
                    return Ok(Some((at, e.length.min(max))));
                }
                at += e.length;
            }
            Ok(None)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(dir: &Path, name: &str, size: u64) -> PathBuf {
        let p = dir.join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    // One test: the registry is per process and the test harness runs tests in parallel.
    #[test]
    fn marks_after_start_are_taken_once_and_io_reads_writes_and_skips_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = disk(dir.path(), "a.raw", 10 * CHUNK + 512);
        let f = std::fs::File::open(&p).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        register(fd, &p, 10 * CHUNK + 512, None);
        let d = find(&p).unwrap();
        mark(fd, 0, 4096); // not tracking: ignored
        d.start("test").unwrap();
        assert!(matches!(d.start("other"), Err(BlkDirtyError::Busy { .. })));
        assert!(matches!(d.take("other"), Err(BlkDirtyError::Busy { .. })));
        mark(fd, CHUNK - 1, 2); // chunks 0 and 1
        mark(fd, 9 * CHUNK, 2 * CHUNK); // 9 and the short tail chunk 10, clipped
        mark(fd, u64::MAX - 5, 100); // past the end: nothing, no overflow
        mark(fd + 1000, 5 * CHUNK, 1); // another descriptor
        let bits = d.take("test").unwrap();
        assert_eq!(bits, vec![0b110_0000_0011]);
        assert_eq!(
            d.ranges(&bits),
            vec![(0, 2 * CHUNK), (9 * CHUNK, CHUNK + 512)]
        );
        assert_eq!(d.take("test").unwrap(), vec![0]);
        d.stop("other");
        assert!(d.tracking());
        d.stop("test");
        assert!(!d.tracking());
        assert!(matches!(
            d.take("test"),
            Err(BlkDirtyError::NotTracked { .. })
        ));

        let mut io = d.io(true).unwrap();
        assert_eq!(io.next_data(0, CHUNK).unwrap(), None);
        io.write_at(&[7u8; 4096], 3 * CHUNK).unwrap();
        io.flush().unwrap();
        let (at, len) = io.next_data(0, CHUNK).unwrap().unwrap();
        assert!(at <= 3 * CHUNK && at + len > 3 * CHUNK, "{at} {len}");
        let mut b = [0u8; 8];
        io.read_at(&mut b, 3 * CHUNK + 10).unwrap();
        assert_eq!(b, [7u8; 8]);
        assert!(matches!(
            io.write_at(&[1u8; 1024], 10 * CHUNK),
            Err(BlkDirtyError::Range { .. })
        ));
        assert!(matches!(
            io.read_at(&mut b, u64::MAX - 2),
            Err(BlkDirtyError::Range { .. })
        ));
    }
}
