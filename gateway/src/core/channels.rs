//! A core's channel index: `channel → its subscribers on this core`, and
//! where the channel's stream stands here.
//!
//! The position is the channel's one position on this core: the last
//! publication of the channel that reached this core's inbox. Every
//! publication after it will reach the inbox too, in order, or the uplink
//! says it did not (a resync): the core's interest was registered before,
//! and the uplink hands each channel's deliveries to the cores in the order
//! the owning router sent them. So a subscribe can be answered from it
//! without asking a router, and a subscriber that [`Follows`] it needs no
//! position of its own.
//!
//! [`Follows`]: crate::session::subs::SubState::Follows

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;
use proto::position::StreamPosition;
use proto::seeded::{self, Set, State};

use crate::effects::Sid;

/// One channel with subscribers on this core.
#[derive(Debug)]
pub struct Channel {
    /// The channel's name, shared by every local subscription to it (one
    /// allocation per channel; a subscription finds itself by pointer).
    pub name: Arc<str>,
    /// Subscribers at the channel's position: every delivery that
    /// continues it is queued to them without looking at them further.
    pub followers: Followers,
    /// Subscribers with their own position (or waiting for the router);
    /// boxed, and only while there are any: most channels have none.
    catching: Option<Box<Set<Sid>>>,
    /// Where the stream stands on this core (`None`: not known yet, or lost
    /// by a resync; unpositioned channels never have one).
    pub position: Option<StreamPosition>,
}

/// A channel's followers, walked in the order of their sessions' slots:
/// a delivery to thousands of them then reads the session table (and the
/// kernel's sockets, made in the same order) front to back instead of at
/// random. Measured beside a hash set's order (`BENCHMARKS.md`, "Where a
/// publication's time goes"), 4 interleaved runs each of 10 publications/s
/// to 10,000 subscribers on one core: the serve tree's CPU 5.09 -> 4.02 s
/// (user 0.82 -> 0.38 s), publish->deliver p99 94 -> 75 ms.
///
/// A B-tree, so a join or leave costs O(log n) whatever the order slots
/// come and go in (a sorted array, measured the same, moved its tail on
/// every edit: quadratic when a big channel's followers leave in slot
/// order, or rejoin through the slots' free list, which hands them out in
/// reverse).
#[derive(Debug, Default)]
pub struct Followers(BTreeSet<u64>);

impl Followers {
    /// The slot index first, then the generation.
    fn key(sid: Sid) -> u64 {
        sid.0.rotate_left(32)
    }

    /// Adds `sid`; whether it was not there.
    pub fn insert(&mut self, sid: Sid) -> bool {
        self.0.insert(Followers::key(sid))
    }

    /// Removes `sid`; whether it was there.
    pub fn remove(&mut self, sid: Sid) -> bool {
        self.0.remove(&Followers::key(sid))
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every follower, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = Sid> + '_ {
        self.0.iter().map(|k| Sid(k.rotate_right(32)))
    }
}

impl Channel {
    /// Subscribers of both kinds.
    pub fn len(&self) -> usize {
        self.followers.len() + self.catching.as_ref().map_or(0, |c| c.len())
    }

    /// The subscribers with their own position.
    pub fn catching(&self) -> impl Iterator<Item = &Sid> + '_ {
        self.catching.iter().flat_map(|c| c.iter())
    }

    /// Removes `sid` from those catching up; whether it was there.
    fn stop_catching(&mut self, sid: Sid) -> bool {
        let Some(c) = self.catching.as_mut() else { return false };
        let was = c.remove(&sid);
        if c.is_empty() {
            self.catching = None;
        }
        was
    }

    /// Whether nobody is subscribed.
    pub fn is_empty(&self) -> bool {
        // The catching set is dropped when it empties (`stop_catching`).
        self.followers.is_empty() && self.catching.is_none()
    }

    /// Every subscriber.
    pub fn members(&self) -> impl Iterator<Item = Sid> + '_ {
        self.followers.iter().chain(self.catching().copied())
    }
}

/// The index: its channels, found by name (the channel holds its name,
/// so the table holds nothing else).
#[derive(Debug)]
pub struct ChannelIndex {
    map: HashTable<Channel>,
    state: State,
    seed: u64,
}

impl ChannelIndex {
    /// An empty index hashed with `seed`.
    pub fn new(seed: u64) -> ChannelIndex {
        ChannelIndex { map: HashTable::new(), state: seeded::state(seed), seed }
    }

    /// Channels with subscribers.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no channel has subscribers.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The shared name of `channel` if it has local subscribers, else a new one.
    pub fn name(&self, channel: &str) -> Arc<str> {
        self.get(channel).map_or_else(|| Arc::from(channel), |c| c.name.clone())
    }

    /// The channel, if it has local subscribers.
    pub fn get(&self, channel: &str) -> Option<&Channel> {
        self.map.find(self.state.hash_one(channel), |c| *c.name == *channel)
    }

    /// The channel, mutably.
    pub fn get_mut(&mut self, channel: &str) -> Option<&mut Channel> {
        self.map.find_mut(self.state.hash_one(channel), |c| *c.name == *channel)
    }

    /// Where `channel`'s stream stands here, if known.
    pub fn position(&self, channel: &str) -> Option<&StreamPosition> {
        self.get(channel)?.position.as_ref()
    }

    /// Adds a subscriber (a follower or one catching up); whether it is the
    /// channel's first on this core (the uplink must hear of it).
    pub fn add(&mut self, name: &Arc<str>, sid: Sid, follows: bool) -> bool {
        let (seed, state) = (self.seed, &self.state);
        let hash = state.hash_one(&**name);
        let ch = self
            .map
            .entry(hash, |c| c.name == *name, |c| state.hash_one(&*c.name))
            .or_insert_with(|| Channel {
                name: name.clone(),
                followers: Followers::default(),
                catching: None,
                position: None,
            })
            .into_mut();
        let first = ch.is_empty();
        if follows {
            ch.followers.insert(sid);
        } else {
            ch.catching.get_or_insert_with(|| Box::new(seeded::set(seed ^ 1))).insert(sid);
        }
        first
    }

    /// Moves a subscriber that caught up to the followers.
    pub fn follow(&mut self, channel: &str, sid: Sid) {
        if let Some(ch) = self.get_mut(channel)
            && ch.stop_catching(sid)
        {
            ch.followers.insert(sid);
        }
    }

    /// Removes a subscriber; whether it was the channel's last on this core
    /// (the channel is gone from the index, and the uplink must hear of it).
    pub fn remove(&mut self, channel: &str, sid: Sid) -> bool {
        let hash = self.state.hash_one(channel);
        let Ok(mut entry) = self.map.find_entry(hash, |c| *c.name == *channel) else { return false };
        let ch = entry.get_mut();
        let was = ch.followers.remove(sid) || ch.stop_catching(sid);
        if was && ch.is_empty() {
            entry.remove();
            return true;
        }
        false
    }

    /// Every channel's name (a snapshot).
    pub fn names(&self) -> Vec<Arc<str>> {
        self.map.iter().map(|c| c.name.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_and_last_members_are_reported_once() {
        let mut idx = ChannelIndex::new(1);
        let name: Arc<str> = Arc::from("chat:1");
        assert!(idx.add(&name, Sid(1), true));
        assert!(!idx.add(&name, Sid(2), false));
        assert!(Arc::ptr_eq(&idx.name("chat:1"), &name), "one shared name per channel");
        idx.follow("chat:1", Sid(2));
        assert_eq!(idx.get("chat:1").unwrap().followers.len(), 2);
        assert!(!idx.remove("chat:1", Sid(1)));
        assert!(!idx.remove("chat:1", Sid(9)), "not a member: nothing changes");
        assert!(idx.remove("chat:1", Sid(2)));
        assert!(idx.is_empty());
    }

    #[test]
    fn followers_are_walked_in_slot_order_whatever_their_generation() {
        let mut f = Followers::default();
        let sid = |index: u64, generation: u64| Sid(generation << 32 | index);
        for s in [sid(7, 0), sid(3, 9), sid(5, 1), sid(1, 4), sid(6, 0)] {
            assert!(f.insert(s));
        }
        assert!(!f.insert(sid(5, 1)), "already there");
        let order: Vec<usize> = f.iter().map(Sid::index).collect();
        assert_eq!(order, [1, 3, 5, 6, 7]);
        assert_eq!(f.iter().find(|s| s.index() == 3), Some(sid(3, 9)), "ids come back whole");
        assert!(f.remove(sid(3, 9)) && !f.remove(sid(3, 8)), "an old id of the slot is not a member");
        assert_eq!(f.len(), 4);
    }

    #[test]
    fn followers_leave_and_rejoin_in_any_order_and_stay_sorted() {
        let mut f = Followers::default();
        for i in (0..1000u64).rev() {
            assert!(f.insert(Sid(i)));
        }
        assert!(f.iter().map(Sid::index).eq(0..1000), "sorted whatever the order of joining");
        for i in 0..990u64 {
            assert!(f.remove(Sid(i)));
        }
        assert!(f.iter().map(Sid::index).eq(990..1000));
        // The slots come back through the free list, newest first.
        for i in (0..990u64).rev() {
            assert!(f.insert(Sid(1 << 32 | i)), "a new generation of slot {i}");
        }
        assert_eq!(f.len(), 1000);
        assert!(f.iter().map(Sid::index).eq(0..1000));
    }
}
