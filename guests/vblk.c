/* virtio-blk test guest (run with `corefour vmm --disk FILE`): prints sector 0's first 16
 * bytes as `SECTOR0 <hex>`, writes ASCII `COREFOUR` at the start of sector 1 (keeping the rest
 * of the sector), flushes, and exits 0. Any failure prints `vblk: FAIL ...` and exits 1.
 * Runs in ring 3, where kvm_pvm executes guest code natively, polling the used ring.
 * `irq=1` (command line): stays in ring 0 and waits for each completion with HLT until the
 * device's used-ring interrupt arrives (5 s timeout each, then FAIL); prints `irqs=N`.
 * `irq=2`: the same through MSI-X (PCI only; FAIL on virtio-mmio).
 * `movebar=1`: moves the PCI function's BAR 8 MiB up in the window before using it. */
#include "c4.h"
#include "virtio/irq.h"
#include "virtio/virtio.h"

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define SPINS 2000000000ul

static u8 user_stack[16384] __attribute__((aligned(16)));
static struct {
    u32 type;
    u32 reserved;
    u64 sector;
} hdr;
static u8 sector[512] __attribute__((aligned(512)));
static volatile u8 status;
static int use_irq;

static void fail(const char *what, long v)
{
    c4_puts("vblk: FAIL ");
    c4_puts(what);
    c4_puts(" ");
    c4_put_hex((u64)v);
    c4_putc('\n');
    c4_exit(1);
}

static void request(struct vdev *d, u32 type, u64 sec, int with_data)
{
    hdr.type = type;
    hdr.sector = sec;
    status = 0xff;
    struct vbuf b[3];
    u32 n = 0;
    b[n++] = (struct vbuf){&hdr, sizeof hdr, 0};
    if (with_data)
        b[n++] = (struct vbuf){sector, sizeof sector, type == T_IN};
    b[n++] = (struct vbuf){(void *)&status, 1, 1};
    long r = use_irq ? virtio_transfer_irq(d, 0, b, n, 5000) : virtio_transfer(d, 0, b, n, SPINS);
    if (r < 0)
        fail("no completion, type", type);
    if (status != 0)
        fail("status for type", type);
}

static void run(void *arg)
{
    (void)arg;
    struct vdev d;
    int r = virtio_init(&d, VIRTIO_ID_BLOCK, 1);
    if (r < 0)
        fail("init step", r);
    if (use_irq == 2) {
        if (virtio_irq_init_msix(&d) < 0)
            fail("no MSI-X on this transport, pci", d.pci);
    } else if (use_irq) {
        virtio_irq_init(&d);
    }
    u64 capacity = 0;
    for (int i = 7; i >= 0; i--)
        capacity = (capacity << 8) | virtio_config8(&d, (u32)i);
    if (capacity < 2)
        fail("disk too small, sectors", (long)capacity);
    request(&d, T_IN, 0, 1);
    c4_puts("SECTOR0 ");
    put_hex_bytes(sector, 16);
    c4_putc('\n');
    request(&d, T_IN, 1, 1);
    const char *tag = "COREFOUR";
    for (int i = 0; i < 8; i++)
        sector[i] = (u8)tag[i];
    request(&d, T_OUT, 1, 1);
    request(&d, T_FLUSH, 0, 0);
    c4_puts("vblk: ok sectors=");
    c4_put_dec(capacity);
    c4_puts(d.pci ? " transport=pci" : " transport=mmio");
    if (use_irq == 2)
        c4_puts(" msix=1");
    if (use_irq) {
        c4_puts(" irqs=");
        c4_put_dec(virtio_irq_count());
    }
    c4_putc('\n');
    c4_exit(0);
}

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    if (cpu != 0)
        c4_halt();
    virtio_pci_probe();
    if (c4_cmdline_u64(info, "movebar", 0) == 1) {
        /* The window is 0xe0000000 + 16 MiB; functions sit at its start. */
        if (virtio_pci_move_bar(VIRTIO_ID_BLOCK, 0xe0800000ul) < 0)
            fail("cannot move the BAR", 0);
        c4_puts("vblk: BAR moved\n");
    }
    u64 irq = c4_cmdline_u64(info, "irq", 0);
    if (irq == 1 || irq == 2) {
        use_irq = (int)irq;
        run(0);
    }
    c4_enter_user(run, 0, user_stack + sizeof user_stack);
}
