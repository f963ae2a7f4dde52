//! Which guest pages virtio devices wrote, for live migration and diff snapshots: KVM's dirty
//! log sees only the vCPUs' writes, not a device thread's (disk reads, received packets,
//! random bytes written through the host mapping).
//!
//! Every buffer a device may write reaches it as a device-writable descriptor, and every
//! device parses its chains with [`super::chain::Chain::parse_into`]; that is where pages are
//! marked, before the device writes them. The log is cumulative: bits are only cleared by
//! [`start`]/[`clear`], called while the devices are parked, so a page marked before its write
//! can never be missed by a reader that looks after the devices parked.
//!
//! One log per process: a VMM process runs one VM, and chain parsing happens deep inside each
//! device's handler with no handle to the VMM. (vm-memory's `Bitmap` parameter would carry a
//! log through the memory type instead, a change to every device signature.)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

const PAGE_SHIFT: u64 = 12;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// One bit per guest page frame, from guest physical address 0.
static LOG: RwLock<Vec<AtomicU64>> = RwLock::new(Vec::new());

fn read() -> RwLockReadGuard<'static, Vec<AtomicU64>> {
    LOG.read().unwrap_or_else(|e| e.into_inner())
}

fn write() -> RwLockWriteGuard<'static, Vec<AtomicU64>> {
    LOG.write().unwrap_or_else(|e| e.into_inner())
}

/// Starts (or restarts, cleared) logging for guest addresses below `end`.
pub fn start(end: u64) {
    let pages = end.div_ceil(1 << PAGE_SHIFT);
    let mut log = write();
    *log = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
    ENABLED.store(true, Ordering::SeqCst);
}

/// Stops logging and frees the log.
pub fn stop() {
    ENABLED.store(false, Ordering::SeqCst);
    *write() = Vec::new();
}

pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Forgets every mark (the devices must be parked: what they wrote is accounted for).
pub fn clear() {
    for w in read().iter() {
        w.store(0, Ordering::SeqCst);
    }
}

/// Marks `[addr, addr + len)` as written by a device. Cheap when logging is off.
pub fn mark(addr: u64, len: u64) {
    if len == 0 || !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let log = read();
    let first = addr >> PAGE_SHIFT;
    let last = addr.saturating_add(len - 1) >> PAGE_SHIFT;
    for pfn in first..=last {
        let Some(w) = log.get((pfn / 64) as usize) else {
            // Outside guest memory: the chain parser refuses such buffers anyway.
            return;
        };
        w.fetch_or(1 << (pfn % 64), Ordering::Relaxed);
    }
}

/// The marks for the region `[gpa, gpa + size)` as a bitmap relative to `gpa` (bit i = page
/// `gpa / 4096 + i`), the layout of KVM's dirty log. Marks stay set.
pub fn region(gpa: u64, size: u64) -> Vec<u64> {
    let pages = size >> PAGE_SHIFT;
    let mut out = vec![0u64; pages.div_ceil(64) as usize];
    let log = read();
    let base = gpa >> PAGE_SHIFT;
    for (w, o) in out.iter_mut().enumerate() {
        let first = base + w as u64 * 64;
        let count = (pages - w as u64 * 64).min(64);
        let mut v = 0u64;
        for i in 0..count {
            let pfn = first + i;
            let set = log
                .get((pfn / 64) as usize)
                .is_some_and(|x| x.load(Ordering::Relaxed) & (1 << (pfn % 64)) != 0);
            if set {
                v |= 1 << i;
            }
        }
        *o = v;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit `pfn` of a region bitmap.
    fn bit(map: &[u64], pfn: u64) -> bool {
        map[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
    }

    // The log is process-wide and other tests parse chains in parallel: this one uses pages
    // far above any other test's buffers and checks only those.
    #[test]
    fn marks_pages_of_ranges_and_reports_them_per_region() {
        const BASE: u64 = 0xf000_0000;
        const P: u64 = BASE >> 12;
        mark(BASE + 0x5000, 10);
        start(1 << 32);
        assert!(!bit(&region(0, 1 << 32), P + 5), "off means off");
        mark(BASE + 0x5ff0, 0x20); // pages 5 and 6
        mark(BASE + 0x40000, 1); // page 64
        mark(1 << 40, 4096); // outside: ignored
        let r = region(0, 1 << 32);
        assert!(bit(&r, P + 5) && bit(&r, P + 6) && bit(&r, P + 64));
        assert!(!bit(&r, P + 4) && !bit(&r, P + 7) && !bit(&r, P + 63));
        // Relative to a region that starts at page 4.
        let r = region(BASE + 0x4000, 0x10000);
        assert_eq!(r[0] & 0b111, 0b110);
        // Reading does not clear; clear does.
        assert!(bit(&region(BASE, 0x10000), 5));
        clear();
        assert!(!bit(&region(BASE, 0x10000), 5));
        stop();
        assert!(!is_enabled());
    }
}
