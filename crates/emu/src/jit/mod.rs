//! A translator from hot guest blocks to host x86-64 code.
//!
//! Guest and host are both x86-64, so most integer instructions run as themselves: guest
//! register n lives in host register n (so implicit operands such as MUL's RDX:RAX or a
//! shift's CL just work), and each instruction is re-encoded with its memory operand replaced
//! by a host pointer. The `Cpu` pointer lives in a host register no instruction of the block
//! uses, and guest RSP, which the host needs for itself, in another (or, when the block uses
//! every register, in a scratch register for each instruction that names it).
//!
//! Registers are cached across the block: a guest register is loaded from `Cpu::gpr` when an
//! instruction first needs it and stays in its host register, dirty once written; glue that
//! needs a scratch register takes a free one or spills the one used again latest. Every exit
//! (end of block, chain, TLB miss, a check that fails) stores the dirty ones first. A block
//! that loops to its own start loads all its registers once and loops with them loaded.
//!
//! Encoding uses iced-x86 (the decoder the interpreter already uses): its `Instruction` comes
//! out of the decoder and goes straight back into its encoder after the operands are
//! rewritten, which template assemblers such as dynasm cannot do for arbitrary guest
//! instructions, and its code assembler resolves the glue's labels.
//!
//! Flags: the guest's arithmetic flags are host RFLAGS while translated instructions run. Glue
//! that clobbers them (the TLB probe) first parks them in `Cpu::jit_flags` (LAHF/SETO, which
//! leave RFLAGS alone), and an instruction that reads flags gets them back (SAHF plus an ADD
//! for OF: POPFQ costs several times as much) only if glue clobbered them. On exit the
//! interpreter takes `jit_flags` as valid flags.
//!
//! Memory: the guest linear address is computed in host code and looked up in the software
//! TLB (`mmu`): on a hit the access goes straight to host memory. A miss calls `fill` (host
//! registers kept), which walks the page tables; if the access can then go to RAM the lookup
//! starts over, else (MMIO, a page holding code for a write, an access crossing a page, a
//! fault) the block leaves before that instruction with every register and flag exact, and
//! the interpreter runs it. DIV runs natively behind a check that it cannot fault. The
//! translated code returns how many guest instructions it retired; the interpreter continues
//! from there, so icount and RIP stay exact.

pub mod buf;

use iced_x86::code_asm::{
    al, ax, byte_ptr, dword_ptr, eax, ecx, edx, get_gpr32, get_gpr64, qword_ptr, r10, r11, r12,
    r13, r14, r15, r8, r9, rax, rbp, rbx, rcx, rdi, rdx, rsi, word_ptr, AsmMemoryOperand,
    AsmRegister32, AsmRegister64, CodeAssembler, CodeLabel,
};
use iced_x86::IcedError;
use iced_x86::{
    Code, ConditionCode, Encoder, Instruction, InstructionInfoFactory, MemoryOperand,
    Mnemonic as M, OpAccess, OpKind, Register, RflagsBits,
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

fn off_rflags() -> i32 {
    std::mem::offset_of!(Cpu, rflags) as i32
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
            | M::Div
    ) || crate::exec::is_cmov(m)
        || crate::exec::is_setcc(m)
}

fn shift_like(m: M) -> bool {
    matches!(
        m,
        M::Shl | M::Shr | M::Sar | M::Sal | M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shld | M::Shrd
    )
}

/// BT/BTS/BTR/BTC on memory with the bit offset in a register.
fn bit_reg(i: &Instruction) -> bool {
    matches!(i.mnemonic(), M::Bt | M::Bts | M::Btr | M::Btc)
        && i.op0_kind() == OpKind::Memory
        && i.op1_kind() == OpKind::Register
}

/// The size of `i`'s first operand, register or memory.
fn operand_size(i: &Instruction) -> usize {
    if i.op0_kind() == OpKind::Memory {
        i.memory_size().size()
    } else {
        i.op0_register().size()
    }
}

/// Whether shift `i` has an immediate count that is not zero once masked: it then writes
/// every arithmetic flag (a zero count leaves them all as they were).
fn nonzero_count(i: &Instruction) -> bool {
    let n = i.op_count().saturating_sub(1);
    let mask = if i.op0_register().size() == 8 || i.memory_size().size() == 8 {
        0x3f
    } else {
        0x1f
    };
    matches!(i.op_kind(n), OpKind::Immediate8) && i.immediate(n) & mask != 0
}

/// Decides whether and how `i` can be translated.
fn classify(i: &Instruction, fac: &mut InstructionInfoFactory, smp: bool) -> Option<Plan> {
    if i.is_invalid() {
        return None;
    }
    // With more than one vCPU, locked read-modify-writes stay with the interpreter: it does them
    // as host atomics on aligned RAM operands but serialises split and MMIO ones on the VM's
    // lock, and host `lock` ops emitted here would need that same fallback to stay exclusive.
    let implicit_lock = i.mnemonic() == M::Xchg
        && (i.op0_kind() == OpKind::Memory || i.op1_kind() == OpKind::Memory);
    if smp && (i.has_lock_prefix() || implicit_lock) {
        return None;
    }
    let m = i.mnemonic();
    let kind = match m {
        // Prefetches are hints: no architectural effect, no fault.
        M::Nop
        | M::Endbr64
        | M::Prefetchw
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Prefetchnta => Kind::Nop,
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
        // RFLAGS is the vCPU's with the arithmetic flags from the code (see `Tr::emit_kind`).
        M::Pushfq if i.code() == Code::Pushfq => Kind::Push,
        M::Pop if i.code() == Code::Pop_r64 && i.op0_register() != Register::RSP => Kind::Pop,
        M::Lea if matches!(i.op0_register().size(), 4 | 8) => Kind::Lea,
        _ if generic_ok(m) => Kind::Generic,
        _ => return None,
    };
    // DIV runs natively behind a check that it cannot fault (see `Tr::div_guard`), which
    // needs the operand next to RDX: not for the 8-bit form (AX / r8).
    if m == M::Div && operand_size(i) < 2 {
        return None;
    }
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
            // A register bit offset reaches outside the operand: only the 32- and 64-bit
            // forms, whose address `Tr::bit_address` computes.
            if bit_reg(i) && !matches!(size, 4 | 8) {
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
    let need_flags = read != 0
        || (modified != 0 && modified != ARITH)
        || (shift_like(m) && !nonzero_count(i))
        || kind == Kind::Jcc;
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

/// Host registers in the order the `Cpu` pointer and the guest RSP's home are placed
/// (callee-saved ones first).
const P_ORDER: [usize; 15] = [15, 14, 13, 12, 3, 5, 11, 10, 9, 8, 7, 6, 2, 1, 0];
/// Scratch registers in the order they are taken (encodable next to AH..BH first).
const S_ORDER: [usize; 15] = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
/// Caller-saved host registers: what a TLB fill call may clobber.
const CALLER_SAVED: [AsmRegister64; 9] = [rax, rcx, rdx, rsi, rdi, r8, r9, r10, r11];

/// Where a guest register's value is while translated code runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum St {
    /// Only in `Cpu::gpr`.
    Mem,
    /// In its host register and equal to `Cpu::gpr`.
    Clean,
    /// In its host register only: stored back before any exit.
    Dirty,
}

/// What the code has in host registers and RFLAGS at one point of the block.
#[derive(Clone, Copy)]
struct State {
    regs: [St; 16],
    /// Host RFLAGS holds the guest's arithmetic flags.
    in_host: bool,
    /// `Cpu::jit_flags` holds them.
    parked: bool,
}

/// A TLB miss in the code: where it branches to, and what `fill` and the exit need.
struct Miss {
    label: CodeLabel,
    /// The probe's start: the access is looked up again after a successful fill.
    retry: CodeLabel,
    k: u32,
    ra: usize,
    size: u32,
    write: bool,
    /// Guest registers only in host registers at the probe, and guest RSP's home then.
    dirty: u16,
    sp: Option<usize>,
}

/// An exit before instruction `k` taken when a check in the code fails (out of line).
struct Side {
    label: CodeLabel,
    k: u32,
    dirty: u16,
    sp: Option<usize>,
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
    /// Guest registers each instruction uses (for choosing which register to spill).
    uses: Vec<u16>,
    /// The instruction being emitted.
    k: usize,
    buf: &'b mut CodeBuf,
    /// Chain slots of this block and the instruction (index) each points to until linked.
    chains: Vec<(u32, usize)>,
    a: &'b mut CodeAssembler,
    p: AsmRegister64,
    p_n: usize,
    /// The host register guest RSP lives in (when the block uses RSP).
    sp: Option<usize>,
    /// Guest registers the block uses.
    union: u16,
    user: bool,
    /// Flags are parked with LAHF/SETO and restored with SAHF (BMI2's RORX keeps the park
    /// from touching RFLAGS); else PUSHFQ/POPFQ, which cost several times as much.
    lahf: bool,
    s: State,
    misses: Vec<Miss>,
    sides: Vec<Side>,
    epi: CodeLabel,
    /// Where a loop back to the block's start enters: every register of `union` loaded and
    /// clean, flags parked.
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

/// Records per return or register-indirect branch, and per such branch in a thunk (powers
/// of two).
const WAYS: u32 = 4;
const THUNK_WAYS: u32 = 256;

const NO_SCRATCH: JitError = JitError::Limit("no scratch registers");

impl Tr<'_> {
    fn cpu(&self, off: i32) -> AsmMemoryOperand {
        qword_ptr(self.p + off)
    }

    /// The host register guest register `g` lives in.
    fn home(&self, g: usize) -> usize {
        if g == RSP {
            self.sp.unwrap_or(RSP)
        } else {
            g
        }
    }

    /// The guest register host register `h` may hold.
    fn occupant(&self, h: usize) -> Option<usize> {
        if Some(h) == self.sp {
            Some(RSP)
        } else if h == RSP || h == self.p_n || self.union & (1 << h) == 0 {
            None
        } else {
            Some(h)
        }
    }

    /// Guest registers kept in host registers across instructions.
    fn cached(&self) -> u16 {
        if self.sp.is_some() {
            self.union
        } else {
            self.union & !(1 << RSP)
        }
    }

    /// Host registers never handed out as scratch.
    fn fixed(&self) -> u16 {
        1 << RSP | 1 << self.p_n | self.sp.map_or(0, |s| 1 << s)
    }

    /// The host registers of guest register mask `m`.
    fn homes(&self, m: u16) -> u16 {
        (0..16)
            .filter(|g| m & (1 << g) != 0)
            .fold(0, |acc, g| acc | 1 << self.home(g))
    }

    /// Instructions from the current one on until guest register `g` is used again.
    fn next_use(&self, g: usize) -> Option<usize> {
        self.uses
            .iter()
            .skip(self.k + 1)
            .position(|u| u & (1 << g) != 0)
    }

    /// Takes a host register that is not in `busy` (and below R8 if `low`), storing the guest
    /// register it holds if that one is dirty. Preference: free registers, then clean ones,
    /// then dirty ones, each used again as late as possible.
    fn scratch(&mut self, busy: &mut u16, low: bool) -> Result<Option<usize>, JitError> {
        let fixed = self.fixed();
        let mut best: Option<(u32, usize)> = None;
        for h in S_ORDER {
            if (*busy | fixed) & (1 << h) != 0 || (low && h >= 8) {
                continue;
            }
            let cost = match self.occupant(h).map(|g| (g, self.s.regs[g])) {
                None | Some((_, St::Mem)) => 0,
                Some((g, st)) => {
                    let base = if st == St::Dirty { 200 } else { 100 };
                    match self.next_use(g) {
                        None => base / 100,
                        Some(d) => base - d.min(50) as u32,
                    }
                }
            };
            if best.is_none_or(|(c, _)| cost < c) {
                best = Some((cost, h));
            }
        }
        let Some((_, h)) = best else {
            return Ok(None);
        };
        if let Some(g) = self.occupant(h) {
            if self.s.regs[g] == St::Dirty {
                self.a.mov(self.cpu(off_gpr(g)), asm64(h))?;
            }
            self.s.regs[g] = St::Mem;
        }
        *busy |= 1 << h;
        Ok(Some(h))
    }

    /// Any register outside `avoid` for code that leaves the block (every guest register is
    /// already stored there).
    fn any(&self, avoid: u16) -> Result<usize, JitError> {
        S_ORDER
            .iter()
            .copied()
            .find(|&h| (avoid | 1 << RSP | 1 << self.p_n) & (1 << h) == 0)
            .ok_or(NO_SCRATCH)
    }

    /// Loads guest register `g` into its host register unless it is there.
    fn ensure(&mut self, g: usize) -> R {
        if self.s.regs[g] == St::Mem {
            if g == RSP && self.sp.is_none() {
                return Err(JitError::Limit("no home for RSP"));
            }
            self.a.mov(asm64(self.home(g)), self.cpu(off_gpr(g)))?;
            self.s.regs[g] = St::Clean;
        }
        Ok(())
    }

    fn ensure_all(&mut self, m: u16) -> R {
        for g in 0..16 {
            if m & (1 << g) != 0 {
                self.ensure(g)?;
            }
        }
        Ok(())
    }

    fn dirty(&mut self, m: u16) {
        for g in 0..16 {
            if m & (1 << g) != 0 {
                self.s.regs[g] = St::Dirty;
            }
        }
    }

    fn dirty_mask(&self) -> u16 {
        (0..16)
            .filter(|&g| self.s.regs[g] == St::Dirty)
            .fold(0, |acc, g| acc | 1 << g)
    }

    /// Stores guest registers `m` from their host registers (state unchanged: for exits).
    fn store_mask(&mut self, m: u16) -> R {
        for g in 0..16 {
            if m & (1 << g) != 0 {
                self.a.mov(self.cpu(off_gpr(g)), asm64(self.home(g)))?;
            }
        }
        Ok(())
    }

    /// Stores every dirty guest register; they stay in their host registers, clean.
    fn store_dirty(&mut self) -> R {
        let m = self.dirty_mask();
        self.store_mask(m)?;
        for g in 0..16 {
            if m & (1 << g) != 0 {
                self.s.regs[g] = St::Clean;
            }
        }
        Ok(())
    }

    /// Copies the guest flags from host RFLAGS to `Cpu::jit_flags`, leaving RFLAGS as it is.
    fn park(&mut self) -> R {
        if self.s.parked {
            return Ok(());
        }
        if self.lahf {
            // EAX = FLAGS[7:0] << 8 | OF; then the two bytes of RFLAGS layout are stored
            // one at a time (AH cannot be addressed next to a REX base).
            let f = self.p + off_flags();
            self.a.push(rax)?;
            self.a.mov(eax, 0u32)?;
            self.a.lahf()?;
            self.a.seto(al)?;
            self.a.lea(eax, dword_ptr(rax * 8))?;
            self.a.mov(byte_ptr(f + 1), al)?;
            self.a.rorx(eax, eax, 11u32)?;
            self.a.mov(byte_ptr(f), al)?;
            self.a.pop(rax)?;
        } else {
            self.a.pushfq()?;
            self.a.pop(self.cpu(off_flags()))?;
        }
        self.s.parked = true;
        Ok(())
    }

    /// Glue is about to clobber host RFLAGS.
    fn clobber(&mut self) -> R {
        self.park()?;
        self.s.in_host = false;
        Ok(())
    }

    /// Puts the parked guest flags back into host RFLAGS.
    fn unpark(&mut self) -> R {
        if self.s.in_host {
            return Ok(());
        }
        if self.lahf {
            // OF from 0x78 + (OF << 3) overflowing, the rest from SAHF.
            self.a.push(rax)?;
            self.a.movzx(eax, word_ptr(self.p + off_flags()))?;
            self.a.rol(ax, 8u32)?;
            self.a.and(al, 8)?;
            self.a.add(al, 0x78)?;
            self.a.sahf()?;
            self.a.pop(rax)?;
        } else {
            self.a.push(self.cpu(off_flags()))?;
            self.a.popfq()?;
        }
        self.s.in_host = true;
        Ok(())
    }

    /// Leaves now with `k` instructions of this pass retired.
    fn exit(&mut self, k: u32) -> R {
        self.park()?;
        self.store_dirty()?;
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
    /// timer/interrupt poll is due. Flags must be parked; dirty registers are stored here
    /// (a loop keeps them in host registers, dirty as the head expects).
    fn leave_to(&mut self, target: u64, n: u32) -> R {
        self.retire(n)?;
        let mut ret = n as u64;
        if target != self.start_ip {
            self.store_dirty()?;
        }
        if (target ^ self.start_ip) >= 0x1000 {
            // Another page: only through a guarded record (mapping and version checked).
            let v = self.any(0)?;
            self.a.mov(asm64(v), target)?;
            return self.guarded(v, n, 1);
        }
        if target == self.start_ip {
            // Back to the head with every register it expects loaded.
            self.ensure_all(self.cached())?;
            let t = if self.p_n == 0 { rcx } else { rax };
            self.a.push(t)?;
            self.a.mov(t, self.cpu(off_icount()))?;
            self.a.cmp(t, self.cpu(off_poll_at()))?;
            self.a.pop(t)?;
            self.a.jb(self.head)?;
            // The poll is due: the loop leaves here.
            self.store_dirty()?;
        } else if let Some((slot, addr)) = self.buf.slot() {
            let t = asm64(self.any(1 << 7)?);
            let mut unchained = self.a.create_label();
            self.a.mov(t, self.cpu(off_icount()))?;
            self.a.cmp(t, self.cpu(off_poll_at()))?;
            self.a.jae(unchained)?;
            if self.p_n != 7 {
                self.a.mov(rdi, self.p)?;
            }
            let via = MemoryOperand::with_base_displ(Register::RIP, addr as i64);
            self.a
                .add_instruction(Instruction::with1(Code::Jmp_rm64, via)?)?;
            self.a.set_label(&mut unchained)?;
            self.chains.push((slot, self.a.instructions().len()));
            ret |= (slot as u64) << 32;
        }
        let t = asm64(self.any(0)?);
        self.a.mov(t, target)?;
        self.a.mov(self.cpu(off_rip()), t)?;
        self.a.mov(rax, ret)?;
        self.a.jmp(self.epi)?;
        Ok(())
    }

    /// Leaves for the RIP in register `v` with `n` retired (already counted), jumping
    /// straight into the translated block last seen there if the code TLB still maps that
    /// page to the same host page and the page's code version is unchanged. Flags parked,
    /// registers stored. With `ways` > 1 (returns, jumps and calls through registers, whose
    /// targets vary) the target picks one of `ways` records by a hash of its address, so that
    /// a function returning to several callers in turn keeps each of them linked.
    fn guarded(&mut self, v: usize, n: u32, ways: u32) -> R {
        // RDI takes the Cpu pointer before the jump through `u`: keep it out of t, u, w; RAX
        // takes the result on the slow path.
        let avoid = 1 << v | 1 << 7 | 1;
        let t = self.any(avoid)?;
        let u = self.any(avoid | 1 << t)?;
        let w = self.any(avoid | 1 << t | 1 << u)?;
        // A block that is little more than the branch is a thunk shared by the whole guest
        // (a kernel built with return thunks returns from every function through one RET;
        // retpolines jump through a register the same way): it gets a large table.
        let ways = if ways > 1 && self.ips.len() <= 3 {
            THUNK_WAYS
        } else {
            ways
        };
        let ways = if ways > 1 && !self.buf.slots_low(1 << 16) {
            ways
        } else {
            1
        };
        let mut records = None;
        if let Some((slot, addr)) = self.buf.record() {
            // Records handed out one after the other are adjacent.
            let mut all = true;
            for w in 1..ways {
                all &= self.buf.record() == Some((slot + 5 * w, addr + 40 * w as u64));
            }
            records = Some((slot, addr, if all { ways } else { 1 }));
        }
        let mut ret = n as u64;
        if let Some((slot, addr, ways)) = records {
            let (vr, t, u, wr) = (asm64(v), asm64(t), asm64(u), asm64(w));
            let w32 = get_gpr32(rename(Register::EAX, w)).unwrap_or(eax);
            let esz = std::mem::size_of::<Entry>() as i32;
            let set = if self.user { TLB_SIZE as i32 * esz } else { 0 };
            let mut slow = self.a.create_label();
            self.a.mov(u, addr)?;
            if ways > 1 {
                self.a.mov(t, vr)?;
                self.a.shr(t, 8)?;
                self.a.xor(t, vr)?;
                self.a.and(t, ways as i32 - 1)?;
                self.a.imul_3(t, t, 40)?;
                self.a.add(u, t)?;
            }
            self.a.mov(t, self.cpu(off_icount()))?;
            self.a.cmp(t, self.cpu(off_poll_at()))?;
            self.a.jae(slow)?;
            self.a.cmp(vr, qword_ptr(u + 8))?;
            self.a.jne(slow)?;
            self.a.mov(t, vr)?;
            entry_offset(self.a, t, esz)?;
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
            self.a.mov(self.cpu(off_rip()), vr)?;
            self.a.mov(rax, ret)?;
            if ways > 1 {
                // The record's slot number: `slot` + (u - addr) / 8, in the upper half.
                self.a.mov(t, addr)?;
                self.a.sub(u, t)?;
                self.a.shl(u, 29)?;
                self.a.add(rax, u)?;
            }
        } else {
            self.a.mov(self.cpu(off_rip()), asm64(v))?;
            self.a.mov(rax, ret)?;
        }
        self.a.jmp(self.epi)?;
        Ok(())
    }

    /// Looks `ra` up in the TLB for `size` bytes (scratch `t` and `u`); on a hit `ra` becomes
    /// the host address, on a miss `fill` walks the page tables (every host register kept)
    /// and the lookup starts over, or the block exits with `k` retired if the access cannot
    /// go to RAM directly. Flags must be parked.
    fn probe(&mut self, ra: usize, t: usize, u: usize, size: u32, write: bool, k: u32) -> R {
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
        let mut retry = self.a.create_label();
        self.a.set_label(&mut retry)?;
        self.a.mov(t, ra)?;
        entry_offset(self.a, t, esz)?;
        self.a.add(t, self.cpu(off_tlb_e()))?;
        self.a.lea(u, qword_ptr(ra + (size as i32 - 1)))?;
        self.a.and(u, -4096)?;
        self.a.cmp(u, qword_ptr(t + (set + tag)))?;
        let label = self.a.create_label();
        self.misses.push(Miss {
            label,
            retry,
            k,
            ra: ra_n,
            size,
            write,
            dirty: self.dirty_mask(),
            sp: self.sp,
        });
        self.a.jne(label)?;
        self.a.add(ra, qword_ptr(t + (set + addend)))?;
        Ok(())
    }

    /// The slow path of a probe: calls `fill` with every caller-saved host register kept, then
    /// looks the access up again, or leaves before the instruction.
    fn miss(&mut self, mut m: Miss) -> R {
        self.a.set_label(&mut m.label)?;
        // Entry + six pushes left RSP at 8 mod 16; nine more align it for the call.
        for r in CALLER_SAVED {
            self.a.push(r)?;
        }
        let ra = asm64(m.ra);
        if self.p_n != 6 {
            self.a.mov(rsi, ra)?;
            self.a.mov(rdi, self.p)?;
        } else if m.ra == 7 {
            self.a.xchg(rsi, rdi)?;
        } else {
            self.a.mov(rdi, rsi)?;
            self.a.mov(rsi, ra)?;
        }
        self.a.mov(edx, m.size)?;
        self.a.mov(ecx, m.write as u32)?;
        let f: unsafe extern "sysv64" fn(*mut Cpu, u64, u64, u64) -> u64 = fill;
        self.a.mov(rax, f as usize as u64)?;
        self.a.call(rax)?;
        self.a.test(eax, eax)?;
        for r in CALLER_SAVED.iter().rev() {
            self.a.pop(*r)?;
        }
        self.a.jnz(m.retry)?;
        let sp = std::mem::replace(&mut self.sp, m.sp);
        self.store_mask(m.dirty)?;
        self.sp = sp;
        self.retire(m.k)?;
        self.leave_at(m.k)
    }

    /// Leaves before DIV `h` (operands already in host registers) unless it can neither
    /// divide by zero nor overflow: the high half of the dividend, unsigned, must be below
    /// the divisor. The interpreter then raises #DE with exact state.
    fn div_guard(&mut self, h: &Instruction, k: u32) -> R {
        self.clobber()?;
        let (code, dx_) = match operand_size(h) {
            8 => (Code::Cmp_r64_rm64, Register::RDX),
            4 => (Code::Cmp_r32_rm32, Register::EDX),
            _ => (Code::Cmp_r16_rm16, Register::DX),
        };
        let cmp = if h.op0_kind() == OpKind::Memory {
            let mo = MemoryOperand::with_base(h.memory_base());
            Instruction::with2(code, dx_, mo)?
        } else {
            Instruction::with2(code, dx_, h.op0_register())?
        };
        self.a.add_instruction(cmp)?;
        let label = self.a.create_label();
        self.sides.push(Side {
            label,
            k,
            dirty: self.dirty_mask(),
            sp: self.sp,
        });
        self.a.jae(label)?;
        Ok(())
    }

    /// Moves `ra` to the `size`-byte operand that BT* `i`'s register offset selects and
    /// leaves the offset within it in `b` (flags clobbered).
    fn bit_address(&mut self, i: &Instruction, ra: usize, b: usize, size: u32) -> R {
        let off = full_idx(i.op1_register()).ok_or(JitError::Limit("bit offset"))?;
        let (src, b64) = (asm64(self.home(off)), asm64(b));
        if size == 8 {
            self.a.mov(b64, src)?;
            self.a.sar(b64, 6)?;
            self.a.lea(asm64(ra), qword_ptr(asm64(ra) + b64 * 8))?;
            self.a.mov(b64, src)?;
            self.a.and(b64, 63)?;
        } else {
            // The 32-bit offset is signed.
            let b32 = get_gpr32(rename(Register::EAX, b)).unwrap_or(eax);
            let src32 = get_gpr32(rename(Register::EAX, self.home(off))).unwrap_or(eax);
            self.a.movsxd(b64, src32)?;
            self.a.sar(b64, 5)?;
            self.a.lea(asm64(ra), qword_ptr(asm64(ra) + b64 * 4))?;
            self.a.mov(b32, src32)?;
            self.a.and(b32, 31)?;
        }
        Ok(())
    }

    /// Computes the guest linear address of `i`'s memory operand into `ra`.
    fn address(&mut self, i: &Instruction, ra: usize) -> R {
        let sp = self.sp;
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

    /// Three scratch registers for an access: the address (below R8 if `low`) and two for
    /// the TLB lookup. None if the instruction leaves too few.
    fn access_regs(
        &mut self,
        busy: &mut u16,
        low: bool,
    ) -> Result<Option<(usize, usize, usize)>, JitError> {
        let ra = self.scratch(busy, low)?;
        let t = self.scratch(busy, false)?;
        let u = self.scratch(busy, false)?;
        Ok(match (ra, t, u) {
            (Some(ra), Some(t), Some(u)) => Some((ra, t, u)),
            _ => None,
        })
    }

    /// Emits instruction `k`. Returns false when it could not be expressed (the block then
    /// exits before it, nothing of it done).
    fn emit(
        &mut self,
        i: &Instruction,
        pl: &Plan,
        k: u32,
        enc: &mut Encoder,
    ) -> Result<bool, JitError> {
        self.k = k as usize;
        let mut busy: u16 = self.homes(pl.used);
        let temp_sp = pl.used & (1 << RSP) != 0 && self.sp.is_none();
        if temp_sp {
            let Some(s) = self.scratch(&mut busy, pl.high8)? else {
                return Ok(false);
            };
            self.sp = Some(s);
            self.s.regs[RSP] = St::Mem;
        }
        let r = self.emit_kind(i, pl, k, &mut busy, enc);
        if temp_sp {
            if self.s.regs[RSP] == St::Dirty {
                self.a.mov(self.cpu(off_gpr(RSP)), asm64(self.home(RSP)))?;
            }
            self.s.regs[RSP] = St::Mem;
            self.sp = None;
        }
        r
    }

    fn emit_kind(
        &mut self,
        i: &Instruction,
        pl: &Plan,
        k: u32,
        busy: &mut u16,
        enc: &mut Encoder,
    ) -> Result<bool, JitError> {
        match pl.kind {
            Kind::Nop => Ok(true),
            Kind::Generic | Kind::Lea => self.generic(i, pl, k, busy, enc),
            Kind::Jmp => {
                self.park()?;
                self.leave_to(i.near_branch_target(), k + 1)?;
                Ok(true)
            }
            Kind::JmpInd => {
                let n = full_idx(i.op0_register()).unwrap_or(0);
                self.ensure(n)?;
                self.park()?;
                self.store_dirty()?;
                self.retire(k + 1)?;
                self.guarded(self.home(n), k + 1, WAYS)?;
                Ok(true)
            }
            Kind::Jcc => {
                self.unpark()?;
                // Both paths leave the block: park the flags once, before branching.
                self.park()?;
                let at = self.s;
                let taken = self.a.create_label();
                jcc(self.a, i.condition_code(), taken)?;
                self.leave_to(i.next_ip(), k + 1)?;
                self.s = at;
                let mut taken = taken;
                self.a.set_label(&mut taken)?;
                self.leave_to(i.near_branch_target(), k + 1)?;
                Ok(true)
            }
            Kind::Push | Kind::Call | Kind::CallInd => {
                // The target as the register held it before the push.
                let to = if pl.kind == Kind::CallInd {
                    let Some(to) = self.scratch(busy, false)? else {
                        return Ok(false);
                    };
                    Some(to)
                } else {
                    None
                };
                let Some((ra, t, u)) = self.access_regs(busy, false)? else {
                    return Ok(false);
                };
                self.ensure_all(pl.used)?;
                if let Some(to) = to {
                    let n = full_idx(i.op0_register()).unwrap_or(0);
                    self.a.mov(asm64(to), asm64(self.home(n)))?;
                }
                self.clobber()?;
                let s = asm64(self.home(RSP));
                self.a.lea(asm64(ra), qword_ptr(s - 8))?;
                self.probe(ra, t, u, 8, true, k)?;
                let at = qword_ptr(asm64(ra));
                if pl.kind == Kind::Push && i.code() == Code::Push_r64 {
                    // PUSH RSP pushes the value before the push.
                    let n = full_idx(i.op0_register()).unwrap_or(0);
                    self.a.mov(at, asm64(self.home(n)))?;
                } else if i.code() == Code::Pushfq {
                    // Flags are parked (before the probe); RF and VM read as clear.
                    let keep = !(crate::flags::ARITH | crate::flags::RF | crate::flags::VM);
                    self.a.mov(asm64(t), self.cpu(off_rflags()))?;
                    self.a.and(asm64(t), keep as i64 as i32)?;
                    self.a.mov(asm64(u), self.cpu(off_flags()))?;
                    self.a.and(asm64(u), crate::flags::ARITH as i32)?;
                    self.a.or(asm64(t), asm64(u))?;
                    self.a.mov(at, asm64(t))?;
                } else {
                    let v = if pl.kind == Kind::Push {
                        i.immediate(0)
                    } else {
                        i.next_ip()
                    };
                    if v as i64 == v as i32 as i64 {
                        self.a.mov(at, v as i32)?;
                    } else {
                        self.a.mov(asm64(t), v)?;
                        self.a.mov(at, asm64(t))?;
                    }
                }
                self.a.lea(s, qword_ptr(s - 8))?;
                self.dirty(1 << RSP);
                if pl.kind == Kind::Call {
                    self.store_dirty()?;
                    self.leave_to(i.near_branch_target(), k + 1)?;
                } else if let Some(to) = to {
                    self.store_dirty()?;
                    self.retire(k + 1)?;
                    self.guarded(to, k + 1, WAYS)?;
                }
                Ok(true)
            }
            Kind::Pop | Kind::Ret => {
                let Some((ra, t, u)) = self.access_regs(busy, false)? else {
                    return Ok(false);
                };
                self.ensure(RSP)?;
                self.clobber()?;
                let s = asm64(self.home(RSP));
                self.a.mov(asm64(ra), s)?;
                self.probe(ra, t, u, 8, false, k)?;
                let v = if pl.kind == Kind::Ret {
                    t
                } else {
                    full_idx(i.op0_register()).unwrap_or(0)
                };
                self.a.mov(asm64(v), qword_ptr(asm64(ra)))?;
                self.a.lea(s, qword_ptr(s + 8))?;
                self.dirty(1 << RSP);
                if pl.kind == Kind::Ret {
                    self.store_dirty()?;
                    self.retire(k + 1)?;
                    self.guarded(v, k + 1, WAYS)?;
                } else {
                    self.dirty(1 << v);
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
        enc: &mut Encoder,
    ) -> Result<bool, JitError> {
        let sp = self.sp;
        let map = |r: Register| match (full_idx(r), sp) {
            (Some(RSP), Some(s)) => rename(r, s),
            _ => r,
        };
        let mut h = *i;
        // The encoding pass reads an instruction's IP as its label (none: 0).
        h.set_ip(0);
        for n in 0..h.op_count() {
            if h.op_kind(n) == OpKind::Register {
                h.set_op_register(n, map(h.op_register(n)));
            }
        }
        if pl.kind == Kind::Lea {
            let dst = h.op0_register();
            let Some(dn) = full_idx(dst) else {
                return Ok(false);
            };
            if i.memory_base() == Register::RIP {
                self.ensure_all(pl.used)?;
                if dst.size() == 8 {
                    self.a.mov(asm64(dn), i.memory_displacement64())?;
                } else {
                    self.a
                        .mov(dst.try_into_r32()?, i.memory_displacement64() as u32)?;
                }
            } else {
                let full = |r: Register| match (full_idx(r), sp) {
                    (Some(RSP), Some(s)) => gpr_reg(s),
                    _ => r,
                };
                h.set_memory_base(full(i.memory_base()));
                h.set_memory_index(full(i.memory_index()));
                if !encodes(enc, &h) {
                    return Ok(false);
                }
                self.ensure_all(pl.used)?;
                self.a.add_instruction(h)?;
            }
            self.dirty(pl.written);
            return Ok(true);
        }
        let mut access = None;
        // BT* with a register offset: the operand the offset's upper bits select, and the
        // offset's low bits in a scratch register for the instruction itself.
        let mut bit = None;
        if bit_reg(i) {
            let Some(b) = self.scratch(busy, false)? else {
                return Ok(false);
            };
            h.set_op1_register(rename(i.op1_register(), b));
            bit = Some(b);
        }
        if let Some((size, write)) = pl.mem {
            let Some((ra, t, u)) = self.access_regs(busy, pl.high8)? else {
                return Ok(false);
            };
            h.set_memory_base(gpr_reg(ra));
            h.set_memory_index(Register::None);
            h.set_memory_index_scale(1);
            h.set_memory_displacement64(0);
            h.set_memory_displ_size(0);
            h.set_segment_prefix(Register::None);
            access = Some((ra, t, u, size, write));
        }
        if !encodes(enc, &h) {
            // Nothing of this instruction has happened yet: the block leaves before it.
            return Ok(false);
        }
        self.ensure_all(pl.used)?;
        if let Some((ra, t, u, size, write)) = access {
            self.clobber()?;
            self.address(i, ra)?;
            if let Some(b) = bit {
                self.bit_address(i, ra, b, size)?;
            }
            self.probe(ra, t, u, size, write, k)?;
        }
        if i.mnemonic() == M::Div {
            self.div_guard(&h, k)?;
        }
        if pl.need_flags {
            self.unpark()?;
        }
        self.a.add_instruction(h)?;
        if pl.sets_flags {
            self.s.in_host = true;
            self.s.parked = false;
        }
        self.dirty(pl.written);
        Ok(true)
    }
}

/// Whether `h` has an encoding (checked with a reused encoder, its output thrown away).
fn encodes(enc: &mut Encoder, h: &Instruction) -> bool {
    let ok = enc.encode(h, 0x1000).is_ok();
    let mut b = enc.take_buffer();
    b.clear();
    enc.set_buffer(b);
    ok
}

trait TryR32 {
    fn try_into_r32(self) -> Result<AsmRegister32, JitError>;
}

impl TryR32 for Register {
    fn try_into_r32(self) -> Result<AsmRegister32, JitError> {
        get_gpr32(self).ok_or(JitError::Limit("not a 32-bit register"))
    }
}

/// Turns the address in `t` into the byte offset of its TLB entry (entries of `esz` bytes).
fn entry_offset(a: &mut CodeAssembler, t: AsmRegister64, esz: i32) -> R {
    if (esz as u32).is_power_of_two() && esz <= 4096 {
        let sh = esz.trailing_zeros();
        a.shr(t, 12 - sh)?;
        a.and(t, (TLB_SIZE as i32 - 1) << sh)?;
    } else {
        a.shr(t, 12)?;
        a.and(t, TLB_SIZE as i32 - 1)?;
        a.imul_3(t, t, esz)?;
    }
    Ok(())
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

/// What translation keeps between blocks so that translating one allocates little: the
/// assembler's instruction list, the encoders' buffers, the info factory.
struct Scratch {
    a: CodeAssembler,
    check: Encoder,
    enc: Encoder,
    fac: InstructionInfoFactory,
    /// Per instruction: its offset in the code; per label id: its instruction's offset.
    offsets: Vec<u32>,
    labels: Vec<u32>,
    /// Branches to labels: the end of the instruction (its rel32 ends there) and the label.
    fixups: Vec<(u32, u64)>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Option<Scratch>> = const { std::cell::RefCell::new(None) };
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
    SCRATCH.with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        if slot.is_none() {
            let mut a = CodeAssembler::new(64).ok()?;
            // Branches are all rel32, so each instruction's size is known when it is encoded
            // and one pass plus fixups places the code (see `encode`).
            a.set_prefer_short_branch(false);
            *slot = Some(Scratch {
                a,
                check: Encoder::new(64),
                enc: Encoder::new(64),
                fac: InstructionInfoFactory::new(),
                offsets: Vec::new(),
                labels: Vec::new(),
                fixups: Vec::new(),
            });
        }
        let sc = slot.as_mut()?;
        sc.a.reset();
        translate_with(ins, id, user, smp, buf, sc)
    })
}

fn translate_with<'a>(
    ins: impl Iterator<Item = &'a Instruction> + Clone,
    id: u64,
    user: bool,
    smp: bool,
    buf: &mut CodeBuf,
    sc: &mut Scratch,
) -> Option<Jit> {
    let mut plans = Vec::new();
    let mut union = 0u16;
    let mut stop = None;
    for i in ins.clone() {
        let Some(pl) = classify(i, &mut sc.fac, smp) else {
            stop = Some(i.mnemonic());
            break;
        };
        // One host register must stay free for the Cpu pointer (host RSP is the host's own).
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
    let outside = |taken: u16| P_ORDER.iter().copied().find(|&n| taken & (1 << n) == 0);
    let p_n = outside(union)?;
    // Without a free register for it, guest RSP goes to a scratch register for each
    // instruction that uses it.
    let sp = if union & (1 << RSP) != 0 {
        outside(union | 1 << p_n)
    } else {
        None
    };
    let start_ip = ins.clone().next()?.ip();
    if buf.slots_low(4) {
        return None;
    }
    let whole = plans.len() == ins.clone().count();
    let a = assemble(
        ins, &plans, whole, p_n, sp, union, user, start_ip, id, buf, sc,
    );
    let a = match a {
        Ok(a) => a,
        Err(_) => {
            // Whatever was encoded before the failure is dropped with the buffer's contents.
            let mut code = sc.enc.take_buffer();
            code.clear();
            sc.enc.set_buffer(code);
            return None;
        }
    };
    let mut code = sc.enc.take_buffer();
    let pushed = if code.len() > buf.room() {
        None
    } else {
        buf.push(&code).ok()
    };
    code.clear();
    sc.enc.set_buffer(code);
    let at = pushed?;
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

#[allow(clippy::too_many_arguments)]
fn assemble<'a>(
    ins: impl Iterator<Item = &'a Instruction>,
    plans: &[Plan],
    whole: bool,
    p_n: usize,
    sp: Option<usize>,
    union: u16,
    user: bool,
    start_ip: u64,
    id: u64,
    buf: &mut CodeBuf,
    sc: &mut Scratch,
) -> Result<Assembled, JitError> {
    let ip = buf.next();
    let ins: Vec<&Instruction> = ins.take(plans.len()).collect();
    let mut ips: Vec<u64> = ins.iter().map(|i| i.ip()).collect();
    ips.extend(ins.last().map(|i| i.next_ip()));
    let loops = ins.iter().zip(plans).any(|(i, pl)| {
        matches!(pl.kind, Kind::Jmp | Kind::Jcc | Kind::Call) && i.near_branch_target() == start_ip
    });
    let a = &mut sc.a;
    let epi = a.create_label();
    let saved = [rbx, rbp, r12, r13, r14, r15];
    for r in saved {
        a.push(r)?;
    }
    let chain = a.instructions().len();
    a.mov(asm64(p_n), rdi)?;
    let head = a.create_label();
    let mut t = Tr {
        ips,
        uses: plans.iter().map(|p| p.used).collect(),
        k: 0,
        buf,
        chains: Vec::new(),
        head,
        start_ip,
        a,
        p: asm64(p_n),
        p_n,
        sp,
        union,
        user,
        lahf: p_n != 0 && std::arch::is_x86_feature_detected!("bmi2"),
        s: State {
            regs: [St::Mem; 16],
            in_host: false,
            parked: true,
        },
        misses: Vec::new(),
        sides: Vec::new(),
        epi,
    };
    if loops {
        // The head's state, which every pass back to it reaches again: all registers
        // loaded, the ones the block writes dirty (on the first pass they are merely
        // stored again at an exit).
        t.ensure_all(t.cached())?;
        let written = plans.iter().fold(0, |m, p| m | p.written) & t.cached();
        t.dirty(written);
    }
    let mut head = t.head;
    t.a.set_label(&mut head)?;
    t.a.nop()?;
    let mut k = 0u32;
    // Whether the code already left through a branch's exit.
    let mut left = false;
    for (i, pl) in ins.into_iter().zip(plans) {
        if !t.emit(i, pl, k, &mut sc.check)? {
            break;
        }
        k += 1;
        if ends(pl.kind) {
            left = true;
            break;
        }
    }
    if !left {
        if whole && k as usize == plans.len() {
            // The block ends without a branch (its length limit, a page end): go on to the
            // next one through a chain slot like a jump would.
            t.park()?;
            t.store_dirty()?;
            let next = t.ips.get(k as usize).copied().unwrap_or(0);
            t.leave_to(next, k)?;
        } else {
            t.exit(k)?;
        }
    }
    let ops = k;
    let misses = std::mem::take(&mut t.misses);
    for m in misses {
        t.miss(m)?;
    }
    for mut x in std::mem::take(&mut t.sides) {
        t.a.set_label(&mut x.label)?;
        let sp = std::mem::replace(&mut t.sp, x.sp);
        t.store_mask(x.dirty)?;
        t.sp = sp;
        t.retire(x.k)?;
        t.leave_at(x.k)?;
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
    let chains = std::mem::take(&mut t.chains);
    encode(sc, ip)?;
    let at = |n: usize| ip + sc.offsets.get(n).copied().unwrap_or(0) as u64;
    Ok(Assembled {
        chain: at(chain),
        ops,
        chains: chains.iter().map(|&(s, n)| (s, at(n))).collect(),
    })
}

/// The code (in `sc.enc`'s buffer) and where its entries are.
struct Assembled {
    ops: u32,
    chain: u64,
    chains: Vec<(u32, u64)>,
}

/// Encodes the assembler's instructions for address `ip` into `sc.enc`'s buffer, in one
/// pass: every branch to a label is a rel32 form (so its size does not depend on the
/// target) and gets its displacement patched once all labels are placed. iced's
/// BlockEncoder would do the same with an allocation per instruction.
fn encode(sc: &mut Scratch, ip: u64) -> R {
    sc.offsets.clear();
    sc.fixups.clear();
    sc.labels.clear();
    let mut pos = 0u32;
    for ins in sc.a.instructions() {
        sc.offsets.push(pos);
        let id = ins.ip();
        if id != 0 {
            if id > 1 << 20 {
                return Err(JitError::Limit("instruction with an address as its label"));
            }
            let id = id as usize;
            if sc.labels.len() <= id {
                sc.labels.resize(id + 1, u32::MAX);
            }
            sc.labels[id] = pos;
        }
        let here = ip + pos as u64;
        let len = if ins.op0_kind() == OpKind::NearBranch64 {
            let mut b = *ins;
            b.set_near_branch64(here);
            let len = sc.enc.encode(&b, here)? as u32;
            sc.fixups.push((pos + len, ins.near_branch64()));
            len
        } else {
            sc.enc.encode(ins, here)? as u32
        };
        pos += len;
    }
    let mut code = sc.enc.take_buffer();
    let mut bad = false;
    for &(end, label) in &sc.fixups {
        let to = sc.labels.get(label as usize).copied().unwrap_or(u32::MAX);
        let (Some(field), false) = (
            code.get_mut(end.saturating_sub(4) as usize..end as usize),
            to == u32::MAX,
        ) else {
            bad = true;
            continue;
        };
        field.copy_from_slice(&(to.wrapping_sub(end) as i32).to_le_bytes());
    }
    sc.enc.set_buffer(code);
    if bad {
        return Err(JitError::Limit("branch to an unplaced label"));
    }
    Ok(())
}
