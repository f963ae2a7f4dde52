/* virtio-balloon test guest (run with `corefour vmm --balloon MIB`): touches `touch=` MiB
 * (default 24) of free RAM, then gives the balloon's target number of those pages back to the
 * host on the inflate queue, reports the new size in `actual`, prints
 * `VBALLOON target=<pages> inflated=<pages>` and exits 0 (1 on failure). */
#include "c4.h"
#include "virtio/virtio.h"

#define CHUNK 256

static u8 user_stack[16384] __attribute__((aligned(16)));
static u32 pfns[CHUNK] __attribute__((aligned(64)));
static struct vdev d;
static const struct c4_boot_info *boot;

static void fail(const char *what, long v)
{
    c4_puts("vballoon: FAIL ");
    c4_puts(what);
    c4_puts(" ");
    c4_put_hex((u64)v);
    c4_putc('\n');
    c4_exit(1);
}

static void run(void *arg)
{
    (void)arg;
    int r = virtio_init(&d, VIRTIO_ID_BALLOON, 2);
    if (r < 0)
        fail("init step", r);
    u64 touch = c4_cmdline_u64(boot, "touch", 24) << 20;
    u64 start = (boot->free_start + 0x1fffff) & ~0x1ffffful;
    if (start + touch > boot->low_mem_end)
        fail("not enough RAM to touch, have", (long)(boot->low_mem_end - start));
    for (u64 a = start; a < start + touch; a += 4096)
        *(volatile u64 *)a = a ^ 0x5a5a5a5a5a5a5a5aul;
    u32 target = virtio_config32(&d, 0);
    if ((u64)target * 4096 > touch)
        fail("target larger than the touched area, pages", target);
    u32 done = 0;
    while (done < target) {
        u32 n = target - done < CHUNK ? target - done : CHUNK;
        for (u32 i = 0; i < n; i++)
            pfns[i] = (u32)((start >> 12) + done + i);
        struct vbuf b = {pfns, n * 4, 0};
        if (virtio_transfer(&d, 0, &b, 1, 2000000000ul) < 0)
            fail("inflate not completed at page", done);
        done += n;
    }
    virtio_config_write32(&d, 4, done);
    c4_puts("VBALLOON target=");
    c4_put_dec(target);
    c4_puts(" inflated=");
    c4_put_dec(done);
    c4_putc('\n');
    c4_exit(0);
}

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    if (cpu != 0)
        c4_halt();
    boot = info;
    virtio_pci_probe();
    c4_enter_user(run, 0, user_stack + sizeof user_stack);
}
