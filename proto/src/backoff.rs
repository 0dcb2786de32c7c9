//! Exponential backoff with full jitter.
//!
//! Attempt `n` waits a uniformly random time in `[0, min(max, base · 2ⁿ)]`
//! ("full jitter"): after a deploy or a crash, thousands of clients or
//! gateways that lost their peer at the same instant spread their retries
//! over the whole window instead of arriving in synchronized waves.

use std::time::Duration;

use rand::Rng;

/// Backoff state for one peer.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff whose ceiling starts at `base` and doubles up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max: max.max(base), attempt: 0 }
    }

    /// The ceiling of the current attempt, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next try; advances the attempt count.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(rng.random_range(0..=nanos))
    }

    /// Attempts made since the last [`reset`](Self::reset).
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Back to the first attempt (call after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A jittered `Retry-After` in whole seconds within `[min, max]`.
pub fn jittered_secs(min: u32, max: u32, rng: &mut impl Rng) -> u32 {
    rng.random_range(min..=max.max(min))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn ceiling_doubles_then_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut rng = StdRng::seed_from_u64(1);
        let mut ceilings = Vec::new();
        for _ in 0..8 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay(&mut rng);
            assert!(d <= Duration::from_secs(2));
        }
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        // Huge attempt counts do not overflow.
        for _ in 0..100 {
            b.next_delay(&mut rng);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(2));
    }

    #[test]
    fn full_jitter_spreads_over_the_window() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut buckets = [0u32; 4];
        for _ in 0..4000 {
            let mut b = Backoff::new(Duration::from_millis(1000), Duration::from_secs(10));
            let d = b.next_delay(&mut rng).as_millis() as usize;
            buckets[(d / 250).min(3)] += 1;
        }
        // Roughly uniform: each quarter of the window gets 20–30% of draws.
        for n in buckets {
            assert!((800..1200).contains(&n), "{buckets:?}");
        }
    }

    #[test]
    fn jittered_seconds_in_range() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..100 {
            let s = jittered_secs(2, 9, &mut rng);
            assert!((2..=9).contains(&s));
        }
    }
}
