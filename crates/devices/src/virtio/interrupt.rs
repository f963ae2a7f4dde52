//! The interrupt state one virtio device shares with its transport: the ISR bits the driver
//! reads and acknowledges, the line to raise, and the needs-reset flag a failing worker sets.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use crate::IrqLine;

/// ISR bit: a used ring changed.
pub const INT_VRING: u32 = 1;
/// ISR bit: the config space changed.
pub const INT_CONFIG: u32 = 2;

/// Message-signalled interrupts that replace the line while the driver has them enabled
/// (virtio-pci MSI-X, `pci_msix::Msix`). Each returns false when they are off.
pub trait MessageInterrupts: Send + Sync {
    /// A used ring changed (which one, the device did not say).
    fn used(&self) -> bool;
    /// Queue `queue`'s used ring changed.
    fn used_queue(&self, _queue: usize) -> bool {
        self.used()
    }
    /// The config space changed.
    fn config(&self) -> bool;
}

pub struct Interrupt {
    messages: Option<Arc<dyn MessageInterrupts>>,
    /// Level-triggered (PCI INTx: asserted until the driver reads the ISR) or edge.
    level: bool,
    isr: AtomicU32,
    needs_reset: AtomicBool,
    config_generation: AtomicU32,
    line: Arc<dyn IrqLine>,
}

impl Interrupt {
    /// An edge-triggered interrupt (virtio-mmio).
    pub fn new(line: Arc<dyn IrqLine>) -> Self {
        Self::with_mode(line, false)
    }

    /// A level-triggered interrupt (virtio-pci INTx): asserted while any ISR bit is set.
    pub fn new_level(line: Arc<dyn IrqLine>) -> Self {
        Self::with_mode(line, true)
    }

    fn with_mode(line: Arc<dyn IrqLine>, level: bool) -> Self {
        Self {
            messages: None,
            level,
            isr: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            config_generation: AtomicU32::new(0),
            line,
        }
    }

    /// Sends through `messages` whenever the driver enabled them (the ISR is then unused).
    pub fn with_messages(mut self, messages: Arc<dyn MessageInterrupts>) -> Self {
        self.messages = Some(messages);
        self
    }

    /// A used ring was updated (and the driver wants to hear about it).
    pub fn signal_used(&self) {
        if self.messages.as_ref().is_some_and(|m| m.used()) {
            return;
        }
        self.isr.fetch_or(INT_VRING, Ordering::SeqCst);
        self.raise();
    }

    /// Queue `queue`'s used ring was updated: with per-queue MSI-X vectors only that queue's
    /// fires (a driver counts a vector that fires with nothing new as spurious).
    pub fn signal_used_queue(&self, queue: usize) {
        if self.messages.as_ref().is_some_and(|m| m.used_queue(queue)) {
            return;
        }
        self.isr.fetch_or(INT_VRING, Ordering::SeqCst);
        self.raise();
    }

    /// The device's config space changed.
    pub fn signal_config(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        if self.messages.as_ref().is_some_and(|m| m.config()) {
            return;
        }
        self.isr.fetch_or(INT_CONFIG, Ordering::SeqCst);
        self.raise();
    }

    fn raise(&self) {
        if self.level {
            self.line.set_level(true);
        } else {
            self.line.trigger();
        }
    }

    /// Reads and clears the ISR (virtio-pci semantics), deasserting the line.
    pub fn read_and_clear(&self) -> u32 {
        let v = self.isr.swap(0, Ordering::SeqCst);
        self.line.set_level(false);
        v
    }

    /// The device hit something it cannot continue from: the driver must reset it.
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config();
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    pub fn isr(&self) -> u32 {
        self.isr.load(Ordering::SeqCst)
    }

    /// The driver acknowledged the bits in `mask`.
    pub fn ack(&self, mask: u32) {
        let left = self.isr.fetch_and(!mask, Ordering::SeqCst) & !mask;
        if left == 0 {
            self.line.set_level(false);
        }
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// Clears everything on a device reset.
    pub fn reset(&self) {
        self.isr.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
        self.line.set_level(false);
    }
}

impl Interrupt {
    /// Puts back saved interrupt state (snapshot restore); a level-triggered line with bits
    /// pending is asserted again, as it was when the state was saved.
    pub fn restore(&self, isr: u32, config_generation: u32, needs_reset: bool) {
        self.isr.store(isr, Ordering::SeqCst);
        self.config_generation
            .store(config_generation, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
        if self.level && isr != 0 {
            self.line.set_level(true);
        }
    }
}
