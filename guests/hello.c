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
    c4_exit(0);
}
