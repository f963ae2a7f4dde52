//! Token buckets for bytes/s and ops/s with a burst allowance, as blk and net use them.
//!
//! Written here rather than taken from a crate: Firecracker's `rate_limiter` is not published
//! separately, and the policy is a few lines. Time comes in as a parameter so tests are exact.

use std::time::{Duration, Instant};

/// A bucket of `capacity` tokens refilled at `rate` tokens per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    capacity: u64,
    /// Tokens in millionths, so slow rates refill smoothly.
    micro_tokens: u128,
    last: Instant,
}

impl TokenBucket {
    /// `rate` tokens per second, holding at most `burst` (at least `rate`, so one second's worth
    /// can always be spent at once). Starts full.
    pub fn new(rate: u64, burst: u64) -> Self {
        let capacity = burst.max(rate).max(1);
        Self {
            rate: rate.max(1),
            capacity,
            micro_tokens: u128::from(capacity) * 1_000_000,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        let add = elapsed.as_micros() * u128::from(self.rate);
        let cap = u128::from(self.capacity) * 1_000_000;
        self.micro_tokens = (self.micro_tokens + add).min(cap);
    }

    /// Takes `n` tokens if there are enough. A request larger than the whole bucket passes
    /// when the bucket is full (and empties it), so it is slowed, never stuck forever.
    pub fn try_take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        let want = u128::from(n.min(self.capacity)) * 1_000_000;
        if self.micro_tokens >= want {
            self.micro_tokens -= want;
            true
        } else {
            false
        }
    }

    /// Puts back tokens taken for a request that then did not go ahead.
    pub fn give_back(&mut self, n: u64) {
        let cap = u128::from(self.capacity) * 1_000_000;
        self.micro_tokens = (self.micro_tokens + u128::from(n) * 1_000_000).min(cap);
    }

    /// How long until `n` tokens are there.
    pub fn wait_for(&self, n: u64) -> Duration {
        let want = u128::from(n.min(self.capacity)) * 1_000_000;
        let missing = want.saturating_sub(self.micro_tokens);
        let micros = missing.div_ceil(u128::from(self.rate));
        Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX))
    }
}

/// Limits for one direction of a device: bytes and operations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Bytes per second (0 = unlimited) and the burst in bytes.
    pub bytes_per_sec: u64,
    pub bytes_burst: u64,
    /// Operations per second (0 = unlimited) and the burst in operations.
    pub ops_per_sec: u64,
    pub ops_burst: u64,
}

impl RateLimit {
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec == 0 && self.ops_per_sec == 0
    }

    /// Parses `bytes=N[,bytes_burst=N][,ops=N][,ops_burst=N]` (as `--disk FILE,bytes=...`).
    pub fn parse_option(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let field = match key {
            "bytes" | "bw" => &mut self.bytes_per_sec,
            "bytes_burst" | "bw_burst" => &mut self.bytes_burst,
            "ops" | "iops" => &mut self.ops_per_sec,
            "ops_burst" | "iops_burst" => &mut self.ops_burst,
            _ => return Ok(false),
        };
        *field = parse_size(value).ok_or_else(|| format!("{key}={value}: not a number"))?;
        Ok(true)
    }
}

/// Parses `123`, `4K`, `10M`, `1G` (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mul) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

/// Both buckets of one direction.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            bytes: (limit.bytes_per_sec > 0)
                .then(|| TokenBucket::new(limit.bytes_per_sec, limit.bytes_burst)),
            ops: (limit.ops_per_sec > 0)
                .then(|| TokenBucket::new(limit.ops_per_sec, limit.ops_burst)),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.bytes.is_none() && self.ops.is_none()
    }

    /// Admits one operation of `bytes` bytes, or returns how long to wait before retrying.
    pub fn admit(&mut self, bytes: u64) -> Result<(), Duration> {
        let now = Instant::now();
        if let Some(ops) = &mut self.ops {
            if !ops.try_take(1, now) {
                return Err(ops.wait_for(1));
            }
        }
        if let Some(b) = &mut self.bytes {
            if !b.try_take(bytes, now) {
                let wait = b.wait_for(bytes);
                if let Some(ops) = &mut self.ops {
                    ops.give_back(1);
                }
                return Err(wait);
            }
        }
        Ok(())
    }
}

impl RateLimiter {
    /// Returns bytes admitted for an operation that turned out smaller (net RX admits a full
    /// frame before it knows the frame's size).
    pub fn refund_bytes(&mut self, bytes: u64) {
        if let Some(b) = &mut self.bytes {
            b.give_back(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 2000);
        b.last = t0;
        assert!(b.try_take(2000, t0));
        assert!(!b.try_take(1, t0));
        // Half a second refills 500 tokens, not more.
        let t1 = t0 + Duration::from_millis(500);
        assert!(b.try_take(500, t1));
        assert!(!b.try_take(1, t1));
        assert_eq!(b.wait_for(100), Duration::from_millis(100));
    }

    #[test]
    fn oversized_request_passes_only_when_full() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 100);
        b.last = t0;
        assert!(b.try_take(10, t0));
        assert!(!b.try_take(1000, t0));
        assert!(b.try_take(1000, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn limiter_gives_back_op_token_when_bytes_refuse() {
        let mut l = RateLimiter::new(RateLimit {
            bytes_per_sec: 1000,
            bytes_burst: 1000,
            ops_per_sec: 1,
            ops_burst: 1,
        });
        assert!(l.admit(1000).is_ok());
        // No bytes left: refused, and the op token taken for it is returned...
        assert!(l.admit(10).is_err());
        // ...but the op bucket itself is empty after the first request.
        assert!(l.ops.as_ref().is_some_and(|o| o.micro_tokens < 1_000_000));
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("10M"), Some(10 << 20));
        assert_eq!(parse_size("7"), Some(7));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
    }
}
