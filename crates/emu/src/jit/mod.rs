//! A translator from hot guest blocks to host x86-64 code.
//!
//! Guest and host are both x86-64, so most integer instructions run as themselves: each guest
//! register an instruction names is loaded into the host register of the same number (so
//! implicit operands such as MUL's RDX:RAX or a shift's CL just work), the instruction is
//! re-encoded with its memory operand replaced by a host pointer, and the registers it wrote
//! are stored back to `Cpu::gpr`. The `Cpu` pointer lives in a host register no translated
//! instruction of the block uses; guest RSP, which the host needs for itself, is renamed.
//!
//! Encoding uses iced-x86 (the decoder the interpreter already uses): its `Instruction` comes
//! out of the decoder and goes straight back into its encoder after the operands are
//! rewritten, which template assemblers such as dynasm cannot do for arbitrary guest
//! instructions, and its code assembler resolves the glue's labels.
//!
//! Flags: the guest's arithmetic flags are host RFLAGS while translated instructions run. Glue
//! that clobbers them (the TLB probe) first parks them in `Cpu::jit_flags` (pushfq), and an
//! instruction that reads flags gets them back (popfq) only if they were parked. On exit the
//! interpreter takes `jit_flags` as valid flags.
//!
//! Memory: the guest linear address is computed in host code and looked up in the software
//! TLB (`mmu`): on a hit the access goes straight to host memory. A miss (MMIO, a page holding
//! code for a write, an access crossing a page, a page not yet walked) leaves the block before
//! that instruction with every register and flag exact, and the interpreter runs it (and
//! faults, or fills the TLB). The translated code returns how many guest instructions it
//! retired; the interpreter continues from there, so icount and RIP stay exact.

pub mod buf;

use iced_x86::code_asm::{
    dword_ptr, eax, ecx, edx, get_gpr32, get_gpr64, qword_ptr, r12, r13, r14, r15, rax, rbp, rbx,
    rcx, rdi, rdx, rsi, rsp, AsmMemoryOperand, AsmRegister32, AsmRegister64, CodeAssembler,
    CodeLabel,
};
use iced_x86::IcedError;
use iced_x86::{
    BlockEncoderOptions, Code, ConditionCode, Encoder, Instruction, InstructionInfoFactory,
    MemoryOperand, Mnemonic as M, OpAccess, OpKind, Register, RflagsBits,
};
use thiserror::Error;

use crate::cpu::{Cpu, FS, GS};
use crate::mmu::{Acc, Entry, Tlb, TLB_SIZE};
use buf::CodeBuf;

/// Translated code: returns the number of guest instructions it retired.
pub type EntryFn = unsafe extern "sysv64" fn(*mut Cpu) -> u64;

#[derive(Clone, Copy)]
pub struct Jit {
    pub entry: EntryFn,
    /// How many of the block's instructions the code covers.
    pub ops: u32,
    /// Translated for CPL 3 (the user TLB set) or not.
    pub user: bool,
    /// The instruction the translation stopped before, if it stopped short of the block's end
    /// on one it does not cover (for the profile).
    pub stop: Option<M>,
    /// Where a chained predecessor enters (Cpu pointer in RDI, callee-saved registers
    /// already pushed by the first block of the chain).
    pub chain: u64,
}

/// Marks a returned slot as a guarded record (see `Tr::guarded`).
const GUARDED: u64 = 1 << 63;

/// What translated code returned: instructions of the block retired in its last pass (the
/// interpreter continues there) and, when it left through a chainable exit, that exit's slot
/// and whether it is a guarded record (a target on another page, or RET's last target).
pub fn split_ret(r: u64) -> (usize, u32, bool) {
    (
        (r as u32) as usize,
        ((r >> 32) & 0x7fff_ffff) as u32,
        r & GUARDED != 0,
    )
}

const ARITH: u32 = RflagsBits::OF
    | RflagsBits::SF
    | RflagsBits::ZF
    | RflagsBits::AF
    | RflagsBits::CF
    | RflagsBits::PF;

const RSP: usize = 4;

fn gpr_reg(n: usize) -> Register {
    [
        Register::RAX,
        Register::RCX,
        Register::RDX,
        Register::RBX,
        Register::RSP,
        Register::RBP,
        Register::RSI,
        Register::RDI,
        Register::R8,
        Register::R9,
        Register::R10,
        Register::R11,
        Register::R12,
        Register::R13,
        Register::R14,
        Register::R15,
    ][n & 15]
}

fn asm64(n: usize) -> AsmRegister64 {
    get_gpr64(gpr_reg(n)).unwrap_or(rax)
}

/// The index (RAX = 0 .. R15 = 15) of the 64-bit register `r` is part of.
fn full_idx(r: Register) -> Option<usize> {
    r.is_gpr()
        .then(|| (r.full_register() as usize).wrapping_sub(Register::RAX as usize) & 15)
}

/// `r` with its full register replaced by register number `to`, same size.
fn rename(r: Register, to: usize) -> Register {
    let n = |base: Register, k: usize| -> Register {
        Register::try_from(base as usize + k).unwrap_or(Register::None)
    };
    match r.size() {
        8 => n(Register::RAX, to),
        4 => n(Register::EAX, to),
        2 => n(Register::AX, to),
        _ if to < 4 => n(Register::AL, to),
        _ => n(Register::SPL, to - 4),
    }
}

fn is_high8(r: Register) -> bool {
    matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
}

fn off_gpr(n: usize) -> i32 {
    (std::mem::offset_of!(Cpu, gpr) + 8 * n) as i32
}

fn off_icount() -> i32 {
    std::mem::offset_of!(Cpu, icount) as i32
}

fn off_poll_at() -> i32 {
    std::mem::offset_of!(Cpu, poll_at) as i32
}

fn off_tlb_x() -> i32 {
    (std::mem::offset_of!(Cpu, tlb) + std::mem::offset_of!(Tlb, x)) as i32
}

fn off_jit_last() -> i32 {
    std::mem::offset_of!(Cpu, jit_last) as i32
}

fn off_rip() -> i32 {
    std::mem::offset_of!(Cpu, rip) as i32
}

fn off_flags() -> i32 {
    std::mem::offset_of!(Cpu, jit_flags) as i32
}

fn off_tlb_e() -> i32 {
    (std::mem::offset_of!(Cpu, tlb) + std::mem::offset_of!(Tlb, e)) as i32
}

fn off_seg_base(s: usize) -> i32 {
    (std::mem::offset_of!(Cpu, seg)
        + s * std::mem::size_of::<corefour_hypervisor::Segment>()
        + std::mem::offset_of!(corefour_hypervisor::Segment, base)) as i32
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Runs as itself after register and memory rewriting.
    Generic,
    Lea,
    Nop,
    Push,
    Pop,
    Call,
    Ret,
    Jmp,
    Jcc,
    /// JMP/CALL through a register.
    JmpInd,
    CallInd,
}

/// Whether `k` leaves the block (it is then its last instruction).
fn ends(k: Kind) -> bool {
    matches!(
        k,
        Kind::Jmp | Kind::Jcc | Kind::Call | Kind::Ret | Kind::JmpInd | Kind::CallInd
    )
}

struct Plan {
    kind: Kind,
    /// Guest registers read or written (bit n = register n), RSP included.
    used: u16,
    written: u16,
    /// The memory operand's size and whether it is written.
    mem: Option<(u32, bool)>,
    need_flags: bool,
    sets_flags: bool,
    high8: bool,
}

fn generic_ok(m: M) -> bool {
    matches!(
        m,
        M::Mov
            | M::Movzx
            | M::Movsx
            | M::Movsxd
            | M::Add
            | M::Sub
            | M::Adc
            | M::Sbb
            | M::And
            | M::Or
            | M::Xor
            | M::Cmp
            | M::Test
            | M::Inc
            | M::Dec
            | M::Neg
            | M::Not
            | M::Shl
            | M::Shr
            | M::Sar
            | M::Sal
            | M::Rol
            | M::Ror
            | M::Rcl
            | M::Rcr
            | M::Shld
            | M::Shrd
            | M::Imul
            | M::Mul
            | M::Xchg
            | M::Xadd
            | M::Cmpxchg
            | M::Bswap
            | M::Bt
            | M::Bts
            | M::Btr
            | M::Btc
            | M::Bsf
            | M::Bsr
            | M::Tzcnt
            | M::Lzcnt
            | M::Cbw
            | M::Cwde
            | M::Cdqe
            | M::Cwd
            | M::Cdq
            | M::Cqo
            | M::Clc
            | M::Stc
            | M::Cmc
            | M::Lahf
            | M::Sahf
            | M::Lfence
            | M::Mfence
            | M::Sfence
            | M::Pause
    ) || crate::exec::is_cmov(m)
        || crate::exec::is_setcc(m)
}

fn shift_like(m: M) -> bool {
    matches!(
        m,
        M::Shl | M::Shr | M::Sar | M::Sal | M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shld | M::Shrd
    )
}

/// Decides whether and how `i` can be translated.
fn classify(i: &Instruction, fac: &mut InstructionInfoFactory, smp: bool) -> Option<Plan> {
    if i.is_invalid() {
        return None;
    }
    // With more than one vCPU, locked read-modify-writes serialise on the VM's lock in the
    // interpreter; a host-atomic version here would not exclude those.
    let implicit_lock = i.mnemonic() == M::Xchg
        && (i.op0_kind() == OpKind::Memory || i.op1_kind() == OpKind::Memory);
    if smp && (i.has_lock_prefix() || implicit_lock) {
        return None;
    }
    let m = i.mnemonic();
    let kind = match m {
        M::Nop | M::Endbr64 => Kind::Nop,
        M::Jmp if i.op0_kind() == OpKind::NearBranch64 => Kind::Jmp,
        M::Call if i.op0_kind() == OpKind::NearBranch64 => Kind::Call,
        M::Jmp if i.code() == Code::Jmp_rm64 && i.op0_kind() == OpKind::Register => Kind::JmpInd,
        M::Call if i.code() == Code::Call_rm64 && i.op0_kind() == OpKind::Register => Kind::CallInd,
        M::Ret if i.op_count() == 0 && i.code() == Code::Retnq => Kind::Ret,
        _ if i.is_jcc_short_or_near() && i.op0_kind() == OpKind::NearBranch64 => Kind::Jcc,
        M::Push
            if matches!(
                i.code(),
                Code::Push_r64 | Code::Pushq_imm8 | Code::Pushq_imm32
            ) =>
        {
            Kind::Push
        }
        M::Pop if i.code() == Code::Pop_r64 && i.op0_register() != Register::RSP => Kind::Pop,
        M::Lea if matches!(i.op0_register().size(), 4 | 8) => Kind::Lea,
        _ if generic_ok(m) => Kind::Generic,
        _ => return None,
    };
    let info = fac.info(i);
    let mut used = 0u16;
    let mut written = 0u16;
    let mut high8 = false;
    for u in info.used_registers() {
        let r = u.register();
        if r.is_segment_register() || matches!(r, Register::RIP | Register::EIP) {
            continue;
        }
        let n = full_idx(r)?;
        high8 |= is_high8(r);
        used |= 1 << n;
        if matches!(
            u.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        ) {
            written |= 1 << n;
        }
    }
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                full_idx(r)?;
                high8 |= is_high8(r);
            }
            OpKind::Memory => {
                let base = i.memory_base();
                let index = i.memory_index();
                if !(base == Register::None || base == Register::RIP || base.is_gpr64()) {
                    return None;
                }
                if !(index == Register::None || index.is_gpr64()) {
                    return None;
                }
            }
            _ => {}
        }
    }
    let mut mem = None;
    if matches!(kind, Kind::Generic) {
        let mems: Vec<_> = info
            .used_memory()
            .iter()
            .filter(|u| u.access() != OpAccess::NoMemAccess)
            .collect();
        if mems.len() > 1 {
            return None;
        }
        if let Some(u) = mems.first() {
            let size = u.memory_size().size() as u32;
            if !(1..=8).contains(&size) {
                return None;
            }
            // A register bit offset can reach outside the operand.
            if matches!(m, M::Bt | M::Bts | M::Btr | M::Btc) && i.op1_kind() == OpKind::Register {
                return None;
            }
            let write = matches!(
                u.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            );
            mem = Some((size, write));
        }
    }
    let read = i.rflags_read() & ARITH;
    let modified = i.rflags_modified() & ARITH;
    let need_flags =
        read != 0 || (modified != 0 && modified != ARITH) || shift_like(m) || kind == Kind::Jcc;
    Some(Plan {
        kind,
        used,
        written,
        mem,
        need_flags,
        sets_flags: modified != 0,
        high8,
    })
}

/// Host registers in the order the `Cpu` pointer is placed (callee-saved ones first).
const P_ORDER: [usize; 15] = [15, 14, 13, 12, 3, 5, 11, 10, 9, 8, 7, 6, 2, 1, 0];
/// Scratch registers in the order they are taken (encodable next to AH..BH first).
const S_ORDER: [usize; 15] = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// A TLB miss in the code: where it branches to, and what `fill` needs.
struct Miss {
    label: CodeLabel,
    retry: CodeLabel,
    k: u32,
    ra: usize,
    size: u32,
    write: bool,
}

/// Called by translated code on a TLB miss: walks the page tables for the access and says
/// whether the TLB now lets it go straight to RAM. A fault is not raised here: the block exits
/// and the interpreter runs the instruction again, faulting with exact state.
///
/// # Safety
/// `cpu` is the `Cpu` the translated code was called with, not otherwise borrowed meanwhile.
unsafe extern "sysv64" fn fill(cpu: *mut Cpu, lin: u64, size: u64, write: u64) -> u64 {
    // SAFETY: the translated code passes on the pointer it was entered with, and the caller
    // of that code holds the only borrow of the `Cpu` for its duration.
    let cpu = unsafe { &mut *cpu };
    let user = cpu.cpl == 3;
    let cr2 = cpu.cr2;
    let acc = if write != 0 { Acc::W } else { Acc::R };
    if cpu.translate(lin, acc, user).is_err() {
        cpu.cr2 = cr2;
        return 0;
    }
    let e = &cpu.tlb.e[user as usize][((lin >> 12) as usize) & (TLB_SIZE - 1)];
    let tag = if write != 0 { e.write } else { e.read };
    (tag == lin.wrapping_add(size - 1) & !0xfff) as u64
}

struct Tr<'b> {
    /// The address of each instruction of the block, then the one after its last.
    ips: Vec<u64>,
    buf: &'b mut CodeBuf,
    /// Chain slots of this block and the label each points to until linked.
    chains: Vec<(u32, CodeLabel)>,
    a: CodeAssembler,
    p: AsmRegister64,
    p_n: usize,
    user: bool,
    /// Host RFLAGS holds the guest's arithmetic flags.
    in_host: bool,
    /// `Cpu::jit_flags` holds them.
    parked: bool,
    misses: Vec<Miss>,
    /// Where instruction being emitted starts over after a TLB fill (flags parked).
    retry: CodeLabel,
    epi: CodeLabel,
    /// The start of the block's first instruction (flags parked), for loops.
    head: CodeLabel,
    start_ip: u64,
}

/// Why a block could not be assembled (it then stays interpreted).
#[derive(Debug, Error)]
pub enum JitError {
    #[error("encoding translated code: {0}")]
    Iced(#[from] IcedError),
    #[error("{0}")]
    Limit(&'static str),
}

type R = Result<(), JitError>;

impl Tr<'_> {
    fn cpu(&self, off: i32) -> AsmMemoryOperand {
        qword_ptr(self.p + off)
    }

    fn park(&mut self) -> R {
        if !self.parked {
            self.a.pushfq()?;
            self.a.pop(self.cpu(off_flags()))?;
            self.parked = true;
        }
        Ok(())
    }

    /// Glue is about to clobber host RFLAGS.
    fn clobber(&mut self) -> R {
        self.park()?;
        self.in_host = false;
        Ok(())
    }

    fn unpark(&mut self) -> R {
        if !self.in_host {
            self.a.push(self.cpu(off_flags()))?;
            self.a.popfq()?;
            self.in_host = true;
        }
        Ok(())
    }

    /// Marks where the current instruction starts over after a TLB fill: its flags are
    /// parked and nothing of it has happened yet.
    fn set_retry(&mut self) -> R {
        self.clobber()?;
        let mut l = self.a.create_label();
        self.a.set_label(&mut l)?;
        self.retry = l;
        Ok(())
    }

    /// Leaves now with `k` instructions of this pass retired.
    fn exit(&mut self, k: u32) -> R {
        self.park()?;
        self.retire(k)?;
        self.leave_at(k)
    }

    /// Sets RIP to instruction `k` (or past the last) and leaves returning `k`. Every exit
    /// leaves RIP exact: after chained blocks the vCPU cannot tell which block `k` is of.
    fn leave_at(&mut self, k: u32) -> R {
        let ip = self.ips.get(k as usize).copied().unwrap_or(0);
        let r = if self.p_n == 0 { rcx } else { rax };
        self.a.mov(r, ip)?;
        self.a.mov(self.cpu(off_rip()), r)?;
        self.a.mov(eax, k)?;
        self.a.jmp(self.epi)?;
        Ok(())
    }

    /// Counts `k` retired instructions into `Cpu::icount` (clobbers flags: park first).
    fn retire(&mut self, k: u32) -> R {
        if k > 0 {
            self.a.add(self.cpu(off_icount()), k as i32)?;
        }
        Ok(())
    }

    /// Ends the block's pass at a branch to `target` with `n` retired. A branch back to the
    /// block's own start loops inside the code, and a branch elsewhere jumps through a chain
    /// slot (to the successor's code once the vCPU links it), both until the next
    /// timer/interrupt poll is due. Flags must be parked.
    fn leave_to(&mut self, target: u64, n: u32, busy: &mut u16) -> R {
        self.retire(n)?;
        let Some(t) = self.scratch(busy, false) else {
            return Err(JitError::Limit("no scratch registers"));
        };
        *busy &= !(1 << t);
        let mut ret = n as u64;
        if (target ^ self.start_ip) >= 0x1000 {
            // Another page: only through a guarded record (mapping and version checked).
            let Some(v) = self.scratch(busy, false) else {
                return Err(JitError::Limit("no scratch registers"));
            };
            self.a.mov(asm64(v), target)?;
            return self.guarded(v, n, busy);
        }
        if target == self.start_ip {
            self.a.mov(asm64(t), self.cpu(off_icount()))?;
            self.a.cmp(asm64(t), self.cpu(off_poll_at()))?;
            self.a.jb(self.head)?;
        } else if let Some((slot, addr)) = self.buf.slot() {
            let mut unchained = self.a.create_label();
            self.a.mov(asm64(t), self.cpu(off_icount()))?;
            self.a.cmp(asm64(t), self.cpu(off_poll_at()))?;
            self.a.jae(unchained)?;
            if self.p_n != 7 {
                self.a.mov(rdi, self.p)?;
            }
            let via = MemoryOperand::with_base_displ(Register::RIP, addr as i64);
            self.a
                .add_instruction(Instruction::with1(Code::Jmp_rm64, via)?)?;
            self.a.set_label(&mut unchained)?;
            self.chains.push((slot, unchained));
            ret |= (slot as u64) << 32;
        }
        self.set_rip(target, busy)?;
        self.a.mov(rax, ret)?;
        self.a.jmp(self.epi)?;
        Ok(())
    }

    /// Leaves for the RIP in register `v` with `n` retired (already counted), jumping
    /// straight into the translated block last seen there if the code TLB still maps that
    /// page to the same host page and the page's code version is unchanged. Flags parked.
    fn guarded(&mut self, v: usize, n: u32, busy: &mut u16) -> R {
        let mut ret = n as u64;
        // RDI takes the Cpu pointer before the jump through `u`: keep it out of t, u, w.
        let rdi_was = *busy & (1 << 7);
        *busy |= 1 << 7;
        let regs = (
            self.scratch(busy, false),
            self.scratch(busy, false),
            self.scratch(busy, false),
        );
        *busy = (*busy & !(1 << 7)) | rdi_was;
        if let ((Some(t), Some(u), Some(w)), Some((slot, addr))) = (regs, self.buf.record()) {
            let (vr, t, u, wr) = (asm64(v), asm64(t), asm64(u), asm64(w));
            let w32 = get_gpr32(rename(Register::EAX, w)).unwrap_or(eax);
            let esz = std::mem::size_of::<Entry>() as i32;
            let set = if self.user { TLB_SIZE as i32 * esz } else { 0 };
            let mut slow = self.a.create_label();
            self.a.mov(t, self.cpu(off_icount()))?;
            self.a.cmp(t, self.cpu(off_poll_at()))?;
            self.a.jae(slow)?;
            self.a.mov(u, addr)?;
            self.a.cmp(vr, qword_ptr(u + 8))?;
            self.a.jne(slow)?;
            self.a.mov(t, vr)?;
            self.a.shr(t, 12)?;
            self.a.and(t, TLB_SIZE as i32 - 1)?;
            self.a.imul_3(t, t, esz)?;
            self.a.add(t, self.cpu(off_tlb_x()))?;
            self.a.mov(wr, vr)?;
            self.a.and(wr, -4096)?;
            self.a.cmp(
                wr,
                qword_ptr(t + (set + std::mem::offset_of!(Entry, exec) as i32)),
            )?;
            self.a.jne(slow)?;
            self.a.mov(
                wr,
                qword_ptr(t + (set + std::mem::offset_of!(Entry, addend) as i32)),
            )?;
            self.a.cmp(wr, qword_ptr(u + 16))?;
            self.a.jne(slow)?;
            self.a.mov(wr, qword_ptr(u + 24))?;
            self.a.mov(w32, dword_ptr(wr))?;
            self.a.cmp(w32, dword_ptr(u + 32))?;
            self.a.jne(slow)?;
            if self.p_n != 7 {
                self.a.mov(rdi, self.p)?;
            }
            self.a.jmp(qword_ptr(u))?;
            self.a.set_label(&mut slow)?;
            ret |= (slot as u64) << 32 | GUARDED;
        }
        self.a.mov(self.cpu(off_rip()), asm64(v))?;
        self.a.mov(rax, ret)?;
        self.a.jmp(self.epi)?;
        Ok(())
    }

    /// Picks a free scratch register.
    fn scratch(&self, busy: &mut u16, low: bool) -> Option<usize> {
        let n = S_ORDER
            .iter()
            .copied()
            .find(|&n| *busy & (1 << n) == 0 && (!low || n < 8))?;
        *busy |= 1 << n;
        Some(n)
    }

    /// Looks `ra` up in the TLB for `size` bytes; on a hit `ra` becomes the host address,
    /// on a miss `fill` walks the page tables and the instruction starts over at `retry`, or
    /// the block exits with `k` retired if the access cannot go to RAM directly. Flags must
    /// be parked.
    fn probe(&mut self, ra: usize, size: u32, write: bool, k: u32, busy: &mut u16) -> R {
        let (Some(t), Some(u)) = (self.scratch(busy, false), self.scratch(busy, false)) else {
            return Err(JitError::Limit("no scratch registers"));
        };
        let ra_n = ra;
        let (ra, t, u) = (asm64(ra), asm64(t), asm64(u));
        let esz = std::mem::size_of::<Entry>() as i32;
        let set = if self.user { TLB_SIZE as i32 * esz } else { 0 };
        let tag = if write {
            std::mem::offset_of!(Entry, write)
        } else {
            std::mem::offset_of!(Entry, read)
        } as i32;
        let addend = std::mem::offset_of!(Entry, addend) as i32;
        self.a.mov(t, ra)?;
        self.a.shr(t, 12)?;
        self.a.and(t, TLB_SIZE as i32 - 1)?;
        self.a.imul_3(t, t, esz)?;
        self.a.add(t, self.cpu(off_tlb_e()))?;
        self.a.lea(u, qword_ptr(ra + (size as i32 - 1)))?;
        self.a.and(u, -4096)?;
        self.a.cmp(u, qword_ptr(t + (set + tag)))?;
        let label = self.a.create_label();
        self.misses.push(Miss {
            label,
            retry: self.retry,
            k,
            ra: ra_n,
            size,
            write,
        });
        self.a.jne(label)?;
        self.a.add(ra, qword_ptr(t + (set + addend)))?;
        Ok(())
    }

    /// Computes the guest linear address of `i`'s memory operand into `ra`.
    fn address(&mut self, i: &Instruction, ra: usize, sp: Option<usize>) -> R {
        let map = |r: Register| -> Register {
            match (full_idx(r), sp) {
                (Some(RSP), Some(s)) => gpr_reg(s),
                _ => r,
            }
        };
        let base = i.memory_base();
        let index = i.memory_index();
        let d = i.memory_displacement64();
        if base == Register::RIP || (base == Register::None && index == Register::None) {
            self.a.mov(asm64(ra), d)?;
        } else {
            let disp = d as i64;
            if disp != disp as i32 as i64 {
                return Err(JitError::Limit("displacement out of range"));
            }
            let mo = MemoryOperand::new(
                map(base),
                map(index),
                i.memory_index_scale(),
                disp,
                if disp == 0 { 0 } else { 1 },
                false,
                Register::None,
            );
            self.a
                .add_instruction(Instruction::with2(Code::Lea_r64_m, gpr_reg(ra), mo)?)?;
        }
        let seg = match i.memory_segment() {
            Register::FS => Some(FS),
            Register::GS => Some(GS),
            _ => None,
        };
        if let Some(s) = seg {
            self.a.add(asm64(ra), self.cpu(off_seg_base(s)))?;
        }
        Ok(())
    }

    fn load(&mut self, mask: u16, sp: Option<usize>) -> R {
        for n in 0..16 {
            if mask & (1 << n) == 0 {
                continue;
            }
            if n == RSP {
                if let Some(s) = sp {
                    self.a.mov(asm64(s), self.cpu(off_gpr(RSP)))?;
                }
            } else {
                self.a.mov(asm64(n), self.cpu(off_gpr(n)))?;
            }
        }
        Ok(())
    }

    fn store(&mut self, mask: u16, sp: Option<usize>) -> R {
        for n in 0..16 {
            if mask & (1 << n) == 0 {
                continue;
            }
            if n == RSP {
                if let Some(s) = sp {
                    self.a.mov(self.cpu(off_gpr(RSP)), asm64(s))?;
                }
            } else {
                self.a.mov(self.cpu(off_gpr(n)), asm64(n))?;
            }
        }
        Ok(())
    }

    fn set_rip(&mut self, v: u64, busy: &mut u16) -> R {
        let Some(t) = self.scratch(busy, false) else {
            return Err(JitError::Limit("no scratch registers"));
        };
        self.a.mov(asm64(t), v)?;
        self.a.mov(self.cpu(off_rip()), asm64(t))?;
        Ok(())
    }

    /// Emits instruction `k`. Returns false when it could not be expressed (the block then
    /// exits before it).
    fn emit(&mut self, i: &Instruction, pl: &Plan, k: u32) -> Result<bool, JitError> {
        let mut busy: u16 = pl.used | 1 << RSP | 1 << self.p_n;
        match pl.kind {
            Kind::Nop => Ok(true),
            Kind::Generic | Kind::Lea => self.generic(i, pl, k, &mut busy),
            Kind::Jmp => {
                self.park()?;
                self.leave_to(i.near_branch_target(), k + 1, &mut busy)?;
                Ok(true)
            }
            Kind::JmpInd => {
                self.park()?;
                let Some(v) = self.scratch(&mut busy, false) else {
                    return Ok(false);
                };
                let n = full_idx(i.op0_register()).unwrap_or(0);
                self.a.mov(asm64(v), self.cpu(off_gpr(n)))?;
                self.retire(k + 1)?;
                self.guarded(v, k + 1, &mut busy)?;
                Ok(true)
            }
            Kind::Jcc => {
                self.unpark()?;
                // Both paths leave the block: park the flags once, before branching.
                self.park()?;
                let taken = self.a.create_label();
                jcc(&mut self.a, i.condition_code(), taken)?;
                self.leave_to(i.next_ip(), k + 1, &mut busy)?;
                let mut taken = taken;
                self.a.set_label(&mut taken)?;
                self.leave_to(i.near_branch_target(), k + 1, &mut busy)?;
                Ok(true)
            }
            Kind::Push | Kind::Call | Kind::CallInd => {
                self.set_retry()?;
                // The target as the register held it before the push.
                let to = if pl.kind == Kind::CallInd {
                    let Some(to) = self.scratch(&mut busy, false) else {
                        return Ok(false);
                    };
                    let n = full_idx(i.op0_register()).unwrap_or(0);
                    self.a.mov(asm64(to), self.cpu(off_gpr(n)))?;
                    Some(to)
                } else {
                    None
                };
                let (Some(s), Some(ra)) = (
                    self.scratch(&mut busy, false),
                    self.scratch(&mut busy, false),
                ) else {
                    return Ok(false);
                };
                self.a.mov(asm64(s), self.cpu(off_gpr(RSP)))?;
                self.a.lea(asm64(ra), qword_ptr(asm64(s) - 8))?;
                self.probe(ra, 8, true, k, &mut busy)?;
                let Some(v) = self.scratch(&mut busy, false) else {
                    return Ok(false);
                };
                if pl.kind != Kind::Push {
                    self.a.mov(asm64(v), i.next_ip())?;
                } else if i.code() == Code::Push_r64 {
                    // PUSH RSP pushes the value before the push.
                    let n = full_idx(i.op0_register()).unwrap_or(0);
                    self.a.mov(asm64(v), self.cpu(off_gpr(n)))?;
                } else {
                    self.a.mov(asm64(v), i.immediate(0))?;
                }
                self.a.mov(qword_ptr(asm64(ra)), asm64(v))?;
                self.a.lea(asm64(s), qword_ptr(asm64(s) - 8))?;
                self.a.mov(self.cpu(off_gpr(RSP)), asm64(s))?;
                if pl.kind == Kind::Call {
                    // Flags are parked (set_retry); RSP and the return address are stored.
                    self.leave_to(i.near_branch_target(), k + 1, &mut busy)?;
                } else if let Some(to) = to {
                    self.retire(k + 1)?;
                    self.guarded(to, k + 1, &mut busy)?;
                }
                Ok(true)
            }
            Kind::Pop | Kind::Ret => {
                self.set_retry()?;
                let (Some(s), Some(ra)) = (
                    self.scratch(&mut busy, false),
                    self.scratch(&mut busy, false),
                ) else {
                    return Ok(false);
                };
                self.a.mov(asm64(s), self.cpu(off_gpr(RSP)))?;
                self.a.mov(asm64(ra), asm64(s))?;
                self.probe(ra, 8, false, k, &mut busy)?;
                let Some(v) = self.scratch(&mut busy, false) else {
                    return Ok(false);
                };
                self.a.mov(asm64(v), qword_ptr(asm64(ra)))?;
                self.a.lea(asm64(s), qword_ptr(asm64(s) + 8))?;
                self.a.mov(self.cpu(off_gpr(RSP)), asm64(s))?;
                if pl.kind == Kind::Ret {
                    self.retire(k + 1)?;
                    self.guarded(v, k + 1, &mut busy)?;
                } else {
                    let n = full_idx(i.op0_register()).unwrap_or(0);
                    self.a.mov(self.cpu(off_gpr(n)), asm64(v))?;
                }
                Ok(true)
            }
        }
    }

    fn generic(
        &mut self,
        i: &Instruction,
        pl: &Plan,
        k: u32,
        busy: &mut u16,
    ) -> Result<bool, JitError> {
        let sp = if pl.used & (1 << RSP) != 0 {
            match self.scratch(busy, pl.high8) {
                Some(s) => Some(s),
                None => return Ok(false),
            }
        } else {
            None
        };
        let mut h = *i;
        for n in 0..h.op_count() {
            if h.op_kind(n) == OpKind::Register {
                let r = h.op_register(n);
                if let (Some(RSP), Some(s)) = (full_idx(r), sp) {
                    h.set_op_register(n, rename(r, s));
                }
            }
        }
        if pl.kind == Kind::Lea {
            let dst = h.op0_register();
            let Some(dn) = full_idx(dst) else {
                return Ok(false);
            };
            let dn = if dn == RSP { sp.unwrap_or(RSP) } else { dn };
            self.load(pl.used, sp)?;
            if i.memory_base() == Register::RIP {
                let v = i.memory_displacement64();
                if dst.size() == 8 {
                    self.a.mov(asm64(dn), v)?;
                } else {
                    self.a.mov(rename(dst, dn).try_into_r32()?, v as u32)?;
                }
            } else {
                let map = |r: Register| match (full_idx(r), sp) {
                    (Some(RSP), Some(s)) => gpr_reg(s),
                    _ => r,
                };
                h.set_memory_base(map(i.memory_base()));
                h.set_memory_index(map(i.memory_index()));
                if Encoder::new(64).encode(&h, 0x1000).is_err() {
                    return Ok(false);
                }
                self.a.add_instruction(h)?;
            }
            self.store(pl.written, sp)?;
            return Ok(true);
        }
        if pl.mem.is_some() {
            self.set_retry()?;
        }
        self.load(pl.used, sp)?;
        if let Some((size, write)) = pl.mem {
            let Some(ra) = self.scratch(busy, pl.high8) else {
                return Ok(false);
            };
            self.address(i, ra, sp)?;
            self.probe(ra, size, write, k, busy)?;
            h.set_memory_base(gpr_reg(ra));
            h.set_memory_index(Register::None);
            h.set_memory_index_scale(1);
            h.set_memory_displacement64(0);
            h.set_memory_displ_size(0);
            h.set_segment_prefix(Register::None);
        }
        if Encoder::new(64).encode(&h, 0x1000).is_err() {
            // Nothing of this instruction has happened yet: the block leaves before it.
            return Ok(false);
        }
        if pl.need_flags {
            self.unpark()?;
        }
        self.a.add_instruction(h)?;
        if pl.sets_flags {
            self.in_host = true;
            self.parked = false;
        }
        self.store(pl.written, sp)?;
        Ok(true)
    }
}

trait TryR32 {
    fn try_into_r32(self) -> Result<AsmRegister32, JitError>;
}

impl TryR32 for Register {
    fn try_into_r32(self) -> Result<AsmRegister32, JitError> {
        get_gpr32(self).ok_or(JitError::Limit("not a 32-bit register"))
    }
}

fn jcc(a: &mut CodeAssembler, cc: ConditionCode, l: CodeLabel) -> R {
    let r = match cc {
        ConditionCode::o => a.jo(l),
        ConditionCode::no => a.jno(l),
        ConditionCode::b => a.jb(l),
        ConditionCode::ae => a.jae(l),
        ConditionCode::e => a.je(l),
        ConditionCode::ne => a.jne(l),
        ConditionCode::be => a.jbe(l),
        ConditionCode::a => a.ja(l),
        ConditionCode::s => a.js(l),
        ConditionCode::ns => a.jns(l),
        ConditionCode::p => a.jp(l),
        ConditionCode::np => a.jnp(l),
        ConditionCode::l => a.jl(l),
        ConditionCode::ge => a.jge(l),
        ConditionCode::le => a.jle(l),
        ConditionCode::g => a.jg(l),
        ConditionCode::None => return Err(JitError::Limit("no condition")),
    };
    Ok(r?)
}

/// Translates the longest supported prefix of a 64-bit block into `buf`. None if not even
/// its first instruction can be translated or the buffer is full.
/// `id` is what every exit of the code stores in `Cpu::jit_last` (the vCPU passes its block).
pub fn translate<'a>(
    ins: impl Iterator<Item = &'a Instruction> + Clone,
    id: u64,
    user: bool,
    smp: bool,
    buf: &mut CodeBuf,
) -> Option<Jit> {
    let mut fac = InstructionInfoFactory::new();
    let mut plans = Vec::new();
    let mut union = 0u16;
    let mut stop = None;
    for i in ins.clone() {
        let Some(pl) = classify(i, &mut fac, smp) else {
            stop = Some(i.mnemonic());
            break;
        };
        // One host register must stay free for the Cpu pointer.
        if (union | pl.used | 1 << RSP) == u16::MAX {
            break;
        }
        union |= pl.used;
        let end = ends(pl.kind);
        plans.push(pl);
        if end {
            break;
        }
    }
    if plans.iter().all(|p| p.kind == Kind::Nop) {
        return None;
    }
    let p_n = P_ORDER.iter().copied().find(|&n| union & (1 << n) == 0)?;
    let start_ip = ins.clone().next()?.ip();
    if buf.slots_low(4) {
        return None;
    }
    let a = assemble(ins, &plans, p_n, user, start_ip, id, buf).ok()?;
    if a.code.len() > buf.room() {
        return None;
    }
    let at = buf.push(&a.code).ok()?;
    let ops = a.ops;
    for (slot, ip) in a.chains {
        buf.set_slot(slot, ip);
    }
    // SAFETY: `at` holds code assembled for this address that follows the sysv64 ABI: it
    // saves the callee-saved registers it uses, leaves RSP balanced and DF clear.
    let entry: EntryFn = unsafe { std::mem::transmute::<*const u8, EntryFn>(at) };
    Some(Jit {
        entry,
        ops,
        user,
        chain: a.chain,
        stop,
    })
}

fn assemble<'a>(
    ins: impl Iterator<Item = &'a Instruction>,
    plans: &[Plan],
    p_n: usize,
    user: bool,
    start_ip: u64,
    id: u64,
    buf: &mut CodeBuf,
) -> Result<Assembled, JitError> {
    let ip = buf.next();
    let ins: Vec<&Instruction> = ins.collect();
    let mut ips: Vec<u64> = ins.iter().map(|i| i.ip()).collect();
    ips.extend(ins.last().map(|i| i.next_ip()));
    let mut a = CodeAssembler::new(64)?;
    let epi = a.create_label();
    let saved = [rbx, rbp, r12, r13, r14, r15];
    for r in saved {
        a.push(r)?;
    }
    let mut chain = a.create_label();
    a.set_label(&mut chain)?;
    a.mov(asm64(p_n), rdi)?;
    let mut head = a.create_label();
    a.set_label(&mut head)?;
    a.nop()?;
    let mut t = Tr {
        ips,
        buf,
        chains: Vec::new(),
        head,
        start_ip,
        a,
        p: asm64(p_n),
        p_n,
        user,
        in_host: false,
        parked: true,
        misses: Vec::new(),
        retry: epi,
        epi,
    };
    let mut k = 0u32;
    // Whether the code already left through a branch's exit.
    let mut left = false;
    for (i, pl) in ins.into_iter().zip(plans) {
        if !t.emit(i, pl, k)? {
            break;
        }
        k += 1;
        if ends(pl.kind) {
            left = true;
            break;
        }
    }
    if !left {
        t.exit(k)?;
    }
    let ops = k;
    let misses = std::mem::take(&mut t.misses);
    let p = t.p;
    for mut m in misses {
        t.a.set_label(&mut m.label)?;
        // Keeps the stack 16-byte aligned for the call (entry + six pushes left it at 8).
        t.a.push(p)?;
        t.a.mov(rsi, asm64(m.ra))?;
        t.a.mov(rdi, qword_ptr(rsp))?;
        t.a.mov(edx, m.size)?;
        t.a.mov(ecx, m.write as u32)?;
        let f: unsafe extern "sysv64" fn(*mut Cpu, u64, u64, u64) -> u64 = fill;
        t.a.mov(rax, f as usize as u64)?;
        t.a.call(rax)?;
        t.a.pop(p)?;
        t.a.test(eax, eax)?;
        t.a.jnz(m.retry)?;
        t.retire(m.k)?;
        t.leave_at(m.k)?;
    }
    let mut epi = t.epi;
    t.a.set_label(&mut epi)?;
    // Every exit passes here with the result in RAX and, unless `p` is RAX, the Cpu pointer
    // in `p`; RCX/RDX are free here and neither instruction touches the flags. With `p` in
    // RAX the vCPU's zero stays (it then assumes the entered block).
    if p_n != 0 {
        let s = if p_n == 1 { rdx } else { rcx };
        t.a.mov(s, id)?;
        t.a.mov(t.cpu(off_jit_last()), s)?;
    }
    for r in saved.iter().rev() {
        t.a.pop(*r)?;
    }
    t.a.ret()?;
    let r =
        t.a.assemble_options(ip, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let chains = t
        .chains
        .iter()
        .map(|(s, l)| Ok((*s, r.label_ip(l)?)))
        .collect::<Result<Vec<_>, IcedError>>()?;
    Ok(Assembled {
        chain: r.label_ip(&chain)?,
        code: r.inner.code_buffer,
        ops,
        chains,
    })
}

struct Assembled {
    code: Vec<u8>,
    ops: u32,
    chain: u64,
    chains: Vec<(u32, u64)>,
}
