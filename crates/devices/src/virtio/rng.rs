//! virtio-rng (entropy source) filled from the host's getrandom(2).

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::GuestMemoryMmap;

use super::chain::{self, Chain, Outcome};
use super::rate_limiter::{RateLimit, RateLimiter};
use super::state::{DeviceSnap, QueueSnap, StateError};
use super::worker::Poller;
use super::{
    device_type, ActivateError, Activation, DeviceError, Interrupt, QueueHandler, VirtioDevice,
};

const QUEUE_SIZE: u16 = 64;
/// Largest amount handed out per request; a guest asking for more gets this much.
const MAX_CHUNK: usize = 64 * 1024;

#[derive(Default)]
pub struct Rng {
    rate_limit: RateLimit,
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_rate_limit(rate_limit: RateLimit) -> Self {
        Self { rate_limit }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        0
    }
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    fn activate(&mut self, a: Activation) -> Result<Box<dyn QueueHandler>, ActivateError> {
        let queue = a
            .queues
            .into_iter()
            .next()
            .ok_or(ActivateError::QueueCount { got: 0, want: 1 })?;
        Ok(Box::new(RngHandler {
            mem: a.mem,
            queue,
            interrupt: a.interrupt,
            limiter: RateLimiter::new(self.rate_limit),
            throttled_until: None,
        }))
    }
    fn save_device(&self) -> DeviceSnap {
        DeviceSnap::Rng
    }
    fn restore_device(&mut self, saved: &DeviceSnap) -> Result<(), StateError> {
        match saved {
            DeviceSnap::Rng => Ok(()),
            other => Err(StateError::Mismatch(format!(
                "saved {} state for an rng device",
                other.name()
            ))),
        }
    }
}

struct RngHandler {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    limiter: RateLimiter,
    throttled_until: Option<std::time::Instant>,
}

impl RngHandler {
    fn process(&mut self) -> Result<(), DeviceError> {
        let mem = &self.mem;
        let limiter = &mut self.limiter;
        let mut throttle = None;
        let mut buf = vec![0u8; MAX_CHUNK];
        let notify = chain::process_queue(
            &mut self.queue,
            mem,
            0,
            |c: DescriptorChain<&GuestMemoryMmap>| {
                let chain = Chain::parse(mem, c);
                if chain.error.is_some() {
                    return Outcome::Done(0);
                }
                let want = chain.writable_len().min(MAX_CHUNK);
                if let Err(d) = limiter.admit(want as u64) {
                    throttle = Some(std::time::Instant::now() + d);
                    return Outcome::Retry;
                }
                let got = fill_random(&mut buf[..want]);
                Outcome::Done(chain::write_to(mem, &chain.writable, 0, &buf[..got]) as u32)
            },
        )?;
        self.throttled_until = throttle;
        if notify {
            self.interrupt.signal_used();
        }
        Ok(())
    }
}

/// Fills `buf` from getrandom(2); returns how many bytes are random (all, barring an error).
fn fill_random(buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most `len` bytes into the buffer we pass.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        done += n as usize;
    }
    done
}

impl QueueHandler for RngHandler {
    fn queue_states(&self) -> Vec<QueueSnap> {
        vec![QueueSnap::of(&self.queue)]
    }
    fn queue_notified(&mut self, _q: usize, _p: &Poller) -> Result<(), DeviceError> {
        if self.throttled_until.is_some() {
            return Ok(());
        }
        self.process()
    }
    fn next_timer(&self) -> Option<std::time::Duration> {
        self.throttled_until
            .map(|t| t.saturating_duration_since(std::time::Instant::now()))
    }
    fn timer(&mut self, _p: &Poller) -> Result<(), DeviceError> {
        self.throttled_until = None;
        self.process()
    }
}
