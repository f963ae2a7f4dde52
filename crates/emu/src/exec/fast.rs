//! Threaded dispatch: at decode time each instruction gets a handler. The common register and
//! simple memory forms (what compilers emit most: MOV, ALU, LEA, PUSH/POP, Jcc, CALL/RET)
//! get specialised handlers that skip the mnemonic match and operand-kind dispatch; everything
//! else goes through the general `Cpu::exec`.

use iced_x86::{Code as C, Instruction, Mnemonic as M, OpKind, Register};

use crate::cpu::*;
use crate::flags::Op;

pub type Handler = fn(&mut Cpu, &Instruction) -> X<()>;

#[inline(always)]
fn r64(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::RAX as usize) & 15
}

#[inline(always)]
fn r32(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::EAX as usize) & 15
}

fn general(c: &mut Cpu, i: &Instruction) -> X<()> {
    c.exec(i)
}

fn nop(_: &mut Cpu, _: &Instruction) -> X<()> {
    Ok(())
}

fn mov_rr64(c: &mut Cpu, i: &Instruction) -> X<()> {
    c.gpr[r64(i.op0_register())] = c.gpr[r64(i.op1_register())];
    Ok(())
}

fn mov_rr32(c: &mut Cpu, i: &Instruction) -> X<()> {
    c.gpr[r32(i.op0_register())] = c.gpr[r32(i.op1_register())] & 0xffff_ffff;
    Ok(())
}

fn mov_load64(c: &mut Cpu, i: &Instruction) -> X<()> {
    let a = c.ea(i);
    c.gpr[r64(i.op0_register())] = c.read(a, 8)?;
    Ok(())
}

fn mov_load32(c: &mut Cpu, i: &Instruction) -> X<()> {
    let a = c.ea(i);
    c.gpr[r32(i.op0_register())] = c.read(a, 4)?;
    Ok(())
}

fn mov_store64(c: &mut Cpu, i: &Instruction) -> X<()> {
    let a = c.ea(i);
    c.write(a, 8, c.gpr[r64(i.op1_register())])
}

fn mov_store32(c: &mut Cpu, i: &Instruction) -> X<()> {
    let a = c.ea(i);
    c.write(a, 4, c.gpr[r32(i.op1_register())])
}

fn mov_ri64(c: &mut Cpu, i: &Instruction) -> X<()> {
    c.gpr[r64(i.op0_register())] = i.immediate64();
    Ok(())
}

fn mov_ri64s(c: &mut Cpu, i: &Instruction) -> X<()> {
    c.gpr[r64(i.op0_register())] = i.immediate32to64() as u64;
    Ok(())
}

fn mov_ri32(c: &mut Cpu, i: &Instruction) -> X<()> {
    c.gpr[r32(i.op0_register())] = i.immediate32() as u64;
    Ok(())
}

fn lea64(c: &mut Cpu, i: &Instruction) -> X<()> {
    c.gpr[r64(i.op0_register())] = c.ea_off(i);
    Ok(())
}

fn lea32(c: &mut Cpu, i: &Instruction) -> X<()> {
    c.gpr[r32(i.op0_register())] = c.ea_off(i) & 0xffff_ffff;
    Ok(())
}

fn push64(c: &mut Cpu, i: &Instruction) -> X<()> {
    let v = c.gpr[r64(i.op0_register())];
    c.push(8, v)
}

fn pop64(c: &mut Cpu, i: &Instruction) -> X<()> {
    let v = c.pop(8)?;
    c.gpr[r64(i.op0_register())] = v;
    Ok(())
}

fn jcc(c: &mut Cpu, i: &Instruction) -> X<()> {
    if c.cond(i.condition_code() as u8 - 1) {
        c.rip = i.near_branch_target();
    }
    Ok(())
}

fn jmp(c: &mut Cpu, i: &Instruction) -> X<()> {
    c.rip = i.near_branch_target();
    Ok(())
}

fn call64(c: &mut Cpu, i: &Instruction) -> X<()> {
    let ret = c.rip;
    c.push(8, ret)?;
    c.rip = i.near_branch_target();
    Ok(())
}

fn ret64(c: &mut Cpu, _: &Instruction) -> X<()> {
    c.rip = c.pop(8)?;
    Ok(())
}

const ADD: u8 = 0;
const SUB: u8 = 1;
const CMP: u8 = 2;
const AND: u8 = 3;
const OR: u8 = 4;
const XOR: u8 = 5;
const TEST: u8 = 6;

/// ALU op on a 32- or 64-bit register with a register or immediate source.
fn alu_r<const OP: u8, const W64: bool, const IMM: bool>(c: &mut Cpu, i: &Instruction) -> X<()> {
    let (d, mask, bits) = if W64 {
        (r64(i.op0_register()), u64::MAX, 64)
    } else {
        (r32(i.op0_register()), 0xffff_ffff, 32)
    };
    let a = c.gpr[d] & mask;
    let b = if IMM {
        i.immediate(1) & mask
    } else if W64 {
        c.gpr[r64(i.op1_register())]
    } else {
        c.gpr[r32(i.op1_register())] & mask
    };
    let (r, op) = match OP {
        ADD => (a.wrapping_add(b) & mask, Op::Add),
        SUB | CMP => (a.wrapping_sub(b) & mask, Op::Sub),
        AND | TEST => (a & b, Op::Logic),
        OR => (a | b, Op::Logic),
        _ => (a ^ b, Op::Logic),
    };
    c.set_flags_lazy(op, bits, a, b, r);
    if OP != CMP && OP != TEST {
        c.gpr[d] = r;
    }
    Ok(())
}

fn incdec<const INC: bool, const W64: bool>(c: &mut Cpu, i: &Instruction) -> X<()> {
    let (d, mask, bits) = if W64 {
        (r64(i.op0_register()), u64::MAX, 64)
    } else {
        (r32(i.op0_register()), 0xffff_ffff, 32)
    };
    let cf = c.cf();
    let a = c.gpr[d] & mask;
    let (r, op) = if INC {
        (a.wrapping_add(1) & mask, Op::Inc)
    } else {
        (a.wrapping_sub(1) & mask, Op::Dec)
    };
    c.lazy = crate::flags::Lazy {
        op,
        bits,
        a,
        b: 1,
        r,
        c: cf,
    };
    c.gpr[d] = r;
    Ok(())
}

const SHL: u8 = 0;
const SHR: u8 = 1;
const SAR: u8 = 2;

/// SHL/SHR/SAR of a 32/64-bit register by an immediate, flags computed on the spot.
fn shift_ri<const OP: u8, const W64: bool>(c: &mut Cpu, i: &Instruction) -> X<()> {
    use crate::flags;
    let (d, mask, bits) = if W64 {
        (r64(i.op0_register()), u64::MAX, 64u32)
    } else {
        (r32(i.op0_register()), 0xffff_ffff, 32u32)
    };
    let cnt = (i.immediate8() as u32) & (bits - 1);
    if cnt == 0 {
        if !W64 {
            c.gpr[d] &= mask;
        }
        return Ok(());
    }
    let a = c.gpr[d] & mask;
    let sign = 1u64 << (bits - 1);
    let (r, cf, of) = match OP {
        SHL => {
            let r = (a << cnt) & mask;
            let cf = (a >> (bits - cnt)) & 1 != 0;
            (r, cf, (r & sign != 0) != cf)
        }
        SHR => (a >> cnt, (a >> (cnt - 1)) & 1 != 0, a & sign != 0),
        _ => {
            let sa = if W64 {
                a as i64
            } else {
                a as u32 as i32 as i64
            };
            ((sa >> cnt) as u64 & mask, (sa >> (cnt - 1)) & 1 != 0, false)
        }
    };
    let f = c.flags();
    let mut nf = flags::szp(r, bits) | (f & flags::AF);
    if cf {
        nf |= flags::CF;
    }
    if of {
        nf |= flags::OF;
    }
    c.rflags = (f & !flags::ARITH) | nf;
    c.gpr[d] = r;
    Ok(())
}

fn is_gpr(r: Register, size: usize) -> bool {
    match size {
        8 => r.is_gpr64(),
        4 => r.is_gpr32(),
        _ => false,
    }
}

macro_rules! alu_pick {
    ($op:expr, $w64:expr, $imm:expr) => {
        match ($op, $w64, $imm) {
            (ADD, true, false) => alu_r::<ADD, true, false> as Handler,
            (ADD, true, true) => alu_r::<ADD, true, true>,
            (ADD, false, false) => alu_r::<ADD, false, false>,
            (ADD, false, true) => alu_r::<ADD, false, true>,
            (SUB, true, false) => alu_r::<SUB, true, false>,
            (SUB, true, true) => alu_r::<SUB, true, true>,
            (SUB, false, false) => alu_r::<SUB, false, false>,
            (SUB, false, true) => alu_r::<SUB, false, true>,
            (CMP, true, false) => alu_r::<CMP, true, false>,
            (CMP, true, true) => alu_r::<CMP, true, true>,
            (CMP, false, false) => alu_r::<CMP, false, false>,
            (CMP, false, true) => alu_r::<CMP, false, true>,
            (AND, true, false) => alu_r::<AND, true, false>,
            (AND, true, true) => alu_r::<AND, true, true>,
            (AND, false, false) => alu_r::<AND, false, false>,
            (AND, false, true) => alu_r::<AND, false, true>,
            (OR, true, false) => alu_r::<OR, true, false>,
            (OR, true, true) => alu_r::<OR, true, true>,
            (OR, false, false) => alu_r::<OR, false, false>,
            (OR, false, true) => alu_r::<OR, false, true>,
            (XOR, true, false) => alu_r::<XOR, true, false>,
            (XOR, true, true) => alu_r::<XOR, true, true>,
            (XOR, false, false) => alu_r::<XOR, false, false>,
            (XOR, false, true) => alu_r::<XOR, false, true>,
            (TEST, true, false) => alu_r::<TEST, true, false>,
            (TEST, true, true) => alu_r::<TEST, true, true>,
            (TEST, false, false) => alu_r::<TEST, false, false>,
            _ => alu_r::<TEST, false, true>,
        }
    };
}

/// Picks the handler for a decoded instruction. `bits` is the code size it was decoded for.
pub fn select(i: &Instruction, bits: u32) -> Handler {
    if i.has_lock_prefix() {
        return general;
    }
    let reg = |n: u32| i.op_kind(n) == OpKind::Register;
    let mem = |n: u32| i.op_kind(n) == OpKind::Memory;
    let imm = |n: u32| {
        matches!(
            i.op_kind(n),
            OpKind::Immediate8to32
                | OpKind::Immediate8to64
                | OpKind::Immediate32
                | OpKind::Immediate32to64
        )
    };
    match i.code() {
        C::Mov_r64_imm64 => return mov_ri64,
        C::Mov_r32_imm32 => return mov_ri32,
        C::Mov_rm64_imm32 if reg(0) => return mov_ri64s,
        C::Nopd | C::Nopq | C::Nopw | C::Nop_rm16 | C::Nop_rm32 | C::Nop_rm64 => return nop,
        C::Push_r64 if bits == 64 => return push64,
        C::Pop_r64 if bits == 64 => return pop64,
        C::Call_rel32_64 => return call64,
        C::Retnq => return ret64,
        C::Jmp_rel8_64 | C::Jmp_rel32_64 => return jmp,
        _ => {}
    }
    let m = i.mnemonic();
    if i.is_jcc_short_or_near() {
        return jcc;
    }
    if i.op_count() != 2 {
        return general;
    }
    let r0 = i.op0_register();
    let size0 = if reg(0) { r0.size() } else { 0 };
    match m {
        M::Shl | M::Sal | M::Shr | M::Sar
            if reg(0) && is_gpr(r0, size0) && i.op_kind(1) == OpKind::Immediate8 =>
        {
            match (m, size0 == 8) {
                (M::Shl | M::Sal, true) => shift_ri::<SHL, true>,
                (M::Shl | M::Sal, false) => shift_ri::<SHL, false>,
                (M::Shr, true) => shift_ri::<SHR, true>,
                (M::Shr, false) => shift_ri::<SHR, false>,
                (_, true) => shift_ri::<SAR, true>,
                _ => shift_ri::<SAR, false>,
            }
        }
        M::Mov => {
            if reg(0) && reg(1) && is_gpr(r0, size0) && is_gpr(i.op1_register(), size0) {
                return if size0 == 8 { mov_rr64 } else { mov_rr32 };
            }
            if reg(0) && mem(1) && is_gpr(r0, size0) {
                return if size0 == 8 { mov_load64 } else { mov_load32 };
            }
            if mem(0) && reg(1) && is_gpr(i.op1_register(), i.op1_register().size()) {
                return if i.op1_register().size() == 8 {
                    mov_store64
                } else {
                    mov_store32
                };
            }
            general
        }
        M::Lea if is_gpr(r0, size0) => {
            if size0 == 8 {
                lea64
            } else {
                lea32
            }
        }
        M::Add | M::Sub | M::Cmp | M::And | M::Or | M::Xor | M::Test => {
            if !(reg(0) && is_gpr(r0, size0)) {
                return general;
            }
            let op = match m {
                M::Add => ADD,
                M::Sub => SUB,
                M::Cmp => CMP,
                M::And => AND,
                M::Or => OR,
                M::Xor => XOR,
                _ => TEST,
            };
            let w64 = size0 == 8;
            if reg(1) && is_gpr(i.op1_register(), size0) {
                alu_pick!(op, w64, false)
            } else if imm(1) {
                alu_pick!(op, w64, true)
            } else {
                general
            }
        }
        _ => general,
    }
}

/// Handlers for one-operand register forms.
pub fn select1(i: &Instruction) -> Option<Handler> {
    if i.op_count() != 1 || i.op_kind(0) != OpKind::Register || i.has_lock_prefix() {
        return None;
    }
    let r = i.op0_register();
    let w = if r.is_gpr64() {
        true
    } else if r.is_gpr32() {
        false
    } else {
        return None;
    };
    Some(match (i.mnemonic(), w) {
        (M::Inc, true) => incdec::<true, true>,
        (M::Inc, false) => incdec::<true, false>,
        (M::Dec, true) => incdec::<false, true>,
        (M::Dec, false) => incdec::<false, false>,
        _ => return None,
    })
}
