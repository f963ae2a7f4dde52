//! virtio-pci, modern (virtio 1.x, spec 4.1), behind a minimal PCI host bridge, so a stock
//! kernel finds the devices by enumerating bus 0 without command-line hints.
//!
//! - Configuration space through the legacy mechanism #1: a 32-bit address at port 0xcf8 and
//!   the data at 0xcfc..0xcff ([`PciRoot`] is that 8-port BusDevice). Bus 0 only, function 0.
//! - Each virtio function has one 64-bit memory BAR of [`BAR_SIZE`] bytes with the common
//!   config, ISR, device config and notify regions, described by vendor capabilities. The VMM
//!   pre-assigns BARs inside a window ([`PciRoot::bar_window`]) as firmware would; a guest may
//!   move a BAR anywhere inside that window.
//! - Interrupts: MSI-X when the root has an MSI sink ([`PciRoot::with_msi`]): one vector per
//!   queue plus one for config changes, table and PBA in the same BAR (`pci_msix`). Otherwise,
//!   and whenever the driver leaves MSI-X disabled, legacy INTx (pin A), level-triggered,
//!   deasserted when the driver reads the ISR.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::pci_msix::{MsiSink, Msix, NO_VECTOR};
use super::state::{PciSnap, SaveRestore, StateError, TransportSnap};
use super::transport::{Core, Registers};
use super::{read_config_bytes, Interrupt, VirtioDevice};
use crate::{BusDevice, IrqLine};

pub const CONFIG_ADDRESS_PORT: u64 = 0xcf8;
/// Ports 0xcf8..0xd00.
pub const CONFIG_PORTS_LEN: u64 = 8;
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFF: u64 = 0x0000;
const ISR_OFF: u64 = 0x1000;
const DEVICE_OFF: u64 = 0x2000;
const NOTIFY_OFF: u64 = 0x3000;
const MSIX_TABLE_OFF: u64 = 0x4000;
const MSIX_PBA_OFF: u64 = 0x5000;
const MSIX_END: u64 = 0x6000;
const NOTIFY_MULTIPLIER: u32 = 4;
/// Where the MSI-X capability sits: right after the 20-byte notify capability at 0x70.
const MSIX_CAP: usize = 0x84;
const VIRTIO_VENDOR: u32 = 0x1af4;
const MAX_SLOTS: usize = 32;

/// One PCI function's configuration space as the root sees it.
pub trait PciFunction: Send + Sync {
    /// The 32-bit register at dword `reg` (0..64).
    fn config_read(&self, reg: usize) -> u32;
    /// A write of `data` at byte `offset` (0..4) within dword `reg`.
    fn config_write(&self, reg: usize, offset: usize, data: &[u8]);
    /// The function's memory BAR, if decoding: (address, size).
    fn bar(&self) -> Option<(u64, u64)>;
    /// An access inside the BAR (offset from its start).
    fn bar_read(&self, offset: u64, data: &mut [u8]);
    fn bar_write(&self, offset: u64, data: &[u8]);
}

/// The host bridge at 00:00.0 (an i440FX-like identity, nothing to configure).
struct HostBridge;

impl PciFunction for HostBridge {
    fn config_read(&self, reg: usize) -> u32 {
        match reg {
            0 => 0x1237_8086,
            2 => 0x0600_0000, // class: bridge, host
            _ => 0,
        }
    }
    fn config_write(&self, _reg: usize, _offset: usize, _data: &[u8]) {}
    fn bar(&self) -> Option<(u64, u64)> {
        None
    }
    fn bar_read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&self, _offset: u64, _data: &[u8]) {}
}

/// Told when a function's BAR moves: the guest reprogrammed it (`old` -> `new`), or a restore
/// put it back where it was saved. The VMM moves the queue ioeventfds along
/// ([`VirtioPciDevice::notify_events_at`]).
pub trait BarListener: Send + Sync {
    fn bar_moved(&self, device: &VirtioPciDevice, old: u64, new: u64);
}

/// PCI bus 0: the config mechanism and the functions on it.
pub struct PciRoot {
    address: AtomicU32,
    slots: Vec<Arc<dyn PciFunction>>,
    window: (u64, u64),
    msi: Option<Arc<dyn MsiSink>>,
}

impl PciRoot {
    /// A bus whose BARs live in `[window_base, window_base + window_len)`.
    pub fn new(window_base: u64, window_len: u64) -> Self {
        Self {
            address: AtomicU32::new(0),
            slots: vec![Arc::new(HostBridge)],
            window: (window_base, window_len),
            msi: None,
        }
    }

    /// Functions added from now on offer MSI-X, delivered through `sink`.
    pub fn with_msi(mut self, sink: Arc<dyn MsiSink>) -> Self {
        self.msi = Some(sink);
        self
    }

    /// Whether the bus has virtio functions (slot 0 is the host bridge).
    pub fn has_functions(&self) -> bool {
        self.slots.len() > 1
    }

    /// The MMIO window BARs are placed in: register [`PciBarWindow`] there on the MMIO bus.
    pub fn bar_window(&self) -> (u64, u64) {
        self.window
    }

    /// Adds a virtio device in the next slot, with its BAR pre-assigned in the window and
    /// memory decoding on (what firmware leaves behind). Returns the slot number.
    pub fn add_virtio(
        &mut self,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<dyn IrqLine>,
        irq_line_number: u8,
    ) -> std::io::Result<(usize, Arc<VirtioPciDevice>)> {
        self.add_virtio_with_msi(device, mem, irq, irq_line_number, None)
    }

    /// As `add_virtio`, with MSI-X through `sink` (else through the root's, if any): a sink
    /// of its own lets the VMM route each of this function's vectors separately.
    pub fn add_virtio_with_msi(
        &mut self,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<dyn IrqLine>,
        irq_line_number: u8,
        sink: Option<Arc<dyn MsiSink>>,
    ) -> std::io::Result<(usize, Arc<VirtioPciDevice>)> {
        let slot = self.slots.len();
        let bar = self.window.0 + (slot as u64 - 1) * BAR_SIZE;
        if slot >= MAX_SLOTS || bar + BAR_SIZE > self.window.0 + self.window.1 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                "no free PCI slot or BAR space",
            ));
        }
        // One vector per queue and one for config changes: what Linux asks for first.
        let vectors = device.queue_max_sizes().len() as u16 + 1;
        let sink = sink.or_else(|| self.msi.clone());
        let dev = Arc::new(VirtioPciDevice::new(
            device,
            mem,
            irq,
            sink.map(|s| (vectors, s)),
            bar,
            irq_line_number,
        )?);
        self.slots.push(dev.clone());
        Ok((slot, dev))
    }

    fn function(&self, address: u32) -> Option<(&Arc<dyn PciFunction>, usize)> {
        if address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (address >> 16) & 0xff;
        let dev = ((address >> 11) & 0x1f) as usize;
        let func = (address >> 8) & 7;
        if bus != 0 || func != 0 {
            return None;
        }
        let reg = ((address >> 2) & 0x3f) as usize;
        self.slots.get(dev).map(|f| (f, reg))
    }

    /// The function whose BAR holds `addr`.
    fn bar_owner(&self, addr: u64) -> Option<(&Arc<dyn PciFunction>, u64)> {
        self.slots.iter().find_map(|f| {
            let (base, size) = f.bar()?;
            (addr >= base && addr - base < size).then(|| (f, addr - base))
        })
    }
}

impl BusDevice for PciRoot {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 => {
                let v = self.address.load(Ordering::SeqCst).to_le_bytes();
                let o = offset as usize;
                let n = data.len().min(4 - o);
                data[..n].copy_from_slice(&v[o..o + n]);
                data[n..].fill(0xff);
            }
            _ => {
                let byte = (offset - 4) as usize;
                let v = match self.function(self.address.load(Ordering::SeqCst)) {
                    Some((f, reg)) => f.config_read(reg),
                    None => 0xffff_ffff,
                }
                .to_le_bytes();
                let n = data.len().min(4 - byte.min(4));
                data[..n].copy_from_slice(&v[byte..byte + n]);
                data[n..].fill(0xff);
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.address.store(v, Ordering::SeqCst);
            }
            4..=7 => {
                let byte = (offset - 4) as usize;
                if let Some((f, reg)) = self.function(self.address.load(Ordering::SeqCst)) {
                    let n = data.len().min(4 - byte);
                    f.config_write(reg, byte, &data[..n]);
                }
            }
            _ => {}
        }
    }
}

/// The BAR window on the MMIO bus: routes each access to the function whose BAR holds it.
pub struct PciBarWindow {
    root: Arc<PciRoot>,
}

impl PciBarWindow {
    pub fn new(root: Arc<PciRoot>) -> Self {
        Self { root }
    }
}

impl BusDevice for PciBarWindow {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match self.root.bar_owner(self.root.window.0 + offset) {
            Some((f, off)) => f.bar_read(off, data),
            None => data.fill(0xff),
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        if let Some((f, off)) = self.root.bar_owner(self.root.window.0 + offset) {
            f.bar_write(off, data);
        }
    }
}

struct ConfigSpace {
    regs: [u32; 64],
    bar: u64,
    /// The driver wrote all-ones to a BAR half: the next read returns the size mask.
    sizing: [bool; 2],
}

/// A virtio device as a PCI function.
pub struct VirtioPciDevice {
    core: Core,
    cfg: Mutex<ConfigSpace>,
    /// Feature window selects of the common config (the core keeps the driver's).
    device_feature_select: AtomicU32,
    msix: Option<Arc<Msix>>,
    bar_listener: Mutex<Option<Arc<dyn BarListener>>>,
    /// Queue notifications that came through the bus (a VM exit) rather than an ioeventfd.
    notify_exits: AtomicU64,
}

fn class_of(device_type: u32) -> u32 {
    use super::device_type::*;
    match device_type {
        NET => 0x0200_0000,   // network, ethernet
        BLOCK => 0x0100_0000, // mass storage, SCSI (as QEMU's virtio-blk)
        _ => 0xff00_0000,     // unclassified
    }
}

impl VirtioPciDevice {
    fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<dyn IrqLine>,
        msi: Option<(u16, Arc<dyn MsiSink>)>,
        bar: u64,
        irq_line_number: u8,
    ) -> std::io::Result<Self> {
        let ty = device.device_type();
        let queues = device.queue_max_sizes().len();
        let msix = msi.map(|(vectors, sink)| Arc::new(Msix::new(vectors, queues, sink)));
        let mut interrupt = Interrupt::new_level(irq);
        if let Some(m) = &msix {
            interrupt = interrupt.with_messages(m.clone());
        }
        let core = Core::new(device, mem, interrupt)?;
        let mut regs = [0u32; 64];
        regs[0] = VIRTIO_VENDOR | ((0x1040 + ty) << 16);
        regs[1] = (0x10 << 16) | 0x2; // status: capability list; command: memory space
        regs[2] = class_of(ty) | 1; // revision 1: a modern-only device
        regs[11] = VIRTIO_VENDOR | (ty << 16);
        regs[13] = 0x40; // capabilities pointer
        regs[15] = (1 << 8) | u32::from(irq_line_number); // INTA#, line
                                                          // Vendor capabilities (cfg_type, offset, length), 16 bytes each, notify 20.
        let caps: [(u8, u64, u32); 4] = [
            (1, COMMON_OFF, 0x38),
            (3, ISR_OFF, 4),
            (4, DEVICE_OFF, 0x1000),
            (2, NOTIFY_OFF, 0x1000),
        ];
        let mut at = 0x40usize;
        for (i, (ty, off, len)) in caps.iter().enumerate() {
            let cap_len: u32 = if *ty == 2 { 20 } else { 16 };
            let next = match (i + 1 < caps.len(), &msix) {
                (true, _) => at + 16,
                (false, Some(_)) => MSIX_CAP,
                (false, None) => 0,
            };
            regs[at / 4] = 0x09 | ((next as u32) << 8) | (cap_len << 16) | (u32::from(*ty) << 24);
            regs[at / 4 + 1] = 0; // bar 0, id 0
            regs[at / 4 + 2] = *off as u32;
            regs[at / 4 + 3] = *len;
            if *ty == 2 {
                regs[at / 4 + 4] = NOTIFY_MULTIPLIER;
                // The notify cap is last and 20 bytes long; nothing follows it.
            }
            at += 16;
        }
        if msix.is_some() {
            // Capability ID 0x11, last in the list; message control is read live.
            regs[MSIX_CAP / 4] = 0x11;
            regs[MSIX_CAP / 4 + 1] = MSIX_TABLE_OFF as u32; // BIR 0
            regs[MSIX_CAP / 4 + 2] = MSIX_PBA_OFF as u32;
        }
        Ok(Self {
            core,
            cfg: Mutex::new(ConfigSpace {
                regs,
                bar,
                sizing: [false; 2],
            }),
            device_feature_select: AtomicU32::new(0),
            msix,
            bar_listener: Mutex::new(None),
            notify_exits: AtomicU64::new(0),
        })
    }

    /// Who hears of BAR moves from now on.
    pub fn set_bar_listener(&self, listener: Arc<dyn BarListener>) {
        *self.bar_listener.lock().unwrap_or_else(|e| e.into_inner()) = Some(listener);
    }

    fn bar_moved(&self, old: u64, new: u64) {
        if old == new {
            return;
        }
        let l = self
            .bar_listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(l) = l {
            l.bar_moved(self, old, new);
        }
    }

    /// Queue notifications that took the bus path (a VM exit), not an ioeventfd.
    pub fn notify_exits(&self) -> u64 {
        self.notify_exits.load(Ordering::Relaxed)
    }

    /// The BAR's programmed address (whether or not memory decoding is on).
    pub fn bar_address(&self) -> u64 {
        self.cfg().bar
    }

    /// The MSI-X state, if this function offers MSI-X.
    pub fn msix(&self) -> Option<&Arc<Msix>> {
        self.msix.as_ref()
    }

    fn vector(&self, f: impl FnOnce(&Msix) -> u16) -> u16 {
        self.msix.as_deref().map_or(NO_VECTOR, f)
    }

    fn cfg(&self) -> MutexGuard<'_, ConfigSpace> {
        self.cfg.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        self.core.interrupt()
    }

    pub fn is_activated(&self) -> bool {
        self.core.is_activated()
    }

    /// Each queue's notify address at the BAR's current place and the eventfd a write there
    /// signals: what to register as ioeventfds (any width, no datamatch). When the guest moves
    /// the BAR, the [`BarListener`] moves them (`notify_events_at` old and new).
    pub fn notify_events(&self) -> Vec<(u64, std::sync::Arc<vmm_sys_util::eventfd::EventFd>)> {
        self.notify_events_at(self.cfg().bar)
    }

    /// As `notify_events`, for the BAR at `bar`; the notify region's extent (`bar`..+len).
    pub fn notify_events_at(
        &self,
        bar: u64,
    ) -> Vec<(u64, std::sync::Arc<vmm_sys_util::eventfd::EventFd>)> {
        self.core
            .queue_events()
            .iter()
            .enumerate()
            .map(|(i, ev)| {
                (
                    bar + NOTIFY_OFF + i as u64 * u64::from(NOTIFY_MULTIPLIER),
                    ev.clone(),
                )
            })
            .collect()
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let r = self.core.lock();
        let sel = r.queue_sel as usize;
        let q = r.queues.get(sel);
        let v: u64 = match offset {
            0x00 => u64::from(self.device_feature_select.load(Ordering::SeqCst)),
            0x04 => match self.device_feature_select.load(Ordering::SeqCst) {
                0 => Core::offered_features(&r) & 0xffff_ffff,
                1 => Core::offered_features(&r) >> 32,
                _ => 0,
            },
            0x08 => u64::from(r.acked_features_sel),
            0x0c => match r.acked_features_sel {
                0 => r.acked_features & 0xffff_ffff,
                1 => r.acked_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.vector(|m| m.config_vector())),
            0x1a => u64::from(self.vector(|m| m.queue_vector(sel))),
            0x12 => r.queues.len() as u64,
            0x14 => u64::from((r.status | self.core.needs_reset_bit()) as u8),
            0x15 => u64::from(self.core.interrupt().config_generation() as u8),
            0x16 => u64::from(r.queue_sel as u16),
            0x18 => q.map_or(0, |q| u64::from(q.size())),
            0x1c => q.map_or(0, |q| u64::from(q.ready())),
            0x1e => sel as u64, // queue_notify_off: queue i notifies at NOTIFY_OFF + 4 * i
            0x20 => q.map_or(0, |q| q.desc_table()),
            0x24 => q.map_or(0, |q| q.desc_table() >> 32),
            0x28 => q.map_or(0, |q| q.avail_ring()),
            0x2c => q.map_or(0, |q| q.avail_ring() >> 32),
            0x30 => q.map_or(0, |q| q.used_ring()),
            0x34 => q.map_or(0, |q| q.used_ring() >> 32),
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&b[..n]);
    }

    fn common_write(&self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let v32 = v as u32;
        let mut r = self.core.lock();
        match offset {
            0x00 => self.device_feature_select.store(v32, Ordering::SeqCst),
            0x08 => r.acked_features_sel = v32,
            0x0c => Core::write_driver_features(&mut r, v32),
            0x10 => {
                if let Some(m) = &self.msix {
                    m.set_config_vector(v as u16);
                }
            }
            0x1a => {
                if let Some(m) = &self.msix {
                    m.set_queue_vector(r.queue_sel as usize, v as u16);
                }
            }
            0x14 => {
                if v32 & 0xff == 0 {
                    if let Some(m) = &self.msix {
                        m.reset_vectors();
                    }
                }
                self.core.set_status(&mut r, v32 & 0xff);
            }
            0x16 => r.queue_sel = v32 & 0xffff,
            0x18 => {
                if let Some(q) = self.core.selected_queue(&mut r) {
                    q.set_size(v as u16);
                }
            }
            0x1c => {
                if let Some(q) = self.core.selected_queue(&mut r) {
                    q.set_ready(v & 1 == 1);
                }
            }
            0x20 => self.with_queue(&mut r, |q| q.set_desc_table_address(Some(v32), None)),
            0x24 => self.with_queue(&mut r, |q| q.set_desc_table_address(None, Some(v32))),
            0x28 => self.with_queue(&mut r, |q| q.set_avail_ring_address(Some(v32), None)),
            0x2c => self.with_queue(&mut r, |q| q.set_avail_ring_address(None, Some(v32))),
            0x30 => self.with_queue(&mut r, |q| q.set_used_ring_address(Some(v32), None)),
            0x34 => self.with_queue(&mut r, |q| q.set_used_ring_address(None, Some(v32))),
            _ => {}
        }
        // 64-bit writes of the ring addresses (one access) set both halves.
        if data.len() == 8 && matches!(offset, 0x20 | 0x28 | 0x30) {
            let hi = Some((v >> 32) as u32);
            match offset {
                0x20 => self.with_queue(&mut r, |q| q.set_desc_table_address(None, hi)),
                0x28 => self.with_queue(&mut r, |q| q.set_avail_ring_address(None, hi)),
                _ => self.with_queue(&mut r, |q| q.set_used_ring_address(None, hi)),
            }
        }
    }

    fn with_queue(&self, r: &mut Registers, f: impl FnOnce(&mut virtio_queue::Queue)) {
        if let Some(q) = self.core.selected_queue(r) {
            f(q);
        }
    }
}

impl PciFunction for VirtioPciDevice {
    fn config_read(&self, reg: usize) -> u32 {
        let c = self.cfg();
        match reg {
            4 if c.sizing[0] => (!(BAR_SIZE as u32 - 1)) | 0x4,
            5 if c.sizing[1] => 0xffff_ffff,
            4 => (c.bar as u32) | 0x4, // 64-bit memory BAR, not prefetchable
            5 => (c.bar >> 32) as u32,
            r if r == MSIX_CAP / 4 => match &self.msix {
                Some(m) => (c.regs[r] & 0xffff) | (u32::from(m.control()) << 16),
                None => c.regs[r],
            },
            _ => c.regs.get(reg).copied().unwrap_or(0),
        }
    }

    fn config_write(&self, reg: usize, offset: usize, data: &[u8]) {
        let mut c = self.cfg();
        let mut cur = match reg {
            4 => c.bar as u32,
            5 => (c.bar >> 32) as u32,
            r if r == MSIX_CAP / 4 => match &self.msix {
                Some(m) => (c.regs[r] & 0xffff) | (u32::from(m.control()) << 16),
                None => c.regs[r],
            },
            _ => c.regs.get(reg).copied().unwrap_or(0),
        }
        .to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            if let Some(x) = cur.get_mut(offset + i) {
                *x = *b;
            }
        }
        let v = u32::from_le_bytes(cur);
        match reg {
            1 => {
                // Command: memory space (bit 1) and INTx disable (bit 10) are honoured.
                c.regs[1] = (c.regs[1] & 0xffff_0000) | (v & 0x0406);
            }
            4 | 5 => {
                let half = reg - 4;
                if v == 0xffff_ffff {
                    c.sizing[half] = true;
                } else {
                    c.sizing[half] = false;
                    let old = c.bar;
                    c.bar = if half == 0 {
                        (c.bar & !0xffff_ffff) | u64::from(v & !(BAR_SIZE as u32 - 1))
                    } else {
                        (c.bar & 0xffff_ffff) | (u64::from(v) << 32)
                    };
                    let new = c.bar;
                    drop(c);
                    self.bar_moved(old, new);
                }
            }
            15 => c.regs[15] = (c.regs[15] & !0xff) | (v & 0xff), // interrupt line
            r if r == MSIX_CAP / 4 && offset + data.len() > 2 => {
                if let Some(m) = &self.msix {
                    drop(c);
                    m.set_control((v >> 16) as u16);
                }
            }
            _ => {}
        }
    }

    fn bar(&self) -> Option<(u64, u64)> {
        let c = self.cfg();
        (c.regs[1] & 0x2 != 0 && !c.sizing[0]).then_some((c.bar, BAR_SIZE))
    }

    fn bar_read(&self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < ISR_OFF => self.common_read(o - COMMON_OFF, data),
            o if o < DEVICE_OFF => {
                data.fill(0);
                if let (ISR_OFF, Some(b)) = (o, data.first_mut()) {
                    *b = self.core.interrupt().read_and_clear() as u8;
                }
            }
            o if o < NOTIFY_OFF => {
                let r = self.core.lock();
                read_config_bytes(&r.device.config(), o - DEVICE_OFF, data);
            }
            o if (MSIX_TABLE_OFF..MSIX_PBA_OFF).contains(&o) => match &self.msix {
                Some(m) => m.table_read(o - MSIX_TABLE_OFF, data),
                None => data.fill(0),
            },
            o if (MSIX_PBA_OFF..MSIX_END).contains(&o) => match &self.msix {
                Some(m) => m.pba_read(o - MSIX_PBA_OFF, data),
                None => data.fill(0),
            },
            _ => data.fill(0),
        }
    }

    fn bar_write(&self, offset: u64, data: &[u8]) {
        match offset {
            o if o < ISR_OFF => self.common_write(o - COMMON_OFF, data),
            o if o < DEVICE_OFF => {}
            o if o < NOTIFY_OFF => {
                let mut r = self.core.lock();
                r.device.write_config(o - DEVICE_OFF, data);
            }
            o if o < MSIX_TABLE_OFF => {
                let q = (o - NOTIFY_OFF) / u64::from(NOTIFY_MULTIPLIER);
                self.notify_exits.fetch_add(1, Ordering::Relaxed);
                self.core.notify(q as u32);
            }
            o if o < MSIX_PBA_OFF => {
                if let Some(m) = &self.msix {
                    m.table_write(o - MSIX_TABLE_OFF, data);
                }
            }
            _ => {}
        }
    }
}

impl SaveRestore for VirtioPciDevice {
    fn save_state(&self) -> Result<TransportSnap, StateError> {
        let mut s = self.core.save()?;
        let c = self.cfg();
        s.pci = Some(PciSnap {
            command: c.regs[1] as u16,
            bar: c.bar,
            interrupt_line: c.regs[15] as u8,
            device_feature_select: self.device_feature_select.load(Ordering::SeqCst),
            msix: self.msix.as_ref().map(|m| m.save()),
        });
        Ok(s)
    }
    fn resume_saved(&self) {
        self.core.resume_saved();
    }
    fn restore_state(&self, saved: &TransportSnap) -> Result<(), StateError> {
        let Some(p) = &saved.pci else {
            return Err(StateError::Transport {
                saved: "mmio",
                found: "pci",
            });
        };
        if p.bar % BAR_SIZE != 0 {
            return Err(StateError::Mismatch(format!(
                "saved BAR address {:#x} is not {BAR_SIZE:#x}-aligned",
                p.bar
            )));
        }
        match (&self.msix, &p.msix) {
            (Some(m), Some(saved)) => m.restore(saved)?,
            (None, None) => {}
            // A snapshot from before MSI-X: the driver runs on INTx, as it did then.
            (Some(_), None) => {}
            (None, Some(_)) => {
                return Err(StateError::Mismatch(
                    "the snapshot has MSI-X state; this PCI function has no MSI-X".into(),
                ))
            }
        }
        self.core.restore(saved)?;
        let mut c = self.cfg();
        c.regs[1] = (c.regs[1] & 0xffff_0000) | (u32::from(p.command) & 0x0406);
        let old = c.bar;
        c.bar = p.bar;
        c.regs[15] = (c.regs[15] & !0xff) | u32::from(p.interrupt_line);
        c.sizing = [false; 2];
        drop(c);
        self.device_feature_select
            .store(p.device_feature_select, Ordering::SeqCst);
        // The guest had moved the BAR before the snapshot: its ioeventfds follow.
        self.bar_moved(old, p.bar);
        Ok(())
    }
}
