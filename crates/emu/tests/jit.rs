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
    let ram = Ram::new(RAM);
    write_gdt(&ram);
    write_page_tables(&ram);
    ram.put(CODE, code);
    let mut m = Machine::bare_with_jit(ram, threshold);
    m.vcpu.set_sregs(&long_sregs(0)).unwrap();
    m.vcpu
        .set_regs(&Regs {
            rip: CODE,
            rsp: STACK,
            rflags: 2,
            ..Regs::default()
        })
        .unwrap();
    m
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
