//! ioeventfd and irqfd wiring of the virtio devices, where the backend has them (KVM; the
//! software CPU emulates both). A queue notification then goes from the guest's write straight
//! to the device's worker thread (on KVM without leaving the kernel), and a used-buffer
//! interrupt from the worker straight into the interrupt controller. Where the backend says
//! `Unsupported`, the bus path stays: the transport writes the same eventfd on a notify exit
//! and the interrupt goes through `Vm::set_irq_line`.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use corefour_devices::virtio::interrupt::Interrupt;
use corefour_devices::virtio::mmio::NOTIFY_OFFSET;
use corefour_devices::virtio::pci::{BarListener, VirtioPciDevice, BAR_SIZE};
use corefour_devices::virtio::pci_msix::MsiSink;
use corefour_devices::IrqLine;
use corefour_hypervisor::{
    Datamatch, EventFd, HypervisorError, IoEventAddress, MsiRoute, Vm, MSI_GSI_BASE,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

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
    use corefour_hypervisor::{MemoryRegion, Vcpu, VmOps};

    /// A backend that records the routing and irqfd calls (`routing`: whether it has MSI
    /// routing at all; `refuse_routes`: whether installing a non-empty table fails).
    #[derive(Default)]
    struct FakeVm {
        routing: bool,
        refuse_routes: bool,
        tables: Mutex<Vec<Vec<MsiRoute>>>,
        irqfds: Mutex<Vec<u32>>,
        msis: Mutex<Vec<(u64, u32)>>,
        ioevents: Mutex<Vec<(bool, u64)>>,
    }

    impl Vm for FakeVm {
        unsafe fn set_memory_region(
            &self,
            _region: MemoryRegion,
        ) -> corefour_hypervisor::Result<()> {
            Ok(())
        }
        fn create_vcpu(
            &self,
            _index: u32,
            _ops: Arc<dyn VmOps>,
        ) -> corefour_hypervisor::Result<Box<dyn Vcpu>> {
            Err(HypervisorError::Unsupported("vcpus"))
        }
        fn set_irq_line(&self, _irq: u32, _level: bool) -> corefour_hypervisor::Result<()> {
            Ok(())
        }
        fn signal_msi(&self, address: u64, data: u32) -> corefour_hypervisor::Result<()> {
            self.msis.lock().unwrap().push((address, data));
            Ok(())
        }
        fn dirty_log(&self, _slot: u32, _size: u64) -> corefour_hypervisor::Result<Vec<u64>> {
            Ok(Vec::new())
        }
        fn backend_name(&self) -> &'static str {
            "fake"
        }
        fn register_irqfd(&self, _event: &EventFd, gsi: u32) -> corefour_hypervisor::Result<()> {
            self.irqfds.lock().unwrap().push(gsi);
            Ok(())
        }
        fn unregister_irqfd(&self, _event: &EventFd, gsi: u32) -> corefour_hypervisor::Result<()> {
            self.irqfds.lock().unwrap().retain(|g| *g != gsi);
            Ok(())
        }
        fn set_msi_routes(&self, routes: &[MsiRoute]) -> corefour_hypervisor::Result<()> {
            if !self.routing {
                return Err(HypervisorError::Unsupported("MSI routing"));
            }
            if self.refuse_routes && !routes.is_empty() {
                return Err(HypervisorError::Invalid("refused".into()));
            }
            self.tables.lock().unwrap().push(routes.to_vec());
            Ok(())
        }
        fn register_ioevent(
            &self,
            addr: IoEventAddress,
            _datamatch: Datamatch,
            _event: &EventFd,
        ) -> corefour_hypervisor::Result<()> {
            if let IoEventAddress::Mmio(a) = addr {
                self.ioevents.lock().unwrap().push((true, a));
            }
            Ok(())
        }
        fn unregister_ioevent(
            &self,
            addr: IoEventAddress,
            _datamatch: Datamatch,
            _event: &EventFd,
        ) -> corefour_hypervisor::Result<()> {
            if let IoEventAddress::Mmio(a) = addr {
                self.ioevents.lock().unwrap().push((false, a));
            }
            Ok(())
        }
    }

    #[test]
    fn msi_routes_are_installed_once_per_message_change() {
        let fake = Arc::new(FakeVm {
            routing: true,
            ..Default::default()
        });
        let vm: Arc<dyn Vm> = fake.clone();
        let counters = Arc::new(VirtioCounters::default());
        let router = MsiRouter::probe(&vm, counters.clone()).expect("the fake routes");
        let mut used = EventfdUse::default();
        let a = router.function_sink(3, &mut used);
        let b = router.function_sink(2, &mut used);
        assert_eq!(used.irqfds, 5);
        assert_eq!(*fake.irqfds.lock().unwrap(), vec![24, 25, 26, 27, 28]);
        a.send(1, 0xfee0_0000, 0x41);
        a.send(1, 0xfee0_0000, 0x41);
        b.send(0, 0xfee0_1000, 0x42);
        a.send(1, 0xfee0_0000, 0x51);
        let tables = fake.tables.lock().unwrap().clone();
        // The probe's empty table, then one per change; the same message again costs nothing.
        assert_eq!(tables.len(), 4, "{tables:?}");
        let last = tables.last().unwrap();
        assert_eq!(
            last,
            &vec![
                MsiRoute {
                    gsi: 25,
                    address: 0xfee0_0000,
                    data: 0x51
                },
                MsiRoute {
                    gsi: 27,
                    address: 0xfee0_1000,
                    data: 0x42
                },
            ],
            "both functions' routes, each on its own GSI"
        );
        assert_eq!(counters.msi_irqfd.load(Ordering::Relaxed), 4);
        assert_eq!(counters.route_updates.load(Ordering::Relaxed), 3);
        assert!(fake.msis.lock().unwrap().is_empty(), "no ioctl path");
        // A vector past the table sends nothing.
        a.send(9, 0xfee0_0000, 1);
        assert_eq!(counters.msi_irqfd.load(Ordering::Relaxed), 4);
        drop(a);
        assert_eq!(
            *fake.irqfds.lock().unwrap(),
            vec![27, 28],
            "a's irqfds unregistered"
        );
    }

    #[test]
    fn without_routing_or_when_refused_messages_take_signal_msi() {
        let fake = Arc::new(FakeVm::default());
        let vm: Arc<dyn Vm> = fake.clone();
        assert!(
            MsiRouter::probe(&vm, Arc::default()).is_none(),
            "emu-like backend"
        );
        let fake = Arc::new(FakeVm {
            routing: true,
            refuse_routes: true,
            ..Default::default()
        });
        let vm: Arc<dyn Vm> = fake.clone();
        let counters = Arc::new(VirtioCounters::default());
        let router = MsiRouter::probe(&vm, counters.clone()).unwrap();
        let sink = router.function_sink(2, &mut EventfdUse::default());
        sink.send(0, 0xfee0_0000, 0x41);
        sink.send(0, 0xfee0_0000, 0x41);
        assert_eq!(*fake.msis.lock().unwrap(), vec![(0xfee0_0000, 0x41); 2]);
        assert_eq!(counters.msi_ioctl.load(Ordering::Relaxed), 2);
        assert_eq!(counters.msi_irqfd.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn ioeventfds_follow_a_bar_inside_the_window_only() {
        use corefour_devices::virtio::pci::PciRoot;
        use corefour_devices::virtio::rng::Rng;
        let fake = Arc::new(FakeVm::default());
        let vm: Arc<dyn Vm> = fake.clone();
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])
                .unwrap();
        struct NoLine;
        impl IrqLine for NoLine {
            fn trigger(&self) {}
            fn set_level(&self, _level: bool) {}
        }
        let mut root = PciRoot::new(0xe000_0000, 0x100_0000);
        let (_, dev) = root
            .add_virtio(Box::new(Rng::new()), mem, Arc::new(NoLine), 5)
            .unwrap();
        let counters = Arc::new(VirtioCounters::default());
        let mover = IoeventMover {
            vm: vm.clone(),
            window: (0xe000_0000, 0x100_0000),
            counters: counters.clone(),
        };
        mover.bar_moved(&dev, 0xe000_0000, 0xe080_0000);
        mover.bar_moved(&dev, 0xe080_0000, 0xf000_0000);
        assert_eq!(
            *fake.ioevents.lock().unwrap(),
            vec![
                (false, 0xe000_3000),
                (true, 0xe080_3000),
                (false, 0xe080_3000)
            ],
            "outside the window: unregistered, not registered"
        );
        assert_eq!(counters.bar_moves.load(Ordering::Relaxed), 2);
        assert_eq!(counters.ioeventfds_moved.load(Ordering::Relaxed), 1);
    }

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

/// What the interrupt and notification paths did while the VM ran (for `--stats` and tests).
#[derive(Default)]
pub struct VirtioCounters {
    /// MSI-X messages sent as one irqfd write (a GSI route per vector).
    pub msi_irqfd: AtomicU64,
    /// MSI-X messages sent through `Vm::signal_msi` (no routing on this backend, or a route
    /// the backend refused).
    pub msi_ioctl: AtomicU64,
    /// Times the VM's MSI routing table was replaced (a vector's message changed).
    pub route_updates: AtomicU64,
    /// INTx lines asserted again after the guest's EOI because the device still had
    /// something pending (resamplefd).
    pub intx_resamples: AtomicU64,
    /// BAR moves seen, and queue ioeventfds moved along with them.
    pub bar_moves: AtomicU64,
    pub ioeventfds_moved: AtomicU64,
}

impl VirtioCounters {
    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The VM-wide table of MSI routes (KVM_SET_GSI_ROUTING replaces all of it at once) and the
/// GSIs handed out for them.
pub struct MsiRouter {
    vm: Arc<dyn Vm>,
    routes: Mutex<BTreeMap<u32, MsiRoute>>,
    next_gsi: AtomicU32,
    counters: Arc<VirtioCounters>,
}

impl MsiRouter {
    /// A router if the backend routes MSIs (probed by installing the empty table, which on
    /// KVM is its default routing), else `None`: messages then go through `signal_msi`.
    pub fn probe(vm: &Arc<dyn Vm>, counters: Arc<VirtioCounters>) -> Option<Arc<Self>> {
        vm.set_msi_routes(&[]).ok()?;
        Some(Arc::new(Self {
            vm: vm.clone(),
            routes: Mutex::default(),
            next_gsi: AtomicU32::new(MSI_GSI_BASE),
            counters,
        }))
    }

    /// Points `gsi` at (`address`, `data`) and installs the table.
    fn set(&self, gsi: u32, address: u64, data: u32) -> corefour_hypervisor::Result<()> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        routes.insert(gsi, MsiRoute { gsi, address, data });
        let all: Vec<MsiRoute> = routes.values().copied().collect();
        let r = self.vm.set_msi_routes(&all);
        if r.is_err() {
            routes.remove(&gsi);
        }
        VirtioCounters::bump(&self.counters.route_updates);
        r
    }

    /// The sink of one PCI function with `vectors` MSI-X vectors: an irqfd per vector on GSIs
    /// of its own. Falls back to `signal_msi` if the irqfds cannot be registered.
    pub fn function_sink(
        self: &Arc<Self>,
        vectors: u16,
        used: &mut EventfdUse,
    ) -> Arc<dyn MsiSink> {
        let fallback = || -> Arc<dyn MsiSink> {
            Arc::new(SignalMsi {
                vm: self.vm.clone(),
                counters: self.counters.clone(),
            })
        };
        let base = self
            .next_gsi
            .fetch_add(u32::from(vectors), Ordering::Relaxed);
        let mut events = Vec::new();
        for v in 0..u32::from(vectors) {
            let Ok(ev) = EventFd::new(libc::EFD_NONBLOCK) else {
                return fallback();
            };
            if !note(self.vm.register_irqfd(&ev, base + v), used, true) {
                for (i, e) in events.iter().enumerate() {
                    let _ = self.vm.unregister_irqfd(e, base + i as u32);
                    used.irqfds -= 1;
                }
                return fallback();
            }
            events.push(ev);
        }
        Arc::new(RoutedMsi {
            router: self.clone(),
            base,
            messages: Mutex::new(vec![None; events.len()]),
            events,
        })
    }
}

/// MSI-X through `Vm::signal_msi` (KVM_SIGNAL_MSI, the software CPU's local APICs). A message
/// the backend refuses (an address outside the APIC range) is dropped, as a bus write to
/// nowhere would be.
pub struct SignalMsi {
    pub vm: Arc<dyn Vm>,
    pub counters: Arc<VirtioCounters>,
}

impl MsiSink for SignalMsi {
    fn send(&self, _vector: u16, address: u64, data: u32) {
        VirtioCounters::bump(&self.counters.msi_ioctl);
        let _ = self.vm.signal_msi(address, data);
    }
}

/// MSI-X through one GSI route and irqfd per vector: the device thread's send is one eventfd
/// write. A vector's route is (re)installed at its first send after the guest changed its
/// message, which covers programming the table and a restored table alike (the message is
/// only sent once unmasked, and the guest may not change it while unmasked).
struct RoutedMsi {
    router: Arc<MsiRouter>,
    base: u32,
    events: Vec<EventFd>,
    /// The message each vector's route carries now.
    messages: Mutex<Vec<Option<(u64, u32)>>>,
}

impl MsiSink for RoutedMsi {
    fn send(&self, vector: u16, address: u64, data: u32) {
        let v = usize::from(vector);
        let Some(ev) = self.events.get(v) else {
            return;
        };
        let gsi = self.base + u32::from(vector);
        {
            let mut m = self.messages.lock().unwrap_or_else(|e| e.into_inner());
            if m[v] != Some((address, data)) {
                if self.router.set(gsi, address, data).is_err() {
                    m[v] = None;
                    drop(m);
                    VirtioCounters::bump(&self.router.counters.msi_ioctl);
                    let _ = self.router.vm.signal_msi(address, data);
                    return;
                }
                m[v] = Some((address, data));
            }
        }
        VirtioCounters::bump(&self.router.counters.msi_irqfd);
        // Fails only if the counter would overflow, when an interrupt is pending anyway.
        let _ = ev.write(1);
    }
}

impl Drop for RoutedMsi {
    fn drop(&mut self) {
        for (i, e) in self.events.iter().enumerate() {
            let _ = self.router.vm.unregister_irqfd(e, self.base + i as u32);
        }
    }
}

/// A level-triggered line (PCI INTx) through an irqfd with a resamplefd: asserting is one
/// eventfd write; the backend lowers the line at the guest's EOI and signals the resamplefd,
/// and the [`Resampler`] asserts it again while the device's ISR still has bits set. The
/// driver's ISR read clears the bits, so lowering is the EOI's job, not ours.
struct ResampledLine {
    event: Arc<EventFd>,
    _resampler: Arc<Resampler>,
}

impl IrqLine for ResampledLine {
    fn trigger(&self) {
        let _ = self.event.write(1);
    }
    fn set_level(&self, level: bool) {
        if level {
            let _ = self.event.write(1);
        }
    }
}

/// The device whose ISR a resampled line checks, filled in once the transport exists.
pub type IsrSource = Arc<OnceLock<Weak<Interrupt>>>;

struct ResampleEntry {
    resample: EventFd,
    event: Arc<EventFd>,
    isr: IsrSource,
}

const RESAMPLER_STOP: u64 = u64::MAX;

/// One thread per VM that waits on every INTx resamplefd.
pub struct Resampler {
    epoll: Arc<Epoll>,
    stop: EventFd,
    entries: Arc<Mutex<Vec<ResampleEntry>>>,
}

impl Resampler {
    pub fn new(counters: Arc<VirtioCounters>) -> std::io::Result<Arc<Self>> {
        let epoll = Arc::new(Epoll::new()?);
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, RESAMPLER_STOP),
        )?;
        let entries: Arc<Mutex<Vec<ResampleEntry>>> = Arc::default();
        let (ep, list) = (epoll.clone(), entries.clone());
        std::thread::Builder::new()
            .name("intx-resample".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut events = vec![EpollEvent::default(); 8];
                loop {
                    let n = match ep.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    };
                    for ev in &events[..n] {
                        if ev.data() == RESAMPLER_STOP {
                            return;
                        }
                        let l = list.lock().unwrap_or_else(|e| e.into_inner());
                        let Some(e) = l.get(ev.data() as usize) else {
                            continue;
                        };
                        let _ = e.resample.read();
                        let pending = e
                            .isr
                            .get()
                            .and_then(Weak::upgrade)
                            .is_some_and(|i| i.isr() != 0);
                        if pending {
                            VirtioCounters::bump(&counters.intx_resamples);
                            let _ = e.event.write(1);
                        }
                    }
                }
            })?;
        Ok(Arc::new(Self {
            epoll,
            stop,
            entries,
        }))
    }

    /// A level line on `gsi` through a resampled irqfd, or `None` where the backend has none.
    pub fn line(
        self: &Arc<Self>,
        vm: &dyn Vm,
        gsi: u32,
        used: &mut EventfdUse,
    ) -> Option<(Arc<dyn IrqLine>, IsrSource)> {
        let event = Arc::new(EventFd::new(libc::EFD_NONBLOCK).ok()?);
        let resample = EventFd::new(libc::EFD_NONBLOCK).ok()?;
        if !note(
            vm.register_irqfd_resample(&event, &resample, gsi),
            used,
            true,
        ) {
            return None;
        }
        let isr: IsrSource = Arc::default();
        let mut l = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let index = l.len() as u64;
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                resample.as_raw_fd(),
                EpollEvent::new(EventSet::IN, index),
            )
            .is_err()
        {
            let _ = vm.unregister_irqfd(&event, gsi);
            used.irqfds -= 1;
            return None;
        }
        l.push(ResampleEntry {
            resample,
            event: event.clone(),
            isr: isr.clone(),
        });
        let line = Arc::new(ResampledLine {
            event,
            _resampler: self.clone(),
        });
        Some((line, isr))
    }
}

impl Drop for Resampler {
    fn drop(&mut self) {
        // Not joined: the last line may be dropped on any thread.
        let _ = self.stop.write(1);
    }
}

/// Moves a PCI function's queue ioeventfds when the guest moves its BAR (or a restore puts
/// it back): unregistered at the old place, registered at the new one if that lies in the
/// BAR window (elsewhere the bus does not route to the function either).
pub struct IoeventMover {
    pub vm: Arc<dyn Vm>,
    pub window: (u64, u64),
    pub counters: Arc<VirtioCounters>,
}

impl BarListener for IoeventMover {
    fn bar_moved(&self, device: &VirtioPciDevice, old: u64, new: u64) {
        VirtioCounters::bump(&self.counters.bar_moves);
        for (addr, ev) in device.notify_events_at(old) {
            let _ = self
                .vm
                .unregister_ioevent(IoEventAddress::Mmio(addr), Datamatch::Any, &ev);
        }
        let (base, len) = self.window;
        if new < base || new.saturating_add(BAR_SIZE) > base + len {
            return;
        }
        for (addr, ev) in device.notify_events_at(new) {
            if self
                .vm
                .register_ioevent(IoEventAddress::Mmio(addr), Datamatch::Any, &ev)
                .is_ok()
            {
                VirtioCounters::bump(&self.counters.ioeventfds_moved);
            }
        }
    }
}

impl VirtioCounters {
    /// "virtio: 3 MSI-X by irqfd, 0 by ioctl, 2 route updates, ..." for `--stats`.
    pub fn describe(&self, notify_exits: u64) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "msix_irqfd={} msix_ioctl={} route_updates={} intx_resamples={} bar_moves={} \
             ioeventfds_moved={} pci_notify_exits={notify_exits}",
            g(&self.msi_irqfd),
            g(&self.msi_ioctl),
            g(&self.route_updates),
            g(&self.intx_resamples),
            g(&self.bar_moves),
            g(&self.ioeventfds_moved),
        )
    }
}
