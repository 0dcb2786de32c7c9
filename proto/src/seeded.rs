//! Hash maps whose iteration order is a function of a seed.
//!
//! The state machines iterate maps (a channel's subscribers, a gateway's
//! routes) and act in that order; with the standard library's per-process
//! random hasher, two runs of the same simulation seed would act in
//! different orders and never replay. Each machine takes its hasher seed
//! from its owner: random in production (flooding a table with colliding
//! channel names stays as hard as guessing a 64-bit seed), the simulation's
//! seed in the simulation.

use std::collections::{HashMap, HashSet};

/// The hasher state (foldhash, seeded).
pub type State = foldhash::fast::FixedState;

/// A map hashed with a seeded [`State`].
pub type Map<K, V> = HashMap<K, V, State>;

/// A set hashed with a seeded [`State`].
pub type Set<K> = HashSet<K, State>;

/// The hasher state for `seed`.
pub fn state(seed: u64) -> State {
    foldhash::fast::FixedState::with_seed(seed)
}

/// An empty map hashed with `seed`.
pub fn map<K, V>(seed: u64) -> Map<K, V> {
    HashMap::with_hasher(state(seed))
}

/// An empty set hashed with `seed`.
pub fn set<K>(seed: u64) -> Set<K> {
    HashSet::with_hasher(state(seed))
}

/// A seed for production use (fresh per call).
pub fn random_seed() -> u64 {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_order() {
        let fill = |seed| {
            let mut m = map::<String, u32>(seed);
            for i in 0..200 {
                m.insert(format!("chat:{i}"), i);
            }
            m.into_values().collect::<Vec<_>>()
        };
        assert_eq!(fill(7), fill(7));
        assert_ne!(fill(7), fill(8), "another seed, another order");
    }
}
