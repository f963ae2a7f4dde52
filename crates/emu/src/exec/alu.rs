//! Integer arithmetic, logic, shifts, multiply/divide, bit operations, CMOVcc/SETcc.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::{op_size, szmask};
use crate::cpu::*;
use crate::flags::{self, Op};

impl Cpu {
    pub(super) fn exec_alu(&mut self, i: &Instruction) -> Option<X<()>> {
        let m = i.mnemonic();
        Some(match m {
            M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor | M::Cmp | M::Test => {
                self.alu2(i, m)
            }
            M::Inc | M::Dec | M::Neg | M::Not => self.alu1(i, m),
            M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr => {
                self.shift(i, m)
            }
            M::Shld | M::Shrd => self.shxd(i, m == M::Shld),
            M::Mul | M::Imul | M::Div | M::Idiv => self.muldiv(i, m),
            M::Bt | M::Bts | M::Btr | M::Btc => self.bt(i, m),
            M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt => self.bsx(i, m),
            M::Bswap => {
                let r = i.op_register(0);
                let v = self.rreg(r);
                let v = if r.size() == 8 {
                    v.swap_bytes()
                } else {
                    (v as u32).swap_bytes() as u64
                };
                self.wreg(r, v);
                Ok(())
            }
            M::Xadd => self.xadd(i),
            M::Cmpxchg => self.cmpxchg(i),
            M::Cmpxchg8b | M::Cmpxchg16b => self.cmpxchg_wide(i, m == M::Cmpxchg16b),
            M::Xlatb => {
                let off = (self.gpr[3].wrapping_add(self.gpr[0] & 0xff))
                    & match self.bits {
                        64 => u64::MAX,
                        32 => 0xffff_ffff,
                        _ => 0xffff,
                    };
                let seg = super::seg_index(i.memory_segment());
                let a = self.lin(seg, off);
                self.read(a, 1).map(|v| self.set_gpr(0, 1, v))
            }
            _ => {
                let cc = i.condition_code();
                if cc == iced_x86::ConditionCode::None {
                    return None;
                }
                let cc = cc as u8 - 1;
                match m {
                    m if super::is_cmov(m) => self.cmov(i, cc),
                    m if super::is_setcc(m) => {
                        let v = self.cond(cc) as u64;
                        self.wr_op(i, 0, v)
                    }
                    _ => return None,
                }
            }
        })
    }

    fn cmov(&mut self, i: &Instruction, cc: u8) -> X<()> {
        // The source is read (and may fault) whatever the condition; a 32-bit destination is
        // zero-extended even when the move does not happen.
        let v = self.rd_op(i, 1)?;
        if self.cond(cc) {
            self.wr_op(i, 0, v)
        } else {
            let r = i.op_register(0);
            if r.size() == 4 {
                let cur = self.rreg(r);
                self.wreg(r, cur);
            }
            Ok(())
        }
    }

    fn alu2(&mut self, i: &Instruction, m: M) -> X<()> {
        let size = op_size(i, 0);
        let bits = size * 8;
        let mask = szmask(size);
        let mem = i.op_kind(0) == OpKind::Memory;
        let addr = if mem { self.ea(i) } else { 0 };
        if mem && i.has_lock_prefix() && m != M::Cmp && m != M::Test {
            return self.alu2_locked(i, m, addr, size);
        }
        let a = if mem {
            self.read(addr, size as usize)?
        } else {
            self.rreg(i.op_register(0))
        };
        let b = self.rd_op(i, 1)? & mask;
        let (r, op) = match m {
            M::Add => (a.wrapping_add(b), Op::Add),
            M::Sub | M::Cmp => (a.wrapping_sub(b), Op::Sub),
            M::And | M::Test => (a & b, Op::Logic),
            M::Or => (a | b, Op::Logic),
            M::Xor => (a ^ b, Op::Logic),
            M::Adc => {
                let c = self.cf();
                let r = a.wrapping_add(b).wrapping_add(c as u64);
                self.lazy = flags::Lazy {
                    op: Op::Adc,
                    bits,
                    a,
                    b,
                    r: r & mask,
                    c,
                };
                return self.alu_store(i, mem, addr, size, r & mask);
            }
            _ => {
                let c = self.cf();
                let r = a.wrapping_sub(b).wrapping_sub(c as u64);
                self.lazy = flags::Lazy {
                    op: Op::Sbb,
                    bits,
                    a,
                    b,
                    r: r & mask,
                    c,
                };
                return self.alu_store(i, mem, addr, size, r & mask);
            }
        };
        let r = r & mask;
        self.set_flags_lazy(op, bits, a, b, r);
        if m == M::Cmp || m == M::Test {
            return Ok(());
        }
        self.alu_store(i, mem, addr, size, r)
    }

    /// LOCK ADD/SUB/AND/OR/XOR/ADC/SBB on memory: one atomic update, flags from its old value.
    fn alu2_locked(&mut self, i: &Instruction, m: M, addr: u64, size: u32) -> X<()> {
        let bits = size * 8;
        let mask = szmask(size);
        let b = self.rd_op(i, 1)? & mask;
        let c = self.cf();
        let calc = move |a: u64| {
            (match m {
                M::Add => a.wrapping_add(b),
                M::Sub => a.wrapping_sub(b),
                M::And => a & b,
                M::Or => a | b,
                M::Xor => a ^ b,
                M::Adc => a.wrapping_add(b).wrapping_add(c as u64),
                _ => a.wrapping_sub(b).wrapping_sub(c as u64),
            }) & mask
        };
        let a = self.locked_rmw(addr, size as usize, |a| Some(calc(a)))?;
        let r = calc(a);
        match m {
            M::Add => self.set_flags_lazy(Op::Add, bits, a, b, r),
            M::Sub => self.set_flags_lazy(Op::Sub, bits, a, b, r),
            M::And | M::Or | M::Xor => self.set_flags_lazy(Op::Logic, bits, a, b, r),
            _ => {
                self.lazy = flags::Lazy {
                    op: if m == M::Adc { Op::Adc } else { Op::Sbb },
                    bits,
                    a,
                    b,
                    r,
                    c,
                }
            }
        }
        Ok(())
    }

    #[inline]
    fn alu_store(&mut self, i: &Instruction, mem: bool, addr: u64, size: u32, r: u64) -> X<()> {
        if mem {
            self.write(addr, size as usize, r)
        } else {
            self.wreg(i.op_register(0), r);
            Ok(())
        }
    }

    fn alu1(&mut self, i: &Instruction, m: M) -> X<()> {
        let size = op_size(i, 0);
        let bits = size * 8;
        let mask = szmask(size);
        let mem = i.op_kind(0) == OpKind::Memory;
        let addr = if mem { self.ea(i) } else { 0 };
        let locked = mem && i.has_lock_prefix();
        let calc = move |a: u64| {
            (match m {
                M::Inc => a.wrapping_add(1),
                M::Dec => a.wrapping_sub(1),
                M::Neg => 0u64.wrapping_sub(a),
                _ => !a,
            }) & mask
        };
        let a = if locked {
            self.locked_rmw(addr, size as usize, |a| Some(calc(a)))?
        } else if mem {
            self.read(addr, size as usize)?
        } else {
            self.rreg(i.op_register(0))
        };
        let r = match m {
            M::Inc | M::Dec => {
                let c = self.cf();
                let (r, op) = if m == M::Inc {
                    (a.wrapping_add(1) & mask, Op::Inc)
                } else {
                    (a.wrapping_sub(1) & mask, Op::Dec)
                };
                self.lazy = flags::Lazy {
                    op,
                    bits,
                    a,
                    b: 1,
                    r,
                    c,
                };
                r
            }
            M::Neg => {
                let r = 0u64.wrapping_sub(a) & mask;
                self.set_flags_lazy(Op::Sub, bits, 0, a, r);
                r
            }
            _ => !a & mask,
        };
        debug_assert_eq!(r, calc(a));
        if locked {
            return Ok(());
        }
        self.alu_store(i, mem, addr, size, r)
    }

    fn shift(&mut self, i: &Instruction, m: M) -> X<()> {
        let size = op_size(i, 0);
        let bits = size * 8;
        let mask = szmask(size);
        let mem = i.op_kind(0) == OpKind::Memory;
        let addr = if mem { self.ea(i) } else { 0 };
        let a = if mem {
            self.read(addr, size as usize)?
        } else {
            self.rreg(i.op_register(0))
        };
        let cnt_raw = if i.op_count() > 1 {
            self.rd_op(i, 1)?
        } else {
            1
        };
        let cnt = (cnt_raw & if bits == 64 { 63 } else { 31 }) as u32;
        if cnt == 0 {
            return Ok(());
        }
        let f = self.flags();
        let sign = 1u64 << (bits - 1);
        let (r, mut nf) = match m {
            M::Shl | M::Sal => {
                let r = if cnt >= 64 { 0 } else { (a << cnt) & mask };
                let cf = cnt <= bits && (a >> (bits - cnt)) & 1 != 0;
                let mut nf = flags::szp(r, bits) | if cf { flags::CF } else { 0 };
                if ((r & sign != 0) as u64 ^ cf as u64) != 0 {
                    nf |= flags::OF;
                }
                (r, nf)
            }
            M::Shr => {
                let r = if cnt >= 64 { 0 } else { a >> cnt };
                let cf = (a >> (cnt - 1)) & 1 != 0;
                let mut nf = flags::szp(r, bits) | if cf { flags::CF } else { 0 };
                if a & sign != 0 {
                    nf |= flags::OF;
                }
                (r, nf)
            }
            M::Sar => {
                let sh = 64 - bits;
                let sa = ((a << sh) as i64) >> sh;
                let r = (sa >> cnt.min(63)) as u64 & mask;
                let cf = (sa >> (cnt - 1).min(63)) & 1 != 0;
                (r, flags::szp(r, bits) | if cf { flags::CF } else { 0 })
            }
            M::Rol => {
                let c = cnt % bits;
                let r = if c == 0 {
                    a
                } else {
                    ((a << c) | (a >> (bits - c))) & mask
                };
                let cf = r & 1 != 0;
                let mut nf = (f & !(flags::CF | flags::OF)) & flags::ARITH;
                if cf {
                    nf |= flags::CF;
                }
                if ((r & sign != 0) as u64 ^ cf as u64) != 0 {
                    nf |= flags::OF;
                }
                (r, nf)
            }
            M::Ror => {
                let c = cnt % bits;
                let r = if c == 0 {
                    a
                } else {
                    ((a >> c) | (a << (bits - c))) & mask
                };
                let cf = r & sign != 0;
                let mut nf = (f & !(flags::CF | flags::OF)) & flags::ARITH;
                if cf {
                    nf |= flags::CF;
                }
                if ((r >> (bits - 1)) ^ (r >> (bits - 2))) & 1 != 0 {
                    nf |= flags::OF;
                }
                (r, nf)
            }
            _ => {
                // RCL/RCR rotate through CF: a (bits+1)-bit rotation.
                let c = cnt % (bits + 1);
                let mut v = a;
                let mut cf = f & flags::CF != 0;
                for _ in 0..c {
                    if m == M::Rcl {
                        let out = v & sign != 0;
                        v = ((v << 1) | cf as u64) & mask;
                        cf = out;
                    } else {
                        let out = v & 1 != 0;
                        v = (v >> 1) | if cf { sign } else { 0 };
                        cf = out;
                    }
                }
                let mut nf = (f & !(flags::CF | flags::OF)) & flags::ARITH;
                if cf {
                    nf |= flags::CF;
                }
                let of = if m == M::Rcl {
                    ((v & sign != 0) as u64 ^ cf as u64) != 0
                } else {
                    ((v >> (bits - 1)) ^ (v >> (bits - 2))) & 1 != 0
                };
                if of {
                    nf |= flags::OF;
                }
                (v, nf)
            }
        };
        // AF is undefined for shifts; hardware leaves it as it was on the CPUs we compare with.
        if matches!(m, M::Shl | M::Sal | M::Shr | M::Sar) {
            nf = (nf & !flags::AF) | (f & flags::AF);
        }
        self.rflags = (f & !flags::ARITH) | nf;
        self.alu_store(i, mem, addr, size, r)
    }

    fn shxd(&mut self, i: &Instruction, left: bool) -> X<()> {
        let size = op_size(i, 0);
        let bits = size * 8;
        let mask = szmask(size);
        let mem = i.op_kind(0) == OpKind::Memory;
        let addr = if mem { self.ea(i) } else { 0 };
        let a = if mem {
            self.read(addr, size as usize)?
        } else {
            self.rreg(i.op_register(0))
        };
        let b = self.rreg(i.op_register(1));
        let cnt = (self.rd_op(i, 2)? & if bits == 64 { 63 } else { 31 }) as u32;
        if cnt == 0 {
            return Ok(());
        }
        let (r, cf) = if bits == 16 && cnt > 16 {
            // Undefined result; compute it like a 32-bit double shift.
            let wide = if left { (a << 16) | b } else { (b << 16) | a };
            let r = if left {
                (wide << cnt) >> 16
            } else {
                wide >> cnt
            };
            (r & mask, false)
        } else if left {
            let wide = ((a as u128) << bits) | b as u128;
            let r = (wide << cnt) >> bits;
            (r as u64 & mask, (a >> (bits - cnt)) & 1 != 0)
        } else {
            let wide = ((b as u128) << bits) | a as u128;
            let r = wide >> cnt;
            (r as u64 & mask, (a >> (cnt - 1)) & 1 != 0)
        };
        let f = self.flags();
        let mut nf = flags::szp(r, bits) | (f & flags::AF);
        if cf {
            nf |= flags::CF;
        }
        if ((r ^ a) >> (bits - 1)) & 1 != 0 {
            nf |= flags::OF;
        }
        self.rflags = (f & !flags::ARITH) | nf;
        self.alu_store(i, mem, addr, size, r)
    }

    fn muldiv(&mut self, i: &Instruction, m: M) -> X<()> {
        if m == M::Imul && i.op_count() > 1 {
            let size = op_size(i, 0);
            let bits = size * 8;
            let (a, b) = if i.op_count() == 2 {
                (self.rreg(i.op_register(0)), self.rd_op(i, 1)?)
            } else {
                (self.rd_op(i, 1)?, self.rd_op(i, 2)?)
            };
            let sh = 64 - bits;
            let sa = ((a << sh) as i64) >> sh;
            let sb = ((b << sh) as i64) >> sh;
            let full = sa as i128 * sb as i128;
            let r = full as u64 & szmask(size);
            let trunc = ((r << sh) as i64 >> sh) as i128;
            let ovf = trunc != full;
            self.set_mul_flags(r, bits, ovf);
            self.wreg(i.op_register(0), r);
            return Ok(());
        }
        let size = op_size(i, 0);
        let bits = size * 8;
        let mask = szmask(size);
        let src = self.rd_op(i, 0)? & mask;
        let (lo, hi) = match size {
            1 => (self.gpr[0] & 0xff, (self.gpr[0] >> 8) & 0xff),
            _ => (self.gpr[0] & mask, self.gpr[2] & mask),
        };
        match m {
            M::Mul | M::Imul => {
                let (rl, rh, ovf) = if m == M::Mul {
                    let p = lo as u128 * src as u128;
                    let rl = p as u64 & mask;
                    let rh = (p >> bits) as u64 & mask;
                    (rl, rh, rh != 0)
                } else {
                    let sh = 64 - bits;
                    let a = ((lo << sh) as i64 >> sh) as i128;
                    let b = ((src << sh) as i64 >> sh) as i128;
                    let p = a * b;
                    let rl = p as u64 & mask;
                    let rh = (p >> bits) as u64 & mask;
                    let trunc = ((rl << sh) as i64 >> sh) as i128;
                    (rl, rh, trunc != p)
                };
                if size == 1 {
                    self.set_gpr(0, 2, rl | rh << 8);
                } else {
                    self.set_gpr(0, size, rl);
                    self.set_gpr(2, size, rh);
                }
                self.set_mul_flags(rl, bits, ovf);
                Ok(())
            }
            _ => {
                if src == 0 {
                    return fault(DE, None);
                }
                let dividend = (hi as u128) << bits | lo as u128;
                let (q, r) = if m == M::Div {
                    let q = dividend / src as u128;
                    if q > mask as u128 {
                        return fault(DE, None);
                    }
                    (q as u64, (dividend % src as u128) as u64)
                } else {
                    let sh = 128 - 2 * bits;
                    let n = ((dividend << sh) as i128) >> sh;
                    let s64 = 64 - bits;
                    let d = (((src << s64) as i64) >> s64) as i128;
                    if n == i128::MIN >> (128 - 2 * bits) && d == -1 && bits == 64 {
                        return fault(DE, None);
                    }
                    let q = n / d;
                    let min = -(1i128 << (bits - 1));
                    let max = (1i128 << (bits - 1)) - 1;
                    if q < min || q > max {
                        return fault(DE, None);
                    }
                    (q as u64 & mask, (n % d) as u64 & mask)
                };
                if size == 1 {
                    self.set_gpr(0, 2, q | r << 8);
                } else {
                    self.set_gpr(0, size, q);
                    self.set_gpr(2, size, r);
                }
                Ok(())
            }
        }
    }

    pub(super) fn set_mul_flags(&mut self, r: u64, bits: u32, ovf: bool) {
        // SF/ZF/PF/AF are undefined after MUL; AMD and Intel differ. Keep them as computed
        // from the low result (AF unchanged), the common choice; lazily, as a multiply is
        // mostly followed by more arithmetic, not by a flag read.
        let af = self.lazy.af(self.rflags);
        self.lazy = flags::Lazy {
            op: Op::Szp,
            bits,
            a: 0,
            b: af | if ovf { flags::CF | flags::OF } else { 0 },
            r,
            c: false,
        };
    }

    fn bt(&mut self, i: &Instruction, m: M) -> X<()> {
        let size = op_size(i, 0);
        let bits = size as u64 * 8;
        let off = self.rd_op(i, 1)?;
        let f = self.flags();
        let (addr, v, bit) = if i.op_kind(0) == OpKind::Memory {
            let mut a = self.ea(i);
            let bit = if i.op_kind(1) == OpKind::Register {
                // A register bit offset addresses memory beyond the operand (signed).
                let sh = 64 - bits;
                let so = ((off << sh) as i64) >> sh;
                a = a.wrapping_add(
                    ((so >> (if bits == 64 {
                        6
                    } else {
                        bits.trailing_zeros() as u64
                    })) * size as i64) as u64,
                );
                (so as u64) & (bits - 1)
            } else {
                off & (bits - 1)
            };
            if i.has_lock_prefix() && m != M::Bt {
                let mask = 1u64 << bit;
                let v = self.locked_rmw(a, size as usize, |v| {
                    Some(match m {
                        M::Bts => v | mask,
                        M::Btr => v & !mask,
                        _ => v ^ mask,
                    })
                })?;
                self.rflags = (f & !flags::CF) | ((v >> bit) & 1);
                return Ok(());
            }
            (Some(a), self.read(a, size as usize)?, bit)
        } else {
            (None, self.rreg(i.op_register(0)), off & (bits - 1))
        };
        let cf = (v >> bit) & 1;
        self.rflags = (f & !flags::CF) | cf;
        let nv = match m {
            M::Bts => v | 1 << bit,
            M::Btr => v & !(1 << bit),
            M::Btc => v ^ 1 << bit,
            _ => return Ok(()),
        };
        match addr {
            Some(a) => self.write(a, size as usize, nv),
            None => {
                self.wreg(i.op_register(0), nv);
                Ok(())
            }
        }
    }

    fn bsx(&mut self, i: &Instruction, m: M) -> X<()> {
        let size = op_size(i, 0);
        let v = self.rd_op(i, 1)? & szmask(size);
        let f = self.flags();
        if v == 0 {
            self.rflags = (f & !flags::ZF) | flags::ZF;
            return Ok(());
        }
        // Without BMI1/ABM advertised, TZCNT/LZCNT execute as BSF/BSR, as on such CPUs.
        let r = if matches!(m, M::Bsf | M::Tzcnt) {
            v.trailing_zeros()
        } else {
            63 - v.leading_zeros()
        };
        self.rflags = f & !flags::ZF;
        self.wreg(i.op_register(0), r as u64);
        Ok(())
    }

    fn xadd(&mut self, i: &Instruction) -> X<()> {
        let size = op_size(i, 0);
        let b = self.rreg(i.op_register(1));
        if i.op_kind(0) == OpKind::Memory {
            let mask = szmask(size);
            let addr = self.ea(i);
            let a = self.locked_rmw(addr, size as usize, |a| Some(a.wrapping_add(b) & mask))?;
            let r = a.wrapping_add(b) & mask;
            self.wreg(i.op_register(1), a);
            self.set_flags_lazy(Op::Add, size * 8, a, b, r);
            return Ok(());
        }
        let a = self.rd_op(i, 0)?;
        let r = a.wrapping_add(b) & szmask(size);
        // Memory first (it may fault); with both operands the same register the sum wins.
        if i.op_kind(0) == OpKind::Memory {
            self.wr_op(i, 0, r)?;
            self.wreg(i.op_register(1), a);
        } else {
            self.wreg(i.op_register(1), a);
            self.wr_op(i, 0, r)?;
        }
        self.set_flags_lazy(Op::Add, size * 8, a, b, r);
        Ok(())
    }

    fn cmpxchg(&mut self, i: &Instruction) -> X<()> {
        let size = op_size(i, 0);
        let mask = szmask(size);
        let acc = self.gpr[0] & mask;
        if i.op_kind(0) == OpKind::Memory {
            let s = self.rreg(i.op_register(1));
            let addr = self.ea(i);
            let d = self.locked_rmw(addr, size as usize, |d| (d == acc).then_some(s))?;
            self.set_flags_lazy(Op::Sub, size * 8, acc, d, acc.wrapping_sub(d) & mask);
            if acc != d {
                self.set_gpr(0, size, d);
            }
            return Ok(());
        }
        let d = self.rd_op(i, 0)?;
        self.set_flags_lazy(Op::Sub, size * 8, acc, d, acc.wrapping_sub(d) & mask);
        if acc == d {
            let s = self.rreg(i.op_register(1));
            self.wr_op(i, 0, s)
        } else {
            // The destination is written back with its own value (a locked cycle always writes).
            if i.op_kind(0) == OpKind::Memory {
                self.wr_op(i, 0, d)?;
            }
            self.set_gpr(0, size, d);
            Ok(())
        }
    }

    fn cmpxchg_wide(&mut self, i: &Instruction, wide: bool) -> X<()> {
        let a = self.ea(i);
        let f = self.flags();
        if wide {
            if a & 15 != 0 {
                return gp(0);
            }
            let cmp = self.gpr[0] as u128 | (self.gpr[2] as u128) << 64;
            let n = self.gpr[3] as u128 | (self.gpr[1] as u128) << 64;
            let old = self.locked_cmpxchg16(a, cmp, n)?;
            if old == cmp {
                self.rflags = f | flags::ZF;
            } else {
                self.gpr[0] = old as u64;
                self.gpr[2] = (old >> 64) as u64;
                self.rflags = f & !flags::ZF;
            }
        } else {
            let cmp = (self.gpr[0] & 0xffff_ffff) | (self.gpr[2] << 32);
            let n = (self.gpr[3] & 0xffff_ffff) | (self.gpr[1] << 32);
            let v = self.locked_rmw(a, 8, |v| (v == cmp).then_some(n))?;
            if v == cmp {
                self.rflags = f | flags::ZF;
            } else {
                self.set_gpr(0, 4, v & 0xffff_ffff);
                self.set_gpr(2, 4, v >> 32);
                self.rflags = f & !flags::ZF;
            }
        }
        let _ = Register::None;
        Ok(())
    }
}
