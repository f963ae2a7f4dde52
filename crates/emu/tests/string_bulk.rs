//! REP MOVS/STOS run a page at a time when the TLB maps both sides to RAM: these programs
//! check that the result is still what one element at a time gives (overlapping copies,
//! pages crossed, elements straddling pages, the address register wrapping in 32-bit
//! address size, stores onto code that then runs).

mod common;

use common::*;
use corefour_hypervisor::VmExit;
use iced_x86::code_asm::*;

fn run(code: &[u8], prep: impl Fn(&Ram)) -> Machine {
    let mut m = Machine::long_prepared(code, 0, jit_threshold(), prep);
    assert_eq!(m.run(), VmExit::Halt);
    m
}

const SRC: u64 = 0x20_0000;
const DST: u64 = 0x28_0000;

fn pattern(ram: &Ram, at: u64, len: usize) {
    let b: Vec<u8> = (0..len).map(|k| (k * 7 + 3) as u8).collect();
    ram.put(at, &b);
}

fn bytes(ram: &Ram, at: u64, len: usize) -> Vec<u8> {
    ram.slice()[at as usize..at as usize + len].to_vec()
}

#[test]
fn movsq_across_pages_copies_and_advances() {
    // 3 pages and a bit, starting off a page boundary on both sides.
    let n = 1600u64;
    let prog = asm64(CODE, |a| {
        a.mov(rsi, SRC + 0x18).unwrap();
        a.mov(rdi, DST + 0x230).unwrap();
        a.mov(rcx, n).unwrap();
        a.rep().movsq().unwrap();
        a.hlt().unwrap();
    });
    let m = run(&prog, |r| pattern(r, SRC, 0x4000));
    assert_eq!(
        bytes(&m.ram, DST + 0x230, n as usize * 8),
        bytes(&m.ram, SRC + 0x18, n as usize * 8)
    );
    assert_eq!(m.ram.r64(DST + 0x230 + n * 8), 0, "one element too many");
    let r = m.regs();
    assert_eq!(
        (r.rsi, r.rdi, r.rcx),
        (SRC + 0x18 + n * 8, DST + 0x230 + n * 8, 0)
    );
}

#[test]
fn overlapping_forward_movs_repeats_the_pattern() {
    // dst = src + 3: byte copies replicate the first three bytes; dword copies with the
    // same distance overlap each element's own source and must read before they write.
    for (size, count) in [(1u64, 5000u64), (4, 1200)] {
        let prog = asm64(CODE, |a| {
            a.mov(rsi, SRC).unwrap();
            a.mov(rdi, SRC + 3).unwrap();
            a.mov(rcx, count).unwrap();
            if size == 1 {
                a.rep().movsb().unwrap();
            } else {
                a.rep().movsd().unwrap();
            }
            a.hlt().unwrap();
        });
        let m = run(&prog, |r| pattern(r, SRC, 0x4000));
        let mut want: Vec<u8> = (0..0x4000usize).map(|k| (k * 7 + 3) as u8).collect();
        for k in 0..count as usize {
            let s = k * size as usize;
            let el: Vec<u8> = want[s..s + size as usize].to_vec();
            want[s + 3..s + 3 + size as usize].copy_from_slice(&el);
        }
        assert_eq!(bytes(&m.ram, SRC, 0x4000), want, "element size {size}");
    }
}

#[test]
fn stos_of_every_size_fills_exactly() {
    for (size, count) in [(1u64, 9000u64), (2, 3000), (4, 2100), (8, 1100)] {
        let prog = asm64(CODE, |a| {
            a.mov(rdi, DST + 5).unwrap();
            a.mov(rcx, count).unwrap();
            a.mov(rax, 0x1122_3344_5566_7788u64).unwrap();
            match size {
                1 => a.rep().stosb().unwrap(),
                2 => a.rep().stosw().unwrap(),
                4 => a.rep().stosd().unwrap(),
                _ => a.rep().stosq().unwrap(),
            }
            a.hlt().unwrap();
        });
        let m = run(&prog, |_| {});
        let v = 0x1122_3344_5566_7788u64.to_le_bytes();
        let want: Vec<u8> = (0..(count * size) as usize)
            .map(|k| v[k % size as usize])
            .collect();
        assert_eq!(
            bytes(&m.ram, DST + 5, want.len()),
            want,
            "element size {size}"
        );
        assert_eq!(m.ram.slice()[(DST + 5) as usize + want.len()], 0);
        assert_eq!(m.ram.slice()[(DST + 4) as usize], 0);
        assert_eq!(m.regs().rdi, DST + 5 + count * size);
    }
}

#[test]
fn stos_with_32_bit_addresses_wraps_the_register() {
    // EDI wraps from 0xffff_fff8 to 0: the first two elements go to 4 GiB - 8 (MMIO: RAM
    // ends at 4 MiB), the other four to 0 .. 16.
    let prog = asm64(CODE, |a| {
        a.mov(edi, 0xffff_fff8u32).unwrap();
        a.mov(ecx, 6u32).unwrap();
        a.mov(eax, 0xabcd_ef01u32).unwrap();
        a.db(&[0x67]).unwrap(); // address-size prefix: EDI/ECX
        a.rep().stosd().unwrap();
        a.hlt().unwrap();
    });
    let m = run(&prog, |_| {});
    assert_eq!(m.ram.r64(0), 0xabcd_ef01_abcd_ef01);
    assert_eq!(m.ram.r64(8), 0xabcd_ef01_abcd_ef01);
    assert_eq!(m.regs().rdi, 16);
}

#[test]
fn stos_over_code_that_then_runs() {
    // The code page holds a hot loop; REP STOSB overwrites two bytes of a `mov eax, 1`
    // immediate after it ran, and the next pass must see them.
    let prog = asm64(CODE, |a| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.xor(ebx, ebx).unwrap();
        a.xor(edx, edx).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(eax, 1u32).unwrap(); // CODE+4, immediate at CODE+5
        a.add(ebx, eax).unwrap();
        a.inc(edx).unwrap();
        a.cmp(edx, 10).unwrap();
        a.jne(skip).unwrap();
        a.mov(rdi, CODE + 5).unwrap();
        a.mov(ecx, 2u32).unwrap();
        a.mov(al, 4).unwrap();
        a.rep().stosb().unwrap();
        a.set_label(&mut skip).unwrap();
        a.cmp(edx, 20).unwrap();
        a.jne(top).unwrap();
        a.hlt().unwrap();
    });
    let m = run(&prog, |_| {});
    assert_eq!(m.regs().rbx, 10 + 10 * 0x404);
}
