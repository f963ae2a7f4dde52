#![allow(dead_code)]

use std::sync::Arc;

use corefour_devices::virtio::blk::{Block, BlockConfig};
use corefour_devices::virtio::driver::{CountingIrq, MmioDriver};
use corefour_devices::virtio::{MmioTransport, VirtioDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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

/// Writes a virtio-blk request header (type `ty`, `sector`) into fresh guest memory.
pub fn blk_header(d: &mut MmioDriver, ty: u32, sector: u64) -> GuestAddress {
    let h = d.alloc(16);
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&ty.to_le_bytes());
    raw[8..16].copy_from_slice(&sector.to_le_bytes());
    d.mem.write_slice(&raw, h).unwrap();
    h
}

/// A virtio-blk device on `path` with O_DIRECT (its default engine), or None after saying why
/// where the file's file system refuses O_DIRECT.
pub fn direct_block(path: &std::path::Path) -> Option<Block> {
    match Block::new(&BlockConfig {
        path: path.into(),
        direct: true,
        ..Default::default()
    }) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("SKIP: O_DIRECT not supported where the temp file lives: {e}");
            None
        }
    }
}
