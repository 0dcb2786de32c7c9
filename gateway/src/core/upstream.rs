//! A core's messages for the routers, kept until the uplink takes them.
//!
//! The core hands what one turn produced to the uplink as one batch. When
//! the uplink's queue is full the batch stays here and is offered again on
//! the next turn and on the core's timer. Nothing in it is ever dropped:
//! interest and presence are facts the routers must end up with, so losing
//! one would leave subscribers without deliveries or a user online for
//! good. The bound is kept another way: what *adds* state (a connect, a
//! subscribe, a request) is refused while the backlog holds
//! [`MAX_UP_BACKLOG`] messages (error 100, temporary: the client retries),
//! and what removes state (a disconnect, an unsubscribe) or re-announces it
//! adds at most one message per fact the core holds. So the backlog never
//! exceeds the bound plus twice the core's live facts.

use crate::bridge::UpMsg;

/// Messages a core holds for the routers before it refuses new work.
pub const MAX_UP_BACKLOG: usize = 65_536;

/// The backlog.
#[derive(Debug)]
pub struct Upstream {
    batch: Vec<UpMsg>,
    /// Messages held before new work is refused.
    bound: usize,
    /// The uplink's queue was full at the last offer.
    blocked: bool,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream::new(MAX_UP_BACKLOG)
    }
}

impl Upstream {
    /// An empty backlog refusing new work at `bound` messages.
    pub fn new(bound: usize) -> Upstream {
        Upstream { batch: Vec::new(), bound: bound.max(1), blocked: false }
    }

    /// Whether work that adds messages may be accepted.
    pub fn has_room(&self) -> bool {
        self.batch.len() < self.bound
    }

    /// Whether optional work (a relayed emulation request) may add a
    /// message: it never takes more than half the bound, so it cannot
    /// crowd out the core's own work.
    pub fn has_room_for_optional(&self) -> bool {
        self.batch.len() < self.bound / 2
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Whether the last offer found the uplink's queue full.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Keeps a message for the next offer.
    pub fn push(&mut self, msg: UpMsg) {
        self.batch.push(msg);
    }

    /// Offers what is waiting; `send` gives the batch back when the
    /// uplink's queue is full (kept, in order, ahead of what comes next).
    pub fn offer(&mut self, send: impl FnOnce(Vec<UpMsg>) -> Result<(), Vec<UpMsg>>) {
        if self.batch.is_empty() {
            self.blocked = false;
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        match send(batch) {
            Ok(()) => self.blocked = false,
            Err(mut back) => {
                if proto::mutant::active(proto::mutant::Mutant::LoseOffline) {
                    // The planted bug: a user's offline that did not fit vanishes.
                    back.retain(|m| {
                        !matches!(
                            m,
                            UpMsg::Forward { msg: proto::cluster::ClusterMsg::UserOffline { .. }, .. }
                        )
                    });
                }
                self.blocked = true;
                let newer = std::mem::replace(&mut self.batch, back);
                self.batch.extend(newer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::cluster::ClusterMsg;

    fn msg(i: u64) -> UpMsg {
        UpMsg::Request(ClusterMsg::Heartbeat { seq: i, reply: false })
    }

    #[test]
    fn a_full_uplink_keeps_everything_in_order() {
        let mut up = Upstream::default();
        up.push(msg(1));
        up.offer(Err);
        assert!(up.is_blocked());
        up.push(msg(2));
        let mut got = Vec::new();
        up.offer(|b| {
            got = b;
            Ok(())
        });
        assert_eq!(got, vec![msg(1), msg(2)]);
        assert!(!up.is_blocked() && up.is_empty());
    }
}
