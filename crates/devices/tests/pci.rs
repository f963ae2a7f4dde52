//! virtio-pci end to end at the device level: a driver enumerates bus 0 through ports
//! 0xcf8/0xcfc, sizes the BAR, walks the virtio capabilities, brings a virtio-blk function up
//! through its common config and reads a sector; INTx is level-triggered and cleared by the
//! ISR read.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{memory, HEAP, RINGS};
use corefour_devices::virtio::blk::{self, Block, BlockConfig};
use corefour_devices::virtio::driver::{DriverQueue, MmioDriver};
use corefour_devices::virtio::pci::{PciBarWindow, PciRoot, BAR_SIZE};
use corefour_devices::virtio::pci_msix::MsiSink;
use corefour_devices::virtio::rng::Rng;
use corefour_devices::{BusDevice, IrqLine};
use vm_memory::{Bytes, GuestAddress};

const WINDOW: u64 = 0xe000_0000;

#[derive(Default)]
struct Level(AtomicBool);
impl IrqLine for Level {
    fn trigger(&self) {}
    fn set_level(&self, level: bool) {
        self.0.store(level, Ordering::SeqCst);
    }
}

struct Cfg<'a>(&'a PciRoot);
impl Cfg<'_> {
    fn addr(slot: u32, reg: u32) -> u32 {
        0x8000_0000 | (slot << 11) | (reg & 0xfc)
    }
    fn read32(&self, slot: u32, reg: u32) -> u32 {
        self.0.write(0, &Self::addr(slot, reg).to_le_bytes());
        let mut b = [0u8; 4];
        self.0.read(4, &mut b);
        u32::from_le_bytes(b)
    }
    fn read8(&self, slot: u32, reg: u32) -> u8 {
        self.0.write(0, &Self::addr(slot, reg).to_le_bytes());
        let mut b = [0u8; 1];
        self.0.read(4 + u64::from(reg & 3), &mut b);
        b[0]
    }
    fn write32(&self, slot: u32, reg: u32, v: u32) {
        self.0.write(0, &Self::addr(slot, reg).to_le_bytes());
        self.0.write(4, &v.to_le_bytes());
    }
}

/// (common, isr, device, notify, multiplier) offsets inside BAR0, from the capability list.
fn virtio_caps(cfg: &Cfg, slot: u32) -> (u64, u64, u64, u64, u64) {
    let mut caps = [None; 5];
    let mut mult = 0;
    let mut at = cfg.read8(slot, 0x34) as u32;
    let mut guard = 0;
    while at != 0 && guard < 48 {
        guard += 1;
        if cfg.read8(slot, at) == 0x09 {
            let ty = cfg.read8(slot, at + 3) as usize;
            assert_eq!(cfg.read8(slot, at + 4), 0, "BAR 0");
            let off = cfg.read32(slot, at + 8) as u64;
            if ty < 5 {
                caps[ty] = Some(off);
            }
            if ty == 2 {
                mult = cfg.read32(slot, at + 16) as u64;
            }
        }
        at = cfg.read8(slot, at + 1) as u32;
    }
    (
        caps[1].expect("common cap"),
        caps[3].expect("isr cap"),
        caps[4].expect("device cap"),
        caps[2].expect("notify cap"),
        mult,
    )
}

#[test]
fn enumerate_and_read_a_sector_over_pci() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let mut data = vec![0u8; 16 * 512];
    data[3 * 512..4 * 512].fill(0x5e);
    f.write_all(&data).unwrap();
    let mem = memory();
    let irq = Arc::new(Level::default());
    let mut root = PciRoot::new(WINDOW, 0x10_0000);
    let blk_dev = Block::new(&BlockConfig {
        path: f.path().into(),
        ..Default::default()
    })
    .unwrap();
    let (slot, dev) = root
        .add_virtio(Box::new(blk_dev), mem.clone(), irq.clone(), 11)
        .unwrap();
    root.add_virtio(Box::new(Rng::new()), mem.clone(), irq.clone(), 12)
        .unwrap();
    let root = Arc::new(root);
    let cfg = Cfg(&root);
    let slot = slot as u32;

    // Bus 0: host bridge, virtio-blk (1af4:1042), virtio-rng (1af4:1044), then nothing.
    assert_eq!(cfg.read32(0, 0), 0x1237_8086);
    assert_eq!(cfg.read32(slot, 0), 0x1042_1af4);
    assert_eq!(cfg.read32(2, 0), 0x1044_1af4);
    assert_eq!(cfg.read32(3, 0), 0xffff_ffff);
    assert_eq!(
        cfg.read32(slot, 0x2c) >> 16,
        2,
        "subsystem id = virtio device type"
    );
    assert_eq!(cfg.read8(slot, 0x3d), 1, "INTA#");
    assert_eq!(cfg.read8(slot, 0x3c), 11, "interrupt line");

    // BAR sizing, then place it elsewhere in the window.
    let bar0 = cfg.read32(slot, 0x10);
    assert_eq!(bar0 & 0x7, 0x4, "64-bit memory BAR");
    cfg.write32(slot, 0x10, 0xffff_ffff);
    assert_eq!(cfg.read32(slot, 0x10) & !0xf, !(BAR_SIZE as u32 - 1));
    let bar = WINDOW + 0x8_0000;
    cfg.write32(slot, 0x10, bar as u32);
    cfg.write32(slot, 0x14, (bar >> 32) as u32);
    assert_eq!(u64::from(cfg.read32(slot, 0x10) & !0xf), bar & 0xffff_ffff);

    let (common, isr, device, notify, mult) = virtio_caps(&cfg, slot);
    assert_eq!(mult, 4);
    let window = PciBarWindow::new(root.clone());
    let base = bar - WINDOW;
    let w = |off: u64, bytes: &[u8]| window.write(base + off, bytes);
    let r = |off: u64, n: usize| {
        let mut b = vec![0u8; n];
        window.read(base + off, &mut b);
        b
    };
    let r32 = |off: u64| u32::from_le_bytes(r(off, 4).try_into().unwrap());

    // Capacity from the device config region.
    assert_eq!(u64::from_le_bytes(r(device, 8).try_into().unwrap()), 16);

    // The virtio handshake through the common config.
    w(common + 0x14, &[0]);
    w(common + 0x14, &[1]);
    w(common + 0x14, &[3]);
    w(common, &1u32.to_le_bytes());
    assert_eq!(r32(common + 4) & 1, 1, "VERSION_1 offered");
    w(common + 0x08, &1u32.to_le_bytes());
    w(common + 0x0c, &1u32.to_le_bytes());
    w(common + 0x14, &[3 | 8]);
    assert_eq!(r(common + 0x14, 1)[0] & 8, 8, "FEATURES_OK");
    assert_eq!(
        u16::from_le_bytes(r(common + 0x12, 2).try_into().unwrap()),
        1
    );
    assert_eq!(
        u16::from_le_bytes(r(common + 0x10, 2).try_into().unwrap()),
        0xffff,
        "no MSI-X"
    );
    w(common + 0x16, &0u16.to_le_bytes());
    w(common + 0x18, &16u16.to_le_bytes());
    let (dq, _) = DriverQueue::layout(&mem, RINGS, 16).unwrap();
    w(common + 0x20, &dq.desc.0.to_le_bytes()); // one 64-bit write
    w(common + 0x28, &(dq.avail.0 as u32).to_le_bytes()); // two 32-bit halves
    w(common + 0x2c, &((dq.avail.0 >> 32) as u32).to_le_bytes());
    w(common + 0x30, &dq.used.0.to_le_bytes());
    let notify_off = u16::from_le_bytes(r(common + 0x1e, 2).try_into().unwrap());
    w(common + 0x1c, &1u16.to_le_bytes());
    w(common + 0x14, &[3 | 8 | 4]);
    assert!(dev.is_activated());

    // A read request through the rings; completion raises INTx until the ISR is read.
    let mut d = MmioDriver::with_queues(
        &window,
        mem.clone(),
        vec![dq],
        HEAP,
        1 << 32,
        (base + notify + u64::from(notify_off) * mult, mult),
    );
    let h = d.alloc(16);
    let mut hdr = [0u8; 16];
    hdr[8] = 3;
    d.mem.write_slice(&hdr, h).unwrap();
    let buf = d.alloc(512);
    let st = d.alloc(1);
    d.submit(0, &[(h, 16, false), (buf, 512, true), (st, 1, true)])
        .unwrap();
    let (_, len) = d.wait_used(0, Duration::from_secs(5)).expect("completed");
    assert_eq!(len, 513);
    assert_eq!(d.mem.read_obj::<u8>(st).unwrap(), blk::S_OK);
    let mut got = [0u8; 512];
    d.mem.read_slice(&mut got, buf).unwrap();
    assert_eq!(got, [0x5e; 512]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !irq.0.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(irq.0.load(Ordering::SeqCst), "INTx asserted");
    assert_eq!(r(isr, 1)[0] & 1, 1, "ISR: queue interrupt");
    assert!(!irq.0.load(Ordering::SeqCst), "ISR read deasserts INTx");
    assert_eq!(r(isr, 1)[0], 0, "ISR cleared by the read");

    // Memory decoding off: the BAR stops answering.
    cfg.write32(slot, 0x04, 0);
    assert_eq!(r32(common + 4), 0xffff_ffff);
    let _ = GuestAddress(0);
}

#[test]
fn hostile_config_accesses_are_harmless() {
    let mem = memory();
    // With MSI-X, so random writes also reach message control, the table and the PBA.
    let mut root = PciRoot::new(WINDOW, 0x10_0000).with_msi(Arc::new(Messages::default()));
    root.add_virtio(Box::new(Rng::new()), mem, Arc::new(Level::default()), 5)
        .unwrap();
    let root = Arc::new(root);
    let window = PciBarWindow::new(root.clone());
    let mut x: u64 = 0x1234_5678_9abc_def0;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = [1usize, 2, 4, 8][(x & 3) as usize];
        let mut b = vec![(x >> 8) as u8; len];
        let port = (x >> 16) % 8;
        match (x >> 20) % 4 {
            0 => root.read(port, &mut b),
            1 => root.write(port, &b),
            2 => window.read((x >> 24) % 0x10_0000, &mut b),
            _ => window.write((x >> 24) % 0x10_0000, &b),
        }
    }
}

#[derive(Default)]
struct Messages(std::sync::Mutex<Vec<(u64, u32)>>);
impl MsiSink for Messages {
    fn send(&self, _vector: u16, address: u64, data: u32) {
        self.0.lock().unwrap().push((address, data));
    }
}

/// MSI-X as Linux's virtio_pci drives it: find capability 0x11, program the table in the BAR,
/// enable it in message control, assign vectors through the common config; a completed
/// request then arrives as the queue vector's message and INTx stays low.
#[test]
fn msix_vectors_carry_the_queue_interrupt_and_intx_stays_quiet() {
    let mem = memory();
    let irq = Arc::new(Level::default());
    let sent = Arc::new(Messages::default());
    let mut root = PciRoot::new(WINDOW, 0x10_0000).with_msi(sent.clone());
    let (slot, dev) = root
        .add_virtio(Box::new(Rng::new()), mem.clone(), irq.clone(), 5)
        .unwrap();
    let root = Arc::new(root);
    let cfg = Cfg(&root);
    let slot = slot as u32;

    let mut at = u32::from(cfg.read8(slot, 0x34));
    let mut msix = None;
    while at != 0 {
        if cfg.read8(slot, at) == 0x11 {
            msix = Some(at);
        }
        at = u32::from(cfg.read8(slot, at + 1));
    }
    let cap = msix.expect("an MSI-X capability in the list");
    let control = cfg.read32(slot, cap) >> 16;
    assert_eq!(control & 0x7ff, 1, "two vectors: config + one queue");
    assert_eq!(control & 0xc000, 0, "disabled and unmasked after reset");
    let table = cfg.read32(slot, cap + 4);
    let pba = cfg.read32(slot, cap + 8);
    assert_eq!((table & 7, pba & 7), (0, 0), "both in BAR 0");
    let (table, pba) = (u64::from(table & !7), u64::from(pba & !7));
    assert!(table + 2 * 16 <= BAR_SIZE && pba + 8 <= BAR_SIZE);

    let (common, _, _, notify, mult) = virtio_caps(&cfg, slot);
    let bar = u64::from(cfg.read32(slot, 0x10) & !0xf);
    let window = PciBarWindow::new(root.clone());
    let base = bar - WINDOW;
    let w = |off: u64, bytes: &[u8]| window.write(base + off, bytes);
    let r = |off: u64, n: usize| {
        let mut b = vec![0u8; n];
        window.read(base + off, &mut b);
        b
    };
    let r16 = |off: u64| u16::from_le_bytes(r(off, 2).try_into().unwrap());

    for (v, data) in [(0u64, 0x30u32), (1, 0x31)] {
        w(table + v * 16, &0xfee0_0000u64.to_le_bytes());
        w(table + v * 16 + 8, &data.to_le_bytes());
        w(table + v * 16 + 12, &0u32.to_le_bytes());
    }
    // Enable: a 16-bit write of message control, as Linux does.
    root.write(0, &(0x8000_0000u32 | (slot << 11) | cap).to_le_bytes());
    root.write(4 + 2, &0x8000u16.to_le_bytes());
    assert_eq!(cfg.read32(slot, cap) >> 31, 1, "enabled");

    w(common + 0x14, &[0]);
    w(common + 0x14, &[1 | 2]);
    w(common + 0x08, &1u32.to_le_bytes());
    w(common + 0x0c, &1u32.to_le_bytes());
    w(common + 0x14, &[3 | 8]);
    w(common + 0x10, &5u16.to_le_bytes());
    assert_eq!(r16(common + 0x10), 0xffff, "vector past the table refused");
    w(common + 0x10, &0u16.to_le_bytes());
    assert_eq!(r16(common + 0x10), 0);
    w(common + 0x16, &0u16.to_le_bytes());
    w(common + 0x1a, &1u16.to_le_bytes());
    assert_eq!(r16(common + 0x1a), 1);
    w(common + 0x18, &16u16.to_le_bytes());
    let (dq, _) = DriverQueue::layout(&mem, RINGS, 16).unwrap();
    w(common + 0x20, &dq.desc.0.to_le_bytes());
    w(common + 0x28, &dq.avail.0.to_le_bytes());
    w(common + 0x30, &dq.used.0.to_le_bytes());
    let notify_off = u64::from(r16(common + 0x1e));
    w(common + 0x1c, &1u16.to_le_bytes());
    w(common + 0x14, &[3 | 8 | 4]);
    assert!(dev.is_activated());

    let mut d = MmioDriver::with_queues(
        &window,
        mem.clone(),
        vec![dq],
        HEAP,
        1 << 32,
        (base + notify + notify_off * mult, mult),
    );
    let buf = d.alloc(32);
    d.submit(0, &[(buf, 32, true)]).unwrap();
    let (_, len) = d.wait_used(0, Duration::from_secs(5)).expect("completed");
    assert_eq!(len, 32);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sent.0.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        sent.0.lock().unwrap().as_slice(),
        &[(0xfee0_0000, 0x31)],
        "the queue's vector, once"
    );
    assert!(!irq.0.load(Ordering::SeqCst), "INTx stays low under MSI-X");
    assert_eq!(dev.interrupt().isr(), 0, "the ISR is not used under MSI-X");
    let mut pending = [0u8; 8];
    window.read(base + pba, &mut pending);
    assert_eq!(pending, [0; 8]);

    // A device reset forgets the vector assignment (the driver assigns them again).
    w(common + 0x14, &[0]);
    assert_eq!(r16(common + 0x10), 0xffff);
}

#[derive(Default)]
struct Moves(std::sync::Mutex<Vec<(u64, u64, Vec<u64>)>>);
impl corefour_devices::virtio::pci::BarListener for Moves {
    fn bar_moved(&self, dev: &corefour_devices::virtio::pci::VirtioPciDevice, old: u64, new: u64) {
        let notify: Vec<u64> = dev.notify_events_at(new).iter().map(|(a, _)| *a).collect();
        self.0.lock().unwrap().push((old, new, notify));
    }
}

/// A guest that reprograms the BAR tells the listener (old, new) once per real move, not for
/// sizing (all-ones) or rewriting the same address; the notify addresses follow; a restore
/// into a fresh function reports the saved place; notifications through the bus are counted.
#[test]
fn bar_moves_reach_the_listener_and_restores_report_them() {
    use corefour_devices::virtio::state::SaveRestore;
    let mem = memory();
    let mut root = PciRoot::new(WINDOW, 0x100_0000);
    let (slot, dev) = root
        .add_virtio(
            Box::new(Rng::new()),
            mem.clone(),
            Arc::new(Level::default()),
            5,
        )
        .unwrap();
    let moves = Arc::new(Moves::default());
    dev.set_bar_listener(moves.clone());
    let root = Arc::new(root);
    let cfg = Cfg(&root);
    let slot = slot as u32;
    let bar = u64::from(cfg.read32(slot, 0x10) & !0xf);
    assert_eq!(bar, WINDOW);
    // Sizing and writing back the same value: no move.
    cfg.write32(slot, 0x10, 0xffff_ffff);
    assert_eq!(cfg.read32(slot, 0x10) & !0xf, !(BAR_SIZE as u32 - 1));
    cfg.write32(slot, 0x10, bar as u32);
    assert!(moves.0.lock().unwrap().is_empty());
    let new = WINDOW + 0x80_0000;
    cfg.write32(slot, 0x10, new as u32);
    cfg.write32(slot, 0x14, 0);
    {
        let m = moves.0.lock().unwrap();
        assert_eq!(m.len(), 1, "{m:x?}");
        assert_eq!((m[0].0, m[0].1), (bar, new));
        assert_eq!(
            m[0].2,
            vec![new + 0x3000],
            "rng's one queue notifies at NOTIFY_OFF"
        );
    }
    assert_eq!(dev.bar_address(), new);
    // A notify at the new place through the bus (no ioeventfd here) is counted.
    let window = PciBarWindow::new(root.clone());
    window.write(new - WINDOW + 0x3000, &0u16.to_le_bytes());
    assert_eq!(dev.notify_exits(), 1);
    // The saved state holds the moved BAR; a fresh function restored from it reports it.
    let saved = dev.save_state().unwrap();
    dev.resume_saved();
    let mut root2 = PciRoot::new(WINDOW, 0x100_0000);
    let (_, dev2) = root2
        .add_virtio(Box::new(Rng::new()), mem, Arc::new(Level::default()), 5)
        .unwrap();
    let moves2 = Arc::new(Moves::default());
    dev2.set_bar_listener(moves2.clone());
    dev2.restore_state(&saved).unwrap();
    let m = moves2.0.lock().unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!((m[0].0, m[0].1), (WINDOW, new));
}
