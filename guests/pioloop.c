/* The bench guest: `n=N` port writes to 0x80 (an unclaimed port: each is one exit to the VMM
 * and straight back), then exit 0. benches/kvm_pio_loop.c runs the same instruction loop. */
#include "c4.h"

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    if (cpu != 0)
        c4_halt();
    u64 n = c4_cmdline_u64(info, "n", 1000);
    if (n)
        __asm__ volatile("1: outb %%al, $0x80\n\tdec %%rcx\n\tjnz 1b" : "+c"(n) : "a"(0) : "memory");
    c4_exit(0);
}
