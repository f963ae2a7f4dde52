//! Shared by the fuzz targets: one device behind the MMIO transport, driven from raw bytes.

use std::sync::Arc;
use std::time::Duration;

use corefour_devices::virtio::driver::{CountingIrq, MmioDriver};
use corefour_devices::virtio::{MmioTransport, VirtioDevice};
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub const MEM: u64 = 4 << 20;

/// Feeds `data` to queue `q` of `dev` (with `nqueues` queues); panics only if the device hangs.
pub fn run(dev: Box<dyn VirtioDevice>, nqueues: u32, q: usize, data: &[u8]) {
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let irq = Arc::new(CountingIrq::default());
    let t = MmioTransport::new(dev, mem.clone(), irq).unwrap();
    let size = 1u16 << (1 + sel % 8);
    let Ok(mut d) = MmioDriver::init(&t, mem, nqueues, size, 0x10_0000, 0x18_0000, u64::MAX) else {
        return;
    };
    if d.feed_raw(q, data, MEM).is_err() {
        return;
    }
    assert!(d.settle(q, Duration::from_secs(10)), "device hung");
    d.w(0x70, 0);
}
