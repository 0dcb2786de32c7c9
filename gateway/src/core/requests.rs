//! Router requests a core has in flight, each with a deadline.
//!
//! A request's answer comes back through the uplink to the core named in
//! the request id. An answer lost with a router, or not handed over (the
//! uplink tells the core so when it can), is failed at its deadline: the
//! client gets error 100, which is temporary, so the SDKs retry.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use proto::seeded::{self, Map};

use crate::bridge::{CoreId, request_id};
use crate::effects::Sid;

/// How long a router request (subscribe recovery, publish, history,
/// presence) may go unanswered: then the client gets error 100 and the
/// request is forgotten.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What a request was for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A client publish (command `id`).
    Publish {
        /// Command id.
        id: u32,
    },
    /// A subscribe waiting for its position (the subscription holds the rest).
    Subscribe {
        /// Channel.
        channel: Arc<str>,
    },
    /// A client `history` call.
    History {
        /// Command id.
        id: u32,
    },
    /// A client `presence` call.
    Presence {
        /// Command id.
        id: u32,
    },
    /// A client `presence_stats` call.
    PresenceStats {
        /// Command id.
        id: u32,
    },
}

/// The requests in flight.
#[derive(Debug)]
pub struct Requests {
    core: CoreId,
    next: u64,
    pending: Map<u64, (Sid, Kind)>,
    /// Requests in flight per session.
    per_session: Map<Sid, u32>,
    /// (deadline in core milliseconds, request) in the order sent.
    deadlines: VecDeque<(u64, u64)>,
}

impl Requests {
    /// None in flight.
    pub fn new(core: CoreId, seed: u64) -> Requests {
        Requests {
            core,
            next: 1,
            pending: seeded::map(seed),
            per_session: seeded::map(seed ^ 1),
            deadlines: VecDeque::new(),
        }
    }

    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether none is in flight.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Requests `sid` has in flight.
    pub fn of(&self, sid: Sid) -> u32 {
        self.per_session.get(&sid).copied().unwrap_or(0)
    }

    /// A new request of `sid` sent at `now`; its id.
    pub fn start(&mut self, sid: Sid, kind: Kind, now: u64) -> u64 {
        let req = request_id(self.core, self.next);
        self.next += 1;
        self.pending.insert(req, (sid, kind));
        *self.per_session.entry(sid).or_default() += 1;
        self.deadlines.push_back((now + REQUEST_TIMEOUT.as_millis() as u64, req));
        req
    }

    /// The request answered (or failed); `None` if it is not in flight.
    pub fn finish(&mut self, req: u64) -> Option<(Sid, Kind)> {
        let (sid, kind) = self.pending.remove(&req)?;
        if let Some(n) = self.per_session.get_mut(&sid) {
            *n -= 1;
            if *n == 0 {
                self.per_session.remove(&sid);
            }
        }
        Some((sid, kind))
    }

    /// The requests whose deadline passed by `now` and that are still in flight.
    pub fn expired(&mut self, now: u64) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(&(at, req)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            if self.pending.contains_key(&req) {
                out.push(req);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unanswered_request_expires_once_an_answered_one_never() {
        let mut r = Requests::new(3, 0);
        let a = r.start(Sid(1), Kind::Publish { id: 7 }, 100);
        let b = r.start(Sid(2), Kind::History { id: 8 }, 200);
        assert_eq!(crate::bridge::core_of(a), 3);
        assert_eq!(r.finish(a), Some((Sid(1), Kind::Publish { id: 7 })));
        assert!(r.expired(100 + 9_999).is_empty());
        assert_eq!(r.expired(200 + 10_000), vec![b]);
        assert!(r.expired(u64::MAX).is_empty());
        assert_eq!(r.len(), 1, "expiry reports; the caller finishes it");
        assert_eq!((r.of(Sid(1)), r.of(Sid(2))), (0, 1));
        r.finish(b);
        assert_eq!(r.of(Sid(2)), 0);
    }
}
