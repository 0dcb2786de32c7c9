//! One channel's stream: epoch, offsets, the recovery ring, the idempotency
//! window and the set of gateways with online subscribers.
//!
//! Pure state: time and randomness are arguments, so every rule below is
//! tested directly. The owner shard holds one [`ChannelState`] per channel.
//!
//! Rules that must stay true:
//! - offsets are consecutive from 1 within an epoch; a new epoch (new owner,
//!   lost history) never reuses a position a client may hold;
//! - recovery is all or nothing: either every publication after the client's
//!   offset is returned, or none and `recovered: false`;
//! - a publish repeating an idempotency key within the window returns the
//!   first result and is not delivered again.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::client::{Publication, ReplyError};
use proto::seeded::{self, Set};

/// History settings of a channel's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// Publications kept for recovery and history (0: none).
    pub history_size: usize,
    /// How long a publication stays in the ring.
    pub history_ttl: Duration,
    /// Whether publications get offsets at all (false: ephemeral, e.g. typing).
    pub positioned: bool,
    /// Most publications one recovery may return; more missed → not recovered.
    pub max_recover: usize,
}

impl StreamOptions {
    /// Whether the channel keeps history (both size and TTL set).
    pub fn has_history(&self) -> bool {
        self.positioned && self.history_size > 0 && !self.history_ttl.is_zero()
    }
}

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);
/// Keys remembered per channel at most; the oldest is forgotten first.
pub const IDEMPOTENCY_MAX_KEYS: usize = 10_000;
/// Most publications a client `history` call returns.
pub const CLIENT_HISTORY_CAP: usize = 300;

#[derive(Debug, Clone)]
struct Stored {
    publication: Publication,
    at: Instant,
}

/// Result of [`ChannelState::publish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    /// A new publication, to be delivered to every interested gateway.
    Published(Publication),
    /// A repeat of an idempotency key: the first publication's offset; deliver nothing.
    Duplicate {
        /// Offset of the first publication with that key.
        offset: u64,
    },
}

/// The answer to a recovery (or a plain position) request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// Current epoch.
    pub epoch: String,
    /// Current top offset.
    pub top: u64,
    /// Every missed publication is in `publications`.
    pub recovered: bool,
    /// Missed publications, ascending.
    pub publications: Vec<Publication>,
}

/// One channel.
#[derive(Debug)]
pub struct ChannelState {
    epoch: String,
    top: u64,
    ring: VecDeque<Stored>,
    idempotency: HashMap<String, (u64, Instant)>,
    idempotency_order: VecDeque<(String, Instant)>,
    /// Gateways (by link index) with at least one online subscriber.
    pub gateways: Set<u32>,
    /// The shard's id for this channel (its key on the eviction wheel).
    pub(crate) id: u64,
    /// The wheel tick its idle check is scheduled at (0: none).
    pub(crate) check: u64,
}

impl ChannelState {
    /// A new stream at offset 0 in `epoch` (`seed` orders its gateway set).
    pub fn new(epoch: String, seed: u64) -> Self {
        ChannelState {
            epoch,
            top: 0,
            ring: VecDeque::new(),
            idempotency: HashMap::new(),
            idempotency_order: VecDeque::new(),
            gateways: seeded::set(seed),
            id: 0,
            check: 0,
        }
    }

    /// Current epoch.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Offset of the last publication (0 when none).
    pub fn top(&self) -> u64 {
        self.top
    }

    /// Publications in the ring.
    pub fn ring_len(&self) -> usize {
        self.ring.len()
    }

    /// Bytes of payload held by the ring (for memory metrics).
    pub fn ring_bytes(&self) -> usize {
        self.ring
            .iter()
            .map(|s| s.publication.data.len() + s.publication.info.as_ref().map_or(0, Bytes::len))
            .sum()
    }

    /// Whether nothing refers to this channel any more: no gateway has
    /// subscribers, no history and no idempotency key is left (call
    /// [`expire`](Self::expire) first). It may be dropped; a later
    /// subscriber finds a new stream with a new epoch, so an old position is
    /// never mistaken for a position in it.
    pub fn is_idle(&self) -> bool {
        self.gateways.is_empty() && self.ring.is_empty() && self.idempotency.is_empty()
    }

    /// When the next publication or idempotency key of this channel
    /// expires, if any does.
    pub fn next_expiry(&self, opts: &StreamOptions) -> Option<Instant> {
        let ring = self.ring.front().map(|s| s.at + opts.history_ttl);
        let key = self.idempotency_order.front().map(|(_, at)| *at + IDEMPOTENCY_WINDOW);
        ring.into_iter().chain(key).min()
    }

    /// Drops what expired by `now` (history past its TTL or beyond its
    /// size, idempotency keys past their window).
    pub fn expire(&mut self, now: Instant, opts: &StreamOptions) {
        self.trim(now, opts);
    }

    fn trim(&mut self, now: Instant, opts: &StreamOptions) {
        while self.ring.len() > opts.history_size {
            self.ring.pop_front();
        }
        while self.ring.front().is_some_and(|s| now.saturating_duration_since(s.at) >= opts.history_ttl) {
            self.ring.pop_front();
        }
        while let Some((key, at)) = self.idempotency_order.front() {
            if now.saturating_duration_since(*at) < IDEMPOTENCY_WINDOW
                && self.idempotency_order.len() <= IDEMPOTENCY_MAX_KEYS
            {
                break;
            }
            if self.idempotency.get(key).is_some_and(|(_, t)| t == at) {
                self.idempotency.remove(key);
            }
            self.idempotency_order.pop_front();
        }
    }

    /// Orders a publication: gives it the next offset (positioned streams),
    /// keeps it in the ring (streams with history), remembers its key.
    pub fn publish(
        &mut self,
        data: Bytes,
        info: Option<Bytes>,
        tags: Option<Bytes>,
        idempotency_key: Option<&str>,
        now: Instant,
        opts: &StreamOptions,
    ) -> PublishOutcome {
        self.trim(now, opts);
        if let Some(key) = idempotency_key.filter(|k| !k.is_empty())
            && let Some((offset, _)) = self.idempotency.get(key)
        {
            return PublishOutcome::Duplicate { offset: *offset };
        }
        let offset = if opts.positioned {
            self.top += 1;
            self.top
        } else {
            0
        };
        let publication = Publication { offset, data, info, tags };
        if opts.has_history() {
            self.ring.push_back(Stored { publication: publication.clone(), at: now });
            self.trim(now, opts);
        }
        if let Some(key) = idempotency_key.filter(|k| !k.is_empty()) {
            self.idempotency.insert(key.to_owned(), (offset, now));
            self.idempotency_order.push_back((key.to_owned(), now));
            self.trim(now, opts);
        }
        PublishOutcome::Published(publication)
    }

    /// Publications after `offset` if the client's position can be fully
    /// recovered, else none (client-protocol.md section 5).
    pub fn recover(&mut self, epoch: &str, offset: u64, now: Instant, opts: &StreamOptions) -> Replay {
        self.trim(now, opts);
        let not = |s: &Self| Replay {
            epoch: s.epoch.clone(),
            top: s.top,
            recovered: false,
            publications: Vec::new(),
        };
        if !epoch.is_empty() && epoch != self.epoch {
            return not(self);
        }
        if offset == self.top {
            return Replay {
                epoch: self.epoch.clone(),
                top: self.top,
                recovered: true,
                publications: Vec::new(),
            };
        }
        if offset > self.top || (self.top - offset) as usize > opts.max_recover {
            return not(self);
        }
        match self.ring.front() {
            Some(first) if first.publication.offset <= offset + 1 => {}
            _ => return not(self),
        }
        let publications: Vec<Publication> = self
            .ring
            .iter()
            .filter(|s| s.publication.offset > offset)
            .map(|s| s.publication.clone())
            .collect();
        debug_assert_eq!(publications.first().map(|p| p.offset), Some(offset + 1));
        debug_assert_eq!(publications.last().map(|p| p.offset), Some(self.top));
        Replay { epoch: self.epoch.clone(), top: self.top, recovered: true, publications }
    }

    /// The `history` call: `limit` 0 → position only, negative → all (capped
    /// at `cap`), `since` → strictly after (or, reversed, before) that offset.
    pub fn history(
        &mut self,
        limit: i64,
        since: Option<(u64, &str)>,
        reverse: bool,
        cap: usize,
        now: Instant,
        opts: &StreamOptions,
    ) -> Result<(Vec<Publication>, String, u64), ReplyError> {
        if !opts.has_history() {
            return Err(ReplyError::NOT_AVAILABLE);
        }
        self.trim(now, opts);
        if let Some((offset, epoch)) = since {
            if !epoch.is_empty() && epoch != self.epoch {
                return Err(ReplyError::UNRECOVERABLE_POSITION);
            }
            if reverse && offset == 0 {
                return Err(ReplyError::BAD_REQUEST);
            }
        }
        let limit = if limit < 0 { cap } else { (limit as usize).min(cap) };
        let iter = self.ring.iter().map(|s| &s.publication);
        let pubs: Vec<Publication> = match (since, reverse) {
            (_, _) if limit == 0 => Vec::new(),
            (None, false) => iter.take(limit).cloned().collect(),
            (None, true) => iter.rev().take(limit).cloned().collect(),
            (Some((o, _)), false) => iter.filter(|p| p.offset > o).take(limit).cloned().collect(),
            (Some((o, _)), true) => iter.rev().filter(|p| p.offset < o).take(limit).cloned().collect(),
        };
        Ok((pubs, self.epoch.clone(), self.top))
    }

    /// Drops history but keeps epoch and top (`history_remove`).
    pub fn remove_history(&mut self) {
        self.ring.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTS: StreamOptions = StreamOptions {
        history_size: 5,
        history_ttl: Duration::from_secs(60),
        positioned: true,
        max_recover: 300,
    };

    fn publish_n(ch: &mut ChannelState, n: usize, now: Instant) {
        for i in 0..n {
            let data = Bytes::from(format!("{{\"i\":{i}}}"));
            assert!(matches!(ch.publish(data, None, None, None, now, &OPTS), PublishOutcome::Published(_)));
        }
    }

    #[test]
    fn offsets_are_consecutive_and_ring_is_bounded() {
        let now = Instant::now();
        let mut ch = ChannelState::new("e1".into(), 0);
        publish_n(&mut ch, 8, now);
        assert_eq!(ch.top(), 8);
        assert_eq!(ch.ring_len(), 5);
    }

    #[test]
    fn recovery_is_all_or_nothing() {
        let now = Instant::now();
        let mut ch = ChannelState::new("e1".into(), 0);
        publish_n(&mut ch, 8, now);
        // Missed 6..=8: in the ring.
        let r = ch.recover("e1", 5, now, &OPTS);
        assert!(r.recovered);
        assert_eq!(r.publications.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![6, 7, 8]);
        // Missed 3..=8 but 3 was trimmed: nothing, not a partial answer.
        let r = ch.recover("e1", 2, now, &OPTS);
        assert!(!r.recovered && r.publications.is_empty());
        assert_eq!((r.epoch.as_str(), r.top), ("e1", 8));
        // Up to date.
        let r = ch.recover("e1", 8, now, &OPTS);
        assert!(r.recovered && r.publications.is_empty());
        // Other epoch, or ahead of the stream: not recovered.
        assert!(!ch.recover("old", 8, now, &OPTS).recovered);
        assert!(!ch.recover("e1", 9, now, &OPTS).recovered);
        // Empty epoch skips the epoch check.
        assert!(ch.recover("", 7, now, &OPTS).recovered);
        // TTL expiry empties the ring: recovery of anything missed fails.
        let later = now + Duration::from_secs(61);
        assert!(!ch.recover("e1", 7, later, &OPTS).recovered);
        assert!(ch.recover("e1", 8, later, &OPTS).recovered);
        // Too many missed for one recovery.
        let small = StreamOptions { max_recover: 2, ..OPTS };
        assert!(!ch.recover("e1", 5, now, &small).recovered);
    }

    #[test]
    fn idempotency_window() {
        let now = Instant::now();
        let mut ch = ChannelState::new("e".into(), 0);
        let first = ch.publish(Bytes::from_static(b"1"), None, None, Some("k"), now, &OPTS);
        assert!(matches!(first, PublishOutcome::Published(ref p) if p.offset == 1));
        let again =
            ch.publish(Bytes::from_static(b"1"), None, None, Some("k"), now + Duration::from_secs(10), &OPTS);
        assert_eq!(again, PublishOutcome::Duplicate { offset: 1 });
        assert_eq!(ch.top(), 1);
        let after = ch.publish(
            Bytes::from_static(b"1"),
            None,
            None,
            Some("k"),
            now + Duration::from_secs(301),
            &OPTS,
        );
        assert!(matches!(after, PublishOutcome::Published(ref p) if p.offset == 2));
    }

    #[test]
    fn ephemeral_streams_have_no_offsets_or_history() {
        let now = Instant::now();
        let opts =
            StreamOptions { history_size: 0, history_ttl: Duration::ZERO, positioned: false, max_recover: 0 };
        let mut ch = ChannelState::new("e".into(), 0);
        match ch.publish(Bytes::from_static(b"{}"), None, None, None, now, &opts) {
            PublishOutcome::Published(p) => assert_eq!(p.offset, 0),
            other => panic!("{other:?}"),
        }
        assert_eq!(ch.ring_len(), 0);
        assert_eq!(ch.history(10, None, false, 300, now, &opts), Err(ReplyError::NOT_AVAILABLE));
    }

    #[test]
    fn history_calls() {
        let now = Instant::now();
        let mut ch = ChannelState::new("e".into(), 0);
        publish_n(&mut ch, 5, now);
        let offs = |r: Result<(Vec<Publication>, String, u64), ReplyError>| {
            r.unwrap().0.iter().map(|p| p.offset).collect::<Vec<_>>()
        };
        assert_eq!(offs(ch.history(0, None, false, 300, now, &OPTS)), Vec::<u64>::new());
        assert_eq!(offs(ch.history(-1, None, false, 300, now, &OPTS)), vec![1, 2, 3, 4, 5]);
        assert_eq!(offs(ch.history(2, None, true, 300, now, &OPTS)), vec![5, 4]);
        assert_eq!(offs(ch.history(10, Some((3, "e")), false, 300, now, &OPTS)), vec![4, 5]);
        assert_eq!(offs(ch.history(10, Some((3, "")), true, 300, now, &OPTS)), vec![2, 1]);
        assert_eq!(offs(ch.history(-1, None, false, 2, now, &OPTS)), vec![1, 2]);
        assert_eq!(
            ch.history(1, Some((3, "x")), false, 300, now, &OPTS),
            Err(ReplyError::UNRECOVERABLE_POSITION)
        );
        assert_eq!(ch.history(1, Some((0, "e")), true, 300, now, &OPTS), Err(ReplyError::BAD_REQUEST));
        ch.remove_history();
        let (pubs, epoch, top) = ch.history(-1, None, false, 300, now, &OPTS).unwrap();
        assert!(pubs.is_empty());
        assert_eq!((epoch.as_str(), top), ("e", 5));
    }
}
