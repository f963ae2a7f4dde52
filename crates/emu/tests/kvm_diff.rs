//! Differential test: random instruction sequences run on KVM (the oracle: on this host ring-3
//! code runs on the real CPU) and on the software CPU; final registers, the defined flags, the
//! data area and the stack must match. The seed of a failing case is printed. The software CPU
//! translates every block on its first run (tests/common: JIT threshold 1), so the sequences
//! run as JIT code wherever it covers them; `EMU_TEST_JIT_THRESHOLD=0` checks the interpreter.

mod common;

use common::*;
use corefour_hypervisor::{Regs, SpecialRegs};
use corefour_kvm::convert::{regs_from_kvm, regs_to_kvm, sregs_to_kvm};
use iced_x86::code_asm::*;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

const CASES: u64 = 60;
const LEN: usize = 60;
const ALL: u64 = 0x8d5; // CF PF AF ZF SF OF
const CF: u64 = 1;
const PF: u64 = 4;
const AF: u64 = 16;
const ZF: u64 = 64;
const SF: u64 = 128;
const OF: u64 = 2048;

const R64: [AsmRegister64; 14] = [
    rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14,
];
const R32: [AsmRegister32; 14] = [
    eax, ebx, ecx, edx, esi, edi, ebp, r8d, r9d, r10d, r11d, r12d, r13d, r14d,
];
const R16: [AsmRegister16; 14] = [
    ax, bx, cx, dx, si, di, bp, r8w, r9w, r10w, r11w, r12w, r13w, r14w,
];
const R8: [AsmRegister8; 14] = [
    al, bl, cl, dl, sil, dil, bpl, r8b, r9b, r10b, r11b, r12b, r13b, r14b,
];

struct Gen {
    s: u64,
    /// Arithmetic flags whose value the architecture defines right now.
    defined: u64,
    depth: i32,
}

impl Gen {
    fn r(&mut self) -> u64 {
        self.s ^= self.s << 13;
        self.s ^= self.s >> 7;
        self.s ^= self.s << 17;
        self.s
    }
    fn n(&mut self, k: u64) -> u64 {
        self.r() % k
    }
    fn reg(&mut self) -> usize {
        self.n(14) as usize
    }
    fn size(&mut self) -> u32 {
        [1, 2, 4, 8][self.n(4) as usize]
    }
    fn disp(&mut self, size: u32) -> i32 {
        (self.n(0x100 / size as u64) * size as u64) as i32 + if self.n(4) == 0 { 1 } else { 0 }
    }
    fn cc_flags(cc: u64) -> u64 {
        match cc >> 1 {
            0 => OF,
            1 => CF,
            2 => ZF,
            3 => CF | ZF,
            4 => SF,
            5 => PF,
            6 => SF | OF,
            _ => ZF | SF | OF,
        }
    }
}

macro_rules! sized2 {
    ($a:expr, $op:ident, $size:expr, $d:expr, $s:expr) => {
        match $size {
            1 => $a.$op(R8[$d], R8[$s]),
            2 => $a.$op(R16[$d], R16[$s]),
            4 => $a.$op(R32[$d], R32[$s]),
            _ => $a.$op(R64[$d], R64[$s]),
        }
    };
}

/// Like `sized2!` for instructions without a byte form.
macro_rules! sized2w {
    ($a:expr, $op:ident, $size:expr, $d:expr, $s:expr) => {
        match $size {
            2 => $a.$op(R16[$d], R16[$s]),
            4 | 1 => $a.$op(R32[$d], R32[$s]),
            _ => $a.$op(R64[$d], R64[$s]),
        }
    };
}

macro_rules! sized_immw {
    ($a:expr, $op:ident, $size:expr, $d:expr, $imm:expr) => {
        match $size {
            2 => $a.$op(R16[$d], $imm as i16 as i32),
            4 | 1 => $a.$op(R32[$d], $imm as i32),
            _ => $a.$op(R64[$d], $imm as i32),
        }
    };
}

macro_rules! sized_mr {
    ($a:expr, $op:ident, $size:expr, $d:expr, $disp:expr) => {
        match $size {
            1 => $a.$op(byte_ptr(r15 + $disp), R8[$d]),
            2 => $a.$op(word_ptr(r15 + $disp), R16[$d]),
            4 => $a.$op(dword_ptr(r15 + $disp), R32[$d]),
            _ => $a.$op(qword_ptr(r15 + $disp), R64[$d]),
        }
    };
}

macro_rules! sized_imm {
    ($a:expr, $op:ident, $size:expr, $d:expr, $imm:expr) => {
        match $size {
            1 => $a.$op(R8[$d], $imm as i8 as i32),
            2 => $a.$op(R16[$d], $imm as i16 as i32),
            4 => $a.$op(R32[$d], $imm as i32),
            _ => $a.$op(R64[$d], $imm as i32),
        }
    };
}

macro_rules! sized_rm {
    ($a:expr, $op:ident, $size:expr, $d:expr, $disp:expr, $load:expr) => {
        match ($size, $load) {
            (1, true) => $a.$op(R8[$d], byte_ptr(r15 + $disp)),
            (2, true) => $a.$op(R16[$d], word_ptr(r15 + $disp)),
            (4, true) => $a.$op(R32[$d], dword_ptr(r15 + $disp)),
            (_, true) => $a.$op(R64[$d], qword_ptr(r15 + $disp)),
            (1, false) => $a.$op(byte_ptr(r15 + $disp), R8[$d]),
            (2, false) => $a.$op(word_ptr(r15 + $disp), R16[$d]),
            (4, false) => $a.$op(dword_ptr(r15 + $disp), R32[$d]),
            (_, false) => $a.$op(qword_ptr(r15 + $disp), R64[$d]),
        }
    };
}

macro_rules! sized1 {
    ($a:expr, $op:ident, $size:expr, $d:expr) => {
        match $size {
            1 => $a.$op(R8[$d]),
            2 => $a.$op(R16[$d]),
            4 => $a.$op(R32[$d]),
            _ => $a.$op(R64[$d]),
        }
    };
}

macro_rules! sized1m {
    ($a:expr, $op:ident, $size:expr, $disp:expr) => {
        match $size {
            1 => $a.$op(byte_ptr(r15 + $disp)),
            2 => $a.$op(word_ptr(r15 + $disp)),
            4 => $a.$op(dword_ptr(r15 + $disp)),
            _ => $a.$op(qword_ptr(r15 + $disp)),
        }
    };
}

fn gen_insn(g: &mut Gen, a: &mut CodeAssembler) -> Result<(), iced_x86::IcedError> {
    let size = g.size();
    let d = g.reg();
    let s = g.reg();
    match g.n(20) {
        0..=3 => {
            let op = g.n(9);
            let needs_cf = op == 2 || op == 3;
            if needs_cf && g.defined & CF == 0 {
                a.clc()?;
                g.defined |= CF;
            }
            let form = g.n(4);
            let imm = g.r() as i64;
            let disp = g.disp(size);
            macro_rules! go {
                ($op:ident) => {
                    match form {
                        0 => sized2!(a, $op, size, d, s),
                        1 => sized_imm!(a, $op, size, d, imm),
                        2 => sized_rm!(a, $op, size, d, disp, true),
                        _ => sized_rm!(a, $op, size, d, disp, false),
                    }
                };
            }
            match op {
                0 => go!(add)?,
                1 => go!(or)?,
                2 => go!(adc)?,
                3 => go!(sbb)?,
                4 => go!(and)?,
                5 => go!(sub)?,
                6 => go!(xor)?,
                7 => go!(cmp)?,
                _ => match form {
                    0 => sized2!(a, test, size, d, s)?,
                    1 => sized_imm!(a, test, size, d, imm)?,
                    _ => sized_mr!(a, test, size, d, disp)?,
                },
            }
            g.defined = if matches!(op, 1 | 4 | 6 | 8) {
                ALL & !AF
            } else {
                ALL
            };
        }
        4 | 5 => {
            let op = g.n(4);
            let mem = g.n(3) == 0;
            let disp = g.disp(size);
            match (op, mem) {
                (0, false) => sized1!(a, inc, size, d)?,
                (1, false) => sized1!(a, dec, size, d)?,
                (2, false) => sized1!(a, neg, size, d)?,
                (_, false) => sized1!(a, not, size, d)?,
                (0, true) => sized1m!(a, inc, size, disp)?,
                (1, true) => sized1m!(a, dec, size, disp)?,
                (2, true) => sized1m!(a, neg, size, disp)?,
                (_, true) => sized1m!(a, not, size, disp)?,
            }
            match op {
                0 | 1 => g.defined = (g.defined & CF) | (ALL & !CF),
                2 => g.defined = ALL,
                _ => {}
            }
        }
        6 | 7 => {
            let bits = size as u64 * 8;
            let cnt = 1 + g.n(bits - 1);
            let op = g.n(7);
            if op >= 5 {
                // RCL/RCR by one.
                if g.defined & CF == 0 {
                    a.stc()?;
                    g.defined |= CF;
                }
                match (op, size) {
                    (5, 1) => a.rcl(R8[d], 1)?,
                    (5, 2) => a.rcl(R16[d], 1)?,
                    (5, 4) => a.rcl(R32[d], 1)?,
                    (5, _) => a.rcl(R64[d], 1)?,
                    (_, 1) => a.rcr(R8[d], 1)?,
                    (_, 2) => a.rcr(R16[d], 1)?,
                    (_, 4) => a.rcr(R32[d], 1)?,
                    _ => a.rcr(R64[d], 1)?,
                }
                g.defined |= CF | OF;
                return Ok(());
            }
            match op {
                0 => sized_imm!(a, shl, size, d, cnt)?,
                1 => sized_imm!(a, shr, size, d, cnt)?,
                2 => sized_imm!(a, sar, size, d, cnt)?,
                3 => sized_imm!(a, rol, size, d, cnt)?,
                _ => sized_imm!(a, ror, size, d, cnt)?,
            }
            if op <= 2 {
                g.defined = CF | PF | ZF | SF | if cnt == 1 { OF } else { 0 };
            } else {
                g.defined = (g.defined & !(CF | OF)) | CF | if cnt == 1 { OF } else { 0 };
            }
        }
        8 => {
            match g.n(4) {
                0 => sized1!(a, mul, size, s)?,
                1 => sized1!(a, imul, size, s)?,
                2 if size > 1 => sized2w!(a, imul_2, size, d, s)?,
                _ if size > 1 => match size {
                    2 => a.imul_3(R16[d], R16[s], g.r() as i16 as i32)?,
                    4 => a.imul_3(R32[d], R32[s], g.r() as i32)?,
                    _ => a.imul_3(R64[d], R64[s], g.r() as i32)?,
                },
                _ => sized1!(a, mul, size, s)?,
            }
            g.defined = CF | OF;
        }
        9 => {
            // DIV with EDX/RDX cleared and a non-zero divisor: never faults.
            let s = 4 + g.n(10) as usize;
            a.xor(edx, edx)?;
            if g.n(2) == 0 {
                a.or(R32[s], 1)?;
                a.div(R32[s])?;
            } else {
                a.or(R64[s], 1)?;
                a.div(R64[s])?;
            }
            g.defined = 0;
        }
        10 | 11 => match g.n(9) {
            0 => sized2!(a, mov, size, d, s)?,
            1 => {
                let disp = g.disp(size);
                let load = g.n(2) == 0;
                sized_rm!(a, mov, size, d, disp, load)?
            }
            2 => match g.n(4) {
                0 => a.movzx(R32[d], R8[s])?,
                1 => a.movsx(R64[d], R16[s])?,
                2 => a.movsxd(R64[d], R32[s])?,
                _ => a.movzx(R64[d], word_ptr(r15 + g.disp(2)))?,
            },
            3 => {
                let sc = [1, 2, 4, 8][g.n(4) as usize];
                a.lea(
                    R64[d],
                    qword_ptr(R64[s] + R64[g.reg()] * sc + (g.r() as i32 >> 8)),
                )?
            }
            4 => sized2!(a, xchg, size, d, s)?,
            5 => {
                if size == 8 {
                    a.bswap(R64[d])?
                } else {
                    a.bswap(R32[d])?
                }
            }
            6 => a.mov(R64[d], g.r())?,
            7 => match g.n(6) {
                0 => a.cbw()?,
                1 => a.cwde()?,
                2 => a.cdqe()?,
                3 => a.cwd()?,
                4 => a.cdq()?,
                _ => a.cqo()?,
            },
            _ => {
                let disp = g.disp(4);
                a.mov(dword_ptr(r15 + disp), g.r() as i32)?
            }
        },
        12 | 13 => {
            let cc = g.n(16);
            let need = Gen::cc_flags(cc);
            if g.defined & need != need {
                sized2!(a, cmp, size, d, s)?;
                g.defined = ALL;
            }
            let size = if size == 1 { 4 } else { size };
            if g.n(2) == 0 {
                let r = R8[d];
                match cc {
                    0 => a.seto(r)?,
                    1 => a.setno(r)?,
                    2 => a.setb(r)?,
                    3 => a.setae(r)?,
                    4 => a.sete(r)?,
                    5 => a.setne(r)?,
                    6 => a.setbe(r)?,
                    7 => a.seta(r)?,
                    8 => a.sets(r)?,
                    9 => a.setns(r)?,
                    10 => a.setp(r)?,
                    11 => a.setnp(r)?,
                    12 => a.setl(r)?,
                    13 => a.setge(r)?,
                    14 => a.setle(r)?,
                    _ => a.setg(r)?,
                }
            } else {
                match cc {
                    0 => sized2w!(a, cmovo, size, d, s)?,
                    1 => sized2w!(a, cmovno, size, d, s)?,
                    2 => sized2w!(a, cmovb, size, d, s)?,
                    3 => sized2w!(a, cmovae, size, d, s)?,
                    4 => sized2w!(a, cmove, size, d, s)?,
                    5 => sized2w!(a, cmovne, size, d, s)?,
                    6 => sized2w!(a, cmovbe, size, d, s)?,
                    7 => sized2w!(a, cmova, size, d, s)?,
                    8 => sized2w!(a, cmovs, size, d, s)?,
                    9 => sized2w!(a, cmovns, size, d, s)?,
                    10 => sized2w!(a, cmovp, size, d, s)?,
                    11 => sized2w!(a, cmovnp, size, d, s)?,
                    12 => sized2w!(a, cmovl, size, d, s)?,
                    13 => sized2w!(a, cmovge, size, d, s)?,
                    14 => sized2w!(a, cmovle, size, d, s)?,
                    _ => sized2w!(a, cmovg, size, d, s)?,
                }
            }
        }
        14 => {
            if g.depth > 0 && g.n(2) == 0 {
                a.pop(R64[d])?;
                g.depth -= 1;
            } else if g.depth < 16 {
                a.push(R64[s])?;
                g.depth += 1;
            }
        }
        15 => {
            let size = if size == 1 { 4 } else { size };
            match g.n(5) {
                0 => sized_immw!(a, bt, size, d, g.n(size as u64 * 8))?,
                1 => sized_immw!(a, bts, size, d, g.n(size as u64 * 8))?,
                2 => sized_immw!(a, btr, size, d, g.n(size as u64 * 8))?,
                3 => sized_immw!(a, btc, size, d, g.n(size as u64 * 8))?,
                _ => sized2w!(a, bt, size, d, s)?,
            }
            g.defined &= ZF;
            g.defined |= CF;
        }
        16 => {
            let size = if size == 1 { 4 } else { size };
            sized_imm!(a, or, size, s, 1 << g.n(8))?;
            if g.n(2) == 0 {
                sized2w!(a, bsf, size, d, s)?;
            } else {
                sized2w!(a, bsr, size, d, s)?;
            }
            g.defined = ZF;
        }
        17 => {
            if g.n(2) == 0 {
                sized2!(a, xadd, size, d, s)?;
                g.defined = ALL;
            } else if d != 0 && s != 0 {
                sized2!(a, cmpxchg, size, d, s)?;
                g.defined = ALL;
            }
        }
        18 => match g.n(3) {
            0 => {
                a.clc()?;
                g.defined |= CF;
            }
            1 => {
                a.stc()?;
                g.defined |= CF;
            }
            _ => {
                if g.defined & CF != 0 {
                    a.cmc()?;
                }
            }
        },
        _ => {
            // SHLD/SHRD by an immediate below the operand width.
            let size = if size == 1 { 4 } else { size };
            let cnt = 1 + g.n(size as u64 * 8 - 1) as u32;
            match (g.n(2), size) {
                (0, 2) => a.shld(R16[d], R16[s], cnt)?,
                (0, 4) => a.shld(R32[d], R32[s], cnt)?,
                (0, _) => a.shld(R64[d], R64[s], cnt)?,
                (_, 2) => a.shrd(R16[d], R16[s], cnt)?,
                (_, 4) => a.shrd(R32[d], R32[s], cnt)?,
                _ => a.shrd(R64[d], R64[s], cnt)?,
            }
            g.defined = CF | PF | ZF | SF | if cnt == 1 { OF } else { 0 };
        }
    }
    Ok(())
}

/// A program: random body, then stop through MMIO (R15 is the data base until then).
fn program_n(seed: u64, len: usize) -> (Vec<u8>, u64) {
    let mut g = Gen {
        s: seed | 1,
        defined: 0,
        depth: 0,
    };
    for _ in 0..4 {
        g.r();
    }
    let mut a = CodeAssembler::new(64).unwrap();
    for _ in 0..len {
        gen_insn(&mut g, &mut a).unwrap();
    }
    a.mov(r15, STOP_MMIO).unwrap();
    a.mov(qword_ptr(r15), r15).unwrap();
    let mut l = a.create_label();
    a.set_label(&mut l).unwrap();
    a.jmp(l).unwrap();
    (a.assemble(CODE).unwrap(), g.defined)
}

fn initial_regs(seed: u64) -> Regs {
    let mut g = Gen {
        s: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        defined: 0,
        depth: 0,
    };
    let mut v = [0u64; 14];
    for x in v.iter_mut() {
        *x = match g.n(4) {
            0 => g.r() & 0xff,
            1 => g.r() & 0xffff_ffff,
            2 => 0,
            _ => g.r(),
        };
    }
    Regs {
        rax: v[0],
        rbx: v[1],
        rcx: v[2],
        rdx: v[3],
        rsi: v[4],
        rdi: v[5],
        rbp: v[6],
        r8: v[7],
        r9: v[8],
        r10: v[9],
        r11: v[10],
        r12: v[11],
        r13: v[12],
        r14: v[13],
        r15: DATA,
        rsp: STACK,
        rip: CODE,
        rflags: 2 | (g.r() & ALL),
    }
}

fn fill_data(ram: &Ram, seed: u64) {
    let mut g = Gen {
        s: seed ^ 0xabcdef,
        defined: 0,
        depth: 0,
    };
    for k in 0..0x120u64 / 8 {
        ram.w64(DATA + k * 8, g.r());
    }
}

struct KvmMachine {
    ram: Ram,
    _vm: VmFd,
    vcpu: VcpuFd,
}

impl KvmMachine {
    fn new(kvm: &Kvm) -> KvmMachine {
        let ram = Ram::new(RAM);
        write_gdt(&ram);
        write_page_tables(&ram);
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        // SAFETY: `ram` outlives the VM (both live in the returned struct; the VM fd is dropped
        // first because `_vm`... the mapping is only freed after the struct is dropped).
        unsafe {
            vm.set_user_memory_region(kvm_userspace_memory_region {
                slot: 0,
                flags: 0,
                guest_phys_addr: 0,
                memory_size: RAM as u64,
                userspace_addr: ram.host(),
            })
            .expect("KVM_SET_USER_MEMORY_REGION")
        };
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
        KvmMachine { ram, _vm: vm, vcpu }
    }

    fn run(&mut self, sregs: &SpecialRegs, r: &Regs) -> Result<Regs, String> {
        let mut ks = self.vcpu.get_sregs().map_err(|e| e.to_string())?;
        sregs_to_kvm(sregs, &mut ks);
        self.vcpu
            .set_sregs(&ks)
            .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        self.vcpu
            .set_regs(&regs_to_kvm(r))
            .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        loop {
            match self.vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
                VcpuExit::MmioWrite(addr, _) if addr == STOP_MMIO => break,
                VcpuExit::MmioRead(_, data) => data.fill(0xff),
                other => return Err(format!("unexpected KVM exit {other:?}")),
            }
        }
        let k = self.vcpu.get_regs().map_err(|e| e.to_string())?;
        Ok(regs_from_kvm(&k))
    }
}

fn area(ram: &Ram) -> Vec<u8> {
    let mut v = ram.slice()[DATA as usize..DATA as usize + 0x120].to_vec();
    v.extend_from_slice(&ram.slice()[STACK as usize - 0x100..STACK as usize]);
    v
}

/// Runs case `seed` truncated to `len` instructions on both; returns the differences.
fn compare(km: &mut KvmMachine, sregs: &SpecialRegs, seed: u64, len: usize) -> Option<String> {
    let (code, defined) = program_n(seed, len);
    let regs = initial_regs(seed);

    km.ram.put(CODE, &code);
    fill_data(&km.ram, seed);
    km.ram.put(STACK - 0x100, &[0u8; 0x100]);
    let kr = match km.run(sregs, &regs) {
        Ok(r) => r,
        Err(e) => panic!("seed {seed}: KVM could not run the case: {e}"),
    };
    let kmem = area(&km.ram);

    let mut em = Machine::long(&code, 3);
    fill_data(&em.ram, seed);
    em.vcpu.set_regs(&regs).unwrap();
    let exit = em.run();
    let er = em.regs();
    let emem = area(&em.ram);

    let mask = !ALL | defined;
    let mut diffs = Vec::new();
    let names = [
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ];
    let kv = [
        kr.rax, kr.rbx, kr.rcx, kr.rdx, kr.rsi, kr.rdi, kr.rsp, kr.rbp, kr.r8, kr.r9, kr.r10,
        kr.r11, kr.r12, kr.r13, kr.r14, kr.r15,
    ];
    let ev = [
        er.rax, er.rbx, er.rcx, er.rdx, er.rsi, er.rdi, er.rsp, er.rbp, er.r8, er.r9, er.r10,
        er.r11, er.r12, er.r13, er.r14, er.r15,
    ];
    for k in 0..16 {
        if kv[k] != ev[k] {
            diffs.push(format!("{}: kvm {:#x} emu {:#x}", names[k], kv[k], ev[k]));
        }
    }
    if kr.rflags & mask != er.rflags & mask {
        diffs.push(format!(
            "rflags (defined {defined:#x}): kvm {:#x} emu {:#x}",
            kr.rflags, er.rflags
        ));
    }
    if kmem != emem {
        let at = kmem
            .iter()
            .zip(&emem)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        diffs.push(format!("memory differs first at offset {at:#x}"));
    }
    let _ = exit;
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

#[test]
fn random_sequences_match_kvm() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: /dev/kvm is missing, no oracle to compare with");
        return;
    }
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("skipping: cannot open /dev/kvm ({e})");
            return;
        }
    };
    let mut km = KvmMachine::new(&kvm);
    let base: u64 = std::env::var("EMU_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let sregs = long_sregs(3);
    let mut failures = Vec::new();
    for case in 0..CASES {
        let seed = base.wrapping_add(case.wrapping_mul(0x1000_0001));
        if let Some(d) = compare(&mut km, &sregs, seed, LEN) {
            // Find the shortest prefix that already differs: its last instruction is the culprit.
            let n = (1..=LEN)
                .find(|&n| compare(&mut km, &sregs, seed, n).is_some())
                .unwrap_or(LEN);
            let (code, _) = program_n(seed, n);
            let mut dec = iced_x86::Decoder::with_ip(64, &code, CODE, 0);
            let listing: Vec<String> = dec
                .iter()
                .map(|i| format!("{:#x}: {:?}", i.ip(), i.code()))
                .collect();
            let first = compare(&mut km, &sregs, seed, n).unwrap_or_default();
            failures.push(format!(
                "seed {seed}: {d}\n  first differs after {n} instructions ({first}); the tail of that program:\n    {}",
                listing[listing.len().saturating_sub(8)..].join("\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {CASES} cases differ from KVM:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
