/* Entry of every vCPU (CONTRACT.md): 64-bit mode, rdi = boot info, rsi = vCPU index,
 * rsp = top of this vCPU's 16 KiB stack (16-byte aligned), interrupts off. */
    .section .text.start, "ax"
    .globl _start
_start:
    xor %ebp, %ebp
    call c4_main        /* c4_main(info, cpu); the call leaves rsp 16-byte aligned - 8 */
    mov $0, %edi
    call c4_exit

    .text
    .globl c4_enter_user
/* c4_enter_user(fn=rdi, arg=rsi, stack_top=rdx): iretq to ring 3 with the VMM's user
 * selectors (CS 0x1b, SS 0x23), interrupts off, then fn(arg). */
c4_enter_user:
    mov %rdi, %rax
    mov %rsi, %rdi
    and $-16, %rdx
    sub $8, %rdx         /* as if called: rsp = 16n - 8 at fn's entry */
    pushq $0x23
    pushq %rdx
    pushq $0x2
    pushq $0x1b
    pushq %rax
    iretq
