/* A minimal virtio-mmio (version 2) driver library for the corefour test guests: find a
 * device, negotiate VERSION_1, set up split queues in static memory, submit chains and poll the
 * used ring (no interrupts needed). Runs in ring 0 or ring 3 (all access is MMIO and memory).
 * Device windows: VIRTIO.md. */
#ifndef C4_VIRTIO_H
#define C4_VIRTIO_H

#include "c4.h"

#define VIRTIO_MMIO_BASE 0xd1000000ul
#define VIRTIO_MMIO_STRIDE 0x1000ul
#define VIRTIO_MMIO_SLOTS 8
/* The IOAPIC pin of mmio window i: crates/vmm/src/virtio_devices.rs VIRTIO_GSIS (5..22 without
 * the platform's 8, 9 and 12). */
u32 virtio_mmio_gsi(int slot);

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_BALLOON 5
#define VIRTIO_ID_VSOCK 19

#define VQ_SIZE 16
#define VQ_MAX 3

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

struct vring_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct vring_used_elem {
    u32 id;
    u32 len;
};

struct vq {
    struct vring_desc desc[VQ_SIZE] __attribute__((aligned(16)));
    struct {
        u16 flags;
        u16 idx;
        u16 ring[VQ_SIZE];
        u16 used_event;
    } avail __attribute__((aligned(2)));
    struct {
        u16 flags;
        u16 idx;
        struct vring_used_elem ring[VQ_SIZE];
        u16 avail_event;
    } used __attribute__((aligned(4)));
    u16 next_desc;
    u16 last_used;
};

struct vdev {
    volatile u8 *base; /* virtio-mmio window, or the PCI BAR */
    int pci;
    volatile u8 *common, *isr, *devcfg, *notify; /* PCI regions inside the BAR */
    u32 notify_mult;
    u32 device_id;
    u32 nqueues;
    u32 slot; /* PCI device number (pci) */
    u32 gsi; /* its interrupt line: virtio_mmio_gsi(window) (mmio), the interrupt-line register (pci) */
    struct vq *q[VQ_MAX];
};

/* Enumerates PCI bus 0 through ports 0xcf8/0xcfc and remembers the virtio functions (BAR and
 * capability offsets). Ring 0 only (IN/OUT); call it from c4_main before c4_enter_user. With
 * no PCI host bridge it finds nothing and virtio_init falls back to virtio-mmio. */
void virtio_pci_probe(void);

/* Moves the BAR of the first probed PCI function of `device_id` to `bar` (config writes to
 * 0x10/0x14, as an OS reassigning resources does); call before virtio_init. Returns 0, or -1
 * if there is no such function. */
int virtio_pci_move_bar(u32 device_id, u64 bar);

/* Switches a PCI device (after virtio_init) to MSI-X: table entry 0 sends `vector` to the
 * local APIC `apic_id`, every queue uses entry 0, config changes none; MSI-X enabled in
 * message control (INTx then stays quiet). Returns 0, or -1 without an MSI-X capability. */
int virtio_pci_msix(struct vdev *d, u32 vector, u32 apic_id);

/* Finds the first device of `device_id` (a probed PCI function first, then the virtio-mmio
 * windows) and brings it to DRIVER_OK with `nqueues` queues.
 * Returns 0, or a negative step number on failure (printed by the caller). */
int virtio_init(struct vdev *d, u32 device_id, u32 nqueues);

/* One buffer of a chain. */
struct vbuf {
    void *addr;
    u32 len;
    int device_writes;
};

/* Puts a chain on queue `q`, notifies, and polls until the device returns it (or `spins` run
 * out: then returns -1). Returns the used length. */
long virtio_transfer(struct vdev *d, u32 q, const struct vbuf *bufs, u32 n, u64 spins);

/* Offers a chain without waiting; virtio_poll_used collects completions. */
int virtio_offer(struct vdev *d, u32 q, const struct vbuf *bufs, u32 n);
/* Returns 1 and fills id/len if the device returned a chain on `q`, else 0. */
int virtio_poll_used(struct vdev *d, u32 q, u32 *id, u32 *len);

/* Config space access (device-specific fields at offset 0x100). */
u8 virtio_config8(struct vdev *d, u32 off);
u32 virtio_config32(struct vdev *d, u32 off);
void virtio_config_write32(struct vdev *d, u32 off, u32 v);
u32 virtio_status(struct vdev *d);

void put_hex_bytes(const u8 *p, u32 n);

#endif
