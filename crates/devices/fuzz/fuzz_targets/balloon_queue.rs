#![no_main]
//! virtio-balloon inflate handling (PFN lists, madvise) from arbitrary rings.

#[path = "common.rs"]
mod common;

use corefour_devices::virtio::balloon::Balloon;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    common::run(Box::new(Balloon::new(0, None)), 3, 0, data);
});
