//! Decoded-block cache. A block is decoded once (iced-x86) from one guest-physical page and
//! reused until the guest writes to that page: each block keeps the page's code version word
//! and compares it on lookup. Blocks never cross a page and end at the first control transfer.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};

use iced_x86::{Decoder, DecoderError, DecoderOptions, FlowControl, Instruction};

use crate::cpu::*;
use crate::exec::fast::Handler;
use crate::mmu::{Acc, TLB_SIZE};

const MAX_BLOCK: usize = 64;
/// Successors remembered per block: a translated block leaves for wherever the chain of
/// blocks it jumped into ends, and RET has many targets.
const LINKS: usize = 4;
const MAX_BLOCKS: usize = 1 << 16;

/// The first 64 bytes hold what following a link and validating the block read on every
/// dispatch. (Not `align(64)`: glibc serves over-aligned requests through memalign, which
/// cost more in malloc than the extra cache line saves.)
#[repr(C)]
pub struct Block {
    pub rip: u64,
    /// The linear address of `rip` when decoded.
    lin: u64,
    /// The page's version word; it lives in a `Region` that the cache never outlives (the
    /// cache is cleared whenever the memory map changes).
    ver_ptr: *const AtomicU32,
    /// Where the block's bytes live in host memory, how many there are, and its first and
    /// last (up to) 8 bytes: the VMM's devices may write guest RAM (DMA) without passing
    /// through the CPU, so a block also checks that its ends still hold the same bytes. Two
    /// loads instead of a full compare: new code landing on a page differs at the ends but
    /// for vanishingly rare coincidences.
    src: *const u8,
    head: u64,
    tail: u64,
    len: u32,
    ver: u32,
    pub bits: u32,
    /// Times run by the interpreter, until translation is tried (`u32::MAX` once it was).
    pub hits: Cell<u32>,
    /// Host code for a prefix of the block, once it is hot.
    pub jit: Cell<Option<crate::jit::Jit>>,
    pub ins: Vec<Op>,
    /// Direct links to successor blocks (rip, block), valid while the cache's `gen` equals
    /// `link_gen`: following one skips the hash lookup, and for a successor on the same page
    /// (hence the same mapping, as nothing changed modes or mappings in between) the TLB.
    links: [Cell<(u64, *const Block)>; LINKS],
    link_gen: Cell<u64>,
    link_next: Cell<u8>,
}

/// A decoded instruction and the handler that executes it.
pub struct Op {
    pub f: Handler,
    pub i: Instruction,
}

fn op(i: Instruction, bits: u32) -> Op {
    let f = crate::exec::fast::select1(&i).unwrap_or_else(|| crate::exec::fast::select(&i, bits));
    Op { f, i }
}

// SAFETY: `ver_ptr` points at an atomic inside the VM's `PhysMem`, which outlives the block
// (the cache is cleared when the memory map is replaced); reads of it are atomic. The links
// point at blocks of the same cache, which belongs to one vCPU thread.
unsafe impl Send for Block {}

impl Block {
    fn new(rip: u64, lin: u64, bits: u32, ins: Vec<Op>) -> Self {
        Block {
            rip,
            bits,
            ver: 0,
            ver_ptr: std::ptr::null(),
            src: std::ptr::null(),
            len: 0,
            head: 0,
            tail: 0,
            ins,
            lin,
            links: std::array::from_fn(|_| Cell::new((u64::MAX, std::ptr::null()))),
            link_gen: Cell::new(0),
            link_next: Cell::new(0),
            hits: Cell::new(0),
            jit: Cell::new(None),
        }
    }

    /// The linked successor at `rip`, if this block has one from the current generation.
    #[inline]
    fn linked(&self, rip: u64, gen: u64) -> Option<*const Block> {
        if self.link_gen.get() != gen {
            return None;
        }
        self.links
            .iter()
            .map(|l| l.get())
            .find(|&(r, p)| r == rip && !p.is_null())
            .map(|(_, p)| p)
    }

    fn link(&self, rip: u64, to: *const Block, gen: u64) {
        if self.link_gen.get() != gen {
            self.link_gen.set(gen);
            for l in &self.links {
                l.set((u64::MAX, std::ptr::null()));
            }
        }
        let k = self.link_next.get() as usize % LINKS;
        self.links[k].set((rip, to));
        self.link_next.set(((k + 1) % LINKS) as u8);
    }

    #[inline]
    pub fn valid(&self) -> bool {
        // SAFETY: see the field's comment; `src .. src+len` lies in the same region.
        unsafe {
            (*self.ver_ptr).load(Ordering::Acquire) == self.ver
                && ends(self.src, self.len as usize) == (self.head, self.tail)
        }
    }
}

/// The first and last up-to-8 bytes of `p .. p+len`.
///
/// # Safety
/// `p .. p+len` must be readable.
#[inline]
unsafe fn ends(p: *const u8, len: usize) -> (u64, u64) {
    // SAFETY: the caller guarantees the range is readable.
    unsafe {
        if len >= 8 {
            (
                (p as *const u64).read_unaligned(),
                (p.add(len - 8) as *const u64).read_unaligned(),
            )
        } else {
            let mut v = 0u64;
            for k in 0..len {
                v |= (*p.add(k) as u64) << (8 * k);
            }
            (v, v)
        }
    }
}

/// A multiplicative hash: the keys are physical addresses, already well spread.
#[derive(Default)]
pub struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

const FAST: usize = 8192;

/// Decoded blocks of one vCPU: a direct-mapped array in front of a hash map, both keyed by
/// the host address of the block's first byte (unique per guest-physical byte) and code size.
pub struct Cache {
    map: HashMap<u64, Box<Block>, BuildHasherDefault<AddrHasher>>,
    /// (key, block) pairs; a pointer is into a `Box` in `map` and is reset whenever that entry
    /// is replaced or the map is cleared.
    fast: Box<[(u64, *const Block)]>,
    /// Bumped whenever a cached block is dropped: links and `prev` from an older generation
    /// are void. (The uncached `u64::MAX` entry is never linked to nor remembered.)
    gen: u64,
    /// The block that just ran to its end (no fault, interrupt or mode change after it), from
    /// generation `prev_gen`: the next lookup tries its links first.
    pub prev: *const Block,
    prev_gen: u64,
    /// Translated blocks replaced in `map` (stale): chained code may still leave through
    /// their code and name them in `Cpu::jit_last`, so they live until the next `clear`.
    /// Boxed: their addresses must not change when the list grows.
    #[allow(clippy::vec_box)]
    dead: Vec<Box<Block>>,
}

// SAFETY: the raw pointers point into boxes owned by `map` in the same struct.
unsafe impl Send for Cache {}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            map: HashMap::default(),
            fast: vec![(u64::MAX, std::ptr::null()); FAST].into_boxed_slice(),
            gen: 1,
            prev: std::ptr::null(),
            prev_gen: 0,
            dead: Vec::new(),
        }
    }
}

#[inline]
fn fast_slot(host: u64) -> usize {
    ((host >> 1) ^ (host >> 14)) as usize & (FAST - 1)
}

impl Block {
    /// Whether this block was decoded from RAM and is kept (blocks straddling a page or
    /// fetched from MMIO are decoded each time and never translated).
    #[inline]
    pub fn cached(&self) -> bool {
        !self.ver_ptr.is_null()
    }

    /// The code page and version this block was decoded from, and its linear address: two
    /// blocks with equal page and version are valid or stale together.
    #[inline]
    pub fn page(&self) -> (usize, u32, u64) {
        (self.ver_ptr as usize, self.ver, self.lin)
    }

    /// The host address of the block's first byte.
    #[inline]
    pub fn host(&self) -> u64 {
        self.src as u64
    }
}

impl Cache {
    pub fn clear(&mut self) {
        self.map.clear();
        self.dead.clear();
        self.fast.fill((u64::MAX, std::ptr::null()));
        self.gen += 1;
        self.prev = std::ptr::null();
    }

    /// Marks `b` as the block that just ran to its end; `cached` is `b.cached()` (the caller
    /// holds `b` only as a pointer).
    #[inline]
    pub fn ran(&mut self, b: *const Block, cached: bool) {
        if !cached {
            // The `u64::MAX` entry is replaced without a `gen` bump: never remember it.
            self.prev = std::ptr::null();
            return;
        }
        self.prev = b;
        self.prev_gen = self.gen;
    }

    /// The decoded block at the CPU's RIP: through the previous block's link when it has
    /// one, else through the TLB and the cache (and then linked from the previous block).
    #[inline]
    pub fn lookup(&mut self, cpu: &mut Cpu) -> X<&Block> {
        let prev = std::mem::replace(&mut self.prev, std::ptr::null());
        let prev = if !prev.is_null() && self.prev_gen == self.gen {
            // SAFETY: no block was dropped since `prev` ran (same generation).
            Some(unsafe { &*prev })
        } else {
            None
        };
        if let Some(p) = prev {
            if let Some(b) = p.linked(cpu.rip, self.gen) {
                // SAFETY: a link of the current generation points at a live block.
                let b = unsafe { &*b };
                if b.bits == cpu.bits && (b.lin ^ p.lin) < 0x1000 && b.valid() {
                    return Ok(b);
                }
                // Another page: only while the TLB still maps it to the same host page.
                let lin = cpu.lin(CS, cpu.rip);
                let e =
                    &cpu.tlb.x[(cpu.cpl == 3) as usize][((lin >> 12) as usize) & (TLB_SIZE - 1)];
                if b.bits == cpu.bits
                    && b.lin == lin
                    && e.exec == lin & !0xfff
                    && lin.wrapping_add(e.addend) == b.src as u64
                    && b.valid()
                {
                    return Ok(b);
                }
            }
        }
        let gen = self.gen;
        let b: *const Block = self.lookup_slow(cpu)?;
        // SAFETY: just returned by the cache; nothing was dropped since.
        let b = unsafe { &*b };
        if let Some(p) = prev {
            // `prev` is only still alive if the lookup dropped nothing.
            if self.gen == gen && !b.ver_ptr.is_null() && b.lin == cpu.lin(CS, cpu.rip) {
                p.link(cpu.rip, b, self.gen);
            }
        }
        Ok(b)
    }

    fn lookup_slow(&mut self, cpu: &mut Cpu) -> X<&Block> {
        cpu.prof.slow_lookups += 1;
        let lin = cpu.lin(CS, cpu.rip);
        let user = cpu.cpl == 3;
        let e = &cpu.tlb.x[user as usize][((lin >> 12) as usize) & (TLB_SIZE - 1)];
        let host = if e.exec == lin & !0xfff {
            lin.wrapping_add(e.addend)
        } else {
            cpu.translate(lin, Acc::X, user)?;
            let e = &cpu.tlb.x[user as usize][((lin >> 12) as usize) & (TLB_SIZE - 1)];
            if e.exec != lin & !0xfff {
                // Not RAM, or a page the TLB cannot hold: decode without caching.
                let b = cpu.decode_block(lin, None)?;
                cpu.prof.uncached += 1;
                // Nothing points at the entry this replaces (`ran` never records an
                // uncached block, links and `fast` never name one): bumping `gen` here
                // would void every link (about 100k times in a Linux boot).
                match self.map.get_mut(&u64::MAX) {
                    // Reuses the box: these come by the ten thousand in a boot.
                    Some(old) => **old = b,
                    None => {
                        self.map.insert(u64::MAX, Box::new(b));
                    }
                }
                return Ok(&self.map[&u64::MAX]);
            }
            lin.wrapping_add(e.addend)
        };
        let key = host ^ ((cpu.bits as u64) << 58);
        let slot = fast_slot(host);
        let (k, p) = self.fast[slot];
        if k == key && !p.is_null() {
            // SAFETY: see `fast`.
            let b = unsafe { &*p };
            if b.rip == cpu.rip && b.valid() {
                return Ok(b);
            }
        }
        cpu.prof.fast_misses += 1;
        if let Some(b) = self.map.get(&key) {
            if b.rip == cpu.rip && b.valid() {
                self.fast[slot] = (key, &**b as *const Block);
                // SAFETY: the box lives in `map` until replaced or cleared.
                return Ok(unsafe { &*(&**b as *const Block) });
            }
        }
        let b = Box::new(cpu.decode_block(lin, Some(host))?);
        if b.ver_ptr.is_null() {
            cpu.prof.uncached += 1;
            // Nothing points at the entry this replaces (see above).
            self.map.insert(u64::MAX, b);
            return Ok(&self.map[&u64::MAX]);
        }
        if self.map.len() + self.dead.len() >= MAX_BLOCKS {
            self.clear();
            cpu.prof.cache_clears += 1;
        }
        let p = &*b as *const Block;
        if let Some(old) = self.map.insert(key, b) {
            // The stale block it replaced may be linked to.
            self.gen += 1;
            if old.jit.get().is_some() {
                self.dead.push(old);
            }
        }
        self.fast[slot] = (key, p);
        // SAFETY: just inserted; lives until replaced or cleared.
        Ok(unsafe { &*p })
    }
}

impl Cpu {
    fn decode_block(&mut self, lin: u64, host: Option<u64>) -> X<Block> {
        let mem = self.env.mem.clone();
        let Some(host) = host else {
            return self.decode_straddling(lin);
        };
        let pa = mem
            .regions
            .iter()
            .find_map(|r| {
                let off = host.wrapping_sub(r.host as u64);
                (off < r.size).then_some(r.gpa + off)
            })
            .unwrap_or(u64::MAX);
        let Some(r) = mem.find(pa) else {
            return Err(Stop::Exit(corefour_hypervisor::VmExit::Unhandled(format!(
                "instruction fetch from {pa:#x}, which is not RAM"
            ))));
        };
        let page = ((pa - r.gpa) / 0x1000) as usize;
        let ver_word = &r.code[page];
        let old = ver_word.fetch_or(1, Ordering::AcqRel);
        if old & 1 == 0 {
            // A new code page: nobody may keep a write tag for it. This vCPU drops just
            // those tags; the others see the epoch move and flush everything.
            self.tlb
                .revoke_writes(r.host as u64 + (page as u64) * 0x1000);
            self.prof.code_pages += 1;
            let now = self.env.vm.bump_epoch();
            // If another vCPU moved the epoch since this one synced, keep the old value so
            // the dispatch loop still resyncs (a full flush, maybe a new memory map).
            if now == self.epoch.wrapping_add(1) {
                self.epoch = now;
            }
        }
        let ver = old | 1;
        let avail = (0x1000 - (pa & 0xfff)).min(r.gpa + r.size - pa) as usize;
        // SAFETY: `pa .. pa+avail` lies inside region `r` (same page, inside its size).
        let bytes = unsafe { std::slice::from_raw_parts(r.host.add((pa - r.gpa) as usize), avail) };
        let mut dec = Decoder::with_ip(self.bits, bytes, self.rip, DecoderOptions::NONE);
        // Blocks average about five instructions: 16 rarely regrows, and a request this small
        // stays out of glibc's large-bin path (which consolidates fastbins on every call).
        let mut ins = Vec::with_capacity(16);
        let mut i = Instruction::default();
        while ins.len() < MAX_BLOCK {
            dec.decode_out(&mut i);
            if i.is_invalid() && dec.last_error() == DecoderError::NoMoreBytes {
                if ins.is_empty() {
                    return self.decode_straddling(lin);
                }
                break;
            }
            ins.push(op(i, self.bits));
            if i.is_invalid() || i.flow_control() != FlowControl::Next {
                break;
            }
        }
        self.prof.decoded_blocks += 1;
        self.prof.decoded_insns += ins.len() as u64;
        let len = ins.last().map_or(0, |l| {
            (l.i.next_ip().wrapping_sub(self.rip) as usize).min(bytes.len())
        });
        // SAFETY: `len <= bytes.len()`.
        let (head, tail) = unsafe { ends(bytes.as_ptr(), len) };
        let mut b = Block::new(self.rip, lin, self.bits, ins);
        b.ver = ver;
        b.ver_ptr = ver_word;
        b.src = bytes.as_ptr();
        b.len = len as u32;
        b.head = head;
        b.tail = tail;
        Ok(b)
    }

    /// An instruction that crosses into the next page: decoded each time, never cached.
    fn decode_straddling(&mut self, lin: u64) -> X<Block> {
        let mut buf = [0u8; 15];
        let user = self.cpl == 3;
        let mut n = 0;
        while n < 15 {
            let a = lin.wrapping_add(n as u64);
            let pa = match self.translate(a, Acc::X, user) {
                Ok(pa) => pa,
                // Only a fault on bytes the instruction really needs counts; decode what we have.
                Err(e) if n == 0 => return Err(e),
                Err(e) => {
                    let mut d =
                        Decoder::with_ip(self.bits, &buf[..n], self.rip, DecoderOptions::NONE);
                    let i = d.decode();
                    if i.is_invalid() && d.last_error() == DecoderError::NoMoreBytes {
                        return Err(e);
                    }
                    break;
                }
            };
            buf[n] = self.phys_read(pa, 1) as u8;
            n += 1;
        }
        let mut d = Decoder::with_ip(self.bits, &buf[..n], self.rip, DecoderOptions::NONE);
        let i = d.decode();
        Ok(Block::new(self.rip, lin, self.bits, vec![op(i, self.bits)]))
    }
}
