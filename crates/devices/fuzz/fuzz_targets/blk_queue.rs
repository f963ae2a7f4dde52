#![no_main]
//! virtio-blk request handling from an arbitrary descriptor table and avail ring.

#[path = "common.rs"]
mod common;

use corefour_devices::virtio::blk::{Block, BlockConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(64 * 512).unwrap();
    let dev = Block::new(&BlockConfig {
        path: f.path().into(),
        ..Default::default()
    })
    .unwrap();
    common::run(Box::new(dev), 1, 0, data);
});
