//! Saved state of a virtio device and its transport, for snapshots and live migration.
//!
//! What is saved is what the driver cannot re-derive: the transport registers (status,
//! negotiated features, selectors, interrupt status, config generation, PCI config), each
//! queue's setup and ring positions (`next_avail`, `next_used`), and the few device fields that
//! are not rebuilt from the VM config (a net device's generated MAC, the balloon's sizes).
//! Requests are never in flight in a saved state: the device worker is parked between two
//! queue passes first (`Worker::park`), and every request a device takes is completed before
//! that pass returns (blk I/O is synchronous on the worker), so the used ring in guest memory
//! and `next_used` agree.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use super::ActivateError;

/// Why saved device state could not be taken or put back.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("saved state is for device type {saved}, this slot holds type {found}")]
    DeviceType { saved: u32, found: u32 },
    #[error("saved state has {saved} queues, the device has {found}")]
    QueueCount { saved: usize, found: usize },
    #[error("queue {index}: {reason}")]
    Queue { index: usize, reason: String },
    #[error("{0}")]
    Mismatch(String),
    #[error("saved state is for a {saved} transport, this device sits on {found}")]
    Transport {
        saved: &'static str,
        found: &'static str,
    },
    #[error("cannot restart the device: {0}")]
    Activate(#[from] ActivateError),
    #[error("the device worker did not stop within {0} ms (is it stuck on host I/O?)")]
    ParkTimeout(u64),
    #[error("the device worker has exited")]
    WorkerGone,
}

/// One queue: a serde mirror of virtio-queue's `QueueState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnap {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub event_idx: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

impl From<QueueState> for QueueSnap {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            event_idx: s.event_idx_enabled,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
        }
    }
}

impl QueueSnap {
    pub fn of(q: &Queue) -> Self {
        q.state().into()
    }

    /// Rebuilds the queue; virtio-queue checks size (power of two, within max) and alignment.
    /// A queue whose max size differs from the device's own is refused: the saved state
    /// belongs to another device model.
    pub fn to_queue(&self, index: usize, device_max: u16) -> Result<Queue, StateError> {
        if self.max_size != device_max {
            return Err(StateError::Queue {
                index,
                reason: format!(
                    "saved max size {} differs from the device's {device_max}",
                    self.max_size
                ),
            });
        }
        let state = QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state).map_err(|e| StateError::Queue {
            index,
            reason: e.to_string(),
        })
    }
}

/// What each device model keeps beyond its queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DeviceSnap {
    /// The capacity the guest saw: a disk that changed size since is refused on restore.
    Block {
        sectors: u64,
        read_only: bool,
    },
    /// The MAC the guest knows (generated ones too) and the tap it was attached to.
    Net {
        mac: [u8; 6],
        tap: String,
    },
    Rng,
    Vsock {
        cid: u64,
    },
    Balloon {
        target_pages: u32,
        actual_pages: u32,
    },
}

impl DeviceSnap {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Block { .. } => "blk",
            Self::Net { .. } => "net",
            Self::Rng => "rng",
            Self::Vsock { .. } => "vsock",
            Self::Balloon { .. } => "balloon",
        }
    }
}

/// PCI function state beyond the common virtio registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciSnap {
    /// The command register (memory decoding, INTx disable).
    pub command: u16,
    /// Where the guest put the BAR.
    pub bar: u64,
    pub interrupt_line: u8,
    pub device_feature_select: u32,
    /// The MSI-X table, pending bits and vector assignment (absent: no MSI-X, or a snapshot
    /// from before MSI-X existed).
    #[serde(default)]
    pub msix: Option<super::pci_msix::MsixSnap>,
}

/// A virtio device with its transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnap {
    pub device_type: u32,
    pub status: u32,
    pub features_sel: u32,
    pub acked_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub isr: u32,
    pub config_generation: u32,
    pub needs_reset: bool,
    /// Whether the device was running (DRIVER_OK and activated): restore restarts it.
    pub activated: bool,
    /// Live ring positions when activated, the driver's setup otherwise.
    pub queues: Vec<QueueSnap>,
    pub device: DeviceSnap,
    /// Present for virtio-pci, absent for virtio-mmio.
    #[serde(default)]
    pub pci: Option<PciSnap>,
}

/// A transport whose device can be saved and restored (virtio-mmio and virtio-pci).
pub trait SaveRestore: Send + Sync {
    /// Parks the device (it stays parked until `resume_saved`) and returns its state.
    fn save_state(&self) -> Result<TransportSnap, StateError>;
    /// Lets a device parked by `save_state` run on.
    fn resume_saved(&self);
    /// Loads saved state into this freshly built, never-started transport and restarts the
    /// device where it stopped.
    fn restore_state(&self, saved: &TransportSnap) -> Result<(), StateError>;
}

impl TransportSnap {
    /// Guest ranges a running device writes besides its buffers: each ready queue's used
    /// ring (with `avail_event`), as (address, length).
    pub fn used_rings(&self) -> Vec<(u64, u64)> {
        self.queues
            .iter()
            .filter(|q| q.ready)
            .map(|q| (q.used_ring, 6 + 8 * u64::from(q.size)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;

    #[test]
    fn queue_round_trips_and_bad_sizes_are_refused() {
        let mut q = Queue::new(256).unwrap();
        q.set_size(128);
        q.set_desc_table_address(Some(0x1000), None);
        q.set_avail_ring_address(Some(0x2000), None);
        q.set_used_ring_address(Some(0x3000), None);
        q.set_ready(true);
        q.set_next_avail(77);
        q.set_next_used(75);
        let s = QueueSnap::of(&q);
        let json = serde_json::to_string(&s).unwrap();
        let back: QueueSnap = serde_json::from_str(&json).unwrap();
        let q2 = back.to_queue(0, 256).unwrap();
        assert_eq!(q2.next_avail(), 77);
        assert_eq!(q2.next_used(), 75);
        assert_eq!(q2.size(), 128);
        assert!(q2.ready());
        assert!(matches!(
            back.to_queue(0, 64),
            Err(StateError::Queue { .. })
        ));
        let bad = QueueSnap { size: 100, ..back };
        assert!(bad.to_queue(0, 256).is_err(), "size must be a power of two");
        let unaligned = QueueSnap {
            used_ring: 0x3001,
            ..back
        };
        assert!(unaligned.to_queue(0, 256).is_err());
    }

    #[test]
    fn device_state_is_tagged() {
        let d = DeviceSnap::Balloon {
            target_pages: 5,
            actual_pages: 3,
        };
        let j = serde_json::to_string(&d).unwrap();
        assert!(j.contains("\"kind\":\"balloon\""), "{j}");
        assert_eq!(serde_json::from_str::<DeviceSnap>(&j).unwrap(), d);
        assert!(serde_json::from_str::<DeviceSnap>("{\"kind\":\"floppy\"}").is_err());
    }
}
