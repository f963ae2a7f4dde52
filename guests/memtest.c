/* Writes and verifies every 8-byte word of free RAM, in ring 3 (ring-0 code is emulated one
 * instruction at a time on kvm_pvm; ring 3 runs natively). The pattern and checksum are
 * recomputed by the integration test:
 *   pattern(a) = (a * 0x9e3779b97f4a7c15) ^ 0x5555555555555555, checksum = sum of patterns. */
#include "c4.h"

static u8 user_stack[16384] __attribute__((aligned(16)));

static inline u64 pattern(u64 a) { return (a * 0x9e3779b97f4a7c15ul) ^ 0x5555555555555555ul; }

struct range { u64 start, end; };

static void sweep(void *arg)
{
    const struct c4_boot_info *info = arg;
    struct range r[2] = {
        {info->free_start, info->low_mem_end},
        {0x100000000ul, 0x100000000ul + info->high_mem_size},
    };
    u64 sum = 0, pages = 0, bad = 0, first_bad = 0;
    for (int i = 0; i < 2; i++)
        for (u64 a = r[i].start; a < r[i].end; a += 8)
            *(volatile u64 *)a = pattern(a);
    for (int i = 0; i < 2; i++) {
        for (u64 a = r[i].start; a < r[i].end; a += 8) {
            u64 v = *(volatile u64 *)a;
            if (v != pattern(a) && !bad++)
                first_bad = a;
            sum += v;
        }
        pages += (r[i].end - r[i].start) / 4096;
    }
    if (bad) {
        c4_puts("memtest: FAIL words=");
        c4_put_dec(bad);
        c4_puts(" first=");
        c4_put_hex(first_bad);
        c4_putc('\n');
        c4_exit(1);
    }
    c4_puts("memtest: ok start=");
    c4_put_hex(r[0].start);
    c4_puts(" end=");
    c4_put_hex(r[0].end);
    c4_puts(" high=");
    c4_put_hex(info->high_mem_size);
    c4_puts(" pages=");
    c4_put_dec(pages);
    c4_puts(" checksum=");
    c4_put_hex(sum);
    c4_putc('\n');
    c4_exit(0);
}

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    if (cpu != 0)
        c4_halt();
    c4_puts("memtest: sweeping free RAM in ring 3\n");
    c4_enter_user(sweep, (void *)info, user_stack + sizeof user_stack);
}
