# The virtio test guests (build/vblk.elf, vrng.elf, vnet.elf): `make -C guests -f virtio.mk`.
# Reuses the main Makefile's flags, runtime and rules; only adds the virtio driver library.
include Makefile

VGUESTS := vblk vrng vnet vvsock vballoon vblkloop
.DEFAULT_GOAL := virtio

virtio: $(VGUESTS:%=$(B)/%.elf)

VLIB := $(B)/virtio/virtio.o $(B)/virtio/irq.o

$(B)/virtio/%.o: virtio/%.c virtio/virtio.h virtio/irq.h include/c4.h | $(B)/virtio
	$(CC) $(CFLAGS) -c $< -o $@

$(VGUESTS:%=$(B)/%.o): $(B)/%.o: %.c virtio/virtio.h virtio/irq.h include/c4.h | $(B)
	$(CC) $(CFLAGS) -I. -c $< -o $@

$(VGUESTS:%=$(B)/%.elf): $(B)/%.elf: $(B)/%.o $(VLIB) $(RT) link.ld
	$(LD) $(LDFLAGS) -o $@ $< $(VLIB) $(RT)

$(B)/virtio:
	mkdir -p $@

.PHONY: virtio
