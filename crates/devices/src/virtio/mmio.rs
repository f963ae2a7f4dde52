//! virtio-mmio transport, version 2 (virtio spec 4.2.2), as Firecracker exposes it: Linux finds
//! a device from `virtio_mmio.device=<size>@<base>:<irq>` on its command line.
//! The status state machine and queue handling are shared with PCI (`transport.rs`).

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::state::{SaveRestore, StateError, TransportSnap};
use super::transport::{Core, Registers};
use super::{read_config_bytes, Interrupt, VirtioDevice};
use crate::{BusDevice, IrqLine};

/// Size of one device's register window; `virtio_mmio.device=4K@...`.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of QueueNotify: where an ioeventfd goes (datamatch = queue index).
pub const NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR_ID: u32 = 0x4346_3443; // "C4FC"-ish, any value is allowed

pub struct MmioTransport {
    core: Core,
}

impl MmioTransport {
    /// `mem` is kept only to hand to the device at activation.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<dyn IrqLine>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            core: Core::new(device, mem, Interrupt::new(irq))?,
        })
    }

    /// The eventfds to register as ioeventfds at `base + NOTIFY_OFFSET`, datamatch = index.
    pub fn queue_events(&self) -> &[Arc<EventFd>] {
        self.core.queue_events()
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        self.core.interrupt()
    }

    /// True once the driver set DRIVER_OK and the device runs.
    pub fn is_activated(&self) -> bool {
        self.core.is_activated()
    }

    /// The status register as the driver sees it.
    pub fn status(&self) -> u32 {
        self.core.status()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registers> {
        self.core.lock()
    }
}

impl BusDevice for MmioTransport {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            let r = self.lock();
            read_config_bytes(&r.device.config(), offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let r = self.lock();
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => r.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let f = Core::offered_features(&r);
                match r.features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => match r.queues.get(r.queue_sel as usize) {
                Some(q) => u32::from(q.max_size()),
                None => 0,
            },
            0x44 => match r.queues.get(r.queue_sel as usize) {
                Some(q) => u32::from(q.ready()),
                None => 0,
            },
            0x60 => self.core.interrupt().isr(),
            0x70 => r.status | self.core.needs_reset_bit(),
            0xfc => self.core.interrupt().config_generation(),
            0x80..=0xa4 => r
                .queues
                .get(r.queue_sel as usize)
                .map_or(0, |q| queue_addr_reg(q, offset)),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            let mut r = self.lock();
            // Config writes after DRIVER_OK are allowed (balloon `actual`).
            r.device.write_config(offset - 0x100, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        if offset == NOTIFY_OFFSET {
            self.core.notify(v);
            return;
        }
        let mut r = self.lock();
        match offset {
            0x14 => r.features_sel = v,
            0x20 => Core::write_driver_features(&mut r, v),
            0x24 => r.acked_features_sel = v,
            0x30 => r.queue_sel = v,
            0x38 => {
                if let Some(q) = self.core.selected_queue(&mut r) {
                    // An invalid size is ignored (virtio-queue logs it); activation then
                    // validates the queue as a whole.
                    if let Ok(size) = u16::try_from(v) {
                        q.set_size(size);
                    }
                }
            }
            0x44 => {
                if let Some(q) = self.core.selected_queue(&mut r) {
                    q.set_ready(v == 1);
                }
            }
            0x64 => self.core.interrupt().ack(v),
            0x70 => self.core.set_status(&mut r, v),
            0x80 => self.with_queue(&mut r, |q| q.set_desc_table_address(Some(v), None)),
            0x84 => self.with_queue(&mut r, |q| q.set_desc_table_address(None, Some(v))),
            0x90 => self.with_queue(&mut r, |q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self.with_queue(&mut r, |q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self.with_queue(&mut r, |q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self.with_queue(&mut r, |q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
    }
}

impl MmioTransport {
    fn with_queue(&self, r: &mut Registers, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.core.selected_queue(r) {
            f(q);
        }
    }
}

fn queue_addr_reg(q: &Queue, offset: u64) -> u32 {
    let a = match offset & !4 {
        0x80 => q.desc_table(),
        0x90 => q.avail_ring(),
        0xa0 => q.used_ring(),
        _ => return 0,
    };
    if offset & 4 == 0 {
        a as u32
    } else {
        (a >> 32) as u32
    }
}

impl SaveRestore for MmioTransport {
    fn save_state(&self) -> Result<TransportSnap, StateError> {
        self.core.save()
    }
    fn resume_saved(&self) {
        self.core.resume_saved();
    }
    fn restore_state(&self, saved: &TransportSnap) -> Result<(), StateError> {
        if saved.pci.is_some() {
            return Err(StateError::Transport {
                saved: "pci",
                found: "mmio",
            });
        }
        self.core.restore(saved)
    }
}
