//! A descriptor chain checked against guest memory before any device acts on it.
//!
//! virtio-queue already bounds a chain's length (a loop ends after `queue size` descriptors) and
//! validates indirect tables; this adds what devices need on top: readable buffers come before
//! writable ones, every buffer lies inside guest memory, and the total length fits a u32.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor at {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadAfterWrite,
    #[error("descriptor chain totals more than 4 GiB")]
    TooLong,
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
}

impl Chain {
    pub fn parse(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> Self {
        let mut out = Chain {
            head: chain.head_index(),
            ..Default::default()
        };
        let mut total: u32 = 0;
        for d in chain {
            let Some(t) = total.checked_add(d.len()) else {
                out.error.get_or_insert(ChainError::TooLong);
                break;
            };
            total = t;
            if !mem.check_range(d.addr(), d.len() as usize, Permissions::ReadWrite) {
                out.error.get_or_insert(ChainError::OutOfMemory {
                    addr: d.addr().0,
                    len: d.len(),
                });
            }
            let b = Buf {
                addr: d.addr(),
                len: d.len(),
            };
            if d.is_write_only() {
                // Before the device writes it: migration and diff snapshots resend it.
                super::dirty::mark(d.addr().0, u64::from(d.len()));
                out.writable.push(b);
            } else if !out.writable.is_empty() {
                out.error.get_or_insert(ChainError::ReadAfterWrite);
                out.readable.push(b);
            } else {
                out.readable.push(b);
            }
        }
        out
    }

    pub fn readable_len(&self) -> usize {
        self.readable.iter().map(|b| b.len as usize).sum()
    }

    pub fn writable_len(&self) -> usize {
        self.writable.iter().map(|b| b.len as usize).sum()
    }
}

/// Copies from the buffers (starting `skip` bytes in) into `out`; returns bytes copied.
pub fn read_from(mem: &GuestMemoryMmap, bufs: &[Buf], skip: usize, out: &mut [u8]) -> usize {
    let mut done = 0;
    for (addr, len) in ranges(bufs, skip, out.len()) {
        if mem.read_slice(&mut out[done..done + len], addr).is_err() {
            break;
        }
        done += len;
    }
    done
}

/// Copies `data` into the buffers (starting `skip` bytes in); returns bytes copied.
pub fn write_to(mem: &GuestMemoryMmap, bufs: &[Buf], skip: usize, data: &[u8]) -> usize {
    let mut done = 0;
    for (addr, len) in ranges(bufs, skip, data.len()) {
        if mem.write_slice(&data[done..done + len], addr).is_err() {
            break;
        }
        done += len;
    }
    done
}

/// The (address, length) pieces covering `count` bytes of `bufs` from byte `skip`.
pub fn ranges(bufs: &[Buf], mut skip: usize, mut count: usize) -> Vec<(GuestAddress, usize)> {
    let mut out = Vec::new();
    for b in bufs {
        if count == 0 {
            break;
        }
        let len = b.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let take = (len - skip).min(count);
        out.push((GuestAddress(b.addr.0 + skip as u64), take));
        skip = 0;
        count -= take;
    }
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
    for (addr, len) in ranges(bufs, skip, count) {
        let bad = ChainError::OutOfMemory {
            addr: addr.0,
            len: len as u32,
        };
        let slices = mem.get_slices(addr, len, access).map_err(|_| bad.clone())?;
        for s in slices {
            let s = s.map_err(|_| bad.clone())?;
            out.push(libc::iovec {
                iov_base: s.ptr_guard_mut().as_ptr().cast(),
                iov_len: s.len(),
            });
        }
    }
    Ok(out)
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
