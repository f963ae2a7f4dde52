//! String instructions (MOVS, STOS, LODS, CMPS, SCAS, INS, OUTS) with REP prefixes. A long
//! REP runs in slices so interrupts and kicks are seen in between, as on a real CPU.

use iced_x86::{Instruction, Mnemonic as M, OpKind};

use crate::cpu::*;
use crate::flags::{self, Op};

const SLICE: u64 = 4096;

/// Stores `count` copies of `v` from `p` on (unaligned).
///
/// # Safety
/// `p .. p+count` must be writable.
unsafe fn fill<T: Copy>(p: *mut T, count: u64, v: T) {
    for k in 0..count as usize {
        // SAFETY: inside the range the caller vouches for.
        unsafe { p.add(k).write_unaligned(v) };
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Movs,
    Stos,
    Lods,
    Cmps,
    Scas,
    Ins,
    Outs,
}

impl Cpu {
    pub(super) fn exec_string(&mut self, i: &Instruction) -> Option<X<()>> {
        use M::*;
        let (kind, size) = match i.mnemonic() {
            Movsb => (Kind::Movs, 1),
            Movsw => (Kind::Movs, 2),
            Movsd => (Kind::Movs, 4),
            Movsq => (Kind::Movs, 8),
            Stosb => (Kind::Stos, 1),
            Stosw => (Kind::Stos, 2),
            Stosd => (Kind::Stos, 4),
            Stosq => (Kind::Stos, 8),
            Lodsb => (Kind::Lods, 1),
            Lodsw => (Kind::Lods, 2),
            Lodsd => (Kind::Lods, 4),
            Lodsq => (Kind::Lods, 8),
            Cmpsb => (Kind::Cmps, 1),
            Cmpsw => (Kind::Cmps, 2),
            Cmpsd => (Kind::Cmps, 4),
            Cmpsq => (Kind::Cmps, 8),
            Scasb => (Kind::Scas, 1),
            Scasw => (Kind::Scas, 2),
            Scasd => (Kind::Scas, 4),
            Scasq => (Kind::Scas, 8),
            Insb => (Kind::Ins, 1),
            Insw => (Kind::Ins, 2),
            Insd => (Kind::Ins, 4),
            Outsb => (Kind::Outs, 1),
            Outsw => (Kind::Outs, 2),
            Outsd => (Kind::Outs, 4),
            _ => return None,
        };
        // MOVSD/CMPSD are also SSE2 mnemonics; those have register operands.
        if (0..i.op_count()).any(|n| matches!(i.op_kind(n), OpKind::Register))
            && !matches!(
                kind,
                Kind::Ins | Kind::Outs | Kind::Lods | Kind::Stos | Kind::Scas
            )
        {
            return None;
        }
        Some(self.string(i, kind, size))
    }

    fn string(&mut self, i: &Instruction, kind: Kind, size: usize) -> X<()> {
        let asize = (0..i.op_count())
            .find_map(|n| match i.op_kind(n) {
                OpKind::MemorySegSI | OpKind::MemoryESDI | OpKind::MemorySegDI => Some(2),
                OpKind::MemorySegESI | OpKind::MemoryESEDI | OpKind::MemorySegEDI => Some(4),
                OpKind::MemorySegRSI | OpKind::MemoryESRDI | OpKind::MemorySegRDI => Some(8),
                _ => None,
            })
            .unwrap_or(self.bits / 8);
        let amask = super::szmask(asize);
        let seg = super::seg_index(i.memory_segment());
        let step = if self.rflags & flags::DF != 0 {
            (size as u64).wrapping_neg()
        } else {
            size as u64
        };
        let rep = i.has_rep_prefix() || i.has_repne_prefix();
        if matches!(kind, Kind::Ins | Kind::Outs) && !self.iopl_ok() {
            return gp(0);
        }
        let vmask = super::szmask(size as u32);
        let mut n = 0u64;
        loop {
            if rep {
                if self.gpr[1] & amask == 0 {
                    return Ok(());
                }
                if n == SLICE {
                    // Come back for the rest after the dispatcher had a look at interrupts.
                    self.rip = i.ip();
                    self.brk = true;
                    return Ok(());
                }
            }
            let si = self.gpr[6] & amask;
            let di = self.gpr[7] & amask;
            if rep && step == size as u64 && matches!(kind, Kind::Movs | Kind::Stos) {
                let done = self.bulk(
                    kind,
                    size,
                    seg,
                    si,
                    di,
                    (SLICE - n).min(self.gpr[1] & amask),
                    amask,
                );
                if done > 0 {
                    let len = done * size as u64;
                    if kind == Kind::Movs {
                        self.set_areg(6, si.wrapping_add(len), amask);
                    }
                    self.set_areg(7, di.wrapping_add(len), amask);
                    let c = self.gpr[1].wrapping_sub(done);
                    self.set_areg(1, c, amask);
                    n += done;
                    continue;
                }
            }
            match kind {
                Kind::Movs => {
                    let a = self.lin(seg, si);
                    let v = self.read(a, size)?;
                    let b = self.lin(ES, di);
                    self.write(b, size, v)?;
                    self.adv(6, si, step, amask);
                    self.adv(7, di, step, amask);
                }
                Kind::Stos => {
                    let b = self.lin(ES, di);
                    self.write(b, size, self.gpr[0] & vmask)?;
                    self.adv(7, di, step, amask);
                }
                Kind::Lods => {
                    let a = self.lin(seg, si);
                    let v = self.read(a, size)?;
                    self.set_gpr(0, size as u32, v);
                    self.adv(6, si, step, amask);
                }
                Kind::Cmps | Kind::Scas => {
                    let (x, y) = if kind == Kind::Cmps {
                        let a = self.lin(seg, si);
                        let x = self.read(a, size)?;
                        let b = self.lin(ES, di);
                        (x, self.read(b, size)?)
                    } else {
                        let b = self.lin(ES, di);
                        (self.gpr[0] & vmask, self.read(b, size)?)
                    };
                    self.set_flags_lazy(Op::Sub, size as u32 * 8, x, y, x.wrapping_sub(y) & vmask);
                    if kind == Kind::Cmps {
                        self.adv(6, si, step, amask);
                    }
                    self.adv(7, di, step, amask);
                    if rep {
                        let c = self.gpr[1].wrapping_sub(1);
                        self.set_areg(1, c, amask);
                        let eq = x == y;
                        if (i.has_rep_prefix() && !eq) || (i.has_repne_prefix() && eq) {
                            return Ok(());
                        }
                        n += 1;
                        continue;
                    }
                }
                Kind::Ins => {
                    let b = self.lin(ES, di);
                    // Probe first so a fault does not lose the port read.
                    self.write(b, size, 0)?;
                    let v = self.pio_in(self.gpr[2] as u16, size);
                    self.write(b, size, v)?;
                    self.adv(7, di, step, amask);
                }
                Kind::Outs => {
                    let a = self.lin(seg, si);
                    let v = self.read(a, size)?;
                    self.pio_out(self.gpr[2] as u16, size, v);
                    self.adv(6, si, step, amask);
                }
            }
            if !rep {
                return Ok(());
            }
            let c = self.gpr[1].wrapping_sub(1);
            self.set_areg(1, c, amask);
            n += 1;
        }
    }

    /// REP MOVS/STOS going up, as many of the next `max` elements as lie in one page of the
    /// destination (and source) that the TLB already maps to RAM: one lookup per page
    /// instead of one per element (the kernel clears and copies pages this way). Returns
    /// how many were done; 0 leaves the next element to the exact one-by-one path (a miss,
    /// an element straddling a page, an address register about to wrap).
    #[allow(clippy::too_many_arguments)]
    fn bulk(
        &mut self,
        kind: Kind,
        size: usize,
        seg: usize,
        si: u64,
        di: u64,
        max: u64,
        amask: u64,
    ) -> u64 {
        let sz = size as u64;
        let room = |lin: u64, off: u64| -> u64 {
            // Whole elements left in the page, and before the offset register wraps.
            let page = (0x1000 - (lin & 0xfff)) / sz;
            let wrap = (amask - off) / sz + 1;
            page.min(wrap)
        };
        let b = self.lin(ES, di);
        let mut count = max.min(room(b, di));
        let src = if kind == Kind::Movs {
            let a = self.lin(seg, si);
            count = count.min(room(a, si));
            Some(a)
        } else {
            None
        };
        if count < 2 {
            return 0;
        }
        let Some(dst) = self.tlb_host(b, true) else {
            return 0;
        };
        let len = (count * sz) as usize;
        match src {
            None => {
                let v = self.gpr[0];
                // SAFETY: `dst .. dst+len` lies in one RAM page with a write tag (a page
                // without decoded code, so no block needs to see these stores).
                unsafe {
                    match size {
                        1 => std::ptr::write_bytes(dst, v as u8, len),
                        2 => fill(dst as *mut u16, count, v as u16),
                        4 => fill(dst as *mut u32, count, v as u32),
                        _ => fill(dst as *mut u64, count, v),
                    }
                }
            }
            Some(a) => {
                let Some(s) = self.tlb_host(a, false) else {
                    return 0;
                };
                let (s, d) = (s as usize, dst as usize);
                if d > s && d < s + len {
                    // The destination runs into the source ahead of it: element order
                    // repeats the pattern, which memmove would not. Copying bytes forward
                    // does the same as elements unless one element overlaps its own source.
                    if d - s < size {
                        return 0;
                    }
                    for k in 0..len {
                        // SAFETY: both ranges lie in RAM pages the TLB maps (read for the
                        // source, write for the destination).
                        unsafe {
                            std::ptr::write_volatile(
                                (d as *mut u8).add(k),
                                std::ptr::read_volatile((s as *const u8).add(k)),
                            )
                        };
                    }
                } else {
                    // SAFETY: as above; copying forward equals element order here.
                    unsafe { std::ptr::copy(s as *const u8, d as *mut u8, len) };
                }
            }
        }
        count
    }

    #[inline]
    fn adv(&mut self, r: usize, v: u64, step: u64, amask: u64) {
        self.set_areg(r, v.wrapping_add(step), amask);
    }

    /// Writes an address-sized register: 16-bit merges, 32-bit zero-extends.
    #[inline]
    fn set_areg(&mut self, r: usize, v: u64, amask: u64) {
        self.gpr[r] = if amask == 0xffff {
            (self.gpr[r] & !0xffff) | (v & 0xffff)
        } else {
            v & amask
        };
    }
}
