/* See irq.h. xAPIC at 0xfee00000, I/O APIC at 0xfec00000 (the MADT's and KVM's defaults). */
#include "irq.h"

#define LAPIC 0xfee00000ul
#define IOAPIC 0xfec00000ul
#define VEC_DEVICE 0x30
#define VEC_TIMER 0x31
#define VEC_SPURIOUS 0xff

struct gate {
    u16 off_lo, sel;
    u8 ist, attr;
    u16 off_mid;
    u32 off_hi, zero;
} __attribute__((packed));

static struct gate idt[256] __attribute__((aligned(16)));
static struct vdev *irq_dev;
static volatile u64 irq_count, timer_fired;

static inline void lapic_w(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }
static inline u32 lapic_r(u32 reg) { return *(volatile u32 *)(LAPIC + reg); }
static void ioapic_w(u32 reg, u32 v)
{
    *(volatile u32 *)IOAPIC = reg;
    *(volatile u32 *)(IOAPIC + 0x10) = v;
}

/* The handlers proper, called from the stubs below with the caller-saved registers saved. */
void virtio_irq_device(void);
void virtio_irq_timer(void);
void virtio_irq_device(void)
{
    struct vdev *d = irq_dev;
    if (d) {
        if (d->pci) {
            (void)d->isr[0]; /* reading clears the ISR and lowers INTx */
        } else {
            u32 isr = *(volatile u32 *)(d->base + 0x60);
            *(volatile u32 *)(d->base + 0x64) = isr;
        }
    }
    irq_count++;
    lapic_w(0xb0, 0); /* EOI */
}
void virtio_irq_timer(void)
{
    timer_fired = 1;
    lapic_w(0xb0, 0);
}

#define STUB(name, fn)                                                                      \
    __asm__(".text\n.globl " #name "\n" #name ":\n"                                         \
            "push %rax\npush %rcx\npush %rdx\npush %rsi\npush %rdi\n"                       \
            "push %r8\npush %r9\npush %r10\npush %r11\ncld\ncall " #fn "\n"                 \
            "pop %r11\npop %r10\npop %r9\npop %r8\npop %rdi\npop %rsi\npop %rdx\n"          \
            "pop %rcx\npop %rax\niretq\n")
STUB(virtio_irq_device_stub, virtio_irq_device);
STUB(virtio_irq_timer_stub, virtio_irq_timer);
__asm__(".text\n.globl virtio_irq_spurious_stub\nvirtio_irq_spurious_stub:\niretq\n");
void virtio_irq_device_stub(void);
void virtio_irq_timer_stub(void);
void virtio_irq_spurious_stub(void);

/* An exception (vectors 0-19) ends the guest with a line naming it rather than a silent triple
 * fault: `virtio irq: exception V at RIP`, exit 9. */
void virtio_irq_exception(u64 vec, const u64 *frame);
void virtio_irq_exception(u64 vec, const u64 *frame)
{
    /* Vectors 8, 10-14 and 17 push an error code before RIP. */
    int err = vec == 8 || (vec >= 10 && vec <= 14) || vec == 17;
    c4_puts("virtio irq: exception ");
    c4_put_dec(vec);
    c4_puts(" at ");
    c4_put_hex(frame[err]);
    c4_putc('\n');
    c4_exit(9);
}
#define EXC(n) \
    __asm__(".text\nvirtio_exc" #n ":\nmov $" #n ", %rdi\nmov %rsp, %rsi\nand $-16, %rsp\n" \
            "call virtio_irq_exception\n")
EXC(0); EXC(1); EXC(2); EXC(3); EXC(4); EXC(5); EXC(6); EXC(7); EXC(8); EXC(9);
EXC(10); EXC(11); EXC(12); EXC(13); EXC(14); EXC(15); EXC(16); EXC(17); EXC(18); EXC(19);
extern char virtio_exc0[], virtio_exc1[], virtio_exc2[], virtio_exc3[], virtio_exc4[],
    virtio_exc5[], virtio_exc6[], virtio_exc7[], virtio_exc8[], virtio_exc9[], virtio_exc10[],
    virtio_exc11[], virtio_exc12[], virtio_exc13[], virtio_exc14[], virtio_exc15[],
    virtio_exc16[], virtio_exc17[], virtio_exc18[], virtio_exc19[];

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }

static void set_gate(int v, void (*fn)(void))
{
    u64 a = (u64)fn;
    idt[v] = (struct gate){(u16)a, 0x08, 0, 0x8e, (u16)(a >> 16), (u32)(a >> 32), 0};
}

void virtio_irq_init(struct vdev *d)
{
    irq_dev = d;
    set_gate(VEC_DEVICE, virtio_irq_device_stub);
    set_gate(VEC_TIMER, virtio_irq_timer_stub);
    set_gate(VEC_SPURIOUS, virtio_irq_spurious_stub);
    char *exc[] = {virtio_exc0,  virtio_exc1,  virtio_exc2,  virtio_exc3,  virtio_exc4,
                   virtio_exc5,  virtio_exc6,  virtio_exc7,  virtio_exc8,  virtio_exc9,
                   virtio_exc10, virtio_exc11, virtio_exc12, virtio_exc13, virtio_exc14,
                   virtio_exc15, virtio_exc16, virtio_exc17, virtio_exc18, virtio_exc19};
    for (int i = 0; i < 20; i++)
        set_gate(i, (void (*)(void))exc[i]);
    /* The 8259s see the same lines (KVM raises a GSI on both) and, never programmed, would
     * deliver IRQ n as vector n through LINT0: mask them, and LINT0 too. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    lapic_w(0x350, 1u << 16);
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) idtr = {sizeof idt - 1, (u64)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr));
    lapic_w(0xf0, 0x100 | VEC_SPURIOUS); /* software enable */
    lapic_w(0x80, 0);                    /* task priority: take everything */
    u32 id = lapic_r(0x20) >> 24;
    /* Level-triggered for PCI INTx, edge for virtio-mmio; active high, fixed, physical. */
    u32 lo = VEC_DEVICE | (d->pci ? (1u << 15) : 0);
    ioapic_w(0x11 + 2 * d->gsi, id << 24);
    ioapic_w(0x10 + 2 * d->gsi, lo);
}

int virtio_irq_init_msix(struct vdev *d)
{
    virtio_irq_init(d);
    return virtio_pci_msix(d, VEC_DEVICE, lapic_r(0x20) >> 24);
}

u64 virtio_irq_count(void) { return irq_count; }

int virtio_irq_wait(u64 seen, u32 timeout_ms)
{
    timer_fired = 0;
    lapic_w(0x3e0, 0xb);                          /* divide by 1 */
    lapic_w(0x320, VEC_TIMER);                    /* one-shot */
    /* KVM's APIC timer counts at 1 GHz; a count of at most 4e9 is ~4 s, so long waits chain. */
    u64 left = (u64)timeout_ms * 1000000ul;
    for (;;) {
        u32 chunk = left > 0xf0000000ul ? 0xf0000000u : (u32)left;
        timer_fired = 0;
        lapic_w(0x380, chunk ? chunk : 1);
        for (;;) {
            __asm__ volatile("cli");
            if (irq_count > seen) {
                lapic_w(0x380, 0); /* stop the timer */
                return 1;
            }
            if (timer_fired)
                break;
            /* STI's one-instruction shadow: an interrupt pending now still wakes the HLT. */
            __asm__ volatile("sti; hlt; cli" ::: "memory");
        }
        left -= chunk;
        if (!left)
            return 0;
    }
}

long virtio_transfer_irq(struct vdev *d, u32 qi, const struct vbuf *bufs, u32 n, u32 timeout_ms)
{
    u64 seen = irq_count;
    int head = virtio_offer(d, qi, bufs, n);
    if (head < 0)
        return -1;
    u32 id, len;
    /* The used ring is looked at only after an interrupt: every completion raises one (no
     * event index, interrupts not suppressed), so each request costs at least one. */
    for (;;) {
        if (!virtio_irq_wait(seen, timeout_ms))
            return -1;
        seen = irq_count;
        if (virtio_poll_used(d, qi, &id, &len))
            return (id == (u32)head) ? (long)len : -2;
    }
}
