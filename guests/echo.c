/* Reads one line from COM1 (the VMM's stdin) and prints it back; exits 0 (1 on a line over
 * 200 bytes). Polls the line status register: no interrupts needed. */
#include "c4.h"

static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    (void)info;
    if (cpu != 0)
        c4_halt();
    char line[201];
    u32 n = 0;
    c4_puts("echo: ready\n");
    for (;;) {
        while (!(inb(0x3f8 + 5) & 1))
            __asm__ volatile("pause");
        char c = (char)inb(0x3f8);
        if (c == '\n')
            break;
        if (n == 200)
            c4_exit(1);
        line[n++] = c;
    }
    line[n] = 0;
    c4_puts("echo: ");
    c4_puts(line);
    c4_putc('\n');
    c4_exit(0);
}
