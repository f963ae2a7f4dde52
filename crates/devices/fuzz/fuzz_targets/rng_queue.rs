#![no_main]
//! virtio-rng buffer handling from an arbitrary descriptor table and avail ring.

#[path = "common.rs"]
mod common;

use corefour_devices::virtio::rng::Rng;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    common::run(Box::new(Rng::new()), 1, 0, data);
});
