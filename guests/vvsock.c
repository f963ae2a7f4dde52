/* virtio-vsock test guest (run with `corefour vmm --vsock CID,UDS`):
 * 1. connects to host port 5000 (the host listens on UDS_5000), sends "hello from guest\n",
 *    prints what comes back as `VSOCK from host: <text>`, and closes;
 * 2. prints `VSOCK listening 1234`, accepts the host's connection to port 1234 (the host wrote
 *    "CONNECT 1234\n" to UDS), prints `VSOCK got: <text>`, answers "pong\n", and exits 0 when the
 *    host closes. Failures print `vvsock: FAIL ...` and exit 1. */
#include "c4.h"
#include "virtio/virtio.h"

#define HDR 44
#define BUF 1024
#define RXBUFS 8
#define SPINS 3000000000ul
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7

struct pkt {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

static u8 user_stack[16384] __attribute__((aligned(16)));
static u8 rx[RXBUFS][BUF] __attribute__((aligned(64)));
static u8 tx[BUF] __attribute__((aligned(64)));
static u32 owner[VQ_SIZE];
static struct vdev d;
static u64 cid;
static u32 fwd_cnt; /* bytes we consumed, per connection (one at a time here) */

static void fail(const char *what, long v)
{
    c4_puts("vvsock: FAIL ");
    c4_puts(what);
    c4_puts(" ");
    c4_put_hex((u64)v);
    c4_putc('\n');
    c4_exit(1);
}

static void post_rx(u32 i)
{
    struct vbuf b = {rx[i], BUF, 1};
    int head = virtio_offer(&d, 0, &b, 1);
    if (head < 0)
        fail("rx offer", i);
    owner[head % VQ_SIZE] = i;
}

static void send(u16 op, u32 src_port, u32 dst_port, u32 flags, const char *data)
{
    struct pkt *p = (struct pkt *)tx;
    u32 n = 0;
    while (data && data[n])
        n++;
    p->src_cid = cid;
    p->dst_cid = 2;
    p->src_port = src_port;
    p->dst_port = dst_port;
    p->len = n;
    p->type = 1;
    p->op = op;
    p->flags = flags;
    p->buf_alloc = 65536;
    p->fwd_cnt = fwd_cnt;
    for (u32 i = 0; i < n; i++)
        tx[HDR + i] = (u8)data[i];
    struct vbuf b = {tx, HDR + n, 0};
    if (virtio_transfer(&d, 1, &b, 1, SPINS) < 0)
        fail("tx not completed, op", op);
}

/* Waits for the next packet; copies its payload (NUL-terminated) to `text`. */
static struct pkt recv(char *text, u32 max)
{
    for (u64 spin = 0; spin < SPINS; spin++) {
        u32 id, len;
        if (!virtio_poll_used(&d, 0, &id, &len)) {
            __asm__ volatile("pause");
            continue;
        }
        u32 slot = owner[id % VQ_SIZE];
        struct pkt p = *(struct pkt *)rx[slot];
        u32 n = p.len;
        if (n > len - HDR)
            n = len - HDR;
        if (n > max - 1)
            n = max - 1;
        for (u32 i = 0; i < n; i++)
            text[i] = (char)rx[slot][HDR + i];
        text[n] = 0;
        post_rx(slot);
        if (p.op == OP_RW)
            fwd_cnt += p.len;
        if (p.op == OP_CREDIT_REQUEST)
            send(OP_CREDIT_UPDATE, p.dst_port, p.src_port, 0, 0);
        if (p.op == OP_CREDIT_UPDATE || p.op == OP_CREDIT_REQUEST)
            continue;
        return p;
    }
    fail("no packet", 0);
    for (;;)
        ;
}

static void run(void *arg)
{
    (void)arg;
    char text[256];
    int r = virtio_init(&d, VIRTIO_ID_VSOCK, 3);
    if (r < 0)
        fail("init step", r);
    cid = 0;
    for (int i = 7; i >= 0; i--)
        cid = (cid << 8) | virtio_config8(&d, (u32)i);
    c4_puts("VSOCK cid ");
    c4_put_dec(cid);
    c4_putc('\n');
    for (u32 i = 0; i < RXBUFS; i++)
        post_rx(i);

    /* 1: guest -> host port 5000. */
    fwd_cnt = 0;
    send(OP_REQUEST, 1000, 5000, 0, 0);
    struct pkt p = recv(text, sizeof text);
    if (p.op != OP_RESPONSE || p.src_port != 5000 || p.dst_port != 1000)
        fail("no RESPONSE from port 5000, op", p.op);
    send(OP_RW, 1000, 5000, 0, "hello from guest\n");
    p = recv(text, sizeof text);
    if (p.op != OP_RW)
        fail("expected data, op", p.op);
    c4_puts("VSOCK from host: ");
    c4_puts(text);
    send(OP_SHUTDOWN, 1000, 5000, 3, 0);

    /* 2: host -> guest port 1234. */
    c4_puts("VSOCK listening 1234\n");
    fwd_cnt = 0;
    for (;;) {
        p = recv(text, sizeof text);
        if (p.op == OP_REQUEST && p.dst_port == 1234)
            break;
        /* Leftovers of connection 1 (RST/SHUTDOWN from the host side) are ignored. */
    }
    u32 host_port = p.src_port;
    send(OP_RESPONSE, 1234, host_port, 0, 0);
    p = recv(text, sizeof text);
    if (p.op != OP_RW)
        fail("expected data on 1234, op", p.op);
    c4_puts("VSOCK got: ");
    c4_puts(text);
    send(OP_RW, 1234, host_port, 0, "pong\n");
    for (;;) {
        p = recv(text, sizeof text);
        if (p.op == OP_SHUTDOWN || p.op == OP_RST)
            break;
    }
    send(OP_RST, 1234, host_port, 0, 0);
    c4_puts("vvsock: ok\n");
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
