//! virtio-vsock end to end at the device level: the test plays the guest on the rings and a
//! host program on the Unix sockets, in both connection directions.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use common::Rig;
use corefour_devices::virtio::driver::MmioDriver;
use corefour_devices::virtio::vsock::{self, Hdr, Vsock, VsockConfig, HDR_LEN};
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(5);
const CID: u64 = 42;

struct Guest<'a> {
    d: MmioDriver<'a>,
    rx_bufs: Vec<GuestAddress>,
}

impl Guest<'_> {
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let b = self.d.alloc(4096);
            self.rx_bufs.push(b);
            self.d.submit(0, &[(b, 4096, true)]).unwrap();
        }
    }

    fn recv(&mut self) -> (Hdr, Vec<u8>) {
        let (id, len) = self.d.wait_used(0, T).expect("RX packet");
        let b = self.rx_bufs[id as usize];
        let mut raw = vec![0u8; len as usize];
        self.d.mem.read_slice(&mut raw, b).unwrap();
        let h = Hdr::from_bytes(raw[..HDR_LEN].try_into().unwrap());
        // Re-post the same buffer in the next slot.
        self.rx_bufs.push(b);
        self.d.submit(0, &[(b, 4096, true)]).unwrap();
        (h, raw[HDR_LEN..].to_vec())
    }

    fn send(&mut self, op: u16, src_port: u32, dst_port: u32, payload: &[u8], fwd_cnt: u32) {
        let h = Hdr {
            src_cid: CID,
            dst_cid: vsock::HOST_CID,
            src_port,
            dst_port,
            len: payload.len() as u32,
            type_: 1,
            op,
            flags: if op == vsock::OP_SHUTDOWN { 3 } else { 0 },
            buf_alloc: 65536,
            fwd_cnt,
        };
        let hb = self.d.alloc(HDR_LEN as u64);
        self.d.mem.write_slice(&h.to_bytes(), hb).unwrap();
        let mut bufs = vec![(hb, HDR_LEN as u32, false)];
        if !payload.is_empty() {
            let p = self.d.alloc(payload.len() as u64);
            self.d.mem.write_slice(payload, p).unwrap();
            bufs.push((p, payload.len() as u32, false));
        }
        self.d.submit(1, &bufs).unwrap();
        assert!(self.d.wait_used(1, T).is_some(), "TX packet consumed");
    }
}

fn setup(rig: &Rig) -> Guest<'_> {
    let d = rig.driver(3, 32);
    let mut g = Guest {
        d,
        rx_bufs: Vec::new(),
    };
    g.post_rx(8);
    g
}

#[test]
fn host_initiated_connection() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let rig = Rig::new(Box::new(Vsock::new(VsockConfig {
        cid: CID,
        uds_path: uds.clone(),
    })));
    let mut cfg = [0u8; 8];
    corefour_devices::BusDevice::read(&*rig.transport, 0x100, &mut cfg[..4]);
    assert_eq!(u32::from_le_bytes(cfg[..4].try_into().unwrap()), CID as u32);
    let mut g = setup(&rig);

    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(T)).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    let (req, _) = g.recv();
    assert_eq!(req.op, vsock::OP_REQUEST);
    assert_eq!((req.src_cid, req.dst_cid, req.dst_port), (2, CID, 1234));
    let host_port = req.src_port;
    g.send(vsock::OP_RESPONSE, 1234, host_port, b"", 0);
    let mut r = BufReader::new(host.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {host_port}\n"));

    // Host -> guest.
    host.write_all(b"hello guest").unwrap();
    let (h, data) = g.recv();
    assert_eq!(h.op, vsock::OP_RW);
    assert_eq!(data, b"hello guest");
    // Guest -> host.
    g.send(vsock::OP_RW, 1234, host_port, b"hello host", 11);
    let mut got = [0u8; 10];
    r.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");
    // Host closes: the guest hears SHUTDOWN.
    drop(r);
    drop(host);
    let (h, _) = g.recv();
    assert_eq!(h.op, vsock::OP_SHUTDOWN);
    g.send(vsock::OP_RST, 1234, host_port, b"", 11);
}

#[test]
fn guest_initiated_connection_and_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let listener = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let rig = Rig::new(Box::new(Vsock::new(VsockConfig {
        cid: CID,
        uds_path: uds.clone(),
    })));
    let mut g = setup(&rig);

    // Nobody listens on port 6000: RST.
    g.send(vsock::OP_REQUEST, 777, 6000, b"", 0);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port, h.src_port), (vsock::OP_RST, 777, 6000));

    g.send(vsock::OP_REQUEST, 778, 5000, b"", 0);
    let (h, _) = g.recv();
    assert_eq!(
        (h.op, h.dst_port, h.src_port),
        (vsock::OP_RESPONSE, 778, 5000)
    );
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    g.send(vsock::OP_RW, 778, 5000, b"ping", 0);
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    s.write_all(b"pong").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, data.as_slice()), (vsock::OP_RW, &b"pong"[..]));
    assert_eq!(
        h.fwd_cnt, 4,
        "credit: the device reports the 4 bytes it forwarded"
    );

    // Data for an unknown connection gets RST.
    g.send(vsock::OP_RW, 999, 5000, b"x", 0);
    let (h, _) = g.recv();
    assert_eq!(h.op, vsock::OP_RST);
}

#[test]
fn big_transfer_respects_credit() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let listener = UnixListener::bind(format!("{}_7000", uds.display())).unwrap();
    let rig = Rig::new(Box::new(Vsock::new(VsockConfig {
        cid: CID,
        uds_path: uds.clone(),
    })));
    let mut g = setup(&rig);
    g.send(vsock::OP_REQUEST, 100, 7000, b"", 0);
    assert_eq!(g.recv().0.op, vsock::OP_RESPONSE);
    let (mut s, _) = listener.accept().unwrap();
    // The host sends 200 KiB; the guest advertised 64 KiB and never consumes: the device must
    // stop at the credit limit.
    let data: Vec<u8> = (0..200 * 1024).map(|i| i as u8).collect();
    let writer = std::thread::spawn(move || {
        let _ = s.write_all(&data);
        s
    });
    let mut got = 0usize;
    while let Some((id, len)) = g.d.wait_used(0, Duration::from_millis(300)) {
        got += len as usize - HDR_LEN;
        let b = g.rx_bufs[id as usize];
        g.rx_bufs.push(b);
        g.d.submit(0, &[(b, 4096, true)]).unwrap();
    }
    assert_eq!(got, 65536, "exactly the advertised credit delivered");
    // The guest reports what it consumed each time it runs dry: the rest flows, 64 KiB at a time.
    for _ in 0..10 {
        if got == 200 * 1024 {
            break;
        }
        g.send(vsock::OP_CREDIT_UPDATE, 100, 7000, b"", got as u32);
        while let Some((id, len)) = g.d.wait_used(0, Duration::from_millis(300)) {
            got += len as usize - HDR_LEN;
            let b = g.rx_bufs[id as usize];
            g.rx_bufs.push(b);
            g.d.submit(0, &[(b, 4096, true)]).unwrap();
        }
    }
    assert_eq!(got, 200 * 1024);
    drop(writer.join());
}
