//! Control transfer: near/far jumps, calls and returns, loops, ENTER/LEAVE, INT n.

use iced_x86::{Instruction, Mnemonic as M, OpKind};

use crate::cpu::*;

impl Cpu {
    /// Masks a branch target to the operand size.
    #[inline]
    fn ip_mask(&self, i: &Instruction) -> u64 {
        match self.bits {
            64 => {
                if i.op_count() > 0 && i.op_kind(0) == OpKind::NearBranch32 {
                    0xffff_ffff
                } else {
                    u64::MAX
                }
            }
            _ => match i.op_kind(0) {
                OpKind::NearBranch16 => 0xffff,
                _ => {
                    if i.op_count() > 0 && i.op_kind(0) != OpKind::NearBranch32 {
                        super::szmask(super::op_size(i, 0).max(2))
                    } else {
                        0xffff_ffff
                    }
                }
            },
        }
    }

    pub(super) fn exec_ctrl(&mut self, i: &Instruction) -> Option<X<()>> {
        let m = i.mnemonic();
        Some(match m {
            M::Jmp => match i.op_kind(0) {
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    self.rip = i.near_branch_target();
                    Ok(())
                }
                OpKind::FarBranch16 | OpKind::FarBranch32 => {
                    let off = if i.op_kind(0) == OpKind::FarBranch16 {
                        i.far_branch16() as u64
                    } else {
                        i.far_branch32() as u64
                    };
                    self.far_jump(i.far_branch_selector(), off, false, 0)
                }
                _ if i.op_kind(0) == OpKind::Memory
                    && !i.memory_size().is_packed()
                    && is_far_ptr(i) =>
                {
                    self.far_from_mem(i, false)
                }
                _ => self.rd_op(i, 0).map(|t| self.rip = t),
            },
            M::Call => {
                let size = (-i.stack_pointer_increment()) as usize;
                match i.op_kind(0) {
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                        let ret = self.rip;
                        self.push(size, ret)
                            .map(|_| self.rip = i.near_branch_target())
                    }
                    OpKind::FarBranch16 | OpKind::FarBranch32 => {
                        let off = if i.op_kind(0) == OpKind::FarBranch16 {
                            i.far_branch16() as u64
                        } else {
                            i.far_branch32() as u64
                        };
                        self.far_jump(i.far_branch_selector(), off, true, size / 2)
                    }
                    _ if is_far_ptr(i) => self.far_from_mem(i, true),
                    _ => {
                        let t = match self.rd_op(i, 0) {
                            Ok(t) => t,
                            Err(e) => return Some(Err(e)),
                        };
                        let ret = self.rip;
                        self.push(size, ret).map(|_| self.rip = t)
                    }
                }
            }
            M::Ret => {
                let size = ret_size(i, self.bits);
                let extra = if i.op_count() > 0 {
                    i.immediate16() as u64
                } else {
                    0
                };
                match self.pop(size) {
                    Ok(t) => {
                        let m = self.sp_mask();
                        self.gpr[4] = (self.gpr[4] & !m) | (self.gpr[4].wrapping_add(extra) & m);
                        self.rip = t;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            M::Retf => {
                let size = match i.code() {
                    iced_x86::Code::Retfw | iced_x86::Code::Retfw_imm16 => 2,
                    iced_x86::Code::Retfq | iced_x86::Code::Retfq_imm16 => 8,
                    _ => 4,
                };
                let extra = if i.op_count() > 0 {
                    i.immediate16() as u64
                } else {
                    0
                };
                self.far_ret(size, extra)
            }
            M::Iret | M::Iretd | M::Iretq => {
                let size = match m {
                    M::Iret => 2,
                    M::Iretd => 4,
                    _ => 8,
                };
                self.iret(size)
            }
            M::Loop | M::Loope | M::Loopne | M::Jcxz | M::Jecxz | M::Jrcxz => {
                let csize = match m {
                    M::Jcxz => 2,
                    M::Jecxz => 4,
                    M::Jrcxz => 8,
                    _ => self.bits / 8,
                };
                let csize = loop_count_size(i).unwrap_or(csize);
                let mask = super::szmask(csize);
                let take = if matches!(m, M::Jcxz | M::Jecxz | M::Jrcxz) {
                    self.gpr[1] & mask == 0
                } else {
                    let c = self.gpr[1].wrapping_sub(1) & mask;
                    self.set_gpr(1, csize, c);
                    c != 0
                        && match m {
                            M::Loope => self.cond(4),
                            M::Loopne => self.cond(5),
                            _ => true,
                        }
                };
                if take {
                    self.rip = i.near_branch_target() & self.ip_mask(i);
                }
                Ok(())
            }
            M::Leave => {
                let size = match i.code() {
                    iced_x86::Code::Leavew => 2,
                    iced_x86::Code::Leaved => 4,
                    _ => 8,
                };
                let m = self.sp_mask();
                let old = self.gpr[4];
                self.gpr[4] = (self.gpr[4] & !m) | (self.gpr[5] & m);
                match self.pop(size) {
                    Ok(v) => {
                        self.set_gpr(5, size as u32, v);
                        Ok(())
                    }
                    Err(e) => {
                        self.gpr[4] = old;
                        Err(e)
                    }
                }
            }
            M::Enter => self.enter(i),
            M::Int => self.soft_int(i.immediate8(), true),
            M::Int3 => self.soft_int(BP, false),
            M::Into => {
                if self.bits == 64 {
                    return Some(ud());
                }
                if self.cond(0) {
                    self.soft_int(4, false)
                } else {
                    Ok(())
                }
            }
            M::Int1 => self.soft_int(DB, false),
            _ => {
                let cc = i.condition_code();
                if cc == iced_x86::ConditionCode::None || !is_jcc(m) {
                    return None;
                }
                if self.cond(cc as u8 - 1) {
                    self.rip = i.near_branch_target();
                }
                Ok(())
            }
        })
    }

    fn enter(&mut self, i: &Instruction) -> X<()> {
        let size = match self.bits {
            64 => {
                if i.code() == iced_x86::Code::Enterw_imm16_imm8 {
                    2
                } else {
                    8
                }
            }
            _ => {
                if i.code() == iced_x86::Code::Enterw_imm16_imm8 {
                    2
                } else {
                    4
                }
            }
        };
        let alloc = i.immediate16() as u64;
        let level = i.immediate8_2nd() as u64 & 31;
        let old_sp = self.gpr[4];
        let bp = self.gpr[5];
        let r = (|| {
            self.push(size, bp)?;
            let frame = self.gpr[4] & self.sp_mask();
            if level > 0 {
                let mut b = bp;
                for _ in 1..level {
                    b = b.wrapping_sub(size as u64);
                    let a = self.lin(SS, b & self.sp_mask());
                    let v = self.read(a, size)?;
                    self.push(size, v)?;
                }
                self.push(size, frame)?;
            }
            let m = self.sp_mask();
            let sp = self.gpr[4].wrapping_sub(alloc) & m;
            // The new stack top must be writable.
            let a = self.lin(SS, sp);
            self.read(a, 1)?;
            self.set_gpr(5, size as u32, frame);
            self.gpr[4] = (self.gpr[4] & !m) | sp;
            Ok(())
        })();
        if r.is_err() {
            self.gpr[4] = old_sp;
            self.gpr[5] = bp;
        }
        r
    }
}

fn is_jcc(m: M) -> bool {
    matches!(
        m,
        M::Jo
            | M::Jno
            | M::Jb
            | M::Jae
            | M::Je
            | M::Jne
            | M::Jbe
            | M::Ja
            | M::Js
            | M::Jns
            | M::Jp
            | M::Jnp
            | M::Jl
            | M::Jge
            | M::Jle
            | M::Jg
    )
}

fn is_far_ptr(i: &Instruction) -> bool {
    use iced_x86::MemorySize as S;
    i.op_kind(0) == OpKind::Memory
        && matches!(i.memory_size(), S::SegPtr16 | S::SegPtr32 | S::SegPtr64)
}

fn ret_size(i: &Instruction, bits: u32) -> usize {
    use iced_x86::Code as C;
    match i.code() {
        C::Retnw | C::Retnw_imm16 => 2,
        C::Retnd | C::Retnd_imm16 => 4,
        C::Retnq | C::Retnq_imm16 => 8,
        _ => (bits / 8) as usize,
    }
}

/// The counter width of LOOP/JCXZ comes from the address size.
fn loop_count_size(i: &Instruction) -> Option<u32> {
    use iced_x86::Code as C;
    Some(match i.code() {
        C::Loopne_rel8_16_CX
        | C::Loopne_rel8_32_CX
        | C::Loope_rel8_16_CX
        | C::Loope_rel8_32_CX
        | C::Loop_rel8_16_CX
        | C::Loop_rel8_32_CX
        | C::Jcxz_rel8_16
        | C::Jcxz_rel8_32 => 2,
        C::Loopne_rel8_16_ECX
        | C::Loopne_rel8_32_ECX
        | C::Loopne_rel8_64_ECX
        | C::Loope_rel8_16_ECX
        | C::Loope_rel8_32_ECX
        | C::Loope_rel8_64_ECX
        | C::Loop_rel8_16_ECX
        | C::Loop_rel8_32_ECX
        | C::Loop_rel8_64_ECX
        | C::Jecxz_rel8_16
        | C::Jecxz_rel8_32
        | C::Jecxz_rel8_64 => 4,
        C::Loopne_rel8_64_RCX | C::Loope_rel8_64_RCX | C::Loop_rel8_64_RCX | C::Jrcxz_rel8_64 => 8,
        _ => return None,
    })
}
