//! Virtio devices and their transports.
//!
//! A device (`blk`, `net`, `rng`, `vsock`, `balloon`) implements [`VirtioDevice`]: it describes
//! itself (type, features, queue sizes, config space) and, when the driver sets DRIVER_OK, turns
//! into a [`QueueHandler`] that a [`worker`] thread drives from queue notifications and the
//! device's own file descriptors. A transport owns the guest-visible registers: `mmio`
//! (virtio-mmio v2) or `pci` (modern virtio-pci behind a host bridge); both drive the same
//! status machine in `transport`. `driver` is a driver written in host code, for tests, fuzz
//! targets and `corefour bench io`.
//!
//! Guest memory and queues reach a device only at activation (the `activate` arguments), so an
//! inactive device has nothing it could touch.
//!
//! Error policy: a malformed request (bad chain, address outside guest memory, wrong direction)
//! is answered with the device's error status (blk) or dropped (net, vsock) and processing goes
//! on; a broken queue (avail index running ahead of the ring) sets DEVICE_NEEDS_RESET and stops
//! the device until the driver resets it. Nothing a guest writes can panic or hang the VMM.

pub mod balloon;
pub mod blk;
mod blk_batch;
pub mod blk_dirty;
pub mod blk_map;
pub mod chain;
pub mod dirty;
pub mod driver;
pub mod interrupt;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod pci_msix;
pub mod rate_limiter;
pub mod ring;
pub mod rng;
pub mod state;
pub mod tap;
mod transport;
pub mod vsock;
pub mod worker;

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

pub use interrupt::Interrupt;
pub use mmio::MmioTransport;
pub use virtio_queue::Queue;
pub use vm_memory::GuestMemoryMmap;

/// Device IDs (virtio spec 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const RNG: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;
}

/// Feature bits common to all devices.
pub mod features {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
    /// What every device of ours offers on top of its own bits.
    pub const COMMON: u64 = VERSION_1 | RING_EVENT_IDX | RING_INDIRECT_DESC;
}

/// Device status bits (virtio spec 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not valid for this guest memory (rings outside memory or misaligned)")]
    InvalidQueue(usize),
    #[error("the driver enabled {got} queues, the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("device backend failed at activation: {0}")]
    Backend(#[source] std::io::Error),
    #[error("cannot start the device worker thread: {0}")]
    Worker(#[source] std::io::Error),
}

/// A fatal error while running: the device stops and reports DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("queue {queue}: {source}")]
    Queue {
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("device backend I/O failed: {0}")]
    Backend(#[source] std::io::Error),
}

/// Everything a device receives when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<Interrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Device-specific feature bits; `features::COMMON` is added by the transport.
    fn features(&self) -> u64;
    /// The device's config space as it reads now.
    fn config(&self) -> Vec<u8>;
    /// A driver write into config space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Hands memory and queues to the device; returns what the worker thread runs.
    fn activate(&mut self, activation: Activation) -> Result<Box<dyn QueueHandler>, ActivateError>;
    /// Called after the worker stopped on a driver reset, before queues are cleared.
    fn reset(&mut self) {}
    /// The device fields a snapshot keeps (see [`state`]).
    fn save_device(&self) -> state::DeviceSnap;
    /// Puts saved fields back before the device is restarted; refuses state that does not
    /// fit this device (another model, a disk that changed size).
    fn restore_device(&mut self, saved: &state::DeviceSnap) -> Result<(), state::StateError>;
}

/// The running half of a device, driven by a [`worker::Worker`] thread.
pub trait QueueHandler: Send {
    /// File descriptors to watch besides the queue notifications: (fd, token). Tokens must be
    /// below [`worker::RESERVED_TOKENS`]. They are edge-triggered: a handler reads until
    /// EAGAIN, or remembers that it stopped early (no guest buffers) and resumes when the
    /// driver notifies the queue.
    fn fds(&self) -> Vec<(RawFd, u64)> {
        Vec::new()
    }
    /// The driver notified queue `queue`.
    fn queue_notified(&mut self, queue: usize, poller: &worker::Poller) -> Result<(), DeviceError>;
    /// The live state of every queue the handler was given, in queue order (for snapshots;
    /// called only while the worker is parked between passes).
    fn queue_states(&self) -> Vec<state::QueueSnap>;
    /// Finishes every request the handler has in flight (an asynchronous backend's), so that
    /// [`QueueHandler::queue_states`] that follows accounts for all it took from the queues.
    /// Called by the worker before it parks.
    fn quiesce(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    /// A watched fd became ready.
    fn fd_ready(
        &mut self,
        _token: u64,
        _events: u32,
        _poller: &worker::Poller,
    ) -> Result<(), DeviceError> {
        Ok(())
    }
    /// For devices worth polling (blk): a queue the driver added entries to that the handler
    /// has not looked at yet. The worker checks this for a short while after each burst of
    /// work instead of sleeping straight away.
    fn pending_queue(&self) -> Option<usize> {
        None
    }
    /// Requests of this device are in flight outside the worker (an io_uring engine's disk
    /// I/O): their completions are due soon, so the worker polls longer before it sleeps.
    fn awaiting_completions(&self) -> bool {
        false
    }
    /// Called before the worker sleeps: a handler that turned driver notifications off while
    /// it worked or polled turns them back on. Returns true when work arrived meanwhile; the
    /// worker then polls instead of sleeping (a notification for it may never come).
    fn before_sleep(&mut self) -> bool {
        false
    }
    /// How long until the handler wants `timer` called (rate limiter refills).
    fn next_timer(&self) -> Option<Duration> {
        None
    }
    fn timer(&mut self, _poller: &worker::Poller) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// Reads `data.len()` bytes of `config` at `offset`; bytes past its end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let end = config.len().min(start.saturating_add(data.len()));
    data[..end - start].copy_from_slice(&config[start..end]);
}
