/* virtio-blk load for snapshot, restore and migration tests (`corefour vmm --disk FILE`, at
 * least 65 sectors): iteration N writes sector 1 + N % 64 with pattern(N) (bytes 0..8 = N,
 * byte j = N + j after), reads it back, reads the previous iteration's sector back too, checks
 * both and prints `count=N`, forever. A copy restored from a snapshot must go on with no gap
 * and find on disk what the iterations before the snapshot wrote; any difference prints
 * `vblkloop: FAIL ...` and exits 1. `spin=N` idle loop iterations between lines. `stride=K`
 * spreads the 64 sectors K sectors apart (sector 1 + (N % 64) * K; the disk then needs at
 * least 64 * K + 1 sectors), so the writes land in many 64 KiB chunks of the disk. With `rng=1`
 * each iteration also reads 16 bytes from a virtio-rng (`--rng`). Ring 3. */
#include "c4.h"
#include "virtio/virtio.h"

#define T_IN 0
#define T_OUT 1
#define SPINS 2000000000ul
#define RING 64

static u8 user_stack[16384] __attribute__((aligned(16)));
static struct {
    u32 type;
    u32 reserved;
    u64 sector;
} hdr;
static u8 sector[512] __attribute__((aligned(512)));
/* The previous sector is read back into a page only the device writes: a diff snapshot or a
 * migration that misses device writes leaves it stale, and the next iteration sees that. */
static u8 check[4096] __attribute__((aligned(4096)));
static volatile u8 status;
static volatile u64 count;
static u64 spin, use_rng, stride;
static u8 entropy[16];

static void fail(const char *what, u64 v)
{
    c4_puts("vblkloop: FAIL ");
    c4_puts(what);
    c4_puts(" ");
    c4_put_dec(v);
    c4_putc('\n');
    c4_exit(1);
}

static void request(struct vdev *d, u32 type, u64 sec, u8 *buf)
{
    hdr.type = type;
    hdr.sector = sec;
    status = 0xff;
    struct vbuf b[3] = {
        {&hdr, sizeof hdr, 0},
        {buf, 512, type == T_IN},
        {(void *)&status, 1, 1},
    };
    if (virtio_transfer(d, 0, b, 3, SPINS) < 0)
        fail("no completion at count", count);
    if (status != 0)
        fail("bad status at count", count);
}

static void fill(u64 n)
{
    for (int j = 0; j < 8; j++)
        sector[j] = (u8)(n >> (8 * j));
    for (int j = 8; j < 512; j++)
        sector[j] = (u8)(n + (u64)j);
}

static int holds(const u8 *buf, u64 n)
{
    for (int j = 0; j < 8; j++)
        if (buf[j] != (u8)(n >> (8 * j)))
            return 0;
    for (int j = 8; j < 512; j++)
        if (buf[j] != (u8)(n + (u64)j))
            return 0;
    return 1;
}

static void run(void *arg)
{
    (void)arg;
    struct vdev d;
    int r = virtio_init(&d, VIRTIO_ID_BLOCK, 1);
    if (r < 0)
        fail("init step", (u64)-r);
    u64 capacity = 0;
    for (int i = 7; i >= 0; i--)
        capacity = (capacity << 8) | virtio_config8(&d, (u32)i);
    if (capacity < RING * stride + 1)
        fail("disk too small, sectors", capacity);
    struct vdev rng;
    if (use_rng && (r = virtio_init(&rng, VIRTIO_ID_RNG, 1)) < 0)
        fail("rng init step", (u64)-r);
    c4_puts("vblkloop: start\n");
    for (;;) {
        for (u64 i = 0; i < spin; i++)
            __asm__ volatile("" ::: "memory");
        u64 n = count;
        if (n > 1 && !holds(check, n - 2))
            fail("device-written memory lost at count", n);
        fill(n);
        request(&d, T_OUT, 1 + (n % RING) * stride, sector);
        request(&d, T_IN, 1 + (n % RING) * stride, sector);
        if (!holds(sector, n))
            fail("read back differs at count", n);
        if (n > 0) {
            request(&d, T_IN, 1 + ((n - 1) % RING) * stride, check);
            if (!holds(check, n - 1))
                fail("previous sector lost at count", n);
        }
        if (use_rng) {
            struct vbuf b = {entropy, sizeof entropy, 1};
            if (virtio_transfer(&rng, 0, &b, 1, SPINS) != (long)sizeof entropy)
                fail("short rng read at count", n);
        }
        c4_puts("count=");
        c4_put_dec(n);
        c4_putc('\n');
        count = n + 1;
    }
}

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    if (cpu != 0)
        c4_halt();
    spin = c4_cmdline_u64(info, "spin", 1ul << 20);
    use_rng = c4_cmdline_u64(info, "rng", 0);
    stride = c4_cmdline_u64(info, "stride", 1);
    if (stride == 0)
        stride = 1;
    virtio_pci_probe();
    c4_enter_user(run, 0, user_stack + sizeof user_stack);
}
