//! LOCKed read-modify-writes on two vCPU threads: each must be one atomic update of guest RAM,
//! against the other vCPU's locked instructions and against its plain stores. A queued
//! spinlock relies on the latter: its release is a plain byte store, and a `LOCK BTS` on the
//! same word that writes back a stale copy of that byte re-locks a lock nobody holds (Linux
//! then livelocked at SMP bring-up, both vCPUs spinning in the lock's slow path).

mod common;

use std::sync::Arc;

use common::*;
use corefour_hypervisor::{Regs, VmExit};
use iced_x86::code_asm::*;

/// vCPU 0's loop passes (below 2^16: its additions stay in the word's low half).
const ITERS: u32 = 60_000;
/// The race is a few host instructions wide: repeat the pair to catch it.
const ROUNDS: usize = 8;
/// A dword: vCPU 0 adds to its low half (never carrying out of it), vCPU 1 owns byte 3.
const WORD: u64 = DATA;
/// Set by vCPU 1 when it runs, by vCPU 0 when it is done.
const STARTED: u64 = DATA + 0x40;
const DONE: u64 = DATA + 0x80;
/// vCPU 1's verdict: 1 no store of its own was lost, 2 one was.
const VERDICT: u64 = DATA + 0xc0;
/// A counter both vCPUs increment with LOCK XADD.
const SHARED: u64 = DATA + 0x100;
/// A dword whose bit 0 vCPU 0 flips with LOCK BTS/BTR while vCPU 1 stores its byte 2.
const BITS: u64 = DATA + 0x140;
/// 16 aligned bytes vCPU 0 swaps with CMPXCHG16B while vCPU 1 stores their byte 10.
const PAIR: u64 = DATA + 0x180;
const CODE1: u64 = CODE + 0x1000;

/// vCPU 0: waits for vCPU 1, then LOCK ADD / OR / AND / XOR / INC / DEC / XADD / BTS / BTR /
/// CMPXCHG / CMPXCHG16B in a loop.
fn code0() -> Vec<u8> {
    asm64(CODE, |a| {
        let mut wait = a.create_label();
        let mut lp = a.create_label();
        a.set_label(&mut wait).unwrap();
        a.pause().unwrap();
        a.cmp(dword_ptr(STARTED), 0).unwrap();
        a.je(wait).unwrap();
        a.mov(r8d, ITERS).unwrap();
        a.set_label(&mut lp).unwrap();
        a.lock().add(dword_ptr(WORD), 1).unwrap();
        // Updates that leave the value as it is still write it back.
        a.lock().or(dword_ptr(WORD), 0).unwrap();
        a.lock().and(dword_ptr(WORD), -1).unwrap();
        a.lock().xor(dword_ptr(WORD), 0).unwrap();
        a.lock().inc(word_ptr(WORD)).unwrap();
        a.lock().dec(word_ptr(WORD)).unwrap();
        a.mov(eax, 1).unwrap();
        a.lock().xadd(dword_ptr(SHARED), eax).unwrap();
        a.lock().bts(dword_ptr(BITS), 0).unwrap();
        a.lock().btr(dword_ptr(BITS), 0).unwrap();
        // A CMPXCHG that fails (bit 31 is never set) must not write back a stale word either.
        a.mov(eax, 0x8000_0000u32).unwrap();
        a.mov(edx, 0).unwrap();
        a.lock().cmpxchg(dword_ptr(BITS), edx).unwrap();
        // CMPXCHG16B of the pair with itself: it succeeds or fails, and writes nothing stale.
        a.mov(rax, qword_ptr(PAIR)).unwrap();
        a.mov(rdx, qword_ptr(PAIR + 8)).unwrap();
        a.mov(rbx, rax).unwrap();
        a.mov(rcx, rdx).unwrap();
        a.lock().cmpxchg16b(xmmword_ptr(PAIR)).unwrap();
        a.dec(r8d).unwrap();
        a.jnz(lp).unwrap();
        a.mov(dword_ptr(DONE), 1).unwrap();
        a.hlt().unwrap();
    })
}

/// vCPU 1: stores a running count into byte 3 of WORD, byte 2 of BITS and byte 10 of PAIR with
/// plain MOVs and
/// checks before each store that the last one is still there; LOCK XADD on SHARED too.
fn code1() -> Vec<u8> {
    asm64(CODE1, |a| {
        let mut lp = a.create_label();
        let mut bad = a.create_label();
        let mut out = a.create_label();
        a.mov(dword_ptr(STARTED), 1).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.xor(esi, esi).unwrap();
        a.set_label(&mut lp).unwrap();
        a.movzx(eax, byte_ptr(WORD + 3)).unwrap();
        a.cmp(al, cl).unwrap();
        a.jne(bad).unwrap();
        a.movzx(eax, byte_ptr(BITS + 2)).unwrap();
        a.cmp(al, cl).unwrap();
        a.jne(bad).unwrap();
        a.movzx(eax, byte_ptr(PAIR + 10)).unwrap();
        a.cmp(al, cl).unwrap();
        a.jne(bad).unwrap();
        a.inc(cl).unwrap();
        a.mov(byte_ptr(PAIR + 10), cl).unwrap();
        a.mov(byte_ptr(WORD + 3), cl).unwrap();
        a.mov(byte_ptr(BITS + 2), cl).unwrap();
        a.mov(eax, 1).unwrap();
        a.lock().xadd(dword_ptr(SHARED), eax).unwrap();
        a.inc(esi).unwrap();
        a.cmp(dword_ptr(DONE), 0).unwrap();
        a.je(lp).unwrap();
        a.mov(dword_ptr(VERDICT), 1).unwrap();
        a.jmp(out).unwrap();
        a.set_label(&mut bad).unwrap();
        a.mov(dword_ptr(VERDICT), 2).unwrap();
        a.set_label(&mut out).unwrap();
        a.hlt().unwrap();
    })
}

fn run_pair(threshold: u32) {
    let ram = Ram::new(RAM);
    write_gdt(&ram);
    write_page_tables(&ram);
    ram.put(CODE, &code0());
    ram.put(CODE1, &code1());
    // SAFETY: `ram` outlives the VM and both vCPUs (they are joined below).
    let vm = unsafe { emu_vm(&ram, 2, threshold) };
    let ram = Arc::new(ram);
    let threads: Vec<_> = [(0u32, CODE, 0x80000u64), (1, CODE1, 0x7_0000)]
        .into_iter()
        .map(|(id, rip, stack)| {
            let ops = Ops::new();
            let mut vcpu = vm.create_vcpu(id, ops).unwrap();
            vcpu.set_sregs(&long_sregs(0)).unwrap();
            vcpu.set_regs(&Regs {
                rip,
                rsp: stack,
                rflags: 2,
                ..Regs::default()
            })
            .unwrap();
            std::thread::spawn(move || {
                let exit = vcpu.run().unwrap();
                (exit, vcpu.regs().unwrap())
            })
        })
        .collect();
    let mut stores = 0;
    for (id, t) in threads.into_iter().enumerate() {
        let (exit, regs) = t.join().unwrap();
        assert!(
            matches!(exit, VmExit::Halt),
            "vCPU {id} stopped with {exit:?} at {:#x}",
            regs.rip
        );
        if id == 1 {
            stores = regs.rsi;
        }
    }
    let r32 = |at: u64| ram.r64(at) & 0xffff_ffff;
    assert_eq!(
        r32(VERDICT),
        1,
        "a locked update on vCPU 0 wrote back a stale copy of vCPU 1's plain store (vCPU 1 \
         stored {stores} times; bytes now: word {:#x}, bits {:#x}, pair {:#x})",
        r32(WORD) >> 24,
        (r32(BITS) >> 16) & 0xff,
        (ram.r64(PAIR + 8) >> 16) & 0xff
    );
    assert_eq!(r32(WORD) & 0xffff, ITERS as u64, "LOCK ADD lost updates");
    assert_eq!(
        r32(SHARED),
        ITERS as u64 + stores,
        "LOCK XADD from two vCPUs lost updates"
    );
    assert_eq!(r32(BITS) & 1, 0, "LOCK BTS/BTR left bit 0 set");
}

#[test]
fn locked_updates_keep_other_vcpu_stores_interpreter() {
    for _ in 0..ROUNDS {
        run_pair(0);
    }
}

#[test]
fn locked_updates_keep_other_vcpu_stores_jit() {
    for _ in 0..ROUNDS {
        run_pair(jit_threshold().max(1));
    }
}
