//! Guest physical memory as the software CPU sees it: the RAM regions the VMM mapped (host
//! pointers) and, per 4 KiB page, a code version so decoded instructions are dropped when the
//! guest writes to a page it executes from. Everything that hits no region is MMIO.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use corefour_hypervisor::MemoryRegion;

pub const PAGE: u64 = 4096;

/// One RAM region plus its per-page code versions.
///
/// A page's version word is `generation << 1 | has_code`. Decoding from a page sets
/// `has_code`; a write to a page with `has_code` set bumps the generation and clears it, so a
/// cached block compares one word to know it is still valid.
pub struct Region {
    pub gpa: u64,
    pub size: u64,
    pub host: *mut u8,
    pub read_only: bool,
    pub slot: u32,
    pub log_dirty: bool,
    pub code: Box<[AtomicU32]>,
    pub dirty: Box<[AtomicU64]>,
}

// SAFETY: `host` points at a mapping the VMM promised (Vm::set_memory_region's contract) stays
// valid for the VM's life; guest memory is shared between vCPU threads by design, as on KVM.
unsafe impl Send for Region {}
// SAFETY: see `Send`; all accesses through `host` are raw, unsynchronised guest-memory accesses
// (like the real hardware) or go through atomics for locked instructions.
unsafe impl Sync for Region {}

impl Region {
    pub fn new(r: &MemoryRegion) -> Self {
        let pages = r.size.div_ceil(PAGE) as usize;
        Region {
            gpa: r.guest_phys_addr,
            size: r.size,
            host: r.host_addr as *mut u8,
            read_only: r.read_only,
            slot: r.slot,
            log_dirty: r.log_dirty,
            code: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    #[inline]
    pub fn contains(&self, gpa: u64) -> bool {
        gpa.wrapping_sub(self.gpa) < self.size
    }

    /// Records a guest write to the page at `gpa` (dirty log and code invalidation).
    /// Returns true when the page held decoded code.
    #[inline]
    pub fn note_write(&self, gpa: u64) -> bool {
        let page = ((gpa - self.gpa) / PAGE) as usize;
        if self.log_dirty {
            self.dirty[page / 64].fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
        let c = &self.code[page];
        let v = c.load(Ordering::Acquire);
        if v & 1 != 0 {
            c.store((v | 1).wrapping_add(1), Ordering::Release);
            true
        } else {
            false
        }
    }
}

/// The guest-physical address space of one VM.
#[derive(Default)]
pub struct PhysMem {
    pub regions: Vec<Region>,
}

impl PhysMem {
    #[inline]
    pub fn find(&self, gpa: u64) -> Option<&Region> {
        self.regions.iter().find(|r| r.contains(gpa))
    }

    /// A host pointer for `len` bytes at `gpa` if they all lie in one RAM region.
    #[inline]
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Option<(*mut u8, &Region)> {
        let r = self.find(gpa)?;
        let off = gpa - r.gpa;
        if off + len > r.size {
            return None;
        }
        // SAFETY: off + len <= size, inside the mapping.
        Some((unsafe { r.host.add(off as usize) }, r))
    }

    /// Takes the dirty bitmap of `slot`, one bit per page.
    pub fn take_dirty(&self, slot: u32) -> Option<Vec<u64>> {
        let r = self.regions.iter().find(|r| r.slot == slot)?;
        Some(
            r.dirty
                .iter()
                .map(|w| w.swap(0, Ordering::Relaxed))
                .collect(),
        )
    }
}
