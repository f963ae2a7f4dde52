#![no_main]
//! virtio-net TX and RX chain handling from arbitrary rings, on a real tap (needs root and
//! /dev/net/tun; without them every input is skipped). The first byte picks the queue; for
//! RX a frame is waiting in the tap, so the device takes the hostile buffers at once.

#[path = "common.rs"]
mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use corefour_devices::virtio::net::{Net, NetConfig};
use libfuzzer_sys::fuzz_target;

/// Sends one broadcast frame out of interface `name`: it lands in the tap's RX queue.
fn frame_into(name: &str) {
    // SAFETY: plain socket call; owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: NUL-terminated name; sockaddr_ll is plain data bound with its size.
    unsafe {
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = libc::if_nametoindex(cname.as_ptr()) as i32;
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let mut f = vec![0xffu8; 6];
        f.extend_from_slice(&[0x06, 0xc4, 0, 0, 0, 1, 0x88, 0xb5]);
        f.resize(300, 0x5a);
        libc::send(fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let name = format!("c4fz{}", std::process::id() % 100_000);
    let Ok(dev) = Net::new(&NetConfig {
        tap: name.clone(),
        ..Default::default()
    }) else {
        return;
    };
    let q = usize::from(sel & 1);
    if q == 0 {
        frame_into(&name);
    }
    common::run(Box::new(dev), 2, q, rest);
});
