//! Exponential backoff with full jitter.
//!
//! Attempt `n` waits a uniformly random time in `[0, min(max, base · 2ⁿ)]`
//! ("full jitter"): after a deploy or a crash, thousands of clients or
//! gateways that lost their peer at the same instant spread their retries
//! over the whole window instead of arriving in synchronized waves.
//!
//! [`RetrySchedule`] is the server's side of the same problem: the
//! `Retry-After` of each refused client names a later slot of its own, so
//! the refused come back at the rate the server admits, not all at once.

use std::time::{Duration, Instant};

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

/// Hands each refused client a slot of its own in the future: slots are
/// `1 / rate` apart, the first `min_secs` from now, so a storm's refusals
/// come back spread at the rate the server admits. Beyond `max_secs` (the
/// schedule is full that far) a refusal gets a uniformly jittered
/// `Retry-After` in `[min_secs, max_secs]` and takes no slot.
///
/// `Retry-After` is whole seconds: a slot `s` seconds away is told
/// `floor(s)` or `ceil(s)` at random, weighted so that the mean is `s`; the
/// client adds up to a second of jitter of its own.
#[derive(Debug, Clone)]
pub struct RetrySchedule {
    spacing: Duration,
    min_secs: u32,
    max_secs: u32,
    /// The next free slot (`None`: none handed out yet).
    next: Option<Instant>,
}

impl RetrySchedule {
    /// Slots `1 / rate` seconds apart (a rate that is not positive: all at
    /// `min_secs`), told as `Retry-After` in
    /// `[min_secs, max_secs]`.
    pub fn new(rate: f64, min_secs: u32, max_secs: u32) -> Self {
        let max_secs = max_secs.max(min_secs);
        RetrySchedule { spacing: Self::spacing(rate, max_secs), min_secs, max_secs, next: None }
    }

    /// Changes the slots' rate (as [`new`](Self::new)); slots already
    /// handed out stay where they are.
    pub fn set_rate(&mut self, rate: f64) {
        self.spacing = Self::spacing(rate, self.max_secs);
    }

    fn spacing(rate: f64, max_secs: u32) -> Duration {
        // A slot further apart than the window is as good as one per window.
        if rate > 0.0 {
            Duration::from_secs_f64((1.0 / rate).min(f64::from(max_secs) + 1.0))
        } else {
            Duration::ZERO
        }
    }

    /// The `Retry-After` (seconds) for a client refused at `now`.
    pub fn retry_after(&mut self, now: Instant, rng: &mut impl Rng) -> u32 {
        let earliest = now + Duration::from_secs(self.min_secs.into());
        let slot = self.next.map_or(earliest, |n| n.max(earliest));
        let wait = slot - now;
        if wait > Duration::from_secs(self.max_secs.into()) {
            return jittered_secs(self.min_secs, self.max_secs, rng);
        }
        self.next = Some(slot + self.spacing);
        let secs = wait.as_secs_f64();
        let whole = secs.floor();
        let up = rng.random_bool((secs - whole).clamp(0.0, 1.0));
        (whole as u32 + u32::from(up)).clamp(self.min_secs, self.max_secs)
    }
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

    #[test]
    fn refusals_fill_slots_at_the_rate_then_spread_over_the_window() {
        // 100/s, Retry-After 1..=5 s: 400 refusals at one instant fill the
        // slots from 1 s to 5 s, 100 per second; the rest are spread.
        let mut s = RetrySchedule::new(100.0, 1, 5);
        let mut rng = StdRng::seed_from_u64(7);
        let now = Instant::now();
        let mut per_sec = [0u32; 6];
        for _ in 0..400 {
            per_sec[s.retry_after(now, &mut rng) as usize] += 1;
        }
        assert_eq!(per_sec[0], 0);
        let total: f64 = (1..=5).map(|k| k as f64 * f64::from(per_sec[k])).sum();
        // The mean of the slots 1.0, 1.01, … 4.99 s is 2.995 s.
        assert!((total / 400.0 - 2.995).abs() < 0.1, "mean {}", total / 400.0);
        // Rounding at random: about half of the slots in [1, 2) s are
        // told 1 and half 2, and so on; 100 per second in the middle.
        assert!((30..=70).contains(&per_sec[1]), "{per_sec:?}");
        for k in 2..=4 {
            assert!((60..=140).contains(&per_sec[k]), "second {k}: {per_sec:?}");
        }
        // Full to the horizon: uniform over the window, no slot taken.
        let mut seen = [false; 6];
        for _ in 0..200 {
            let v = s.retry_after(now, &mut rng);
            assert!((1..=5).contains(&v));
            seen[v as usize] = true;
        }
        assert!(seen[1..].iter().all(|s| *s));
    }

    #[test]
    fn slots_free_up_as_time_passes_and_a_bad_rate_does_not_panic() {
        let mut s = RetrySchedule::new(10.0, 1, 5);
        let mut rng = StdRng::seed_from_u64(3);
        let t0 = Instant::now();
        for _ in 0..40 {
            s.retry_after(t0, &mut rng);
        }
        // 4 s later the schedule's next slot (t0 + 5 s) is 1 s away.
        assert_eq!(s.retry_after(t0 + Duration::from_secs(4), &mut rng), 1);
        // Slower slots from now on: 1 per second.
        s.set_rate(1.0);
        let later = t0 + Duration::from_secs(30);
        let told: Vec<u32> = (0..4).map(|_| s.retry_after(later, &mut rng)).collect();
        assert_eq!(told, vec![1, 2, 3, 4]);
        // Long after, a refusal is back at the minimum.
        assert_eq!(s.retry_after(t0 + Duration::from_secs(60), &mut rng), 1);
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-300] {
            let mut s = RetrySchedule::new(rate, 2, 1);
            for _ in 0..3 {
                assert_eq!(s.retry_after(t0, &mut rng), 2);
            }
        }
    }
}
