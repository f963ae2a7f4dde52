/* virtio-rng test guest (run with `corefour vmm --rng`): reads 32 random bytes twice, prints
 * `RNG <hex>` for each and exits 0 when both are non-zero and differ, 1 otherwise. */
#include "c4.h"
#include "virtio/virtio.h"

static u8 user_stack[16384] __attribute__((aligned(16)));
static u8 buf[2][32];

static void fail(const char *what, long v)
{
    c4_puts("vrng: FAIL ");
    c4_puts(what);
    c4_puts(" ");
    c4_put_hex((u64)v);
    c4_putc('\n');
    c4_exit(1);
}

static void run(void *arg)
{
    (void)arg;
    struct vdev d;
    int r = virtio_init(&d, VIRTIO_ID_RNG, 1);
    if (r < 0)
        fail("init step", r);
    for (int i = 0; i < 2; i++) {
        struct vbuf b = {buf[i], sizeof buf[i], 1};
        long n = virtio_transfer(&d, 0, &b, 1, 2000000000ul);
        if (n != (long)sizeof buf[i])
            fail("short read", n);
        c4_puts("RNG ");
        put_hex_bytes(buf[i], sizeof buf[i]);
        c4_putc('\n');
    }
    int same = 1, zero = 1;
    for (u32 i = 0; i < sizeof buf[0]; i++) {
        same &= buf[0][i] == buf[1][i];
        zero &= buf[0][i] == 0;
    }
    if (same || zero)
        fail("bytes not random", same);
    c4_puts("vrng: ok\n");
    c4_exit(0);
}

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    (void)info;
    if (cpu != 0)
        c4_halt();
    virtio_pci_probe();
    c4_enter_user(run, 0, user_stack + sizeof user_stack);
}
