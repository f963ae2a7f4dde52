//! virtio-net on a tap device: one RX and one TX queue, a MAC address, link status and a
//! token-bucket rate limiter per direction. Frames go between guest buffers and the tap with
//! one readv/writev each (the tap speaks the same 12-byte virtio-net header).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryMmap, Permissions};

use super::chain::{self, Chain};
use super::rate_limiter::{RateLimit, RateLimiter};
use super::ring::SplitRing;
use super::state::{DeviceSnap, QueueSnap, StateError};
use super::tap::{Tap, TapError, VNET_HDR_LEN};
use super::worker::Poller;
use super::{
    device_type, ActivateError, Activation, DeviceError, Interrupt, QueueHandler, VirtioDevice,
};

const QUEUE_SIZE: u16 = 256;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const LINK_UP: u16 = 1;
/// The largest frame without offloads: what RX admits before it knows the real size.
const MAX_FRAME: u64 = 1514;
const TAP_TOKEN: u64 = 1;

/// How to attach a network interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    pub rx_limit: RateLimit,
    pub tx_limit: RateLimit,
}

impl NetConfig {
    /// Parses `TAP[,mac=52:54:00:12:34:56][,rx_bytes=N][,tx_bytes=N][,rx_ops=N][,tx_ops=N]`
    /// (each with a `_burst` twin).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let tap = parts.next().unwrap_or_default().to_string();
        let mut c = NetConfig {
            tap,
            ..Default::default()
        };
        for p in parts {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            if k == "mac" {
                c.mac =
                    Some(parse_mac(v).ok_or_else(|| format!("mac={v}: want aa:bb:cc:dd:ee:ff"))?);
                continue;
            }
            let (limit, key) = if let Some(rest) = k.strip_prefix("rx_") {
                (&mut c.rx_limit, rest)
            } else if let Some(rest) = k.strip_prefix("tx_") {
                (&mut c.tx_limit, rest)
            } else {
                return Err(format!("unknown net option `{k}` (known: mac=, rx_bytes=, tx_bytes=, rx_ops=, tx_ops= and their _burst)"));
            };
            if !limit.parse_option(key, v)? {
                return Err(format!("unknown net option `{k}`"));
            }
        }
        Ok(c)
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut it = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(it.next()?, 16).ok()?;
    }
    it.next().is_none().then_some(mac)
}

pub struct Net {
    tap: Arc<Tap>,
    mac: [u8; 6],
    rx_limit: RateLimit,
    tx_limit: RateLimit,
}

impl Net {
    pub fn new(config: &NetConfig) -> Result<Self, TapError> {
        let tap = Tap::open(&config.tap)?;
        let mac = config.mac.unwrap_or_else(|| {
            // Locally administered, unicast, the rest random.
            let mut m = [0x06, 0xc4, 0, 0, 0, 0];
            // SAFETY: getrandom writes at most 4 bytes into the slice.
            unsafe { libc::getrandom(m[2..].as_mut_ptr().cast(), 4, 0) };
            m
        });
        Ok(Self {
            tap: Arc::new(tap),
            mac,
            rx_limit: config.rx_limit,
            tx_limit: config.tx_limit,
        })
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        F_MAC | F_STATUS
    }
    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        c
    }
    fn save_device(&self) -> DeviceSnap {
        DeviceSnap::Net {
            mac: self.mac,
            tap: self.tap.name().to_string(),
        }
    }
    fn restore_device(&mut self, saved: &DeviceSnap) -> Result<(), StateError> {
        let DeviceSnap::Net { mac, tap } = saved else {
            return Err(StateError::Mismatch(format!(
                "saved {} state for a net device",
                saved.name()
            )));
        };
        // The guest knows its MAC since it probed the device: keep it, also when it was
        // generated. The tap is the one the config names now (a clone gets its own).
        self.mac = *mac;
        if tap != self.tap.name() {
            tracing::info!(
                "virtio-net: state saved on tap {tap}, attached to {}",
                self.tap.name()
            );
        }
        Ok(())
    }
    fn activate(&mut self, a: Activation) -> Result<Box<dyn QueueHandler>, ActivateError> {
        let got = a.queues.len();
        let mut qs = a.queues.into_iter();
        let (Some(rx), Some(tx)) = (qs.next(), qs.next()) else {
            return Err(ActivateError::QueueCount { got, want: 2 });
        };
        Ok(Box::new(NetHandler {
            rx: SplitRing::new(rx, &a.mem),
            tx: SplitRing::new(tx, &a.mem),
            mem: a.mem,
            interrupt: a.interrupt,
            tap: self.tap.clone(),
            rx_limiter: RateLimiter::new(self.rx_limit),
            tx_limiter: RateLimiter::new(self.tx_limit),
            rx_waiting_for_buffers: false,
            rx_more: false,
            rx_tried: Instant::now(),
            rx_throttled: None,
            tx_throttled: None,
            scratch: Scratch::default(),
        }))
    }
}

/// Frames one RX pass takes from the tap at most: a host that floods the tap must not keep
/// the worker from TX, a park or a stop.
const RX_BATCH: usize = 256;
/// RX looks at the driver's `used_event` once per this many frames (and at the end of a pass).
const RX_SIGNAL_EVERY: usize = 32;
/// While TX keeps the worker polling (no epoll_wait, so no tap edge is seen), the tap is read
/// at least this often.
const RX_WHILE_TX: Duration = Duration::from_micros(100);

/// Reused from frame to frame: the hot path allocates nothing.
#[derive(Default)]
struct Scratch {
    chain: Chain,
    iov: Vec<libc::iovec>,
}

// SAFETY: the iovecs are scratch space rebuilt for every frame and never used after it, so
// moving the handler to its worker thread moves nothing live.
unsafe impl Send for Scratch {}

/// Both queues run on [`SplitRing`] (host pointers into the rings, as blk does; virtio-queue
/// validated them at activation): per frame the device then costs one pop, one readv or writev
/// and one used-ring store, and the syscall is all that is left of it in a profile.
struct NetHandler {
    mem: GuestMemoryMmap,
    rx: SplitRing,
    tx: SplitRing,
    interrupt: Arc<Interrupt>,
    tap: Arc<Tap>,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// The tap may hold frames but the guest gave no buffers: resume when it adds some.
    rx_waiting_for_buffers: bool,
    /// The tap may hold frames whose edge is spent: the last RX pass stopped at [`RX_BATCH`]
    /// or at the limiter.
    rx_more: bool,
    /// When the tap was last read: see [`RX_WHILE_TX`].
    rx_tried: Instant,
    rx_throttled: Option<Instant>,
    tx_throttled: Option<Instant>,
    scratch: Scratch,
}

impl NetHandler {
    /// Moves frames from the tap into the guest's RX buffers until the tap is empty, the guest
    /// has no buffer left, the limiter says stop or [`RX_BATCH`] frames went.
    fn process_rx(&mut self) -> Result<(), DeviceError> {
        let Self {
            mem,
            rx,
            tap,
            rx_limiter: limiter,
            scratch,
            interrupt,
            ..
        } = self;
        self.rx_tried = Instant::now();
        self.rx_more = false;
        rx.disable_notification();
        // An unlimited limiter is not asked: admit reads the clock.
        let limited = !limiter.is_unlimited();
        let event_idx = rx.event_idx();
        let mut result = Ok(());
        let mut out_of_buffers = false;
        let mut frames = 0;
        loop {
            if frames == RX_BATCH {
                self.rx_more = true;
                break;
            }
            match rx.pop(&mut scratch.chain) {
                Ok(true) => {}
                Ok(false) => {
                    out_of_buffers = true;
                    break;
                }
                Err(source) => {
                    result = Err(DeviceError::Queue { queue: 0, source });
                    break;
                }
            }
            let chain = &scratch.chain;
            let len = chain.writable_len();
            if chain.error.is_some() || !chain.readable.is_empty() || len < VNET_HDR_LEN {
                // Unusable buffer (malformed, device-readable parts, too short): hand it back
                // empty rather than hold it forever.
                tracing::debug!(
                    "virtio-net: RX chain {} unusable, returned empty",
                    chain.head
                );
                rx.add_used(chain.head, 0);
            } else if let Err(d) = if limited {
                limiter.admit(MAX_FRAME)
            } else {
                Ok(())
            } {
                rx.undo_pop();
                self.rx_throttled = Some(Instant::now() + d);
                // The tap's edge is spent: read on when the throttle ends.
                self.rx_more = true;
                break;
            } else if chain::iovecs_into(
                mem,
                &chain.writable,
                0,
                len,
                Permissions::Write,
                &mut scratch.iov,
            )
            .is_err()
            {
                limiter.refund_bytes(MAX_FRAME);
                rx.add_used(chain.head, 0);
            } else {
                match tap.readv(&scratch.iov) {
                    Ok(Some(n)) => {
                        limiter.refund_bytes(MAX_FRAME.saturating_sub(n as u64));
                        // The tap leaves num_buffers alone; without MRG_RXBUF it is always 1.
                        chain::write_to(mem, &chain.writable, 10, &1u16.to_le_bytes());
                        rx.add_used(chain.head, n as u32);
                        frames += 1;
                    }
                    Ok(None) => {
                        limiter.refund_bytes(MAX_FRAME);
                        rx.undo_pop();
                        break;
                    }
                    Err(e) => {
                        limiter.refund_bytes(MAX_FRAME);
                        rx.undo_pop();
                        result = Err(DeviceError::Backend(e));
                        break;
                    }
                }
            }
            // With event idx the driver names the frame it wants to hear about; telling it
            // during the pass lets it refill buffers while the device goes on. Every
            // RX_SIGNAL_EVERY frames, as vhost-net does: a driver that re-arms for the next frame
            // after each drain would otherwise be woken for nearly every frame of a stream.
            if event_idx && frames % RX_SIGNAL_EVERY == 0 && rx.needs_notification() {
                interrupt.signal_used_queue(0);
            }
        }
        if rx.needs_notification() {
            interrupt.signal_used_queue(0);
        }
        self.rx_waiting_for_buffers = out_of_buffers;
        result
    }

    /// Writes every available TX frame to the tap (one writev each) unless the limiter stops
    /// it. Driver notifications stay off until the worker sleeps (`before_sleep`).
    fn process_tx(&mut self) -> Result<(), DeviceError> {
        let Self {
            mem,
            tx,
            tap,
            tx_limiter: limiter,
            scratch,
            interrupt,
            ..
        } = self;
        tx.disable_notification();
        let event_idx = tx.event_idx();
        let limited = !limiter.is_unlimited();
        let mut result = Ok(());
        loop {
            match tx.pop(&mut scratch.chain) {
                Ok(true) => {}
                Ok(false) => break,
                Err(source) => {
                    result = Err(DeviceError::Queue { queue: 1, source });
                    break;
                }
            }
            let chain = &scratch.chain;
            let len = chain.readable_len();
            if chain.error.is_some() || !chain.writable.is_empty() || len < VNET_HDR_LEN {
                tracing::debug!("virtio-net: dropped malformed TX chain {}", chain.head);
            } else {
                if limited {
                    if let Err(wait) = limiter.admit((len - VNET_HDR_LEN) as u64) {
                        tx.undo_pop();
                        self.tx_throttled = Some(Instant::now() + wait);
                        break;
                    }
                }
                let iov = &mut scratch.iov;
                if chain::iovecs_into(mem, &chain.readable, 0, len, Permissions::Read, iov).is_ok()
                {
                    // A full tap queue or a frame the tap refuses (too big): dropped, as a NIC
                    // would.
                    if let Err(e) = tap.writev(iov) {
                        tracing::debug!("virtio-net: TX frame dropped: {e}");
                    }
                }
            }
            tx.add_used(chain.head, 0);
            if event_idx && tx.needs_notification() {
                interrupt.signal_used_queue(1);
            }
        }
        if tx.needs_notification() {
            interrupt.signal_used_queue(1);
        }
        result
    }

    fn rx_ready(&self) -> bool {
        unthrottled(self.rx_throttled)
            && (self.rx_more || (self.rx_waiting_for_buffers && self.rx.pending()))
    }

    fn tx_ready(&self) -> bool {
        unthrottled(self.tx_throttled) && self.tx.pending()
    }

    /// Ends the throttles whose time is up. The worker's timer does it too, but a worker kept
    /// polling by one direction's traffic does not get to its timer.
    fn expire_throttles(&mut self) {
        for t in [&mut self.rx_throttled, &mut self.tx_throttled] {
            if unthrottled(*t) {
                *t = None;
            }
        }
    }
}

fn unthrottled(until: Option<Instant>) -> bool {
    until.is_none_or(|t| t <= Instant::now())
}

impl QueueHandler for NetHandler {
    fn queue_states(&self) -> Vec<QueueSnap> {
        vec![self.rx.snap(), self.tx.snap()]
    }

    fn fds(&self) -> Vec<(std::os::fd::RawFd, u64)> {
        use std::os::fd::AsRawFd;
        vec![(self.tap.as_raw_fd(), TAP_TOKEN)]
    }

    fn queue_notified(&mut self, queue: usize, _p: &Poller) -> Result<(), DeviceError> {
        self.expire_throttles();
        match queue {
            0 if self.rx_ready() => self.process_rx(),
            1 if self.tx_throttled.is_none() => {
                self.process_tx()?;
                // Polling on TX hides the tap's edge from this thread until it sleeps.
                if self.rx_throttled.is_none()
                    && !self.rx_waiting_for_buffers
                    && self.rx_tried.elapsed() >= RX_WHILE_TX
                {
                    self.process_rx()?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn pending_queue(&self) -> Option<usize> {
        if self.tx_ready() {
            Some(1)
        } else if self.rx_ready() {
            Some(0)
        } else {
            None
        }
    }

    fn before_sleep(&mut self) -> bool {
        let tx = self.tx.enable_notification() && unthrottled(self.tx_throttled);
        // RX kicks only matter while the device waits for buffers.
        let rx = self.rx_waiting_for_buffers && self.rx.enable_notification();
        tx || self.rx_ready() || (rx && unthrottled(self.rx_throttled))
    }

    fn fd_ready(&mut self, _token: u64, _events: u32, _p: &Poller) -> Result<(), DeviceError> {
        self.expire_throttles();
        if self.rx_throttled.is_some() {
            // The edge is spent: the pass after the throttle reads what it announced.
            self.rx_more = true;
            return Ok(());
        }
        self.process_rx()
    }

    fn next_timer(&self) -> Option<Duration> {
        // Asked on every turn of the worker's loop: no clock read when nothing is throttled.
        if self.rx_throttled.is_none() && self.tx_throttled.is_none() {
            return None;
        }
        let now = Instant::now();
        [self.rx_throttled, self.tx_throttled]
            .into_iter()
            .flatten()
            .map(|t| t.saturating_duration_since(now))
            .min()
    }

    fn timer(&mut self, _p: &Poller) -> Result<(), DeviceError> {
        let now = Instant::now();
        if self.rx_throttled.is_some_and(|t| t <= now) {
            self.rx_throttled = None;
            self.process_rx()?;
        }
        if self.tx_throttled.is_some_and(|t| t <= now) {
            self.tx_throttled = None;
            self.process_tx()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_net_options() {
        let c = NetConfig::parse("tap0,mac=52:54:00:12:34:56,rx_bytes=1M,tx_ops=100").unwrap();
        assert_eq!(c.tap, "tap0");
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(c.rx_limit.bytes_per_sec, 1 << 20);
        assert_eq!(c.tx_limit.ops_per_sec, 100);
        assert!(NetConfig::parse("tap0,mac=zz").is_err());
        assert!(NetConfig::parse("tap0,speed=1").is_err());
        assert_eq!(parse_mac("1:2:3:4:5"), None);
    }
}
