//! virtio-balloon: the host sets a target size in pages, the guest inflates (gives pages back,
//! which we return to the host with madvise(MADV_DONTNEED)) or deflates, and reports memory
//! statistics on the stats queue.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};

use super::chain::{self, Chain, Outcome};
use super::state::{DeviceSnap, QueueSnap, StateError};
use super::worker::Poller;
use super::{
    device_type, ActivateError, Activation, DeviceError, Interrupt, QueueHandler, VirtioDevice,
};

const QUEUE_SIZE: u16 = 256;
const F_STATS_VQ: u64 = 1 << 1;
const F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// The balloon always speaks in 4 KiB pages, whatever the guest's page size.
pub const PAGE_SHIFT: u64 = 12;
const STAT_LEN: usize = 10;

/// What the host sees of the balloon.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BalloonStatus {
    /// The size the host asked for, in 4 KiB pages.
    pub target_pages: u32,
    /// The size the guest says it reached.
    pub actual_pages: u32,
    /// Pages given back to the host so far (inflated minus deflated, as the device saw them).
    pub inflated_pages: u64,
    /// The last statistics the guest reported: (tag, value); tags per virtio spec 5.5.6.3.
    pub stats: Vec<(u16, u64)>,
    pub stats_updated: Option<Instant>,
}

#[derive(Default)]
struct Shared {
    status: BalloonStatus,
    interrupt: Option<Arc<Interrupt>>,
}

/// Host-side control of a balloon, usable from any thread.
#[derive(Clone, Default)]
pub struct BalloonHandle {
    shared: Arc<Mutex<Shared>>,
}

impl std::fmt::Debug for BalloonHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonHandle")
            .field("status", &self.status())
            .finish()
    }
}

impl BalloonHandle {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the guest to grow (or shrink) the balloon to `pages` 4 KiB pages.
    pub fn set_target_pages(&self, pages: u32) {
        let mut s = self.lock();
        s.status.target_pages = pages;
        if let Some(i) = &s.interrupt {
            i.signal_config();
        }
    }

    pub fn status(&self) -> BalloonStatus {
        self.lock().status.clone()
    }
}

pub struct Balloon {
    handle: BalloonHandle,
    stats_interval: Option<Duration>,
}

impl Balloon {
    /// `stats_interval`: how often to ask the guest for fresh statistics (None: only once).
    pub fn new(target_pages: u32, stats_interval: Option<Duration>) -> Self {
        let handle = BalloonHandle::default();
        handle.lock().status.target_pages = target_pages;
        Self {
            handle,
            stats_interval,
        }
    }

    pub fn handle(&self) -> BalloonHandle {
        self.handle.clone()
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        F_STATS_VQ | F_DEFLATE_ON_OOM
    }
    fn config(&self) -> Vec<u8> {
        let s = self.handle.lock();
        let mut c = vec![0u8; 8];
        c[0..4].copy_from_slice(&s.status.target_pages.to_le_bytes());
        c[4..8].copy_from_slice(&s.status.actual_pages.to_le_bytes());
        c
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4) is driver-writable.
        if offset == 4 && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.handle.lock().status.actual_pages = v;
        }
    }
    fn activate(&mut self, a: Activation) -> Result<Box<dyn QueueHandler>, ActivateError> {
        let stats_negotiated = a.acked_features & F_STATS_VQ != 0;
        let want = if stats_negotiated { 3 } else { 2 };
        let got = a.queues.len();
        if got < want {
            return Err(ActivateError::QueueCount { got, want });
        }
        let mut qs = a.queues.into_iter();
        let (Some(inflate), Some(deflate)) = (qs.next(), qs.next()) else {
            return Err(ActivateError::QueueCount { got, want });
        };
        let stats = if stats_negotiated { qs.next() } else { None };
        self.handle.lock().interrupt = Some(a.interrupt.clone());
        Ok(Box::new(BalloonHandler {
            mem: a.mem,
            inflate,
            deflate,
            stats,
            held_stats: None,
            interrupt: a.interrupt,
            handle: self.handle.clone(),
            stats_interval: self.stats_interval,
            next_stats: None,
        }))
    }
    fn reset(&mut self) {
        let mut s = self.handle.lock();
        s.interrupt = None;
        s.status.actual_pages = 0;
    }
    fn save_device(&self) -> DeviceSnap {
        let s = self.handle.lock();
        DeviceSnap::Balloon {
            target_pages: s.status.target_pages,
            actual_pages: s.status.actual_pages,
        }
    }
    fn restore_device(&mut self, saved: &DeviceSnap) -> Result<(), StateError> {
        let DeviceSnap::Balloon {
            target_pages,
            actual_pages,
        } = saved
        else {
            return Err(StateError::Mismatch(format!(
                "saved {} state for a balloon device",
                saved.name()
            )));
        };
        let mut s = self.handle.lock();
        s.status.target_pages = *target_pages;
        s.status.actual_pages = *actual_pages;
        // The pages the guest gave up are part of the memory image (zero or not present).
        s.status.inflated_pages = u64::from(*actual_pages);
        Ok(())
    }
}

struct BalloonHandler {
    mem: GuestMemoryMmap,
    inflate: Queue,
    deflate: Queue,
    stats: Option<Queue>,
    /// The stats buffer the guest lent us; returning it asks for fresh numbers.
    held_stats: Option<u16>,
    interrupt: Arc<Interrupt>,
    handle: BalloonHandle,
    stats_interval: Option<Duration>,
    next_stats: Option<Instant>,
}

/// Gives guest pages back to the host. Runs of consecutive PFNs go in one madvise call.
fn discard_pages(mem: &GuestMemoryMmap, pfns: &[u32]) -> u64 {
    let mut done = 0;
    let mut i = 0;
    while i < pfns.len() {
        let start = pfns[i];
        let mut n = 1u32;
        while i + (n as usize) < pfns.len() && pfns[i + n as usize] == start.wrapping_add(n) {
            n += 1;
        }
        i += n as usize;
        let addr = GuestAddress(u64::from(start) << PAGE_SHIFT);
        let len = (n as usize) << PAGE_SHIFT;
        let Ok(slices) = mem.get_slices(addr, len, vm_memory::Permissions::ReadWrite) else {
            continue;
        };
        // One slice per memory region the run touches; a PFN outside guest RAM (hostile)
        // ends the run there.
        for slice in slices {
            let Ok(slice) = slice else { break };
            // SAFETY: the slice is inside a guest memory mapping we own, page aligned since
            // regions and PFNs are; MADV_DONTNEED on private anonymous memory makes the pages
            // read as zero and frees them.
            let r = unsafe {
                libc::madvise(
                    slice.ptr_guard_mut().as_ptr().cast(),
                    slice.len(),
                    libc::MADV_DONTNEED,
                )
            };
            if r == 0 {
                done += (slice.len() >> PAGE_SHIFT) as u64;
            }
        }
    }
    done
}

fn read_pfns(mem: &GuestMemoryMmap, chain: &Chain) -> Vec<u32> {
    let len = chain.readable_len() / 4 * 4;
    let mut raw = vec![0u8; len];
    let got = chain::read_from(mem, &chain.readable, 0, &mut raw);
    raw[..got / 4 * 4]
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

impl BalloonHandler {
    fn process_pages(&mut self, inflate: bool) -> Result<(), DeviceError> {
        let mem = &self.mem;
        let (q, idx) = if inflate {
            (&mut self.inflate, 0)
        } else {
            (&mut self.deflate, 1)
        };
        let handle = &self.handle;
        let notify = chain::process_queue(q, mem, idx, |c: DescriptorChain<&GuestMemoryMmap>| {
            let chain = Chain::parse(mem, c);
            if chain.error.is_none() {
                let pfns = read_pfns(mem, &chain);
                // Counted before the chain is returned, so the driver never sees stale numbers.
                let mut s = handle.lock();
                if inflate {
                    s.status.inflated_pages += discard_pages(mem, &pfns);
                } else {
                    // Deflated pages fault back in on their next touch: nothing else to do.
                    s.status.inflated_pages =
                        s.status.inflated_pages.saturating_sub(pfns.len() as u64);
                }
            }
            Outcome::Done(0)
        })?;
        if notify {
            self.interrupt.signal_used_queue(idx);
        }
        Ok(())
    }

    fn process_stats(&mut self) -> Result<(), DeviceError> {
        let Some(q) = &mut self.stats else {
            return Ok(());
        };
        let mem = &self.mem;
        let err = |source| DeviceError::Queue { queue: 2, source };
        loop {
            let next = q.iter(mem).map_err(err)?.next();
            let Some(c) = next else { break };
            let head = c.head_index();
            let chain = Chain::parse(mem, c);
            let mut raw = vec![0u8; chain.readable_len().min(STAT_LEN * 64)];
            let got = chain::read_from(mem, &chain.readable, 0, &mut raw);
            let stats = raw[..got]
                .chunks_exact(STAT_LEN)
                .map(|b| {
                    let tag = u16::from_le_bytes([b[0], b[1]]);
                    let mut v = [0u8; 8];
                    v.copy_from_slice(&b[2..10]);
                    (tag, u64::from_le_bytes(v))
                })
                .collect();
            {
                let mut s = self.handle.lock();
                s.status.stats = stats;
                s.status.stats_updated = Some(Instant::now());
            }
            // A second buffer while we hold one: return the older one.
            if let Some(old) = self.held_stats.replace(head) {
                q.add_used(mem, old, 0).map_err(err)?;
                self.interrupt.signal_used_queue(2);
            }
        }
        if let Some(iv) = self.stats_interval {
            self.next_stats = Some(Instant::now() + iv);
        }
        Ok(())
    }

    /// Returns the held stats buffer: the guest refills it with fresh numbers.
    fn request_stats(&mut self) -> Result<(), DeviceError> {
        if let (Some(q), Some(head)) = (&mut self.stats, self.held_stats.take()) {
            q.add_used(&self.mem, head, 0)
                .map_err(|source| DeviceError::Queue { queue: 2, source })?;
            self.interrupt.signal_used_queue(2);
        }
        Ok(())
    }
}

impl QueueHandler for BalloonHandler {
    fn queue_states(&self) -> Vec<QueueSnap> {
        let mut out = vec![QueueSnap::of(&self.inflate), QueueSnap::of(&self.deflate)];
        if let Some(q) = &self.stats {
            let mut s = QueueSnap::of(q);
            if self.held_stats.is_some() {
                // The stats buffer we hold goes back to the avail side: a restored device
                // takes it again, and the driver keeps reporting.
                s.next_avail = s.next_avail.wrapping_sub(1);
            }
            out.push(s);
        }
        out
    }

    fn queue_notified(&mut self, queue: usize, _p: &Poller) -> Result<(), DeviceError> {
        match queue {
            0 => self.process_pages(true),
            1 => self.process_pages(false),
            2 => self.process_stats(),
            _ => Ok(()),
        }
    }

    fn next_timer(&self) -> Option<Duration> {
        self.held_stats?;
        self.next_stats
            .map(|t| t.saturating_duration_since(Instant::now()))
    }

    fn timer(&mut self, _p: &Poller) -> Result<(), DeviceError> {
        self.next_stats = None;
        self.request_stats()
    }
}
