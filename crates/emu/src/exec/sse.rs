//! SSE/SSE2 (the moves, logic, integer and scalar/packed float operations compilers emit for
//! baseline x86-64), minimal x87 (init, control/status words) and FXSAVE/FXRSTOR.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use crate::cpu::*;
use crate::flags;

const XMM0: usize = Register::XMM0 as usize;

#[inline]
fn is_xmm(r: Register) -> bool {
    (XMM0..XMM0 + 16).contains(&(r as usize))
}

/// Applies `f` to each `lane`-byte lane of `a` and `b`.
#[inline]
fn lanes(a: u128, b: u128, lane: u32, f: impl Fn(u64, u64) -> u64) -> u128 {
    let bits = lane * 8;
    let m: u128 = if bits == 64 {
        u64::MAX as u128
    } else {
        (1u128 << bits) - 1
    };
    let mut r = 0u128;
    let mut sh = 0;
    while sh < 128 {
        let x = ((a >> sh) & m) as u64;
        let y = ((b >> sh) & m) as u64;
        r |= ((f(x, y) as u128) & m) << sh;
        sh += bits;
    }
    r
}

#[inline]
fn sx(v: u64, bits: u32) -> i64 {
    let sh = 64 - bits;
    ((v << sh) as i64) >> sh
}

fn sat_s(v: i64, bits: u32) -> u64 {
    let max = (1i64 << (bits - 1)) - 1;
    let min = -(1i64 << (bits - 1));
    v.clamp(min, max) as u64
}

fn sat_u(v: i64, bits: u32) -> u64 {
    v.clamp(0, (1i64 << bits) - 1) as u64
}

fn f32s(v: u128) -> f32 {
    f32::from_bits(v as u32)
}

fn f64s(v: u128) -> f64 {
    f64::from_bits(v as u64)
}

impl Cpu {
    #[inline]
    fn xmm(&self, r: Register) -> u128 {
        self.fpu.xmm[r as usize - XMM0]
    }

    #[inline]
    fn set_xmm(&mut self, r: Register, v: u128) {
        self.fpu.xmm[r as usize - XMM0] = v;
    }

    /// Reads operand `n` as 128 bits (memory: `memory_size` bytes, zero-extended).
    fn rd_x(&mut self, i: &Instruction, n: u32, align: bool) -> X<u128> {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                if is_xmm(r) {
                    Ok(self.xmm(r))
                } else {
                    Ok(self.rreg(r) as u128)
                }
            }
            OpKind::Memory => {
                let a = self.ea(i);
                match i.memory_size().size() {
                    16 => {
                        if align && a & 15 != 0 {
                            return gp(0);
                        }
                        self.read128(a)
                    }
                    s => Ok(self.read(a, s)? as u128),
                }
            }
            _ => Ok(self.rd_op(i, n)? as u128),
        }
    }

    fn wr_x(&mut self, i: &Instruction, n: u32, v: u128, align: bool) -> X<()> {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                if is_xmm(r) {
                    self.set_xmm(r, v);
                } else {
                    self.wreg(r, v as u64);
                }
                Ok(())
            }
            OpKind::Memory => {
                let a = self.ea(i);
                match i.memory_size().size() {
                    16 => {
                        if align && a & 15 != 0 {
                            return gp(0);
                        }
                        self.write128(a, v)
                    }
                    s => self.write(a, s, v as u64),
                }
            }
            _ => ud(),
        }
    }

    fn sse_ok(&self, i: &Instruction) -> X<()> {
        // MMX-register forms are not emulated.
        for n in 0..i.op_count() {
            if i.op_kind(n) == OpKind::Register && i.op_register(n).is_mm() {
                return ud();
            }
        }
        if self.cr0 & CR0_EM != 0 || self.cr4 & CR4_OSFXSR == 0 {
            return ud();
        }
        if self.cr0 & CR0_TS != 0 {
            return fault(NM, None);
        }
        Ok(())
    }

    pub fn fwait(&mut self) -> X<()> {
        if self.cr0 & (CR0_TS | CR0_MP) == (CR0_TS | CR0_MP) {
            return fault(NM, None);
        }
        Ok(())
    }

    fn x87_ok(&self) -> X<()> {
        if self.cr0 & (CR0_EM | CR0_TS) != 0 {
            return fault(NM, None);
        }
        Ok(())
    }

    pub(super) fn exec_sse(&mut self, i: &Instruction) -> Option<X<()>> {
        let m = i.mnemonic();
        match m {
            M::Fninit
            | M::Fnstsw
            | M::Fnstcw
            | M::Fldcw
            | M::Fnclex
            | M::Emms
            | M::Fxsave
            | M::Fxsave64
            | M::Fxrstor
            | M::Fxrstor64
            | M::Ldmxcsr
            | M::Stmxcsr
            | M::Fild
            | M::Fld1
            | M::Fldz
            | M::Ffree
            | M::Fstp
            | M::Fincstp
            | M::Fdecstp => {
                return Some(self.fpu_ctl(i, m));
            }
            _ => {}
        }
        if i.op_count() == 0 {
            return None;
        }
        let uses_xmm = (0..i.op_count()).any(|n| {
            i.op_kind(n) == OpKind::Register
                && (is_xmm(i.op_register(n)) || i.op_register(n).is_mm())
        });
        if !uses_xmm && !matches!(m, M::Movnti) {
            return None;
        }
        if let Err(e) = self.sse_ok(i) {
            return Some(Err(e));
        }
        Some(self.sse(i, m))
    }

    fn fpu_ctl(&mut self, i: &Instruction, m: M) -> X<()> {
        match m {
            M::Fninit => {
                self.x87_ok()?;
                self.fpu.fcw = 0x37f;
                self.fpu.fsw = 0;
                self.fpu.ftw = 0;
                self.fpu.top = 0;
                Ok(())
            }
            M::Fnclex => {
                self.x87_ok()?;
                self.fpu.fsw &= 0x7f00;
                Ok(())
            }
            M::Fnstsw => {
                self.x87_ok()?;
                let v = self.fpu.fsw as u64 | ((self.fpu.top as u64) << 11);
                self.wr_op(i, 0, v)
            }
            M::Fnstcw => {
                self.x87_ok()?;
                let v = self.fpu.fcw as u64;
                self.wr_op(i, 0, v)
            }
            M::Fldcw => {
                self.x87_ok()?;
                self.fpu.fcw = self.rd_op(i, 0)? as u16;
                Ok(())
            }
            M::Emms => {
                self.x87_ok()?;
                self.fpu.ftw = 0;
                Ok(())
            }
            // A minimal x87 stack: enough for the kernel's AMD FXSAVE-leak workaround (FILD
            // after EMMS) and simple loads and pops.
            M::Fild | M::Fld1 | M::Fldz => {
                self.x87_ok()?;
                let v = match m {
                    M::Fld1 => 1.0,
                    M::Fldz => 0.0,
                    _ => {
                        let a = self.ea(i);
                        let size = i.memory_size().size();
                        let raw = self.read(a, size)?;
                        let sh = 64 - 8 * size as u32;
                        (((raw << sh) as i64) >> sh) as f64
                    }
                };
                self.fpu.top = (self.fpu.top + 7) & 7;
                self.fpu.st[self.fpu.top as usize] = v;
                self.fpu.ftw |= 1 << self.fpu.top;
                Ok(())
            }
            M::Fstp if i.op_kind(0) == OpKind::Register => {
                self.x87_ok()?;
                let k = (i.op0_register() as usize - Register::ST0 as usize) as u8;
                let src = self.fpu.st[self.fpu.top as usize];
                self.fpu.st[((self.fpu.top + k) & 7) as usize] = src;
                self.fpu.ftw &= !(1 << self.fpu.top);
                self.fpu.top = (self.fpu.top + 1) & 7;
                Ok(())
            }
            M::Ffree => {
                self.x87_ok()?;
                let k = (i.op0_register() as usize - Register::ST0 as usize) as u8;
                self.fpu.ftw &= !(1 << ((self.fpu.top + k) & 7));
                Ok(())
            }
            M::Fincstp | M::Fdecstp => {
                self.x87_ok()?;
                self.fpu.top = if m == M::Fincstp {
                    (self.fpu.top + 1) & 7
                } else {
                    (self.fpu.top + 7) & 7
                };
                Ok(())
            }
            M::Fstp => self.unimplemented(i),
            M::Ldmxcsr | M::Stmxcsr => {
                if self.cr4 & CR4_OSFXSR == 0 {
                    return ud();
                }
                if self.cr0 & CR0_TS != 0 {
                    return fault(NM, None);
                }
                let a = self.ea(i);
                if m == M::Ldmxcsr {
                    let v = self.read(a, 4)? as u32;
                    if v & !0xffff != 0 {
                        return gp(0);
                    }
                    self.fpu.mxcsr = v;
                    Ok(())
                } else {
                    self.write(a, 4, self.fpu.mxcsr as u64)
                }
            }
            _ => self.fxsave_rstor(
                i,
                matches!(m, M::Fxsave | M::Fxsave64),
                matches!(m, M::Fxsave64 | M::Fxrstor64),
            ),
        }
    }

    fn fxsave_rstor(&mut self, i: &Instruction, save: bool, wide: bool) -> X<()> {
        if self.cr0 & (CR0_TS | CR0_EM) != 0 {
            return fault(NM, None);
        }
        let a = self.ea(i);
        if a & 15 != 0 {
            return gp(0);
        }
        let nxmm = if self.bits == 64 { 16 } else { 8 };
        let _ = wide;
        if save {
            // Probe the whole area first: FXSAVE either stores everything or faults.
            self.write(a + 511, 1, 0)?;
            let abridged = (0..8).fold(0u64, |t, k| {
                t | if self.fpu.ftw & (1 << k) != 0 {
                    1 << k
                } else {
                    0
                }
            });
            let fsw = self.fpu.fsw as u64 | ((self.fpu.top as u64 & 7) << 11);
            self.write(a, 8, self.fpu.fcw as u64 | fsw << 16 | abridged << 32)?;
            self.write(a + 8, 8, 0)?;
            self.write(a + 16, 8, 0)?;
            self.write(a + 24, 8, self.fpu.mxcsr as u64 | 0xffff << 32)?;
            for k in 0..8u64 {
                let (mant, se) = f64_to_x87(self.fpu.st[k as usize]);
                self.write(a + 32 + k * 16, 8, mant)?;
                self.write(a + 40 + k * 16, 8, se as u64)?;
            }
            for k in 0..nxmm {
                self.write128(a + 160 + k as u64 * 16, self.fpu.xmm[k])?;
            }
            Ok(())
        } else {
            let w0 = self.read(a, 8)?;
            let mxcsr = self.read(a + 24, 4)? as u32;
            if mxcsr & !0xffff != 0 {
                return gp(0);
            }
            let mut st = [0f64; 8];
            for (k, s) in st.iter_mut().enumerate() {
                let mant = self.read(a + 32 + k as u64 * 16, 8)?;
                let se = self.read(a + 40 + k as u64 * 16, 2)? as u16;
                *s = x87_to_f64(mant, se);
            }
            let mut xmm = self.fpu.xmm;
            for (k, x) in xmm.iter_mut().enumerate().take(nxmm) {
                *x = self.read128(a + 160 + k as u64 * 16)?;
            }
            self.fpu.fcw = w0 as u16;
            let fsw = (w0 >> 16) as u16;
            self.fpu.fsw = fsw & !0x3800;
            self.fpu.top = ((fsw >> 11) & 7) as u8;
            self.fpu.ftw = (w0 >> 32) as u8;
            self.fpu.mxcsr = mxcsr;
            self.fpu.st = st;
            self.fpu.xmm = xmm;
            Ok(())
        }
    }

    fn sse(&mut self, i: &Instruction, m: M) -> X<()> {
        let dst = i.op_register(0);
        match m {
            M::Movaps | M::Movapd | M::Movdqa | M::Movntdq | M::Movntps | M::Movntpd => {
                let v = self.rd_x(i, 1, true)?;
                self.wr_x(i, 0, v, true)
            }
            M::Movups | M::Movupd | M::Movdqu | M::Lddqu => {
                let v = self.rd_x(i, 1, false)?;
                self.wr_x(i, 0, v, false)
            }
            M::Movnti => {
                let v = self.rd_op(i, 1)?;
                self.wr_op(i, 0, v)
            }
            M::Movd | M::Movq => {
                let v = self.rd_x(i, 1, false)?;
                let size = if m == M::Movd { 4 } else { 8 };
                let v = v & if size == 4 {
                    0xffff_ffff
                } else {
                    u64::MAX as u128
                };
                if i.op_kind(0) == OpKind::Register && is_xmm(dst) {
                    self.set_xmm(dst, v);
                    Ok(())
                } else {
                    self.wr_x(i, 0, v, false)
                }
            }
            M::Movss | M::Movsd => {
                let mask: u128 = if m == M::Movss {
                    0xffff_ffff
                } else {
                    u64::MAX as u128
                };
                let v = self.rd_x(i, 1, false)?;
                if i.op_kind(0) == OpKind::Memory {
                    return self.wr_x(i, 0, v & mask, false);
                }
                if i.op_kind(1) == OpKind::Memory {
                    self.set_xmm(dst, v & mask);
                } else {
                    let d = self.xmm(dst);
                    self.set_xmm(dst, (d & !mask) | (v & mask));
                }
                Ok(())
            }
            M::Movlps | M::Movlpd | M::Movhps | M::Movhpd => {
                let high = matches!(m, M::Movhps | M::Movhpd);
                if i.op_kind(0) == OpKind::Memory {
                    let v = self.xmm(i.op_register(1));
                    let a = self.ea(i);
                    return self.write(a, 8, if high { (v >> 64) as u64 } else { v as u64 });
                }
                let a = self.ea(i);
                let v = self.read(a, 8)? as u128;
                let d = self.xmm(dst);
                self.set_xmm(
                    dst,
                    if high {
                        (d & u64::MAX as u128) | v << 64
                    } else {
                        (d & !(u64::MAX as u128)) | v
                    },
                );
                Ok(())
            }
            M::Movhlps | M::Movlhps => {
                let s = self.xmm(i.op_register(1));
                let d = self.xmm(dst);
                let v = if m == M::Movhlps {
                    (d & !(u64::MAX as u128)) | (s >> 64)
                } else {
                    (d & u64::MAX as u128) | (s << 64)
                };
                self.set_xmm(dst, v);
                Ok(())
            }
            M::Pmovmskb | M::Movmskps | M::Movmskpd => {
                let s = self.xmm(i.op_register(1));
                let (lane, n) = match m {
                    M::Pmovmskb => (8, 16),
                    M::Movmskps => (32, 4),
                    _ => (64, 2),
                };
                let mut r = 0u64;
                for k in 0..n {
                    if (s >> (k * lane + lane - 1)) & 1 != 0 {
                        r |= 1 << k;
                    }
                }
                self.wreg(dst, r);
                Ok(())
            }
            M::Pextrw => {
                let s = self.xmm(i.op_register(1));
                let k = (i.immediate8() & 7) as u32;
                let v = ((s >> (k * 16)) & 0xffff) as u64;
                self.wr_op(i, 0, v)
            }
            M::Pinsrw => {
                let v = self.rd_op(i, 1)? & 0xffff;
                let k = (i.immediate8() & 7) as u32;
                let d = self.xmm(dst);
                self.set_xmm(
                    dst,
                    (d & !(0xffffu128 << (k * 16))) | ((v as u128) << (k * 16)),
                );
                Ok(())
            }
            M::Psrlw
            | M::Psrld
            | M::Psrlq
            | M::Psllw
            | M::Pslld
            | M::Psllq
            | M::Psraw
            | M::Psrad => {
                let cnt = if i.op_kind(1) == OpKind::Immediate8 {
                    i.immediate8() as u64
                } else {
                    self.rd_x(i, 1, true)? as u64
                };
                let lane = match m {
                    M::Psrlw | M::Psllw | M::Psraw => 2,
                    M::Psrld | M::Pslld | M::Psrad => 4,
                    _ => 8,
                };
                let bits = lane * 8;
                let d = self.xmm(dst);
                let r = lanes(d, 0, lane, |x, _| match m {
                    M::Psrlw | M::Psrld | M::Psrlq => {
                        if cnt >= bits as u64 {
                            0
                        } else {
                            x >> cnt
                        }
                    }
                    M::Psllw | M::Pslld | M::Psllq => {
                        if cnt >= bits as u64 {
                            0
                        } else {
                            x << cnt
                        }
                    }
                    _ => (sx(x, bits) >> cnt.min(bits as u64 - 1)) as u64,
                });
                self.set_xmm(dst, r);
                Ok(())
            }
            M::Psrldq | M::Pslldq => {
                let n = i.immediate8() as u32;
                let d = self.xmm(dst);
                let r = if n >= 16 {
                    0
                } else if m == M::Psrldq {
                    d >> (n * 8)
                } else {
                    d << (n * 8)
                };
                self.set_xmm(dst, r);
                Ok(())
            }
            M::Pshufd | M::Pshuflw | M::Pshufhw | M::Shufps | M::Shufpd => {
                let s = self.rd_x(i, 1, true)?;
                let imm = i.immediate8() as u32;
                let d = self.xmm(dst);
                let w = |v: u128, k: u32, lane: u32| (v >> (k * lane)) & ((1u128 << lane) - 1);
                let r = match m {
                    M::Pshufd => {
                        (0..4).fold(0u128, |r, k| r | w(s, (imm >> (2 * k)) & 3, 32) << (32 * k))
                    }
                    M::Pshuflw => {
                        (s & !(u64::MAX as u128))
                            | (0..4)
                                .fold(0u128, |r, k| r | w(s, (imm >> (2 * k)) & 3, 16) << (16 * k))
                    }
                    M::Pshufhw => {
                        let hi = s >> 64;
                        (s & u64::MAX as u128)
                            | (0..4).fold(0u128, |r, k| {
                                r | w(hi, (imm >> (2 * k)) & 3, 16) << (16 * k)
                            }) << 64
                    }
                    M::Shufps => {
                        w(d, imm & 3, 32)
                            | w(d, (imm >> 2) & 3, 32) << 32
                            | w(s, (imm >> 4) & 3, 32) << 64
                            | w(s, (imm >> 6) & 3, 32) << 96
                    }
                    _ => {
                        let lo = if imm & 1 != 0 {
                            d >> 64
                        } else {
                            d & u64::MAX as u128
                        };
                        let hi = if imm & 2 != 0 {
                            s >> 64
                        } else {
                            s & u64::MAX as u128
                        };
                        lo | hi << 64
                    }
                };
                self.set_xmm(dst, r);
                Ok(())
            }
            M::Punpcklbw
            | M::Punpcklwd
            | M::Punpckldq
            | M::Punpcklqdq
            | M::Punpckhbw
            | M::Punpckhwd
            | M::Punpckhdq
            | M::Punpckhqdq
            | M::Unpcklps
            | M::Unpcklpd
            | M::Unpckhps
            | M::Unpckhpd => {
                let s = self.rd_x(i, 1, true)?;
                let d = self.xmm(dst);
                let (lane, high) = match m {
                    M::Punpcklbw => (8, false),
                    M::Punpcklwd => (16, false),
                    M::Punpckldq | M::Unpcklps => (32, false),
                    M::Punpcklqdq | M::Unpcklpd => (64, false),
                    M::Punpckhbw => (8, true),
                    M::Punpckhwd => (16, true),
                    M::Punpckhdq | M::Unpckhps => (32, true),
                    _ => (64, true),
                };
                let (a, b) = if high { (d >> 64, s >> 64) } else { (d, s) };
                let lm = (1u128 << lane) - 1;
                let mut r = 0u128;
                for k in 0..(64 / lane) {
                    r |= ((a >> (k * lane)) & lm) << (2 * k * lane);
                    r |= ((b >> (k * lane)) & lm) << ((2 * k + 1) * lane);
                }
                self.set_xmm(dst, r);
                Ok(())
            }
            M::Packuswb | M::Packsswb | M::Packssdw => {
                let s = self.rd_x(i, 1, true)?;
                let d = self.xmm(dst);
                let (inb, outb) = if m == M::Packssdw { (32, 16) } else { (16, 8) };
                let n = 128 / inb;
                let mut r = 0u128;
                for (k, v) in [d, s].iter().enumerate() {
                    for j in 0..n {
                        let x = sx(((v >> (j * inb)) & ((1u128 << inb) - 1)) as u64, inb);
                        let y = if m == M::Packuswb {
                            sat_u(x, outb)
                        } else {
                            sat_s(x, outb)
                        } as u128;
                        r |= (y & ((1u128 << outb) - 1)) << ((k as u32 * n + j) * outb);
                    }
                }
                self.set_xmm(dst, r);
                Ok(())
            }
            _ => self.sse_binop(i, m, dst),
        }
    }

    fn sse_binop(&mut self, i: &Instruction, m: M, dst: Register) -> X<()> {
        let s = self.rd_x(i, 1, true)?;
        let d = if is_xmm(dst) { self.xmm(dst) } else { 0 };
        let r = match m {
            M::Pxor | M::Xorps | M::Xorpd => d ^ s,
            M::Por | M::Orps | M::Orpd => d | s,
            M::Pand | M::Andps | M::Andpd => d & s,
            M::Pandn | M::Andnps | M::Andnpd => !d & s,
            M::Paddb => lanes(d, s, 1, |a, b| a.wrapping_add(b)),
            M::Paddw => lanes(d, s, 2, |a, b| a.wrapping_add(b)),
            M::Paddd => lanes(d, s, 4, |a, b| a.wrapping_add(b)),
            M::Paddq => lanes(d, s, 8, |a, b| a.wrapping_add(b)),
            M::Psubb => lanes(d, s, 1, |a, b| a.wrapping_sub(b)),
            M::Psubw => lanes(d, s, 2, |a, b| a.wrapping_sub(b)),
            M::Psubd => lanes(d, s, 4, |a, b| a.wrapping_sub(b)),
            M::Psubq => lanes(d, s, 8, |a, b| a.wrapping_sub(b)),
            M::Paddusb => lanes(d, s, 1, |a, b| (a + b).min(0xff)),
            M::Paddusw => lanes(d, s, 2, |a, b| (a + b).min(0xffff)),
            M::Psubusb | M::Psubusw => lanes(d, s, if m == M::Psubusb { 1 } else { 2 }, |a, b| {
                a.saturating_sub(b)
            }),
            M::Paddsb => lanes(d, s, 1, |a, b| sat_s(sx(a, 8) + sx(b, 8), 8)),
            M::Paddsw => lanes(d, s, 2, |a, b| sat_s(sx(a, 16) + sx(b, 16), 16)),
            M::Psubsb => lanes(d, s, 1, |a, b| sat_s(sx(a, 8) - sx(b, 8), 8)),
            M::Psubsw => lanes(d, s, 2, |a, b| sat_s(sx(a, 16) - sx(b, 16), 16)),
            M::Pcmpeqb => lanes(d, s, 1, |a, b| if a == b { u64::MAX } else { 0 }),
            M::Pcmpeqw => lanes(d, s, 2, |a, b| if a == b { u64::MAX } else { 0 }),
            M::Pcmpeqd => lanes(d, s, 4, |a, b| if a == b { u64::MAX } else { 0 }),
            M::Pcmpgtb => lanes(
                d,
                s,
                1,
                |a, b| if sx(a, 8) > sx(b, 8) { u64::MAX } else { 0 },
            ),
            M::Pcmpgtw => lanes(
                d,
                s,
                2,
                |a, b| if sx(a, 16) > sx(b, 16) { u64::MAX } else { 0 },
            ),
            M::Pcmpgtd => lanes(
                d,
                s,
                4,
                |a, b| if sx(a, 32) > sx(b, 32) { u64::MAX } else { 0 },
            ),
            M::Pminub => lanes(d, s, 1, |a, b| a.min(b)),
            M::Pmaxub => lanes(d, s, 1, |a, b| a.max(b)),
            M::Pminsw => lanes(d, s, 2, |a, b| sx(a, 16).min(sx(b, 16)) as u64),
            M::Pmaxsw => lanes(d, s, 2, |a, b| sx(a, 16).max(sx(b, 16)) as u64),
            M::Pavgb => lanes(d, s, 1, |a, b| (a + b + 1) >> 1),
            M::Pavgw => lanes(d, s, 2, |a, b| (a + b + 1) >> 1),
            M::Pmullw => lanes(d, s, 2, |a, b| (sx(a, 16) * sx(b, 16)) as u64),
            M::Pmulhw => lanes(d, s, 2, |a, b| ((sx(a, 16) * sx(b, 16)) >> 16) as u64),
            M::Pmulhuw => lanes(d, s, 2, |a, b| (a * b) >> 16),
            M::Pmuludq => lanes(d, s, 8, |a, b| (a & 0xffff_ffff) * (b & 0xffff_ffff)),
            M::Psadbw => {
                let sad = |sh: u32| {
                    (0..8)
                        .map(|k| {
                            ((d >> (sh + 8 * k)) as u8).abs_diff((s >> (sh + 8 * k)) as u8) as u128
                        })
                        .sum::<u128>()
                };
                sad(0) | sad(64) << 64
            }
            M::Pmaddwd => lanes(d, s, 4, |a, b| {
                let p0 = sx(a & 0xffff, 16) * sx(b & 0xffff, 16);
                let p1 = sx(a >> 16, 16) * sx(b >> 16, 16);
                (p0 + p1) as u64
            }),
            M::Addps | M::Subps | M::Mulps | M::Divps | M::Minps | M::Maxps | M::Sqrtps => {
                lanes(d, s, 4, |a, b| {
                    fop32(m, f32::from_bits(a as u32), f32::from_bits(b as u32)).to_bits() as u64
                })
            }
            M::Addpd | M::Subpd | M::Mulpd | M::Divpd | M::Minpd | M::Maxpd | M::Sqrtpd => {
                lanes(d, s, 8, |a, b| {
                    fop64(m, f64::from_bits(a), f64::from_bits(b)).to_bits()
                })
            }
            M::Addss | M::Subss | M::Mulss | M::Divss | M::Minss | M::Maxss | M::Sqrtss => {
                (d & !0xffff_ffff) | fop32(m, f32s(d), f32s(s)).to_bits() as u128
            }
            M::Addsd | M::Subsd | M::Mulsd | M::Divsd | M::Minsd | M::Maxsd | M::Sqrtsd => {
                (d & !(u64::MAX as u128)) | fop64(m, f64s(d), f64s(s)).to_bits() as u128
            }
            M::Comiss | M::Ucomiss | M::Comisd | M::Ucomisd => {
                let (a, b) = if matches!(m, M::Comiss | M::Ucomiss) {
                    (f32s(d) as f64, f32s(s) as f64)
                } else {
                    (f64s(d), f64s(s))
                };
                let f = if a.is_nan() || b.is_nan() {
                    flags::ZF | flags::PF | flags::CF
                } else if a < b {
                    flags::CF
                } else if a == b {
                    flags::ZF
                } else {
                    0
                };
                self.set_arith(flags::ARITH, f);
                return Ok(());
            }
            M::Cmpps | M::Cmppd | M::Cmpss | M::Cmpsd => {
                let p = i.immediate8() & 7;
                let c = |a: f64, b: f64| match p {
                    0 => a == b,
                    1 => a < b,
                    2 => a <= b,
                    3 => a.is_nan() || b.is_nan(),
                    4 => a != b,
                    5 => a >= b || a.is_nan() || b.is_nan(),
                    6 => a > b || a.is_nan() || b.is_nan(),
                    _ => !(a.is_nan() || b.is_nan()),
                };
                match m {
                    M::Cmpps => lanes(d, s, 4, |a, b| {
                        if c(
                            f32::from_bits(a as u32) as f64,
                            f32::from_bits(b as u32) as f64,
                        ) {
                            u64::MAX
                        } else {
                            0
                        }
                    }),
                    M::Cmppd => lanes(d, s, 8, |a, b| {
                        if c(f64::from_bits(a), f64::from_bits(b)) {
                            u64::MAX
                        } else {
                            0
                        }
                    }),
                    M::Cmpss => {
                        (d & !0xffff_ffff)
                            | if c(f32s(d) as f64, f32s(s) as f64) {
                                0xffff_ffff
                            } else {
                                0
                            }
                    }
                    _ => {
                        (d & !(u64::MAX as u128))
                            | if c(f64s(d), f64s(s)) {
                                u64::MAX as u128
                            } else {
                                0
                            }
                    }
                }
            }
            M::Cvtsi2ss | M::Cvtsi2sd => {
                let size = super::op_size(i, 1);
                let v = sx(s as u64, size * 8);
                if m == M::Cvtsi2ss {
                    (d & !0xffff_ffff) | (v as f32).to_bits() as u128
                } else {
                    (d & !(u64::MAX as u128)) | (v as f64).to_bits() as u128
                }
            }
            M::Cvttss2si | M::Cvttsd2si | M::Cvtss2si | M::Cvtsd2si => {
                let x = if matches!(m, M::Cvttss2si | M::Cvtss2si) {
                    f32s(s) as f64
                } else {
                    f64s(s)
                };
                let x = if matches!(m, M::Cvtss2si | M::Cvtsd2si) {
                    x.round_ties_even()
                } else {
                    x.trunc()
                };
                let wide = dst.size() == 8;
                let v = if wide {
                    if x.is_nan()
                        || !(-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&x)
                    {
                        1u64 << 63
                    } else {
                        x as i64 as u64
                    }
                } else if x.is_nan() || !(-2147483648.0..2147483648.0).contains(&x) {
                    0x8000_0000
                } else {
                    x as i32 as u32 as u64
                };
                self.wreg(dst, v);
                return Ok(());
            }
            M::Cvtss2sd => (d & !(u64::MAX as u128)) | (f32s(s) as f64).to_bits() as u128,
            M::Cvtsd2ss => (d & !0xffff_ffff) | (f64s(s) as f32).to_bits() as u128,
            M::Cvtdq2ps => lanes(s, 0, 4, |a, _| (a as u32 as i32 as f32).to_bits() as u64),
            M::Cvttps2dq => lanes(s, 0, 4, |a, _| {
                let x = f32::from_bits(a as u32);
                if x.is_nan() || !(-2147483648.0..2147483648.0).contains(&x) {
                    0x8000_0000
                } else {
                    x as i32 as u32 as u64
                }
            }),
            M::Cvtdq2pd => {
                let lo = (s as u32 as i32) as f64;
                let hi = ((s >> 32) as u32 as i32) as f64;
                lo.to_bits() as u128 | (hi.to_bits() as u128) << 64
            }
            _ => return self.unimplemented(i),
        };
        self.set_xmm(dst, r);
        Ok(())
    }
}

fn fop32(m: M, a: f32, b: f32) -> f32 {
    match m {
        M::Addps | M::Addss => a + b,
        M::Subps | M::Subss => a - b,
        M::Mulps | M::Mulss => a * b,
        M::Divps | M::Divss => a / b,
        M::Minps | M::Minss => {
            if a < b {
                a
            } else {
                b
            }
        }
        M::Maxps | M::Maxss => {
            if a > b {
                a
            } else {
                b
            }
        }
        _ => b.sqrt(),
    }
}

fn fop64(m: M, a: f64, b: f64) -> f64 {
    match m {
        M::Addpd | M::Addsd => a + b,
        M::Subpd | M::Subsd => a - b,
        M::Mulpd | M::Mulsd => a * b,
        M::Divpd | M::Divsd => a / b,
        M::Minpd | M::Minsd => {
            if a < b {
                a
            } else {
                b
            }
        }
        M::Maxpd | M::Maxsd => {
            if a > b {
                a
            } else {
                b
            }
        }
        _ => b.sqrt(),
    }
}

/// f64 → x87 80-bit (mantissa with explicit integer bit, sign+exponent).
fn f64_to_x87(v: f64) -> (u64, u16) {
    let b = v.to_bits();
    let sign = ((b >> 63) as u16) << 15;
    let exp = ((b >> 52) & 0x7ff) as i32;
    let frac = b & ((1 << 52) - 1);
    if exp == 0 && frac == 0 {
        return (0, sign);
    }
    if exp == 0x7ff {
        return ((1 << 63) | (frac << 11), sign | 0x7fff);
    }
    if exp == 0 {
        // Denormal f64: normalise into the wider exponent range.
        let lz = frac.leading_zeros() - 11;
        let mant = frac << (lz + 11);
        return (mant, sign | (15360 - 1022 - lz as i32 + 1 - 1) as u16);
    }
    ((1 << 63) | (frac << 11), sign | (exp - 1023 + 16383) as u16)
}

fn x87_to_f64(mant: u64, se: u16) -> f64 {
    let sign = if se & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = (se & 0x7fff) as i32;
    if exp == 0 && mant == 0 {
        return 0.0 * sign;
    }
    if exp == 0x7fff {
        return if mant << 1 == 0 {
            sign * f64::INFINITY
        } else {
            f64::NAN
        };
    }
    sign * (mant as f64) * 2f64.powi(exp - 16383 - 63)
}
