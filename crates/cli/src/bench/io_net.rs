//! The network half of `corefour bench io`: UDP frames from a virtio-net TX ring through a tap
//! into a socket in a network namespace, against the same frames pushed into a veth pair
//! between two namespaces. Everything lives in namespaces created (and deleted) here.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use corefour_devices::virtio::driver::{CountingIrq, MmioDriver};
use corefour_devices::virtio::net::{parse_mac, Net, NetConfig};
use corefour_devices::virtio::tap::VNET_HDR_LEN;
use corefour_devices::virtio::MmioTransport;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::io::Row;

const FRAMES: usize = 150_000;
const PAYLOAD: usize = 1472; // 1500-byte IP packets
const PORT: u16 = 9000;
const BATCH: usize = 64;

struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn netns(name: String) -> anyhow::Result<Netns> {
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    ip(&["netns", "add", &name])?;
    let ns = Netns(name);
    ip(&["-n", &ns.0, "link", "set", "lo", "up"])?;
    Ok(ns)
}

fn mac_of(ns: &str, dev: &str) -> anyhow::Result<[u8; 6]> {
    let out = Command::new("ip")
        .args(["-n", ns, "link", "show", "dev", dev])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .and_then(parse_mac)
        .with_context(|| format!("no MAC for {dev} in {ns}"))
}

/// Runs `f` on a thread that has entered namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<T>> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let f_ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns on a namespace fd we hold; it affects only this thread.
        if unsafe { libc::setns(f_ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        f()
    })
}

/// A UDP receiver on `addr:PORT` counting payload bytes until `stop` or 2 s of silence.
/// Returns (bytes, time from first to last datagram).
fn receiver(
    ns: &str,
    addr: [u8; 4],
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<(u64, Duration)>> {
    in_netns(ns, move || {
        let sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::from(addr), PORT))
            .context("binding the UDP receiver")?;
        let big: libc::c_int = 32 << 20;
        // SAFETY: setting an int socket option.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&big as *const libc::c_int).cast(),
                4,
            )
        };
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        ready.store(true, Ordering::SeqCst);
        let mut buf = vec![0u8; 65536];
        let mut bytes = 0u64;
        let mut first = None;
        let mut last = Instant::now();
        loop {
            match sock.recv(&mut buf) {
                Ok(n) => {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = now;
                    bytes += n as u64;
                }
                Err(_) => {
                    if stop.load(Ordering::SeqCst) || last.elapsed() > Duration::from_secs(2) {
                        break;
                    }
                }
            }
        }
        Ok((bytes, first.map_or(Duration::ZERO, |f| last - f)))
    })
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An Ethernet + IPv4 + UDP frame (UDP checksum 0: none).
fn udp_frame(dst_mac: [u8; 6], src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 28 + PAYLOAD);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + PAYLOAD) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&PORT.to_be_bytes());
    f.extend_from_slice(&PORT.to_be_bytes());
    f.extend_from_slice(&((8 + PAYLOAD) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend(std::iter::repeat_n(0x42u8, PAYLOAD));
    f
}

fn wait_ready(ready: &AtomicBool) {
    let t = Instant::now();
    while !ready.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn virtio_tx(tag: &str) -> anyhow::Result<(u64, Duration)> {
    let ns = netns(format!("c4io{tag}g"))?;
    let tap_name = format!("c4io{tag}t");
    let guest_mac = [0x06, 0xc4, 0, 0, 0, 2];
    let dev = Net::new(&NetConfig {
        tap: tap_name.clone(),
        mac: Some(guest_mac),
        ..Default::default()
    })?;
    ip(&["link", "set", "dev", &tap_name, "netns", &ns.0])?;
    ip(&[
        "-n",
        &ns.0,
        "addr",
        "add",
        "10.201.0.1/24",
        "dev",
        &tap_name,
    ])?;
    ip(&["-n", &ns.0, "link", "set", &tap_name, "up"])?;
    let tap_mac = mac_of(&ns.0, &tap_name)?;
    let frame = udp_frame(tap_mac, guest_mac, [10, 201, 0, 2], [10, 201, 0, 1]);

    let ready = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let rx = receiver(&ns.0, [10, 201, 0, 1], ready.clone(), stop.clone());
    wait_ready(&ready);

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)])?;
    let irq = Arc::new(CountingIrq::default());
    let t = MmioTransport::new(Box::new(dev), mem.clone(), irq.clone())?;
    let mut d = MmioDriver::init(&t, mem, 2, 256, 0x1000, 0x10_0000, u64::MAX)
        .map_err(|e| anyhow::anyhow!("virtio-net driver init: {e}"))?;
    // One buffer per in-flight frame: 12-byte header then the frame, filled once.
    let stride = 2048u64;
    let mut pkt = vec![0u8; VNET_HDR_LEN];
    pkt.extend_from_slice(&frame);
    for i in 0..BATCH as u64 * 2 {
        d.mem
            .write_slice(&pkt, GuestAddress(0x20_0000 + i * stride))?;
    }
    let mut in_flight = 0usize;
    let mut sent = 0usize;
    let mut slot = 0u64;
    while sent < FRAMES || in_flight > 0 {
        while sent < FRAMES && in_flight < BATCH * 2 {
            let a = GuestAddress(0x20_0000 + (slot % (BATCH as u64 * 2)) * stride);
            slot += 1;
            d.queue_chain(1, &[(a, pkt.len() as u32, false)])
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            in_flight += 1;
            sent += 1;
        }
        d.publish(1).map_err(|e| anyhow::anyhow!("{e}"))?;
        let seen = irq.count();
        let mut got = false;
        for pass in 0..2 {
            while d.pop_used(1).is_some() {
                in_flight -= 1;
                got = true;
            }
            if pass == 0 {
                d.arm_interrupt(1).map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        if !got && irq.wait_past(seen, Duration::from_secs(5)) == seen {
            bail!("virtio-net TX made no progress for 5 s");
        }
    }
    stop.store(true, Ordering::SeqCst);
    let r = rx
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
    drop(t);
    Ok(r)
}

fn veth_tx(tag: &str) -> anyhow::Result<(u64, Duration)> {
    let a = netns(format!("c4io{tag}a"))?;
    let b = netns(format!("c4io{tag}b"))?;
    let (va, vb) = (format!("c4io{tag}va"), format!("c4io{tag}vb"));
    ip(&[
        "-n", &a.0, "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", &b.0,
    ])?;
    ip(&["-n", &a.0, "addr", "add", "10.202.0.2/24", "dev", &va])?;
    ip(&["-n", &b.0, "addr", "add", "10.202.0.1/24", "dev", &vb])?;
    ip(&["-n", &a.0, "link", "set", &va, "up"])?;
    ip(&["-n", &b.0, "link", "set", &vb, "up"])?;
    let (ma, mb) = (mac_of(&a.0, &va)?, mac_of(&b.0, &vb)?);
    let frame = udp_frame(mb, ma, [10, 202, 0, 2], [10, 202, 0, 1]);

    let ready = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let rx = receiver(&b.0, [10, 202, 0, 1], ready.clone(), stop.clone());
    wait_ready(&ready);
    let va2 = va.clone();
    let tx = in_netns(&a.0, move || {
        // SAFETY: plain socket call; owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fresh fd.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(va2)?;
        // SAFETY: NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = index as i32;
        // SAFETY: binding with a correctly sized sockaddr_ll.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            bail!("bind AF_PACKET: {}", std::io::Error::last_os_error());
        }
        for _ in 0..FRAMES {
            // SAFETY: sending our buffer.
            unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        }
        Ok(())
    });
    tx.join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    stop.store(true, Ordering::SeqCst);
    rx.join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))?
}

pub(super) fn net_bench(progress: &dyn Fn(&str)) -> anyhow::Result<Vec<Row>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (tap devices and network namespaces)");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        bail!("/dev/net/tun is missing");
    }
    let tag = format!("{}", std::process::id() % 10_000);
    progress("net: virtio-net TX through a tap");
    let (vb, vt) = virtio_tx(&tag)?;
    progress("net: veth host to host");
    let (pb, pt) = veth_tx(&tag)?;
    if vt.is_zero() || pt.is_zero() {
        bail!("no datagrams arrived (virtio {vb} B, veth {pb} B)");
    }
    let v_bps = vb as f64 / vt.as_secs_f64();
    let p_bps = pb as f64 / pt.as_secs_f64();
    let pkt = PAYLOAD as f64;
    Ok(vec![Row {
        test: "net TX UDP 1472B".into(),
        virtio_bps: v_bps,
        virtio_iops: v_bps / pkt,
        peer_bps: p_bps,
        peer_iops: p_bps / pkt,
        ratio: v_bps / p_bps,
        peer: "veth netns to netns (AF_PACKET)".into(),
    }])
}
