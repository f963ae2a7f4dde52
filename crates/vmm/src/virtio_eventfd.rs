//! ioeventfd and irqfd wiring of the virtio devices, where the backend has them (KVM; the
//! software CPU emulates both). A queue notification then goes from the guest's write straight
//! to the device's worker thread (on KVM without leaving the kernel), and a used-buffer
//! interrupt from the worker straight into the interrupt controller. Where the backend says
//! `Unsupported`, the bus path stays: the transport writes the same eventfd on a notify exit
//! and the interrupt goes through `Vm::set_irq_line`.

use std::sync::Arc;

use corefour_devices::virtio::mmio::NOTIFY_OFFSET;
use corefour_devices::IrqLine;
use corefour_hypervisor::{Datamatch, EventFd, HypervisorError, IoEventAddress, Vm};

/// How many queue notifications and interrupts took the eventfd path (for logs and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EventfdUse {
    pub ioeventfds: usize,
    pub irqfds: usize,
    /// Registrations the backend refused for another reason than lacking the feature; those
    /// queues and lines use the VM-exit path.
    pub refused: usize,
}

impl EventfdUse {
    /// "; virtio: 2 ioeventfds, 1 irqfd" for the VMM's backend line, or "" when nothing
    /// was registered.
    pub fn describe(&self) -> String {
        if self.ioeventfds == 0 && self.irqfds == 0 && self.refused == 0 {
            return String::new();
        }
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let mut s = format!(
            "; virtio: {}, {}",
            plural(self.ioeventfds, "ioeventfd"),
            plural(self.irqfds, "irqfd")
        );
        if self.refused > 0 {
            s += &format!(", {} refused (VM exits instead)", self.refused);
        }
        s
    }
}

/// Registers `events[i]` for a virtio-mmio window at `base` (QueueNotify, 32-bit, value i).
pub fn register_mmio_notify(
    vm: &dyn Vm,
    base: u64,
    events: &[Arc<EventFd>],
    used: &mut EventfdUse,
) {
    for (i, ev) in events.iter().enumerate() {
        let Ok(q) = u32::try_from(i) else { break };
        let r = vm.register_ioevent(
            IoEventAddress::Mmio(base + NOTIFY_OFFSET),
            Datamatch::U32(q),
            ev,
        );
        note(r, used, false);
    }
}

/// Registers per-queue notify addresses of a PCI function (any write width).
pub fn register_pci_notify(vm: &dyn Vm, events: &[(u64, Arc<EventFd>)], used: &mut EventfdUse) {
    for (addr, ev) in events {
        let r = vm.register_ioevent(IoEventAddress::Mmio(*addr), Datamatch::Any, ev);
        note(r, used, false);
    }
}

/// Counts a registration; any failure leaves the bus path, which is still correct.
fn note(r: corefour_hypervisor::Result<()>, used: &mut EventfdUse, irq: bool) -> bool {
    match r {
        Ok(()) if irq => used.irqfds += 1,
        Ok(()) => used.ioeventfds += 1,
        Err(HypervisorError::Unsupported(_)) => return false,
        Err(_) => {
            used.refused += 1;
            return false;
        }
    }
    true
}

/// An edge-triggered interrupt through an irqfd: one eventfd write, no ioctl from the
/// device thread and no lock. Lowering the line means nothing for an edge.
struct IrqFdLine {
    event: EventFd,
}

impl IrqLine for IrqFdLine {
    fn trigger(&self) {
        // Fails only if the counter would overflow, when an interrupt is pending anyway.
        let _ = self.event.write(1);
    }
    fn set_level(&self, level: bool) {
        if level {
            self.trigger();
        }
    }
}

/// An edge on `gsi` through an irqfd if the backend has them, else `None` (the caller keeps
/// its `set_irq_line` line).
pub fn edge_irqfd(vm: &dyn Vm, gsi: u32, used: &mut EventfdUse) -> Option<Arc<dyn IrqLine>> {
    let event = EventFd::new(libc::EFD_NONBLOCK).ok()?;
    if !note(vm.register_irqfd(&event, gsi), used, true) {
        return None;
    }
    Some(Arc::new(IrqFdLine { event }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_what_was_registered() {
        assert_eq!(EventfdUse::default().describe(), "");
        let u = EventfdUse {
            ioeventfds: 2,
            irqfds: 1,
            refused: 0,
        };
        assert_eq!(u.describe(), "; virtio: 2 ioeventfds, 1 irqfd");
        let u = EventfdUse {
            ioeventfds: 0,
            irqfds: 0,
            refused: 1,
        };
        assert!(u.describe().contains("1 refused"));
    }
}
