#![no_main]
//! virtio-vsock TX packet handling (headers, ops, payloads) from arbitrary rings.

#[path = "common.rs"]
mod common;

use corefour_devices::virtio::vsock::{Vsock, VsockConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let dev = Vsock::new(VsockConfig {
        cid: 3,
        uds_path: dir.path().join("v.sock"),
    });
    common::run(Box::new(dev), 3, 1, data);
});
