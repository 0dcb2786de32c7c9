//! A token bucket: `rate` tokens per second, at most `burst` saved up.
//!
//! Time is an argument (an [`Instant`] the caller read once per event-loop
//! turn), so the bucket never touches the clock and tests drive it directly.

use std::time::{Duration, Instant};

/// A token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket { rate_per_sec: rate_per_sec.max(0.0), burst, tokens: burst, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate_per_sec).min(self.burst);
    }

    /// Whether the bucket has refilled completely (an idle user's bucket can
    /// be dropped and recreated full without changing anything).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    /// Takes `n` tokens if they are there.
    pub fn try_take(&mut self, n: u32, now: Instant) -> bool {
        self.refill(now);
        let n = f64::from(n);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// How long until `n` tokens are there (zero if they are now).
    pub fn wait_time(&mut self, n: u32, now: Instant) -> Duration {
        self.refill(now);
        let missing = f64::from(n) - self.tokens;
        if missing <= 0.0 || self.rate_per_sec == 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / self.rate_per_sec)
        }
    }

    /// Tokens available now (for metrics).
    pub fn available(&mut self, now: Instant) -> u32 {
        self.refill(now);
        self.tokens as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5, t0);
        for _ in 0..5 {
            assert!(b.try_take(1, t0));
        }
        assert!(!b.try_take(1, t0));
        assert_eq!(b.wait_time(1, t0), Duration::from_millis(100));
        assert!(b.try_take(1, t0 + Duration::from_millis(100)));
        assert!(!b.try_take(1, t0 + Duration::from_millis(150)));
        // Saved-up tokens never exceed the burst.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(b.available(later), 5);
        // Time going backwards (two readers) is harmless.
        assert!(b.try_take(1, t0));
    }
}
