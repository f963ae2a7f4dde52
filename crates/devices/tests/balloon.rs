//! virtio-balloon end to end at the device level: target in config space with a config
//! interrupt, inflated pages handed back to the host (they read as zero afterwards), actual
//! size written by the driver, statistics read from the stats queue.

mod common;

use std::time::{Duration, Instant};

use common::Rig;
use corefour_devices::virtio::balloon::Balloon;
use corefour_devices::BusDevice;
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(5);

#[test]
fn inflate_deflate_and_stats() {
    let dev = Balloon::new(0, Some(Duration::from_millis(50)));
    let handle = dev.handle();
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(3, 64);

    // The host raises the target: config interrupt, new value in config space.
    let irq0 = rig.irq.count();
    handle.set_target_pages(16);
    assert!(rig.irq.wait_past(irq0, T) > irq0);
    assert_ne!(rig.transport.interrupt().isr() & 2, 0);
    let mut b = [0u8; 4];
    rig.transport.read(0x100, &mut b);
    assert_eq!(u32::from_le_bytes(b), 16);

    // Guest pages at 8 MiB.. hold data; the driver inflates 16 of them (plus a bogus PFN).
    let base_pfn = (8u32 << 20) >> 12;
    for i in 0..16u64 {
        d.mem
            .write_slice(&[0xaa; 4096], GuestAddress((u64::from(base_pfn) + i) << 12))
            .unwrap();
    }
    let mut pfns: Vec<u8> = (0..16u32)
        .flat_map(|i| (base_pfn + i).to_le_bytes())
        .collect();
    pfns.extend_from_slice(&0xffff_fff0u32.to_le_bytes());
    let list = d.alloc(pfns.len() as u64);
    d.mem.write_slice(&pfns, list).unwrap();
    d.submit(0, &[(list, pfns.len() as u32, false)]).unwrap();
    assert!(d.wait_used(0, T).is_some());
    let mut page = vec![0u8; 4096];
    d.mem
        .read_slice(&mut page, GuestAddress(u64::from(base_pfn) << 12))
        .unwrap();
    assert!(
        page.iter().all(|&x| x == 0),
        "inflated page returned to the host"
    );
    assert_eq!(handle.status().inflated_pages, 16);
    rig.transport.write(0x104, &16u32.to_le_bytes());
    assert_eq!(handle.status().actual_pages, 16);

    // Deflate 4.
    let list = d.alloc(16);
    d.mem.write_slice(&pfns[..16], list).unwrap();
    d.submit(1, &[(list, 16, false)]).unwrap();
    assert!(d.wait_used(1, T).is_some());
    assert_eq!(handle.status().inflated_pages, 12);

    // Stats: the driver lends a buffer; the device keeps it and returns it to ask again.
    let mut stats = Vec::new();
    for (tag, v) in [(4u16, 1000u64), (5, 2000)] {
        stats.extend_from_slice(&tag.to_le_bytes());
        stats.extend_from_slice(&v.to_le_bytes());
    }
    let sb = d.alloc(stats.len() as u64);
    d.mem.write_slice(&stats, sb).unwrap();
    d.submit(2, &[(sb, stats.len() as u32, false)]).unwrap();
    let deadline = Instant::now() + T;
    while handle.status().stats.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(handle.status().stats, vec![(4, 1000), (5, 2000)]);
    assert!(
        d.wait_used(2, T).is_some(),
        "buffer returned after the stats interval"
    );
}
