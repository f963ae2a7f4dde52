/* virtio-net test guest (run with `corefour vmm --net TAP`, the tap bridged to a test host at
 * 10.77.0.1/24): as 10.77.0.2 it ARPs for the host (`VNET arp <host mac>`), pings it
 * (`VNET ping reply from 10.77.0.1`) and exits 0; 1 on failure or when nothing answers. It
 * answers ARP requests for its own address meanwhile. `irq=1`: runs in ring 0 and HLTs for
 * the device's interrupt instead of polling (TX completions and received frames), printing
 * `VNET irqs=N` before it exits. */
#include "c4.h"
#include "virtio/irq.h"
#include "virtio/virtio.h"

#define HDR 12
#define FRAME 1536
#define RXBUFS 8
#define ROUNDS 40
#define WAIT_SPINS 20000000ul

static u8 user_stack[16384] __attribute__((aligned(16)));
static u8 rx[RXBUFS][FRAME] __attribute__((aligned(64)));
static u8 tx[FRAME] __attribute__((aligned(64)));
static u8 mac[6], host_mac[6];
static const u8 my_ip[4] = {10, 77, 0, 2}, host_ip[4] = {10, 77, 0, 1};
static struct vdev d;
static int use_irq;

static void fail(const char *what, long v)
{
    c4_puts("vnet: FAIL ");
    c4_puts(what);
    c4_puts(" ");
    c4_put_hex((u64)v);
    c4_putc('\n');
    c4_exit(1);
}

static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static int eq(const u8 *a, const u8 *b, u32 n)
{
    for (u32 i = 0; i < n; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}
static void cpy(u8 *a, const u8 *b, u32 n)
{
    for (u32 i = 0; i < n; i++)
        a[i] = b[i];
}
static u16 csum(const u8 *p, u32 n)
{
    u32 s = 0;
    for (u32 i = 0; i + 1 < n; i += 2)
        s += get16(p + i);
    if (n & 1)
        s += (u32)p[n - 1] << 8;
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (u16)~s;
}

static void send(u32 len)
{
    for (int i = 0; i < HDR; i++)
        tx[i] = 0;
    struct vbuf b = {tx, HDR + len, 0};
    long r = use_irq ? virtio_transfer_irq(&d, 1, &b, 1, 5000) : virtio_transfer(&d, 1, &b, 1, 2000000000ul);
    if (r < 0)
        fail("tx not completed", 0);
}

static void send_arp(u16 op, const u8 *dst_mac, const u8 *tha, const u8 *tpa)
{
    u8 *f = tx + HDR;
    cpy(f, dst_mac, 6);
    cpy(f + 6, mac, 6);
    put16(f + 12, 0x0806);
    u8 *a = f + 14;
    put16(a, 1);
    put16(a + 2, 0x0800);
    a[4] = 6;
    a[5] = 4;
    put16(a + 6, op);
    cpy(a + 8, mac, 6);
    cpy(a + 14, my_ip, 4);
    cpy(a + 18, tha, 6);
    cpy(a + 24, tpa, 4);
    send(14 + 28);
}

static void send_ping(void)
{
    u8 *f = tx + HDR;
    const char *msg = "corefour-vnet-ping";
    u32 plen = 18;
    cpy(f, host_mac, 6);
    cpy(f + 6, mac, 6);
    put16(f + 12, 0x0800);
    u8 *ip = f + 14;
    for (int i = 0; i < 20; i++)
        ip[i] = 0;
    ip[0] = 0x45;
    put16(ip + 2, (u16)(20 + 8 + plen));
    put16(ip + 4, 1);
    ip[8] = 64;
    ip[9] = 1;
    cpy(ip + 12, my_ip, 4);
    cpy(ip + 16, host_ip, 4);
    put16(ip + 10, csum(ip, 20));
    u8 *ic = ip + 20;
    ic[0] = 8;
    ic[1] = 0;
    put16(ic + 2, 0);
    put16(ic + 4, 0xc4c4);
    put16(ic + 6, 1);
    cpy(ic + 8, (const u8 *)msg, plen);
    put16(ic + 2, csum(ic, 8 + plen));
    send(14 + 20 + 8 + plen);
}

/* Which RX buffer each descriptor slot holds (heads are reused as the ring wraps). */
static u32 owner[VQ_SIZE];

static void post_rx(u32 i)
{
    struct vbuf b = {rx[i], FRAME, 1};
    int head = virtio_offer(&d, 0, &b, 1);
    if (head < 0)
        fail("rx offer", i);
    owner[head % VQ_SIZE] = i;
}

/* Waits for a frame that `want` accepts: 1 = ARP reply from the host, 2 = echo reply. */
static int wait_for(int want)
{
    /* With interrupts: at most 20 waits of 50 ms for frames, then the caller resends. */
    u64 limit = use_irq ? 20 : WAIT_SPINS;
    for (u64 spin = 0; spin < limit; spin++) {
        u32 id, len;
        u64 seen = use_irq ? virtio_irq_count() : 0;
        if (!virtio_poll_used(&d, 0, &id, &len)) {
            if (use_irq)
                virtio_irq_wait(seen, 50);
            else
                __asm__ volatile("pause");
            continue;
        }
        u32 slot = owner[id % VQ_SIZE];
        u8 *f = rx[slot] + HDR;
        int hit = 0;
        if (len >= HDR + 14 + 28 && get16(f + 12) == 0x0806) {
            u8 *a = f + 14;
            u16 op = get16(a + 6);
            if (op == 2 && eq(a + 14, host_ip, 4) && want == 1) {
                cpy(host_mac, a + 8, 6);
                hit = 1;
            } else if (op == 1 && eq(a + 24, my_ip, 4)) {
                u8 sha[6], spa[4];
                cpy(sha, a + 8, 6);
                cpy(spa, a + 14, 4);
                send_arp(2, sha, sha, spa);
            }
        } else if (len >= HDR + 14 + 28 && get16(f + 12) == 0x0800 && want == 2) {
            u8 *ip = f + 14;
            u8 *ic = ip + (ip[0] & 15) * 4;
            if (ip[9] == 1 && eq(ip + 12, host_ip, 4) && ic[0] == 0 && get16(ic + 4) == 0xc4c4)
                hit = 1;
        }
        post_rx(slot);
        if (hit)
            return 1;
    }
    return 0;
}

static void run(void *arg)
{
    (void)arg;
    int r = virtio_init(&d, VIRTIO_ID_NET, 2);
    if (r < 0)
        fail("init step", r);
    if (use_irq)
        virtio_irq_init(&d);
    for (int i = 0; i < 6; i++)
        mac[i] = virtio_config8(&d, (u32)i);
    c4_puts("VNET mac ");
    put_hex_bytes(mac, 6);
    c4_putc('\n');
    for (u32 i = 0; i < RXBUFS; i++)
        post_rx(i);
    static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, none[6] = {0};
    int ok = 0;
    for (int i = 0; i < ROUNDS && !ok; i++) {
        send_arp(1, bcast, none, host_ip);
        ok = wait_for(1);
    }
    if (!ok)
        fail("no ARP reply from 10.77.0.1", 0);
    c4_puts("VNET arp ");
    put_hex_bytes(host_mac, 6);
    c4_putc('\n');
    ok = 0;
    for (int i = 0; i < ROUNDS && !ok; i++) {
        send_ping();
        ok = wait_for(2);
    }
    if (!ok)
        fail("no echo reply from 10.77.0.1", 0);
    c4_puts("VNET ping reply from 10.77.0.1\n");
    if (use_irq) {
        c4_puts("VNET irqs=");
        c4_put_dec(virtio_irq_count());
        c4_putc('\n');
    }
    c4_exit(0);
}

void c4_main(const struct c4_boot_info *info, u32 cpu)
{
    if (cpu != 0)
        c4_halt();
    virtio_pci_probe();
    if (c4_cmdline_u64(info, "irq", 0) == 1) {
        use_irq = 1;
        run(0);
    }
    c4_enter_user(run, 0, user_stack + sizeof user_stack);
}
