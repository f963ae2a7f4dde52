/* The shared guest runtime: console, exit, command line. Ring 0 talks to ports; ring 3 (which
 * cannot use IN/OUT on kvm_pvm) talks to the VMM's MMIO page. */
#include "c4.h"

#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0xf4
#define SYS_MMIO 0xd0000000ul
#define SERIAL_MMIO 0xd0001000ul

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }

void c4_putc(char c)
{
    if (c4_cpl() == 0)
        outb(COM1, (u8)c);
    else
        *(volatile u8 *)SERIAL_MMIO = (u8)c;
}

void c4_puts(const char *s)
{
    while (*s)
        c4_putc(*s++);
}

void c4_put_hex(u64 v)
{
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do {
        buf[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    c4_puts(&buf[i]);
}

void c4_put_dec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    c4_puts(&buf[i]);
}

void c4_halt(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

void c4_exit(u32 code)
{
    if (c4_cpl() == 0)
        outl(DEBUG_EXIT_PORT, code);
    else
        *(volatile u32 *)SYS_MMIO = code;
    /* The VMM stops every vCPU soon after; ring 3 cannot hlt, so spin there. */
    if (c4_cpl() == 0)
        c4_halt();
    for (;;)
        __asm__ volatile("pause");
}

u64 c4_cmdline_u64(const struct c4_boot_info *info, const char *key, u64 dflt)
{
    const char *p = (const char *)info->cmdline_addr;
    while (*p) {
        const char *k = key, *q = p;
        while (*k && *q == *k) {
            k++;
            q++;
        }
        if (!*k && *q == '=' && (p == (const char *)info->cmdline_addr || p[-1] == ' ')) {
            u64 v = 0;
            int any = 0;
            for (q++; *q >= '0' && *q <= '9'; q++, any = 1)
                v = v * 10 + (u64)(*q - '0');
            return any ? v : dflt;
        }
        p++;
    }
    return dflt;
}
