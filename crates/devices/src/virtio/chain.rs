//! A descriptor chain checked against guest memory before any device acts on it.
//!
//! virtio-queue already bounds a chain's length (a loop ends after `queue size` descriptors) and
//! validates indirect tables; this adds what devices need on top: readable buffers come before
//! writable ones, every buffer lies inside guest memory, and the total length fits a u32.

use virtio_queue::DescriptorChain;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress, Permissions,
};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor at {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadAfterWrite,
    #[error("descriptor chain totals more than 4 GiB")]
    TooLong,
    #[error("descriptor chain is malformed: {0}")]
    Malformed(&'static str),
    #[error("request needs {need} bytes, the chain has {have}")]
    TooShort { need: usize, have: usize },
}

/// One guest buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A chain split into its readable and writable buffers. Parsing never fails: the first
/// problem is kept in `error` and the device decides (blk still tries to write its status
/// byte, net drops the frame). Buffers outside guest memory are kept so the index of the
/// status byte stays right; copying into them fails harmlessly.
#[derive(Debug, Default)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Buf>,
    pub writable: Vec<Buf>,
    pub error: Option<ChainError>,
    /// Host address of each readable / writable buffer (same index) as resolved while
    /// parsing, 0 where the buffer is not inside one region. Kept as integers so a chain
    /// stays `Send`; they point into the memory the chain was parsed against.
    readable_host: Vec<usize>,
    writable_host: Vec<usize>,
}

impl Chain {
    pub fn parse(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> Self {
        let mut out = Chain::default();
        out.parse_into(mem, chain);
        out
    }

    /// As [`Chain::parse`], reusing this chain's buffers (no allocation on the hot path once
    /// they have grown to the longest chain seen).
    pub fn parse_into(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) {
        self.begin(chain.head_index());
        let mut total: u32 = 0;
        for d in chain {
            if !self.push(mem, &mut total, d.addr(), d.len(), d.is_write_only()) {
                break;
            }
        }
    }

    /// Starts a new chain at descriptor `head`, keeping the buffers' capacity.
    pub(crate) fn begin(&mut self, head: u16) {
        self.head = head;
        self.readable.clear();
        self.writable.clear();
        self.readable_host.clear();
        self.writable_host.clear();
        self.error = None;
    }

    /// Adds one descriptor with the checks every device relies on; `total` carries the chain's
    /// length so far. Returns false when the chain must end here (its length overflowed).
    #[inline]
    pub(crate) fn push(
        &mut self,
        mem: &GuestMemoryMmap,
        total: &mut u32,
        addr: GuestAddress,
        len: u32,
        write_only: bool,
    ) -> bool {
        let Some(t) = total.checked_add(len) else {
            self.error.get_or_insert(ChainError::TooLong);
            return false;
        };
        *total = t;
        let host = host_ptr(mem, addr, len as usize);
        if host.is_none()
            && !GuestMemory::check_range(mem, addr, len as usize, Permissions::ReadWrite)
        {
            self.error
                .get_or_insert(ChainError::OutOfMemory { addr: addr.0, len });
        }
        let host = host.map_or(0, |p| p as usize);
        let b = Buf { addr, len };
        if write_only {
            // Before the device writes it: migration and diff snapshots resend it.
            super::dirty::mark(addr.0, u64::from(len));
            self.writable.push(b);
            self.writable_host.push(host);
        } else {
            if !self.writable.is_empty() {
                self.error.get_or_insert(ChainError::ReadAfterWrite);
            }
            self.readable.push(b);
            self.readable_host.push(host);
        }
        true
    }

    /// The first `N` readable bytes (a request header) when the first readable buffer holds
    /// them in one region; None otherwise (the caller falls back to [`read_from`]). Saves the
    /// region lookup and the generic copy per request on the blk hot path.
    #[inline]
    pub fn read_head<const N: usize>(&self) -> Option<[u8; N]> {
        let (b, &h) = (self.readable.first()?, self.readable_host.first()?);
        if h == 0 || (b.len as usize) < N {
            return None;
        }
        // SAFETY: `h` is the host address of `b`, resolved by `push` against the memory the
        // chain was parsed from (kept mapped by the device's GuestMemoryMmap), and `b` holds
        // at least N bytes. Unaligned: the guest may place its buffer anywhere.
        Some(unsafe { std::ptr::read_unaligned(h as *const [u8; N]) })
    }

    /// Writes `v` at the last writable byte (a virtio-blk status byte) when the last
    /// writable buffer lies in one region; false otherwise (the caller falls back to
    /// [`write_to`]).
    #[inline]
    pub fn put_last_writable(&self, v: u8) -> bool {
        let (Some(b), Some(&h)) = (self.writable.last(), self.writable_host.last()) else {
            return false;
        };
        if h == 0 || b.len == 0 {
            return false;
        }
        // SAFETY: as in `read_head`: `b.len - 1` is inside the buffer `h` points to.
        unsafe { std::ptr::write_volatile((h as *mut u8).add(b.len as usize - 1), v) };
        true
    }

    /// As [`iovecs_into`] over this chain's readable or writable buffers, from the host
    /// addresses resolved while parsing (no region lookup per buffer); buffers that were not
    /// resolved go through [`iovecs_into`].
    pub fn iovecs_into(
        &self,
        mem: &GuestMemoryMmap,
        writable: bool,
        skip: usize,
        count: usize,
        out: &mut Vec<libc::iovec>,
    ) -> Result<(), ChainError> {
        let (bufs, hosts, access) = if writable {
            (&self.writable, &self.writable_host, Permissions::Write)
        } else {
            (&self.readable, &self.readable_host, Permissions::Read)
        };
        if hosts.contains(&0) {
            return iovecs_into(mem, bufs, skip, count, access, out);
        }
        out.clear();
        for_each_piece(bufs, skip, count, |i, off, take, _| {
            out.push(libc::iovec {
                iov_base: (hosts[i] + off) as *mut libc::c_void,
                iov_len: take,
            });
            true
        });
        Ok(())
    }

    pub fn readable_len(&self) -> usize {
        self.readable.iter().map(|b| b.len as usize).sum()
    }

    pub fn writable_len(&self) -> usize {
        self.writable.iter().map(|b| b.len as usize).sum()
    }
}

/// The host address of `len` bytes at `addr` when they lie inside one region of `mem`.
///
/// vm-memory's `Bytes` and `get_slices` walk a per-access slice iterator that cost more than
/// the 4 KiB page-cache read it surrounds (`corefour bench io`); the hot paths here resolve a
/// buffer to one host pointer instead and fall back to vm-memory only for a buffer that
/// straddles two regions.
#[inline]
pub fn host_ptr(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) -> Option<*mut u8> {
    let region = GuestMemoryBackend::find_region(mem, addr)?;
    let off = addr.0 - region.start_addr().0;
    if off.checked_add(len as u64)? > region.len() {
        return None;
    }
    region.get_host_address(MemoryRegionAddress(off)).ok()
}

/// Calls `f(addr, len, done)` for the pieces covering `count` bytes of `bufs` from byte
/// `skip`; `done` is the number of bytes before this piece. Stops when `f` returns false.
fn for_each_range(
    bufs: &[Buf],
    skip: usize,
    count: usize,
    mut f: impl FnMut(GuestAddress, usize, usize) -> bool,
) {
    for_each_piece(bufs, skip, count, |i, off, take, done| {
        f(GuestAddress(bufs[i].addr.0 + off as u64), take, done)
    });
}

/// As [`for_each_range`], naming each piece by its buffer's index and the offset in it:
/// `f(index, offset, len, done)`.
#[inline]
fn for_each_piece(
    bufs: &[Buf],
    mut skip: usize,
    mut count: usize,
    mut f: impl FnMut(usize, usize, usize, usize) -> bool,
) {
    let mut done = 0;
    for (i, b) in bufs.iter().enumerate() {
        if count == 0 {
            break;
        }
        let len = b.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = (len - skip).min(count);
        if !f(i, skip, take, done) {
            return;
        }
        done += take;
        skip = 0;
        count -= take;
    }
}

/// Copies from the buffers (starting `skip` bytes in) into `out`; returns bytes copied.
pub fn read_from(mem: &GuestMemoryMmap, bufs: &[Buf], skip: usize, out: &mut [u8]) -> usize {
    let mut copied = 0;
    for_each_range(bufs, skip, out.len(), |addr, len, done| {
        let dst = &mut out[done..done + len];
        match host_ptr(mem, addr, len) {
            // SAFETY: `p` covers `len` bytes of mapped guest memory (checked against its
            // region), which never overlaps the host buffer `dst`.
            Some(p) => unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), len) },
            None => {
                if mem.read_slice(dst, addr).is_err() {
                    return false;
                }
            }
        }
        copied += len;
        true
    });
    copied
}

/// Copies `data` into the buffers (starting `skip` bytes in); returns bytes copied.
pub fn write_to(mem: &GuestMemoryMmap, bufs: &[Buf], skip: usize, data: &[u8]) -> usize {
    let mut copied = 0;
    for_each_range(bufs, skip, data.len(), |addr, len, done| {
        let src = &data[done..done + len];
        match host_ptr(mem, addr, len) {
            // SAFETY: as in `read_from`, the other way round.
            Some(p) => unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, len) },
            None => {
                if mem.write_slice(src, addr).is_err() {
                    return false;
                }
            }
        }
        copied += len;
        true
    });
    copied
}

/// The (address, length) pieces covering `count` bytes of `bufs` from byte `skip`.
pub fn ranges(bufs: &[Buf], skip: usize, count: usize) -> Vec<(GuestAddress, usize)> {
    let mut out = Vec::new();
    for_each_range(bufs, skip, count, |a, l, _| {
        out.push((a, l));
        true
    });
    out
}

/// Host iovecs for `count` bytes of `bufs` from byte `skip`, for preadv/pwritev/readv/writev
/// straight into guest memory (no bounce buffer: this is the blk and net hot path).
///
/// The pointers stay valid while `mem` lives; callers use them before returning.
pub fn iovecs(
    mem: &GuestMemoryMmap,
    bufs: &[Buf],
    skip: usize,
    count: usize,
    access: Permissions,
) -> Result<Vec<libc::iovec>, ChainError> {
    let mut out = Vec::new();
    iovecs_into(mem, bufs, skip, count, access, &mut out)?;
    Ok(out)
}

/// As [`iovecs`], into `out` (cleared first), so a device can reuse one vector.
pub fn iovecs_into(
    mem: &GuestMemoryMmap,
    bufs: &[Buf],
    skip: usize,
    count: usize,
    access: Permissions,
    out: &mut Vec<libc::iovec>,
) -> Result<(), ChainError> {
    out.clear();
    let mut err = None;
    for_each_range(bufs, skip, count, |addr, len, _| {
        if let Some(p) = host_ptr(mem, addr, len) {
            out.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: len,
            });
            return true;
        }
        let bad = ChainError::OutOfMemory {
            addr: addr.0,
            len: len as u32,
        };
        let Ok(slices) = GuestMemory::get_slices(mem, addr, len, access) else {
            err = Some(bad);
            return false;
        };
        for s in slices {
            let Ok(s) = s else {
                err = Some(bad);
                return false;
            };
            out.push(libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            });
        }
        true
    });
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What a device did with one chain.
pub enum Outcome {
    /// Finished: return it to the driver with `len` bytes written into its buffers.
    Done(u32),
    /// Cannot go on now (rate limit, no backend space): put it back and stop.
    Retry,
}

/// Pops chains from `queue` while `f` finishes them, with event-idx notification suppression;
/// returns whether the driver should be interrupted.
///
/// A chain whose head index is not a valid descriptor cannot be returned; it is logged and
/// skipped. A broken ring (avail index more than a queue ahead) is fatal for the device.
pub fn process_queue<F>(
    queue: &mut virtio_queue::Queue,
    mem: &GuestMemoryMmap,
    index: usize,
    mut f: F,
) -> Result<bool, super::DeviceError>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> Outcome,
{
    use virtio_queue::{QueueOwnedT, QueueT};
    let err = |source| super::DeviceError::Queue {
        queue: index,
        source,
    };
    let mut used_any = false;
    loop {
        queue.disable_notification(mem).map_err(err)?;
        loop {
            let next = queue.iter(mem).map_err(err)?.next();
            let Some(chain) = next else { break };
            let head = chain.head_index();
            match f(chain) {
                Outcome::Done(len) => match queue.add_used(mem, head, len) {
                    Ok(()) => used_any = true,
                    Err(virtio_queue::Error::InvalidDescriptorIndex) => {
                        tracing::warn!("queue {index}: driver offered head {head} past the ring");
                    }
                    Err(e) => return Err(err(e)),
                },
                Outcome::Retry => {
                    queue.go_to_previous_position();
                    return Ok(used_any && queue.needs_notification(mem).map_err(err)?);
                }
            }
        }
        if !queue.enable_notification(mem).map_err(err)? {
            break;
        }
    }
    Ok(used_any && queue.needs_notification(mem).map_err(err)?)
}
