/* Ends the VM the hard way. Default: triple-faults on purpose (no IDT, so #UD escalates to
 * #GP, #DF, then shutdown). `how=1`: asks the i8042 for a reset (port 0x64 <- 0xfe). */
#include "c4.h"

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    if (cpu != 0)
        c4_halt();
    if (c4_cmdline_u64(info, "how", 0) == 1) {
        c4_puts("fault: asking the i8042 for a reset\n");
        __asm__ volatile("outb %0, $0x64" ::"a"((u8)0xfe));
        c4_halt();
    }
    c4_puts("fault: about to triple-fault\n");
    struct __attribute__((packed)) { u16 limit; u64 base; } idt = {0, 0};
    __asm__ volatile("lidt %0; ud2" ::"m"(idt));
    c4_puts("fault: still alive?!\n");
    c4_exit(1);
}
