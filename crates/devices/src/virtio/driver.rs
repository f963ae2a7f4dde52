//! A small virtio-mmio *driver* written in host code: it performs the status handshake through
//! the transport's registers, lays out split rings in guest memory and submits chains, exactly
//! as a guest would. Tests, the fuzz targets and `corefour bench io` drive devices with it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::features;
use super::status;
use crate::{BusDevice, IrqLine};

/// An interrupt line that counts edges and lets a thread wait for the next one.
#[derive(Default)]
pub struct CountingIrq {
    count: AtomicU64,
    /// Threads inside `wait_past`: with none, `trigger` is one atomic add (no lock, no
    /// futex wake), as cheap for the device as an irqfd write.
    waiters: std::sync::atomic::AtomicU32,
    lock: Mutex<()>,
    cv: Condvar,
}

impl CountingIrq {
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until the count exceeds `seen` or `timeout` passes; returns the count.
    pub fn wait_past(&self, seen: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        // Registered before the count is checked under the lock: a trigger that misses the
        // registration has already bumped the count this thread then sees.
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let c = loop {
            let c = self.count();
            let now = Instant::now();
            if c > seen || now >= deadline {
                break c;
            }
            g = match self.cv.wait_timeout(g, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        };
        drop(g);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        c
    }
}

impl IrqLine for CountingIrq {
    fn trigger(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            // Taking the lock orders this against a waiter between its check and its wait;
            // notifying after releasing it lets the woken thread take it without spinning.
            drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()));
            self.cv.notify_all();
        }
    }
    fn set_level(&self, level: bool) {
        if level {
            self.trigger();
        }
    }
}

/// An interrupt line that costs the device what KVM's irqfd costs it: one eventfd write per
/// interrupt, whether or not anybody sleeps on it. The waiting side first polls the count for
/// a while and only then sleeps on the eventfd, as KVM polls a halted vCPU (`halt_poll_ns`)
/// before it schedules the vCPU thread out. `corefour bench io` drives its devices with it:
/// [`CountingIrq`] makes an interrupt nearly free for the device while nobody waits, which a
/// real VMM's never is.
pub struct IrqfdLine {
    count: AtomicU64,
    efd: vmm_sys_util::eventfd::EventFd,
}

impl IrqfdLine {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            count: AtomicU64::new(0),
            efd: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until the count exceeds `seen`: spinning for up to `poll`, then asleep on the
    /// eventfd until `timeout` has passed in all. Returns the count.
    pub fn wait_past(&self, seen: u64, poll: Duration, timeout: Duration) -> u64 {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let c = self.count();
            if c > seen {
                return c;
            }
            spins += 1;
            if spins.is_multiple_of(32) && start.elapsed() >= poll {
                break;
            }
            std::hint::spin_loop();
        }
        loop {
            let c = self.count();
            let left = timeout.saturating_sub(start.elapsed());
            if c > seen || left.is_zero() {
                return c;
            }
            let mut pfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.efd),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis() + 1).unwrap_or(libc::c_int::MAX);
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut pfd, 1, ms) } > 0 {
                // Drained after the wake, not before each sleep: one system call less per
                // wait. An interrupt after the drain is in the count before it writes the
                // eventfd again, so at worst the next poll returns at once and loops.
                let _ = self.efd.read();
            }
        }
    }
}

impl IrqLine for IrqfdLine {
    fn trigger(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        // Cannot fail short of counter overflow; the waiter rereads the count anyway.
        let _ = self.efd.write(1);
    }
    fn set_level(&self, level: bool) {
        if level {
            self.trigger();
        }
    }
}

/// One descriptor as the driver offers it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// The driver's view of one split queue.
#[derive(Debug, Clone, Copy)]
pub struct DriverQueue {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("bad magic/version: not a virtio-mmio v2 device")]
    NotVirtio,
    #[error("device refused FEATURES_OK")]
    FeaturesRefused,
    #[error("queue {0}: device offers no queue")]
    NoQueue(u32),
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("device did not activate (status {0:#x})")]
    NotActivated(u32),
}

pub struct MmioDriver<'a> {
    pub dev: &'a dyn BusDevice,
    pub mem: GuestMemoryMmap,
    pub queues: Vec<DriverQueue>,
    /// Next free guest address for [`MmioDriver::alloc`].
    heap: u64,
    pub features: u64,
    /// Where notifications go: None = the MMIO QueueNotify register; Some((base, multiplier))
    /// = a 16-bit write of the queue index at `base + q * multiplier` (virtio-pci).
    pub notify_at: Option<(u64, u64)>,
}

impl DriverQueue {
    /// The used index this driver has consumed up to.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Lays out a queue of `size` at `at` (zeroed, as a driver allocates it); returns it and
    /// the next page-aligned free address.
    pub fn layout(mem: &GuestMemoryMmap, at: u64, size: u16) -> Result<(Self, u64), DriverError> {
        let n = u64::from(size);
        let desc = at;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        let end = (used + 6 + 8 * n + 4095) & !4095;
        mem.write_slice(&vec![0u8; (end - desc) as usize], GuestAddress(desc))?;
        Ok((
            DriverQueue {
                size,
                desc: GuestAddress(desc),
                avail: GuestAddress(avail),
                used: GuestAddress(used),
                next_desc: 0,
                avail_idx: 0,
                last_used: 0,
            },
            end,
        ))
    }
}

impl MmioDriver<'_> {
    /// Writes `v` at `at`: a plain store where the ring lies in one region (as a guest's
    /// driver does), vm-memory otherwise.
    fn put<T: vm_memory::ByteValued>(&self, v: T, at: GuestAddress) -> Result<(), DriverError> {
        match super::chain::host_ptr(&self.mem, at, std::mem::size_of::<T>()) {
            Some(p) => {
                // SAFETY: `p` covers size_of::<T>() bytes of mapped guest memory; unaligned
                // because hostile tests place rings anywhere.
                unsafe {
                    if p.cast::<T>().is_aligned() {
                        std::ptr::write_volatile(p.cast::<T>(), v)
                    } else {
                        std::ptr::write_unaligned(p.cast::<T>(), v)
                    }
                };
                Ok(())
            }
            None => Ok(self.mem.write_obj(v, at)?),
        }
    }

    fn get<T: vm_memory::ByteValued>(&self, at: GuestAddress) -> Result<T, DriverError> {
        match super::chain::host_ptr(&self.mem, at, std::mem::size_of::<T>()) {
            // SAFETY: `p` covers size_of::<T>() bytes of mapped guest memory (unaligned: see
            // `put`); the fences around ring updates order it against the device.
            // Volatile where aligned (always, for the rings this driver lays out): the device
            // writes these concurrently and a spin loop must see each new value.
            Some(p) => Ok(unsafe {
                if p.cast::<T>().is_aligned() {
                    std::ptr::read_volatile(p.cast::<T>())
                } else {
                    std::ptr::read_unaligned(p.cast::<T>())
                }
            }),
            None => Ok(self.mem.read_obj(at)?),
        }
    }
}

impl<'a> MmioDriver<'a> {
    /// Resets the device, negotiates features (all offered ones, masked by `feature_mask`),
    /// sets up `nqueues` queues of `size` at `ring_base` and sets DRIVER_OK. Buffers from
    /// [`MmioDriver::alloc`] start at `heap`.
    pub fn init(
        dev: &'a dyn BusDevice,
        mem: GuestMemoryMmap,
        nqueues: u32,
        size: u16,
        ring_base: u64,
        heap: u64,
        feature_mask: u64,
    ) -> Result<Self, DriverError> {
        let mut d = MmioDriver {
            dev,
            mem,
            queues: Vec::new(),
            heap,
            features: 0,
            notify_at: None,
        };
        if d.r(0) != 0x7472_6976 || d.r(4) != 2 {
            return Err(DriverError::NotVirtio);
        }
        d.w(0x70, 0);
        d.w(0x70, status::ACKNOWLEDGE);
        d.w(0x70, status::ACKNOWLEDGE | status::DRIVER);
        d.w(0x14, 0);
        let lo = u64::from(d.r(0x10));
        d.w(0x14, 1);
        let hi = u64::from(d.r(0x10));
        d.features = ((hi << 32) | lo) & (feature_mask | features::VERSION_1);
        d.w(0x24, 0);
        d.w(0x20, d.features as u32);
        d.w(0x24, 1);
        d.w(0x20, (d.features >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        d.w(0x70, s);
        if d.r(0x70) & status::FEATURES_OK == 0 {
            return Err(DriverError::FeaturesRefused);
        }
        let mut at = ring_base;
        for i in 0..nqueues {
            d.w(0x30, i);
            let max = d.r(0x34);
            if max == 0 {
                return Err(DriverError::NoQueue(i));
            }
            let size = size.min(max as u16);
            let (dq, next) = DriverQueue::layout(&d.mem, at, size)?;
            at = next;
            let (desc, avail, used) = (dq.desc.0, dq.avail.0, dq.used.0);
            d.w(0x38, u32::from(size));
            d.w(0x80, desc as u32);
            d.w(0x84, (desc >> 32) as u32);
            d.w(0x90, avail as u32);
            d.w(0x94, (avail >> 32) as u32);
            d.w(0xa0, used as u32);
            d.w(0xa4, (used >> 32) as u32);
            d.w(0x44, 1);
            d.queues.push(dq);
        }
        d.w(0x70, s | status::DRIVER_OK);
        let st = d.r(0x70);
        if st & (status::FAILED | status::DEVICE_NEEDS_RESET) != 0 {
            return Err(DriverError::NotActivated(st));
        }
        Ok(d)
    }

    pub fn r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn w(&self, off: u64, v: u32) {
        self.dev.write(off, &v.to_le_bytes());
    }

    /// Reserves `len` bytes of guest memory (8-byte aligned) for buffers.
    pub fn alloc(&mut self, len: u64) -> GuestAddress {
        let a = self.heap;
        self.heap = (self.heap + len + 7) & !7;
        GuestAddress(a)
    }

    /// Writes descriptors verbatim into queue `q`'s table starting at the queue's next free
    /// slot; `next` fields are used as given (hostile tests control them). Returns the first
    /// slot index.
    pub fn write_descs(&mut self, q: usize, descs: &[Desc]) -> Result<u16, DriverError> {
        let dq = self.queues[q];
        let first = dq.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let slot = (first as usize + i) % dq.size as usize;
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
            raw[14..16].copy_from_slice(&d.next.to_le_bytes());
            self.put(raw, dq.desc.unchecked_add(16 * slot as u64))?;
        }
        let dq = &mut self.queues[q];
        dq.next_desc = ((first as usize + descs.len()) % dq.size as usize) as u16;
        Ok(first)
    }

    /// Puts `head` on the avail ring (not yet visible: see [`MmioDriver::publish`]).
    pub fn push_avail(&mut self, q: usize, head: u16) -> Result<(), DriverError> {
        let dq = self.queues[q];
        let slot = u64::from(dq.avail_idx % dq.size);
        self.put(head.to_le(), dq.avail.unchecked_add(4 + 2 * slot))?;
        let dq = &mut self.queues[q];
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Makes pushed heads visible (avail idx), asks for an interrupt on every used entry
    /// (used_event = last seen) and notifies the device unless, with event idx, the device said
    /// (avail_event) it is still working through earlier entries. Returns whether it notified.
    pub fn publish(&mut self, q: usize) -> Result<bool, DriverError> {
        self.publish_with(q, true)
    }

    /// As [`MmioDriver::publish`]; `arm` false leaves used_event alone (Linux's
    /// virtqueue_kick: a driver that arms its interrupt only before it waits).
    pub fn publish_with(&mut self, q: usize, arm: bool) -> Result<bool, DriverError> {
        let dq = self.queues[q];
        if arm {
            self.put(
                dq.last_used.to_le(),
                dq.avail.unchecked_add(4 + 2 * u64::from(dq.size)),
            )?;
        }
        let old: u16 = self
            .get::<u16>(dq.avail.unchecked_add(2))
            .map(u16::from_le)?;
        std::sync::atomic::fence(Ordering::SeqCst);
        self.put(dq.avail_idx.to_le(), dq.avail.unchecked_add(2))?;
        std::sync::atomic::fence(Ordering::SeqCst);
        let kick = if self.features & features::RING_EVENT_IDX != 0 {
            let event: u16 = self
                .get::<u16>(dq.used.unchecked_add(4 + 8 * u64::from(dq.size)))
                .map(u16::from_le)?;
            // vring_need_event: did the new entries cross the index the device asked about?
            dq.avail_idx.wrapping_sub(event).wrapping_sub(1) < dq.avail_idx.wrapping_sub(old)
        } else {
            true
        };
        if kick {
            self.notify(q);
        }
        Ok(kick)
    }

    /// Asks for an interrupt on the next used entry (used_event = last seen), as Linux's
    /// virtqueue_enable_cb does after draining; callers re-check the ring afterwards.
    pub fn arm_interrupt(&mut self, q: usize) -> Result<(), DriverError> {
        self.arm_interrupt_after(q, 1)
    }

    /// Asks for an interrupt once `n` (at least 1) more entries are used, as Linux's
    /// virtqueue_enable_cb_delayed does; only meaningful with event idx.
    pub fn arm_interrupt_after(&mut self, q: usize, n: u16) -> Result<(), DriverError> {
        let dq = self.queues[q];
        let event = dq.last_used.wrapping_add(n.max(1) - 1);
        self.put(
            event.to_le(),
            dq.avail.unchecked_add(4 + 2 * u64::from(dq.size)),
        )?;
        std::sync::atomic::fence(Ordering::SeqCst);
        Ok(())
    }

    /// Forces the avail index to `idx` (hostile tests).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) -> Result<(), DriverError> {
        let dq = &mut self.queues[q];
        dq.avail_idx = idx;
        self.mem.write_obj(idx.to_le(), dq.avail.unchecked_add(2))?;
        Ok(())
    }

    pub fn notify(&self, q: usize) {
        match self.notify_at {
            Some((base, mult)) => self
                .dev
                .write(base + q as u64 * mult, &(q as u16).to_le_bytes()),
            None => self.w(0x50, q as u32),
        }
    }

    /// A driver over queues set up by other means (the PCI test does its own handshake).
    pub fn with_queues(
        dev: &'a dyn BusDevice,
        mem: GuestMemoryMmap,
        queues: Vec<DriverQueue>,
        heap: u64,
        features: u64,
        notify_at: (u64, u64),
    ) -> Self {
        MmioDriver {
            dev,
            mem,
            queues,
            heap,
            features,
            notify_at: Some(notify_at),
        }
    }

    /// A chain of `bufs` (address, length, device-writable), linked in order, published and
    /// notified.
    pub fn submit(
        &mut self,
        q: usize,
        bufs: &[(GuestAddress, u32, bool)],
    ) -> Result<u16, DriverError> {
        let head = self.queue_chain(q, bufs)?;
        self.publish(q)?;
        Ok(head)
    }

    /// Like [`MmioDriver::submit`] without publishing: batch several, then `publish` once.
    pub fn queue_chain(
        &mut self,
        q: usize,
        bufs: &[(GuestAddress, u32, bool)],
    ) -> Result<u16, DriverError> {
        let first = self.queues[q].next_desc;
        let size = self.queues[q].size;
        // One descriptor at a time: no allocation per request (the benchmark's driver).
        for (i, &(a, len, w)) in bufs.iter().enumerate() {
            self.write_descs(
                q,
                &[Desc {
                    addr: a.0,
                    len,
                    flags: if w { DESC_F_WRITE } else { 0 }
                        | if i + 1 < bufs.len() { DESC_F_NEXT } else { 0 },
                    next: ((first as usize + i + 1) % size as usize) as u16,
                }],
            )?;
        }
        self.push_avail(q, first)?;
        Ok(first)
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        let dq = &self.queues[q];
        self.get::<u16>(dq.used.unchecked_add(2))
            .map(u16::from_le)
            .unwrap_or(0)
    }

    /// The next used element (id, len), if the device returned one.
    pub fn pop_used(&mut self, q: usize) -> Option<(u32, u32)> {
        let idx = self.used_idx(q);
        let dq = self.queues[q];
        if idx == dq.last_used {
            return None;
        }
        std::sync::atomic::fence(Ordering::Acquire);
        let slot = u64::from(dq.last_used % dq.size);
        let at = dq.used.unchecked_add(4 + 8 * slot);
        let id = self.get::<u32>(at).ok()?;
        let len = self.get::<u32>(at.unchecked_add(4)).ok()?;
        let dq = &mut self.queues[q];
        dq.last_used = dq.last_used.wrapping_add(1);
        Some((u32::from_le(id), u32::from_le(len)))
    }

    /// Waits up to `timeout` for the next used element.
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            if let Some(u) = self.pop_used(q) {
                return Some(u);
            }
            if Instant::now() >= deadline {
                return None;
            }
            spins += 1;
            if spins < 200 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }

    /// Device status as the driver reads it.
    pub fn status(&self) -> u32 {
        self.r(0x70)
    }
}

impl MmioDriver<'_> {
    /// Plays a hostile driver from raw bytes (fuzz targets and randomized tests): descriptors
    /// (16 bytes each, addresses folded so most land in or near guest memory), then the heads
    /// to offer, then bytes for the buffers. The avail index is published as is; the caller
    /// then waits with [`MmioDriver::settle`].
    pub fn feed_raw(&mut self, q: usize, data: &[u8], mem_size: u64) -> Result<(), DriverError> {
        let size = usize::from(self.queues[q].size);
        let (table, rest) = data.split_at(data.len().min(16 * size));
        let descs: Vec<Desc> = table
            .chunks_exact(16)
            .map(|c| {
                let raw = u64::from_le_bytes(c[0..8].try_into().unwrap_or_default());
                // Low bit pattern chooses: inside memory (common), near its end, or anything.
                let addr = match raw & 3 {
                    0 => raw,
                    1 => mem_size.wrapping_sub(raw >> 52),
                    _ => (raw >> 2) % mem_size.max(1),
                };
                Desc {
                    addr,
                    len: u32::from_le_bytes(c[8..12].try_into().unwrap_or_default()) % 0x2_0000,
                    flags: u16::from_le_bytes([c[12], c[13]]) & 0x7,
                    next: u16::from_le_bytes([c[14], c[15]]),
                }
            })
            .collect();
        self.write_descs(q, &descs)?;
        let (heads, fill) = rest.split_at(rest.len().min(2 * size));
        for h in heads.chunks_exact(2) {
            self.push_avail(q, u16::from_le_bytes([h[0], h[1]]) % (size as u16 * 2))?;
        }
        // Buffer contents: the device reads headers and PFN lists from here.
        if !fill.is_empty() {
            let at = (mem_size / 2) & !0xfff;
            let n = fill.len().min((mem_size - at) as usize);
            self.mem.write_slice(&fill[..n], GuestAddress(at))?;
        }
        // A hostile driver kicks whether or not the device asked for it.
        self.publish(q)?;
        self.notify(q);
        Ok(())
    }

    /// Waits until the device stops returning buffers on queue `q` (or `timeout` passes);
    /// returns false on timeout, which for a bounded input means the device hung.
    pub fn settle(&self, q: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut last = self.used_idx(q);
        let mut quiet = 0;
        while quiet < 3 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
            let now = self.used_idx(q);
            if now == last {
                quiet += 1;
            } else {
                quiet = 0;
                last = now;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn irqfd_line_wakes_a_sleeping_waiter_and_times_out_without_one() {
        let irq = Arc::new(IrqfdLine::new().unwrap());
        let t0 = Instant::now();
        assert_eq!(
            irq.wait_past(0, Duration::ZERO, Duration::from_millis(30)),
            0
        );
        assert!(
            t0.elapsed() >= Duration::from_millis(30),
            "slept the timeout"
        );
        let other = irq.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            other.trigger();
        });
        let t0 = Instant::now();
        assert_eq!(
            irq.wait_past(0, Duration::from_micros(5), Duration::from_secs(5)),
            1
        );
        assert!(
            t0.elapsed() < Duration::from_secs(4),
            "woken by the trigger"
        );
        h.join().unwrap();
        // A trigger before the wait is not lost.
        irq.set_level(true);
        assert_eq!(irq.wait_past(1, Duration::ZERO, Duration::from_secs(5)), 2);
    }
}
