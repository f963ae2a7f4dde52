//! virtio-blk interrupt suppression as the driver asks for it: with event idx an interrupt
//! exactly when the used index passes `used_event` (mid-pass, not only when the ring is empty),
//! without it none while the driver sets VRING_AVAIL_F_NO_INTERRUPT.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{Rig, HEAP, RINGS};
use corefour_devices::virtio::blk::{self, Block, BlockConfig};
use corefour_devices::virtio::driver::MmioDriver;
use corefour_devices::virtio::features;
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(5);

fn rig() -> (Rig, tempfile::NamedTempFile) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&vec![0x11; 64 * 512]).unwrap();
    let dev = Block::new(&BlockConfig {
        path: f.path().into(),
        ..Default::default()
    })
    .unwrap();
    (Rig::new(Box::new(dev)), f)
}

/// Queues `n` one-sector reads without publishing them; returns their status addresses.
fn queue_reads(d: &mut MmioDriver, n: usize) -> Vec<GuestAddress> {
    (0..n)
        .map(|i| {
            let h = d.alloc(16);
            let mut raw = [0u8; 16];
            raw[0..4].copy_from_slice(&blk::T_IN.to_le_bytes());
            raw[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            d.mem.write_slice(&raw, h).unwrap();
            let buf = d.alloc(512);
            let st = d.alloc(1);
            d.mem.write_obj(0xffu8, st).unwrap();
            d.queue_chain(0, &[(h, 16, false), (buf, 512, true), (st, 1, true)])
                .unwrap();
            st
        })
        .collect()
}

fn complete(d: &mut MmioDriver, statuses: &[GuestAddress]) {
    for _ in statuses {
        d.wait_used(0, T).expect("request completed");
    }
    for &st in statuses {
        assert_eq!(d.mem.read_obj::<u8>(st).unwrap(), blk::S_OK);
    }
}

#[test]
fn event_idx_interrupts_once_when_used_event_is_crossed() {
    let (rig, _f) = rig();
    let mut d = rig.driver(1, 64);
    assert_ne!(
        d.features & features::RING_EVENT_IDX,
        0,
        "event idx negotiated"
    );

    // Eight requests, an interrupt wanted after the fourth: exactly one, though the device
    // serves all eight in one pass and the ring is empty at its end.
    let st = queue_reads(&mut d, 8);
    d.arm_interrupt_after(0, 4).unwrap();
    let irq0 = rig.irq.count();
    d.publish_with(0, false).unwrap();
    complete(&mut d, &st);
    assert!(rig.irq.wait_past(irq0, T) > irq0, "the crossing interrupts");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rig.irq.count(), irq0 + 1, "and nothing else does");

    // used_event beyond what is in flight: no interrupt at all.
    let st = queue_reads(&mut d, 4);
    d.arm_interrupt_after(0, 100).unwrap();
    let irq1 = rig.irq.count();
    d.publish_with(0, false).unwrap();
    complete(&mut d, &st);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rig.irq.count(), irq1, "suppressed");

    // Re-armed for the next entry (Linux's virtqueue_enable_cb): the next completion fires.
    d.arm_interrupt(0).unwrap();
    let st = queue_reads(&mut d, 1);
    d.publish_with(0, false).unwrap();
    complete(&mut d, &st);
    assert!(rig.irq.wait_past(irq1, T) > irq1);
}

#[test]
fn without_event_idx_the_no_interrupt_flag_is_honoured() {
    let (rig, _f) = rig();
    let mut d = MmioDriver::init(
        &*rig.transport,
        rig.mem.clone(),
        1,
        64,
        RINGS,
        HEAP,
        !features::RING_EVENT_IDX,
    )
    .expect("driver init");
    assert_eq!(d.features & features::RING_EVENT_IDX, 0);
    let avail = d.queues[0].avail;

    d.mem.write_obj(1u16, avail).unwrap(); // VRING_AVAIL_F_NO_INTERRUPT
    let irq0 = rig.irq.count();
    let st = queue_reads(&mut d, 4);
    d.publish(0).unwrap();
    complete(&mut d, &st);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rig.irq.count(), irq0, "the driver said no interrupts");

    d.mem.write_obj(0u16, avail).unwrap();
    let st = queue_reads(&mut d, 4);
    assert!(d.publish(0).unwrap(), "no event idx: every publish kicks");
    complete(&mut d, &st);
    assert!(rig.irq.wait_past(irq0, T) > irq0, "interrupts again");
}
