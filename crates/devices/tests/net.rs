//! virtio-net end to end at the device level through a real tap: a frame the driver puts on
//! the TX queue appears on the host interface, and a frame sent into the interface lands in an
//! RX buffer with the used ring and interrupt updated. Needs root (CAP_NET_ADMIN) and /dev/net/tun.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::Rig;
use corefour_devices::virtio::driver::{
    Desc, MmioDriver, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE,
};
use corefour_devices::virtio::net::{Net, NetConfig};
use corefour_devices::virtio::status;
use corefour_devices::virtio::tap::VNET_HDR_LEN;
use vm_memory::{Bytes, GuestAddress};

const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental: nothing else on the link uses it

fn packet_socket(ifname: &str) -> OwnedFd {
    // SAFETY: plain socket call; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETHERTYPE.to_be()),
        )
    };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is fresh and ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0);
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETHERTYPE.to_be();
    sll.sll_ifindex = index as i32;
    // SAFETY: binding with a correctly sized sockaddr_ll.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: setting a timeval option.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    fd
}

fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A NIC on a fresh tap named PREFIX<pid> with `cfg` (its `tap` is set here), behind a rig, with
/// IPv6 off on the link so no autoconf frames race the test's; None (with the reason printed)
/// where tun or root is missing.
fn nic_rig(prefix: &str, cfg: NetConfig) -> Option<(String, Rig)> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: /dev/net/tun missing");
        return None;
    }
    let name = format!("{prefix}{}", std::process::id() % 100_000);
    let dev = match Net::new(&NetConfig {
        tap: name.clone(),
        ..cfg
    }) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipped: cannot create tap (needs root): {e}");
            return None;
        }
    };
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    Some((name, Rig::new(Box::new(dev))))
}

/// A NIC whose RX is limited to `bytes_per_sec` (burst the same).
fn rx_limited_rig(prefix: &str, mac: [u8; 6], bytes_per_sec: u64) -> Option<(String, Rig)> {
    nic_rig(
        prefix,
        NetConfig {
            mac: Some(mac),
            rx_limit: corefour_devices::virtio::rate_limiter::RateLimit {
                bytes_per_sec,
                bytes_burst: bytes_per_sec,
                ..Default::default()
            },
            ..Default::default()
        },
    )
}

/// 150 frames of ~1500 B since `t0` under a 100 kB/s limit with a 100 kB burst: 225 kB, of which
/// 100 kB go at once and the other 125 kB take at least a second.
fn assert_paced_at_100kbps(t0: Instant) {
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1000),
        "limit not applied: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "limit too strict: {took:?}");
}

/// Offers `n` 2 KiB device-writable buffers on the RX queue.
fn post_rx_buffers(d: &mut MmioDriver, n: usize) {
    for _ in 0..n {
        let b = d.alloc(2048);
        d.queue_chain(0, &[(b, 2048, true)]).unwrap();
    }
    d.publish(0).unwrap();
}

/// Sends frame `f` `n` times into the tap through a bound packet socket.
fn send_frames(sock: &OwnedFd, f: &[u8], n: usize) {
    for _ in 0..n {
        // SAFETY: sending our buffer on a bound packet socket.
        let sent = unsafe { libc::send(sock.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        assert_eq!(sent as usize, f.len());
    }
}

#[test]
fn frames_cross_the_tap_both_ways() {
    let Some((name, rig)) = nic_rig(
        "c4vt",
        NetConfig {
            mac: Some([0x52, 0x54, 0, 0xc4, 0, 1]),
            ..Default::default()
        },
    ) else {
        return;
    };
    assert!(
        std::path::Path::new(&format!("/sys/class/net/{name}")).exists(),
        "tap named as asked"
    );
    let mut d = rig.driver(2, 64);
    let mut mac = [0u8; 6];
    corefour_devices::BusDevice::read(&*rig.transport, 0x100, &mut mac[..4]);
    corefour_devices::BusDevice::read(&*rig.transport, 0x104, &mut mac[4..]);
    assert_eq!(mac, [0x52, 0x54, 0, 0xc4, 0, 1]);
    let sock = packet_socket(&name);

    // TX: header + frame in two descriptors.
    let payload = b"corefour virtio-net tx test frame...................................";
    let f = frame([0xff; 6], mac, payload);
    let hdr = d.alloc(VNET_HDR_LEN as u64);
    d.mem.write_slice(&[0u8; VNET_HDR_LEN], hdr).unwrap();
    let buf = d.alloc(f.len() as u64);
    d.mem.write_slice(&f, buf).unwrap();
    d.submit(
        1,
        &[
            (hdr, VNET_HDR_LEN as u32, false),
            (buf, f.len() as u32, false),
        ],
    )
    .unwrap();
    assert!(
        d.wait_used(1, Duration::from_secs(5)).is_some(),
        "TX chain returned"
    );
    let mut got = vec![0u8; 2048];
    // SAFETY: receiving into our buffer.
    let n = unsafe { libc::recv(sock.as_raw_fd(), got.as_mut_ptr().cast(), got.len(), 0) };
    assert!(
        n > 0,
        "frame seen on the host interface: {}",
        std::io::Error::last_os_error()
    );
    assert_eq!(&got[..n as usize], &f[..]);

    // RX: offer buffers, send a frame into the interface, find it in guest memory.
    let mut bufs = Vec::new();
    for _ in 0..4 {
        let b = d.alloc(2048);
        bufs.push(b);
        d.submit(0, &[(b, 2048, true)]).unwrap();
    }
    // Drain whatever the host stack sent already (IPv6 autoconf), then ask for an interrupt
    // on the next used entry.
    std::thread::sleep(Duration::from_millis(20));
    while let Some((id, _)) = d.pop_used(0) {
        let b = bufs[id as usize % 64];
        d.submit(0, &[(b, 2048, true)]).unwrap();
        bufs.push(b);
    }
    d.arm_interrupt(0).unwrap();
    let irq0 = rig.irq.count();
    let payload = b"corefour virtio-net rx test frame, from the host side..............";
    let f = frame(mac, [0x52, 0x54, 0, 0xc4, 0, 2], payload);
    // SAFETY: sending our buffer on a bound packet socket.
    let n = unsafe { libc::send(sock.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
    assert_eq!(n as usize, f.len());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut found = false;
    let mut foreign = 0;
    while !found && Instant::now() < deadline {
        if let Some((id, len)) = d.wait_used(0, Duration::from_millis(100)) {
            let slot = id as usize % 64;
            let mut data = vec![0u8; len as usize];
            // Buffers were submitted one per slot, in order.
            d.mem.read_slice(&mut data, bufs[slot]).unwrap();
            if data.len() == VNET_HDR_LEN + f.len() && data[VNET_HDR_LEN..] == f[..] {
                assert_eq!(u16::from_le_bytes([data[10], data[11]]), 1, "num_buffers");
                found = true;
            } else {
                // Some other frame (IPv6 autoconf): give the buffer back.
                foreign += 1;
                d.submit(0, &[(bufs[slot], 2048, true)]).unwrap();
                bufs.push(bufs[slot]);
            }
        }
    }
    assert!(found, "frame from the host delivered into an RX buffer");
    // With other traffic interleaved, interrupt suppression may legitimately fold ours into an
    // earlier one; only a quiet link makes the count exact.
    if foreign == 0 {
        // The device interrupts after it finishes the batch, maybe just after we saw the entry.
        assert!(
            rig.irq.wait_past(irq0, Duration::from_secs(5)) > irq0,
            "RX interrupt"
        );
    } else {
        eprintln!("note: {foreign} foreign frames on the link; RX interrupt count not checked");
    }
}

#[test]
fn tx_rate_limit_paces_frames() {
    let Some((_, rig)) = nic_rig(
        "c4vr",
        NetConfig {
            tx_limit: corefour_devices::virtio::rate_limiter::RateLimit {
                bytes_per_sec: 100_000,
                bytes_burst: 100_000,
                ..Default::default()
            },
            ..Default::default()
        },
    ) else {
        return;
    };
    let mut d = rig.driver(2, 256);
    let mut pkt = vec![0u8; VNET_HDR_LEN];
    pkt.extend(frame([0xff; 6], [0x06, 0xc4, 0, 0, 0, 9], &[0x11; 1486]));
    let buf = d.alloc(pkt.len() as u64);
    d.mem.write_slice(&pkt, buf).unwrap();
    let t0 = Instant::now();
    for _ in 0..150 {
        d.queue_chain(1, &[(buf, pkt.len() as u32, false)]).unwrap();
    }
    d.publish(1).unwrap();
    let mut done = 0;
    while done < 150 {
        assert!(
            d.wait_used(1, Duration::from_secs(10)).is_some(),
            "TX stalled at {done}"
        );
        done += 1;
    }
    assert_paced_at_100kbps(t0);
}

#[test]
fn random_tx_and_rx_chains_never_wedge_the_device() {
    let Some((_, rig)) = nic_rig(
        "c4vz",
        NetConfig {
            ..Default::default()
        },
    ) else {
        return;
    };
    let mut x: u64 = 0xdead_beef_cafe_f00d;
    for round in 0..60 {
        let mut d = rig.driver(2, 1 << (1 + round % 6));
        let data: Vec<u8> = (0..2048)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let q = round % 2;
        d.feed_raw(q, &data, common::MEM_SIZE as u64).unwrap();
        assert!(
            d.settle(q, Duration::from_secs(5)),
            "device hung in round {round}"
        );
        d.w(0x70, 0);
    }
    // Still a working NIC afterwards.
    let mut d = rig.driver(2, 16);
    let hdr = d.alloc(VNET_HDR_LEN as u64);
    let f = frame([0xff; 6], [0x06, 0xc4, 0, 0, 0, 7], &[0u8; 60]);
    let buf = d.alloc(f.len() as u64);
    d.mem.write_slice(&f, buf).unwrap();
    d.submit(
        1,
        &[
            (hdr, VNET_HDR_LEN as u32, false),
            (buf, f.len() as u32, false),
        ],
    )
    .unwrap();
    assert!(d.wait_used(1, Duration::from_secs(5)).is_some());
}

/// A chain of `(addr, len, flags)` buffers on queue `q`, each linked to the next, laid out from
/// the slot the driver writes next; offered and published. Returns its head.
fn offer_chain(d: &mut MmioDriver, q: usize, bufs: &[(u64, u32, u16)]) -> u16 {
    let slot = d.write_descs(q, &[]).unwrap();
    let size = d.queues[q].size;
    let last = bufs.len() - 1;
    let descs: Vec<Desc> = bufs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| Desc {
            addr,
            len,
            flags: if i == last {
                flags
            } else {
                flags | DESC_F_NEXT
            },
            next: (slot + i as u16 + 1) % size,
        })
        .collect();
    let head = d.write_descs(q, &descs).unwrap();
    d.push_avail(q, head).unwrap();
    d.publish(q).unwrap();
    head
}

/// Sends one good TX frame and checks it leaves through the tap.
fn tx_still_works(d: &mut MmioDriver, sock: &OwnedFd, tag: u8) {
    let mut pkt = vec![0u8; VNET_HDR_LEN];
    let f = frame([0xff; 6], [0x06, 0xc4, 0, 0, 0, tag], &[tag; 80]);
    pkt.extend_from_slice(&f);
    let buf = d.alloc(pkt.len() as u64);
    d.mem.write_slice(&pkt, buf).unwrap();
    let head = offer_chain(d, 1, &[(buf.0, pkt.len() as u32, 0)]);
    loop {
        let (id, len) = d
            .wait_used(1, Duration::from_secs(5))
            .expect("good TX chain returned");
        assert_eq!(len, 0);
        if id == u32::from(head) {
            break;
        }
    }
    let mut got = vec![0u8; 2048];
    loop {
        // SAFETY: receiving into our buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), got.as_mut_ptr().cast(), got.len(), 0) };
        assert!(n > 0, "good frame {tag} seen on the host interface");
        if got[..n as usize] == f[..] {
            break;
        }
    }
}

#[test]
fn hostile_chains_are_dropped_and_the_nic_keeps_working() {
    let Some((name, rig)) = nic_rig(
        "c4vh",
        NetConfig {
            mac: Some([0x52, 0x54, 0, 0xc4, 0, 3]),
            ..Default::default()
        },
    ) else {
        return;
    };
    let mut d = rig.driver(2, 16);
    let sock = packet_socket(&name);
    let outside = 0x7fff_0000_0000u64;
    let buf = d.alloc(4096).0;

    // TX: a loop, a buffer outside memory, a device-writable buffer, a chain shorter than the
    // header, an indirect table of a bad length. Each comes back empty, nothing is sent.
    let slot = d.write_descs(1, &[]).unwrap();
    let looping = [
        Desc {
            addr: buf,
            len: 64,
            flags: DESC_F_NEXT,
            next: slot + 1,
        },
        Desc {
            addr: buf,
            len: 64,
            flags: DESC_F_NEXT,
            next: slot,
        },
    ];
    let head = d.write_descs(1, &looping).unwrap();
    d.push_avail(1, head).unwrap();
    d.publish(1).unwrap();
    let mut heads = vec![head];
    heads.push(offer_chain(&mut d, 1, &[(outside, 64, 0)]));
    heads.push(offer_chain(
        &mut d,
        1,
        &[(buf, 12, 0), (buf, 64, DESC_F_WRITE)],
    ));
    heads.push(offer_chain(&mut d, 1, &[(buf, 4, 0)]));
    heads.push(offer_chain(&mut d, 1, &[(buf, 17, DESC_F_INDIRECT)]));
    // A head past the ring cannot be returned: skipped.
    d.push_avail(1, 999).unwrap();
    d.publish(1).unwrap();
    for &h in &heads {
        let (id, len) = d
            .wait_used(1, Duration::from_secs(5))
            .expect("hostile TX chain returned");
        assert_eq!((id, len), (u32::from(h), 0));
    }
    tx_still_works(&mut d, &sock, 1);

    // RX: device-readable, looping, outside memory, shorter than the header; then a good one.
    let mut bad = vec![offer_chain(&mut d, 0, &[(buf, 2048, 0)])];
    let slot = d.write_descs(0, &[]).unwrap();
    let looping = [
        Desc {
            addr: buf,
            len: 64,
            flags: DESC_F_NEXT | DESC_F_WRITE,
            next: slot + 1,
        },
        Desc {
            addr: buf,
            len: 64,
            flags: DESC_F_NEXT | DESC_F_WRITE,
            next: slot,
        },
    ];
    let head = d.write_descs(0, &looping).unwrap();
    d.push_avail(0, head).unwrap();
    d.publish(0).unwrap();
    bad.push(head);
    bad.push(offer_chain(&mut d, 0, &[(outside, 2048, DESC_F_WRITE)]));
    bad.push(offer_chain(&mut d, 0, &[(buf, 8, DESC_F_WRITE)]));
    let good = d.alloc(2048);
    let good_head = offer_chain(&mut d, 0, &[(good.0, 2048, DESC_F_WRITE)]);
    let f = frame(
        [0x52, 0x54, 0, 0xc4, 0, 3],
        [0x52, 0x54, 0, 0xc4, 0, 4],
        b"into a hostile ring.............................................",
    );
    // SAFETY: sending our buffer on a bound packet socket.
    let n = unsafe { libc::send(sock.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
    assert_eq!(n as usize, f.len());
    for &h in &bad {
        let (id, len) = d
            .wait_used(0, Duration::from_secs(5))
            .expect("hostile RX chain returned");
        assert_eq!(
            (id, len),
            (u32::from(h), 0),
            "unusable RX buffers come back empty"
        );
    }
    let (id, len) = d
        .wait_used(0, Duration::from_secs(5))
        .expect("good RX chain used");
    assert_eq!(id, u32::from(good_head));
    assert_eq!(len as usize, VNET_HDR_LEN + f.len());
    let mut data = vec![0u8; f.len()];
    d.mem
        .read_slice(&mut data, GuestAddress(good.0 + VNET_HDR_LEN as u64))
        .unwrap();
    assert_eq!(data, f);
    assert_eq!(d.status() & status::DEVICE_NEEDS_RESET, 0);

    // An avail index more than a queue ahead breaks the ring: DEVICE_NEEDS_RESET, and after a
    // reset the NIC works again.
    d.set_avail_idx(1, 1000).unwrap();
    d.notify(1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.status() & status::DEVICE_NEEDS_RESET == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
    d.w(0x70, 0);
    let mut d = rig.driver(2, 16);
    tx_still_works(&mut d, &sock, 2);
}

#[test]
fn rx_rate_limit_paces_frames() {
    let mac = [0x52, 0x54, 0, 0xc4, 0, 5];
    let Some((name, rig)) = rx_limited_rig("c4vq", mac, 100_000) else {
        return;
    };
    let mut d = rig.driver(2, 256);
    post_rx_buffers(&mut d, 200);
    let sock = packet_socket(&name);
    let f = frame(mac, [0x52, 0x54, 0, 0xc4, 0, 6], &[0x22; 1486]);
    let t0 = Instant::now();
    send_frames(&sock, &f, 150);
    let mut ours = 0;
    while ours < 150 {
        let (_, len) = d
            .wait_used(0, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("RX stalled at {ours}"));
        if len as usize == VNET_HDR_LEN + f.len() {
            ours += 1;
        }
    }
    assert_paced_at_100kbps(t0);
}

#[test]
fn a_saved_nic_resumes_on_a_new_tap_where_it_stopped() {
    use corefour_devices::virtio::driver::CountingIrq;
    use corefour_devices::virtio::state::{DeviceSnap, SaveRestore, TransportSnap};
    use corefour_devices::virtio::MmioTransport;
    use std::sync::Arc;

    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: /dev/net/tun missing");
        return;
    }
    let pid = std::process::id() % 100_000;
    let (name, name2) = (format!("c4vs{pid}"), format!("c4vS{pid}"));
    let open = |tap: &str, mac| {
        Net::new(&NetConfig {
            tap: tap.to_string(),
            mac,
            ..Default::default()
        })
    };
    // Generated MAC: the restored device must keep the one the guest probed.
    let dev = match open(&name, None) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipped: cannot create tap (needs root): {e}");
            return;
        }
    };
    let mac = dev.mac();
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let rig = Rig::new(Box::new(dev));
    let mut d = rig.driver(2, 16);
    let sock = packet_socket(&name);
    for i in 0..3 {
        tx_still_works(&mut d, &sock, 10 + i);
    }
    let rx_buf = d.alloc(2048);
    d.submit(0, &[(rx_buf, 2048, true)]).unwrap();

    let saved = rig.transport.save_state().unwrap();
    let saved: TransportSnap =
        serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
    assert_eq!(
        (saved.queues[1].next_avail, saved.queues[1].next_used),
        (3, 3)
    );
    assert_eq!(
        (saved.queues[0].next_avail, saved.queues[0].next_used),
        (0, 0)
    );
    assert!(matches!(&saved.device, DeviceSnap::Net { mac: m, tap } if *m == mac && *tap == name));

    // A frame published while parked stays in the ring.
    let mut pkt = vec![0u8; VNET_HDR_LEN];
    let f = frame([0xff; 6], mac, &[0x33; 80]);
    pkt.extend_from_slice(&f);
    let buf = d.alloc(pkt.len() as u64);
    d.mem.write_slice(&pkt, buf).unwrap();
    d.submit(1, &[(buf, pkt.len() as u32, false)]).unwrap();
    assert!(
        d.wait_used(1, Duration::from_millis(200)).is_none(),
        "a parked NIC sent a frame"
    );

    // A new device on another tap takes over: the parked frame leaves through it, the RX
    // buffer offered before the save takes a frame sent into it, and the MAC is the old one.
    let dev2 = open(&name2, None).expect("second tap");
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name2}/disable_ipv6"), "1");
    let sock2 = packet_socket(&name2);
    let irq = Arc::new(CountingIrq::default());
    let fresh = MmioTransport::new(Box::new(dev2), rig.mem.clone(), irq.clone()).unwrap();
    fresh.restore_state(&saved).unwrap();
    let mut cfg = [0u8; 6];
    corefour_devices::BusDevice::read(&fresh, 0x100, &mut cfg[..4]);
    corefour_devices::BusDevice::read(&fresh, 0x104, &mut cfg[4..]);
    assert_eq!(cfg, mac, "MAC kept across the restore");
    d.dev = &fresh;
    assert_eq!(d.wait_used(1, Duration::from_secs(5)).map(|u| u.0), Some(3));
    let mut got = vec![0u8; 2048];
    // SAFETY: receiving into our buffer.
    let n = unsafe { libc::recv(sock2.as_raw_fd(), got.as_mut_ptr().cast(), got.len(), 0) };
    assert!(
        n > 0 && got[..n as usize] == f[..],
        "parked frame sent on the new tap"
    );
    let f = frame(mac, [0x52, 0x54, 0, 0xc4, 0, 8], &[0x44; 90]);
    // SAFETY: sending our buffer on a bound packet socket.
    let n = unsafe { libc::send(sock2.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
    assert_eq!(n as usize, f.len());
    let (id, len) = d
        .wait_used(0, Duration::from_secs(5))
        .expect("RX on the new tap");
    assert_eq!((id, len as usize), (0, VNET_HDR_LEN + f.len()));
    assert!(irq.count() > 0, "the restored NIC interrupts");
}

#[test]
fn rx_throttle_ends_while_tx_keeps_the_device_busy() {
    let mac = [0x52, 0x54, 0, 0xc4, 0, 9];
    let Some((name, rig)) = rx_limited_rig("c4vb", mac, 50_000) else {
        return;
    };
    let mut d = rig.driver(2, 128);
    post_rx_buffers(&mut d, 128);
    let sock = packet_socket(&name);
    let f = frame(mac, [0x52, 0x54, 0, 0xc4, 0, 10], &[0x66; 986]);
    send_frames(&sock, &f, 100);
    // TX without pause while the 100 kB of RX frames come in: 50 kB at once, the rest at
    // 50 kB/s. The TX stream keeps the worker polling, away from its timer.
    let mut pkt = vec![0u8; VNET_HDR_LEN];
    pkt.extend(frame([0xff; 6], mac, &[0x77; 64]));
    let tx = d.alloc(pkt.len() as u64);
    d.mem.write_slice(&pkt, tx).unwrap();
    let t0 = Instant::now();
    let (mut rx_done, mut tx_in_flight) = (0, 0);
    while rx_done < 100 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "RX stuck at {rx_done} while TX kept the device busy"
        );
        while d.pop_used(1).is_some() {
            tx_in_flight -= 1;
        }
        while tx_in_flight < 64 {
            d.queue_chain(1, &[(tx, pkt.len() as u32, false)]).unwrap();
            tx_in_flight += 1;
        }
        d.publish(1).unwrap();
        while let Some((_, len)) = d.pop_used(0) {
            if len as usize == VNET_HDR_LEN + f.len() {
                rx_done += 1;
            }
        }
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(700),
        "RX limit not applied: {took:?}"
    );
}
