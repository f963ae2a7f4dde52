//! The architectural state of one software vCPU and the small helpers every instruction uses.

use std::sync::Arc;

use corefour_hypervisor::{DescriptorTable, Segment, VmExit, VmOps};

use crate::mem::PhysMem;
use crate::vm::Shared;

use crate::flags::{self, Lazy, Op};
use crate::mmu::Tlb;

pub const CR0_PE: u64 = 1;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_EM: u64 = 1 << 2;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_PGE: u64 = 1 << 7;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const EFER_SCE: u64 = 1;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;

/// Segment register numbers in iced-x86's order (ES, CS, SS, DS, FS, GS).
pub const ES: usize = 0;
pub const CS: usize = 1;
pub const SS: usize = 2;
pub const DS: usize = 3;
pub const FS: usize = 4;
pub const GS: usize = 5;

/// A CPU exception to deliver through the IDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub vector: u8,
    pub code: Option<u32>,
}

pub const DE: u8 = 0;
pub const DB: u8 = 1;
pub const NMI: u8 = 2;
pub const BP: u8 = 3;
pub const UD: u8 = 6;
pub const NM: u8 = 7;
pub const DF: u8 = 8;
pub const TS: u8 = 10;
pub const NP: u8 = 11;
pub const SSF: u8 = 12;
pub const GP: u8 = 13;
pub const PF: u8 = 14;
pub const MF: u8 = 16;
pub const XM: u8 = 19;

/// Why an instruction stopped short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    Fault(Fault),
    /// HLT: wait for an interrupt.
    Halt,
    /// The VMM must see this.
    Exit(VmExit),
}

pub type X<T> = Result<T, Stop>;

#[inline]
pub fn gp<T>(code: u32) -> X<T> {
    Err(Stop::Fault(Fault {
        vector: GP,
        code: Some(code),
    }))
}

#[inline]
pub fn ud<T>() -> X<T> {
    Err(Stop::Fault(Fault {
        vector: UD,
        code: None,
    }))
}

#[inline]
pub fn fault<T>(vector: u8, code: Option<u32>) -> X<T> {
    Err(Stop::Fault(Fault { vector, code }))
}

/// Model-specific registers kept as plain values.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub tsc_aux: u64,
    pub pat: u64,
    pub misc_enable: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub tsc_offset: i64,
    pub mtrr_def_type: u64,
    pub hwcr: u64,
}

/// x87 and SSE state. The x87 stack is kept as f64: the kernel only initialises and saves it,
/// and guests here do not compute with 80-bit precision.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Fpu {
    pub fcw: u16,
    pub fsw: u16,
    pub ftw: u8,
    pub st: [f64; 8],
    pub top: u8,
    pub xmm: [u128; 16],
    pub mxcsr: u32,
}

impl Default for Fpu {
    fn default() -> Self {
        Fpu {
            fcw: 0x37f,
            fsw: 0,
            ftw: 0,
            st: [0.0; 8],
            top: 0,
            xmm: [0; 16],
            mxcsr: 0x1f80,
        }
    }
}

/// What a vCPU reaches outside itself: guest RAM, the VMM's devices, the VM's shared parts.
pub struct Env {
    pub mem: Arc<PhysMem>,
    pub ops: Arc<dyn VmOps>,
    pub vm: Arc<Shared>,
    pub id: u32,
}

pub struct Cpu {
    pub env: Env,
    /// The VM-wide epoch this vCPU's TLB and decode cache were filled under.
    pub epoch: u64,
    pub gpr: [u64; 16],
    pub rip: u64,
    /// Non-arithmetic flags always; arithmetic flags when `lazy.op == Valid`.
    pub rflags: u64,
    pub lazy: Lazy,
    pub seg: [Segment; 6],
    pub ldt: Segment,
    pub tr: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub msr: Msrs,
    pub fpu: Fpu,
    pub cpl: u8,
    /// 16, 32 or 64: the current code size.
    pub bits: u32,
    /// Interrupts are held off for one instruction after STI / MOV SS.
    pub shadow: bool,
    /// End the current block after this instruction (mode, paging or code changed).
    pub brk: bool,
    pub tlb: Tlb,
    /// Instructions retired, for MIPS figures.
    pub icount: u64,
    /// Start of the instruction being executed (exceptions restart from here).
    pub cur_ip: u64,
    /// Retired-instruction count at which timers and interrupts are looked at next.
    pub poll_at: u64,
    pub dr: [u64; 8],
    /// COREFOUR_EMU_PROFILE counters (off unless the variable is set).
    pub prof: crate::profile::Profile,
    /// The arithmetic flags while translated code runs (see `jit`), in RFLAGS layout.
    pub jit_flags: u64,
    /// The block whose translated code last left to the vCPU (written by every exit), so the
    /// vCPU links and patches from the block that really ran last in a chain.
    pub jit_last: u64,
}

impl Cpu {
    pub fn new(env: Env) -> Self {
        let mut c = Cpu {
            env,
            epoch: 0,
            gpr: [0; 16],
            rip: 0xfff0,
            rflags: 2,
            lazy: Lazy::default(),
            seg: [Segment::default(); 6],
            ldt: Segment::default(),
            tr: Segment::default(),
            gdt: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idt: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            cr0: CR0_ET | CR0_NE | 0x6000_0000,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            msr: Msrs {
                pat: 0x0007_0406_0007_0406,
                misc_enable: 1,
                ..Msrs::default()
            },
            fpu: Fpu::default(),
            cpl: 0,
            bits: 16,
            shadow: false,
            brk: false,
            tlb: Tlb::new(),
            icount: 0,
            cur_ip: 0,
            poll_at: 0,
            dr: [0, 0, 0, 0, 0, 0, 0xffff_0ff0, 0x400],
            prof: crate::profile::Profile::default(),
            jit_flags: 2,
            jit_last: 0,
        };
        for (i, s) in c.seg.iter_mut().enumerate() {
            *s = Segment {
                base: 0,
                limit: 0xffff,
                selector: 0,
                type_: if i == CS { 0xb } else { 3 },
                present: true,
                s: true,
                ..Segment::default()
            };
        }
        c.seg[CS].selector = 0xf000;
        c.seg[CS].base = 0xffff_0000;
        c.ldt = Segment {
            limit: 0xffff,
            type_: 2,
            present: true,
            ..Segment::default()
        };
        c.tr = Segment {
            limit: 0xffff,
            type_: 0xb,
            present: true,
            ..Segment::default()
        };
        c
    }
}

impl Cpu {
    #[inline]
    pub fn long_mode(&self) -> bool {
        self.efer & EFER_LMA != 0
    }

    #[inline]
    pub fn protected(&self) -> bool {
        self.cr0 & CR0_PE != 0
    }

    /// Recomputes the code size and CPL after CS, CR0 or EFER changed.
    pub fn update_mode(&mut self) {
        let cs = &self.seg[CS];
        self.bits = if self.long_mode() && cs.l {
            64
        } else if self.protected() && cs.db {
            32
        } else {
            16
        };
        self.cpl = if !self.protected() {
            0
        } else if self.rflags & flags::VM != 0 {
            3
        } else {
            cs.dpl
        };
        self.brk = true;
    }

    /// The full RFLAGS, computing lazy arithmetic flags.
    #[inline]
    pub fn flags(&mut self) -> u64 {
        if self.lazy.op != Op::Valid {
            self.rflags = (self.rflags & !flags::ARITH) | self.lazy.compute();
            self.lazy.op = Op::Valid;
        }
        self.rflags
    }

    #[inline]
    pub fn set_flags_lazy(&mut self, op: Op, bits: u32, a: u64, b: u64, r: u64) {
        self.lazy = Lazy {
            op,
            bits,
            a,
            b,
            r,
            c: false,
        };
    }

    /// Overwrites the arithmetic flags in `mask` with `val`.
    #[inline]
    pub fn set_arith(&mut self, mask: u64, val: u64) {
        let f = self.flags();
        self.rflags = (f & !mask) | (val & mask);
    }

    #[inline]
    pub fn cf(&mut self) -> bool {
        match self.lazy.op {
            Op::Sub => {
                (self.lazy.a & flags::mask(self.lazy.bits))
                    < (self.lazy.b & flags::mask(self.lazy.bits))
            }
            Op::Logic => false,
            Op::Szp => self.lazy.b & flags::CF != 0,
            _ => self.flags() & flags::CF != 0,
        }
    }

    /// Evaluates a condition code (the low 4 bits of Jcc/SETcc/CMOVcc).
    #[inline]
    pub fn cond(&mut self, cc: u8) -> bool {
        // The common compare-then-branch case straight from the lazy operands.
        if self.lazy.op == Op::Sub {
            let m = flags::mask(self.lazy.bits);
            let (a, b) = (self.lazy.a & m, self.lazy.b & m);
            let sh = 64 - self.lazy.bits;
            let (sa, sb) = (((a << sh) as i64) >> sh, ((b << sh) as i64) >> sh);
            let r = match cc >> 1 {
                1 => Some(a < b),
                2 => Some(a == b),
                3 => Some(a <= b),
                6 => Some(sa < sb),
                7 => Some(sa <= sb),
                _ => None,
            };
            if let Some(r) = r {
                return r ^ (cc & 1 != 0);
            }
        }
        if self.lazy.op == Op::Logic {
            // CF = OF = 0 after logic ops.
            let bits = self.lazy.bits;
            let r = self.lazy.r & flags::mask(bits);
            let sign = r >> (bits - 1) & 1 != 0;
            let v = match cc >> 1 {
                0 | 1 => false,
                2 | 3 => r == 0,
                4 | 6 => sign,
                5 => flags::parity(r) != 0,
                _ => r == 0 || sign,
            };
            return v ^ (cc & 1 != 0);
        }
        if self.lazy.op != Op::Valid && matches!(cc >> 1, 2 | 4) {
            // ZF and SF come straight from the result for every lazy operation.
            let bits = self.lazy.bits;
            let r = self.lazy.r & flags::mask(bits);
            let v = if cc >> 1 == 2 {
                r == 0
            } else {
                r >> (bits - 1) & 1 != 0
            };
            return v ^ (cc & 1 != 0);
        }
        let f = self.flags();
        let r = match cc >> 1 {
            0 => f & flags::OF != 0,
            1 => f & flags::CF != 0,
            2 => f & flags::ZF != 0,
            3 => f & (flags::CF | flags::ZF) != 0,
            4 => f & flags::SF != 0,
            5 => f & flags::PF != 0,
            6 => (f & flags::SF != 0) != (f & flags::OF != 0),
            _ => f & flags::ZF != 0 || ((f & flags::SF != 0) != (f & flags::OF != 0)),
        };
        r ^ (cc & 1 != 0)
    }

    /// Mask for the current stack width.
    #[inline]
    pub fn sp_mask(&self) -> u64 {
        if self.bits == 64 {
            u64::MAX
        } else if self.seg[SS].db {
            0xffff_ffff
        } else {
            0xffff
        }
    }

    /// The linear address of segment `s` at `off`.
    #[inline]
    pub fn lin(&self, s: usize, off: u64) -> u64 {
        if self.bits == 64 {
            if s >= FS {
                self.seg[s].base.wrapping_add(off)
            } else {
                off
            }
        } else {
            self.seg[s].base.wrapping_add(off) & 0xffff_ffff
        }
    }

    /// Writes a general register of `size` bytes with x86 merge/zero-extend rules.
    #[inline]
    pub fn set_gpr(&mut self, idx: usize, size: u32, v: u64) {
        let r = &mut self.gpr[idx];
        *r = match size {
            8 => v,
            4 => v & 0xffff_ffff,
            2 => (*r & !0xffff) | (v & 0xffff),
            _ => (*r & !0xff) | (v & 0xff),
        };
    }
}
