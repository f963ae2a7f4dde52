//! The network half of `corefour bench io`, both directions against a veth pair between two
//! network namespaces:
//! - TX: UDP datagrams from a virtio-net TX ring through a tap into a socket in a namespace,
//!   against the same frames sent with AF_PACKET into a veth whose peer holds the socket.
//! - RX: raw frames sent with AF_PACKET into the tap (from its namespace) and taken from the
//!   virtio-net RX ring, against the same frames sent into a veth and read from an AF_PACKET
//!   socket on its peer.
//!
//! The driver plays Linux's virtio-net: it fills the ring, kicks only when the device asked
//! (event idx), and on TX asks for an interrupt once 3/4 of the frames in flight are done
//! (virtqueue_enable_cb_delayed), on RX for the next frame after it found none (NAPI). An
//! interrupt costs the device an eventfd write, as KVM's irqfd would, and the driver sleeps on
//! that eventfd (as blk's bench driver does).
//! Each side runs [`ROUNDS`] times, alternating, and its best round counts: a core taken by
//! another process for a moment then does not decide the ratio. Everything lives in
//! namespaces created (and deleted) here.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use corefour_devices::virtio::driver::{IrqfdLine, MmioDriver};
use corefour_devices::virtio::net::{parse_mac, Net, NetConfig};
use corefour_devices::virtio::tap::VNET_HDR_LEN;
use corefour_devices::virtio::MmioTransport;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::io::Row;

const FRAMES: usize = 100_000;
const PAYLOAD: usize = 1472; // 1500-byte IP packets
const PORT: u16 = 9000;
/// The queue size Linux's virtio-net uses by default.
const RING: u16 = 256;
const ROUNDS: usize = 3;
/// RX frames: IEEE local experimental, so neither side's IP stack looks at them.
const RX_ETHERTYPE: u16 = 0x88b5;
const RX_FRAME: usize = 1514;
/// Guest buffers: one per ring slot, 2 KiB apart.
const BUFS: u64 = 0x20_0000;
const STRIDE: u64 = 2048;

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

/// A virtio-net device on a tap in namespace `ns` (the tap is 10.201.0.1 there).
struct GuestNic {
    transport: MmioTransport,
    mem: GuestMemoryMmap,
    irq: Arc<IrqfdLine>,
    tap: String,
    tap_mac: [u8; 6],
    /// Last: the namespace goes (with the tap) after the device.
    ns: Netns,
}

impl GuestNic {
    fn driver(&self) -> anyhow::Result<MmioDriver<'_>> {
        MmioDriver::init(
            &self.transport,
            self.mem.clone(),
            2,
            RING,
            0x1000,
            0x10_0000,
            u64::MAX,
        )
        .map_err(|e| anyhow::anyhow!("virtio-net driver init: {e}"))
    }
}

/// A virtio-net device on a new tap moved into a new namespace `c4io{tag}g`.
fn guest_nic(tag: &str, guest_mac: [u8; 6]) -> anyhow::Result<GuestNic> {
    let ns = netns(format!("c4io{tag}g"))?;
    let tap_name = format!("c4io{tag}t");
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
    // The veth peer's receiver buffers 32 MiB (about 14k frames) while it waits for a core;
    // the tap's queue, where frames wait for the device thread, gets a similar depth instead
    // of tun's 500 frames, so a moment off the CPU costs neither side frames.
    ip(&[
        "-n",
        &ns.0,
        "link",
        "set",
        &tap_name,
        "txqueuelen",
        "15000",
        "up",
    ])?;
    let tap_mac = mac_of(&ns.0, &tap_name)?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)])?;
    let irq = Arc::new(IrqfdLine::new().context("creating the interrupt eventfd")?);
    let transport = MmioTransport::new(Box::new(dev), mem.clone(), irq.clone())?;
    Ok(GuestNic {
        transport,
        mem,
        irq,
        tap: tap_name,
        tap_mac,
        ns,
    })
}

fn buf(slot: u64) -> GuestAddress {
    GuestAddress(BUFS + (slot % u64::from(RING)) * STRIDE)
}

fn virtio_tx(tag: &str) -> anyhow::Result<(u64, Duration)> {
    let guest_mac = [0x06, 0xc4, 0, 0, 0, 2];
    let nic = guest_nic(tag, guest_mac)?;
    let irq = &nic.irq;
    let frame = udp_frame(nic.tap_mac, guest_mac, [10, 201, 0, 2], [10, 201, 0, 1]);
    let ready = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let rx = receiver(&nic.ns.0, [10, 201, 0, 1], ready.clone(), stop.clone());
    wait_ready(&ready);

    let mut d = nic.driver()?;
    // One buffer per ring slot: the 12-byte header then the frame, filled once.
    let mut pkt = vec![0u8; VNET_HDR_LEN];
    pkt.extend_from_slice(&frame);
    for i in 0..u64::from(RING) {
        d.mem.write_slice(&pkt, buf(i))?;
    }
    let err = |e| anyhow::anyhow!("virtio-net TX: {e}");
    let ring = usize::from(RING);
    let mut in_flight = 0usize;
    let mut sent = 0usize;
    while sent < FRAMES || in_flight > 0 {
        while d.pop_used(1).is_some() {
            in_flight -= 1;
        }
        let mut queued = false;
        while sent < FRAMES && in_flight < ring {
            d.queue_chain(1, &[(buf(sent as u64), pkt.len() as u32, false)])
                .map_err(err)?;
            in_flight += 1;
            sent += 1;
            queued = true;
        }
        if queued {
            d.publish_with(1, false).map_err(err)?;
        }
        if in_flight == 0 {
            break;
        }
        // Ring full (or everything sent): sleep until most of it is done.
        let want = if sent < FRAMES {
            (in_flight * 3 / 4).max(1)
        } else {
            in_flight
        };
        let seen = irq.count();
        d.arm_interrupt_after(1, want as u16).map_err(err)?;
        if d.used_idx(1).wrapping_sub(d.queues[1].last_used()) as usize >= want {
            continue;
        }
        if irq.wait_past(seen, Duration::ZERO, Duration::from_secs(5)) == seen {
            bail!("virtio-net TX made no progress for 5 s");
        }
    }
    stop.store(true, Ordering::SeqCst);
    let r = rx
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
    Ok(r)
}

/// An AF_PACKET socket bound to `ifname` (in the calling thread's namespace), receiving
/// `proto` frames (0: none, a sender only).
fn packet_socket(ifname: &str, proto: u16) -> anyhow::Result<OwnedFd> {
    // SAFETY: plain socket call; owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto.to_be()),
        )
    };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {ifname}");
    }
    // SAFETY: sockaddr_ll is plain data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto.to_be();
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
        bail!(
            "bind AF_PACKET on {ifname}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(fd)
}

/// Sends `FRAMES` copies of `frame` out of `ifname` in namespace `ns`, then sets `done`.
fn packet_sender(
    ns: &str,
    ifname: String,
    frame: Vec<u8>,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    in_netns(ns, move || {
        let fd = packet_socket(&ifname, 0);
        let r = fd.map(|fd| {
            for _ in 0..FRAMES {
                // SAFETY: sending our buffer on a bound packet socket.
                unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            }
        });
        done.store(true, Ordering::SeqCst);
        r
    })
}

/// A raw frame for the RX rows: Ethernet header, then filler.
fn rx_frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(RX_FRAME);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&RX_ETHERTYPE.to_be_bytes());
    f.resize(RX_FRAME, 0x5a);
    f
}

/// Frames into the tap from its namespace, out of the virtio-net RX ring.
fn virtio_rx(tag: &str) -> anyhow::Result<(u64, Duration)> {
    let guest_mac = [0x06, 0xc4, 0, 0, 0, 2];
    let nic = guest_nic(tag, guest_mac)?;
    let irq = &nic.irq;
    let frame = rx_frame(guest_mac, nic.tap_mac);
    let mut d = nic.driver()?;
    let err = |e| anyhow::anyhow!("virtio-net RX: {e}");
    for i in 0..u64::from(RING) {
        d.queue_chain(0, &[(buf(i), STRIDE as u32, true)])
            .map_err(err)?;
    }
    d.publish(0).map_err(err)?;
    let done = Arc::new(AtomicBool::new(false));
    let tx = packet_sender(&nic.ns.0, nic.tap.clone(), frame, done.clone());
    let want_len = (VNET_HDR_LEN + RX_FRAME) as u32;
    let (mut bytes, mut first, mut last) = (0u64, None, Instant::now());
    let mut idle_since = Instant::now();
    loop {
        let mut got = false;
        while let Some((id, len)) = d.pop_used(0) {
            let mut ty = [0u8; 2];
            d.mem.read_slice(
                &mut ty,
                GuestAddress(buf(u64::from(id)).0 + VNET_HDR_LEN as u64 + 12),
            )?;
            // Only ours: the tap's own IPv6 chatter is not counted.
            if len == want_len && u16::from_be_bytes(ty) == RX_ETHERTYPE {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                bytes += RX_FRAME as u64;
            }
            // Buffers come back in order, so the slot reused is the one just returned.
            let head = d
                .queue_chain(0, &[(buf(u64::from(id)), STRIDE as u32, true)])
                .map_err(err)?;
            if u32::from(head) != id {
                bail!("virtio-net RX: buffer {id} came back out of order (expected {head})");
            }
            got = true;
        }
        if got {
            d.publish_with(0, false).map_err(err)?;
            idle_since = Instant::now();
            continue;
        }
        if done.load(Ordering::SeqCst) && idle_since.elapsed() > Duration::from_millis(200) {
            break;
        }
        if idle_since.elapsed() > Duration::from_secs(5) {
            bail!("virtio-net RX: no frame for 5 s");
        }
        let seen = irq.count();
        d.arm_interrupt(0).map_err(err)?;
        if d.used_idx(0) != d.queues[0].last_used() {
            continue;
        }
        irq.wait_past(seen, Duration::ZERO, Duration::from_millis(50));
    }
    tx.join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    Ok((bytes, first.map_or(Duration::ZERO, |f| last - f)))
}

/// Two namespaces `c4io{tag}a` (10.202.0.2) and `c4io{tag}b` (10.202.0.1) joined by a veth
/// pair; returns them, the two ends' names and their MACs.
#[allow(clippy::type_complexity)]
fn veth_pair(tag: &str) -> anyhow::Result<(Netns, Netns, String, String, [u8; 6], [u8; 6])> {
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
    Ok((a, b, va, vb, ma, mb))
}

/// Frames sent into one end of a veth, read from an AF_PACKET socket on the other.
fn veth_rx(tag: &str) -> anyhow::Result<(u64, Duration)> {
    let (a, b, va, vb, ma, mb) = veth_pair(tag)?;
    let ready = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let ready2 = ready.clone();
    let done2 = done.clone();
    let rx = in_netns(&b.0, move || {
        let fd = packet_socket(&vb, RX_ETHERTYPE)?;
        let big: libc::c_int = 32 << 20;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: setting an int and a timeval socket option.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&big as *const libc::c_int).cast(),
                4,
            );
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        ready2.store(true, Ordering::SeqCst);
        let mut buf = vec![0u8; 4096];
        let (mut bytes, mut first, mut last) = (0u64, None, Instant::now());
        loop {
            // SAFETY: receiving into our buffer.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n == RX_FRAME as isize {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                bytes += n as u64;
            } else if n < 0
                && (done2.load(Ordering::SeqCst) || last.elapsed() > Duration::from_secs(5))
            {
                break;
            }
        }
        Ok((bytes, first.map_or(Duration::ZERO, |f| last - f)))
    });
    wait_ready(&ready);
    let tx = packet_sender(&a.0, va, rx_frame(mb, ma), done);
    tx.join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    rx.join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))?
}

fn veth_tx(tag: &str) -> anyhow::Result<(u64, Duration)> {
    let (a, b, va, _vb, ma, mb) = veth_pair(tag)?;
    let frame = udp_frame(mb, ma, [10, 202, 0, 2], [10, 202, 0, 1]);
    let ready = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let rx = receiver(&b.0, [10, 202, 0, 1], ready.clone(), stop.clone());
    wait_ready(&ready);
    let tx = packet_sender(&a.0, va, frame, Arc::new(AtomicBool::new(false)));
    tx.join()
        .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    stop.store(true, Ordering::SeqCst);
    rx.join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))?
}

type Run = fn(&str) -> anyhow::Result<(u64, Duration)>;

/// The best rate (bytes/s) of each side over [`ROUNDS`] alternating rounds.
fn best_of(
    progress: &dyn Fn(&str),
    tag: &str,
    what: &str,
    virtio: Run,
    peer: Run,
) -> anyhow::Result<(f64, f64)> {
    let rate = |side: &str, (bytes, t): (u64, Duration)| {
        if t.is_zero() {
            bail!("net {what}: no frames arrived through {side} ({bytes} B)");
        }
        Ok(bytes as f64 / t.as_secs_f64())
    };
    let (mut v, mut p) = (0f64, 0f64);
    for round in 1..=ROUNDS {
        progress(&format!(
            "net {what} {round}/{ROUNDS}: virtio-net through a tap"
        ));
        v = v.max(rate("virtio-net", virtio(tag)?)?);
        progress(&format!("net {what} {round}/{ROUNDS}: veth"));
        p = p.max(rate("veth", peer(tag)?)?);
    }
    Ok((v, p))
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
    let row = |test: &str, unit: usize, (v, p): (f64, f64)| Row {
        test: test.into(),
        virtio_bps: v,
        virtio_iops: v / unit as f64,
        peer_bps: p,
        peer_iops: p / unit as f64,
        ratio: v / p,
        peer: "veth netns to netns (AF_PACKET)".into(),
    };
    Ok(vec![
        row(
            "net TX UDP 1472B",
            PAYLOAD,
            best_of(progress, &tag, "TX", virtio_tx, veth_tx)?,
        ),
        row(
            "net RX 1514B frames",
            RX_FRAME,
            best_of(progress, &tag, "RX", virtio_rx, veth_rx)?,
        ),
    ])
}
