//! The VM-wide parts of the software backend: guest memory map, the epoch that tells vCPUs to
//! drop cached translations, per-vCPU links (local APIC, kick, wake-up), the I/O APIC.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use corefour_hypervisor::eventfd::{IoEventTable, IrqfdPump};
use corefour_hypervisor::{
    Datamatch, EventFd, HypervisorError, IoEventAddress, MemoryRegion, Result, Vcpu, VcpuKicker,
    Vm, VmOps,
};

use crate::mem::{PhysMem, Region};
use crate::platform::ioapic::{Ioapic, Route};
use crate::platform::lapic::{Ipi, Lapic};
use crate::platform::pic::Pic;
use crate::platform::pit::Pit;
use crate::platform::rtc::Rtc;

/// What other threads share with one vCPU.
pub struct Link {
    pub lapic: Mutex<Lapic>,
    pub kick: AtomicBool,
    /// Something may be pending in the local APIC (an IPI or routed interrupt arrived).
    pub hint: AtomicBool,
    wake_lock: Mutex<()>,
    wake: Condvar,
}

impl Link {
    fn new(id: u8) -> Self {
        Link {
            lapic: Mutex::new(Lapic::new(id)),
            kick: AtomicBool::new(false),
            hint: AtomicBool::new(false),
            wake_lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    pub fn lapic(&self) -> MutexGuard<'_, Lapic> {
        self.lapic.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn notify(&self) {
        self.hint.store(true, Ordering::Release);
        let _g = self.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.wake.notify_all();
    }

    /// Sleeps until notified or `timeout` passes.
    pub fn sleep(&self, timeout: Duration) {
        let g = self.wake_lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.hint.load(Ordering::Acquire) || self.kick.load(Ordering::Acquire) {
            return;
        }
        let _ = self.wake.wait_timeout(g, timeout);
    }
}

pub struct Shared {
    pub mem: RwLock<Arc<PhysMem>>,
    /// Bumped when cached translations may be stale (memory map, new code page, dirty log).
    pub epoch: AtomicU64,
    atomic: Mutex<()>,
    start: Instant,
    /// Added to the clock: a restored VM's time goes on from its snapshot's.
    time_offset: AtomicU64,
    pub nvcpus: u32,
    pub trace_unimpl: bool,
    /// Runs of a block before it is translated to host code; 0 turns the JIT off.
    pub jit_threshold: u32,
    pub links: Vec<Arc<Link>>,
    pub ioapic: Mutex<Ioapic>,
    pub pit: Mutex<Pit>,
    pub pic: Mutex<Pic>,
    pub rtc: Mutex<Rtc>,
    /// ioeventfds: consulted on every port and MMIO write before the VMM's callbacks.
    pub ioevents: IoEventTable,
}

impl Shared {
    pub fn bump_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Serialises the LOCKed updates no host atomic can do (split or misaligned operands,
    /// MMIO); the rest are host atomics (`Cpu::locked_rmw`, `Cpu::locked_cmpxchg16`).
    pub fn locked(&self) -> MutexGuard<'_, ()> {
        self.atomic.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// VM time in nanoseconds; the TSC and the APIC timers count it.
    pub fn now_ns(&self) -> u64 {
        (self.start.elapsed().as_nanos() as u64)
            .wrapping_add(self.time_offset.load(Ordering::Relaxed))
    }

    fn ioapic(&self) -> MutexGuard<'_, Ioapic> {
        self.ioapic.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delivers an interrupt from the I/O APIC or an MSI.
    pub fn deliver_route(&self, r: Route) {
        let targets: Vec<&Arc<Link>> = self
            .links
            .iter()
            .filter(|l| l.lapic().matches(r.dest, r.logical))
            .collect();
        // Lowest priority: the first match is as good as any.
        let targets = if r.mode == 1 {
            targets.into_iter().take(1).collect()
        } else {
            targets
        };
        for l in targets {
            let mut a = l.lapic();
            match r.mode {
                4 => a.nmi = true,
                0 | 1 => a.accept(r.vector, r.level),
                _ => continue,
            }
            drop(a);
            l.notify();
        }
    }

    pub fn ioapic_read(&self, off: u64) -> u32 {
        self.ioapic().read(off)
    }

    pub fn ioapic_write(&self, off: u64, v: u32) {
        let r = self.ioapic().write(off, v);
        if let Some(r) = r {
            self.deliver_route(r);
        }
    }

    pub fn pit(&self) -> MutexGuard<'_, Pit> {
        self.pit.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn rtc(&self) -> MutexGuard<'_, Rtc> {
        self.rtc.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pic(&self) -> MutexGuard<'_, Pic> {
        self.pic.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises IRQ0 if PIT channel 0 reached its count: an edge on I/O APIC pin 2 (the MADT's
    /// IRQ0 override) and on the PIC's line 0.
    pub fn poll_pit(&self, now: u64) {
        if !self.pit().poll(now) {
            return;
        }
        self.pic().raise(0);
        let r = {
            let mut io = self.ioapic();
            let r = io.set_line(2, true);
            io.set_line(2, false);
            r
        };
        if let Some(r) = r {
            self.deliver_route(r);
        }
    }

    /// An edge on I/O APIC pin `pin` (an irqfd write).
    pub fn pulse_line(&self, pin: usize) {
        if pin >= crate::platform::ioapic::PINS {
            return;
        }
        let r = {
            let mut io = self.ioapic();
            let r = io.set_line(pin, true);
            io.set_line(pin, false);
            r
        };
        if let Some(r) = r {
            self.deliver_route(r);
        }
    }

    pub fn level_eoi(&self, vector: u8) {
        let again = self.ioapic().eoi(vector);
        for r in again {
            self.deliver_route(r);
        }
    }

    /// Sends an IPI from vCPU `from`.
    pub fn send_ipi(&self, from: u32, ipi: Ipi) {
        for (k, l) in self.links.iter().enumerate() {
            let hit = match ipi.shorthand {
                1 => k as u32 == from,
                2 => true,
                3 => k as u32 != from,
                _ => l.lapic().matches(ipi.dest, ipi.logical),
            };
            if !hit {
                continue;
            }
            let mut a = l.lapic();
            match ipi.mode {
                0 | 1 => a.accept(ipi.vector, false),
                4 => a.nmi = true,
                5
                    // INIT level de-assert is a no-op on modern CPUs.
                    if ipi.level_assert => {
                        a.init = true;
                    }
                6 => a.sipi = Some(ipi.vector),
                _ => {}
            }
            drop(a);
            l.notify();
        }
    }
}

/// A VM of the software backend.
pub struct EmuVm {
    pub shared: Arc<Shared>,
    /// The thread that turns irqfd writes into I/O APIC edges, started by the first irqfd.
    irqfds: Mutex<Option<IrqfdPump>>,
}

impl EmuVm {
    pub fn new(vcpus: u32, trace_unimpl: bool, jit_threshold: u32) -> Result<Self> {
        if vcpus == 0 || vcpus > 255 {
            return Err(HypervisorError::Invalid(format!(
                "{vcpus} vCPUs requested; the software CPU supports 1 to 255"
            )));
        }
        Ok(EmuVm {
            shared: Arc::new(Shared {
                mem: RwLock::new(Arc::new(PhysMem::default())),
                epoch: AtomicU64::new(1),
                atomic: Mutex::new(()),
                start: Instant::now(),
                time_offset: AtomicU64::new(0),
                nvcpus: vcpus,
                trace_unimpl,
                jit_threshold,
                links: (0..vcpus).map(|k| Arc::new(Link::new(k as u8))).collect(),
                ioapic: Mutex::new(Ioapic::default()),
                pit: Mutex::new(Pit::default()),
                pic: Mutex::new(Pic::default()),
                rtc: Mutex::new(Rtc::default()),
                ioevents: IoEventTable::default(),
            }),
            irqfds: Mutex::new(None),
        })
    }
}

impl Vm for EmuVm {
    unsafe fn set_memory_region(&self, region: MemoryRegion) -> Result<()> {
        if region.size == 0
            || !region.guest_phys_addr.is_multiple_of(4096)
            || !region.size.is_multiple_of(4096)
        {
            return Err(HypervisorError::Invalid(format!(
                "memory region {:#x}+{:#x} must be non-empty and 4 KiB aligned",
                region.guest_phys_addr, region.size
            )));
        }
        let mut g = self.shared.mem.write().unwrap_or_else(|e| e.into_inner());
        let mut regions: Vec<Region> = Vec::new();
        for r in g.regions.iter() {
            if r.slot == region.slot {
                continue;
            }
            let overlaps = region.guest_phys_addr < r.gpa + r.size
                && r.gpa < region.guest_phys_addr + region.size;
            if overlaps {
                return Err(HypervisorError::Invalid(format!(
                    "memory region {:#x}+{:#x} overlaps slot {}",
                    region.guest_phys_addr, region.size, r.slot
                )));
            }
            regions.push(Region::new(&MemoryRegion {
                slot: r.slot,
                guest_phys_addr: r.gpa,
                size: r.size,
                host_addr: r.host as u64,
                log_dirty: r.log_dirty,
                read_only: r.read_only,
            }));
        }
        regions.push(Region::new(&region));
        *g = Arc::new(PhysMem { regions });
        self.shared.bump_epoch();
        Ok(())
    }

    fn create_vcpu(&self, index: u32, ops: Arc<dyn VmOps>) -> Result<Box<dyn Vcpu>> {
        if index >= self.shared.nvcpus {
            return Err(HypervisorError::Invalid(format!(
                "vCPU {index} requested but the VM was created with {}",
                self.shared.nvcpus
            )));
        }
        Ok(Box::new(crate::vcpu::EmuVcpu::new(
            self.shared.clone(),
            index,
            ops,
        )))
    }

    fn register_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Datamatch,
        event: &EventFd,
    ) -> Result<()> {
        self.shared.ioevents.register(addr, datamatch, event)
    }

    fn unregister_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Datamatch,
        _event: &EventFd,
    ) -> Result<()> {
        self.shared.ioevents.unregister(addr, datamatch)
    }

    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()> {
        if gsi as usize >= crate::platform::ioapic::PINS {
            return Err(HypervisorError::Invalid(format!(
                "interrupt line {gsi} does not exist (0..23)"
            )));
        }
        let mut pump = self.irqfds.lock().unwrap_or_else(|e| e.into_inner());
        if pump.is_none() {
            // The pump holds only a weak reference: it must not keep a dropped VM alive.
            let shared = Arc::downgrade(&self.shared);
            *pump = Some(IrqfdPump::new(move |gsi| {
                if let Some(s) = shared.upgrade() {
                    s.pulse_line(gsi as usize);
                }
            })?);
        }
        match pump.as_ref() {
            Some(p) => p.register(event, gsi),
            None => Err(HypervisorError::Unsupported("irqfd")),
        }
    }

    fn unregister_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()> {
        let pump = self.irqfds.lock().unwrap_or_else(|e| e.into_inner());
        match pump.as_ref() {
            Some(p) => p.unregister(event, gsi),
            None => Err(HypervisorError::Invalid(format!(
                "no irqfd registered for GSI {gsi}"
            ))),
        }
    }

    fn set_irq_line(&self, irq: u32, level: bool) -> Result<()> {
        let pin = irq as usize;
        if pin >= crate::platform::ioapic::PINS {
            return Err(HypervisorError::Invalid(format!(
                "interrupt line {irq} does not exist (0..23)"
            )));
        }
        let r = self.shared.ioapic().set_line(pin, level);
        if let Some(r) = r {
            self.shared.deliver_route(r);
        }
        if pin < 16 {
            // The ISA lines also reach the 8259 pair, as on KVM's irqchip; the boot CPU takes
            // them when its LINT0 is in ExtINT mode.
            self.shared.pic().set_line(pin as u8, level);
            if level {
                self.shared.links[0].notify();
            }
        }
        Ok(())
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<()> {
        if address >> 20 != 0xfee {
            return Err(HypervisorError::Invalid(format!(
                "MSI address {address:#x} is not in the local APIC range 0xfee00000"
            )));
        }
        // Address: destination ID in bits 19:12, destination mode in bit 2. Data: vector and
        // delivery mode. MSIs are edges: nothing to EOI back to an I/O APIC.
        self.shared.deliver_route(Route {
            vector: data as u8,
            mode: ((data >> 8) & 7) as u8,
            logical: address & (1 << 2) != 0,
            dest: (address >> 12) as u8,
            level: false,
        });
        Ok(())
    }

    fn dirty_log(&self, slot: u32, _size: u64) -> Result<Vec<u64>> {
        let mem = self
            .shared
            .mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // vCPUs drop their write tags so the next write to each page is seen again.
        self.shared.bump_epoch();
        mem.take_dirty(slot)
            .ok_or_else(|| HypervisorError::Invalid(format!("no memory slot {slot}")))
    }

    fn backend_name(&self) -> &'static str {
        "emu"
    }

    fn save_state(&self) -> Result<corefour_hypervisor::CpuState> {
        let s = &self.shared;
        crate::platform::state::PlatformSnap {
            now_ns: s.now_ns(),
            ioapic: s.ioapic().clone(),
            pit: s.pit().clone(),
            pic: s.pic().clone(),
            rtc: Some(s.rtc().clone()),
        }
        .encode()
    }

    fn restore_state(&self, state: &corefour_hypervisor::CpuState) -> Result<()> {
        let snap = crate::platform::state::PlatformSnap::decode(state)?;
        let s = &self.shared;
        let elapsed = s.start.elapsed().as_nanos() as u64;
        s.time_offset
            .store(snap.now_ns.wrapping_sub(elapsed), Ordering::SeqCst);
        *s.ioapic() = snap.ioapic;
        *s.pit() = snap.pit;
        *s.pic() = snap.pic;
        if let Some(rtc) = snap.rtc {
            *s.rtc() = rtc;
        }
        s.bump_epoch();
        Ok(())
    }
}

/// Kicks one vCPU out of `run`.
pub struct Kicker(pub Arc<Link>);

impl VcpuKicker for Kicker {
    fn kick(&self) {
        self.0.kick.store(true, Ordering::Release);
        self.0.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_msi_lands_in_the_addressed_local_apic() {
        let vm = EmuVm::new(2, false, 0).unwrap();
        for l in &vm.shared.links {
            l.lapic().write(0xf0, 0x1ff, 0); // software-enable
        }
        // Physical destination 1, fixed delivery, vector 0x45.
        vm.signal_msi(0xfee0_1000, 0x45).unwrap();
        assert_eq!(vm.shared.links[0].lapic().pending(), None);
        assert_eq!(vm.shared.links[1].lapic().pending(), Some(0x45));
        // Outside the APIC window: refused, nothing delivered.
        assert!(vm.signal_msi(0xdead_0000, 0x46).is_err());
        assert_eq!(vm.shared.links[0].lapic().pending(), None);
    }
}
