//! Rendezvous (highest-random-weight) hashing: which router owns a key.
//!
//! Every node scores `hash(node, key)` and the highest score owns the key.
//! When a node leaves, only its keys move, each to its own runner-up, so a
//! router drain spreads its channels over all survivors. The hash is fixed
//! (FNV-1a then a 64-bit finalizer), so every process of every build agrees.

/// A stable 64-bit hash of `bytes` (FNV-1a, then the murmur3 finalizer for avalanche).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    fmix64(h)
}

fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// The score of `node` for `key`.
pub fn score(node: &str, key: &str) -> u64 {
    fmix64(stable_hash(node.as_bytes()) ^ stable_hash(key.as_bytes()).rotate_left(17))
}

/// The index of the node that owns `key`, or `None` when there are no nodes.
/// Ties (practically impossible) go to the smaller node id.
pub fn owner<'a, S: AsRef<str> + 'a>(key: &str, nodes: impl IntoIterator<Item = &'a S>) -> Option<usize> {
    nodes
        .into_iter()
        .enumerate()
        .map(|(i, n)| (score(n.as_ref(), key), std::cmp::Reverse(n.as_ref().to_owned()), i))
        .max()
        .map(|(_, _, i)| i)
}

/// Nodes in preference order for `key` (owner first).
pub fn ranked<S: AsRef<str>>(key: &str, nodes: &[S]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..nodes.len()).collect();
    idx.sort_by(|a, b| {
        score(nodes[*b].as_ref(), key)
            .cmp(&score(nodes[*a].as_ref(), key))
            .then_with(|| nodes[*a].as_ref().cmp(nodes[*b].as_ref()))
    });
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_across_builds() {
        // Pinned values: changing the hash would split a mixed-version cluster.
        assert_eq!(stable_hash(b""), fmix64(0xcbf2_9ce4_8422_2325));
        assert_eq!(owner("chat:general", &["r1", "r2", "r3"]), owner("chat:general", &["r1", "r2", "r3"]));
        assert_eq!(owner::<&str>("x", &[]), None);
    }

    #[test]
    fn balanced_and_minimal_movement() {
        let nodes = ["router-a", "router-b", "router-c"];
        let mut counts = [0usize; 3];
        let mut moved = 0;
        let survivors = ["router-a", "router-c"];
        for i in 0..30000 {
            let key = format!("chat:{i}");
            let o = owner(&key, &nodes).unwrap();
            counts[o] += 1;
            let after = survivors[owner(&key, &survivors).unwrap()];
            if nodes[o] != "router-b" {
                assert_eq!(after, nodes[o], "a key not owned by the leaver moved");
            } else {
                moved += 1;
            }
            assert_eq!(ranked(&key, &nodes)[0], o);
        }
        for c in counts {
            assert!((9000..11000).contains(&c), "{counts:?}");
        }
        assert_eq!(moved, counts[1]);
    }
}
