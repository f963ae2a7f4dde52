//! What every virtio transport shares. Locking: the registers live behind one mutex per
//! device; queue notifications do not take it (the queue eventfds are fixed at construction),
//! so a vCPU kicking a queue never waits on another vCPU's config access. Lock order:
//! transport registers, then the device's own locks.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::state::{QueueSnap, StateError, TransportSnap};
use super::worker::Worker;
use super::{features, status, ActivateError, Activation, Interrupt, VirtioDevice};

/// Inactive until the driver sets DRIVER_OK; activated devices own a worker thread.
pub(crate) enum DeviceState {
    Inactive,
    Activated(Worker),
}

pub(crate) struct Registers {
    pub(crate) device: Box<dyn VirtioDevice>,
    pub(crate) features_sel: u32,
    pub(crate) acked_features_sel: u32,
    pub(crate) acked_features: u64,
    pub(crate) queue_sel: u32,
    pub(crate) status: u32,
    pub(crate) queues: Vec<Queue>,
    pub(crate) state: DeviceState,
}

/// The transport-independent half of a virtio transport: the device status state machine,
/// feature negotiation, queue setup, activation and reset. MMIO and PCI decode their own
/// register layouts onto it.
pub(crate) struct Core {
    regs: Mutex<Registers>,
    /// One per queue; written on QueueNotify unless KVM already did it (ioeventfd).
    queue_events: Vec<Arc<EventFd>>,
    interrupt: Arc<Interrupt>,
    mem: GuestMemoryMmap,
    name: String,
}

impl Core {
    /// `mem` is kept only to hand to the device at activation.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
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
            interrupt: Arc::new(interrupt),
            mem,
            name,
        })
    }

    /// One eventfd per queue (what an ioeventfd would signal).
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

    pub(crate) fn needs_reset_bit(&self) -> u32 {
        if self.interrupt.needs_reset() {
            status::DEVICE_NEEDS_RESET
        } else {
            0
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Registers> {
        // A panic while holding this lock is a bug in this file; the registers stay usable.
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn activate(&self, r: &mut Registers) -> Result<(), ActivateError> {
        let mut queues = Vec::new();
        let mut events = Vec::new();
        // Queues are handed over as a prefix of the ready ones: a device with optional queues
        // (balloon stats) accepts fewer, and says so in its own activate.
        for (i, q) in r.queues.iter().enumerate() {
            if !q.ready() {
                break;
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
        if r.queues.iter().skip(queues.len()).any(|q| q.ready()) {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: r.queues.len(),
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

    pub(crate) fn reset(&self, r: &mut Registers) {
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

    pub(crate) fn set_status(&self, r: &mut Registers, v: u32) {
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

    pub(crate) fn selected_queue<'a>(&self, r: &'a mut Registers) -> Option<&'a mut Queue> {
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

impl Core {
    /// Device features as offered (device bits plus the common ones).
    pub(crate) fn offered_features(r: &Registers) -> u64 {
        r.device.features() | features::COMMON
    }

    /// A driver write of 32 feature bits at the selected window; ignored after FEATURES_OK.
    pub(crate) fn write_driver_features(r: &mut Registers, v: u32) {
        if r.status & status::FEATURES_OK != 0 {
            return;
        }
        match r.acked_features_sel {
            0 => r.acked_features = (r.acked_features & !0xffff_ffff) | u64::from(v),
            1 => r.acked_features = (r.acked_features & 0xffff_ffff) | (u64::from(v) << 32),
            _ => {}
        }
    }

    /// Signals queue `q` (a driver notification).
    pub(crate) fn notify(&self, q: u32) {
        if let Some(ev) = self.queue_events.get(q as usize) {
            let _ = ev.write(1);
        }
    }
}

/// Snapshots: taking the state parks a running device (see `Worker::park`) until
/// `resume_saved` lets it go on; restoring puts the state into a fresh, inactive transport and
/// restarts the device at the saved ring positions.
impl Core {
    pub(crate) fn save(&self) -> Result<TransportSnap, StateError> {
        let r = self.lock();
        let (activated, queues) = match &r.state {
            DeviceState::Activated(worker) => {
                let live = worker.park()?;
                // Queues the device was not given (a balloon without stats) keep their setup.
                let mut qs: Vec<QueueSnap> = r.queues.iter().map(QueueSnap::of).collect();
                for (slot, q) in qs.iter_mut().zip(live) {
                    *slot = q;
                }
                (true, qs)
            }
            DeviceState::Inactive => (false, r.queues.iter().map(QueueSnap::of).collect()),
        };
        Ok(TransportSnap {
            device_type: r.device.device_type(),
            status: r.status,
            features_sel: r.features_sel,
            acked_features_sel: r.acked_features_sel,
            acked_features: r.acked_features,
            queue_sel: r.queue_sel,
            isr: self.interrupt.isr(),
            config_generation: self.interrupt.config_generation(),
            needs_reset: self.interrupt.needs_reset(),
            activated,
            queues,
            device: r.device.save_device(),
            pci: None,
        })
    }

    /// Lets a device parked by `save` run again.
    pub(crate) fn resume_saved(&self) {
        if let DeviceState::Activated(worker) = &self.lock().state {
            worker.unpark();
        }
    }

    pub(crate) fn restore(&self, s: &TransportSnap) -> Result<(), StateError> {
        let mut r = self.lock();
        let found = r.device.device_type();
        if s.device_type != found {
            return Err(StateError::DeviceType {
                saved: s.device_type,
                found,
            });
        }
        if matches!(r.state, DeviceState::Activated(_)) {
            return Err(StateError::Mismatch(
                "the device is already running; state goes into a new device only".into(),
            ));
        }
        let max = r.device.queue_max_sizes().to_vec();
        if s.queues.len() != max.len() {
            return Err(StateError::QueueCount {
                saved: s.queues.len(),
                found: max.len(),
            });
        }
        let offered = Self::offered_features(&r);
        if s.acked_features & !offered != 0 {
            return Err(StateError::Mismatch(format!(
                "the driver had accepted features {:#x} this device does not offer",
                s.acked_features & !offered
            )));
        }
        let queues = s
            .queues
            .iter()
            .zip(&max)
            .enumerate()
            .map(|(i, (q, &m))| q.to_queue(i, m))
            .collect::<Result<Vec<_>, _>>()?;
        r.device.restore_device(&s.device)?;
        r.queues = queues;
        r.status = s.status;
        r.features_sel = s.features_sel;
        r.acked_features_sel = s.acked_features_sel;
        r.acked_features = s.acked_features;
        r.queue_sel = s.queue_sel;
        self.interrupt
            .restore(s.isr, s.config_generation, s.needs_reset);
        if s.activated {
            self.activate(&mut r)?;
            // Entries the driver added while the device was parked (or throttled) are
            // picked up now; an extra kick is harmless.
            for ev in &self.queue_events {
                let _ = ev.write(1);
            }
        }
        Ok(())
    }
}
