//! The JIT against the cases where translated code must hand back to the interpreter with
//! exact state: code that rewrites itself, a page fault in the middle of a hot block, MMIO in a
//! hot loop. Each program also runs on the interpreter alone (threshold 0) and must end the
//! same way there.

mod common;

use common::*;
use corefour_hypervisor::{Regs, VmExit};
use iced_x86::code_asm::*;

/// Runs `code` at CPL 0 with the JIT translating blocks after `threshold` runs (0: off).
fn machine(code: &[u8], threshold: u32) -> Machine {
    Machine::long_prepared(code, 0, threshold, |_| {})
}

#[test]
fn code_patched_by_another_block_of_a_hot_loop() {
    let prog = asm64(CODE, |a| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.xor(ebx, ebx).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(eax, 1u32).unwrap(); // at CODE+4, immediate at CODE+5
        a.add(ebx, eax).unwrap();
        a.inc(ecx).unwrap();
        a.cmp(ecx, 60).unwrap();
        a.jne(skip).unwrap();
        a.mov(byte_ptr(CODE + 5), 3).unwrap();
        a.set_label(&mut skip).unwrap();
        a.cmp(ecx, 100).unwrap();
        a.jne(top).unwrap();
        a.hlt().unwrap();
    });
    for threshold in [0, 1, 5] {
        let mut m = machine(&prog, threshold);
        assert_eq!(m.run(), VmExit::Halt, "threshold {threshold}");
        // 60 passes add 1, the 40 after the patch add 3.
        assert_eq!(m.regs().rbx, 60 + 40 * 3, "threshold {threshold}");
        assert_eq!(m.regs().rcx, 100);
    }
}

#[test]
fn a_hot_block_that_patches_its_own_next_instruction() {
    let prog = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.xor(ebx, ebx).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(byte_ptr(CODE + 13), cl).unwrap(); // CODE+4, 7 bytes
        a.add(ebx, 0x7f).unwrap(); // CODE+11: 83 c3 imm8, the immediate at CODE+13
        a.inc(ecx).unwrap();
        a.cmp(ecx, 100).unwrap();
        a.jne(top).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(
        &prog[11..14],
        &[0x83, 0xc3, 0x7f],
        "layout the test relies on"
    );
    for threshold in [0, 1, 3] {
        let mut m = machine(&prog, threshold);
        assert_eq!(m.run(), VmExit::Halt, "threshold {threshold}");
        // Each pass adds the counter it just stored into the ADD's immediate: 0 + 1 + ... + 99.
        assert_eq!(m.regs().rbx, 4950, "threshold {threshold}");
    }
}

#[test]
fn page_fault_in_the_middle_of_a_translated_block() {
    // 0x200000.. is not present: the 17th load faults.
    let prog = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.mov(rbx, 0x1f_0000u64).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.set_label(&mut top).unwrap();
        a.inc(rcx).unwrap();
        a.mov(rdx, rcx).unwrap();
        a.cmp(rdx, 100).unwrap();
        a.stc().unwrap();
        a.mov(rax, qword_ptr(rbx)).unwrap();
        a.add(rbx, 0x1000).unwrap();
        a.jmp(top).unwrap();
    });
    let load = {
        let mut d = iced_x86::Decoder::with_ip(64, &prog, CODE, 0);
        d.iter()
            .find(|i| {
                i.mnemonic() == iced_x86::Mnemonic::Mov && i.op1_kind() == iced_x86::OpKind::Memory
            })
            .unwrap()
            .ip()
    };
    let handler = asm64(CODE + 0x800, |a| a.hlt().unwrap());
    for threshold in [0, 1, 4] {
        let mut m = machine(&prog, threshold);
        m.ram.put(CODE + 0x800, &handler);
        idt_gate(&m.ram, 14, CODE + 0x800, 0, 0);
        m.ram.w64(PML4 + 0x2000 + 8, 0);
        assert_eq!(m.run(), VmExit::Halt, "threshold {threshold}");
        let r = m.regs();
        assert_eq!(r.rip, CODE + 0x801, "threshold {threshold}: in the handler");
        assert_eq!(
            (r.rcx, r.rdx, r.rbx),
            (17, 17, 0x20_0000),
            "threshold {threshold}"
        );
        assert_eq!(m.vcpu.sregs().unwrap().cr2, 0x20_0000);
        let frame = r.rsp;
        assert_eq!(m.ram.r64(frame), 0, "error code: not present, read");
        assert_eq!(
            m.ram.r64(frame + 8),
            load,
            "threshold {threshold}: RIP of the load"
        );
        // STC, then CMP 17,100 left SF=1 ZF=0 OF=0; the load changed nothing.
        let f = m.ram.r64(frame + 24);
        assert_eq!(f & 0x8c1, 0x81, "threshold {threshold}: flags {f:#x}");
    }
}

#[test]
fn mmio_in_a_hot_loop_goes_to_the_device_every_time() {
    const DEV: u64 = 0xd000_1000;
    let prog = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.mov(r8, DEV).unwrap();
        a.xor(ebx, ebx).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(dword_ptr(r8), ecx).unwrap();
        a.mov(eax, dword_ptr(r8 + 4)).unwrap();
        a.add(ebx, eax).unwrap();
        a.inc(ecx).unwrap();
        a.cmp(ecx, 100).unwrap();
        a.jne(top).unwrap();
        a.hlt().unwrap();
    });
    for threshold in [0, 1, 10] {
        let mut m = machine(&prog, threshold);
        assert_eq!(m.run(), VmExit::Halt, "threshold {threshold}");
        // Reads of the test device return all ones.
        assert_eq!(m.regs().rbx, 0xffff_ff9c, "threshold {threshold}");
        let log = m.ops.log.lock().unwrap();
        let writes: Vec<u32> = log
            .mmio
            .iter()
            .filter(|(a, _)| *a == DEV)
            .map(|(_, d)| u32::from_le_bytes(d[..4].try_into().unwrap()))
            .collect();
        assert_eq!(
            writes,
            (0..100).collect::<Vec<u32>>(),
            "threshold {threshold}"
        );
    }
}

/// Multi-limb add and multiply-accumulate loops (the shape of the kernel's mpihelp and crypto
/// self-tests): carries ride across INC/DEC and loads, stores go to RAM, and the loops run
/// long enough to be translated and to loop inside translated code.
#[test]
fn bignum_loops_match_the_interpreter() {
    const A: u64 = DATA;
    const B: u64 = DATA + 0x400;
    const R: u64 = DATA + 0x800;
    const LIMBS: u64 = 64;
    let prog = asm64(CODE, |a| {
        let mut add = a.create_label();
        let mut mul = a.create_label();
        // r = a + b over LIMBS limbs.
        a.mov(rsi, A).unwrap();
        a.mov(rdx, B).unwrap();
        a.mov(rdi, R).unwrap();
        a.mov(r9, LIMBS).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.clc().unwrap();
        a.set_label(&mut add).unwrap();
        a.mov(rax, qword_ptr(rsi + rcx * 8)).unwrap();
        a.adc(rax, qword_ptr(rdx + rcx * 8)).unwrap();
        a.mov(qword_ptr(rdi + rcx * 8), rax).unwrap();
        a.lea(rcx, qword_ptr(rcx + 1)).unwrap();
        a.dec(r9).unwrap();
        a.jnz(add).unwrap();
        a.setc(r10b).unwrap();
        // r += a * k, carried limb to limb.
        a.mov(r11, 0x9e37_79b9_7f4a_7c15u64).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.xor(ebx, ebx).unwrap();
        a.set_label(&mut mul).unwrap();
        a.mov(rax, qword_ptr(rsi + rcx * 8)).unwrap();
        a.mul(r11).unwrap();
        a.add(rax, rbx).unwrap();
        a.adc(rdx, 0).unwrap();
        a.add(qword_ptr(rdi + rcx * 8), rax).unwrap();
        a.adc(rdx, 0).unwrap();
        a.mov(rbx, rdx).unwrap();
        a.rol(rbx, 7).unwrap();
        a.ror(rbx, 7).unwrap();
        a.inc(rcx).unwrap();
        a.cmp(rcx, LIMBS as i32).unwrap();
        a.jb(mul).unwrap();
        a.hlt().unwrap();
    });
    let run = |threshold: u32| {
        let mut m = machine(&prog, threshold);
        let mut s = 0x1234_5678_9abc_def1u64;
        for k in 0..2 * LIMBS {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            m.ram.w64(
                A + k * 8 + if k >= LIMBS { 0x400 - LIMBS * 8 } else { 0 },
                s,
            );
        }
        assert_eq!(m.run(), VmExit::Halt, "threshold {threshold}");
        let out: Vec<u64> = (0..LIMBS).map(|k| m.ram.r64(R + k * 8)).collect();
        (m.regs(), out)
    };
    let (ri, oi) = run(0);
    for threshold in [1, 2] {
        let (rj, oj) = run(threshold);
        assert_eq!(oj, oi, "threshold {threshold}: result limbs");
        assert_eq!(
            format!("{rj:?}"),
            format!("{ri:?}"),
            "threshold {threshold}: registers"
        );
    }
}

/// Translated blocks jump straight into each other; the flags must follow even into a chain
/// entered through a block that neither reads nor writes them, right after the interpreter
/// changed them (POPFQ is not translated).
#[test]
fn flags_carry_across_chained_blocks() {
    let prog = asm64(CODE, |a| {
        let mut set = a.create_label();
        let mut first = a.create_label();
        let mut second = a.create_label();
        a.xor(ebx, ebx).unwrap();
        a.mov(ecx, 300).unwrap();
        a.set_label(&mut set).unwrap();
        a.mov(eax, ecx).unwrap();
        a.and(eax, 1).unwrap();
        a.or(eax, 2).unwrap();
        a.push(rax).unwrap();
        a.popfq().unwrap(); // CF = the counter's low bit
        a.jmp(first).unwrap();
        a.set_label(&mut first).unwrap();
        a.mov(rdx, rcx).unwrap(); // touches no flags
        a.jmp(second).unwrap();
        a.set_label(&mut second).unwrap();
        a.adc(rbx, 0).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(set).unwrap();
        a.hlt().unwrap();
    });
    for threshold in [0, 1, 7] {
        let mut m = machine(&prog, threshold);
        assert_eq!(m.run(), VmExit::Halt, "threshold {threshold}");
        assert_eq!(m.regs().rbx, 150, "threshold {threshold}: odd counters");
        assert_eq!(m.regs().rdx, 1, "threshold {threshold}");
    }
}

/// A hot loop calls a function on another page; halfway through, the page is remapped to
/// other code (new PDE + INVLPG). Translated calls and returns jump between pages only while
/// the code TLB still maps the target to the host page they were linked for.
#[test]
fn remapped_call_target_is_seen_by_translated_calls() {
    const FUNC: u64 = 0x3c_0000;
    const PDE: u64 = PML4 + 0x2000 + 8; // maps 0x200000..0x400000
    let prog = asm64(CODE, |a| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.xor(ebx, ebx).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.set_label(&mut top).unwrap();
        a.call(FUNC).unwrap();
        a.add(ebx, eax).unwrap();
        a.inc(ecx).unwrap();
        a.cmp(ecx, 50).unwrap();
        a.jne(skip).unwrap();
        // 0x200000.. now maps physical 0..: FUNC runs the code at physical 0x1c0000.
        a.mov(rax, PDE).unwrap();
        a.mov(qword_ptr(rax), 0x87).unwrap();
        a.mov(rax, FUNC).unwrap();
        a.invlpg(byte_ptr(rax)).unwrap();
        a.set_label(&mut skip).unwrap();
        a.cmp(ecx, 100).unwrap();
        a.jne(top).unwrap();
        a.hlt().unwrap();
    });
    let one = asm64(FUNC, |a| {
        a.mov(eax, 1u32).unwrap();
        a.ret().unwrap();
    });
    let two = asm64(FUNC, |a| {
        a.mov(eax, 2u32).unwrap();
        a.ret().unwrap();
    });
    for threshold in [0, 1, 3] {
        let mut m = machine(&prog, threshold);
        m.ram.put(FUNC, &one);
        m.ram.put(0x1c_0000, &two);
        assert_eq!(m.run(), VmExit::Halt, "threshold {threshold}");
        assert_eq!(m.regs().rbx, 50 + 50 * 2, "threshold {threshold}");
    }
}

/// CALL and JMP through registers in a hot loop, to targets on the same and on another page.
#[test]
fn indirect_calls_and_jumps_in_a_hot_loop() {
    const FAR: u64 = 0x3c_0000;
    const NEAR: u64 = CODE + 0x800;
    let prog = asm64(CODE, |a| {
        let mut top = a.create_label();
        let mut after = a.create_label();
        a.xor(ebx, ebx).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(rax, FAR).unwrap();
        a.call(rax).unwrap();
        a.add(ebx, eax).unwrap();
        a.mov(rsi, NEAR).unwrap();
        a.call(rsi).unwrap();
        a.add(ebx, eax).unwrap();
        a.lea(rdx, ptr(after)).unwrap();
        a.jmp(rdx).unwrap();
        a.int3().unwrap();
        a.set_label(&mut after).unwrap();
        a.inc(ecx).unwrap();
        a.cmp(ecx, 200).unwrap();
        a.jne(top).unwrap();
        a.hlt().unwrap();
    });
    let far = asm64(FAR, |a| {
        a.lea(eax, dword_ptr(rcx + 3)).unwrap();
        a.ret().unwrap();
    });
    let near = asm64(NEAR, |a| {
        a.mov(eax, 1u32).unwrap();
        a.ret().unwrap();
    });
    for threshold in [0, 1, 5] {
        let mut m = machine(&prog, threshold);
        m.ram.put(FAR, &far);
        m.ram.put(NEAR, &near);
        assert_eq!(m.run(), VmExit::Halt, "threshold {threshold}");
        // Sum over c = 0..199 of (c + 3) + 1.
        assert_eq!(m.regs().rbx, 19900 + 200 * 4, "threshold {threshold}");
        assert_eq!(m.regs().rsp, STACK, "threshold {threshold}");
    }
}

/// Runs `prog` on the interpreter alone and with the JIT at a few thresholds (after `setup`
/// on each machine) and asserts the same exit, registers and `mem` bytes at the end.
fn same_as_interpreter(prog: &[u8], setup: impl Fn(&mut Machine), mem: (u64, usize)) -> Regs {
    let run = |threshold: u32| {
        let mut m = machine(prog, threshold);
        setup(&mut m);
        let exit = m.run();
        let bytes: Vec<u64> = (0..mem.1 as u64)
            .map(|k| m.ram.r64(mem.0 + 8 * k))
            .collect();
        (exit, m.regs(), bytes)
    };
    let (ei, ri, mi) = run(0);
    for threshold in [1, 2, 5] {
        let (ej, rj, mj) = run(threshold);
        assert_eq!(ej, ei, "threshold {threshold}: exit");
        assert_eq!(
            format!("{rj:?}"),
            format!("{ri:?}"),
            "threshold {threshold}: registers"
        );
        assert_eq!(mj, mi, "threshold {threshold}: memory");
    }
    ri
}

/// A page fault after a run of instructions whose results live only in host registers (and
/// flags only in host RFLAGS) must see every one of them: the handler's registers and the
/// exception frame (RIP, RFLAGS, RSP) match the interpreter's.
#[test]
fn fault_after_registers_cached_across_the_block_is_exact() {
    let prog = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.mov(rbx, 0x1f_0000u64).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.set_label(&mut top).unwrap();
        a.inc(rcx).unwrap();
        a.lea(rdx, qword_ptr(rcx + rcx * 2 + 5)).unwrap();
        a.mov(r8, rdx).unwrap();
        a.xor(r8, rbx).unwrap();
        a.add(rsi, r8).unwrap();
        a.sub(rdi, 7).unwrap();
        a.mov(r9, rsp).unwrap();
        a.push(rcx).unwrap();
        a.pop(r10).unwrap();
        a.imul_3(r11, r10, 0x55).unwrap();
        a.shr(r11, 3).unwrap();
        a.ror(r12, 5).unwrap();
        a.adc(r13, r11).unwrap();
        a.cmp(rdx, 40).unwrap();
        a.mov(rax, qword_ptr(rbx)).unwrap();
        a.add(rbx, 0x1000).unwrap();
        a.jmp(top).unwrap();
    });
    let handler = asm64(CODE + 0x800, |a| a.hlt().unwrap());
    let r = same_as_interpreter(
        &prog,
        |m| {
            m.ram.put(CODE + 0x800, &handler);
            idt_gate(&m.ram, 14, CODE + 0x800, 0, 0);
            m.ram.w64(PML4 + 0x2000 + 8, 0);
        },
        // The exception frame: error code, RIP, CS, RFLAGS, RSP, SS.
        (STACK - 48, 6),
    );
    assert_eq!(r.rip, CODE + 0x801, "in the handler");
    assert_eq!(r.rcx, 17, "the 17th pass faults");
}

/// DIV runs natively only when it cannot fault: a zero divisor and a quotient overflow in a
/// hot loop still reach #DE with exact state, from both register and memory forms.
#[test]
fn div_in_a_hot_loop_faults_exactly() {
    for overflow in [false, true] {
        let prog = asm64(CODE, |a| {
            let mut top = a.create_label();
            a.mov(r8, 24u64).unwrap();
            a.mov(rdi, DATA).unwrap();
            a.set_label(&mut top).unwrap();
            a.lea(rax, qword_ptr(r8 * 8 + 1000)).unwrap();
            if overflow {
                // RDX = 48 - 2 * R8 reaches the divisor on the 9th pass (R8 = 16).
                a.lea(rdx, qword_ptr(r8 + r8 * 1 - 24)).unwrap();
                a.neg(rdx).unwrap();
                a.add(rdx, 24).unwrap();
            } else {
                a.xor(edx, edx).unwrap();
            }
            a.div(r8).unwrap();
            a.add(rbx, rax).unwrap();
            a.add(rsi, rdx).unwrap();
            a.mov(dword_ptr(rdi), r8d).unwrap();
            a.mov(eax, ecx).unwrap();
            a.xor(edx, edx).unwrap();
            a.div(dword_ptr(rdi)).unwrap();
            a.add(r9, rax).unwrap();
            a.add(r10, rdx).unwrap();
            a.inc(ecx).unwrap();
            a.dec(r8).unwrap();
            a.jmp(top).unwrap();
        });
        let handler = asm64(CODE + 0x800, |a| a.hlt().unwrap());
        let r = same_as_interpreter(
            &prog,
            |m| {
                m.ram.put(CODE + 0x800, &handler);
                idt_gate(&m.ram, 0, CODE + 0x800, 0, 0);
            },
            (STACK - 40, 5),
        );
        assert_eq!(
            r.rip,
            CODE + 0x801,
            "overflow {overflow}: in the #DE handler"
        );
        let passes = if overflow { 8 } else { 24 };
        assert_eq!(
            r.rcx, passes,
            "overflow {overflow}: passes before the fault"
        );
    }
}

/// A loop using every guest register, RSP included, so no host register is left to keep
/// guest RSP in: pushes, pops and RSP-relative loads go through a scratch register.
#[test]
fn a_block_using_every_register_with_the_stack() {
    let prog = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.mov(r15, 200u64).unwrap();
        a.set_label(&mut top).unwrap();
        a.add(rax, r15).unwrap();
        a.lea(rcx, qword_ptr(rax + 1)).unwrap();
        a.lea(rdx, qword_ptr(rcx + rax * 2)).unwrap();
        a.xor(rbx, rdx).unwrap();
        a.push(rbx).unwrap();
        a.lea(rbp, qword_ptr(rbx + 3)).unwrap();
        a.mov(rsi, qword_ptr(rsp)).unwrap();
        a.add(rsi, rbp).unwrap();
        a.lea(rdi, qword_ptr(rsi + rdx)).unwrap();
        a.mov(r8, rdi).unwrap();
        a.ror(r8, 3).unwrap();
        a.lea(r9, qword_ptr(r8 + rcx)).unwrap();
        a.sub(r10, r9).unwrap();
        a.mov(r11, r10).unwrap();
        a.shl(r11, 1).unwrap();
        a.adc(r12, r11).unwrap();
        a.pop(r13).unwrap();
        a.add(r14, r13).unwrap();
        a.dec(r15).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let r = same_as_interpreter(&prog, |_| {}, (STACK - 16, 2));
    assert_eq!(r.rsp, STACK);
    assert_eq!(r.r15, 0);
}

/// One function returning to three call sites in turn: each return jumps straight to the
/// caller's code through its own record, and every result lands where the caller expects.
#[test]
fn returns_to_several_callers_in_a_hot_loop() {
    const FUNC: u64 = 0x3c_0000;
    let prog = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.mov(ecx, 300u32).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(eax, 1u32).unwrap();
        a.call(FUNC).unwrap();
        a.add(rbx, rax).unwrap();
        a.mov(eax, 10u32).unwrap();
        a.call(FUNC).unwrap();
        a.add(rsi, rax).unwrap();
        a.mov(eax, 100u32).unwrap();
        a.call(FUNC).unwrap();
        a.add(rdi, rax).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let func = asm64(FUNC, |a| {
        a.lea(rax, qword_ptr(rax + rax * 2)).unwrap();
        a.ret().unwrap();
    });
    let r = same_as_interpreter(&prog, |m| m.ram.put(FUNC, &func), (STACK - 8, 1));
    assert_eq!((r.rbx, r.rsi, r.rdi), (900, 9000, 90000));
    assert_eq!(r.rsp, STACK);
}

/// A loop body longer than a decoded block: the first block ends without a branch and its
/// code goes on to the next block's through a chain slot.
#[test]
fn blocks_that_end_without_a_branch_chain_on() {
    let prog = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.mov(ecx, 500u32).unwrap();
        a.set_label(&mut top).unwrap();
        for n in 0..100u32 {
            match n % 4 {
                0 => a.add(rax, rcx).unwrap(),
                1 => a.rol(rax, 7).unwrap(),
                2 => a.xor(rbx, rax).unwrap(),
                _ => a.lea(rdx, qword_ptr(rbx + rdx * 2 + 1)).unwrap(),
            }
        }
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.hlt().unwrap();
    });
    let r = same_as_interpreter(&prog, |_| {}, (DATA, 1));
    assert_eq!(r.rcx, 0);
}

/// BT/BTS/BTR/BTC on memory with the bit offset in a register reach beyond the operand, in
/// both directions (the offset is signed), for 64- and 32-bit operands.
#[test]
fn bit_ops_with_register_offsets_reach_the_right_words() {
    const BITS: u64 = DATA + 0x200;
    let prog = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.mov(rdi, BITS).unwrap();
        a.mov(rcx, -700i64).unwrap();
        a.set_label(&mut top).unwrap();
        a.bts(qword_ptr(rdi), rcx).unwrap();
        a.adc(rbx, 0).unwrap();
        a.lea(rdx, qword_ptr(rcx * 3 + 5)).unwrap();
        a.btc(dword_ptr(rdi + 8), edx).unwrap();
        a.adc(rsi, rbx).unwrap();
        a.bt(qword_ptr(rdi - 16), rdx).unwrap();
        a.adc(r8, 0).unwrap();
        a.btr(dword_ptr(rdi), ecx).unwrap();
        a.rcl(r9, 1).unwrap();
        a.add(rcx, 13).unwrap();
        a.cmp(rcx, 700).unwrap();
        a.jl(top).unwrap();
        a.hlt().unwrap();
    });
    // 700 bits either side of BITS, and 3 * 700 + 5 bits around BITS + 8.
    let r = same_as_interpreter(&prog, |_| {}, (BITS - 0x200, 0x80));
    assert!(r.rcx >= 700);
}

/// PUSHFQ in translated code pushes the arithmetic flags the code computed with the rest of
/// RFLAGS (here DF, set by the interpreter) as the vCPU holds it.
#[test]
fn pushfq_pushes_live_flags_and_the_vcpus_other_bits() {
    let prog = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.std().unwrap();
        a.mov(ecx, 300u32).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(rax, rcx).unwrap();
        a.shl(rax, 62).unwrap();
        a.add(rax, rcx).unwrap();
        a.pushfq().unwrap();
        a.pop(rdx).unwrap();
        a.add(rbx, rdx).unwrap();
        a.xor(rsi, rdx).unwrap();
        a.rol(rsi, 3).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(top).unwrap();
        a.cld().unwrap();
        a.hlt().unwrap();
    });
    let r = same_as_interpreter(&prog, |_| {}, (STACK - 8, 1));
    assert_ne!(r.rdx & 0x400, 0, "DF pushed");
}
