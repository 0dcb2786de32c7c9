//! Zipf-distributed choices: channel `k` (0-based) is picked with probability
//! proportional to `1 / (k + 1)^s`, so a few channels are huge and most are small,
//! as in a real workspace.

use rand::Rng;

/// A sampler over `n` ranks.
#[derive(Debug, Clone)]
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    /// `n` ranks with exponent `s` (`s = 0` is uniform).
    pub fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let cumulative = (0..n.max(1))
            .map(|k| {
                acc += 1.0 / ((k + 1) as f64).powf(s);
                acc
            })
            .collect();
        Zipf { cumulative }
    }

    /// A rank in `0..n`.
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let total = *self.cumulative.last().expect("at least one rank");
        let x = rng.random_range(0.0..total);
        self.cumulative.partition_point(|c| *c <= x).min(self.cumulative.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn head_is_heavier_than_tail() {
        let z = Zipf::new(100, 1.0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut counts = [0usize; 100];
        for _ in 0..100_000 {
            counts[z.sample(&mut rng)] += 1;
        }
        assert!(counts[0] > 4 * counts[9], "{:?}", &counts[..10]);
        assert!(counts[0] > 50 * counts[99].max(1) / 2);
        let u = Zipf::new(4, 0.0);
        let mut c = [0usize; 4];
        for _ in 0..40_000 {
            c[u.sample(&mut rng)] += 1;
        }
        for n in c {
            assert!((9_000..11_000).contains(&n), "{c:?}");
        }
    }
}
