/* Counts and prints `count=N` lines from ring 3, forever, for snapshot/restore and migration
 * tests: a restored or migrated copy must continue the sequence with no gap and no repeat.
 * The count lives in memory (a volatile global) and is cross-checked against a copy kept in a
 * page far away in RAM, so a restore that lost memory shows up as a `count: MISMATCH` line.
 * `spin=N` loop iterations between lines (default 2^22, a few ms natively). */
#include "c4.h"

static u8 user_stack[16384] __attribute__((aligned(16)));
static volatile u64 count;

struct args {
    u64 spin;
    volatile u64 *shadow;
};

static void run(void *p)
{
    struct args *a = p;
    c4_puts("counter: start\n");
    for (;;) {
        for (u64 i = 0; i < a->spin; i++)
            __asm__ volatile("" ::: "memory");
        if (*a->shadow != count) {
            c4_puts("count: MISMATCH\n");
            c4_exit(1);
        }
        c4_puts("count=");
        c4_put_dec(count);
        c4_putc('\n');
        count = count + 1;
        *a->shadow = count;
    }
}

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    static struct args a;
    if (cpu != 0)
        c4_halt();
    a.spin = c4_cmdline_u64(info, "spin", 1ul << 22);
    /* The last page of low RAM. */
    a.shadow = (volatile u64 *)(info->low_mem_end - 4096);
    *a.shadow = 0;
    c4_enter_user(run, &a, user_stack + sizeof user_stack);
}
