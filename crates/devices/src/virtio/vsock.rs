//! virtio-vsock, host side over Unix sockets in Firecracker's convention:
//! - host-initiated: a host program connects to `uds_path` and writes `CONNECT <port>\n`; the
//!   device opens a stream to guest port `<port>` and answers `OK <host port>\n` once the guest
//!   accepts (the Unix connection is closed if it refuses);
//! - guest-initiated: a guest connection to CID 2 port `P` is connected to the Unix socket
//!   `<uds_path>_P` on the host.
//!
//! Only stream sockets. Flow control follows the spec's credit scheme: each side advertises its
//! buffer (`buf_alloc`) and how much it has consumed (`fwd_cnt`); neither sends beyond that.
//! A guest that overruns our buffer gets its connection reset.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::chain::{self, Chain, Outcome};
use super::state::{DeviceSnap, QueueSnap, StateError};
use super::worker::Poller;
use super::{
    device_type, ActivateError, Activation, DeviceError, Interrupt, QueueHandler, VirtioDevice,
};

const QUEUE_SIZE: u16 = 256;
pub const HOST_CID: u64 = 2;
pub const HDR_LEN: usize = 44;
const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_SEND: u32 = 2;
/// What we let a guest have in flight towards one host socket.
const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload per RX packet.
const MAX_PKT: usize = 64 * 1024;
const LISTENER_TOKEN: u64 = 1;
const FIRST_CONN_TOKEN: u64 = 16;
/// Host ports handed out for host-initiated connections start here (as Firecracker's do).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock CID {0} is reserved (use 3 or above)")]
    ReservedCid(u64),
    #[error("bad vsock option `{0}`: want CID,UDS_PATH")]
    Parse(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// Parses `CID,UDS_PATH`.
    pub fn parse(s: &str) -> Result<Self, VsockError> {
        let (cid, path) = s
            .split_once(',')
            .ok_or_else(|| VsockError::Parse(s.to_string()))?;
        let cid: u64 = cid.parse().map_err(|_| VsockError::Parse(s.to_string()))?;
        if cid < 3 || cid == u64::from(u32::MAX) {
            return Err(VsockError::ReservedCid(cid));
        }
        Ok(Self {
            cid,
            uds_path: PathBuf::from(path),
        })
    }
}

/// The 44-byte packet header (virtio spec 5.10.6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

pub struct Vsock {
    config: VsockConfig,
    /// Restored from a snapshot: tell the guest at activation that its connections are gone.
    reset_on_activate: bool,
}

/// virtio_vsock_event id: the transport was reset (host connections lost, CID may differ).
const EVENT_TRANSPORT_RESET: u32 = 0;

impl Vsock {
    pub fn new(config: VsockConfig) -> Self {
        Self {
            config,
            reset_on_activate: false,
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        0
    }
    fn config(&self) -> Vec<u8> {
        self.config.cid.to_le_bytes().to_vec()
    }
    fn save_device(&self) -> DeviceSnap {
        DeviceSnap::Vsock {
            cid: self.config.cid,
        }
    }
    fn restore_device(&mut self, saved: &DeviceSnap) -> Result<(), StateError> {
        let DeviceSnap::Vsock { cid } = saved else {
            return Err(StateError::Mismatch(format!(
                "saved {} state for a vsock device",
                saved.name()
            )));
        };
        if *cid != self.config.cid {
            // A clone gets its own CID; the reset event makes the guest read it again.
            tracing::info!("virtio-vsock: CID {cid} becomes {}", self.config.cid);
        }
        // The host ends of the guest's connections did not survive the snapshot.
        self.reset_on_activate = true;
        Ok(())
    }
    fn activate(&mut self, a: Activation) -> Result<Box<dyn QueueHandler>, ActivateError> {
        let got = a.queues.len();
        let mut qs = a.queues.into_iter();
        let (Some(rx), Some(tx), Some(event)) = (qs.next(), qs.next(), qs.next()) else {
            return Err(ActivateError::QueueCount { got, want: 3 });
        };
        // A stale socket file from an earlier run would make bind fail.
        let _ = std::fs::remove_file(&self.config.uds_path);
        let listener = UnixListener::bind(&self.config.uds_path).map_err(ActivateError::Backend)?;
        listener
            .set_nonblocking(true)
            .map_err(ActivateError::Backend)?;
        Ok(Box::new(VsockHandler {
            mem: a.mem,
            rx,
            tx,
            event,
            interrupt: a.interrupt,
            st: State {
                cid: self.config.cid,
                uds_path: self.config.uds_path.clone(),
                listener,
                conns: HashMap::new(),
                by_token: HashMap::new(),
                pending: HashMap::new(),
                ctrl: VecDeque::new(),
                next_token: FIRST_CONN_TOKEN,
                next_local_port: FIRST_LOCAL_PORT,
            },
            rx_waiting: false,
            reset_pending: std::mem::take(&mut self.reset_on_activate),
        }))
    }
}

#[derive(Debug, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated, REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: ConnState,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes from the guest written to the host socket.
    fwd_cnt: u32,
    fwd_cnt_reported: u32,
    to_host: VecDeque<u8>,
    /// The host socket may have data we have not read yet.
    host_readable: bool,
    /// The guest will send no more: shut our write side once `to_host` is flushed.
    guest_done_sending: bool,
    host_eof: bool,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: ConnState) -> Self {
        Self {
            stream,
            token,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_reported: 0,
            to_host: VecDeque::new(),
            host_readable: true,
            guest_done_sending: false,
            host_eof: false,
        }
    }

    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Writes buffered guest data to the host socket; Err means the connection is dead.
    fn flush(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.guest_done_sending {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }
}

/// (host port, guest port)
type Key = (u32, u32);

struct State {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<Key, Conn>,
    by_token: HashMap<u64, Key>,
    /// Accepted host connections still sending their `CONNECT <port>\n` line.
    pending: HashMap<u64, (UnixStream, Vec<u8>)>,
    /// Control packets waiting for an RX buffer.
    ctrl: VecDeque<Hdr>,
    next_token: u64,
    next_local_port: u32,
}

struct VsockHandler {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    /// Carries TRANSPORT_RESET after a restore (the only event there is).
    event: Queue,
    interrupt: Arc<Interrupt>,
    st: State,
    rx_waiting: bool,
    /// A TRANSPORT_RESET event waits for a buffer on the event queue.
    reset_pending: bool,
}

impl State {
    fn reply(&self, key: Key, op: u16, flags: u32) -> Hdr {
        let (fwd_cnt, buf_alloc) = self
            .conns
            .get(&key)
            .map_or((0, BUF_ALLOC), |c| (c.fwd_cnt, BUF_ALLOC));
        Hdr {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn register(poller: &Poller, s: &UnixStream, token: u64) -> io::Result<()> {
        poller.add(
            s.as_raw_fd(),
            token,
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP,
        )
    }

    fn remove(&mut self, key: Key, poller: &Poller) {
        if let Some(c) = self.conns.remove(&key) {
            let _ = poller.remove(c.stream.as_raw_fd());
            self.by_token.remove(&c.token);
        }
    }

    fn reset(&mut self, key: Key, poller: &Poller) {
        self.ctrl.push_back(self.reply(key, OP_RST, 0));
        self.remove(key, poller);
    }

    fn accept(&mut self, poller: &Poller) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let t = self.token();
                    if Self::register(poller, &s, t).is_ok() {
                        self.pending.insert(t, (s, Vec::new()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line of a pending host connection.
    fn pending_ready(&mut self, token: u64, poller: &Poller) {
        let Some((s, line)) = self.pending.get_mut(&token) else {
            return;
        };
        let mut b = [0u8; 32];
        let done = loop {
            match s.read(&mut b) {
                Ok(0) => break Err(()),
                Ok(n) => {
                    line.extend_from_slice(&b[..n]);
                    if line.contains(&b'\n') {
                        break Ok(());
                    }
                    if line.len() > 64 {
                        break Err(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err(()),
            }
        };
        let Some((s, line)) = self.pending.remove(&token) else {
            return;
        };
        let port = done.ok().and_then(|()| parse_connect(&line));
        let Some(port) = port else {
            let _ = poller.remove(s.as_raw_fd());
            return;
        };
        let mut local = self.next_local_port;
        while self.conns.contains_key(&(local, port)) {
            local = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        }
        self.next_local_port = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let key = (local, port);
        let mut c = Conn::new(s, token, ConnState::Connecting);
        // Bytes written after the CONNECT line stay in the socket until the guest accepts.
        c.host_readable = true;
        self.conns.insert(key, c);
        self.by_token.insert(token, key);
        self.ctrl.push_back(self.reply(key, OP_REQUEST, 0));
    }

    /// One packet from the guest.
    fn guest_packet(&mut self, h: Hdr, payload: &[u8], poller: &Poller) {
        if h.dst_cid != HOST_CID || h.src_cid != self.cid {
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.type_ != TYPE_STREAM {
            if h.op != OP_RST {
                self.ctrl.push_back(self.reply(key, OP_RST, 0));
            }
            return;
        }
        if h.op == OP_REQUEST {
            if self.conns.contains_key(&key) {
                self.reset(key, poller);
                return;
            }
            let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
            let stream = UnixStream::connect(&path).and_then(|s| {
                s.set_nonblocking(true)?;
                Ok(s)
            });
            match stream {
                Ok(s) => {
                    let t = self.token();
                    if Self::register(poller, &s, t).is_err() {
                        self.ctrl.push_back(self.reply(key, OP_RST, 0));
                        return;
                    }
                    let mut c = Conn::new(s, t, ConnState::Established);
                    c.peer_buf_alloc = h.buf_alloc;
                    c.peer_fwd_cnt = h.fwd_cnt;
                    self.conns.insert(key, c);
                    self.by_token.insert(t, key);
                    self.ctrl.push_back(self.reply(key, OP_RESPONSE, 0));
                }
                Err(e) => {
                    tracing::debug!("vsock: guest connect to {path}: {e}");
                    self.ctrl.push_back(self.reply(key, OP_RST, 0));
                }
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                self.ctrl.push_back(self.reply(key, OP_RST, 0));
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if c.state == ConnState::Connecting => {
                c.state = ConnState::Established;
                let ok = format!("OK {}\n", key.0);
                // The host side just connected and has an empty socket buffer.
                if c.stream.write_all(ok.as_bytes()).is_err() {
                    self.reset(key, poller);
                }
            }
            OP_RW if c.state == ConnState::Established => {
                if c.to_host.len() + payload.len() > BUF_ALLOC as usize {
                    tracing::debug!("vsock: guest overran its credit on port {}", key.1);
                    self.reset(key, poller);
                    return;
                }
                c.to_host.extend(payload);
                if c.flush().is_err() {
                    self.reset(key, poller);
                    return;
                }
                self.maybe_credit_update(key);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                let r = self.reply(key, OP_CREDIT_UPDATE, 0);
                if let Some(c) = self.conns.get_mut(&key) {
                    c.fwd_cnt_reported = c.fwd_cnt;
                }
                self.ctrl.push_back(r);
            }
            OP_SHUTDOWN => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.guest_done_sending = true;
                    if c.flush().is_err() {
                        self.reset(key, poller);
                        return;
                    }
                }
                if h.flags & 3 == 3 {
                    // Both directions closed: the connection is over.
                    self.reset(key, poller);
                }
            }
            OP_RST => self.remove(key, poller),
            _ => self.reset(key, poller),
        }
    }

    fn maybe_credit_update(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if c.fwd_cnt.wrapping_sub(c.fwd_cnt_reported) >= BUF_ALLOC / 4 {
                c.fwd_cnt_reported = c.fwd_cnt;
                let r = self.reply(key, OP_CREDIT_UPDATE, 0);
                self.ctrl.push_back(r);
            }
        }
    }

    fn stream_ready(&mut self, token: u64, events: u32, poller: &Poller) {
        if self.pending.contains_key(&token) {
            self.pending_ready(token, poller);
            return;
        }
        let Some(&key) = self.by_token.get(&token) else {
            return;
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if events & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0 {
            c.host_readable = true;
        }
        if events & libc::EPOLLOUT as u32 != 0 && c.flush().is_err() {
            self.reset(key, poller);
            return;
        }
        self.maybe_credit_update(key);
    }

    /// The next packet for an RX buffer with room for `space` payload bytes, if any.
    fn next_rx(&mut self, space: usize, poller: &Poller) -> Option<(Hdr, Vec<u8>)> {
        if let Some(h) = self.ctrl.pop_front() {
            if let Some(c) = self.conns.get_mut(&(h.src_port, h.dst_port)) {
                c.fwd_cnt_reported = c.fwd_cnt;
            }
            return Some((h, Vec::new()));
        }
        let keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state == ConnState::Established
                    && c.host_readable
                    && !c.host_eof
                    && c.peer_credit() > 0
            })
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            let want = space.min(MAX_PKT).min(c.peer_credit() as usize);
            let mut buf = vec![0u8; want];
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    c.host_eof = true;
                    // The host closed: tell the guest neither side will send more.
                    let h = self.reply(key, OP_SHUTDOWN, 3);
                    return Some((h, Vec::new()));
                }
                Ok(n) => {
                    buf.truncate(n);
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                    c.fwd_cnt_reported = c.fwd_cnt;
                    let mut h = self.reply(key, OP_RW, 0);
                    h.len = n as u32;
                    return Some((h, buf));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.host_readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.reset(key, poller);
                    return self.ctrl.pop_front().map(|h| (h, Vec::new()));
                }
            }
        }
        None
    }

    fn has_rx_work(&self) -> bool {
        !self.ctrl.is_empty()
            || self.conns.values().any(|c| {
                c.state == ConnState::Established
                    && c.host_readable
                    && !c.host_eof
                    && c.peer_credit() > 0
            })
    }
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\n')?.trim_end_matches('\r');
    s.strip_prefix("CONNECT ")?.trim().parse().ok()
}

impl VsockHandler {
    fn process_tx(&mut self, poller: &Poller) -> Result<(), DeviceError> {
        let mem = &self.mem;
        let st = &mut self.st;
        let notify = chain::process_queue(
            &mut self.tx,
            mem,
            1,
            |c: DescriptorChain<&GuestMemoryMmap>| {
                let chain = Chain::parse(mem, c);
                let mut hb = [0u8; HDR_LEN];
                if chain.error.is_some()
                    || chain::read_from(mem, &chain.readable, 0, &mut hb) != HDR_LEN
                {
                    return Outcome::Done(0);
                }
                let h = Hdr::from_bytes(&hb);
                let avail = chain.readable_len() - HDR_LEN;
                let len = (h.len as usize).min(avail).min(BUF_ALLOC as usize);
                let mut payload = vec![0u8; if h.op == OP_RW { len } else { 0 }];
                let got = chain::read_from(mem, &chain.readable, HDR_LEN, &mut payload);
                payload.truncate(got);
                st.guest_packet(h, &payload, poller);
                Outcome::Done(0)
            },
        )?;
        if notify {
            self.interrupt.signal_used_queue(1);
        }
        self.process_rx(poller)
    }

    fn process_rx(&mut self, poller: &Poller) -> Result<(), DeviceError> {
        if !self.st.has_rx_work() {
            self.rx_waiting = false;
            return Ok(());
        }
        let mem = &self.mem;
        let st = &mut self.st;
        let mut idle = false;
        let notify = chain::process_queue(
            &mut self.rx,
            mem,
            0,
            |c: DescriptorChain<&GuestMemoryMmap>| {
                let chain = Chain::parse(mem, c);
                let len = chain.writable_len();
                if chain.error.is_some() || len < HDR_LEN {
                    return Outcome::Done(0);
                }
                let Some((h, payload)) = st.next_rx(len - HDR_LEN, poller) else {
                    idle = true;
                    return Outcome::Retry;
                };
                chain::write_to(mem, &chain.writable, 0, &h.to_bytes());
                chain::write_to(mem, &chain.writable, HDR_LEN, &payload);
                Outcome::Done((HDR_LEN + payload.len()) as u32)
            },
        )?;
        if notify {
            self.interrupt.signal_used_queue(0);
        }
        // Out of RX buffers with work left: wait for the guest to add some.
        self.rx_waiting = !idle && self.st.has_rx_work();
        Ok(())
    }
}

impl VsockHandler {
    /// Puts a TRANSPORT_RESET event in the first buffer of the event queue (Linux then drops
    /// its connections and rereads the CID); waits for a buffer if there is none yet.
    fn send_reset(&mut self) -> Result<(), DeviceError> {
        let mem = &self.mem;
        let mut sent = false;
        let notify = chain::process_queue(&mut self.event, mem, 2, |c| {
            if sent {
                return Outcome::Retry;
            }
            sent = true;
            let chain = Chain::parse(mem, c);
            let id = EVENT_TRANSPORT_RESET.to_le_bytes();
            Outcome::Done(chain::write_to(mem, &chain.writable, 0, &id) as u32)
        })?;
        if sent {
            self.reset_pending = false;
        }
        if notify {
            self.interrupt.signal_used();
        }
        Ok(())
    }
}

impl QueueHandler for VsockHandler {
    fn queue_states(&self) -> Vec<QueueSnap> {
        vec![
            QueueSnap::of(&self.rx),
            QueueSnap::of(&self.tx),
            QueueSnap::of(&self.event),
        ]
    }

    fn fds(&self) -> Vec<(std::os::fd::RawFd, u64)> {
        vec![(self.st.listener.as_raw_fd(), LISTENER_TOKEN)]
    }

    fn queue_notified(&mut self, queue: usize, poller: &Poller) -> Result<(), DeviceError> {
        if self.reset_pending {
            self.send_reset()?;
        }
        match queue {
            0 => self.process_rx(poller),
            1 => self.process_tx(poller),
            _ => Ok(()),
        }
    }

    fn fd_ready(&mut self, token: u64, events: u32, poller: &Poller) -> Result<(), DeviceError> {
        if token == LISTENER_TOKEN {
            self.st.accept(poller);
        } else {
            self.st.stream_ready(token, events, poller);
        }
        self.process_rx(poller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_connect_parses() {
        let h = Hdr {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1,
            dst_port: 2,
            len: 5,
            type_: 1,
            op: OP_RW,
            flags: 0,
            buf_alloc: 7,
            fwd_cnt: 9,
        };
        assert_eq!(Hdr::from_bytes(&h.to_bytes()), h);
        assert_eq!(parse_connect(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52"), None);
        assert_eq!(parse_connect(b"HELLO 52\n"), None);
        assert!(VsockConfig::parse("2,/tmp/v").is_err());
        assert_eq!(VsockConfig::parse("3,/tmp/v").unwrap().cid, 3);
    }
}
