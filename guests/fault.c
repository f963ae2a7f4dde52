/* Triple-faults on purpose: with no IDT, #UD escalates to #GP, #DF, then shutdown. */
#include "c4.h"

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    (void)info;
    if (cpu != 0)
        c4_halt();
    c4_puts("fault: about to triple-fault\n");
    struct __attribute__((packed)) { u16 limit; u64 base; } idt = {0, 0};
    __asm__ volatile("lidt %0; ud2" ::"m"(idt));
    c4_puts("fault: still alive?!\n");
    c4_exit(1);
}
