//! The asynchronous engine of virtio-blk for O_DIRECT raw disks: every read and write the
//! driver has in flight goes to the disk at once through one io_uring, instead of one
//! preadv/pwritev at a time on the worker thread. A disk that bypasses the page cache waits
//! for the device on every request, so a queue-depth-32 driver served one request at a time
//! is no faster than a queue-depth-1 host program; submitted together, the disk (and the
//! block layer's merging) sees the whole queue (Firecracker's `io_engine: Async`, QEMU's
//! `aio=io_uring`).
//!
//! Only aligned reads and writes travel through the ring: the chain is parsed and checked
//! exactly as on the synchronous path (`RequestCtx`), and the guest's buffers go straight into
//! a readv/writev SQE at the request's offset. Adjacent same-direction requests made available
//! together share one SQE, grouped as the synchronous path groups them (`blk_batch`: one
//! direction, each continuing the last, at most 1 MiB and UIO_MAXIOV buffers): a sequential
//! driver's queue is then a few large I/Os, not one SQE per page. Each member keeps its chain,
//! so its status and used entry follow when the SQE completes; a merged SQE that fails is
//! redone member by member, each getting its own status. Everything else (flush, discard, write-zeroes,
//! get-id, malformed chains, out-of-range requests, buffers that need the bounce buffer) first
//! drains the ring and then runs the synchronous code: a flush thereby covers every write the
//! driver has seen complete, and the rare requests keep one implementation. Completions arrive
//! out of order (virtio allows that) and are harvested when the ring's eventfd (watched by the
//! worker next to the queue's) fires or while the worker polls; the status byte, the used
//! entry and the event-idx interrupt follow as on the synchronous path. A short transfer is
//! resubmitted for the rest; end of file or an error answers S_IOERR (after the per-member
//! redo for a merged SQE).
//!
//! Guest memory: an SQE holds host pointers into guest memory until its completion. The engine
//! keeps its own handle on the mapping and waits for every SQE before it is dropped, and the
//! worker calls `QueueHandler::quiesce` before it reports queue state or parks, so a snapshot
//! never records an avail index past a request whose completion is not in the used ring.
//! Buffered disks stay synchronous: io_uring was measured slower than one pread each for
//! page-cache hits.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, types, IoUring};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    mark_written, BlockHandler, DeviceError, Dir, Parsed, RequestCtx, Throttled, SECTOR_SIZE,
    S_IOERR, S_OK,
};
use crate::virtio::blk_batch::{Group, Member, MAX_IOVS};
use crate::virtio::chain::{Buf, Chain};
use crate::virtio::ring::SplitRing;

/// Which engine serves the reads and writes of an O_DIRECT raw disk (`io=` of `--disk`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoEngine {
    /// io_uring, many requests in flight (the default for direct disks).
    #[default]
    Uring,
    /// One request at a time on the worker thread (buffered disks always are).
    Sync,
}

impl IoEngine {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "uring" | "io_uring" => Ok(Self::Uring),
            "sync" => Ok(Self::Sync),
            _ => Err(format!("unknown io engine `{s}` (known: uring, sync)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Uring => "uring",
            Self::Sync => "sync",
        }
    }
}

/// Why the io_uring engine could not start; the device then serves requests synchronously.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error("cannot create an io_uring of {entries} entries: {source} (a kernel without io_uring, sysctl kernel.io_uring_disabled set, or a seccomp filter); add io=sync to the disk to silence this")]
    Setup {
        entries: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the io_uring completion eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("cannot register the completion eventfd with the io_uring: {0}")]
    Register(#[source] io::Error),
}

/// Whether this process may use io_uring at all (a small ring, created and dropped).
pub fn probe() -> Result<(), UringError> {
    IoUring::new(2)
        .map(drop)
        .map_err(|source| UringError::Setup { entries: 2, source })
}

/// One SQE on its way through the ring: a run of adjacent same-direction requests made
/// available together (`blk_batch`'s grouping, one request when nothing adjoins it), issued as
/// one read/readv or write/writev over their iovecs laid end to end. Its iovecs point into
/// guest memory.
#[derive(Default)]
struct Slot {
    group: Group,
    /// File offset of the next byte the SQE transfers.
    off: u64,
    /// Bytes the SQE in flight asks for.
    want: usize,
    /// After a short transfer: a copy of what was asked for, trimmed in place from `next` on;
    /// the SQE covers `rest[next..]`.
    partial: bool,
    rest: Vec<libc::iovec>,
    next: usize,
    /// The member redone on its own after the merged SQE failed (so that each member gets its
    /// own status, as the synchronous path's `issue`).
    redo: Option<usize>,
}

impl Slot {
    /// The iovecs the next SQE covers.
    fn current(&self) -> &[libc::iovec] {
        if self.partial {
            return &self.rest[self.next..];
        }
        match self.redo {
            Some(i) => member_iovs(self.group.iovs(), self.group.members(), i),
            None => self.group.iovs(),
        }
    }

    /// Sets the SQE up for member `i` alone.
    fn redo_member(&mut self, i: usize) {
        let Some(m) = self.group.members().get(i) else {
            return;
        };
        self.off = m.sector * SECTOR_SIZE;
        self.want = m.len;
        self.partial = false;
        self.redo = Some(i);
    }
}

/// The iovecs of member `i` within a group's iovecs (members' buffers never share an iovec).
fn member_iovs<'a>(iov: &'a [libc::iovec], members: &[Member], i: usize) -> &'a [libc::iovec] {
    let mut skip: usize = members.iter().take(i).map(|m| m.len).sum();
    let mut from = 0;
    while skip > 0 && from < iov.len() {
        skip = skip.saturating_sub(iov[from].iov_len);
        from += 1;
    }
    let mut take = members.get(i).map_or(0, |m| m.len);
    let mut to = from;
    while take > 0 && to < iov.len() {
        take = take.saturating_sub(iov[to].iov_len);
        to += 1;
    }
    &iov[from..to]
}

/// The ring, its completion eventfd and the requests in flight (see the module doc).
pub(super) struct Engine {
    /// Whether the CQ holds entries, read without consuming any (the worker asks while it
    /// polls). Points into `ring`'s mapping; declared first so it is dropped before it.
    cq: io_uring::cqueue::CompletionStatus,
    /// The ring runs completions cooperatively (see `new`): they wait for an enter.
    coop: bool,
    /// The disk is registered as the ring's fixed file 0.
    fixed: bool,
    ring: IoUring,
    eventfd: EventFd,
    file: Arc<File>,
    /// Keeps guest memory mapped until every SQE pointing into it has completed (`Drop`).
    _mem: GuestMemoryMmap,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// The slot whose group is being built by the current pass (not queued yet).
    open: Option<u16>,
    /// Slots whose SQE is queued or submitted and not yet completed.
    inflight: usize,
    /// (slot, result) of harvested CQEs: collected first, as the handling resubmits.
    done: Vec<(u16, i32)>,
}

// SAFETY: the raw pointers (in the slots' iovecs and inside IoUring's mappings) point into
// guest memory kept mapped by `_mem` and into the ring's own mappings; the engine is used by
// one thread at a time (the device worker), which the handler moves to at activation.
unsafe impl Send for Engine {}

impl Engine {
    /// A ring for `slots` requests in flight on `file`, its CQEs signalled on an eventfd.
    pub(super) fn new(
        mem: &GuestMemoryMmap,
        file: Arc<File>,
        slots: u16,
    ) -> Result<Self, UringError> {
        let entries = u32::from(slots.max(1));
        // Cooperative task running: a completion does not interrupt the worker with an IPI
        // while it runs (polls); the kernel flags the SQ instead and the next enter posts the
        // CQE. A sleeping worker is still woken (its epoll_wait returns EINTR, the CQE is
        // posted on the way out and the eventfd fires). Kernels before 5.19 refuse the flags.
        let (ring, coop) = match IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(entries)
        {
            Ok(r) => (r, true),
            Err(_) => (
                IoUring::new(entries).map_err(|source| UringError::Setup { entries, source })?,
                false,
            ),
        };
        let eventfd = EventFd::new(libc::EFD_NONBLOCK).map_err(UringError::EventFd)?;
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(UringError::Register)?;
        // The disk as the ring's file 0: no file reference taken and dropped per request.
        let fixed = ring.submitter().register_files(&[file.as_raw_fd()]).is_ok();
        // SAFETY: the status points into the ring's CQ mapping; it lives in the same engine
        // as the ring and is never used after it (nor handed out). No other CompletionQueue
        // exists at this point.
        let cq = unsafe { ring.completion_shared().status() };
        Ok(Self {
            cq,
            coop,
            fixed,
            ring,
            eventfd,
            file,
            _mem: mem.clone(),
            slots: (0..slots.max(1)).map(|_| Slot::default()).collect(),
            free: (0..slots.max(1)).rev().collect(),
            open: None,
            inflight: 0,
            done: Vec::with_capacity(usize::from(slots.max(1))),
        })
    }

    /// The eventfd the worker watches for completions.
    pub(super) fn eventfd(&self) -> std::os::fd::RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Clears the eventfd's counter (its CQEs are harvested next).
    pub(super) fn ack(&self) {
        // EAGAIN: already read; the CQ is what counts.
        let _ = self.eventfd.read();
    }

    /// A slot is free for one more request (a driver that re-offers heads still in flight
    /// can run them out; it then waits for completions).
    pub(super) fn can_take(&self) -> bool {
        self.open.is_some() || !self.free.is_empty()
    }

    /// Requests submitted (or queued to be) whose completions are not harvested yet.
    pub(super) fn in_flight(&self) -> bool {
        self.inflight > 0
    }

    /// The kernel posted completions not harvested yet.
    pub(super) fn has_completions(&self) -> bool {
        !self.cq.is_empty() || self.taskrun()
    }

    /// Completions wait for an enter to be posted (cooperative task running).
    fn taskrun(&self) -> bool {
        // SAFETY: no other SubmissionQueue exists (they live only inside engine methods on the
        // worker thread). Not dropped: its drop would store the SQ tail, a write the check
        // does not need.
        self.coop && std::mem::ManuallyDrop::new(unsafe { self.ring.submission_shared() }).taskrun()
    }

    /// Whether a request of `len` bytes at byte `off` with `niov` iovecs can be taken now:
    /// it continues the open group, or a slot is free for a new one.
    fn room(&self, dir: Dir, off: u64, len: usize, niov: usize) -> bool {
        let joins = self
            .open
            .and_then(|i| self.slots.get(usize::from(i)))
            .is_some_and(|s| s.group.accepts(dir, off, len, niov));
        joins || !self.free.is_empty()
    }

    /// Adds the checked request in `chain` (exchanged for a spare chain) with its data iovecs
    /// `iov` to the open group, or queues the open group and opens a new one with it. The
    /// caller checked [`Engine::room`].
    fn add(
        &mut self,
        chain: &mut Chain,
        dir: Dir,
        sector: u64,
        iov: &[libc::iovec],
    ) -> Result<(), DeviceError> {
        let off = sector * SECTOR_SIZE;
        let len = iov.iter().map(|v| v.iov_len).sum();
        let joins = self
            .open
            .and_then(|i| self.slots.get(usize::from(i)))
            .is_some_and(|s| s.group.accepts(dir, off, len, iov.len()));
        if !joins {
            self.close()?;
            let Some(idx) = self.free.pop() else {
                return Ok(());
            };
            self.open = Some(idx);
        }
        if let Some(slot) = self.open.and_then(|i| self.slots.get_mut(usize::from(i))) {
            slot.group.push(chain, dir, sector, iov);
        }
        Ok(())
    }

    /// Queues the SQE of the open group (submitted by [`Engine::submit`]).
    fn close(&mut self) -> Result<(), DeviceError> {
        let Some(idx) = self.open.take() else {
            return Ok(());
        };
        let Some(slot) = self.slots.get_mut(usize::from(idx)) else {
            return Ok(());
        };
        let Some((_, start)) = slot.group.head() else {
            self.free.push(idx);
            return Ok(());
        };
        slot.off = start;
        slot.want = slot.group.bytes() as usize;
        slot.partial = false;
        slot.redo = None;
        self.inflight += 1;
        self.queue(idx)
    }

    /// Queues the SQE for what is left of slot `idx`'s transfer.
    fn queue(&mut self, idx: u16) -> Result<(), DeviceError> {
        let Some(slot) = self.slots.get(usize::from(idx)) else {
            return Ok(());
        };
        let Some((dir, _)) = slot.group.head() else {
            return Ok(());
        };
        let rest = slot.current();
        // One buffer (a 4 KiB page, most of Linux's requests) goes as read/write, which skip
        // the kernel's import of the iovec array; more as readv/writev (at most UIO_MAXIOV:
        // `blk_batch::MAX_IOVS`).
        macro_rules! sqe {
            ($fd:expr) => {
                match (dir, rest) {
                    (Dir::Read, [one]) => {
                        opcode::Read::new($fd, one.iov_base.cast(), one.iov_len as u32)
                            .offset(slot.off)
                            .build()
                    }
                    (Dir::Write, [one]) => {
                        opcode::Write::new($fd, one.iov_base.cast(), one.iov_len as u32)
                            .offset(slot.off)
                            .build()
                    }
                    (Dir::Read, _) => opcode::Readv::new($fd, rest.as_ptr(), rest.len() as u32)
                        .offset(slot.off)
                        .build(),
                    (Dir::Write, _) => opcode::Writev::new($fd, rest.as_ptr(), rest.len() as u32)
                        .offset(slot.off)
                        .build(),
                }
            };
        }
        let sqe = if self.fixed {
            sqe!(types::Fixed(0))
        } else {
            sqe!(types::Fd(self.file.as_raw_fd()))
        }
        .user_data(u64::from(idx));
        loop {
            // SAFETY: the SQE's iovecs live in the slot (its group or its `rest`), which is
            // neither reused nor resized until the SQE's completion is harvested; the buffers
            // they point to are guest memory that `_mem` keeps mapped until then (the engine
            // waits for every SQE before it is dropped). The file is the disk, held open by
            // `file` (and by the ring itself when registered).
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            // The SQ holds as many entries as there are slots, so it is never full with
            // everything submitted; submit what it holds and try again.
            self.submit()?;
        }
    }

    /// Hands the queued SQEs to the kernel.
    fn submit(&mut self) -> Result<(), DeviceError> {
        loop {
            if self.ring.submission().is_empty() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The kernel is short of memory or the CQ is full: wait for a completion,
                // which frees what it needs, then go on.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                    self.wait_one()?
                }
                Err(e) => return Err(DeviceError::Backend(e)),
            }
        }
    }

    /// Completes what the kernel finished: status byte and used entry for every member of a
    /// done SQE, resubmission for short ones, the members one by one for a failed merged one.
    /// Returns how many requests completed.
    fn harvest(&mut self, ring: &mut SplitRing) -> Result<usize, DeviceError> {
        self.enter()?;
        self.reap(ring)
    }

    /// One io_uring_enter when it has work: it submits what is queued and runs the pending
    /// task work, which posts the finished requests' CQEs.
    fn enter(&mut self) -> Result<(), DeviceError> {
        if !self.taskrun() && self.ring.submission().is_empty() {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            // What did not go in stays queued for the next enter (`submit` waits for room).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => self.submit(),
            Err(e) => Err(DeviceError::Backend(e)),
        }
    }

    /// While the worker runs or polls it finds completions itself: the kernel's eventfd
    /// signal (and the worker's read of it) would be wasted work per request.
    fn quiet(&mut self) {
        let cq = self.ring.completion();
        if !cq.eventfd_disabled() {
            cq.disable_eventfd();
        }
    }

    /// Before the worker sleeps: completions signal the eventfd again. Returns whether
    /// completions are waiting already (the worker must not sleep then).
    pub(super) fn arm(&mut self) -> bool {
        self.ring.completion().enable_eventfd();
        // The kernel reads the flag after posting a CQE; this reads the CQ after storing it:
        // one of the two sees the other.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.has_completions()
    }

    /// Completes the CQEs posted so far (no system call).
    fn reap(&mut self, ring: &mut SplitRing) -> Result<usize, DeviceError> {
        self.done.clear();
        self.done.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data() as u16, c.result())),
        );
        let mut completed = 0;
        let mut resubmit = false;
        for i in 0..self.done.len() {
            let (idx, res) = self.done[i];
            let Some(slot) = self.slots.get_mut(usize::from(idx)) else {
                continue;
            };
            let Some((dir, start)) = slot.group.head() else {
                continue;
            };
            let status = match res {
                n if n > 0 && (n as usize) < slot.want => {
                    // Short transfer: the rest goes in again from where it stopped.
                    let n = n as usize;
                    if !slot.partial {
                        let cur = slot.current().to_vec();
                        slot.rest = cur;
                        slot.next = 0;
                        slot.partial = true;
                    }
                    slot.want = advance(&mut slot.rest, &mut slot.next, n);
                    slot.off += n as u64;
                    self.queue(idx)?;
                    resubmit = true;
                    continue;
                }
                n if n > 0 => S_OK,
                n if n == -libc::EINTR || n == -libc::EAGAIN => {
                    self.queue(idx)?;
                    resubmit = true;
                    continue;
                }
                n => {
                    let at = slot.off;
                    let err = if n == 0 {
                        "end of file: the disk file shrank".to_string()
                    } else {
                        io::Error::from_raw_os_error(-n).to_string()
                    };
                    let members = slot.group.members().len();
                    if slot.redo.is_none() && members > 1 {
                        tracing::debug!(
                            "virtio-blk: {members} requests at byte {start:#x} (stopped at {at:#x}): {err}; redoing them one by one"
                        );
                        slot.redo_member(0);
                        self.queue(idx)?;
                        resubmit = true;
                        continue;
                    }
                    tracing::debug!("virtio-blk: request at byte {at:#x}: {err}");
                    S_IOERR
                }
            };
            let range = match slot.redo {
                Some(m) => m..m + 1,
                None => 0..slot.group.members().len(),
            };
            for m in range.clone() {
                if let (Some(member), Some(chain)) =
                    (slot.group.members().get(m), slot.group.chains().get(m))
                {
                    complete(&self._mem, &self.file, ring, dir, member, chain, status);
                    completed += 1;
                }
            }
            if slot.redo.is_some() && range.end < slot.group.members().len() {
                slot.redo_member(range.end);
                self.queue(idx)?;
                resubmit = true;
                continue;
            }
            slot.group.clear();
            slot.rest.clear();
            self.free.push(idx);
            self.inflight -= 1;
        }
        if resubmit {
            self.submit()?;
        }
        Ok(completed)
    }

    /// Submits what is queued and completes every request in flight.
    fn drain(&mut self, ring: &mut SplitRing) -> Result<(), DeviceError> {
        self.close()?;
        self.submit()?;
        loop {
            self.harvest(ring)?;
            if self.inflight == 0 {
                return Ok(());
            }
            self.wait_one()?;
        }
    }

    /// Submits what is queued and waits for one completion; a signal or a kernel short of
    /// resources only ends the wait early (the caller looks again).
    fn wait_one(&mut self) -> Result<(), DeviceError> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                std::thread::yield_now();
                Ok(())
            }
            Err(e) => Err(DeviceError::Backend(e)),
        }
    }
}

impl Drop for Engine {
    /// Waits for every submitted SQE: its buffers are guest memory, which must not be unmapped
    /// (nor reused by a new activation) while the kernel may still write it. Nothing is put in
    /// the used ring: the device is being reset or torn down.
    fn drop(&mut self) {
        loop {
            let mut cq = self.ring.completion();
            let n = cq.by_ref().count();
            drop(cq);
            self.inflight = self.inflight.saturating_sub(n);
            // Entries still in the SQ were never seen by the kernel: they die with the ring.
            let queued = self.ring.submission().len();
            if self.inflight <= queued {
                return;
            }
            match self.ring.submitter().submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                    std::thread::yield_now()
                }
                Err(e) => {
                    // Cannot happen on a working ring; leaking the mapping is the safe way out
                    // (the kernel may still write into it).
                    tracing::error!("virtio-blk: io_uring wait failed at teardown: {e}");
                    std::mem::forget(self._mem.clone());
                    return;
                }
            }
        }
    }
}

/// Drops the first `n` transferred bytes from `iov[*next..]`; returns the bytes left.
fn advance(iov: &mut [libc::iovec], next: &mut usize, mut n: usize) -> usize {
    while n > 0 && *next < iov.len() {
        let v = &mut iov[*next];
        if n >= v.iov_len {
            n -= v.iov_len;
            *next += 1;
        } else {
            // SAFETY: advancing inside the same iovec's buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    iov[(*next).min(iov.len())..]
        .iter()
        .map(|v| v.iov_len)
        .sum()
}

/// Completes one request of a group: the dirty-tracking hook for a write, the status byte
/// (after the data of a read, first of a write's writable buffers: merged requests were checked
/// to have exactly that) and the used entry.
fn complete(
    mem: &GuestMemoryMmap,
    file: &File,
    ring: &mut SplitRing,
    dir: Dir,
    m: &Member,
    chain: &Chain,
    status: u8,
) {
    let (written, status_at) = match dir {
        Dir::Read if status == S_OK => (m.len, m.len),
        Dir::Read => (0, m.len),
        Dir::Write => {
            mark_written(file, m.sector * SECTOR_SIZE, m.len as u64);
            (0, 0)
        }
    };
    // As the synchronous path: a status byte that cannot be written returns 0 bytes.
    let used = match byte_at(&chain.writable, status_at).map(|a| mem.write_obj(status, a)) {
        Some(Ok(())) => u32::try_from(written + 1).unwrap_or(u32::MAX),
        _ => 0,
    };
    ring.add_used(chain.head, used);
}

/// The guest address of byte `at` of the buffers `bufs` (the status byte).
fn byte_at(bufs: &[Buf], mut at: usize) -> Option<GuestAddress> {
    for b in bufs {
        let len = b.len as usize;
        if at < len {
            return b.addr.checked_add(at as u64);
        }
        at -= len;
    }
    None
}

impl BlockHandler {
    /// One pass of the io_uring engine over the queue. `None`: the handler has no engine, or
    /// the disk was switched to an image (a snapshot's overlay) and the pass must run
    /// synchronously, which it may now: the ring is drained.
    pub(super) fn process_async(&mut self) -> Option<Result<(), DeviceError>> {
        let engine = self.uring.as_mut()?;
        if crate::virtio::blk_dirty::reopened(self.file.as_raw_fd()).is_some() {
            let r = engine.drain(&mut self.ring);
            if let Err(e) = r {
                return Some(Err(e));
            }
            return None;
        }
        Some(self.pass())
    }

    fn pass(&mut self) -> Result<(), DeviceError> {
        let Self {
            mem,
            ring,
            file,
            limiter,
            scratch,
            interrupt,
            uring,
            throttled_until,
            ..
        } = self;
        let Some(engine) = uring.as_mut() else {
            return Ok(());
        };
        let req = RequestCtx {
            mem,
            file,
            map: None,
            image: None,
            sectors: self.sectors,
            read_only: self.read_only,
            direct: self.direct,
            serial: &self.serial,
        };
        engine.quiet();
        // Completions first, and the driver told at once: it refills the queue while this
        // pass submits (an enter with many O_DIRECT SQEs takes a while).
        if engine.harvest(ring)? > 0 && ring.needs_notification() {
            interrupt.signal_used();
        }
        let mut result = Ok(());
        if throttled_until.is_none() {
            ring.disable_notification();
            let event_idx = ring.event_idx();
            while engine.can_take() {
                match ring.pop(&mut scratch.chain) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(source) => {
                        result = Err(DeviceError::Queue { queue: 0, source });
                        break;
                    }
                }
                // The synchronous path's own parsing and checks (type and direction, range,
                // buffers in guest memory, sector-aligned for O_DIRECT): what passes goes
                // through the ring, merged with the requests next to it.
                let take = match req.parse(&scratch.chain) {
                    Parsed::Request(r) => req
                        .mergeable(&scratch.chain, &r, &mut scratch.iov)
                        .filter(|_| scratch.iov.len() <= MAX_IOVS)
                        .map(|dir| (dir, r.sector)),
                    _ => None,
                };
                if let Some((dir, sector)) = take {
                    let len = scratch.iov.iter().map(|v| v.iov_len).sum::<usize>();
                    if !engine.room(dir, sector * SECTOR_SIZE, len, scratch.iov.len()) {
                        // Every slot holds an SQE: the request waits for a completion.
                        ring.undo_pop();
                        break;
                    }
                    if !limiter.is_unlimited() {
                        if let Err(d) = limiter.admit(len as u64) {
                            ring.undo_pop();
                            *throttled_until = Some(Instant::now() + d);
                            break;
                        }
                    }
                    engine.add(&mut scratch.chain, dir, sector, &scratch.iov)?;
                    continue;
                }
                // Everything the ring does not take runs synchronously once the ring is empty.
                engine.drain(ring)?;
                match req.handle(limiter, scratch) {
                    Ok(len) => {
                        ring.add_used(scratch.chain.head, len);
                        if event_idx && ring.needs_notification() {
                            interrupt.signal_used();
                        }
                    }
                    Err(Throttled(d)) => {
                        ring.undo_pop();
                        *throttled_until = Some(Instant::now() + d);
                        break;
                    }
                }
            }
        }
        // One enter per pass: the new SQEs in, the finished ones' CQEs out.
        engine.close()?;
        engine.harvest(ring)?;
        if ring.needs_notification() {
            interrupt.signal_used();
        }
        result
    }

    /// Completes every request in flight (before the worker reports queue state or parks).
    pub(super) fn drain_async(&mut self) -> Result<(), DeviceError> {
        let Some(engine) = self.uring.as_mut() else {
            return Ok(());
        };
        let r = engine.drain(&mut self.ring);
        if self.ring.needs_notification() {
            self.interrupt.signal_used();
        }
        r
    }

    /// Completions the worker found on the ring's eventfd.
    pub(super) fn completions_ready(&mut self) -> Result<(), DeviceError> {
        if let Some(engine) = &self.uring {
            engine.ack();
        }
        match self.process_async() {
            Some(r) => r,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(lens: &[usize], buf: &mut [u8]) -> Vec<libc::iovec> {
        let mut at = 0;
        lens.iter()
            .map(|&l| {
                let v = libc::iovec {
                    iov_base: buf[at..].as_mut_ptr().cast(),
                    iov_len: l,
                };
                at += l;
                v
            })
            .collect()
    }

    #[test]
    fn advance_trims_short_transfers() {
        let mut buf = [0u8; 4096];
        let base = buf.as_ptr() as usize;
        let mut v = iov(&[512, 1024, 512], &mut buf);
        let mut next = 0;
        assert_eq!(advance(&mut v, &mut next, 512), 1536);
        assert_eq!(next, 1);
        assert_eq!(advance(&mut v, &mut next, 100), 1436);
        assert_eq!((next, v[1].iov_len), (1, 924));
        assert_eq!(v[1].iov_base as usize, base + 612);
        assert_eq!(advance(&mut v, &mut next, 1436), 0);
        assert_eq!(next, 3);
        assert_eq!(advance(&mut v, &mut next, 5), 0, "nothing past the end");
    }

    #[test]
    fn member_iovs_picks_each_members_buffers() {
        let mut buf = [0u8; 8192];
        let base = buf.as_ptr() as usize;
        // Three members: 512 | 1024 + 512 | 4096 + 512.
        let v = iov(&[512, 1024, 512, 4096, 512], &mut buf);
        let members = [
            Member {
                sector: 0,
                len: 512,
            },
            Member {
                sector: 1,
                len: 1536,
            },
            Member {
                sector: 4,
                len: 4608,
            },
        ];
        let at = |s: &[libc::iovec]| {
            s.iter()
                .map(|v| (v.iov_base as usize - base, v.iov_len))
                .collect::<Vec<_>>()
        };
        assert_eq!(at(member_iovs(&v, &members, 0)), [(0, 512)]);
        assert_eq!(at(member_iovs(&v, &members, 1)), [(512, 1024), (1536, 512)]);
        assert_eq!(
            at(member_iovs(&v, &members, 2)),
            [(2048, 4096), (6144, 512)]
        );
        assert!(member_iovs(&v, &members, 3).is_empty(), "no such member");
    }

    #[test]
    fn byte_at_finds_the_status_byte() {
        let bufs = [
            Buf {
                addr: GuestAddress(0x1000),
                len: 512,
            },
            Buf {
                addr: GuestAddress(0x8000),
                len: 1,
            },
        ];
        assert_eq!(byte_at(&bufs, 512), Some(GuestAddress(0x8000)));
        assert_eq!(byte_at(&bufs, 3), Some(GuestAddress(0x1003)));
        assert_eq!(byte_at(&bufs, 513), None);
        assert_eq!(byte_at(&[], 0), None);
    }

    #[test]
    fn io_engine_names() {
        assert_eq!(IoEngine::parse("uring"), Ok(IoEngine::Uring));
        assert_eq!(IoEngine::parse("sync"), Ok(IoEngine::Sync));
        assert!(IoEngine::parse("aio").unwrap_err().contains("uring, sync"));
        assert_eq!(IoEngine::Sync.name(), "sync");
    }
}
