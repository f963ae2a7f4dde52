/* A busy guest for migration benchmarks: writes one word in every page of a `ws=` MiB working
 * set (default 64) over and over from ring 3, `spin=` iterations between pages (default 2000),
 * so it keeps dirtying memory at a steady rate. Prints `dirtier: pass N` every 16 passes. */
#include "c4.h"

static u8 user_stack[16384] __attribute__((aligned(16)));

struct args {
    u64 start, pages, spin;
};

static void run(void *p)
{
    struct args *a = p;
    c4_puts("dirtier: start\n");
    for (u64 pass = 1;; pass++) {
        for (u64 pg = 0; pg < a->pages; pg++) {
            *(volatile u64 *)(a->start + pg * 4096) = pass ^ pg;
            for (u64 i = 0; i < a->spin; i++)
                __asm__ volatile("" ::: "memory");
        }
        if ((pass & 15) == 0) {
            c4_puts("dirtier: pass ");
            c4_put_dec(pass);
            c4_putc('\n');
        }
    }
}

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    static struct args a;
    if (cpu != 0)
        c4_halt();
    u64 ws = c4_cmdline_u64(info, "ws", 64) << 20;
    u64 start = (info->free_start + 4095) & ~4095ul;
    if (start + ws > info->low_mem_end)
        ws = (info->low_mem_end - start) & ~4095ul;
    a.start = start;
    a.pages = ws / 4096;
    a.spin = c4_cmdline_u64(info, "spin", 2000);
    c4_enter_user(run, &a, user_stack + sizeof user_stack);
}
