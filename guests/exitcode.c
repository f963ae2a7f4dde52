/* Exits with the code given as `code=N` on the command line (default 0). */
#include "c4.h"

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    if (cpu != 0)
        c4_halt();
    u64 code = c4_cmdline_u64(info, "code", 0);
    c4_puts("exitcode: exiting with ");
    c4_put_dec(code);
    c4_putc('\n');
    c4_exit((u32)code);
}
