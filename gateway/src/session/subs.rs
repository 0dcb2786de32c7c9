//! A session's subscriptions and where each stands.
//!
//! Every position is kept in exactly one place. A subscription that
//! [`SubState::Follows`] its channel has no position of its own: it is where
//! the channel's stream on this core is (the core's channel index keeps
//! that one position for all its followers). A subscription answered from
//! another position (a router's recovery, while the core's stream was ahead
//! or unknown) keeps its own until it catches up with the channel's, then
//! follows. One waiting for the router's answer holds what arrives meanwhile.

use std::sync::Arc;

use bytes::Bytes;
use proto::position::StreamPosition;

/// Where one subscription stands.
#[derive(Debug)]
pub enum SubState {
    /// At the channel's position on this core: every delivery is for it.
    Follows,
    /// At its own position, behind or beside the channel's stream (boxed:
    /// a subscription catches up soon, and every entry stays 32 bytes).
    Own(Box<StreamPosition>),
    /// Waiting for the router's answer to its subscribe.
    Pending(Box<PendingSub>),
}

/// A subscribe the router is answering.
#[derive(Debug)]
pub struct PendingSub {
    /// Router request id.
    pub req: u64,
    /// The client's command id (0 for a server-side subscription).
    pub id: u32,
    /// A server-side subscription: answered with a `subscribe` push.
    pub server: bool,
    /// The client asked to recover from (`epoch`, `offset`).
    pub recover: bool,
    /// The client's epoch.
    pub epoch: String,
    /// The client's offset (echoed in a recovered reply).
    pub offset: u64,
    /// The subscribe's `flag` bits.
    pub flag: u64,
    /// Whether the namespace keeps history (`recoverable` in the reply).
    pub history: bool,
    /// Deliveries that arrived meanwhile: (epoch, first, last, frame).
    pub held: Vec<(Arc<str>, u64, u64, Bytes)>,
    /// Bytes held; past the session's queue bound nothing more is held and
    /// the subscription resyncs after the reply.
    pub held_bytes: usize,
    /// Something was not held (the bound, or a resync of the channel): the
    /// answer alone cannot make the subscription whole.
    pub broken: bool,
    /// Times the request was sent again after a resync hit it.
    pub retries: u8,
}

/// A session's subscriptions: a short list (most connections hold a few;
/// the limit is 128), one exact-size allocation instead of a hash table.
#[derive(Debug, Default)]
pub struct Subs(Box<[(Arc<str>, SubState)]>);

impl Subs {
    /// Where `channel` is; the core's shared channel name is found by
    /// pointer, any other string by its bytes.
    fn index(&self, channel: &str) -> Option<usize> {
        let same = |c: &Arc<str>| std::ptr::eq(c.as_ptr(), channel.as_ptr()) && c.len() == channel.len();
        self.0.iter().position(|(c, _)| same(c)).or_else(|| self.0.iter().position(|(c, _)| &**c == channel))
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Server-side subscriptions waiting for a router's answer (they do not
    /// count against the client's own requests in flight).
    pub fn pending_server(&self) -> usize {
        self.0.iter().filter(|(_, st)| matches!(st, SubState::Pending(p) if p.server)).count()
    }

    /// Whether `channel` is subscribed.
    pub fn contains(&self, channel: &str) -> bool {
        self.index(channel).is_some()
    }

    /// The subscription to `channel`.
    pub fn get(&self, channel: &str) -> Option<&SubState> {
        self.index(channel).map(|i| &self.0[i].1)
    }

    /// The subscription to `channel`, mutably.
    pub fn get_mut(&mut self, channel: &str) -> Option<&mut SubState> {
        self.index(channel).map(|i| &mut self.0[i].1)
    }

    /// Adds the subscription to `channel` (replacing one there was).
    pub fn insert(&mut self, channel: Arc<str>, state: SubState) {
        match self.index(&channel) {
            Some(i) => self.0[i].1 = state,
            None => {
                let mut v = std::mem::take(&mut self.0).into_vec();
                v.reserve_exact(1);
                v.push((channel, state));
                self.0 = v.into_boxed_slice();
            }
        }
    }

    /// Removes the subscription to `channel`, with its shared name.
    pub fn remove(&mut self, channel: &str) -> Option<(Arc<str>, SubState)> {
        let i = self.index(channel)?;
        let mut v = std::mem::take(&mut self.0).into_vec();
        let e = v.swap_remove(i);
        self.0 = v.into_boxed_slice();
        Some(e)
    }

    /// The subscribed channels.
    pub fn channels(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter().map(|(c, _)| c)
    }

    /// Takes every subscription.
    pub fn take(&mut self) -> Vec<(Arc<str>, SubState)> {
        std::mem::take(&mut self.0).into_vec()
    }
}
