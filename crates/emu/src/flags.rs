//! Lazy arithmetic flags: the last flag-setting operation keeps its operands and result, and
//! CF/PF/AF/ZF/SF/OF are only computed when something reads them (QEMU's `cc_op`).

pub const CF: u64 = 1 << 0;
pub const PF: u64 = 1 << 2;
pub const AF: u64 = 1 << 4;
pub const ZF: u64 = 1 << 6;
pub const SF: u64 = 1 << 7;
pub const TF: u64 = 1 << 8;
pub const IF: u64 = 1 << 9;
pub const DF: u64 = 1 << 10;
pub const OF: u64 = 1 << 11;
pub const IOPL: u64 = 3 << 12;
pub const NT: u64 = 1 << 14;
pub const RF: u64 = 1 << 16;
pub const VM: u64 = 1 << 17;
pub const AC: u64 = 1 << 18;
pub const VIF: u64 = 1 << 19;
pub const VIP: u64 = 1 << 20;
pub const ID: u64 = 1 << 21;
pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The arithmetic flags in `rflags` are current.
    Valid,
    Add,
    Adc,
    Sub,
    Sbb,
    Logic,
    Inc,
    Dec,
    /// SF/ZF/PF from the result; CF, OF and AF are the bits given in `b` (multiplies and
    /// shifts, whose CF/OF are known when they execute and whose AF is carried over).
    Szp,
}

#[derive(Debug, Clone, Copy)]
pub struct Lazy {
    pub op: Op,
    pub bits: u32,
    pub a: u64,
    pub b: u64,
    pub r: u64,
    /// Carry in (ADC/SBB) or the preserved CF (INC/DEC).
    pub c: bool,
}

impl Default for Lazy {
    fn default() -> Self {
        Lazy {
            op: Op::Valid,
            bits: 64,
            a: 0,
            b: 0,
            r: 0,
            c: false,
        }
    }
}

#[inline]
pub fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

#[inline]
pub fn parity(v: u64) -> u64 {
    if (v as u8).count_ones().is_multiple_of(2) {
        PF
    } else {
        0
    }
}

/// Sign, zero and parity of a result of `bits` width.
#[inline]
pub fn szp(r: u64, bits: u32) -> u64 {
    let m = mask(bits);
    let mut f = parity(r);
    if r & m == 0 {
        f |= ZF;
    }
    if r & (1 << (bits - 1)) != 0 {
        f |= SF;
    }
    f
}

impl Lazy {
    /// AF as the last operation left it (`rflags` holds it when the flags are `Valid`).
    #[inline]
    pub fn af(&self, rflags: u64) -> u64 {
        match self.op {
            Op::Valid => rflags & AF,
            Op::Logic => 0,
            Op::Szp => self.b & AF,
            _ => (self.a ^ self.b ^ self.r) & AF,
        }
    }

    /// The six arithmetic flags this operation produced.
    #[inline]
    pub fn compute(&self) -> u64 {
        let m = mask(self.bits);
        let sign = 1u64 << (self.bits - 1);
        let (a, b, r) = (self.a & m, self.b & m, self.r & m);
        let mut f = szp(r, self.bits);
        match self.op {
            Op::Valid => return 0,
            Op::Logic => return f,
            Op::Szp => return f | (self.b & (CF | OF | AF)),
            Op::Add | Op::Adc | Op::Inc => {
                if (a ^ r) & (b ^ r) & sign != 0 {
                    f |= OF;
                }
                let cf = match self.op {
                    Op::Add => r < a,
                    Op::Adc => r < a || (self.c && r == a),
                    _ => self.c,
                };
                if cf {
                    f |= CF;
                }
            }
            Op::Sub | Op::Sbb | Op::Dec => {
                if (a ^ b) & (a ^ r) & sign != 0 {
                    f |= OF;
                }
                let cf = match self.op {
                    Op::Sub => a < b,
                    Op::Sbb => a < b || (self.c && a == b),
                    _ => self.c,
                };
                if cf {
                    f |= CF;
                }
            }
        }
        f | ((a ^ b ^ r) & AF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lz(op: Op, bits: u32, a: u64, b: u64, r: u64, c: bool) -> u64 {
        Lazy {
            op,
            bits,
            a,
            b,
            r,
            c,
        }
        .compute()
    }

    #[test]
    fn add_carry_overflow() {
        assert_eq!(lz(Op::Add, 8, 0xff, 1, 0x100, false), CF | ZF | PF | AF);
        assert_eq!(lz(Op::Add, 8, 0x7f, 1, 0x80, false), OF | SF | AF);
        assert_eq!(lz(Op::Add, 64, u64::MAX, 1, 0, false), CF | ZF | PF | AF);
    }

    #[test]
    fn sub_borrow() {
        assert_eq!(lz(Op::Sub, 32, 0, 1, u64::MAX, false), CF | SF | PF | AF);
        assert_eq!(lz(Op::Sub, 16, 0x8000, 1, 0x7fff, false), OF | PF | AF);
        assert_eq!(lz(Op::Sbb, 8, 5, 5, 0xff, true), CF | SF | PF | AF);
    }

    #[test]
    fn szp_takes_cf_of_af_from_b() {
        assert_eq!(
            lz(Op::Szp, 32, 0, CF | OF | AF | ZF, 0, false),
            CF | OF | AF | ZF | PF
        );
        assert_eq!(lz(Op::Szp, 8, 0, 0, 0x81, false), SF | PF);
        let l = Lazy {
            op: Op::Add,
            bits: 8,
            a: 0x0f,
            b: 1,
            r: 0x10,
            c: false,
        };
        assert_eq!(l.af(0), AF);
        assert_eq!(Lazy::default().af(AF | CF), AF);
    }

    #[test]
    fn inc_keeps_carry() {
        assert_eq!(lz(Op::Inc, 8, 0xff, 1, 0, true) & CF, CF);
        assert_eq!(lz(Op::Dec, 8, 1, 1, 0, false), ZF | PF);
    }
}
