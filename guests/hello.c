/* Prints a greeting and exits 0. */
#include "c4.h"

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    if (cpu != 0)
        c4_halt();
    c4_puts("Hello from corefour guest\n");
    c4_puts("vcpus=");
    c4_put_dec(info->vcpus);
    c4_puts(" mem_mib=");
    c4_put_dec(info->mem_size >> 20);
    c4_puts(" cmdline=\"");
    c4_puts((const char *)info->cmdline_addr);
    c4_puts("\"\n");
    if (info->high_mem_size) {
        c4_puts("high_mem_mib=");
        c4_put_dec(info->high_mem_size >> 20);
        c4_putc('\n');
    }
    if (info->initrd_size) {
        const u8 *p = (const u8 *)info->initrd_addr;
        u64 sum = 0;
        for (u64 i = 0; i < info->initrd_size; i++)
            sum += p[i];
        c4_puts("initrd_bytes=");
        c4_put_dec(info->initrd_size);
        c4_puts(" initrd_sum=");
        c4_put_dec(sum);
        c4_putc('\n');
    }
    c4_exit(0);
}
