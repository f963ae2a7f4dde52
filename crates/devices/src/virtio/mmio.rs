//! virtio-mmio transport, version 2 (virtio spec 4.2.2), as Firecracker exposes it: Linux finds
//! a device from `virtio_mmio.device=<size>@<base>:<irq>` on its command line.
//!
//! Locking: the registers live behind one mutex per device; QueueNotify does not take it (the
//! queue eventfds are fixed at construction), so a vCPU kicking a queue never waits on another
//! vCPU's config access. Lock order: transport state, then the device's own locks.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::worker::Worker;
use super::{
    features, read_config_bytes, status, ActivateError, Activation, Interrupt, VirtioDevice,
};
use crate::{BusDevice, IrqLine};

/// Size of one device's register window; `virtio_mmio.device=4K@...`.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of QueueNotify: where an ioeventfd goes (datamatch = queue index).
pub const NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR_ID: u32 = 0x4346_3443; // "C4FC"-ish, any value is allowed

/// Inactive until the driver sets DRIVER_OK; activated devices own a worker thread.
enum DeviceState {
    Inactive,
    Activated(Worker),
}

struct Registers {
    device: Box<dyn VirtioDevice>,
    features_sel: u32,
    acked_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    queues: Vec<Queue>,
    state: DeviceState,
}

pub struct MmioTransport {
    regs: Mutex<Registers>,
    /// One per queue; written on QueueNotify unless KVM already did it (ioeventfd).
    queue_events: Vec<Arc<EventFd>>,
    interrupt: Arc<Interrupt>,
    mem: GuestMemoryMmap,
    name: String,
}

impl MmioTransport {
    /// `mem` is kept only to hand to the device at activation.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<dyn IrqLine>,
    ) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
            })?);
            queue_events.push(Arc::new(EventFd::new(libc::EFD_NONBLOCK)?));
        }
        let name = format!("virtio-{}", device_name(device.device_type()));
        Ok(Self {
            regs: Mutex::new(Registers {
                device,
                features_sel: 0,
                acked_features_sel: 0,
                acked_features: 0,
                queue_sel: 0,
                status: 0,
                queues,
                state: DeviceState::Inactive,
            }),
            queue_events,
            interrupt: Arc::new(Interrupt::new(irq)),
            mem,
            name,
        })
    }

    /// The eventfds to register as ioeventfds at `base + NOTIFY_OFFSET`, datamatch = index.
    pub fn queue_events(&self) -> &[Arc<EventFd>] {
        &self.queue_events
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// True once the driver set DRIVER_OK and the device runs.
    pub fn is_activated(&self) -> bool {
        matches!(self.lock().state, DeviceState::Activated(_))
    }

    /// The status register as the driver sees it.
    pub fn status(&self) -> u32 {
        let r = self.lock();
        r.status | self.needs_reset_bit()
    }

    fn needs_reset_bit(&self) -> u32 {
        if self.interrupt.needs_reset() {
            status::DEVICE_NEEDS_RESET
        } else {
            0
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registers> {
        // A panic while holding this lock is a bug in this file; the registers stay usable.
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn activate(&self, r: &mut Registers) -> Result<(), ActivateError> {
        let mut queues = Vec::new();
        let mut events = Vec::new();
        for (i, q) in r.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&self.mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
            // Queue is not Clone; its state round-trips through the validated QueueState.
            let mut q = Queue::try_from(q.state()).map_err(|_| ActivateError::InvalidQueue(i))?;
            q.set_event_idx(r.acked_features & features::RING_EVENT_IDX != 0);
            queues.push(q);
            events.push(self.queue_events[i].clone());
        }
        let want = r.queues.len();
        if queues.len() != want {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want,
            });
        }
        let handler = r.device.activate(Activation {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: r.acked_features,
        })?;
        let worker = Worker::spawn(&self.name, handler, events, self.interrupt.clone())
            .map_err(ActivateError::Worker)?;
        r.state = DeviceState::Activated(worker);
        Ok(())
    }

    fn reset(&self, r: &mut Registers) {
        if let DeviceState::Activated(worker) =
            std::mem::replace(&mut r.state, DeviceState::Inactive)
        {
            worker.stop();
        }
        r.device.reset();
        for q in &mut r.queues {
            q.reset();
        }
        r.status = 0;
        r.acked_features = 0;
        r.features_sel = 0;
        r.acked_features_sel = 0;
        r.queue_sel = 0;
        self.interrupt.reset();
        for ev in &self.queue_events {
            let _ = ev.read();
        }
    }

    fn set_status(&self, r: &mut Registers, v: u32) {
        if v == 0 {
            self.reset(r);
            return;
        }
        // The driver may only add bits (spec 2.1.2); anything else is ignored.
        if v & r.status != r.status {
            return;
        }
        let new = v & !r.status;
        if new & status::FEATURES_OK != 0 {
            let offered = r.device.features() | features::COMMON;
            if r.acked_features & !offered != 0 || r.acked_features & features::VERSION_1 == 0 {
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                r.status = v & !status::FEATURES_OK;
                return;
            }
        }
        r.status = v;
        if new & status::DRIVER_OK != 0 && matches!(r.state, DeviceState::Inactive) {
            if let Err(e) = self.activate(r) {
                tracing::warn!("{}: activation failed: {e}", self.name);
                r.status |= status::FAILED;
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn selected_queue<'a>(&self, r: &'a mut Registers) -> Option<&'a mut Queue> {
        // Queue registers only take effect before the device runs (spec 4.2.2.3).
        if matches!(r.state, DeviceState::Activated(_)) {
            return None;
        }
        let sel = r.queue_sel as usize;
        r.queues.get_mut(sel)
    }
}

fn device_name(ty: u32) -> &'static str {
    use super::device_type::*;
    match ty {
        NET => "net",
        BLOCK => "blk",
        RNG => "rng",
        BALLOON => "balloon",
        VSOCK => "vsock",
        _ => "dev",
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
                let f = r.device.features() | features::COMMON;
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
            0x60 => self.interrupt.isr(),
            0x70 => r.status | self.needs_reset_bit(),
            0xfc => self.interrupt.config_generation(),
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
            if let Some(ev) = self.queue_events.get(v as usize) {
                let _ = ev.write(1);
            }
            return;
        }
        let mut r = self.lock();
        match offset {
            0x14 => r.features_sel = v,
            // Features are frozen once FEATURES_OK is set.
            0x20 if r.status & status::FEATURES_OK == 0 => match r.acked_features_sel {
                0 => r.acked_features = (r.acked_features & !0xffff_ffff) | u64::from(v),
                1 => r.acked_features = (r.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
                _ => {}
            },
            0x24 => r.acked_features_sel = v,
            0x30 => r.queue_sel = v,
            0x38 => {
                if let Some(q) = self.selected_queue(&mut r) {
                    // An invalid size is ignored (virtio-queue logs it); activation then
                    // validates the queue as a whole.
                    if let Ok(size) = u16::try_from(v) {
                        q.set_size(size);
                    }
                }
            }
            0x44 => {
                if let Some(q) = self.selected_queue(&mut r) {
                    q.set_ready(v == 1);
                }
            }
            0x64 => self.interrupt.ack(v),
            0x70 => self.set_status(&mut r, v),
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
        if let Some(q) = self.selected_queue(r) {
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
