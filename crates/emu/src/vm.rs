//! The VM-wide parts of the software backend: guest memory map, the epoch that tells vCPUs to
//! drop cached translations, per-vCPU links (local APIC, kick, wake-up), the I/O APIC.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use corefour_hypervisor::{HypervisorError, MemoryRegion, Result, Vcpu, VcpuKicker, Vm, VmOps};

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
    pub nvcpus: u32,
    pub trace_unimpl: bool,
    pub links: Vec<Arc<Link>>,
    pub ioapic: Mutex<Ioapic>,
    pub pit: Mutex<Pit>,
    pub pic: Mutex<Pic>,
    pub rtc: Mutex<Rtc>,
}

impl Shared {
    pub fn bump_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Serialises LOCK-prefixed read-modify-write instructions across vCPUs.
    pub fn locked(&self) -> MutexGuard<'_, ()> {
        self.atomic.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// VM time in nanoseconds; the TSC and the APIC timers count it.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
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
}

impl EmuVm {
    pub fn new(vcpus: u32, trace_unimpl: bool) -> Result<Self> {
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
                nvcpus: vcpus,
                trace_unimpl,
                links: (0..vcpus).map(|k| Arc::new(Link::new(k as u8))).collect(),
                ioapic: Mutex::new(Ioapic::default()),
                pit: Mutex::new(Pit::default()),
                pic: Mutex::new(Pic::default()),
                rtc: Mutex::new(Rtc::default()),
            }),
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
}

/// Kicks one vCPU out of `run`.
pub struct Kicker(pub Arc<Link>);

impl VcpuKicker for Kicker {
    fn kick(&self) {
        self.0.kick.store(true, Ordering::Release);
        self.0.notify();
    }
}
