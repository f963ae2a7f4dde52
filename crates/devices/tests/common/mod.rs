#![allow(dead_code)]

use std::sync::Arc;

use corefour_devices::virtio::driver::{CountingIrq, MmioDriver};
use corefour_devices::virtio::{MmioTransport, VirtioDevice};
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 16 << 20;
pub const RINGS: u64 = 0x10_0000;
pub const HEAP: u64 = 0x20_0000;

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
}

pub struct Rig {
    pub transport: Arc<MmioTransport>,
    pub irq: Arc<CountingIrq>,
    pub mem: GuestMemoryMmap,
}

impl Rig {
    pub fn new(dev: Box<dyn VirtioDevice>) -> Self {
        let mem = memory();
        let irq = Arc::new(CountingIrq::default());
        let transport =
            Arc::new(MmioTransport::new(dev, mem.clone(), irq.clone()).expect("transport"));
        Rig {
            transport,
            irq,
            mem,
        }
    }

    pub fn driver(&self, nqueues: u32, size: u16) -> MmioDriver<'_> {
        MmioDriver::init(
            &*self.transport,
            self.mem.clone(),
            nqueues,
            size,
            RINGS,
            HEAP,
            u64::MAX,
        )
        .expect("driver init")
    }
}
