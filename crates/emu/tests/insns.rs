//! Instruction-group tests: small programs run on the software CPU, results checked against
//! what the architecture defines.

mod common;

use common::*;
use corefour_hypervisor::{Regs, VmExit};
use iced_x86::code_asm::*;

fn run64(
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
) -> (Machine, VmExit) {
    let code = asm64(CODE, |a| f(a).unwrap());
    let mut m = Machine::long(&code, 0);
    let e = m.run();
    (m, e)
}

const CF: u64 = 1;
const PF: u64 = 4;
const AF: u64 = 16;
const ZF: u64 = 64;
const SF: u64 = 128;
const OF: u64 = 2048;

#[test]
fn alu_and_flags() {
    let (m, e) = run64(|a| {
        a.mov(rax, 5u64)?;
        a.add(rax, 7)?;
        a.mov(rbx, rax)?;
        a.sub(rbx, 20)?;
        a.mov(al, 0xffu32)?;
        a.add(al, 1)?;
        a.pushfq()?;
        a.pop(rcx)?;
        a.mov(edx, 0x7fff_ffffu32)?;
        a.inc(edx)?;
        a.pushfq()?;
        a.pop(rsi)?;
        a.hlt()
    });
    assert_eq!(e, VmExit::Halt);
    let r = m.regs();
    assert_eq!(r.rax & !0xff, 12 & !0xff);
    assert_eq!(r.rbx, (-8i64) as u64);
    assert_eq!(r.rcx & (CF | PF | AF | ZF | SF | OF), CF | PF | AF | ZF);
    assert_eq!(r.rdx, 0x8000_0000);
    assert_eq!(r.rsi & (PF | AF | ZF | SF | OF), OF | SF | AF | PF);
}

#[test]
fn mul_div_and_shifts() {
    let (m, e) = run64(|a| {
        a.mov(rax, 0x1234_5678_9abc_def0u64)?;
        a.mov(rcx, 0x10u64)?;
        a.mul(rcx)?; // rdx:rax = rax * 16
        a.mov(r8, rdx)?;
        a.mov(r9, rax)?;
        a.mov(rax, 1000u64)?;
        a.xor(edx, edx)?;
        a.mov(rcx, 7u64)?;
        a.div(rcx)?;
        a.mov(r10, rax)?;
        a.mov(r11, rdx)?;
        a.mov(r12, (-100i64) as u64)?;
        a.sar(r12, 2)?;
        a.mov(r13, 0x8000_0000_0000_0001u64)?;
        a.rol(r13, 4)?;
        a.mov(r14, 3u64)?;
        a.imul_3(r14, r14, -5)?;
        a.hlt()
    });
    assert_eq!(e, VmExit::Halt);
    let r = m.regs();
    assert_eq!(r.r8, 0x1);
    assert_eq!(r.r9, 0x2345_6789_abcd_ef00);
    assert_eq!((r.r10, r.r11), (142, 6));
    assert_eq!(r.r12, (-25i64) as u64);
    assert_eq!(r.r13, 0x18);
    assert_eq!(r.r14, (-15i64) as u64);
}

#[test]
fn divide_error_reaches_the_idt() {
    let code = asm64(CODE, |a| {
        a.xor(ecx, ecx).unwrap();
        a.div(rcx).unwrap();
        a.hlt().unwrap();
    });
    let handler = asm64(CODE + 0x800, |a| {
        a.mov(r15, 0xdeu64).unwrap();
        a.hlt().unwrap();
    });
    let mut m = Machine::long(&code, 0);
    m.ram.put(CODE + 0x800, &handler);
    idt_gate(&m.ram, 0, CODE + 0x800, 0, 0);
    assert_eq!(m.run(), VmExit::Halt);
    let r = m.regs();
    assert_eq!(r.r15, 0xde);
    // The frame's RIP is the faulting DIV.
    assert_eq!(m.ram.r64(r.rsp), CODE + 2);
}

#[test]
fn strings_with_rep() {
    let (m, e) = run64(|a| {
        a.mov(rdi, DATA)?;
        a.mov(rax, 0x4141_4141_4141_4141u64)?;
        a.mov(rcx, 4u64)?;
        a.rep().stosq()?;
        a.mov(rsi, DATA)?;
        a.mov(rdi, DATA + 0x100)?;
        a.mov(rcx, 32u64)?;
        a.rep().movsb()?;
        a.mov(byte_ptr(DATA + 0x100 + 20), 0x5a)?;
        a.mov(rdi, DATA + 0x100)?;
        a.mov(al, 0x5au32)?;
        a.mov(rcx, 100u64)?;
        a.repne().scasb()?;
        a.hlt()
    });
    assert_eq!(e, VmExit::Halt);
    let r = m.regs();
    assert_eq!(r.rdi, DATA + 0x100 + 21);
    assert_eq!(r.rcx, 100 - 21);
    assert_eq!(
        &m.ram.slice()[(DATA + 0x100) as usize..(DATA + 0x110) as usize],
        &[0x41; 16]
    );
}

#[test]
fn calls_stack_and_cmov() {
    let code = asm64(CODE, |a| {
        let mut f = a.create_label();
        a.mov(rax, 1u64).unwrap();
        a.call(f).unwrap();
        a.cmp(rax, 2).unwrap();
        a.mov(rbx, 0x55u64).unwrap();
        a.mov(rcx, 0x66u64).unwrap();
        a.cmove(rbx, rcx).unwrap();
        a.setne(dl).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut f).unwrap();
        a.push(rax).unwrap();
        a.pop(rsi).unwrap();
        a.add(rax, rsi).unwrap();
        a.ret().unwrap();
    });
    let mut m = Machine::long(&code, 0);
    assert_eq!(m.run(), VmExit::Halt);
    let r = m.regs();
    assert_eq!((r.rax, r.rbx, r.rdx & 0xff, r.rsp), (2, 0x66, 0, STACK));
}

#[test]
fn page_fault_sets_cr2_and_error_code() {
    let code = asm64(CODE, |a| {
        // Unmap the 2 MiB page at 2 MiB, then write there.
        a.mov(rax, PML4 + 0x2000 + 8).unwrap(); // PD entry for 2..4 MiB
        a.mov(qword_ptr(rax), 0).unwrap();
        a.mov(rbx, 0x20_0123u64).unwrap();
        a.mov(qword_ptr(rbx), rax).unwrap();
        a.hlt().unwrap();
    });
    let handler = asm64(CODE + 0x800, |a| {
        a.mov(r15, cr2).unwrap();
        a.pop(r14).unwrap();
        a.hlt().unwrap();
    });
    let mut m = Machine::long(&code, 0);
    m.ram.put(CODE + 0x800, &handler);
    idt_gate(&m.ram, 14, CODE + 0x800, 0, 0);
    assert_eq!(m.run(), VmExit::Halt);
    let r = m.regs();
    assert_eq!(r.r15, 0x20_0123);
    assert_eq!(r.r14, 2, "not-present write from supervisor");
}

#[test]
fn unknown_instruction_raises_ud() {
    let code = asm64(CODE, |a| {
        a.vzeroupper().unwrap(); // AVX is not advertised
        a.hlt().unwrap();
    });
    let handler = asm64(CODE + 0x800, |a| {
        a.mov(r15, 6u64).unwrap();
        a.hlt().unwrap();
    });
    let mut m = Machine::long(&code, 0);
    m.ram.put(CODE + 0x800, &handler);
    idt_gate(&m.ram, 6, CODE + 0x800, 0, 0);
    assert_eq!(m.run(), VmExit::Halt);
    assert_eq!(m.regs().r15, 6);
}

#[test]
fn ring3_syscall_round_trip() {
    // Kernel: set STAR/LSTAR, IRETQ to user; user: SYSCALL; kernel entry: SYSRETQ back to user,
    // which then writes the stop MMIO.
    let user = CODE + 0x400;
    let entry = CODE + 0x800;
    let code = asm64(CODE, |a| {
        a.mov(ecx, 0xc000_0081u32).unwrap();
        a.xor(eax, eax).unwrap();
        a.mov(edx, 0x0010_0008u32).unwrap(); // SYSRET base 0x10, SYSCALL CS 0x08
        a.wrmsr().unwrap();
        a.mov(ecx, 0xc000_0082u32).unwrap();
        a.mov(eax, entry as u32).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
        a.push(0x2bi32).unwrap();
        a.push(STACK as i32).unwrap();
        a.push(0x202i32).unwrap();
        a.push(0x23i32).unwrap();
        a.push(user as i32).unwrap();
        a.iretq().unwrap();
    });
    let ucode = asm64(user, |a| {
        a.mov(rbx, 0x1111u64).unwrap();
        a.syscall().unwrap();
        a.mov(r12, 0x3333u64).unwrap();
        a.mov(rax, STOP_MMIO).unwrap();
        a.mov(qword_ptr(rax), rbx).unwrap();
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.jmp(l).unwrap();
    });
    let kcode = asm64(entry, |a| {
        a.mov(rdx, 0x2222u64).unwrap();
        a.mov(r13, cs).unwrap();
        a.sysretq().unwrap();
    });
    let mut m = Machine::long(&code, 0);
    m.ram.put(user, &ucode);
    m.ram.put(entry, &kcode);
    assert_eq!(m.run(), VmExit::Interrupted);
    let r = m.regs();
    assert_eq!((r.rbx, r.rdx, r.r12, r.r13), (0x1111, 0x2222, 0x3333, 0x08));
    assert_eq!(m.vcpu.sregs().unwrap().cs.selector, 0x23);
    assert_eq!(
        m.ops.log.lock().unwrap().mmio,
        vec![(STOP_MMIO, 0x1111u64.to_le_bytes().to_vec())]
    );
}

#[test]
fn user_fault_switches_to_rsp0() {
    let user = CODE + 0x400;
    let code = asm64(CODE, |a| {
        a.push(0x2bi32).unwrap();
        a.push(STACK as i32).unwrap();
        a.push(0x202i32).unwrap();
        a.push(0x23i32).unwrap();
        a.push(user as i32).unwrap();
        a.iretq().unwrap();
    });
    let ucode = asm64(user, |a| {
        a.hlt().unwrap(); // #GP at CPL 3
    });
    let handler = asm64(CODE + 0x800, |a| {
        a.mov(r15, rsp).unwrap();
        a.hlt().unwrap();
    });
    let mut m = Machine::long(&code, 0);
    m.ram.put(user, &ucode);
    m.ram.put(CODE + 0x800, &handler);
    idt_gate(&m.ram, 13, CODE + 0x800, 0, 0);
    assert_eq!(m.run(), VmExit::Halt);
    let r = m.regs();
    // Error code, RIP, CS, RFLAGS, RSP, SS on the kernel stack from the TSS.
    assert_eq!(r.r15, KSTACK - 48);
    assert_eq!(m.ram.r64(KSTACK - 40), user);
    assert_eq!(m.ram.r64(KSTACK - 32), 0x23);
    assert_eq!(m.ram.r64(KSTACK - 16), STACK);
}

#[test]
fn port_io_goes_to_vmops() {
    let (m, e) = run64(|a| {
        a.mov(dx, 0x3f8u32)?;
        for c in b"hi\n" {
            a.mov(al, *c as u32)?;
            a.out(dx, al)?;
        }
        a.hlt()
    });
    assert_eq!(e, VmExit::Halt);
    assert_eq!(m.ops.serial(), "hi\n");
}

#[test]
fn sse_integer_ops() {
    let (m, e) = run64(|a| {
        a.mov(rax, DATA)?;
        a.mov(qword_ptr(rax), 0x0102_0304_0506_0708u64 as i32)?;
        a.mov(rbx, 0x00ff_0000_ff00_00ffu64)?;
        a.mov(qword_ptr(rax + 8), rbx)?;
        a.movdqu(xmm0, xmmword_ptr(rax))?;
        a.pxor(xmm1, xmm1)?;
        a.pcmpeqb(xmm1, xmm0)?;
        a.pmovmskb(ecx, xmm1)?;
        a.paddd(xmm0, xmm0)?;
        a.movq(rdx, xmm0)?;
        a.pshufd(xmm2, xmm0, 0x1b)?;
        a.movdqa(xmmword_ptr(rax + 16), xmm2)?;
        a.hlt()
    });
    assert_eq!(e, VmExit::Halt);
    let r = m.regs();
    // Bytes equal to zero in 0x0000000005060708 | 0x00ff0000ff0000ff.
    assert_eq!(r.rcx, 0b1011_0110_1111_0000);
    assert_eq!(r.rdx, 0x0000_0000_0a0c_0e10);
    // PSHUFD 0x1b reverses the dwords: the low one lands on top.
    assert_eq!(m.ram.r64(DATA + 24), 0x0a0c_0e10_0000_0000);
}

#[test]
fn self_modifying_code_is_seen() {
    // Simpler to check by hand-assembled bytes: run the loop twice, patching the immediate.
    let prog = asm64(CODE, |a| {
        let mut top = a.create_label();
        let mut done = a.create_label();
        a.xor(ebx, ebx).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(eax, 1u32).unwrap(); // at CODE+4, immediate at CODE+5
        a.add(ebx, eax).unwrap();
        a.inc(ecx).unwrap();
        a.cmp(ecx, 2).unwrap();
        a.je(done).unwrap();
        a.mov(byte_ptr(CODE + 5), 0x10).unwrap();
        a.jmp(top).unwrap();
        a.set_label(&mut done).unwrap();
        a.hlt().unwrap();
    });
    let mut m = Machine::long(&prog, 0);
    assert_eq!(m.run(), VmExit::Halt);
    assert_eq!(m.regs().rbx, 0x11);
}

#[test]
fn apic_timer_interrupt_wakes_hlt() {
    let code = asm64(CODE, |a| {
        a.mov(rax, 0xfee0_0000u64).unwrap();
        a.mov(dword_ptr(rax + 0xf0), 0x1ff).unwrap(); // SVR: enable
        a.mov(dword_ptr(rax + 0x3e0), 0xb).unwrap(); // divide by 1
        a.mov(dword_ptr(rax + 0x320), 0x40).unwrap(); // one-shot, vector 0x40
        a.mov(dword_ptr(rax + 0x380), 200_000).unwrap(); // 200 us
        a.sti().unwrap();
        a.hlt().unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    let handler = asm64(CODE + 0x800, |a| {
        a.mov(r15, 0x40u64).unwrap();
        a.mov(rax, 0xfee0_0000u64).unwrap();
        a.mov(dword_ptr(rax + 0xb0), 0).unwrap();
        a.iretq().unwrap();
    });
    let mut m = Machine::long(&code, 0);
    m.ram.put(CODE + 0x800, &handler);
    idt_gate(&m.ram, 0x40, CODE + 0x800, 0, 0);
    assert_eq!(m.run(), VmExit::Halt);
    assert_eq!(m.regs().r15, 0x40);
}

#[test]
fn pic_interrupt_through_lint0_extint() {
    // Program the 8259 pair (vectors 0x20/0x28, all but IRQ3 masked), wait in HLT; a device
    // raises ISA line 3, which reaches the CPU through LINT0 (ExtINT, the BSP's reset state).
    let code = asm64(CODE, |a| {
        for (port, v) in [
            (0x20u8, 0x11u8),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x28),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0xf7),
            (0xa1, 0xff),
        ] {
            a.mov(al, v as u32).unwrap();
            a.out(port as u32, al).unwrap();
        }
        a.mov(r15, 0u64).unwrap();
        a.sti().unwrap();
        a.hlt().unwrap();
        // OCW3: read the in-service register back after the handler's EOI.
        a.cli().unwrap();
        a.mov(al, 0x0bu32).unwrap();
        a.out(0x20u32, al).unwrap();
        a.in_(al, 0x20u32).unwrap();
        a.movzx(r14d, al).unwrap();
        a.hlt().unwrap();
    });
    let handler = asm64(CODE + 0x800, |a| {
        a.mov(r15, 0x23u64).unwrap();
        a.mov(al, 0x0bu32).unwrap();
        a.out(0x20u32, al).unwrap();
        a.in_(al, 0x20u32).unwrap();
        a.movzx(r13d, al).unwrap(); // ISR while in service
        a.mov(al, 0x20u32).unwrap();
        a.out(0x20u32, al).unwrap(); // EOI
        a.iretq().unwrap();
    });
    let mut m = Machine::long(&code, 0);
    m.ram.put(CODE + 0x800, &handler);
    idt_gate(&m.ram, 0x23, CODE + 0x800, 0, 0);
    // While the guest waits in HLT the line rises and falls: the 8259 keeps the edge.
    let vm = m.vm.clone();
    let pulse = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        vm.set_irq_line(3, true).unwrap();
        vm.set_irq_line(3, false).unwrap();
    });
    assert_eq!(m.run(), VmExit::Halt);
    pulse.join().unwrap();
    let r = m.regs();
    assert_eq!(r.r15, 0x23, "the handler for IRQ3 (vector 0x23) ran");
    assert_eq!(r.r13, 1 << 3, "IRQ3 was in service during the handler");
    assert_eq!(r.r14, 0, "the EOI cleared it");
}

#[test]
fn masked_lint0_keeps_the_pic_away() {
    let code = asm64(CODE, |a| {
        for (port, v) in [
            (0x20u8, 0x11u8),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0x21, 0xf7),
        ] {
            a.mov(al, v as u32).unwrap();
            a.out(port as u32, al).unwrap();
        }
        a.mov(rax, 0xfee0_0000u64).unwrap();
        a.mov(dword_ptr(rax + 0x350), 0x1_0700).unwrap(); // LINT0: ExtINT, masked
                                                          // The APIC timer ends the wait in 300 ms whatever the 8259 does.
        a.mov(dword_ptr(rax + 0xf0), 0x1ff).unwrap();
        a.mov(dword_ptr(rax + 0x3e0), 0xb).unwrap();
        a.mov(dword_ptr(rax + 0x320), 0x40).unwrap();
        a.mov(dword_ptr(rax + 0x380), 300_000_000).unwrap();
        a.mov(r15, 0u64).unwrap();
        a.sti().unwrap();
        a.hlt().unwrap();
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    let handler = asm64(CODE + 0x800, |a| {
        a.mov(r15, 0x23u64).unwrap();
        a.iretq().unwrap();
    });
    let timer = asm64(CODE + 0x900, |a| {
        a.mov(r14, 0x40u64).unwrap();
        a.mov(rax, 0xfee0_0000u64).unwrap();
        a.mov(dword_ptr(rax + 0xb0), 0).unwrap();
        a.iretq().unwrap();
    });
    let mut m = Machine::long(&code, 0);
    m.ram.put(CODE + 0x800, &handler);
    m.ram.put(CODE + 0x900, &timer);
    idt_gate(&m.ram, 0x23, CODE + 0x800, 0, 0);
    idt_gate(&m.ram, 0x40, CODE + 0x900, 0, 0);
    let vm = m.vm.clone();
    let pulse = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        vm.set_irq_line(3, true).unwrap();
    });
    assert_eq!(m.run(), VmExit::Halt);
    pulse.join().unwrap();
    let r = m.regs();
    assert_eq!(r.r14, 0x40, "the APIC timer ended the wait");
    assert_eq!(r.r15, 0, "no 8259 interrupt with LINT0 masked");
}

#[test]
fn real_to_long_mode() {
    // Real mode at 0x7c00: load the GDT, enter protected mode, then long mode, then HLT.
    let ram = Ram::new(RAM);
    write_gdt(&ram);
    write_page_tables(&ram);
    let mut a = CodeAssembler::new(16).unwrap();
    let gdtr = 0x600u64;
    ram.put(gdtr, &0x4fu16.to_le_bytes());
    ram.put(gdtr + 2, &(GDT as u32).to_le_bytes());
    a.lgdt(ptr(gdtr)).unwrap();
    a.mov(eax, cr0).unwrap();
    a.or(eax, 1).unwrap();
    a.mov(cr0, eax).unwrap();
    a.db(&[0x66, 0xea]).unwrap(); // jmp dword 0x40:0x7d00
    a.dd(&[0x7d00]).unwrap();
    a.dw(&[0x40]).unwrap();
    let real = a.assemble(0x7c00).unwrap();
    ram.put(0x7c00, &real);
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(ax, 0x10u32).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(ss, ax).unwrap();
    a.mov(eax, 0x20u32).unwrap(); // PAE
    a.mov(cr4, eax).unwrap();
    a.mov(eax, PML4 as u32).unwrap();
    a.mov(cr3, eax).unwrap();
    a.mov(ecx, 0xc000_0080u32).unwrap();
    a.rdmsr().unwrap();
    a.or(eax, 0x100).unwrap();
    a.wrmsr().unwrap();
    a.mov(eax, cr0).unwrap();
    a.or(eax, 0x8000_0000u32 as i32).unwrap();
    a.mov(cr0, eax).unwrap();
    a.db(&[0xea]).unwrap(); // jmp 0x08:0x7e00
    a.dd(&[0x7e00]).unwrap();
    a.dw(&[0x08]).unwrap();
    let prot = a.assemble(0x7d00).unwrap();
    ram.put(0x7d00, &prot);
    let long = asm64(0x7e00, |a| {
        a.mov(rax, 0x1234_5678_9abc_def0u64).unwrap();
        a.hlt().unwrap();
    });
    ram.put(0x7e00, &long);
    let mut m = Machine::bare(ram);
    let mut s = m.vcpu.sregs().unwrap();
    s.cs.selector = 0;
    s.cs.base = 0;
    m.vcpu.set_sregs(&s).unwrap();
    m.vcpu
        .set_regs(&Regs {
            rip: 0x7c00,
            rflags: 2,
            rsp: 0x7000,
            ..Regs::default()
        })
        .unwrap();
    assert_eq!(m.run(), VmExit::Halt);
    let r = m.regs();
    assert_eq!(r.rax, 0x1234_5678_9abc_def0);
    let s = m.vcpu.sregs().unwrap();
    assert!(s.cs.l && s.efer & 0x400 != 0, "in long mode");
}

#[test]
fn triple_fault_is_a_shutdown() {
    // No IDT entries at all: #UD -> #GP on the gate -> #DF -> shutdown.
    let code = asm64(CODE, |a| a.ud2().unwrap());
    let mut m = Machine::long(&code, 0);
    let mut s = m.vcpu.sregs().unwrap();
    s.idt.limit = 0;
    m.vcpu.set_sregs(&s).unwrap();
    assert_eq!(m.run(), VmExit::Shutdown);
}

#[test]
fn enter_leave_frames() {
    let (m, e) = run64(|a| {
        a.mov(rbp, 0x1234u64)?;
        a.enter(0x20, 0)?;
        a.mov(rbx, rbp)?;
        a.mov(rcx, rsp)?;
        a.leave()?;
        a.hlt()
    });
    assert_eq!(e, VmExit::Halt);
    let r = m.regs();
    assert_eq!(r.rbx, STACK - 8);
    assert_eq!(r.rcx, STACK - 8 - 0x20);
    assert_eq!((r.rbp, r.rsp), (0x1234, STACK));
}
