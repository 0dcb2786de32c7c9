//! The oracle: after a run, every (client, channel) stream is checked
//! against what was published, and every user's presence against who is
//! connected.
//!
//! Delivery (invariant 3 of ARCHITECTURE.md): within one epoch a client
//! receives offsets once, in order, with no gap, each with the payload that
//! was published at that offset; a subscribe that recovers returns exactly
//! the missed offsets; a gap is allowed only where the client was told —
//! `recovered: false` (the publications it covered are counted as
//! *forgiven*, apart from violations). At the end, after the faults stopped
//! and the system settled, every client is connected and subscribed at its
//! channels' current position (a subscriber left short of the top, or on an
//! old epoch, is a silent stall).
//!
//! Presence: at the end, a user with a connected client is online at the
//! router that owns their presence, and a user whose clients are all gone
//! (longer ago than the grace period plus a bound) is not.

use std::collections::BTreeMap;
use std::fmt;

/// What a client saw of one channel, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Obs {
    /// A subscribe reply.
    Subscribed {
        /// The subscribe asked to recover.
        recovering: bool,
        /// The server said every missed publication is included.
        recovered: bool,
        /// The reply's epoch.
        epoch: String,
        /// The reply's offset (the request's when recovered, else the top).
        offset: u64,
        /// Recovered publications: (offset, payload seq).
        publications: Vec<(u64, Option<u64>)>,
    },
    /// A `pub` push: (offset, payload seq).
    Pub(u64, Option<u64>),
    /// The server asked the client to resubscribe (unsubscribe ≥ 2500).
    Resync,
    /// The connection ended with this close code (1006: no close frame).
    Disconnected(u16),
    /// A subscribe was refused.
    Refused {
        /// Error code.
        code: u64,
        /// Whether the error was temporary (the client retries).
        temporary: bool,
    },
}

/// What was published: per channel and epoch, the payload seq at each offset.
#[derive(Debug, Default, Clone)]
pub struct Log {
    streams: BTreeMap<(String, String), Vec<Option<u64>>>,
}

impl Log {
    /// `seq` was published on `channel` at (`epoch`, `offset`).
    pub fn published(&mut self, channel: &str, epoch: &str, offset: u64, seq: u64) {
        let v = self.streams.entry((channel.to_owned(), epoch.to_owned())).or_default();
        if v.len() < offset as usize {
            v.resize(offset as usize, None);
        }
        v[offset as usize - 1] = Some(seq);
    }

    /// The payload published at (`epoch`, `offset`) of `channel`, if known.
    pub fn seq(&self, channel: &str, epoch: &str, offset: u64) -> Option<u64> {
        let v = self.streams.get(&(channel.to_owned(), epoch.to_owned()))?;
        v.get((offset as usize).checked_sub(1)?).copied().flatten()
    }

    /// The highest offset published in (`channel`, `epoch`).
    pub fn top(&self, channel: &str, epoch: &str) -> u64 {
        self.streams.get(&(channel.to_owned(), epoch.to_owned())).map_or(0, |v| v.len() as u64)
    }

    /// Publications recorded.
    pub fn len(&self) -> usize {
        self.streams.values().map(|v| v.iter().flatten().count()).sum()
    }

    /// Whether nothing was published.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One thing the oracle found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Client index (`usize::MAX` for a user-level check).
    pub client: usize,
    /// Channel, or the user for presence.
    pub what: String,
    /// Why.
    pub why: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.client == usize::MAX {
            write!(f, "{}: {}", self.what, self.why)
        } else {
            write!(f, "client {} {}: {}", self.client, self.what, self.why)
        }
    }
}

/// The oracle's findings.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    /// Violations.
    pub violations: Vec<Violation>,
    /// Publications received and checked.
    pub checked: u64,
    /// Each `recovered: false` telling and how many publications it covered.
    pub told: Vec<u64>,
}

impl Verdict {
    /// Publications the tellings covered in all.
    pub fn forgiven(&self) -> u64 {
        self.told.iter().sum()
    }

    fn flag(&mut self, client: usize, what: &str, why: String) {
        self.violations.push(Violation { client, what: what.to_owned(), why });
    }
}

/// Where a client's subscription stands at the end of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Final {
    /// Receiving, at this position.
    Live(String, u64),
    /// Not receiving (the client's state, for the report).
    NotLive(String),
    /// The client left for good: nothing is expected of the end.
    Gone,
}

/// Checks one (client, channel) stream. `current` is the channel's stream
/// at its owner at the end: (epoch, top).
pub fn check_stream(
    v: &mut Verdict,
    client: usize,
    channel: &str,
    obs: &[Obs],
    end: &Final,
    current: Option<(&str, u64)>,
    log: &Log,
) {
    let mut pos: Option<(String, u64)> = None;
    let take = |v: &mut Verdict, pos: &mut Option<(String, u64)>, offset: u64, seq: Option<u64>| {
        let Some((epoch, at)) = pos.as_mut() else {
            v.flag(client, channel, format!("publication {offset} before any subscribe reply"));
            return;
        };
        v.checked += 1;
        if offset <= *at {
            let what = if offset == *at { "duplicated" } else { "reordered" };
            v.flag(client, channel, format!("offset {offset} {what} (at {at} in epoch {epoch})"));
            return;
        }
        if offset > *at + 1 {
            v.flag(
                client,
                channel,
                format!("offsets {}..={} lost in epoch {epoch} (nobody said so)", *at + 1, offset - 1),
            );
        }
        match (log.seq(channel, epoch, offset), seq) {
            (Some(want), Some(got)) if want == got => {}
            (want, got) => v.flag(
                client,
                channel,
                format!("offset {offset} of epoch {epoch} carried seq {got:?}, published {want:?}"),
            ),
        }
        *at = offset;
    };
    for o in obs {
        match o {
            Obs::Subscribed { recovering: false, epoch, offset, .. } => {
                if let Some((e, at)) = &pos
                    && (e != epoch || at != offset)
                {
                    v.flag(
                        client,
                        channel,
                        format!("a fresh subscribe moved the stream from {at}@{e} to {offset}@{epoch}"),
                    );
                }
                pos = Some((epoch.clone(), *offset));
            }
            Obs::Subscribed { recovering: true, recovered: true, epoch, offset, publications } => {
                match &pos {
                    Some((e, at)) if e == epoch && at == offset => {}
                    Some((e, at)) => v.flag(
                        client,
                        channel,
                        format!("recovered from {offset}@{epoch} but the client was at {at}@{e}"),
                    ),
                    None => v.flag(client, channel, "recovered without a position".to_owned()),
                }
                pos = Some((epoch.clone(), *offset));
                for (o, seq) in publications {
                    take(v, &mut pos, *o, *seq);
                }
            }
            Obs::Subscribed { recovering: true, recovered: false, epoch, offset, .. } => {
                // Told: what it covered is forgiven, and counted.
                let covered = match &pos {
                    Some((e, at)) if e == epoch => offset.saturating_sub(*at),
                    Some((e, at)) => log.top(channel, e).saturating_sub(*at) + offset,
                    None => *offset,
                };
                v.told.push(covered);
                pos = Some((epoch.clone(), *offset));
            }
            Obs::Pub(offset, seq) => take(v, &mut pos, *offset, *seq),
            Obs::Resync | Obs::Disconnected(_) => {}
            Obs::Refused { temporary: true, .. } => {}
            Obs::Refused { code, temporary: false } => {
                v.flag(client, channel, format!("subscribe refused with {code}"));
            }
        }
    }
    match (end, current) {
        (Final::Gone, _) => {}
        (Final::NotLive(state), _) => v.flag(client, channel, format!("not receiving at the end ({state})")),
        (Final::Live(e, at), Some((ce, top))) => {
            if pos.as_ref() != Some(&(e.clone(), *at)) {
                v.flag(
                    client,
                    channel,
                    format!("the client's view {at}@{e} is not what it received ({pos:?})"),
                );
            }
            if e != ce {
                v.flag(client, channel, format!("stalled on epoch {e} at {at}; the stream is at {top}@{ce}"));
            } else if at < &top {
                v.flag(client, channel, format!("stalled: offsets {}..={top} never arrived", at + 1));
            } else if at > &top {
                v.flag(client, channel, format!("at {at}, ahead of the stream's top {top}"));
            }
        }
        (Final::Live(e, at), None) if *at > 0 => {
            v.flag(client, channel, format!("at {at}@{e}, but no router holds the channel"));
        }
        (Final::Live(..), None) => {}
    }
}

/// Checks one user's presence at the end: `connected` are the connection
/// ids of their connected clients (sorted), `online` whether the owning
/// router counts the user online and `known` the connections it holds
/// (sorted). Every connection gone is offline (the grace period is long
/// over by the end); a connection the router still holds for a client that
/// left is a lost offline, even while the user has other connections.
pub fn check_presence(v: &mut Verdict, user: &str, connected: &[String], online: bool, known: &[String]) {
    let who = format!("user {user}");
    if !connected.is_empty() && !online {
        v.flag(usize::MAX, &who, "connected, but offline at the router".to_owned());
    } else if connected.is_empty() && online {
        v.flag(usize::MAX, &who, "every connection gone, still online at the router".to_owned());
    }
    if connected != known {
        v.flag(usize::MAX, &who, format!("connections {connected:?}, the router holds {known:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> Log {
        let mut l = Log::default();
        for o in 1..=5 {
            l.published("c", "e1", o, 100 + o);
        }
        for o in 1..=2 {
            l.published("c", "e2", o, 200 + o);
        }
        l
    }

    fn fresh(epoch: &str, offset: u64) -> Obs {
        Obs::Subscribed {
            recovering: false,
            recovered: false,
            epoch: epoch.into(),
            offset,
            publications: vec![],
        }
    }

    fn p(o: u64, base: u64) -> Obs {
        Obs::Pub(o, Some(base + o))
    }

    fn run(obs: &[Obs], end: Final, current: Option<(&str, u64)>) -> Verdict {
        let mut v = Verdict::default();
        check_stream(&mut v, 0, "c", obs, &end, current, &log());
        v
    }

    fn live(e: &str, at: u64) -> Final {
        Final::Live(e.into(), at)
    }

    #[test]
    fn a_whole_stream_is_clean() {
        let v = run(
            &[fresh("e1", 0), p(1, 100), p(2, 100), p(3, 100), p(4, 100), p(5, 100)],
            live("e1", 5),
            Some(("e1", 5)),
        );
        assert!(v.violations.is_empty(), "{:?}", v.violations);
        assert_eq!(v.checked, 5);
    }

    #[test]
    fn a_gap_a_duplicate_and_a_reordering_are_each_found() {
        let v = run(
            &[fresh("e1", 0), p(1, 100), p(3, 100), p(4, 100), p(5, 100)],
            live("e1", 5),
            Some(("e1", 5)),
        );
        assert!(v.violations.iter().any(|x| x.why.contains("offsets 2..=2 lost")), "{:?}", v.violations);
        let v = run(&[fresh("e1", 0), p(1, 100), p(1, 100), p(2, 100)], live("e1", 2), Some(("e1", 2)));
        assert!(v.violations.iter().any(|x| x.why.contains("duplicated")));
        let v = run(&[fresh("e1", 0), p(2, 100), p(1, 100)], live("e1", 2), Some(("e1", 2)));
        assert!(v.violations.iter().any(|x| x.why.contains("reordered")));
    }

    #[test]
    fn a_tail_that_never_arrives_is_a_stall() {
        let v = run(&[fresh("e1", 0), p(1, 100), p(2, 100)], live("e1", 2), Some(("e1", 5)));
        assert_eq!(v.violations.len(), 1);
        assert!(v.violations[0].why.contains("stalled: offsets 3..=5"), "{:?}", v.violations);
        let v = run(&[fresh("e1", 5)], live("e1", 5), Some(("e2", 2)));
        assert!(v.violations[0].why.contains("stalled on epoch e1"));
        let v = run(&[fresh("e1", 0)], Final::NotLive("reconnecting".into()), Some(("e1", 5)));
        assert!(v.violations[0].why.contains("not receiving"));
    }

    #[test]
    fn a_wrong_payload_is_found() {
        let v = run(&[fresh("e1", 0), Obs::Pub(1, Some(201))], live("e1", 1), Some(("e1", 1)));
        assert!(v.violations.iter().any(|x| x.why.contains("carried seq")), "{:?}", v.violations);
    }

    #[test]
    fn recovery_must_continue_exactly_and_a_telling_is_counted() {
        let rec = |offset, pubs: &[u64]| Obs::Subscribed {
            recovering: true,
            recovered: true,
            epoch: "e1".into(),
            offset,
            publications: pubs.iter().map(|o| (*o, Some(100 + o))).collect(),
        };
        let v = run(
            &[fresh("e1", 1), Obs::Resync, rec(1, &[2, 3]), p(4, 100), p(5, 100)],
            live("e1", 5),
            Some(("e1", 5)),
        );
        assert!(v.violations.is_empty(), "{:?}", v.violations);
        let v = run(&[fresh("e1", 1), Obs::Resync, rec(1, &[3])], live("e1", 3), Some(("e1", 3)));
        assert!(v.violations.iter().any(|x| x.why.contains("lost")), "a partial recovery is a loss");
        let v =
            run(&[fresh("e1", 1), Obs::Disconnected(1006), rec(0, &[1, 2])], live("e1", 2), Some(("e1", 2)));
        assert!(v.violations.iter().any(|x| x.why.contains("recovered from 0")));
        // Told: an epoch change covers the rest of the old epoch and the new one's start.
        let told = Obs::Subscribed {
            recovering: true,
            recovered: false,
            epoch: "e2".into(),
            offset: 2,
            publications: vec![],
        };
        let v = run(&[fresh("e1", 1), Obs::Disconnected(3001), told], live("e2", 2), Some(("e2", 2)));
        assert!(v.violations.is_empty(), "{:?}", v.violations);
        assert_eq!(v.told, vec![4 + 2]);
    }

    #[test]
    fn presence_is_checked_both_ways() {
        let mut v = Verdict::default();
        let a = vec!["a".to_owned()];
        check_presence(&mut v, "7", &a, true, &a);
        check_presence(&mut v, "8", &[], false, &[]);
        assert!(v.violations.is_empty());
        check_presence(&mut v, "9", &[], true, &a);
        assert_eq!(v.violations.len(), 2, "online with nobody connected, and a stale connection");
        check_presence(&mut v, "10", &a, false, &[]);
        assert_eq!(v.violations.len(), 4);
        let ab = vec!["a".to_owned(), "b".to_owned()];
        let mut v = Verdict::default();
        check_presence(&mut v, "11", &a, true, &ab);
        assert_eq!(v.violations.len(), 1, "a lost offline behind another connection");
    }
}
