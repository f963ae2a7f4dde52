//! Paging (none, 32-bit, PAE, 4-level) behind a software TLB whose hit is one compare and one
//! add: an entry keeps the virtual page as a tag per access kind and `addend` = host − guest
//! virtual. MMIO pages, read-only RAM, pages holding decoded code (for writes) and pages whose
//! dirty bit is not yet set never get a write tag, so those writes take the slow path.

use crate::cpu::*;

pub const TLB_BITS: u32 = 10;
pub const TLB_SIZE: usize = 1 << TLB_BITS;
const NONE: u64 = 1;
const PAGE_MASK: u64 = !0xfff;

/// 32 bytes, two to a cache line: what translated code and the hit paths read. What only
/// flushes need lives beside the entries (`Tlb::meta`).
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub struct Entry {
    pub read: u64,
    pub write: u64,
    pub exec: u64,
    pub addend: u64,
}

const EMPTY: Entry = Entry {
    read: NONE,
    write: NONE,
    exec: NONE,
    addend: 0,
};

/// `Tlb::meta` bits: the entry is global; the rest is log2 of the size of the guest page
/// the entry is a 4 KiB piece of (12 for a 4 KiB page): INVLPG anywhere in a large page
/// drops every piece of it.
const META_GLOBAL: u8 = 0x80;
const META_SHIFT: u8 = 0x3f;

const SETS: usize = 4;

/// Entries per set of the second level: a direct-mapped copy of what the first level held,
/// looked at only when the first misses, so conflict misses in the small first level (two
/// thirds of a Linux boot's misses) cost a copy instead of a page walk.
pub const FAR_SIZE: usize = 4096;

/// A second-level entry: the first-level entry, the guest-physical page and the meta bits.
#[derive(Clone, Copy)]
struct Far {
    read: u64,
    write: u64,
    exec: u64,
    addend: u64,
    phys: u64,
    meta: u8,
}

const FAR_EMPTY: Far = Far {
    read: NONE,
    write: NONE,
    exec: NONE,
    addend: 0,
    phys: 0,
    meta: 12,
};

/// Bit `k` set: entry `k` may hold a tag (bitmaps over a level's entries, set by set).
type Live = Box<[u64]>;

/// Non-global, global, and (a subset of either) large-page entries.
fn live(entries: usize) -> [Live; 3] {
    std::array::from_fn(|_| vec![0; entries / 64].into_boxed_slice())
}

#[inline]
fn mark(live: &mut [Live; 3], k: usize, meta: u8) {
    let (w, b) = (k / 64, 1u64 << (k % 64));
    let global = meta & META_GLOBAL != 0;
    live[global as usize][w] |= b;
    live[!global as usize][w] &= !b;
    if meta & META_SHIFT > 12 {
        live[BIG][w] |= b;
    } else {
        live[BIG][w] &= !b;
    }
}

const BIG: usize = 2;

/// Calls `f` with every entry number marked in `words`.
#[inline]
fn each(words: &[u64], mut f: impl FnMut(usize)) {
    for (w, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            f(w * 64 + bits.trailing_zeros() as usize);
            bits &= bits - 1;
        }
    }
}

/// Data entries (`e`) and instruction-fetch entries (`x`, so code and the data it touches
/// never evict each other), each in two sets: supervisor and user (CPL 3) accesses; behind
/// them a larger second level (`far`).
///
/// Flushes cost what was filled since, not the TLB's size: bitmaps mark the entries that
/// may hold a tag, global and non-global apart, so a CR3 load (thousands in a Linux boot)
/// clears just the non-global entries filled since the last one, and global entries stay,
/// as on the CPU.
pub struct Tlb {
    pub e: Box<[[Entry; TLB_SIZE]; 2]>,
    pub x: Box<[[Entry; TLB_SIZE]; 2]>,
    /// Over `s * TLB_SIZE + i` (entry `i` of set `s`: e supervisor/user, then x), for
    /// non-global and global entries.
    live: [Live; 3],
    /// Per entry, numbered as in `live`: global bit and page size (`META_*`).
    meta: Box<[u8; SETS * TLB_SIZE]>,
    /// The second level (`FAR_SIZE` entries per set, sets as in `live`) and its bitmaps.
    far: Box<[Far]>,
    far_live: [Live; 3],
    /// Entries filled from a large page since the last full flush (INVLPG then searches
    /// for the other pieces of the page it names).
    big: u32,
    pub flushes_all: u64,
    pub flushes_nonglobal: u64,
}

impl Tlb {
    pub fn new() -> Self {
        Tlb {
            e: Box::new([[EMPTY; TLB_SIZE]; 2]),
            x: Box::new([[EMPTY; TLB_SIZE]; 2]),
            live: live(SETS * TLB_SIZE),
            meta: Box::new([12; SETS * TLB_SIZE]),
            far: vec![FAR_EMPTY; SETS * FAR_SIZE].into_boxed_slice(),
            far_live: live(SETS * FAR_SIZE),
            big: 0,
            flushes_all: 0,
            flushes_nonglobal: 0,
        }
    }

    #[inline]
    fn entry(&mut self, k: usize) -> &mut Entry {
        let (set, i) = (k / TLB_SIZE, k % TLB_SIZE);
        if set < 2 {
            &mut self.e[set][i]
        } else {
            &mut self.x[set - 2][i]
        }
    }

    /// Installs `v` (linear `page` onto guest-physical `phys`) in data (`fetch` false) or
    /// fetch set `user`, in both levels.
    #[inline]
    fn set(&mut self, fetch: bool, user: bool, page: u64, v: Entry, phys: u64, meta: u8) {
        let set = (fetch as usize) << 1 | user as usize;
        let j = set * FAR_SIZE + ((page >> 12) as usize & (FAR_SIZE - 1));
        mark(&mut self.far_live, j, meta);
        self.far[j] = Far {
            read: v.read,
            write: v.write,
            exec: v.exec,
            addend: v.addend,
            phys,
            meta,
        };
        self.set_near(
            set * TLB_SIZE + ((page >> 12) as usize & (TLB_SIZE - 1)),
            v,
            meta,
        );
    }

    #[inline]
    fn set_near(&mut self, k: usize, v: Entry, meta: u8) {
        mark(&mut self.live, k, meta);
        if meta & META_SHIFT > 12 {
            self.big = self.big.saturating_add(1);
        }
        self.meta[k] = meta;
        *self.entry(k) = v;
    }

    /// On a first-level miss: copies the second-level entry for `lin` in if it allows
    /// `acc`, and returns the guest-physical address.
    #[inline]
    fn refill(&mut self, lin: u64, acc: Acc, user: bool) -> Option<u64> {
        let set = ((acc == Acc::X) as usize) << 1 | user as usize;
        let page = lin & PAGE_MASK;
        let f = self.far[set * FAR_SIZE + ((lin >> 12) as usize & (FAR_SIZE - 1))];
        let tag = match acc {
            Acc::R => f.read,
            Acc::W => f.write,
            Acc::X => f.exec,
        };
        if tag != page {
            return None;
        }
        let e = Entry {
            read: f.read,
            write: f.write,
            exec: f.exec,
            addend: f.addend,
        };
        self.set_near(
            set * TLB_SIZE + ((lin >> 12) as usize & (TLB_SIZE - 1)),
            e,
            f.meta,
        );
        Some(f.phys | (lin & 0xfff))
    }

    /// Empties every non-global (and with `global`, every global) entry of both levels.
    fn clear(&mut self, global: bool) {
        if global {
            self.live[BIG].fill(0);
            self.far_live[BIG].fill(0);
        }
        for g in 0..=global as usize {
            let mut near = std::mem::take(&mut self.live[g]);
            each(&near, |k| *self.entry(k) = EMPTY);
            near.fill(0);
            self.live[g] = near;
            let far = &mut self.far;
            each(&self.far_live[g], |k| far[k] = FAR_EMPTY);
            self.far_live[g].fill(0);
        }
    }

    pub fn flush_all(&mut self) {
        self.flushes_all += 1;
        self.clear(true);
        self.big = 0;
    }

    pub fn flush_nonglobal(&mut self) {
        self.flushes_nonglobal += 1;
        self.clear(false);
    }

    /// INVLPG: drops the translation of the page holding `va`, global or not, and of the
    /// whole large page if it is part of one.
    pub fn flush_page(&mut self, va: u64) {
        let i = ((va >> 12) as usize) & (TLB_SIZE - 1);
        let j = ((va >> 12) as usize) & (FAR_SIZE - 1);
        let page = va & PAGE_MASK;
        for set in 0..SETS {
            let e = self.entry(set * TLB_SIZE + i);
            if e.read == page || e.write == page || e.exec == page {
                *e = EMPTY;
            }
            let f = &mut self.far[set * FAR_SIZE + j];
            if f.read == page || f.write == page || f.exec == page {
                *f = FAR_EMPTY;
            }
        }
        if self.big == 0 {
            return;
        }
        // Any piece of the same large page, in either level.
        let hit = |tags: [u64; 3], meta: u8| {
            let tag = tags.into_iter().find(|&t| t != NONE).unwrap_or(NONE);
            let shift = meta & META_SHIFT;
            shift > 12 && tag != NONE && (tag ^ va) >> shift == 0
        };
        {
            let g = BIG;
            let near = std::mem::take(&mut self.live[g]);
            each(&near, |k| {
                let m = self.meta[k];
                let e = self.entry(k);
                if hit([e.read, e.write, e.exec], m) {
                    *e = EMPTY;
                }
            });
            self.live[g] = near;
            let far = &mut self.far;
            each(&self.far_live[g], |k| {
                let f = &mut far[k];
                if hit([f.read, f.write, f.exec], f.meta) {
                    *f = FAR_EMPTY;
                }
            });
        }
    }

    /// Drops write tags on the host page at `host` (it now holds decoded code, so writes to
    /// it must take the slow path); every other entry stays.
    pub fn revoke_writes(&mut self, host: u64) {
        let stale = |write: u64, addend: u64| write != NONE && write.wrapping_add(addend) == host;
        for g in 0..2 {
            // Data sets are sets 0 and 1: the first two sets' worth of each bitmap.
            let far = &mut self.far;
            each(&self.far_live[g][..2 * FAR_SIZE / 64], |k| {
                if stale(far[k].write, far[k].addend) {
                    far[k].write = NONE;
                }
            });
            let near = std::mem::take(&mut self.live[g]);
            each(&near[..2 * TLB_SIZE / 64], |k| {
                let e = self.entry(k);
                if stale(e.write, e.addend) {
                    e.write = NONE;
                }
            });
            self.live[g] = near;
        }
    }
}

impl Default for Tlb {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Acc {
    R,
    W,
    X,
}

/// What a page walk found for one 4 KiB page.
struct Walk {
    phys: u64,
    write: bool,
    exec: bool,
    dirty: bool,
    global: bool,
    /// log2 of the guest page size.
    shift: u8,
}

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const G: u64 = 1 << 8;
const XD: u64 = 1 << 63;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

#[inline]
unsafe fn load(p: *const u8, size: usize) -> u64 {
    // SAFETY: the caller guarantees `p .. p+size` is inside a guest RAM mapping.
    unsafe {
        match size {
            1 => *p as u64,
            2 => (p as *const u16).read_unaligned() as u64,
            4 => (p as *const u32).read_unaligned() as u64,
            _ => (p as *const u64).read_unaligned(),
        }
    }
}

#[inline]
unsafe fn store(p: *mut u8, size: usize, v: u64) {
    // SAFETY: the caller guarantees `p .. p+size` is inside a writable guest RAM mapping.
    unsafe {
        match size {
            1 => *p = v as u8,
            2 => (p as *mut u16).write_unaligned(v as u16),
            4 => (p as *mut u32).write_unaligned(v as u32),
            _ => (p as *mut u64).write_unaligned(v),
        }
    }
}

/// Compare-and-swap loop of `f` on the `size`-byte value at `p`: (old value, stored).
///
/// # Safety
/// `p .. p+size` must be naturally aligned, writable memory valid for the call.
unsafe fn atomic_update(
    p: *mut u8,
    size: usize,
    f: &mut impl FnMut(u64) -> Option<u64>,
) -> (u64, bool) {
    use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering::SeqCst};
    macro_rules! cas {
        ($a:ty, $t:ty) => {{
            // SAFETY: the caller guarantees alignment and validity for `size` bytes.
            let a = unsafe { &*(p as *const $a) };
            let mut cur = a.load(SeqCst);
            loop {
                match f(cur as u64) {
                    None => {
                        // A locked instruction is a full barrier even when it writes nothing.
                        fence(SeqCst);
                        return (cur as u64, false);
                    }
                    Some(n) => match a.compare_exchange_weak(cur, n as $t, SeqCst, SeqCst) {
                        Ok(_) => return (cur as u64, true),
                        Err(c) => cur = c,
                    },
                }
            }
        }};
    }
    match size {
        1 => cas!(AtomicU8, u8),
        2 => cas!(AtomicU16, u16),
        4 => cas!(AtomicU32, u32),
        _ => cas!(AtomicU64, u64),
    }
}

impl Cpu {
    /// Reads `size` (1, 2, 4, 8) bytes at linear `lin` with the current privilege.
    #[inline(always)]
    pub fn read(&mut self, lin: u64, size: usize) -> X<u64> {
        let user = self.cpl == 3;
        self.read_as(lin, size, user)
    }

    #[inline(always)]
    pub fn write(&mut self, lin: u64, size: usize, v: u64) -> X<()> {
        let user = self.cpl == 3;
        self.write_as(lin, size, v, user)
    }

    #[inline(always)]
    pub fn read_as(&mut self, lin: u64, size: usize, user: bool) -> X<u64> {
        let e = &self.tlb.e[user as usize][((lin >> 12) as usize) & (TLB_SIZE - 1)];
        if e.read == lin & PAGE_MASK && (lin & 0xfff) as usize + size <= 0x1000 {
            // SAFETY: a read tag is only installed for a page wholly inside a RAM region.
            return Ok(unsafe { load(lin.wrapping_add(e.addend) as *const u8, size) });
        }
        self.read_slow(lin, size, user)
    }

    #[inline(always)]
    pub fn write_as(&mut self, lin: u64, size: usize, v: u64, user: bool) -> X<()> {
        let e = &self.tlb.e[user as usize][((lin >> 12) as usize) & (TLB_SIZE - 1)];
        if e.write == lin & PAGE_MASK && (lin & 0xfff) as usize + size <= 0x1000 {
            // SAFETY: a write tag is only installed for a writable RAM page without code.
            unsafe { store(lin.wrapping_add(e.addend) as *mut u8, size, v) };
            return Ok(());
        }
        self.write_slow(lin, size, v, user)
    }

    /// The host address of linear `lin` if the TLB already lets the current privilege read
    /// (or, with `write`, write) its page straight from RAM. For bulk copies that then stay
    /// inside that page.
    #[inline]
    pub fn tlb_host(&self, lin: u64, write: bool) -> Option<*mut u8> {
        let user = self.cpl == 3;
        let e = &self.tlb.e[user as usize][((lin >> 12) as usize) & (TLB_SIZE - 1)];
        let tag = if write { e.write } else { e.read };
        (tag == lin & PAGE_MASK).then(|| lin.wrapping_add(e.addend) as *mut u8)
    }

    #[cold]
    fn read_slow(&mut self, lin: u64, size: usize, user: bool) -> X<u64> {
        if (lin & 0xfff) as usize + size > 0x1000 {
            let mut v = 0;
            for i in 0..size {
                v |= self.read_as(lin.wrapping_add(i as u64), 1, user)? << (8 * i);
            }
            return Ok(v);
        }
        let pa = self.translate(lin, Acc::R, user)?;
        Ok(self.phys_read(pa, size))
    }

    #[cold]
    fn write_slow(&mut self, lin: u64, size: usize, v: u64, user: bool) -> X<()> {
        if (lin & 0xfff) as usize + size > 0x1000 {
            // Both pages must be writable before any byte lands.
            self.translate(lin, Acc::W, user)?;
            self.translate(lin.wrapping_add(size as u64 - 1), Acc::W, user)?;
            for i in 0..size {
                let pa = self.translate(lin.wrapping_add(i as u64), Acc::W, user)?;
                self.phys_write(pa, 1, v >> (8 * i));
            }
            return Ok(());
        }
        let pa = self.translate(lin, Acc::W, user)?;
        self.phys_write(pa, size, v);
        Ok(())
    }

    /// A LOCKed read-modify-write of `size` (1, 2, 4, 8) bytes at linear `lin` with the
    /// current privilege: `f` maps the old value to the new one (None leaves memory as it
    /// is, as a failed CMPXCHG). Returns the old value; `f` may be called more than once.
    ///
    /// Naturally aligned RAM operands use a host compare-and-swap, so the update is atomic
    /// against every other vCPU's access, plain stores included (a spinlock's release is a
    /// plain MOV: a read-then-write under a lock only other locked instructions take loses
    /// that store). Split or misaligned operands and MMIO serialise on the VM's lock.
    pub fn locked_rmw(
        &mut self,
        lin: u64,
        size: usize,
        mut f: impl FnMut(u64) -> Option<u64>,
    ) -> X<u64> {
        let user = self.cpl == 3;
        if lin & (size as u64 - 1) == 0 {
            if let Some((p, pa)) = self
                .rmw_host(lin, size, user)?
                .filter(|(p, _)| (*p as usize) & (size - 1) == 0)
            {
                // SAFETY: `p .. p+size` is naturally aligned inside a writable RAM mapping
                // that lives as long as `self.env.mem`; other vCPUs access it only through
                // plain or atomic loads and stores of the same memory.
                let (old, stored) = unsafe { atomic_update(p, size, &mut f) };
                if let (true, Some(pa)) = (stored, pa) {
                    if let Some((_, r)) = self.env.mem.host_ptr(pa, size as u64) {
                        if r.note_write(pa) {
                            self.brk = true;
                        }
                    }
                }
                return Ok(old);
            }
        }
        let vm = self.env.vm.clone();
        let _g = vm.locked();
        // Both ends must be writable before anything is read: a locked cycle always writes.
        self.translate(lin, Acc::W, user)?;
        self.translate(lin.wrapping_add(size as u64 - 1), Acc::W, user)?;
        let old = self.read_as(lin, size, user)?;
        let new = f(old).unwrap_or(old);
        self.write_as(lin, size, new, user)?;
        Ok(old)
    }

    /// LOCK CMPXCHG16B at 16-byte aligned linear `lin`: stores `new` if the value is `cmp`.
    /// Returns the old value. In RAM it is the host's own CMPXCHG16B (atomic against the other
    /// vCPUs' plain stores too); elsewhere it serialises on the VM's lock.
    pub fn locked_cmpxchg16(&mut self, lin: u64, cmp: u128, new: u128) -> X<u128> {
        let user = self.cpl == 3;
        #[cfg(target_arch = "x86_64")]
        if let Some((p, pa)) = self
            .rmw_host(lin, 16, user)?
            .filter(|(p, _)| (*p as usize) & 15 == 0)
        {
            // SAFETY: 16-byte aligned (checked by the caller), inside one writable RAM
            // mapping (`rmw_host`); every x86-64 host this JIT-ing emulator runs on has
            // CMPXCHG16B. RBX is LLVM's: the new low half is swapped in and back around it.
            let (old, ok) = unsafe {
                let (lo, hi): (u64, u64);
                let ok: u8;
                std::arch::asm!(
                    "xchg {nlo}, rbx",
                    "lock cmpxchg16b xmmword ptr [{p}]",
                    "sete {ok}",
                    "mov rbx, {nlo}",
                    p = in(reg) p,
                    nlo = inout(reg) new as u64 => _,
                    ok = out(reg_byte) ok,
                    inout("rax") cmp as u64 => lo,
                    inout("rdx") (cmp >> 64) as u64 => hi,
                    in("rcx") (new >> 64) as u64,
                    options(nostack),
                );
                (lo as u128 | (hi as u128) << 64, ok != 0)
            };
            if let (true, Some(pa)) = (ok, pa) {
                if let Some((_, r)) = self.env.mem.host_ptr(pa, 16) {
                    if r.note_write(pa) {
                        self.brk = true;
                    }
                }
            }
            return Ok(old);
        }
        let vm = self.env.vm.clone();
        let _g = vm.locked();
        self.translate(lin, Acc::W, user)?;
        let old = self.read128(lin)?;
        self.write128(lin, if old == cmp { new } else { old })?;
        Ok(old)
    }

    /// The host address for a locked access at `lin` if it is writable RAM, and its physical
    /// address when the write must be noted (code pages and the dirty log have no write tag).
    fn rmw_host(&mut self, lin: u64, size: usize, user: bool) -> X<Option<(*mut u8, Option<u64>)>> {
        let e = &self.tlb.e[user as usize][((lin >> 12) as usize) & (TLB_SIZE - 1)];
        if e.write == lin & PAGE_MASK {
            return Ok(Some((lin.wrapping_add(e.addend) as *mut u8, None)));
        }
        let pa = self.translate(lin, Acc::W, user)?;
        Ok(match self.env.mem.host_ptr(pa, size as u64) {
            Some((p, r)) if !r.read_only => Some((p, Some(pa))),
            _ => None,
        })
    }

    /// 16 bytes, for SSE moves and FXSAVE.
    pub fn read128(&mut self, lin: u64) -> X<u128> {
        let lo = self.read(lin, 8)?;
        let hi = self.read(lin.wrapping_add(8), 8)?;
        Ok(lo as u128 | (hi as u128) << 64)
    }

    pub fn write128(&mut self, lin: u64, v: u128) -> X<()> {
        // Probe the second half first so a fault leaves memory untouched.
        self.read(lin.wrapping_add(15), 1)?;
        self.write(lin, 8, v as u64)?;
        self.write(lin.wrapping_add(8), 8, (v >> 64) as u64)
    }

    /// Reads guest-physical memory, RAM or device.
    pub fn phys_read(&mut self, pa: u64, size: usize) -> u64 {
        if let Some((p, _)) = self.env.mem.host_ptr(pa, size as u64) {
            // SAFETY: host_ptr checked the range lies in one RAM region.
            return unsafe { load(p, size) };
        }
        if let Some(v) = self.platform_mmio_read(pa, size) {
            return v;
        }
        self.prof.mmio += 1;
        let mut b = [0u8; 8];
        self.env.ops.mmio_read(pa, &mut b[..size]);
        u64::from_le_bytes(b)
    }

    pub fn phys_write(&mut self, pa: u64, size: usize, v: u64) {
        if let Some((p, r)) = self.env.mem.host_ptr(pa, size as u64) {
            if !r.read_only {
                // SAFETY: host_ptr checked the range lies in one writable RAM region.
                unsafe { store(p, size, v) };
                if r.note_write(pa) {
                    self.brk = true;
                }
                return;
            }
        }
        if self.platform_mmio_write(pa, size, v) {
            return;
        }
        self.prof.mmio += 1;
        let b = v.to_le_bytes();
        self.env.ops.mmio_write(pa, &b[..size]);
    }

    fn pte_read(&self, pa: u64) -> u64 {
        match self.env.mem.host_ptr(pa, 8) {
            // SAFETY: inside one RAM region.
            Some((p, _)) => unsafe { load(p, 8) },
            None => 0,
        }
    }

    fn pte_set(&self, pa: u64, bits: u64) {
        if let Some((p, r)) = self.env.mem.host_ptr(pa, 8) {
            if !r.read_only {
                let a = p as *const std::sync::atomic::AtomicU64;
                // SAFETY: 8-byte aligned PTE inside RAM; other vCPUs may update A/D bits at
                // the same time, hence the atomic OR.
                unsafe { (*a).fetch_or(bits, std::sync::atomic::Ordering::Relaxed) };
                r.note_write(pa);
            }
        }
    }

    fn pf<T>(&mut self, lin: u64, present: bool, acc: Acc, user: bool) -> X<T> {
        self.cr2 = lin;
        let mut code = present as u32;
        if acc == Acc::W {
            code |= 2;
        }
        if user {
            code |= 4;
        }
        if acc == Acc::X && (self.efer & EFER_NXE != 0 || self.cr4 & CR4_PAE != 0) {
            code |= 16;
        }
        fault(PF, Some(code))
    }

    /// Walks the page tables for `lin`, sets accessed/dirty bits and fills the TLB.
    /// Returns the physical address.
    pub fn translate(&mut self, lin: u64, acc: Acc, user: bool) -> X<u64> {
        if self.cr0 & CR0_PG != 0 {
            if let Some(pa) = self.tlb.refill(lin, acc, user) {
                self.prof.tlb_refills += 1;
                return Ok(pa);
            }
        }
        self.prof.tlb_fills += 1;
        let w = if self.cr0 & CR0_PG == 0 {
            let lin = if self.long_mode() {
                lin
            } else {
                lin & 0xffff_ffff
            };
            Walk {
                phys: lin & PAGE_MASK,
                write: true,
                exec: true,
                dirty: true,
                global: false,
                shift: 12,
            }
        } else {
            self.walk(lin, acc, user)?
        };
        let pa = w.phys | (lin & 0xfff);
        self.fill(lin, &w, user, acc == Acc::X);
        Ok(pa)
    }

    fn fill(&mut self, lin: u64, w: &Walk, user: bool, fetch: bool) {
        let page = lin & PAGE_MASK;
        let Some((host, r)) = self.env.mem.host_ptr(w.phys, 0x1000) else {
            return;
        };
        let off = ((w.phys - r.gpa) / 0x1000) as usize;
        let has_code = r.code[off].load(std::sync::atomic::Ordering::Acquire) & 1 != 0;
        let writable = w.write && w.dirty && !r.read_only && !has_code;
        if writable && r.log_dirty {
            r.dirty[off / 64].fetch_or(1 << (off % 64), std::sync::atomic::Ordering::Relaxed);
        }
        let addend = (host as u64).wrapping_sub(page);
        let e = if fetch {
            Entry {
                read: NONE,
                write: NONE,
                exec: if w.exec { page } else { NONE },
                addend,
            }
        } else {
            Entry {
                read: page,
                write: if writable { page } else { NONE },
                exec: NONE,
                addend,
            }
        };
        let meta = if w.global { META_GLOBAL } else { 0 } | w.shift;
        self.tlb.set(fetch, user, page, e, w.phys, meta);
    }

    fn walk(&mut self, lin: u64, acc: Acc, user: bool) -> X<Walk> {
        let wp = self.cr0 & CR0_WP != 0;
        let nxe = self.efer & EFER_NXE != 0;
        let mut write = true;
        let mut usr = true;
        let mut exec = true;
        // (pte address, pte value) of every level, to set A/D bits after the checks pass.
        let mut path: [(u64, u64); 4] = [(0, 0); 4];
        let mut n = 0;
        let (leaf, phys, shift) = if self.long_mode() || self.cr4 & CR4_PAE != 0 {
            let levels: &[u32] = if self.long_mode() {
                let top = lin as i64 >> 47;
                if top != 0 && top != -1 {
                    return gp(0);
                }
                &[39, 30, 21, 12]
            } else {
                &[30, 21, 12]
            };
            let mut table = self.cr3 & ADDR;
            if !self.long_mode() {
                table = self.cr3 & 0xffff_ffe0;
            }
            let mut found = None;
            for (li, &shift) in levels.iter().enumerate() {
                let idx = (lin >> shift)
                    & if shift == 30 && !self.long_mode() {
                        3
                    } else {
                        511
                    };
                let pa = table + idx * 8;
                let e = self.pte_read(pa);
                if e & P == 0 {
                    return self.pf(lin, false, acc, user);
                }
                let pdpt_legacy = !self.long_mode() && li == 0;
                if !pdpt_legacy {
                    write &= e & RW != 0;
                    usr &= e & US != 0;
                    if nxe {
                        exec &= e & XD == 0;
                    }
                    path[n] = (pa, e);
                    n += 1;
                }
                if shift == 12 || (e & PS != 0 && (shift == 21 || shift == 30) && !pdpt_legacy) {
                    let size_mask = (1u64 << shift) - 1;
                    let base = e & ADDR & !size_mask;
                    found = Some((e, base | (lin & size_mask & PAGE_MASK), shift as u8));
                    break;
                }
                table = e & ADDR;
            }
            match found {
                Some(f) => f,
                None => return self.pf(lin, false, acc, user),
            }
        } else {
            let pde_pa = (self.cr3 & 0xffff_f000) + ((lin >> 22) & 0x3ff) * 4;
            let pde = self.pte_read(pde_pa) & 0xffff_ffff;
            if pde & P == 0 {
                return self.pf(lin, false, acc, user);
            }
            write &= pde & RW != 0;
            usr &= pde & US != 0;
            path[0] = (pde_pa, pde);
            n = 1;
            if pde & PS != 0 && self.cr4 & CR4_PSE != 0 {
                let base = (pde & 0xffc0_0000) | ((pde >> 13) & 0xff) << 32;
                (pde, base | (lin & 0x3f_f000), 22)
            } else {
                let pte_pa = (pde & 0xffff_f000) + ((lin >> 12) & 0x3ff) * 4;
                let pte = self.pte_read(pte_pa) & 0xffff_ffff;
                if pte & P == 0 {
                    return self.pf(lin, false, acc, user);
                }
                write &= pte & RW != 0;
                usr &= pte & US != 0;
                path[1] = (pte_pa, pte);
                n = 2;
                (pte, pte & 0xffff_f000, 12)
            }
        };
        if user && !usr {
            return self.pf(lin, true, acc, user);
        }
        // Supervisor writes ignore R/W unless CR0.WP.
        let write_ok = write || (!user && !wp);
        if acc == Acc::W && !write_ok {
            return self.pf(lin, true, acc, user);
        }
        if acc == Acc::X && !exec {
            return self.pf(lin, true, acc, user);
        }
        let legacy32 = !(self.long_mode() || self.cr4 & CR4_PAE != 0);
        for &(pa, e) in &path[..n] {
            if e & A == 0 {
                self.pte_set_sized(pa, A, legacy32);
            }
        }
        let mut dirty = leaf & D != 0;
        if acc == Acc::W && !dirty {
            let (pa, _) = path[n - 1];
            self.pte_set_sized(pa, D, legacy32);
            dirty = true;
        }
        Ok(Walk {
            phys,
            write: write_ok,
            exec,
            dirty,
            global: leaf & G != 0 && self.cr4 & CR4_PGE != 0,
            shift,
        })
    }

    fn pte_set_sized(&self, pa: u64, bits: u64, legacy32: bool) {
        if legacy32 {
            // A 4-byte entry: OR into the aligned 8-byte word that contains it.
            let word = pa & !7;
            let shift = (pa & 4) * 8;
            self.pte_set(word, bits << shift);
        } else {
            self.pte_set(pa, bits);
        }
    }
}
