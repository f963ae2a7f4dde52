//! Decoded-block cache. A block is decoded once (iced-x86) from one guest-physical page and
//! reused until the guest writes to that page: each block keeps the page's code version word
//! and compares it on lookup. Blocks never cross a page and end at the first control transfer.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use iced_x86::{Decoder, DecoderError, DecoderOptions, FlowControl, Instruction};

use crate::cpu::*;
use crate::mmu::Acc;

const MAX_BLOCK: usize = 64;
const MAX_BLOCKS: usize = 1 << 16;

pub struct Block {
    pub rip: u64,
    pub bits: u32,
    ver: u32,
    /// The page's version word; it lives in a `Region` that the cache never outlives (the
    /// cache is cleared whenever the memory map changes).
    ver_ptr: *const AtomicU32,
    /// Where the block's bytes live in host memory and a copy of them: the VMM's devices may
    /// write guest RAM (DMA) without passing through the CPU, so a block also checks its bytes.
    src: *const u8,
    bytes: Vec<u8>,
    pub ins: Vec<Instruction>,
}

// SAFETY: `ver_ptr` points at an atomic inside the VM's `PhysMem`, which outlives the block
// (the cache is cleared when the memory map is replaced); reads of it are atomic.
unsafe impl Send for Block {}
// SAFETY: see `Send`.
unsafe impl Sync for Block {}

impl Block {
    #[inline]
    fn valid(&self) -> bool {
        // SAFETY: see the field's comment; `src .. src+len` lies in the same region.
        unsafe {
            (*self.ver_ptr).load(Ordering::Acquire) == self.ver
                && std::slice::from_raw_parts(self.src, self.bytes.len()) == self.bytes.as_slice()
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

#[derive(Default)]
pub struct Cache {
    map: HashMap<u64, Arc<Block>, BuildHasherDefault<AddrHasher>>,
}

impl Cache {
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

impl Cpu {
    /// The decoded block at the current RIP.
    pub fn block(&mut self) -> X<Arc<Block>> {
        let lin = self.lin(CS, self.rip);
        let pa = self.fetch_page(lin)?;
        let key = pa ^ ((self.bits as u64) << 58);
        if let Some(b) = self.cache.map.get(&key) {
            if b.rip == self.rip && b.valid() {
                return Ok(b.clone());
            }
        }
        let b = Arc::new(self.decode_block(lin, pa)?);
        if !b.ver_ptr.is_null() {
            if self.cache.map.len() >= MAX_BLOCKS {
                self.cache.map.clear();
            }
            self.cache.map.insert(key, b.clone());
        }
        Ok(b)
    }

    fn decode_block(&mut self, lin: u64, pa: u64) -> X<Block> {
        let mem = self.env.mem.clone();
        let Some(r) = mem.find(pa) else {
            return Err(Stop::Exit(corefour_hypervisor::VmExit::Unhandled(format!(
                "instruction fetch from {pa:#x}, which is not RAM"
            ))));
        };
        let page = ((pa - r.gpa) / 0x1000) as usize;
        let ver_word = &r.code[page];
        let old = ver_word.fetch_or(1, Ordering::AcqRel);
        if old & 1 == 0 {
            // A new code page: nobody may keep a write tag for it.
            self.tlb.flush_all();
            self.epoch = self.env.vm.bump_epoch();
        }
        let ver = old | 1;
        let avail = (0x1000 - (pa & 0xfff)).min(r.gpa + r.size - pa) as usize;
        // SAFETY: `pa .. pa+avail` lies inside region `r` (same page, inside its size).
        let bytes = unsafe { std::slice::from_raw_parts(r.host.add((pa - r.gpa) as usize), avail) };
        let mut dec = Decoder::with_ip(self.bits, bytes, self.rip, DecoderOptions::NONE);
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
            ins.push(i);
            if i.is_invalid() || i.flow_control() != FlowControl::Next {
                break;
            }
        }
        let len = ins.last().map_or(0, |l| {
            (l.next_ip().wrapping_sub(self.rip) as usize).min(bytes.len())
        });
        Ok(Block {
            rip: self.rip,
            bits: self.bits,
            ver,
            ver_ptr: ver_word,
            src: bytes.as_ptr(),
            bytes: bytes[..len].to_vec(),
            ins,
        })
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
        Ok(Block {
            rip: self.rip,
            bits: self.bits,
            ver: 0,
            ver_ptr: std::ptr::null(),
            src: std::ptr::null(),
            bytes: Vec::new(),
            ins: vec![i],
        })
    }
}
