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

use std::sync::Arc;

use proto::position::StreamPosition;
use proto::seeded::{self, Map, Set};

use crate::effects::Sid;

/// One channel with subscribers on this core.
#[derive(Debug)]
pub struct Channel {
    /// The channel's name, shared by every local subscription to it (one
    /// allocation per channel; a subscription finds itself by pointer).
    pub name: Arc<str>,
    /// Subscribers at the channel's position: every delivery that
    /// continues it is queued to them without looking at them further.
    pub followers: Set<Sid>,
    /// Subscribers with their own position (or waiting for the router).
    pub catching: Set<Sid>,
    /// Where the stream stands on this core (`None`: not known yet, or lost
    /// by a resync; unpositioned channels never have one).
    pub position: Option<StreamPosition>,
}

impl Channel {
    /// Subscribers of both kinds.
    pub fn len(&self) -> usize {
        self.followers.len() + self.catching.len()
    }

    /// Whether nobody is subscribed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every subscriber.
    pub fn members(&self) -> impl Iterator<Item = Sid> + '_ {
        self.followers.iter().chain(self.catching.iter()).copied()
    }
}

/// The index.
#[derive(Debug)]
pub struct ChannelIndex {
    map: Map<Arc<str>, Channel>,
    seed: u64,
}

impl ChannelIndex {
    /// An empty index hashed with `seed`.
    pub fn new(seed: u64) -> ChannelIndex {
        ChannelIndex { map: seeded::map(seed), seed }
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
        self.map.get(channel).map_or_else(|| Arc::from(channel), |c| c.name.clone())
    }

    /// The channel, if it has local subscribers.
    pub fn get(&self, channel: &str) -> Option<&Channel> {
        self.map.get(channel)
    }

    /// The channel, mutably.
    pub fn get_mut(&mut self, channel: &str) -> Option<&mut Channel> {
        self.map.get_mut(channel)
    }

    /// Where `channel`'s stream stands here, if known.
    pub fn position(&self, channel: &str) -> Option<&StreamPosition> {
        self.map.get(channel)?.position.as_ref()
    }

    /// Adds a subscriber (a follower or one catching up); whether it is the
    /// channel's first on this core (the uplink must hear of it).
    pub fn add(&mut self, name: &Arc<str>, sid: Sid, follows: bool) -> bool {
        let seed = self.seed;
        let ch = self.map.entry(name.clone()).or_insert_with(|| Channel {
            name: name.clone(),
            followers: seeded::set(seed),
            catching: seeded::set(seed ^ 1),
            position: None,
        });
        let first = ch.is_empty();
        if follows {
            ch.followers.insert(sid);
        } else {
            ch.catching.insert(sid);
        }
        first
    }

    /// Moves a subscriber that caught up to the followers.
    pub fn follow(&mut self, channel: &str, sid: Sid) {
        if let Some(ch) = self.map.get_mut(channel)
            && ch.catching.remove(&sid)
        {
            ch.followers.insert(sid);
        }
    }

    /// Removes a subscriber; whether it was the channel's last on this core
    /// (the channel is gone from the index, and the uplink must hear of it).
    pub fn remove(&mut self, channel: &str, sid: Sid) -> bool {
        let Some(ch) = self.map.get_mut(channel) else { return false };
        let was = ch.followers.remove(&sid) || ch.catching.remove(&sid);
        if was && ch.is_empty() {
            self.map.remove(channel);
            return true;
        }
        false
    }

    /// Every channel's name (a snapshot).
    pub fn names(&self) -> Vec<Arc<str>> {
        self.map.keys().cloned().collect()
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
}
