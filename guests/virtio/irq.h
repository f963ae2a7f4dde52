/* Interrupt-driven completion for the virtio test guests (ring 0 only): an IDT, the local
 * APIC and one I/O APIC redirection entry route the device's GSI to a handler that
 * acknowledges the device (ISR) and counts; virtio_irq_wait HLTs until it fires, with a
 * local-APIC-timer timeout. MMIO devices are edge-triggered, PCI INTx level-triggered
 * (the ISR read deasserts the line before the EOI). */
#ifndef C4_VIRTIO_IRQ_H
#define C4_VIRTIO_IRQ_H

#include "virtio.h"

/* Routes `d`'s interrupt (d->gsi) to this vCPU; call after virtio_init, with IF=0. */
void virtio_irq_init(struct vdev *d);
/* As virtio_irq_init, then switches a PCI device to MSI-X aimed at this vCPU's local APIC
 * (the I/O APIC entry stays but INTx no longer fires). Returns 0, or -1 (no MSI-X). */
int virtio_irq_init_msix(struct vdev *d);
/* Interrupts taken so far. */
u64 virtio_irq_count(void);
/* Waits (STI; HLT) until the interrupt count exceeds `seen` or `timeout_ms` pass.
 * Returns 1 if an interrupt came, 0 on timeout. Leaves IF=0. */
int virtio_irq_wait(u64 seen, u32 timeout_ms);
/* Offers a chain, notifies, HLTs until the used-ring interrupt and only then reads the used
 * ring; returns the used length, -1 if no interrupt came in time, -2 if another chain came
 * back. */
long virtio_transfer_irq(struct vdev *d, u32 q, const struct vbuf *bufs, u32 n, u32 timeout_ms);

#endif
