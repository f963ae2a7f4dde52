//! The software TLB against what the architecture says about stale translations: a CR3 load
//! keeps global pages (CR4.PGE) and drops the others, INVLPG drops one page (global or not,
//! and a whole large page when it names any part of it), and toggling CR4.PGE drops
//! everything. Each program runs on the interpreter alone and with the JIT.

mod common;

use common::*;
use corefour_hypervisor::VmExit;
use iced_x86::code_asm::*;

/// The page directory for linear 1 GiB .. 1 GiB + 1 GiB (see `write_page_tables`).
const PD1: u64 = PML4 + 0x3000;
/// A page table for linear 0x4000_0000 .. 0x4020_0000.
const PT: u64 = 0x20_0000;
const GLOBAL_VA: u64 = 0x4000_0000;
const LOCAL_VA: u64 = 0x4000_1000;
const BIG_VA: u64 = 0x4020_0000;
/// Physical pages the small mappings point at; each holds its own address as a marker.
const A: u64 = 0x20_1000;
const A2: u64 = 0x20_2000;
const B: u64 = 0x20_3000;
const B2: u64 = 0x20_4000;
const G: u64 = 1 << 8;

fn machine(code: &[u8], threshold: u32) -> Machine {
    Machine::long_prepared(code, 0, threshold, |ram| {
        ram.w64(PD1, PT | 3);
        ram.w64(PT, A | 3 | G);
        ram.w64(PT + 8, B | 3);
        // A global 2 MiB page at BIG_VA onto physical 0 (later moved to 2 MiB).
        ram.w64(PD1 + 8, 0x83 | G);
        for p in [A, A2, B, B2, 0x18_0000, 0x38_0000] {
            ram.w64(p, p);
        }
    })
}

fn reload_cr3(a: &mut CodeAssembler) {
    a.mov(rax, cr3).unwrap();
    a.mov(cr3, rax).unwrap();
}

fn set_pge(a: &mut CodeAssembler, on: bool) {
    a.mov(rax, cr4).unwrap();
    if on {
        a.or(rax, 0x80).unwrap();
    } else {
        a.and(rax, !0x80i32).unwrap();
    }
    a.mov(cr4, rax).unwrap();
}

#[test]
fn global_pages_survive_cr3_loads_but_not_invlpg_or_pge_toggles() {
    let prog = asm64(CODE, |a| {
        set_pge(a, true);
        // Fill both translations.
        a.mov(r8, qword_ptr(GLOBAL_VA)).unwrap();
        a.mov(r9, qword_ptr(LOCAL_VA)).unwrap();
        // Repoint both PTEs without INVLPG, then reload CR3.
        a.mov(rax, A2 | 3 | G).unwrap();
        a.mov(qword_ptr(PT), rax).unwrap();
        a.mov(rax, B2 | 3).unwrap();
        a.mov(qword_ptr(PT + 8), rax).unwrap();
        reload_cr3(a);
        a.mov(r10, qword_ptr(GLOBAL_VA)).unwrap(); // still A: global
        a.mov(r11, qword_ptr(LOCAL_VA)).unwrap(); // B2: flushed
        a.invlpg(qword_ptr(GLOBAL_VA)).unwrap();
        a.mov(r12, qword_ptr(GLOBAL_VA)).unwrap(); // A2
                                                   // Back to A; a CR3 load keeps A2, a CR4.PGE toggle drops it.
        a.mov(rax, A | 3 | G).unwrap();
        a.mov(qword_ptr(PT), rax).unwrap();
        reload_cr3(a);
        a.mov(r13, qword_ptr(GLOBAL_VA)).unwrap(); // A2
        set_pge(a, false);
        set_pge(a, true);
        a.mov(r14, qword_ptr(GLOBAL_VA)).unwrap(); // A
        a.hlt().unwrap();
    });
    for threshold in [0, 1] {
        let mut m = machine(&prog, threshold);
        assert_eq!(m.run(), VmExit::Halt, "threshold {threshold}");
        let r = m.regs();
        assert_eq!(
            (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14),
            (A, B, A, B2, A2, A2, A),
            "threshold {threshold}"
        );
    }
}

#[test]
fn without_pge_a_cr3_load_drops_global_entries_too() {
    let prog = asm64(CODE, |a| {
        a.mov(r8, qword_ptr(GLOBAL_VA)).unwrap();
        a.mov(rax, A2 | 3 | G).unwrap();
        a.mov(qword_ptr(PT), rax).unwrap();
        reload_cr3(a);
        a.mov(r9, qword_ptr(GLOBAL_VA)).unwrap();
        a.hlt().unwrap();
    });
    for threshold in [0, 1] {
        let mut m = machine(&prog, threshold);
        assert_eq!(m.run(), VmExit::Halt);
        assert_eq!((m.regs().r8, m.regs().r9), (A, A2), "threshold {threshold}");
    }
}

#[test]
fn invlpg_anywhere_in_a_large_page_drops_all_of_it() {
    let prog = asm64(CODE, |a| {
        set_pge(a, true);
        // Two 4 KiB pieces of the same global 2 MiB page.
        a.mov(r8, qword_ptr(BIG_VA + 0x18_0000)).unwrap();
        a.mov(r9, qword_ptr(BIG_VA + 0x19_0000)).unwrap();
        // Move the large page to physical 2 MiB and invalidate through the other piece.
        a.mov(rax, 0x20_0083u64 | G).unwrap();
        a.mov(qword_ptr(PD1 + 8), rax).unwrap();
        a.invlpg(qword_ptr(BIG_VA + 0x19_0000)).unwrap();
        a.mov(r10, qword_ptr(BIG_VA + 0x18_0000)).unwrap();
        a.hlt().unwrap();
    });
    for threshold in [0, 1] {
        let mut m = machine(&prog, threshold);
        assert_eq!(m.run(), VmExit::Halt);
        let r = m.regs();
        assert_eq!(
            (r.r8, r.r10),
            (0x18_0000, 0x38_0000),
            "threshold {threshold}"
        );
    }
}

#[test]
fn a_page_that_becomes_code_loses_its_write_tag_and_other_entries_stay() {
    // The loop's data page is written while hot, then code is placed on it and run: the
    // store that puts the code there must be seen by the fetch (no stale decode), and the
    // store after it (to the now-code page) must invalidate it again.
    let data = DATA;
    let prog = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.xor(ecx, ecx).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(qword_ptr(data + 0x800), rcx).unwrap();
        a.inc(ecx).unwrap();
        a.cmp(ecx, 50).unwrap();
        a.jne(top).unwrap();
        // `mov eax, 5; ret` at DATA, called, then patched to `mov eax, 9; ret` and called.
        a.mov(rax, 0xc300_0000_05b8_u64).unwrap();
        a.mov(qword_ptr(data), rax).unwrap();
        a.mov(rax, data).unwrap();
        a.call(rax).unwrap();
        a.mov(ebx, eax).unwrap();
        a.mov(byte_ptr(data + 1), 9).unwrap();
        a.mov(rax, data).unwrap();
        a.call(rax).unwrap();
        a.mov(rdx, qword_ptr(data + 0x800)).unwrap();
        a.hlt().unwrap();
    });
    for threshold in [0, 1] {
        let mut m = machine(&prog, threshold);
        assert_eq!(m.run(), VmExit::Halt);
        let r = m.regs();
        assert_eq!((r.rbx, r.rax, r.rdx), (5, 9, 49), "threshold {threshold}");
    }
}

#[test]
fn evicted_entries_come_back_from_the_second_level_only_until_a_flush() {
    // X and Y share a first-level slot (4 MiB apart) but not a second-level one.
    const PT2: u64 = 0x20_5000;
    const X: u64 = LOCAL_VA;
    const Y: u64 = 0x4040_1000;
    let prog = asm64(CODE, |a| {
        a.mov(r8, qword_ptr(X)).unwrap(); // B
        a.mov(rax, qword_ptr(Y)).unwrap(); // evicts X from the first level
        a.mov(rax, B2 | 3).unwrap();
        a.mov(qword_ptr(PT + 8), rax).unwrap();
        a.mov(r9, qword_ptr(X)).unwrap(); // B: the second level still has it
        a.mov(rax, qword_ptr(Y)).unwrap();
        a.invlpg(qword_ptr(X)).unwrap();
        a.mov(r10, qword_ptr(X)).unwrap(); // B2
        a.mov(rax, B | 3).unwrap();
        a.mov(qword_ptr(PT + 8), rax).unwrap();
        a.mov(rax, qword_ptr(Y)).unwrap();
        reload_cr3(a);
        a.mov(r11, qword_ptr(X)).unwrap(); // B
        a.hlt().unwrap();
    });
    for threshold in [0, 1] {
        let ram_prep = |m: &Machine| {
            m.ram.w64(PD1 + 16, PT2 | 3);
            m.ram.w64(PT2 + 8, A2 | 3);
        };
        let mut m = machine(&prog, threshold);
        ram_prep(&m);
        assert_eq!(m.run(), VmExit::Halt);
        let r = m.regs();
        assert_eq!(
            (r.r8, r.r9, r.r10, r.r11),
            (B, B, B2, B),
            "threshold {threshold}"
        );
    }
}
