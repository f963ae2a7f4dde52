//! Instruction semantics. `exec` dispatches on the mnemonic; each group lives in its own file.
//! Operands are read and written through the helpers here so every instruction sees the same
//! register-size, segment and address-size rules.

mod alu;
mod ctrl;
pub mod fast;
mod sse;
mod string;
mod system;

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use crate::cpu::*;
use crate::flags;

#[inline]
fn seg_index(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::ES as usize).min(5)
}

/// Operand size in bytes of operand `n`.
#[inline]
pub fn op_size(i: &Instruction, n: u32) -> u32 {
    match i.op_kind(n) {
        OpKind::Register => i.op_register(n).size() as u32,
        OpKind::Memory => i.memory_size().size() as u32,
        OpKind::Immediate8 | OpKind::Immediate8_2nd => 1,
        OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
        OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
        _ => 8,
    }
}

#[inline]
pub fn szmask(size: u32) -> u64 {
    flags::mask(size * 8)
}

impl Cpu {
    #[inline]
    pub fn rreg(&self, r: Register) -> u64 {
        let n = r as usize;
        match n {
            1..=4 => self.gpr[n - 1] & 0xff,
            5..=8 => (self.gpr[n - 5] >> 8) & 0xff,
            9..=20 => self.gpr[n - 5] & 0xff,
            21..=36 => self.gpr[n - 21] & 0xffff,
            37..=52 => self.gpr[n - 37] & 0xffff_ffff,
            53..=68 => self.gpr[n - 53],
            69 => self.rip & 0xffff_ffff,
            70 => self.rip,
            71..=76 => self.seg[n - 71].selector as u64,
            _ => 0,
        }
    }

    #[inline]
    pub fn wreg(&mut self, r: Register, v: u64) {
        let n = r as usize;
        match n {
            1..=4 => self.set_gpr(n - 1, 1, v),
            5..=8 => {
                let g = &mut self.gpr[n - 5];
                *g = (*g & !0xff00) | ((v & 0xff) << 8);
            }
            9..=20 => self.set_gpr(n - 5, 1, v),
            21..=36 => self.set_gpr(n - 21, 2, v),
            37..=52 => self.set_gpr(n - 37, 4, v),
            53..=68 => self.gpr[n - 53] = v,
            _ => {}
        }
    }

    /// The offset (before the segment base) of the memory operand.
    #[inline]
    pub fn ea_off(&self, i: &Instruction) -> u64 {
        let base = i.memory_base();
        if base == Register::RIP {
            return i.memory_displacement64();
        }
        if base == Register::EIP {
            return i.memory_displacement64() & 0xffff_ffff;
        }
        let mut a = i.memory_displacement64();
        let index = i.memory_index();
        let asize = if base != Register::None {
            a = a.wrapping_add(self.rreg(base));
            base.size()
        } else if index != Register::None {
            index.size()
        } else if i.memory_displ_size() == 2 {
            2
        } else if self.bits == 64 {
            8
        } else {
            4
        };
        if index != Register::None {
            a = a.wrapping_add(self.rreg(index).wrapping_mul(i.memory_index_scale() as u64));
        }
        match asize {
            2 => a & 0xffff,
            4 => a & 0xffff_ffff,
            _ => a,
        }
    }

    /// The linear address of the memory operand.
    #[inline]
    pub fn ea(&self, i: &Instruction) -> u64 {
        self.lin(seg_index(i.memory_segment()), self.ea_off(i))
    }

    #[inline]
    pub fn rd_op(&mut self, i: &Instruction, n: u32) -> X<u64> {
        match i.op_kind(n) {
            OpKind::Register => Ok(self.rreg(i.op_register(n))),
            OpKind::Memory => {
                let a = self.ea(i);
                self.read(a, i.memory_size().size())
            }
            OpKind::Immediate8 => Ok(i.immediate8() as u64),
            OpKind::Immediate8_2nd => Ok(i.immediate8_2nd() as u64),
            OpKind::Immediate16 => Ok(i.immediate16() as u64),
            OpKind::Immediate32 => Ok(i.immediate32() as u64),
            OpKind::Immediate64 => Ok(i.immediate64()),
            OpKind::Immediate8to16 => Ok(i.immediate8to16() as u16 as u64),
            OpKind::Immediate8to32 => Ok(i.immediate8to32() as u32 as u64),
            OpKind::Immediate8to64 => Ok(i.immediate8to64() as u64),
            OpKind::Immediate32to64 => Ok(i.immediate32to64() as u64),
            _ => ud(),
        }
    }

    #[inline]
    pub fn wr_op(&mut self, i: &Instruction, n: u32, v: u64) -> X<()> {
        match i.op_kind(n) {
            OpKind::Register => {
                self.wreg(i.op_register(n), v);
                Ok(())
            }
            OpKind::Memory => {
                let a = self.ea(i);
                self.write(a, i.memory_size().size(), v)
            }
            _ => ud(),
        }
    }

    /// Pushes `size` bytes.
    #[inline]
    pub fn push(&mut self, size: usize, v: u64) -> X<()> {
        let m = self.sp_mask();
        let sp = self.gpr[4].wrapping_sub(size as u64) & m;
        let a = self.lin(SS, sp);
        self.write(a, size, v)?;
        self.gpr[4] = (self.gpr[4] & !m) | sp;
        Ok(())
    }

    #[inline]
    pub fn pop(&mut self, size: usize) -> X<u64> {
        let m = self.sp_mask();
        let sp = self.gpr[4] & m;
        let a = self.lin(SS, sp);
        let v = self.read(a, size)?;
        self.gpr[4] = (self.gpr[4] & !m) | (sp.wrapping_add(size as u64) & m);
        Ok(v)
    }

    /// Executes one decoded instruction. On entry `rip` already points at the next one.
    pub fn exec(&mut self, i: &Instruction) -> X<()> {
        match i.mnemonic() {
            M::Mov => {
                if i.op_kind(0) == OpKind::Register && i.op_register(0).is_segment_register() {
                    let v = self.rd_op(i, 1)? as u16;
                    return self.mov_sreg(seg_index(i.op_register(0)), v);
                }
                if i.op_kind(0) == OpKind::Register {
                    let r = i.op_register(0);
                    if r.is_cr() || r.is_dr() {
                        return self.mov_to_crdr(r, self.rreg(i.op_register(1)));
                    }
                }
                if i.op_kind(1) == OpKind::Register {
                    let r = i.op_register(1);
                    if r.is_cr() || r.is_dr() {
                        let v = self.mov_from_crdr(r)?;
                        self.wreg(i.op_register(0), v);
                        return Ok(());
                    }
                    if r.is_segment_register() {
                        let v = self.seg[seg_index(r)].selector as u64;
                        // A register destination gets the selector zero-extended.
                        return if i.op_kind(0) == OpKind::Register {
                            let d = i.op_register(0);
                            if d.size() == 8 || d.size() == 4 {
                                self.wreg(d.full_register32(), v);
                            } else {
                                self.wreg(d, v);
                            }
                            Ok(())
                        } else {
                            let a = self.ea(i);
                            self.write(a, 2, v)
                        };
                    }
                }
                let v = self.rd_op(i, 1)?;
                self.wr_op(i, 0, v)
            }
            M::Movzx => {
                let v = self.rd_op(i, 1)?;
                self.wr_op(i, 0, v)
            }
            M::Movsx | M::Movsxd => {
                let s = op_size(i, 1);
                let d = op_size(i, 0);
                let v = self.rd_op(i, 1)?;
                let sh = 64 - s * 8;
                let v = (((v << sh) as i64) >> sh) as u64 & szmask(d);
                self.wr_op(i, 0, v)
            }
            M::Lea => {
                let v = self.ea_off(i);
                self.wr_op(i, 0, v)
            }
            M::Mfence => {
                // Host stores may sit in the store buffer past a later load: order them as the
                // guest asked (the host is x86 too, so other orderings already hold).
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
            M::Nop
            | M::Pause
            | M::Lfence
            | M::Sfence
            | M::Prefetchnta
            | M::Prefetcht0
            | M::Prefetcht1
            | M::Prefetcht2
            | M::Prefetchw
            | M::Prefetch
            | M::Clflush
            | M::Clflushopt
            | M::Endbr64
            | M::Endbr32 => Ok(()),
            M::Wait => self.fwait(),
            M::Xchg => {
                // XCHG with memory is always locked.
                let mem = (0..2).find(|&n| i.op_kind(n) == OpKind::Memory);
                if let Some(n) = mem {
                    let r = i.op_register(1 - n);
                    let size = r.size();
                    let v = self.rreg(r);
                    let addr = self.ea(i);
                    let old = self.locked_rmw(addr, size, |_| Some(v))?;
                    self.wreg(r, old);
                    return Ok(());
                }
                let a = self.rd_op(i, 0)?;
                let b = self.rd_op(i, 1)?;
                self.wr_op(i, 0, b)?;
                self.wr_op(i, 1, a)
            }
            M::Push => {
                let size = (-i.stack_pointer_increment()) as usize;
                let v =
                    if i.op_kind(0) == OpKind::Register && i.op_register(0).is_segment_register() {
                        self.seg[seg_index(i.op_register(0))].selector as u64
                    } else {
                        self.rd_op(i, 0)?
                    };
                self.push(size, v)
            }
            M::Pop => {
                let size = i.stack_pointer_increment() as usize;
                if i.op_kind(0) == OpKind::Register && i.op_register(0).is_segment_register() {
                    let sp = self.gpr[4];
                    let v = self.pop(size)?;
                    let r = self.mov_sreg(seg_index(i.op_register(0)), v as u16);
                    if r.is_err() {
                        self.gpr[4] = sp;
                    }
                    return r;
                }
                let sp = self.gpr[4];
                let v = self.pop(size)?;
                // POP [rsp+x] addresses with the incremented RSP, as the CPU does.
                if let Err(e) = self.wr_op(i, 0, v) {
                    self.gpr[4] = sp;
                    return Err(e);
                }
                Ok(())
            }
            M::Pushf | M::Pushfd | M::Pushfq => {
                let size = (-i.stack_pointer_increment()) as usize;
                let f = self.flags() & !(flags::VM | flags::RF);
                self.push(size, f)
            }
            M::Popf | M::Popfd | M::Popfq => {
                let size = i.stack_pointer_increment() as usize;
                let v = self.pop(size)?;
                self.write_flags(v, size);
                self.brk = true;
                Ok(())
            }
            M::Cbw => {
                let v = self.gpr[0] as i8 as i16 as u16 as u64;
                self.set_gpr(0, 2, v);
                Ok(())
            }
            M::Cwde => {
                let v = self.gpr[0] as i16 as i32 as u32 as u64;
                self.set_gpr(0, 4, v);
                Ok(())
            }
            M::Cdqe => {
                self.gpr[0] = self.gpr[0] as i32 as i64 as u64;
                Ok(())
            }
            M::Cwd => {
                let v = if self.gpr[0] & 0x8000 != 0 { 0xffff } else { 0 };
                self.set_gpr(2, 2, v);
                Ok(())
            }
            M::Cdq => {
                let v = if self.gpr[0] & 0x8000_0000 != 0 {
                    0xffff_ffff
                } else {
                    0
                };
                self.set_gpr(2, 4, v);
                Ok(())
            }
            M::Cqo => {
                self.gpr[2] = ((self.gpr[0] as i64) >> 63) as u64;
                Ok(())
            }
            M::Lahf => {
                let f = self.flags() as u8 as u64;
                self.wreg(Register::AH, f | 2);
                Ok(())
            }
            M::Sahf => {
                let ah = self.rreg(Register::AH);
                self.set_arith(
                    flags::CF | flags::PF | flags::AF | flags::ZF | flags::SF,
                    ah,
                );
                Ok(())
            }
            M::Clc => {
                self.set_arith(flags::CF, 0);
                Ok(())
            }
            M::Stc => {
                self.set_arith(flags::CF, flags::CF);
                Ok(())
            }
            M::Cmc => {
                let f = self.flags();
                self.rflags = f ^ flags::CF;
                Ok(())
            }
            M::Cld => {
                self.rflags &= !flags::DF;
                Ok(())
            }
            M::Std => {
                self.rflags |= flags::DF;
                Ok(())
            }
            M::Cli => {
                if !self.iopl_ok() {
                    return gp(0);
                }
                self.rflags &= !flags::IF;
                Ok(())
            }
            M::Sti => {
                if !self.iopl_ok() {
                    return gp(0);
                }
                if self.rflags & flags::IF == 0 {
                    self.shadow = true;
                }
                self.rflags |= flags::IF;
                self.brk = true;
                Ok(())
            }
            M::Hlt => {
                if self.cpl != 0 {
                    return gp(0);
                }
                Err(Stop::Halt)
            }
            M::Ud0 | M::Ud1 | M::Ud2 => ud(),
            M::INVALID => self.unimplemented(i),
            _ => self.exec2(i),
        }
    }

    fn exec2(&mut self, i: &Instruction) -> X<()> {
        if let Some(r) = self.exec_alu(i) {
            return r;
        }
        if let Some(r) = self.exec_ctrl(i) {
            return r;
        }
        if let Some(r) = self.exec_string(i) {
            return r;
        }
        if let Some(r) = self.exec_system(i) {
            return r;
        }
        if let Some(r) = self.exec_sse(i) {
            return r;
        }
        self.unimplemented(i)
    }

    /// #UD for an instruction this CPU does not implement, named when tracing is on.
    pub fn unimplemented(&mut self, i: &Instruction) -> X<()> {
        if self.env.vm.trace_unimpl {
            let lin = self.lin(CS, i.ip());
            eprintln!(
                "emu: unimplemented instruction {:?} ({:?}) at {:#x} (rip {:#x}, cpl {})",
                i.mnemonic(),
                i.code(),
                lin,
                i.ip(),
                self.cpl
            );
        }
        ud()
    }

    #[inline]
    pub fn iopl_ok(&self) -> bool {
        !self.protected() || self.cpl as u64 <= (self.rflags & flags::IOPL) >> 12
    }

    /// Loads RFLAGS from POPF/IRET with the privilege rules for IOPL and IF.
    pub fn write_flags(&mut self, v: u64, size: usize) {
        let old = self.flags();
        let mut change = flags::ARITH | flags::TF | flags::DF | flags::NT | flags::AC | flags::ID;
        if self.cpl == 0 || !self.protected() {
            change |= flags::IOPL | flags::IF;
        } else if self.iopl_ok() {
            change |= flags::IF;
        }
        if size == 2 {
            change &= 0xffff;
        }
        self.rflags = ((old & !change) | (v & change)) | 2;
    }
}

/// CMOVcc in any of its sixteen conditions (the condition itself is `condition_code()`): the
/// interpreter's handlers and the JIT pick them out the same way.
pub(crate) fn is_cmov(m: M) -> bool {
    matches!(
        m,
        M::Cmovo
            | M::Cmovno
            | M::Cmovb
            | M::Cmovae
            | M::Cmove
            | M::Cmovne
            | M::Cmovbe
            | M::Cmova
            | M::Cmovs
            | M::Cmovns
            | M::Cmovp
            | M::Cmovnp
            | M::Cmovl
            | M::Cmovge
            | M::Cmovle
            | M::Cmovg
    )
}

/// SETcc in any of its sixteen conditions.
pub(crate) fn is_setcc(m: M) -> bool {
    matches!(
        m,
        M::Seto
            | M::Setno
            | M::Setb
            | M::Setae
            | M::Sete
            | M::Setne
            | M::Setbe
            | M::Seta
            | M::Sets
            | M::Setns
            | M::Setp
            | M::Setnp
            | M::Setl
            | M::Setge
            | M::Setle
            | M::Setg
    )
}
