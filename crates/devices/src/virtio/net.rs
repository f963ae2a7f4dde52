//! virtio-net on a tap device: one RX and one TX queue, a MAC address, link status and a
//! token-bucket rate limiter per direction. Frames go between guest buffers and the tap with
//! one readv/writev each (the tap speaks the same 12-byte virtio-net header).

use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{GuestMemoryMmap, Permissions};

use super::chain::{self, Chain, Outcome};
use super::rate_limiter::{RateLimit, RateLimiter};
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
            mem: a.mem,
            rx,
            tx,
            interrupt: a.interrupt,
            tap: self.tap.clone(),
            rx_limiter: RateLimiter::new(self.rx_limit),
            tx_limiter: RateLimiter::new(self.tx_limit),
            rx_waiting_for_buffers: false,
            rx_throttled: None,
            tx_throttled: None,
        }))
    }
}

struct NetHandler {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    tap: Arc<Tap>,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// The tap may hold frames but the guest gave no buffers: resume on an RX kick.
    rx_waiting_for_buffers: bool,
    rx_throttled: Option<Instant>,
    tx_throttled: Option<Instant>,
}

impl NetHandler {
    fn process_rx(&mut self) -> Result<(), DeviceError> {
        let mem = &self.mem;
        let tap = &self.tap;
        let limiter = &mut self.rx_limiter;
        let mut drained = false;
        let mut throttle = None;
        let mut tap_err = None;
        let notify = chain::process_queue(
            &mut self.rx,
            mem,
            0,
            |c: DescriptorChain<&GuestMemoryMmap>| {
                let chain = Chain::parse(mem, c);
                let len = chain.writable_len();
                if chain.error.is_some() || len < VNET_HDR_LEN {
                    // Unusable buffer: hand it back empty rather than hold it forever.
                    return Outcome::Done(0);
                }
                if let Err(d) = limiter.admit(MAX_FRAME) {
                    throttle = Some(Instant::now() + d);
                    return Outcome::Retry;
                }
                let iov = match chain::iovecs(mem, &chain.writable, 0, len, Permissions::Write) {
                    Ok(v) => v,
                    Err(_) => return Outcome::Done(0),
                };
                match tap.readv(&iov) {
                    Ok(Some(n)) => {
                        limiter.refund_bytes(MAX_FRAME.saturating_sub(n as u64));
                        // The tap leaves num_buffers alone; without MRG_RXBUF it is always 1.
                        chain::write_to(mem, &chain.writable, 10, &1u16.to_le_bytes());
                        Outcome::Done(n as u32)
                    }
                    Ok(None) => {
                        drained = true;
                        limiter.refund_bytes(MAX_FRAME);
                        Outcome::Retry
                    }
                    Err(e) => {
                        tap_err = Some(e);
                        Outcome::Retry
                    }
                }
            },
        )?;
        if notify {
            self.interrupt.signal_used_queue(0);
        }
        self.rx_throttled = throttle;
        self.rx_waiting_for_buffers = !drained && throttle.is_none();
        match tap_err {
            Some(e) => Err(DeviceError::Backend(e)),
            None => Ok(()),
        }
    }

    fn process_tx(&mut self) -> Result<(), DeviceError> {
        let mem = &self.mem;
        let tap = &self.tap;
        let limiter = &mut self.tx_limiter;
        let mut throttle = None;
        let notify = chain::process_queue(
            &mut self.tx,
            mem,
            1,
            |c: DescriptorChain<&GuestMemoryMmap>| {
                let chain = Chain::parse(mem, c);
                let len = chain.readable_len();
                if chain.error.is_some() || len < VNET_HDR_LEN {
                    tracing::debug!("virtio-net: dropped malformed TX chain");
                    return Outcome::Done(0);
                }
                if !limiter.is_unlimited() {
                    if let Err(d) = limiter.admit((len - VNET_HDR_LEN) as u64) {
                        throttle = Some(Instant::now() + d);
                        return Outcome::Retry;
                    }
                }
                let Ok(iov) = chain::iovecs(mem, &chain.readable, 0, len, Permissions::Read) else {
                    return Outcome::Done(0);
                };
                match tap.writev(&iov) {
                    Ok(_) => {}
                    // A full tap queue or a frame the tap refuses (too big): dropped, as a NIC would.
                    Err(e) => tracing::debug!("virtio-net: TX frame dropped: {e}"),
                }
                Outcome::Done(0)
            },
        )?;
        self.tx_throttled = throttle;
        if notify {
            self.interrupt.signal_used_queue(1);
        }
        Ok(())
    }
}

impl QueueHandler for NetHandler {
    fn queue_states(&self) -> Vec<QueueSnap> {
        vec![QueueSnap::of(&self.rx), QueueSnap::of(&self.tx)]
    }

    fn fds(&self) -> Vec<(std::os::fd::RawFd, u64)> {
        use std::os::fd::AsRawFd;
        vec![(self.tap.as_raw_fd(), TAP_TOKEN)]
    }

    fn queue_notified(&mut self, queue: usize, _p: &Poller) -> Result<(), DeviceError> {
        match queue {
            0 if self.rx_waiting_for_buffers => self.process_rx(),
            1 if self.tx_throttled.is_none() => self.process_tx(),
            _ => Ok(()),
        }
    }

    fn fd_ready(&mut self, _token: u64, _events: u32, _p: &Poller) -> Result<(), DeviceError> {
        if self.rx_throttled.is_some() {
            return Ok(());
        }
        self.process_rx()
    }

    fn next_timer(&self) -> Option<Duration> {
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
