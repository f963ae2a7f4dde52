//! The split virtqueue on a device's hot path (blk): avail ring, descriptor table and used ring
//! resolved once, at activation, to host pointers into guest memory.
//!
//! Why not virtio-queue alone: there every avail-index load, descriptor read and used-ring
//! store goes through vm-memory's region lookup and a bounds-checked volatile copy, and each
//! chain re-creates the avail iterator (one more acquire load of the index). Together with
//! the chain walk that came to ~0.3 us per request, 40 % of the 4 KiB page-cache read it
//! wrapped (`corefour bench io`, rand read 4K buffered). virtio-queue still owns the queue's
//! configuration: it validated the addresses (alignment, inside guest memory) before the
//! device was activated, and the other devices use it as is.
//!
//! What virtio-queue checks per chain is checked here too: the avail index may run at most a
//! queue ahead (else the ring is broken and the device needs a reset); a head index past the
//! table is skipped; a walk follows at most as many descriptors as the table holds (a loop
//! ends); `next` indices stay inside the table; an indirect table is a multiple of 16 bytes,
//! at most 65535 entries, not nested, and lies in guest memory; the chain's total length fits
//! a u32. Where virtio-queue quietly cut such a chain short, it reaches the device here marked
//! [`ChainError::Malformed`], so blk answers it with an error status. Each buffer then goes
//! through [`Chain::push`] (inside guest memory, readable before writable, dirty-page log) like
//! every other device's.
//!
//! Accesses the driver synchronizes on (avail idx, used idx, the event indices and flags) are
//! atomics on the aligned host address; descriptors and used elements are volatile copies.
//! A ring that straddles two memory regions (legal, never seen in practice) is accessed
//! through vm-memory instead, with the same code path above it.

use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::chain::{host_ptr, Chain, ChainError};
use super::state::QueueSnap;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// used.flags: the device does not want notifications (without event idx).
const USED_F_NO_NOTIFY: u16 = 1;
/// avail.flags: the driver does not want interrupts (without event idx).
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// One of the three ring areas: its host address when it lies in one region, else its guest
/// address for vm-memory to reach.
#[derive(Clone, Copy)]
enum Area {
    Host(*mut u8),
    Guest(GuestAddress),
}

impl Area {
    fn new(mem: &GuestMemoryMmap, addr: u64, len: usize, align: usize) -> Self {
        match host_ptr(mem, GuestAddress(addr), len) {
            Some(p) if (p as usize).is_multiple_of(align) => Area::Host(p),
            _ => Area::Guest(GuestAddress(addr)),
        }
    }

    /// An atomic u16 at byte `off` (even: the area is at least 2-aligned).
    fn load16(&self, mem: &GuestMemoryMmap, off: usize, order: Ordering) -> u16 {
        match *self {
            Area::Host(p) => {
                // SAFETY: `p + off` lies inside the area, which `Area::new` checked against
                // its region (kept mapped by the ring's `mem`), and is 2-aligned. The shared
                // fields are only ever accessed atomically while the ring lives.
                let a = unsafe { AtomicU16::from_ptr(p.add(off).cast()) };
                u16::from_le(a.load(order))
            }
            // Cannot fail: virtio-queue checked at activation that the rings lie in memory.
            Area::Guest(a) => mem
                .load::<u16>(GuestAddress(a.0 + off as u64), order)
                .map(u16::from_le)
                .unwrap_or(0),
        }
    }

    fn store16(&self, mem: &GuestMemoryMmap, off: usize, v: u16, order: Ordering) {
        match *self {
            Area::Host(p) => {
                // SAFETY: as in `load16`.
                let a = unsafe { AtomicU16::from_ptr(p.add(off).cast()) };
                a.store(v.to_le(), order)
            }
            Area::Guest(a) => {
                let _ = mem.store(v.to_le(), GuestAddress(a.0 + off as u64), order);
            }
        }
    }

    /// A used element (id, len) at byte `off` (4-aligned).
    fn put_used(&self, mem: &GuestMemoryMmap, off: usize, id: u32, len: u32) {
        match *self {
            // SAFETY: inside the checked area, 4-aligned; the driver reads it only after the
            // used index store (release) that follows.
            Area::Host(p) => unsafe {
                std::ptr::write_volatile(p.add(off).cast::<u32>(), id.to_le());
                std::ptr::write_volatile(p.add(off + 4).cast::<u32>(), len.to_le());
            },
            Area::Guest(a) => {
                let mut raw = [0u8; 8];
                raw[..4].copy_from_slice(&id.to_le_bytes());
                raw[4..].copy_from_slice(&len.to_le_bytes());
                let _ = mem.write_slice(&raw, GuestAddress(a.0 + off as u64));
            }
        }
    }
}

/// A cache hint for the line at `p` (any address: a prefetch never faults).
#[inline(always)]
fn prefetch(p: *const u8) {
    // SAFETY: SSE (the intrinsic's target feature) is part of the x86-64 baseline; a
    // prefetch reads nothing architecturally and never faults, whatever `p` is.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A descriptor as read (one copy; the guest may change the table meanwhile).
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A descriptor table being walked: the queue's own or an indirect one.
#[derive(Clone, Copy)]
struct Table {
    area: Area,
    entries: u32,
}

impl Table {
    fn read(&self, mem: &GuestMemoryMmap, i: u32) -> Option<Desc> {
        let (w0, w1) = match self.area {
            Area::Host(p) => {
                let p = p.wrapping_add(16 * i as usize);
                if (p as usize).is_multiple_of(8) {
                    // SAFETY: `i < entries` (the caller checks), so the 16 bytes lie inside the
                    // table, which `Area::new` checked against one region; 8-aligned. Two
                    // volatile word loads (a volatile [u8; 16] compiles to sixteen byte loads
                    // and a store-forwarding stall): the guest may be writing the entry, and
                    // only this copy is validated and used.
                    unsafe {
                        (
                            std::ptr::read_volatile(p.cast::<u64>()),
                            std::ptr::read_volatile(p.add(8).cast::<u64>()),
                        )
                    }
                } else {
                    // An indirect table at an odd address (allowed).
                    let mut raw = [0u8; 16];
                    // SAFETY: as above, without the alignment; a byte copy.
                    unsafe { std::ptr::copy_nonoverlapping(p, raw.as_mut_ptr(), 16) };
                    words(raw)
                }
            }
            Area::Guest(a) => {
                let mut raw = [0u8; 16];
                mem.read_slice(&mut raw, GuestAddress(a.0 + 16 * u64::from(i)))
                    .ok()?;
                words(raw)
            }
        };
        let (w0, w1) = (u64::from_le(w0), u64::from_le(w1));
        Some(Desc {
            addr: w0,
            len: w1 as u32,
            flags: (w1 >> 32) as u16,
            next: (w1 >> 48) as u16,
        })
    }
}

/// A descriptor's bytes as two little-endian words (as loaded from memory).
fn words(raw: [u8; 16]) -> (u64, u64) {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&raw[..8]);
    b.copy_from_slice(&raw[8..]);
    (u64::from_ne_bytes(a), u64::from_ne_bytes(b))
}

/// A split queue the device works on through host pointers (see the module doc).
pub struct SplitRing {
    queue: Queue,
    mem: GuestMemoryMmap,
    size: u16,
    desc: Area,
    avail: Area,
    used: Area,
    event_idx: bool,
    next_avail: Wrapping<u16>,
    /// The avail index as `pop` last loaded it (acquire): entries before it are readable.
    avail_seen: Wrapping<u16>,
    next_used: Wrapping<u16>,
    /// The used index as last stored into the ring (`next_used` once [`SplitRing::publish`]
    /// ran; behind it while elements written by [`SplitRing::put_used`] wait for it).
    published: Wrapping<u16>,
    /// `published` when the driver was last considered for an interrupt.
    signalled: Wrapping<u16>,
}

// SAFETY: the raw pointers point into guest memory that `mem` (owned here) keeps mapped; the
// ring is used by one thread at a time (the device worker), and every access to the shared
// memory is atomic or volatile.
unsafe impl Send for SplitRing {}

/// The avail index ran more than a queue ahead of the device: the ring is broken.
pub const BROKEN_RING: virtio_queue::Error = virtio_queue::Error::InvalidAvailRingIndex;

impl SplitRing {
    /// Takes over `queue` (validated by the transport at activation) on `mem`.
    pub fn new(queue: Queue, mem: &GuestMemoryMmap) -> Self {
        let size = queue.size();
        let n = usize::from(size);
        let desc = Area::new(mem, queue.desc_table(), 16 * n, 16);
        let avail = Area::new(mem, queue.avail_ring(), 6 + 2 * n, 2);
        let used = Area::new(mem, queue.used_ring(), 6 + 8 * n, 4);
        Self {
            event_idx: queue.event_idx_enabled(),
            next_avail: Wrapping(queue.next_avail()),
            avail_seen: Wrapping(queue.next_avail()),
            next_used: Wrapping(queue.next_used()),
            published: Wrapping(queue.next_used()),
            signalled: Wrapping(queue.next_used()),
            queue,
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
        }
    }

    /// The queue's setup and positions, for snapshots. Taken between passes, when every used
    /// element is published.
    pub fn snap(&self) -> QueueSnap {
        debug_assert_eq!(
            self.published, self.next_used,
            "snapshot with unpublished used"
        );
        let mut s = QueueSnap::of(&self.queue);
        s.next_avail = self.next_avail.0;
        s.next_used = self.next_used.0;
        s
    }

    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    fn avail_idx(&self, order: Ordering) -> Wrapping<u16> {
        Wrapping(self.avail.load16(&self.mem, 2, order))
    }

    /// The driver added chains the device has not taken yet.
    pub fn pending(&self) -> bool {
        self.size > 0 && self.avail_idx(Ordering::Acquire) != self.next_avail
    }

    /// Takes the next available chain into `chain`. Ok(false): none. Err: the avail index ran
    /// more than a queue ahead (fatal for the device). Heads past the table are skipped.
    pub fn pop(&mut self, chain: &mut Chain) -> Result<bool, virtio_queue::Error> {
        if self.size == 0 {
            return Ok(false);
        }
        loop {
            let idx = self.avail_idx(Ordering::Acquire);
            if idx == self.next_avail {
                return Ok(false);
            }
            if (idx - self.next_avail).0 > self.size {
                return Err(BROKEN_RING);
            }
            self.avail_seen = idx;
            let slot = usize::from(self.next_avail.0 % self.size);
            // Ordered after the index load (acquire) above.
            let head = self
                .avail
                .load16(&self.mem, 4 + 2 * slot, Ordering::Relaxed);
            self.next_avail += Wrapping(1);
            if head >= self.size {
                tracing::warn!("virtqueue: driver offered head {head} past the ring, skipped");
                continue;
            }
            self.walk(head, chain);
            return Ok(true);
        }
    }

    /// Starts loading what parsing the next chains will read, so the cache misses on lines
    /// the driver just wrote (on its own core) overlap the current request's I/O instead of
    /// stalling the next `pop`: the descriptor of the chain after next, and for the next
    /// chain (its descriptor loaded by the previous call) its first buffer (a blk header),
    /// second descriptor and last descriptor. Only hints: nothing is validated or kept, and
    /// a prefetch of a wrong address does no harm.
    ///
    /// Why: `pop` and the header read were the device thread's largest own costs per 4 KiB
    /// read after the system call (`bench io`, rand read 4K buffered pread under perf).
    #[inline]
    pub fn prefetch(&self) {
        let ahead = (self.avail_seen - self.next_avail).0;
        let Area::Host(table) = self.desc else {
            return;
        };
        if ahead == 0 || self.size == 0 {
            return;
        }
        let head_at = |k: u16| {
            let slot = usize::from((self.next_avail + Wrapping(k)).0 % self.size);
            // Ordered by the acquire load of the index in `pop`, which covered this entry.
            self.avail
                .load16(&self.mem, 4 + 2 * slot, Ordering::Relaxed)
        };
        if ahead >= 2 {
            let h = head_at(1);
            if h < self.size {
                prefetch(table.wrapping_add(16 * usize::from(h)));
            }
        }
        let h = head_at(0);
        let t = Table {
            area: self.desc,
            entries: u32::from(self.size),
        };
        let Some(d) = (h < self.size)
            .then(|| t.read(&self.mem, u32::from(h)))
            .flatten()
        else {
            return;
        };
        if d.flags & DESC_F_INDIRECT != 0 {
            if let Some(p) = host_ptr(&self.mem, GuestAddress(d.addr), 16) {
                prefetch(p);
            }
            return;
        }
        if let Some(p) = host_ptr(&self.mem, GuestAddress(d.addr), 1) {
            prefetch(p);
        }
        if d.flags & DESC_F_NEXT != 0 && d.next < self.size {
            // Linux and the bench lay a chain's descriptors out one after another: the
            // second and the third (a blk status) are likely next to it.
            prefetch(table.wrapping_add(16 * usize::from(d.next)));
            prefetch(table.wrapping_add(16 * ((usize::from(d.next) + 1) % usize::from(self.size))));
        }
    }

    /// Puts the last popped chain back (the device cannot serve it now).
    pub fn undo_pop(&mut self) {
        self.next_avail -= Wrapping(1);
    }

    fn walk(&self, head: u16, chain: &mut Chain) {
        chain.begin(head);
        let mut table = Table {
            area: self.desc,
            entries: u32::from(self.size),
        };
        let mut indirect = false;
        let mut next = u32::from(head);
        // Descriptors left before the walk is a loop (virtio-queue's ttl).
        let mut ttl = table.entries;
        let mut total = 0u32;
        let bad = |chain: &mut Chain, why| {
            chain.error.get_or_insert(ChainError::Malformed(why));
        };
        loop {
            if ttl == 0 {
                return bad(chain, "it loops or is longer than its table");
            }
            if next >= table.entries {
                return bad(chain, "a next index points past the table");
            }
            let Some(d) = table.read(&self.mem, next) else {
                return bad(chain, "a descriptor cannot be read");
            };
            if d.flags & DESC_F_INDIRECT != 0 {
                if indirect {
                    return bad(chain, "nested indirect table");
                }
                if d.len == 0 || !d.len.is_multiple_of(16) || d.len / 16 > u32::from(u16::MAX) {
                    return bad(chain, "bad indirect table length");
                }
                let entries = d.len / 16;
                let area = match host_ptr(&self.mem, GuestAddress(d.addr), d.len as usize) {
                    Some(p) => Area::Host(p),
                    None => {
                        let end = d.addr.checked_add(u64::from(d.len) - 1);
                        if end.is_none()
                            || !vm_memory::GuestMemory::check_range(
                                &self.mem,
                                GuestAddress(d.addr),
                                d.len as usize,
                                vm_memory::Permissions::Read,
                            )
                        {
                            return bad(chain, "indirect table outside guest memory");
                        }
                        Area::Guest(GuestAddress(d.addr))
                    }
                };
                table = Table { area, entries };
                indirect = true;
                next = 0;
                ttl = entries;
                continue;
            }
            if !chain.push(
                &self.mem,
                &mut total,
                GuestAddress(d.addr),
                d.len,
                d.flags & DESC_F_WRITE != 0,
            ) {
                return;
            }
            if d.flags & DESC_F_NEXT == 0 {
                return;
            }
            ttl -= 1;
            next = u32::from(d.next);
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written, visible at once (the used
    /// index is stored with release ordering).
    pub fn add_used(&mut self, head: u16, len: u32) {
        self.put_used(head, len);
        self.publish();
    }

    /// Writes the used element for chain `head` without publishing it: the driver sees it
    /// with the next [`SplitRing::publish`], which the caller must run before its pass ends
    /// (and before [`SplitRing::needs_notification`], which only looks at published ones).
    ///
    /// Why: a driver that polls its used ring (a guest in halt polling, `bench io`'s driver)
    /// pulls the cache line with the used index over on each store, and the device's next
    /// store has to take it back; per 4 KiB page-cache read that round trip was a large share
    /// of the device's own time. A few completions published at once move it once.
    #[inline]
    pub fn put_used(&mut self, head: u16, len: u32) {
        let slot = usize::from(self.next_used.0 % self.size.max(1));
        self.used
            .put_used(&self.mem, 4 + 8 * slot, u32::from(head), len);
        self.next_used += Wrapping(1);
    }

    /// Chains the driver made available that the device has seen but not taken yet (as of
    /// the last `pop`).
    pub fn queued(&self) -> u16 {
        (self.avail_seen - self.next_avail).0
    }

    /// Used elements written but not yet published.
    pub fn unpublished(&self) -> u16 {
        (self.next_used - self.published).0
    }

    /// Stores the used index (release: the elements before it are visible first).
    #[inline]
    pub fn publish(&mut self) {
        if self.published != self.next_used {
            self.published = self.next_used;
            self.used
                .store16(&self.mem, 2, self.next_used.0, Ordering::Release);
        }
    }

    /// Whether publishing now would, as far as a plain read of `used_event` tells, cross the
    /// completion the driver asked an interrupt for (event idx only; without it, false). A
    /// stale read only moves the interrupt to the next publish: [`SplitRing::needs_notification`]
    /// after it checks the whole range since the last interrupt decision, behind a fence.
    #[inline]
    pub fn interrupt_due(&self) -> bool {
        if !self.event_idx {
            return false;
        }
        let n = usize::from(self.size);
        let event = Wrapping(self.avail.load16(&self.mem, 4 + 2 * n, Ordering::Relaxed));
        (self.next_used - event - Wrapping(1)) < (self.next_used - self.signalled)
    }

    /// Whether the driver wants an interrupt for what was published since the last call: with
    /// event idx, when the used index passed `used_event`; without, unless the driver set
    /// VRING_AVAIL_F_NO_INTERRUPT.
    pub fn needs_notification(&mut self) -> bool {
        let new = self.published;
        let old = std::mem::replace(&mut self.signalled, new);
        if new == old {
            return false;
        }
        // The used index store must be visible before the driver's field is read, or a driver
        // that re-armed in between waits for an interrupt that never comes.
        fence(Ordering::SeqCst);
        let n = usize::from(self.size);
        if self.event_idx {
            let event = Wrapping(self.avail.load16(&self.mem, 4 + 2 * n, Ordering::Relaxed));
            // vring_need_event: did [old, new) cross used_event?
            (new - event - Wrapping(1)) < (new - old)
        } else {
            self.avail.load16(&self.mem, 0, Ordering::Relaxed) & AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Asks the driver to notify on new chains (before the device sleeps); returns whether
    /// chains arrived meanwhile, which the device must then take instead of sleeping.
    pub fn enable_notification(&mut self) -> bool {
        if self.size == 0 {
            return false;
        }
        let n = usize::from(self.size);
        if self.event_idx {
            self.used
                .store16(&self.mem, 4 + 8 * n, self.next_avail.0, Ordering::Relaxed);
        } else {
            self.used.store16(&self.mem, 0, 0, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        self.pending()
    }

    /// Tells the driver not to notify while the device is working or polling. With event idx
    /// nothing needs writing: `avail_event` stays where the device last slept, and the
    /// driver's later entries do not cross it.
    pub fn disable_notification(&mut self) {
        if !self.event_idx && self.size > 0 {
            self.used
                .store16(&self.mem, 0, USED_F_NO_NOTIFY, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chain::Buf;
    use vm_memory::{GuestMemoryMmap, Permissions};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn setup(
        regions: &[(GuestAddress, usize)],
        size: u16,
        event_idx: bool,
    ) -> (GuestMemoryMmap, SplitRing) {
        let mem = GuestMemoryMmap::from_ranges(regions).unwrap();
        let mut q = Queue::new(size).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        q.set_event_idx(event_idx);
        assert!(q.is_valid(&mem));
        let r = SplitRing::new(q, &mem);
        (mem, r)
    }

    fn desc(mem: &GuestMemoryMmap, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(table + 16 * i)).unwrap();
    }

    fn offer(mem: &GuestMemoryMmap, heads: &[u16], size: u16) {
        let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        for (k, &h) in heads.iter().enumerate() {
            let slot = (idx as usize + k) % size as usize;
            mem.write_obj(h, GuestAddress(AVAIL + 4 + 2 * slot as u64))
                .unwrap();
        }
        mem.write_obj(
            idx.wrapping_add(heads.len() as u16),
            GuestAddress(AVAIL + 2),
        )
        .unwrap();
    }

    fn both_layouts() -> Vec<Vec<(GuestAddress, usize)>> {
        vec![
            vec![(GuestAddress(0), 1 << 20)],
            // Region boundaries inside every ring area: the vm-memory fallback.
            vec![
                (GuestAddress(0), 0x1008),
                (GuestAddress(0x1008), 0x1002),
                (GuestAddress(0x200a), 0x1004),
                (GuestAddress(0x300e), 0x10_0000),
            ],
        ]
    }

    #[test]
    fn walks_direct_and_indirect_chains_and_publishes_used() {
        for layout in both_layouts() {
            let (mem, mut r) = setup(&layout, 8, false);
            assert!(!matches!(r.used, Area::Guest(_)) || layout.len() > 1);
            desc(&mem, DESC, 0, 0x8000, 16, DESC_F_NEXT, 1);
            desc(&mem, DESC, 1, 0x9000, 512, DESC_F_NEXT | DESC_F_WRITE, 2);
            desc(&mem, DESC, 2, 0xa000, 1, DESC_F_WRITE, 0);
            // Head 3: an indirect table of two.
            desc(&mem, DESC, 3, 0x6000, 32, DESC_F_INDIRECT, 0);
            desc(&mem, 0x6000, 0, 0xb000, 16, DESC_F_NEXT, 1);
            desc(&mem, 0x6000, 1, 0xc000, 4, DESC_F_WRITE, 0);
            // Head 4: an indirect table at an odd address (allowed for indirect tables).
            desc(&mem, DESC, 4, 0x7003, 16, DESC_F_INDIRECT, 0);
            desc(&mem, 0x7003, 0, 0xd000, 9, DESC_F_WRITE, 0);
            offer(&mem, &[0, 3, 4], 8);
            assert!(r.pending());
            let mut c = Chain::default();
            assert!(r.pop(&mut c).unwrap());
            assert_eq!((c.head, c.error.clone()), (0, None));
            assert_eq!(
                c.readable,
                vec![Buf {
                    addr: GuestAddress(0x8000),
                    len: 16
                }]
            );
            assert_eq!(c.writable.len(), 2);
            r.add_used(0, 513);
            assert!(r.pop(&mut c).unwrap());
            assert_eq!(
                (c.head, c.error.clone(), c.readable_len(), c.writable_len()),
                (3, None, 16, 4)
            );
            r.add_used(3, 4);
            assert!(r.pop(&mut c).unwrap());
            assert_eq!(
                c.writable,
                vec![Buf {
                    addr: GuestAddress(0xd000),
                    len: 9
                }]
            );
            assert_eq!((c.head, c.error.clone()), (4, None));
            r.add_used(4, 9);
            assert!(!r.pop(&mut c).unwrap());
            assert!(!r.pending());
            let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
            assert_eq!(used_idx, 3);
            let e: [u32; 6] = mem.read_obj(GuestAddress(USED + 4)).unwrap();
            assert_eq!(e, [0, 513, 3, 4, 4, 9]);
            let s = r.snap();
            assert_eq!((s.next_avail, s.next_used, s.size), (3, 3, 8));
        }
    }

    #[test]
    fn hostile_chains_are_marked_malformed_not_followed() {
        for layout in both_layouts() {
            let (mem, mut r) = setup(&layout, 4, false);
            let mut c = Chain::default();
            let malformed = |c: &Chain| matches!(c.error, Some(ChainError::Malformed(_)));
            // A loop 0 -> 1 -> 0.
            desc(&mem, DESC, 0, 0x8000, 16, DESC_F_NEXT, 1);
            desc(&mem, DESC, 1, 0x8000, 16, DESC_F_NEXT, 0);
            // Next past the table.
            desc(&mem, DESC, 2, 0x8000, 16, DESC_F_NEXT, 9);
            offer(&mem, &[0, 2, 7], 4);
            // Hints on a hostile ring read nothing they should not and fault on nothing.
            r.avail_seen = r.avail_idx(Ordering::Acquire);
            r.prefetch();
            assert!(r.pop(&mut c).unwrap());
            r.prefetch();
            assert!(malformed(&c) && c.readable.len() == 4, "{:?}", c.error);
            assert!(r.pop(&mut c).unwrap());
            assert!(malformed(&c));
            // Head 7 is past the ring: skipped, nothing left.
            assert!(!r.pop(&mut c).unwrap());
            // Indirect: nested, bad length, outside memory; total over 4 GiB.
            desc(&mem, DESC, 0, 0x6000, 16, DESC_F_INDIRECT, 0);
            desc(&mem, 0x6000, 0, 0x7000, 16, DESC_F_INDIRECT, 0);
            desc(&mem, DESC, 1, 0x6000, 17, DESC_F_INDIRECT, 0);
            desc(&mem, DESC, 2, 0xffff_ff00, 64, DESC_F_INDIRECT, 0);
            desc(&mem, DESC, 3, 0x8000, u32::MAX, DESC_F_NEXT, 3);
            offer(&mem, &[0, 1, 2, 3], 4);
            for _ in 0..3 {
                assert!(r.pop(&mut c).unwrap());
                r.prefetch();
                assert!(malformed(&c), "{:?}", c.error);
            }
            assert!(r.pop(&mut c).unwrap());
            // Refused for its length, and the walk stopped where the total overflowed.
            assert!(c.error.is_some() && c.readable.len() == 1, "{:?}", c.error);
            // The avail index running more than a queue ahead breaks the ring.
            mem.write_obj(r.next_avail.0.wrapping_add(5), GuestAddress(AVAIL + 2))
                .unwrap();
            assert!(r.pop(&mut c).is_err());
        }
    }

    #[test]
    fn notifications_follow_event_idx_and_flags() {
        for layout in both_layouts() {
            // Event idx: interrupt when the used index passes used_event; the driver is told
            // to kick again only once the device goes to sleep.
            let (mem, mut r) = setup(&layout, 8, true);
            for i in 0..4 {
                desc(&mem, DESC, i, 0x8000, 1, DESC_F_WRITE, 0);
            }
            offer(&mem, &[0, 1, 2, 3], 8);
            mem.write_obj(2u16, GuestAddress(AVAIL + 4 + 16)).unwrap(); // used_event = 2
            let mut c = Chain::default();
            let mut fired = vec![];
            while r.pop(&mut c).unwrap() {
                r.add_used(c.head, 1);
                fired.push(r.needs_notification());
            }
            assert_eq!(fired, [false, false, true, false]);
            assert!(!r.needs_notification(), "nothing new, no interrupt");
            assert!(!r.enable_notification());
            let avail_event: u16 = mem.read_obj(GuestAddress(USED + 4 + 64)).unwrap();
            assert_eq!(avail_event, 4);
            offer(&mem, &[0], 8);
            assert!(
                r.enable_notification(),
                "an entry that raced the enable is seen"
            );

            // Without event idx: the flags say it.
            let (mem, mut r) = setup(&layout, 8, false);
            desc(&mem, DESC, 0, 0x8000, 1, DESC_F_WRITE, 0);
            offer(&mem, &[0, 0], 8);
            r.disable_notification();
            assert_eq!(
                mem.read_obj::<u16>(GuestAddress(USED)).unwrap(),
                USED_F_NO_NOTIFY
            );
            assert!(r.pop(&mut c).unwrap());
            r.add_used(0, 1);
            assert!(r.needs_notification());
            mem.write_obj(AVAIL_F_NO_INTERRUPT, GuestAddress(AVAIL))
                .unwrap();
            assert!(r.pop(&mut c).unwrap());
            r.add_used(0, 1);
            assert!(!r.needs_notification());
            assert!(!r.enable_notification());
            assert_eq!(mem.read_obj::<u16>(GuestAddress(USED)).unwrap(), 0);
        }
    }

    #[test]
    fn batched_used_publish_keeps_event_idx_interrupts() {
        for layout in both_layouts() {
            let (mem, mut r) = setup(&layout, 8, true);
            for i in 0..6 {
                desc(&mem, DESC, i, 0x8000, 1, DESC_F_WRITE, 0);
            }
            offer(&mem, &[0, 1, 2, 3, 4, 5], 8);
            mem.write_obj(3u16, GuestAddress(AVAIL + 4 + 16)).unwrap(); // used_event = 3
            let used_idx =
                |mem: &GuestMemoryMmap| mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap();
            let mut c = Chain::default();
            let mut due = vec![];
            for _ in 0..3 {
                assert!(r.pop(&mut c).unwrap());
                r.put_used(c.head, 1);
                due.push(r.interrupt_due());
            }
            // Written, not yet visible; not due until the element used_event names.
            assert_eq!(used_idx(&mem), 0);
            assert_eq!((r.unpublished(), r.queued()), (3, 3));
            assert_eq!(due, [false, false, false]);
            assert!(
                !r.needs_notification(),
                "nothing published, nothing to tell"
            );
            assert!(r.pop(&mut c).unwrap());
            r.put_used(c.head, 1);
            assert!(r.interrupt_due(), "used index 4 passes used_event 3");
            r.publish();
            assert_eq!((used_idx(&mem), r.unpublished()), (4, 0));
            assert!(r.needs_notification());
            // The driver re-arms behind the device's back: the next publish still tells it.
            for _ in 0..2 {
                assert!(r.pop(&mut c).unwrap());
                r.put_used(c.head, 1);
            }
            mem.write_obj(4u16, GuestAddress(AVAIL + 4 + 16)).unwrap();
            r.publish();
            assert!(r.needs_notification(), "used_event 4 was crossed by 4..6");
            let e: [u32; 12] = mem.read_obj(GuestAddress(USED + 4)).unwrap();
            assert_eq!(e, [0, 1, 1, 1, 2, 1, 3, 1, 4, 1, 5, 1]);
            assert_eq!(r.snap().next_used, 6);
        }
    }

    #[test]
    fn resolved_chain_buffers_match_the_generic_path() {
        for layout in both_layouts() {
            let (mem, mut r) = setup(&layout, 8, false);
            // A header split over two buffers, data over two, status alone; then one with
            // the header whole.
            desc(&mem, DESC, 0, 0x8000, 8, DESC_F_NEXT, 1);
            desc(&mem, DESC, 1, 0x8100, 24, DESC_F_NEXT, 2);
            desc(&mem, DESC, 2, 0x9000, 100, DESC_F_NEXT | DESC_F_WRITE, 3);
            desc(&mem, DESC, 3, 0x9800, 3, DESC_F_WRITE, 0);
            desc(&mem, DESC, 4, 0xa000, 16, DESC_F_NEXT, 5);
            desc(&mem, DESC, 5, 0xb001, 1, DESC_F_WRITE, 0);
            mem.write_slice(&[7u8; 16], GuestAddress(0xa000)).unwrap();
            offer(&mem, &[0, 4], 8);
            let mut c = Chain::default();
            assert!(r.pop(&mut c).unwrap());
            assert_eq!(c.read_head::<16>(), None, "first buffer is shorter");
            let mut fast = vec![];
            for (writable, skip, count) in [
                (false, 4, 20),
                (false, 8, 100),
                (true, 50, 53),
                (true, 0, 10),
            ] {
                let (bufs, access) = if writable {
                    (&c.writable, Permissions::Write)
                } else {
                    (&c.readable, Permissions::Read)
                };
                let slow = crate::virtio::chain::iovecs(&mem, bufs, skip, count, access).unwrap();
                c.iovecs_into(&mem, writable, skip, count, &mut fast)
                    .unwrap();
                let pairs = |v: &[libc::iovec]| {
                    v.iter()
                        .map(|v| (v.iov_base as usize, v.iov_len))
                        .collect::<Vec<_>>()
                };
                assert_eq!(pairs(&fast), pairs(&slow), "{writable} {skip} {count}");
            }
            assert!(c.put_last_writable(9));
            assert_eq!(mem.read_obj::<u8>(GuestAddress(0x9802)).unwrap(), 9);
            assert!(r.pop(&mut c).unwrap());
            assert_eq!(c.read_head::<16>(), Some([7u8; 16]));
            assert!(c.put_last_writable(5));
            assert_eq!(mem.read_obj::<u8>(GuestAddress(0xb001)).unwrap(), 5);
        }
    }
}
