//! Saving and restoring a running virtio device: the worker parks between passes, the state
//! carries the ring positions, and a device rebuilt from it goes on where the old one stopped.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use common::{Rig, HEAP};
use corefour_devices::virtio::blk::{Block, BlockConfig};
use corefour_devices::virtio::driver::{CountingIrq, MmioDriver};
use corefour_devices::virtio::rng::Rng;
use corefour_devices::virtio::state::{DeviceSnap, SaveRestore, StateError, TransportSnap};
use corefour_devices::virtio::MmioTransport;
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(5);
const T_OUT: u32 = 1;

fn disk(sectors: u64) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&vec![0u8; (sectors * 512) as usize]).unwrap();
    f.flush().unwrap();
    f
}

fn block(path: &std::path::Path) -> Box<Block> {
    Box::new(
        Block::new(&BlockConfig {
            path: path.into(),
            ..Default::default()
        })
        .unwrap(),
    )
}

/// Publishes a one-sector write of `fill` to `sector` and notifies; returns the status address.
fn submit_write(d: &mut MmioDriver, sector: u64, fill: u8) -> (u16, GuestAddress) {
    let h = d.alloc(16);
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&T_OUT.to_le_bytes());
    raw[8..16].copy_from_slice(&sector.to_le_bytes());
    d.mem.write_slice(&raw, h).unwrap();
    let data = d.alloc(512);
    d.mem.write_slice(&[fill; 512], data).unwrap();
    let st = d.alloc(1);
    d.mem.write_obj(0xffu8, st).unwrap();
    let head = d
        .submit(0, &[(h, 16, false), (data, 512, false), (st, 1, true)])
        .unwrap();
    (head, st)
}

fn complete(d: &mut MmioDriver, head: u16, st: GuestAddress) {
    let (id, _) = d.wait_used(0, T).expect("request completed");
    assert_eq!(id, u32::from(head));
    assert_eq!(d.mem.read_obj::<u8>(st).unwrap(), 0, "status OK");
}

#[test]
fn blk_resumes_on_a_new_transport_where_it_stopped() {
    let file = disk(32);
    let rig = Rig::new(block(file.path()));
    let mut d = rig.driver(1, 64);
    for i in 0..3 {
        let (head, st) = submit_write(&mut d, i, 0x10 + i as u8);
        complete(&mut d, head, st);
    }

    let saved = rig.transport.save_state().unwrap();
    assert!(saved.activated);
    assert_eq!(saved.queues[0].next_avail, 3);
    assert_eq!(saved.queues[0].next_used, 3);
    assert!(matches!(
        saved.device,
        DeviceSnap::Block { sectors: 32, .. }
    ));
    // Through serde, as a snapshot stores it.
    let saved: TransportSnap =
        serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();

    // A request published while the device is parked is not touched.
    let (head, st) = submit_write(&mut d, 7, 0x77);
    assert!(
        d.wait_used(0, Duration::from_millis(200)).is_none(),
        "a parked device completed a request"
    );
    assert_eq!(d.mem.read_obj::<u8>(st).unwrap(), 0xff);

    // A new device on the same memory and disk takes over at the saved positions.
    let irq = Arc::new(CountingIrq::default());
    let fresh = MmioTransport::new(block(file.path()), rig.mem.clone(), irq.clone()).unwrap();
    fresh.restore_state(&saved).unwrap();
    assert!(fresh.is_activated());
    d.dev = &fresh;
    complete(&mut d, head, st);
    let (head, st) = submit_write(&mut d, 8, 0x88);
    complete(&mut d, head, st);
    assert!(irq.count() > 0, "the restored device interrupts");

    let data = std::fs::read(file.path()).unwrap();
    for (sector, fill) in [(0, 0x10), (1, 0x11), (2, 0x12), (7, 0x77), (8, 0x88)] {
        assert!(
            data[sector * 512..(sector + 1) * 512]
                .iter()
                .all(|b| *b == fill),
            "sector {sector}"
        );
    }
    // A transport restored once refuses a second load.
    assert!(matches!(
        fresh.restore_state(&saved),
        Err(StateError::Mismatch(_))
    ));
}

#[test]
fn a_saved_device_resumes_in_place() {
    let file = disk(8);
    let rig = Rig::new(block(file.path()));
    let mut d = rig.driver(1, 64);
    let s1 = rig.transport.save_state().unwrap();
    // Saving twice while parked gives the same state.
    assert_eq!(rig.transport.save_state().unwrap(), s1);
    let (head, st) = submit_write(&mut d, 1, 0x5a);
    assert!(d.wait_used(0, Duration::from_millis(100)).is_none());
    rig.transport.resume_saved();
    complete(&mut d, head, st);
}

#[test]
fn restore_refuses_state_that_does_not_fit() {
    let file = disk(16);
    let rig = Rig::new(block(file.path()));
    let _d = rig.driver(1, 64);
    let saved = rig.transport.save_state().unwrap();
    let mem = rig.mem.clone();
    let new = |dev| MmioTransport::new(dev, mem.clone(), Arc::new(CountingIrq::default())).unwrap();

    let err = new(Box::new(Rng::new())).restore_state(&saved).unwrap_err();
    assert!(
        matches!(err, StateError::DeviceType { saved: 2, found: 4 }),
        "{err}"
    );

    let bigger = disk(17);
    let err = new(block(bigger.path())).restore_state(&saved).unwrap_err();
    assert!(err.to_string().contains("17 sectors now but 16"), "{err}");

    let mut bad = saved.clone();
    bad.queues[0].size = 3;
    let err = new(block(file.path())).restore_state(&bad).unwrap_err();
    assert!(matches!(err, StateError::Queue { index: 0, .. }), "{err}");

    let mut bad = saved.clone();
    bad.queues.push(bad.queues[0]);
    assert!(matches!(
        new(block(file.path())).restore_state(&bad),
        Err(StateError::QueueCount { saved: 2, found: 1 })
    ));

    let mut bad = saved.clone();
    bad.acked_features |= 1 << 40;
    assert!(new(block(file.path())).restore_state(&bad).is_err());

    let mut bad = saved.clone();
    bad.device = DeviceSnap::Rng;
    assert!(new(block(file.path())).restore_state(&bad).is_err());

    // Rings outside guest memory fail at activation, not later in the worker.
    let mut bad = saved;
    bad.queues[0].used_ring = 1 << 40;
    let err = new(block(file.path())).restore_state(&bad).unwrap_err();
    assert!(matches!(err, StateError::Activate(_)), "{err}");
}

#[test]
fn an_inactive_device_round_trips() {
    let rig = Rig::new(Box::new(Rng::new()));
    let saved = rig.transport.save_state().unwrap();
    assert!(!saved.activated);
    let t = MmioTransport::new(
        Box::new(Rng::new()),
        rig.mem.clone(),
        Arc::new(CountingIrq::default()),
    )
    .unwrap();
    t.restore_state(&saved).unwrap();
    assert!(!t.is_activated());
    // The driver can still bring it up from scratch.
    let d = MmioDriver::init(&t, rig.mem.clone(), 1, 64, common::RINGS, HEAP, u64::MAX);
    assert!(d.is_ok());
}

#[test]
fn pages_a_device_writes_are_in_the_device_log() {
    use corefour_devices::virtio::dirty;
    let file = disk(8);
    let rig = Rig::new(block(file.path()));
    let mut d = rig.driver(1, 64);
    dirty::start(common::MEM_SIZE as u64);
    // A read: the data buffer and status byte are device-writable.
    let h = d.alloc(16);
    d.mem.write_slice(&[0u8; 16], h).unwrap();
    let data = GuestAddress(0x80_0000);
    let st = GuestAddress(0x90_0000);
    let head = d
        .submit(0, &[(h, 16, false), (data, 4096, true), (st, 1, true)])
        .unwrap();
    let (id, _) = d.wait_used(0, T).expect("read completed");
    assert_eq!(id, u32::from(head));
    let map = dirty::region(0, common::MEM_SIZE as u64);
    let bit = |addr: u64| map[(addr >> 12) as usize / 64] & (1 << ((addr >> 12) % 64)) != 0;
    assert!(bit(data.0) && bit(st.0), "device-written pages are logged");
    // The used ring is written by the device model: the saved state names it.
    let saved = rig.transport.save_state().unwrap();
    let rings = saved.used_rings();
    assert_eq!(rings.len(), 1);
    assert_eq!(rings[0].1, 6 + 8 * 64);
    rig.transport.resume_saved();
}

#[test]
fn a_restored_vsock_tells_the_guest_its_transport_was_reset() {
    use corefour_devices::virtio::vsock::{Vsock, VsockConfig};
    let dir = tempfile::tempdir().unwrap();
    let vsock = |cid| {
        Box::new(Vsock::new(VsockConfig {
            cid,
            uds_path: dir.path().join("v.sock"),
        }))
    };
    let rig = Rig::new(vsock(42));
    let mut d = rig.driver(3, 64);
    // The guest keeps one buffer on the event queue, as Linux does.
    let ev = d.alloc(8);
    d.mem.write_slice(&[0xffu8; 8], ev).unwrap();
    let head = d.submit(2, &[(ev, 8, true)]).unwrap();
    assert!(d.wait_used(2, Duration::from_millis(100)).is_none());
    let saved = rig.transport.save_state().unwrap();
    assert_eq!(saved.queues.len(), 3);
    assert!(matches!(saved.device, DeviceSnap::Vsock { cid: 42 }));

    // Restored, with a new CID (as a clone would be): one TRANSPORT_RESET event (id 0).
    let fresh = MmioTransport::new(vsock(43), rig.mem.clone(), rig.irq.clone()).unwrap();
    fresh.restore_state(&saved).unwrap();
    d.dev = &fresh;
    let (id, len) = d.wait_used(2, T).expect("reset event");
    assert_eq!((id, len), (u32::from(head), 4));
    assert_eq!(d.mem.read_obj::<u32>(ev).unwrap(), 0);
    let mut cid = [0u8; 8];
    corefour_devices::BusDevice::read(&fresh, 0x100, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 43);
}

#[test]
fn a_restored_balloon_keeps_its_sizes_and_the_held_stats_buffer() {
    use corefour_devices::virtio::balloon::Balloon;
    let dev = Balloon::new(0, Some(Duration::from_secs(3600)));
    let handle = dev.handle();
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(3, 64);
    handle.set_target_pages(64);
    // The driver reports `actual` and lends a stats buffer, which the device keeps.
    corefour_devices::BusDevice::write(&*rig.transport, 0x104, &48u32.to_le_bytes());
    let stats = d.alloc(10);
    d.mem.write_slice(&[0u8; 10], stats).unwrap();
    let head = d.submit(2, &[(stats, 10, false)]).unwrap();
    let t = std::time::Instant::now();
    while handle.status().stats_updated.is_none() {
        assert!(t.elapsed() < T, "stats buffer never taken");
        std::thread::sleep(Duration::from_millis(5));
    }
    let saved = rig.transport.save_state().unwrap();
    assert_eq!(
        saved.device,
        DeviceSnap::Balloon {
            target_pages: 64,
            actual_pages: 48
        }
    );
    // The held buffer goes back to the avail side, so a restored device takes it again.
    assert_eq!(saved.queues[2].next_avail, 0);

    let dev = Balloon::new(0, Some(Duration::from_millis(50)));
    let h2 = dev.handle();
    let fresh = MmioTransport::new(Box::new(dev), rig.mem.clone(), rig.irq.clone()).unwrap();
    fresh.restore_state(&saved).unwrap();
    let s = h2.status();
    assert_eq!((s.target_pages, s.actual_pages), (64, 48));
    // The restored device holds the buffer again and returns it when it wants fresh stats.
    d.dev = &fresh;
    let (id, _) = d.wait_used(2, T).expect("stats buffer returned");
    assert_eq!(id, u32::from(head));
}
