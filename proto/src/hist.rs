//! A latency histogram for `/metrics`: fixed buckets from 10 µs to 10 s,
//! relaxed atomic counters (any thread records, the admin thread reads),
//! rendered as a Prometheus histogram in seconds. Where the time of a
//! publication goes between the API and the last socket write is told by
//! one of these per hop.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the buckets, microseconds (then +Inf).
pub const BOUNDS_US: [u64; 19] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// One histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 20],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation of `us` microseconds.
    pub fn record_us(&self, us: u64) {
        let b = BOUNDS_US.iter().position(|le| us <= *le).unwrap_or(BOUNDS_US.len());
        self.buckets[b].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Records a duration.
    pub fn record(&self, d: std::time::Duration) {
        self.record_us(d.as_micros().min(u64::MAX as u128) as u64);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The upper bound (µs) of the bucket holding quantile `q` (0–1); `None`
    /// when empty, `u64::MAX` for the +Inf bucket.
    pub fn quantile_bound_us(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let want = ((n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= want {
                return Some(BOUNDS_US.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        Some(u64::MAX)
    }

    /// Appends the Prometheus text of this histogram as `name` with one
    /// label (`key="value"`); the `# TYPE` line is the caller's, once per name.
    pub fn render(&self, out: &mut String, name: &str, key: &str, value: &str) {
        let mut cumulative = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = BOUNDS_US.get(i).map_or("+Inf".to_string(), |us| (*us as f64 / 1e6).to_string());
            let _ = writeln!(out, "{name}_bucket{{{key}=\"{value}\",le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{key}=\"{value}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{{key}=\"{value}\"}} {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_buckets_and_render_cumulatively() {
        let h = Histogram::default();
        assert_eq!(h.quantile_bound_us(0.5), None);
        for us in [5, 10, 11, 900, 20_000_000] {
            h.record_us(us);
        }
        assert_eq!(h.count(), 5);
        assert_eq!(h.quantile_bound_us(0.4), Some(10));
        assert_eq!(h.quantile_bound_us(0.6), Some(25));
        assert_eq!(h.quantile_bound_us(0.8), Some(1_000));
        assert_eq!(h.quantile_bound_us(1.0), Some(u64::MAX));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "hop", "a");
        assert!(out.contains("x_seconds_bucket{hop=\"a\",le=\"0.00001\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{hop=\"a\",le=\"0.001\"} 4\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{hop=\"a\",le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("x_seconds_count{hop=\"a\"} 5\n"), "{out}");
    }
}
