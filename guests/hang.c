/* Never exits by itself (for --timeout, pause/resume and shutdown tests). `mode=1` spins in
 * ring 3 (a vCPU that is always running), the default halts in ring 0 (one that waits in the
 * kernel). `ticks=1` prints a line from ring 3 every ~2^28 loop iterations while spinning. */
#include "c4.h"

static u8 user_stack[8192] __attribute__((aligned(16)));

static void spin(void *arg)
{
    u64 ticks = (u64)arg;
    c4_puts("hang: spinning in ring 3\n");
    for (u64 i = 1;; i++) {
        if (ticks && (i & ((1ul << 28) - 1)) == 0)
            c4_puts("hang: tick\n");
        __asm__ volatile("" ::: "memory");
    }
}

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    if (cpu != 0)
        c4_halt();
    if (c4_cmdline_u64(info, "mode", 0) == 1)
        c4_enter_user(spin, (void *)c4_cmdline_u64(info, "ticks", 0), user_stack + sizeof user_stack);
    c4_puts("hang: halting with interrupts off\n");
    c4_halt();
}
