#![no_main]
//! Raw register traffic into the virtio-mmio transport (as CH fuzzes its BusDevices): each
//! 6-byte record is (offset: u16, size selector, write flag, value: u16-seeded).

use std::sync::Arc;

use corefour_devices::virtio::driver::CountingIrq;
use corefour_devices::virtio::rng::Rng;
use corefour_devices::virtio::MmioTransport;
use corefour_devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let t =
        MmioTransport::new(Box::new(Rng::new()), mem, Arc::new(CountingIrq::default())).unwrap();
    for r in data.chunks_exact(6) {
        let off = u64::from(u16::from_le_bytes([r[0], r[1]]) % 0x200);
        let len = [1usize, 2, 4, 8][usize::from(r[2] % 4)];
        let v = u32::from_le_bytes([r[3], r[4], r[5], 0]).wrapping_mul(0x0101_0101);
        if r[2] & 0x80 != 0 {
            let bytes = v.to_le_bytes();
            let mut b = vec![0u8; len];
            for (i, x) in b.iter_mut().enumerate() {
                *x = bytes[i % 4];
            }
            t.write(off, &b);
        } else {
            let mut b = vec![0u8; len];
            t.read(off, &mut b);
        }
    }
});
