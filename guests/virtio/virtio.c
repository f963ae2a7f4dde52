/* virtio-mmio v2 driver core for the test guests; see virtio.h. */
#include "virtio.h"

u32 virtio_mmio_gsi(int slot)
{
    static const u8 gsis[] = {5, 6, 7, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22};
    return slot >= 0 && slot < (int)sizeof(gsis) ? gsis[slot] : 0;
}

static struct vq queues[VIRTIO_MMIO_SLOTS][VQ_MAX] __attribute__((aligned(4096)));

static inline u32 rd(struct vdev *d, u32 off) { return *(volatile u32 *)(d->base + off); }
static inline void wr(struct vdev *d, u32 off, u32 v) { *(volatile u32 *)(d->base + off) = v; }
static inline void barrier(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

u32 virtio_status(struct vdev *d) { return d->pci ? d->common[0x14] : rd(d, 0x70); }

u8 virtio_config8(struct vdev *d, u32 off) { return d->pci ? d->devcfg[off] : d->base[0x100 + off]; }

static volatile u8 *config_base(struct vdev *d) { return d->pci ? d->devcfg : d->base + 0x100; }
u32 virtio_config32(struct vdev *d, u32 off) { return *(volatile u32 *)(config_base(d) + off); }
void virtio_config_write32(struct vdev *d, u32 off, u32 v) { *(volatile u32 *)(config_base(d) + off) = v; }

/* ---- PCI ---- */

struct pci_fn {
    u32 slot;
    u32 device_id;
    u64 bar;
    u32 common, isr, devcfg, notify, mult;
    u32 gsi;
};
static struct pci_fn pci_fns[VIRTIO_MMIO_SLOTS];
static u32 pci_count;

static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u32 inl(u16 port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static u32 cfg_read(u32 slot, u32 reg)
{
    outl(0xcf8, 0x80000000u | (slot << 11) | (reg & 0xfc));
    return inl(0xcfc);
}
static u8 cfg_read8(u32 slot, u32 reg) { return (u8)(cfg_read(slot, reg) >> ((reg & 3) * 8)); }
static void cfg_write(u32 slot, u32 reg, u32 v)
{
    outl(0xcf8, 0x80000000u | (slot << 11) | (reg & 0xfc));
    outl(0xcfc, v);
}

int virtio_pci_move_bar(u32 device_id, u64 bar)
{
    for (u32 i = 0; i < pci_count; i++) {
        struct pci_fn *f = &pci_fns[i];
        if (f->device_id != device_id)
            continue;
        u32 cmd = cfg_read(f->slot, 0x04);
        cfg_write(f->slot, 0x04, cmd & ~2u); /* memory decoding off while it moves */
        cfg_write(f->slot, 0x10, (u32)bar);
        cfg_write(f->slot, 0x14, (u32)(bar >> 32));
        cfg_write(f->slot, 0x04, cmd);
        f->bar = ((u64)cfg_read(f->slot, 0x14) << 32) | (cfg_read(f->slot, 0x10) & ~0xful);
        return f->bar == bar ? 0 : -1;
    }
    return -1;
}

int virtio_pci_msix(struct vdev *d, u32 vector, u32 apic_id)
{
    if (!d->pci)
        return -1;
    u32 at = cfg_read8(d->slot, 0x34);
    for (int guard = 0; at && guard < 48; guard++) {
        if (cfg_read8(d->slot, at) == 0x11)
            break;
        at = cfg_read8(d->slot, at + 1);
    }
    if (!at || cfg_read8(d->slot, at) != 0x11)
        return -1;
    u32 table = cfg_read(d->slot, at + 4);
    if (table & 7)
        return -1; /* BIR 0 only */
    volatile u32 *e = (volatile u32 *)(d->base + table);
    e[0] = 0xfee00000u | (apic_id << 12);
    e[1] = 0;
    e[2] = vector;
    e[3] = 0; /* unmasked */
    volatile u8 *c = d->common;
    *(volatile u16 *)(c + 0x10) = 0xffff; /* config changes: no vector */
    for (u32 i = 0; i < d->nqueues; i++) {
        *(volatile u16 *)(c + 0x16) = (u16)i;
        *(volatile u16 *)(c + 0x1a) = 0;
        if (*(volatile u16 *)(c + 0x1a) != 0)
            return -1;
    }
    u32 ctl = cfg_read(d->slot, at);
    cfg_write(d->slot, at, ctl | (1u << 31)); /* message control bit 15: enable */
    return 0;
}

void virtio_pci_probe(void)
{
    for (u32 slot = 0; slot < 32 && pci_count < VIRTIO_MMIO_SLOTS; slot++) {
        u32 id = cfg_read(slot, 0);
        if ((id & 0xffff) != 0x1af4 || (id >> 16) < 0x1040)
            continue;
        struct pci_fn *f = &pci_fns[pci_count];
        f->slot = slot;
        f->device_id = (id >> 16) - 0x1040;
        f->bar = ((u64)cfg_read(slot, 0x14) << 32) | (cfg_read(slot, 0x10) & ~0xful);
        f->common = f->isr = f->devcfg = f->notify = ~0u;
        f->gsi = cfg_read8(slot, 0x3c);
        u32 at = cfg_read8(slot, 0x34);
        for (int guard = 0; at && guard < 48; guard++) {
            if (cfg_read8(slot, at) == 0x09 && cfg_read8(slot, at + 4) == 0) {
                u32 off = cfg_read(slot, at + 8);
                switch (cfg_read8(slot, at + 3)) {
                case 1: f->common = off; break;
                case 2: f->notify = off; f->mult = cfg_read(slot, at + 16); break;
                case 3: f->isr = off; break;
                case 4: f->devcfg = off; break;
                }
            }
            at = cfg_read8(slot, at + 1);
        }
        if (f->common != ~0u && f->notify != ~0u && f->devcfg != ~0u && f->isr != ~0u)
            pci_count++;
    }
}

static int virtio_pci_init(struct vdev *d, const struct pci_fn *f, u32 nqueues, int index)
{
    volatile u8 *bar = (volatile u8 *)f->bar;
    d->pci = 1;
    d->base = bar;
    d->common = bar + f->common;
    d->isr = bar + f->isr;
    d->devcfg = bar + f->devcfg;
    d->notify = bar + f->notify;
    d->notify_mult = f->mult;
    d->device_id = f->device_id;
    d->nqueues = nqueues;
    d->gsi = f->gsi;
    d->slot = f->slot;
    volatile u8 *c = d->common;
    c[0x14] = 0;
    c[0x14] = 1;
    c[0x14] = 1 | 2;
    *(volatile u32 *)(c + 0x00) = 1;
    if (!(*(volatile u32 *)(c + 0x04) & 1))
        return -3;
    *(volatile u32 *)(c + 0x08) = 0;
    *(volatile u32 *)(c + 0x0c) = 0;
    *(volatile u32 *)(c + 0x08) = 1;
    *(volatile u32 *)(c + 0x0c) = 1;
    c[0x14] = 1 | 2 | 8;
    if (!(c[0x14] & 8))
        return -4;
    if (*(volatile u16 *)(c + 0x12) < nqueues)
        return -5;
    for (u32 i = 0; i < nqueues; i++) {
        struct vq *q = &queues[index][i];
        d->q[i] = q;
        *(volatile u16 *)(c + 0x16) = (u16)i;
        if (*(volatile u16 *)(c + 0x18) < VQ_SIZE)
            return -5;
        *(volatile u16 *)(c + 0x18) = VQ_SIZE;
        *(volatile u64 *)(c + 0x20) = (u64)&q->desc;
        *(volatile u64 *)(c + 0x28) = (u64)&q->avail;
        *(volatile u64 *)(c + 0x30) = (u64)&q->used;
        *(volatile u16 *)(c + 0x1c) = 1;
    }
    c[0x14] = 1 | 2 | 8 | 4;
    if (c[0x14] & (64 | 128))
        return -6;
    return 0;
}

/* ---- MMIO ---- */

int virtio_init(struct vdev *d, u32 device_id, u32 nqueues)
{
    if (nqueues > VQ_MAX)
        return -2;
    for (u32 i = 0; i < pci_count; i++)
        if (pci_fns[i].device_id == device_id)
            return virtio_pci_init(d, &pci_fns[i], nqueues, (int)i);
    d->pci = 0;
    int slot = -1;
    for (int i = 0; i < VIRTIO_MMIO_SLOTS; i++) {
        volatile u8 *b = (volatile u8 *)(VIRTIO_MMIO_BASE + (u64)i * VIRTIO_MMIO_STRIDE);
        if (*(volatile u32 *)b == 0x74726976 && *(volatile u32 *)(b + 4) == 2 &&
            *(volatile u32 *)(b + 8) == device_id) {
            slot = i;
            break;
        }
    }
    if (slot < 0)
        return -1;
    if (nqueues > VQ_MAX)
        return -2;
    d->base = (volatile u8 *)(VIRTIO_MMIO_BASE + (u64)slot * VIRTIO_MMIO_STRIDE);
    d->device_id = device_id;
    d->nqueues = nqueues;
    d->gsi = virtio_mmio_gsi(slot);
    wr(d, 0x70, 0);
    wr(d, 0x70, 1);
    wr(d, 0x70, 1 | 2);
    wr(d, 0x14, 1);
    if (!(rd(d, 0x10) & 1)) /* VERSION_1 is bit 32 */
        return -3;
    wr(d, 0x24, 0);
    wr(d, 0x20, 0);
    wr(d, 0x24, 1);
    wr(d, 0x20, 1);
    wr(d, 0x70, 1 | 2 | 8);
    if (!(rd(d, 0x70) & 8))
        return -4;
    for (u32 i = 0; i < nqueues; i++) {
        struct vq *q = &queues[slot][i];
        d->q[i] = q;
        wr(d, 0x30, i);
        if (rd(d, 0x34) < VQ_SIZE)
            return -5;
        wr(d, 0x38, VQ_SIZE);
        u64 desc = (u64)&q->desc, avail = (u64)&q->avail, used = (u64)&q->used;
        wr(d, 0x80, (u32)desc);
        wr(d, 0x84, (u32)(desc >> 32));
        wr(d, 0x90, (u32)avail);
        wr(d, 0x94, (u32)(avail >> 32));
        wr(d, 0xa0, (u32)used);
        wr(d, 0xa4, (u32)(used >> 32));
        wr(d, 0x44, 1);
    }
    wr(d, 0x70, 1 | 2 | 8 | 4);
    if (rd(d, 0x70) & (64 | 128))
        return -6;
    return 0;
}

int virtio_offer(struct vdev *d, u32 qi, const struct vbuf *bufs, u32 n)
{
    struct vq *q = d->q[qi];
    if (!n || n > VQ_SIZE)
        return -1;
    u16 head = q->next_desc;
    for (u32 i = 0; i < n; i++) {
        u16 at = (u16)((head + i) % VQ_SIZE);
        q->desc[at].addr = (u64)bufs[i].addr;
        q->desc[at].len = bufs[i].len;
        q->desc[at].flags = (u16)((bufs[i].device_writes ? VRING_DESC_F_WRITE : 0) |
                                  (i + 1 < n ? VRING_DESC_F_NEXT : 0));
        q->desc[at].next = (u16)((head + i + 1) % VQ_SIZE);
    }
    q->next_desc = (u16)((head + n) % VQ_SIZE);
    q->avail.ring[q->avail.idx % VQ_SIZE] = head;
    barrier();
    q->avail.idx++;
    barrier();
    if (d->pci)
        /* queue_notify_off is the queue index in this VMM; read it for other devices. */
        *(volatile u16 *)(d->notify + qi * d->notify_mult) = (u16)qi;
    else
        wr(d, 0x50, qi);
    return head;
}

int virtio_poll_used(struct vdev *d, u32 qi, u32 *id, u32 *len)
{
    struct vq *q = d->q[qi];
    barrier();
    if (*(volatile u16 *)&q->used.idx == q->last_used)
        return 0;
    barrier();
    struct vring_used_elem e = q->used.ring[q->last_used % VQ_SIZE];
    q->last_used++;
    *id = e.id;
    *len = e.len;
    return 1;
}

long virtio_transfer(struct vdev *d, u32 qi, const struct vbuf *bufs, u32 n, u64 spins)
{
    int head = virtio_offer(d, qi, bufs, n);
    if (head < 0)
        return -1;
    u32 id, len;
    for (u64 i = 0; i < spins; i++) {
        if (virtio_poll_used(d, qi, &id, &len))
            return (id == (u32)head) ? (long)len : -2;
        __asm__ volatile("pause");
    }
    return -1;
}

void put_hex_bytes(const u8 *p, u32 n)
{
    for (u32 i = 0; i < n; i++) {
        c4_putc("0123456789abcdef"[p[i] >> 4]);
        c4_putc("0123456789abcdef"[p[i] & 15]);
    }
}
