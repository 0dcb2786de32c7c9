//! # The correctness checker
//!
//! Every "lost 0" the load generator prints rests on this module, so it is
//! small, pure and tested on its own: no IO, no clock, no atomics. The worker
//! feeds one [`StreamChecker`] per (client, channel) the events it saw, in
//! the order it saw them; at the end [`StreamChecker::finish`] is given the
//! channel's final position and, when the publisher kept one, its
//! [`PublishedLog`], and answers a [`Tally`] that adds up over streams,
//! threads, workers and the run.
//!
//! ## Order and completeness (invariant 3)
//!
//! A subscribe reply positions the stream at `(epoch, offset)`; each
//! publication must then carry the next offset. A jump forward is a gap
//! (`lost`, the missing offsets), the same offset again or one already
//! received is `duplicated`, an older one never received is `reordered` (its
//! gap was already counted as lost: a late publication shows in both). At
//! the end, the offsets between the stream's position and the channel's
//! final top were never delivered: `lost` too. Nothing is excused unless the
//! server said so:
//!
//! - `recovered: false` in the same epoch skips `reply.offset − last`
//!   publications; in a new epoch it skips the new epoch's first
//!   `reply.offset` and what the old epoch got after the stream left it
//!   (known at the end from the final position or the publisher's log).
//!   All of those are `forgiven`: reported apart from `lost`, never red.
//! - anything else that moves the stream silently (a fresh position over an
//!   existing one, a "recovered" reply in another epoch, a final position in
//!   an epoch the stream never heard of) is `lost`.
//!
//! ## Subscriptions that were never checked
//!
//! A subscription answered with an error is `failed_subscriptions` (as is one
//! the server ended with an unsubscribe push below 2500); one never answered
//! (or answered only with temporary errors) is `unpositioned`. Both are red.
//! A subscription the server answered as not positioned (an ephemeral
//! namespace such as `typing:`) carries no offsets and is `unchecked`, which
//! is not red, unless the publisher got offsets for that channel: then the
//! stream should have been positioned and it counts as `unpositioned`.
//! A client that gave up (no more reconnect attempts) has its streams
//! finished like any other, so its missing tail counts as `lost`, and each
//! of them is marked `gave_up`.
//!
//! ## Payloads: what is cheap and honest
//!
//! The demo's publications carry `seq`, the publisher's own counter. Two
//! checks, both in `payload_mismatch`:
//!
//! 1. Per publication, O(1), always on: within one epoch, a channel's
//!    publications come from one sequential publisher, so `seq` must rise
//!    strictly with the offset. A publication whose `seq` is not above the
//!    previous one's (a payload repeated under a new offset, payloads
//!    shifted or swapped) counts once.
//! 2. At the end, exact, when the publisher recorded what each publish was
//!    answered (the HTTP API returns `(offset, epoch)`; a client publish
//!    does not, so that path has only check 1): the stream keeps, per run of
//!    consecutive offsets it accepted, `(first, last)` and a sum of
//!    `mix(offset, seq)`; `finish` computes the same sum from the log. A run
//!    whose sums differ holds at least one wrong payload and counts once
//!    (unless check 1 already counted one in it). A run that covers an
//!    offset the log does not know (a publish whose answer was lost) is not
//!    compared. `payload_verified` counts the publications compared.
//!
//! Shipping the whole log to the workers costs one line of about 15 bytes
//! per publication per worker process, once, with `stop`; a stream keeps at
//! most [`MAX_RUNS`] runs (one unless it saw gaps or epochs), so per-stream
//! memory does not grow with the run's length. Keeping every received
//! `(offset, seq)` for an exact per-publication comparison would cost 8 bytes
//! per delivery (tens of MB for the default demo, unbounded for a soak).

use std::collections::HashMap;
use std::ops::AddAssign;

use serde::{Deserialize, Serialize};

/// Runs of consecutive offsets a stream remembers for the payload check;
/// publications accepted after that many runs are checked by the `seq`
/// invariant only.
pub const MAX_RUNS: usize = 64;

/// One publication as a subscriber received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Its offset (0: none, the stream is not positioned).
    pub offset: u64,
    /// The payload's `seq`, if it has one.
    pub seq: Option<u64>,
}

/// The fields of a `subscribe` reply the checker needs.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubscribeReply<'a> {
    /// The subscribe asked to recover from a position.
    pub was_recovering: bool,
    /// The server recovered every missed publication (they are in `publications`).
    pub recovered: bool,
    /// The stream's epoch.
    pub epoch: &'a str,
    /// The stream's top (the request's offset when recovered).
    pub offset: u64,
    /// The stream has offsets (`positioned` or `recoverable` in the reply).
    pub positioned: bool,
    /// Recovered publications, ascending.
    pub publications: &'a [Delivery],
}

/// What one stream (or many, added up) amounted to. The red ones are
/// `lost`, `duplicated`, `reordered`, `payload_mismatch`, `unpositioned`,
/// `failed_subscriptions` and `gave_up`; see [`Tally::is_clean`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Streams finished.
    pub streams: u64,
    /// Publications never delivered and never explained by the server.
    pub lost: u64,
    /// Publications delivered again.
    pub duplicated: u64,
    /// Publications delivered after a later one.
    pub reordered: u64,
    /// Publications the server said it could not deliver (`recovered:false`,
    /// a new epoch): explicit, not lost.
    pub forgiven: u64,
    /// `recovered: false` replies.
    pub unrecovered: u64,
    /// Unsubscribe pushes asking to resubscribe (code ≥ 2500).
    pub resyncs: u64,
    /// Connections closed under the stream (it was resubscribed on the next).
    pub disconnects: u64,
    /// Publications whose `seq` broke the published order, plus runs whose
    /// payloads differ from the publisher's log (see the module doc).
    pub payload_mismatch: u64,
    /// Publications whose payload was compared with the publisher's log.
    pub payload_verified: u64,
    /// Subscriptions never positioned (never answered, only temporary
    /// errors, or answered "not positioned" on a channel with offsets).
    pub unpositioned: u64,
    /// Subscriptions refused, or ended by the server without a resync.
    pub failed_subscriptions: u64,
    /// Subscriptions of a stream without offsets (ephemeral): nothing to check.
    pub unchecked: u64,
    /// Streams whose client gave up before the end (their tail is in `lost`).
    pub gave_up: u64,
}

impl Tally {
    /// Nothing lost, duplicated, reordered or mismatched, and the stream was
    /// positioned and followed to the end.
    pub fn is_clean(&self) -> bool {
        self.lost
            + self.duplicated
            + self.reordered
            + self.payload_mismatch
            + self.unpositioned
            + self.failed_subscriptions
            + self.gave_up
            == 0
    }
}

impl AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.streams += o.streams;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.forgiven += o.forgiven;
        self.unrecovered += o.unrecovered;
        self.resyncs += o.resyncs;
        self.disconnects += o.disconnects;
        self.payload_mismatch += o.payload_mismatch;
        self.payload_verified += o.payload_verified;
        self.unpositioned += o.unpositioned;
        self.failed_subscriptions += o.failed_subscriptions;
        self.unchecked += o.unchecked;
        self.gave_up += o.gave_up;
    }
}

/// The last answer the server gave about the subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// No answer yet (or temporary errors only).
    Awaiting,
    /// Subscribed, positioned.
    Live,
    /// Subscribed, not positioned.
    Ephemeral,
    /// Refused (or ended by the server) with this code.
    Failed(u32),
    /// A server-side subscription the backend ended (a user left the
    /// channel: unsubscribe push 2000): checked up to there.
    Left,
}

/// Where the stream is: an index into `epochs` and the last offset accepted.
#[derive(Debug, Clone, Copy)]
struct Position {
    epoch: usize,
    last: u64,
}

/// An epoch the stream moved off, at which offset, and whether the server said so.
#[derive(Debug, Clone, Copy)]
struct Left {
    epoch: usize,
    at: u64,
    told: bool,
}

/// Consecutive offsets accepted in one epoch and the sum of their `mix`.
#[derive(Debug, Clone, Copy)]
struct Run {
    epoch: usize,
    first: u64,
    last: u64,
    digest: u64,
    /// The `seq` invariant already counted a mismatch in this run.
    flagged: bool,
}

/// The checker of one client's subscription to one channel.
#[derive(Debug, Clone)]
pub struct StreamChecker {
    status: Status,
    /// Every epoch the stream has been in, in order of first sight.
    epochs: Vec<String>,
    position: Option<Position>,
    left: Vec<Left>,
    /// The previous accepted publication's `seq` in the current epoch.
    last_seq: Option<u64>,
    runs: Vec<Run>,
    gave_up: bool,
    /// Running counts (the end-of-run ones are added by `finish`).
    tally: Tally,
}

impl Default for StreamChecker {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamChecker {
    /// A subscription not answered yet.
    pub fn new() -> Self {
        StreamChecker {
            status: Status::Awaiting,
            epochs: Vec::new(),
            position: None,
            left: Vec::new(),
            last_seq: None,
            runs: Vec::new(),
            gave_up: false,
            tally: Tally::default(),
        }
    }

    /// Where to recover from when resubscribing: `(epoch, offset)` once the
    /// stream has a position in a named epoch.
    pub fn recovery_position(&self) -> Option<(&str, u64)> {
        let p = self.position?;
        let epoch = self.epochs[p.epoch].as_str();
        (!epoch.is_empty()).then_some((epoch, p.last))
    }

    /// A subscribe reply: a first position, a recovery (its publications are
    /// checked like pushes) or an explicit "not recovered".
    pub fn subscribed(&mut self, r: &SubscribeReply<'_>) {
        if !r.positioned {
            self.status = Status::Ephemeral;
            self.position = None;
            return;
        }
        self.status = Status::Live;
        let epoch = self.epoch_index(r.epoch);
        let fresh = Position { epoch, last: r.offset };
        match self.position {
            None => self.position = Some(fresh),
            Some(p) if r.was_recovering && r.recovered => {
                if !self.same_epoch(p.epoch, epoch) {
                    // "Recovered" into another epoch: the old one's tail was never told about.
                    self.leave(p, false);
                    self.position = Some(fresh);
                }
            }
            Some(p) if r.was_recovering => {
                self.tally.unrecovered += 1;
                if self.same_epoch(p.epoch, epoch) {
                    self.tally.forgiven += r.offset.saturating_sub(p.last);
                    // Never back: what it already had would come again as new.
                    self.position = Some(Position { epoch, last: p.last.max(r.offset) });
                } else {
                    self.leave(p, true);
                    self.tally.forgiven += r.offset;
                    self.position = Some(fresh);
                }
            }
            Some(p) => {
                // A fresh position over an existing one, no recovery asked:
                // what it skipped was never told about.
                if self.same_epoch(p.epoch, epoch) {
                    self.tally.lost += r.offset.saturating_sub(p.last);
                    self.position = Some(Position { epoch, last: p.last.max(r.offset) });
                } else {
                    self.leave(p, false);
                    self.tally.lost += r.offset;
                    self.position = Some(fresh);
                }
            }
        }
        for d in r.publications {
            self.publication(*d);
        }
    }

    /// A subscribe answered with an error. A temporary one is retried by the
    /// client and changes nothing; any other ends the subscription.
    pub fn subscribe_failed(&mut self, code: u32, temporary: bool) {
        if !temporary {
            self.status = Status::Failed(code);
        }
    }

    /// A publication pushed (or recovered) on this stream.
    pub fn publication(&mut self, d: Delivery) {
        let Some(p) = self.position else { return };
        if d.offset == 0 {
            return; // no offset: nothing to check it against
        }
        if d.offset > p.last {
            self.tally.lost += d.offset - p.last - 1;
            self.accept(p.epoch, d);
        } else if d.offset == p.last || self.received(p.epoch, d.offset) {
            self.tally.duplicated += 1;
        } else {
            self.tally.reordered += 1;
        }
    }

    /// An unsubscribe push with code ≥ 2500: the client resubscribes with
    /// recovery from its position.
    pub fn resync_asked(&mut self) {
        self.tally.resyncs += 1;
    }

    /// An unsubscribe push below 2500: the server ended the subscription;
    /// whatever follows is not delivered.
    pub fn unsubscribed(&mut self, code: u32) {
        self.status = Status::Failed(code);
    }

    /// The backend ended a server-side subscription (the user left the
    /// channel): what the stream received until then was checked; what
    /// was published after is not its to receive. Anything still arriving
    /// for the channel is the worker's `stray`.
    pub fn left(&mut self) {
        if matches!(self.status, Status::Live | Status::Ephemeral) {
            self.status = Status::Left;
        }
    }

    /// The connection closed (WebSocket close `code`, 1006 without one); the
    /// client resubscribes with recovery when it reconnects.
    pub fn disconnected(&mut self, _code: u16) {
        self.tally.disconnects += 1;
    }

    /// The client stopped trying: its missing tail will count as lost.
    pub fn gave_up(&mut self) {
        self.gave_up = true;
    }

    /// Whether the stream still waits for publications up to the final
    /// position `(top, epoch)` (a subscription that failed waits for nothing).
    pub fn behind(&self, fin: (u64, &str)) -> bool {
        !matches!(self.status, Status::Failed(_) | Status::Left) && self.tail(fin).0 > 0
    }

    /// The stream's counts at the end, given the channel's final position
    /// `(top, epoch)` if it was published to, and what the publisher
    /// published to it if it kept a log.
    pub fn finish(&self, fin: Option<(u64, &str)>, published: Option<&ChannelIndex>) -> Tally {
        let mut t = self.tally;
        t.streams = 1;
        t.gave_up = u64::from(self.gave_up);
        let top = fin.map_or(0, |f| f.0);
        match (self.status, self.position) {
            (Status::Failed(_), _) => t.failed_subscriptions = 1,
            (Status::Ephemeral, None) if top > 0 => t.unpositioned = 1,
            (Status::Ephemeral, None) => t.unchecked = 1,
            (_, None) => t.unpositioned = 1,
            _ => {}
        }
        if let Some(fin) = fin.filter(|_| self.status != Status::Left) {
            let (lost, forgiven) = self.tail(fin);
            t.lost += lost;
            t.forgiven += forgiven;
        }
        if let Some(log) = published {
            // What the epochs it left got afterwards (the final epoch's tail is counted above).
            for (i, l) in self.left.iter().enumerate() {
                let name = self.epochs[l.epoch].as_str();
                let later = self.left[i + 1..].iter().any(|m| m.epoch == l.epoch);
                let current = self.position.is_some_and(|p| p.epoch == l.epoch);
                if later || current || fin.is_some_and(|f| f.1 == name) {
                    continue;
                }
                let n = log.published_after(name, l.at);
                if l.told {
                    t.forgiven += n;
                } else {
                    t.lost += n;
                }
            }
            for r in self.runs.iter().filter(|r| !r.flagged) {
                if let Some(expected) = log.digest(&self.epochs[r.epoch], r.first, r.last) {
                    t.payload_verified += r.last - r.first + 1;
                    if expected != r.digest {
                        t.payload_mismatch += 1;
                    }
                }
            }
        }
        t
    }

    /// `(lost, forgiven)` between the stream's position and the final one.
    fn tail(&self, (top, epoch): (u64, &str)) -> (u64, u64) {
        let Some(p) = self.position else { return (0, 0) };
        let mine = self.epochs[p.epoch].as_str();
        if epoch.is_empty() || mine.is_empty() || mine == epoch {
            return (top.saturating_sub(p.last), 0);
        }
        match self.left.iter().rev().find(|l| self.epochs[l.epoch] == epoch) {
            Some(l) if l.told => (0, top.saturating_sub(l.at)),
            Some(l) => (top.saturating_sub(l.at), 0),
            // An epoch this stream never heard of: all of it was missed.
            None => (top, 0),
        }
    }

    fn accept(&mut self, epoch: usize, d: Delivery) {
        self.position = Some(Position { epoch, last: d.offset });
        let mut flagged = false;
        if let Some(seq) = d.seq {
            if self.last_seq.is_some_and(|prev| seq <= prev) {
                self.tally.payload_mismatch += 1;
                flagged = true;
            }
            self.last_seq = Some(seq);
        }
        let m = mix(d.offset, d.seq);
        let runs = self.runs.len();
        match self.runs.last_mut() {
            Some(r) if r.epoch == epoch && r.last + 1 == d.offset => {
                r.last = d.offset;
                r.digest = r.digest.wrapping_add(m);
                r.flagged |= flagged;
            }
            _ if runs < MAX_RUNS => {
                self.runs.push(Run { epoch, first: d.offset, last: d.offset, digest: m, flagged });
            }
            _ => {}
        }
    }

    /// Whether `offset` of `epoch` was accepted before (as far as the runs remember).
    fn received(&self, epoch: usize, offset: u64) -> bool {
        self.runs.iter().any(|r| r.epoch == epoch && (r.first..=r.last).contains(&offset))
    }

    fn leave(&mut self, p: Position, told: bool) {
        self.left.push(Left { epoch: p.epoch, at: p.last, told });
        self.last_seq = None;
    }

    fn same_epoch(&self, a: usize, b: usize) -> bool {
        a == b || self.epochs[a].is_empty() || self.epochs[b].is_empty()
    }

    fn epoch_index(&mut self, epoch: &str) -> usize {
        match self.epochs.iter().position(|e| e == epoch) {
            Some(i) => i,
            None => {
                self.epochs.push(epoch.to_owned());
                self.epochs.len() - 1
            }
        }
    }
}

/// A 64-bit mix of a publication's offset and `seq` (the splitmix64
/// finalizer), summed per run: equal sums over the same offsets mean equal
/// payloads but for a 2⁻⁶⁴ chance.
fn mix(offset: u64, seq: Option<u64>) -> u64 {
    fn fmix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    // A payload without `seq` mixes as a value no publisher's counter reaches.
    fmix(offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ fmix(seq.unwrap_or(u64::MAX)))
}

/// What the publisher published, per channel and epoch: `(offset, seq)` as
/// the HTTP API answered each publish. Sent to the workers with `stop`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PublishedLog {
    channels: HashMap<String, Vec<EpochLog>>,
}

/// One epoch's publications of a channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochLog {
    /// The epoch.
    pub epoch: String,
    /// `(offset, seq)` in publishing order.
    pub published: Vec<(u64, u64)>,
}

impl PublishedLog {
    /// Records that the publication with `seq` got `offset` in `epoch` of `channel`.
    pub fn record(&mut self, channel: &str, epoch: &str, offset: u64, seq: u64) {
        let epochs = self.channels.entry(channel.to_owned()).or_default();
        match epochs.last_mut() {
            Some(e) if e.epoch == epoch => e.published.push((offset, seq)),
            _ => epochs.push(EpochLog { epoch: epoch.to_owned(), published: vec![(offset, seq)] }),
        }
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// The log indexed for [`StreamChecker::finish`].
    pub fn index(&self) -> PublishedIndex {
        let channels = self
            .channels
            .iter()
            .map(|(name, epochs)| {
                let mut merged: Vec<(String, Vec<(u64, u64)>)> = Vec::new();
                for e in epochs {
                    match merged.iter_mut().find(|(n, _)| *n == e.epoch) {
                        Some((_, v)) => v.extend_from_slice(&e.published),
                        None => merged.push((e.epoch.clone(), e.published.clone())),
                    }
                }
                let epochs = merged.into_iter().map(|(epoch, v)| EpochIndex::new(epoch, v)).collect();
                (name.clone(), ChannelIndex { epochs })
            })
            .collect();
        PublishedIndex { channels }
    }
}

/// A [`PublishedLog`] indexed by channel.
#[derive(Debug, Clone, Default)]
pub struct PublishedIndex {
    channels: HashMap<String, ChannelIndex>,
}

impl PublishedIndex {
    /// What was published to `channel`, if anything was recorded.
    pub fn channel(&self, channel: &str) -> Option<&ChannelIndex> {
        self.channels.get(channel)
    }
}

/// One channel's publications, per epoch, with prefix sums of `mix`.
#[derive(Debug, Clone, Default)]
pub struct ChannelIndex {
    epochs: Vec<EpochIndex>,
}

#[derive(Debug, Clone)]
struct EpochIndex {
    epoch: String,
    /// Ascending, distinct.
    offsets: Vec<u64>,
    /// `prefix[i]`: the sum of `mix` over the first `i` offsets.
    prefix: Vec<u64>,
}

impl EpochIndex {
    fn new(epoch: String, mut published: Vec<(u64, u64)>) -> Self {
        // By offset; an offset answered twice keeps its last seq.
        published.reverse();
        published.sort_by_key(|p| p.0);
        published.dedup_by_key(|p| p.0);
        let mut prefix = Vec::with_capacity(published.len() + 1);
        prefix.push(0u64);
        for (o, s) in &published {
            prefix.push(prefix[prefix.len() - 1].wrapping_add(mix(*o, Some(*s))));
        }
        EpochIndex { epoch, offsets: published.into_iter().map(|p| p.0).collect(), prefix }
    }
}

impl ChannelIndex {
    fn epoch(&self, epoch: &str) -> Option<&EpochIndex> {
        self.epochs.iter().find(|e| e.epoch == epoch)
    }

    /// Publications recorded in `epoch` after offset `at`.
    pub fn published_after(&self, epoch: &str, at: u64) -> u64 {
        self.epoch(epoch).map_or(0, |e| (e.offsets.len() - e.offsets.partition_point(|o| *o <= at)) as u64)
    }

    /// The sum of `mix` over offsets `first..=last` of `epoch`, if the log
    /// has every one of them.
    fn digest(&self, epoch: &str, first: u64, last: u64) -> Option<u64> {
        let e = self.epoch(epoch)?;
        let i = e.offsets.binary_search(&first).ok()?;
        let j = e.offsets.binary_search(&last).ok()?;
        // Distinct ascending offsets: the gap between indices equals the
        // gap between offsets exactly when none is missing.
        ((j - i) as u64 == last - first).then(|| e.prefix[j + 1].wrapping_sub(e.prefix[i]))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The demo's payloads here: `seq` is ten times the offset.
    fn d(offset: u64) -> Delivery {
        Delivery { offset, seq: Some(offset * 10) }
    }

    fn fresh(epoch: &str, offset: u64) -> SubscribeReply<'_> {
        SubscribeReply { epoch, offset, positioned: true, ..Default::default() }
    }

    /// A stream positioned at `(epoch, offset)`.
    fn at(epoch: &str, offset: u64) -> StreamChecker {
        let mut c = StreamChecker::new();
        c.subscribed(&fresh(epoch, offset));
        c
    }

    fn feed(c: &mut StreamChecker, offsets: impl IntoIterator<Item = u64>) {
        for o in offsets {
            c.publication(d(o));
        }
    }

    /// A publisher's log of channel "c": `(epoch, offsets)`, `seq` ten times the offset.
    fn log(epochs: &[(&str, std::ops::RangeInclusive<u64>)]) -> ChannelIndex {
        let mut l = PublishedLog::default();
        for (e, r) in epochs {
            for o in r.clone() {
                l.record("c", e, o, o * 10);
            }
        }
        l.index().channel("c").cloned().expect("recorded")
    }

    #[test]
    fn nothing_missed_is_all_zero() {
        let mut c = at("e", 0);
        feed(&mut c, 1..=5);
        let t = c.finish(Some((5, "e")), Some(&log(&[("e", 1..=5)])));
        assert_eq!(t, Tally { streams: 1, payload_verified: 5, ..Default::default() });
        assert!(t.is_clean());
    }

    #[test]
    fn a_joined_channel_left_is_checked_up_to_the_leave() {
        // Joined at 3 (the subscribe push), left after 6: the tail past the
        // leave is not the stream's, what came before it is checked.
        let mut c = at("e", 3);
        feed(&mut c, 4..=6);
        c.left();
        let t = c.finish(Some((9, "e")), Some(&log(&[("e", 1..=9)])));
        assert_eq!(t, Tally { streams: 1, payload_verified: 3, ..Default::default() });
        assert!(t.is_clean() && !c.behind((9, "e")));
        // A gap, a duplicate or a reordering while joined is still red.
        let mut c = at("e", 3);
        feed(&mut c, [4, 6, 6, 5]);
        c.left();
        let t = c.finish(Some((9, "e")), None);
        assert_eq!((t.lost, t.duplicated, t.reordered), (1, 1, 1));
        assert!(!t.is_clean());
        // A channel left without ever being positioned was never checked.
        let mut c = StreamChecker::new();
        c.left();
        assert_eq!(c.finish(Some((9, "e")), None).unpositioned, 1);
    }

    #[test]
    fn a_gap_is_lost() {
        let mut c = at("e", 0);
        feed(&mut c, [1, 2, 5]);
        let t = c.finish(Some((5, "e")), None);
        assert_eq!((t.lost, t.duplicated, t.reordered), (2, 0, 0));
        assert!(!t.is_clean());
    }

    #[test]
    fn a_duplicate_is_counted_whether_last_or_older() {
        let mut c = at("e", 0);
        feed(&mut c, [1, 2, 2, 3, 1]);
        let t = c.finish(Some((3, "e")), None);
        assert_eq!((t.lost, t.duplicated, t.reordered), (0, 2, 0));
    }

    #[test]
    fn a_reordering_is_counted_and_its_gap_too() {
        let mut c = at("e", 0);
        feed(&mut c, [1, 3, 2]);
        let t = c.finish(Some((3, "e")), None);
        // 2 was missing when 3 came (lost), then came late (reordered).
        assert_eq!((t.lost, t.duplicated, t.reordered), (1, 0, 1));
    }

    #[test]
    fn a_tail_never_delivered_is_lost() {
        let mut c = at("e", 0);
        feed(&mut c, 1..=3);
        assert!(c.behind((5, "e")));
        let t = c.finish(Some((5, "e")), None);
        assert_eq!(t.lost, 2);
    }

    #[test]
    fn a_subscription_never_positioned_is_red() {
        let c = StreamChecker::new();
        let t = c.finish(Some((5, "e")), None);
        assert_eq!((t.unpositioned, t.failed_subscriptions, t.unchecked), (1, 0, 0));
        assert!(!t.is_clean());
        // Only temporary errors, never an answer: still never positioned.
        let mut c = StreamChecker::new();
        c.subscribe_failed(100, true);
        c.subscribe_failed(100, true);
        let t = c.finish(None, None);
        assert_eq!((t.unpositioned, t.failed_subscriptions), (1, 0));
    }

    #[test]
    fn a_refused_subscribe_is_failed_never_unchecked() {
        let mut c = StreamChecker::new();
        c.subscribe_failed(103, false);
        let t = c.finish(Some((5, "e")), None);
        assert_eq!((t.failed_subscriptions, t.unchecked, t.unpositioned), (1, 0, 0));
        assert!(!t.is_clean());
        assert!(!c.behind((5, "e")), "a refused subscription waits for nothing");
    }

    #[test]
    fn a_temporary_refusal_then_a_position_is_clean() {
        let mut c = StreamChecker::new();
        c.subscribe_failed(100, true);
        c.subscribed(&fresh("e", 2));
        feed(&mut c, 3..=4);
        assert!(c.finish(Some((4, "e")), None).is_clean());
    }

    #[test]
    fn a_client_that_gave_up_has_its_tail_counted_as_lost() {
        let mut c = at("e", 0);
        feed(&mut c, 1..=2);
        c.disconnected(1006);
        c.gave_up();
        let t = c.finish(Some((6, "e")), None);
        assert_eq!((t.lost, t.gave_up, t.disconnects), (4, 1, 1));
        assert!(!t.is_clean());
        // Given up with nothing missing: still not checked to the end.
        let mut c = at("e", 0);
        c.gave_up();
        assert!(!c.finish(Some((0, "e")), None).is_clean());
    }

    #[test]
    fn a_payload_that_is_not_the_published_one_is_a_mismatch() {
        // 31 keeps seq rising (the invariant cannot see it); the log can.
        let mut c = at("e", 0);
        for (o, seq) in [(1, 10), (2, 20), (3, 31), (4, 40)] {
            c.publication(Delivery { offset: o, seq: Some(seq) });
        }
        let published = log(&[("e", 1..=4)]);
        let t = c.finish(Some((4, "e")), Some(&published));
        assert_eq!((t.payload_mismatch, t.payload_verified, t.lost), (1, 4, 0));
        assert!(!t.is_clean());
        // Without the log it goes unseen: that is what the log is for.
        assert_eq!(c.finish(Some((4, "e")), None).payload_mismatch, 0);
        // A missing `seq` where one was published is a mismatch too.
        let mut c = at("e", 0);
        c.publication(d(1));
        c.publication(Delivery { offset: 2, seq: None });
        assert_eq!(c.finish(Some((2, "e")), Some(&published)).payload_mismatch, 1);
    }

    #[test]
    fn a_payload_out_of_published_order_is_a_mismatch_without_the_log() {
        // Offset 3 carries offset 1's payload again.
        let mut c = at("e", 0);
        for (o, seq) in [(1, 10), (2, 20), (3, 10), (4, 40)] {
            c.publication(Delivery { offset: o, seq: Some(seq) });
        }
        let t = c.finish(Some((4, "e")), None);
        assert_eq!((t.payload_mismatch, t.lost, t.duplicated), (1, 0, 0));
        // With the log, the run already counted is not counted twice.
        assert_eq!(c.finish(Some((4, "e")), Some(&log(&[("e", 1..=4)]))).payload_mismatch, 1);
    }

    #[test]
    fn recovered_false_is_forgiven_not_lost() {
        let mut c = at("e", 0);
        feed(&mut c, 1..=3);
        c.disconnected(3008);
        c.subscribed(&SubscribeReply { was_recovering: true, recovered: false, ..fresh("e", 8) });
        feed(&mut c, 9..=10);
        let t = c.finish(Some((10, "e")), Some(&log(&[("e", 1..=10)])));
        assert_eq!((t.lost, t.forgiven, t.unrecovered), (0, 5, 1));
        assert_eq!(t.payload_verified, 5);
        assert!(t.is_clean());
    }

    #[test]
    fn an_epoch_change_is_forgiven_with_what_each_epoch_held() {
        let published = log(&[("e1", 1..=6), ("e2", 1..=4)]);
        let mut c = at("e1", 0);
        feed(&mut c, 1..=3);
        c.resync_asked();
        assert_eq!(c.recovery_position(), Some(("e1", 3)));
        c.subscribed(&SubscribeReply { was_recovering: true, recovered: false, ..fresh("e2", 2) });
        feed(&mut c, 3..=4);
        let t = c.finish(Some((4, "e2")), Some(&published));
        // e2's first two before the new position, e1's 4..=6 after leaving it.
        assert_eq!((t.lost, t.forgiven, t.unrecovered, t.resyncs), (0, 5, 1, 1));
        assert_eq!(t.payload_verified, 5);
        assert!(t.is_clean());
        // The final position in the epoch it left: its tail is forgiven, even without a log.
        let t = c.finish(Some((6, "e1")), None);
        assert_eq!((t.lost, t.forgiven), (0, 5));
        assert!(!c.behind((6, "e1")));
    }

    #[test]
    fn an_epoch_change_nobody_told_about_is_lost() {
        // The final position is in an epoch this stream never heard of.
        let mut c = at("e1", 0);
        feed(&mut c, 1..=3);
        assert!(c.behind((4, "e9")));
        assert_eq!(c.finish(Some((4, "e9")), None).lost, 4);
        // "Recovered" into another epoch: the old epoch's tail is lost, not forgiven.
        c.subscribed(&SubscribeReply { was_recovering: true, recovered: true, ..fresh("e2", 0) });
        feed(&mut c, 1..=2);
        let t = c.finish(Some((2, "e2")), Some(&log(&[("e1", 1..=5), ("e2", 1..=2)])));
        assert_eq!((t.lost, t.forgiven), (2, 0));
        // Offsets restarting (a new epoch) without any reply: already had, or out of order.
        let mut c = at("e1", 0);
        feed(&mut c, [1, 2, 3, 1]);
        assert_eq!(c.finish(None, None).duplicated, 1);
        let mut c = at("e1", 3);
        feed(&mut c, [1]);
        assert_eq!(c.finish(None, None).reordered, 1);
    }

    #[test]
    fn a_recovery_with_publications_then_live_continues() {
        let mut c = at("e", 0);
        feed(&mut c, 1..=2);
        c.disconnected(1001);
        let missed = [d(3), d(4), d(5)];
        c.subscribed(&SubscribeReply {
            was_recovering: true,
            recovered: true,
            publications: &missed,
            ..fresh("e", 2)
        });
        feed(&mut c, 6..=7);
        let t = c.finish(Some((7, "e")), Some(&log(&[("e", 1..=7)])));
        assert_eq!(t, Tally { streams: 1, disconnects: 1, payload_verified: 7, ..Default::default() });
        // A recovery that skipped one is a loss like any gap.
        let mut c = at("e", 2);
        c.subscribed(&SubscribeReply {
            was_recovering: true,
            recovered: true,
            publications: &[d(3), d(5)],
            ..fresh("e", 2)
        });
        assert_eq!(c.finish(Some((5, "e")), None).lost, 1);
    }

    #[test]
    fn a_stream_without_offsets_is_unchecked_unless_it_had_them() {
        let mut c = StreamChecker::new();
        c.subscribed(&SubscribeReply::default());
        c.publication(Delivery { offset: 0, seq: None });
        let t = c.finish(None, None);
        assert_eq!((t.unchecked, t.unpositioned), (1, 0));
        assert!(t.is_clean());
        // The publisher got offsets for this channel: it should have been positioned.
        let t = c.finish(Some((3, "e")), None);
        assert_eq!((t.unchecked, t.unpositioned), (0, 1));
        assert!(!t.is_clean());
    }

    #[test]
    fn a_server_unsubscribe_ends_the_check() {
        let mut c = at("e", 0);
        feed(&mut c, 1..=2);
        c.unsubscribed(2000);
        let t = c.finish(Some((4, "e")), None);
        assert_eq!((t.failed_subscriptions, t.lost), (1, 2));
        assert!(!t.is_clean());
    }

    #[test]
    fn a_fresh_position_over_an_old_one_is_not_forgiven() {
        let mut c = at("e", 0);
        feed(&mut c, 1..=2);
        c.subscribed(&fresh("e", 6));
        assert_eq!(c.finish(Some((6, "e")), None).lost, 4);
    }

    #[test]
    fn a_log_with_a_hole_leaves_that_run_unverified() {
        let mut l = PublishedLog::default();
        for o in [1, 2, 4] {
            l.record("c", "e", o, o * 10);
        }
        let ix = l.index();
        let mut c = at("e", 0);
        feed(&mut c, 1..=4);
        let t = c.finish(Some((4, "e")), ix.channel("c"));
        assert_eq!((t.payload_verified, t.payload_mismatch), (0, 0));
    }

    #[test]
    fn the_log_survives_the_wire() {
        let mut l = PublishedLog::default();
        l.record("c", "e1", 1, 0);
        l.record("c", "e2", 1, 3);
        let back: PublishedLog = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.index().channel("c").unwrap().published_after("e2", 0), 1);
    }

    #[test]
    fn tallies_add_up() {
        let mut a = Tally { lost: 1, streams: 1, forgiven: 2, ..Default::default() };
        a += Tally { lost: 2, streams: 1, gave_up: 1, ..Default::default() };
        assert_eq!(a, Tally { lost: 3, streams: 2, forgiven: 2, gave_up: 1, ..Default::default() });
    }

    proptest! {
        /// Whatever the network dropped or doubled, the checker counts exactly that.
        #[test]
        fn counts_match_what_the_network_did(script in prop::collection::vec(0u8..4, 1..120)) {
            let mut c = at("e", 0);
            let mut l = PublishedLog::default();
            let (mut lost, mut dup, mut delivered) = (0, 0, 0);
            for (i, action) in script.iter().enumerate() {
                let o = i as u64 + 1;
                l.record("c", "e", o, o * 10);
                match action {
                    0 => lost += 1,
                    1 => {
                        feed(&mut c, [o, o]);
                        dup += 1;
                        delivered += 1;
                    }
                    _ => {
                        feed(&mut c, [o]);
                        delivered += 1;
                    }
                }
            }
            let t = c.finish(Some((script.len() as u64, "e")), l.index().channel("c"));
            prop_assert_eq!((t.lost, t.duplicated, t.reordered), (lost, dup, 0));
            prop_assert_eq!((t.payload_mismatch, t.payload_verified), (0, delivered));
            prop_assert_eq!(t.is_clean(), lost + dup == 0);
        }

        /// One wrong payload anywhere is seen, whichever way it is wrong.
        #[test]
        fn a_wrong_payload_is_always_seen(
            dropped in prop::collection::vec(any::<bool>(), 1..60),
            which in any::<prop::sample::Index>(),
            delta in 1u64..10_000,
            up in any::<bool>(),
        ) {
            let n = dropped.len() as u64;
            let mut l = PublishedLog::default();
            for o in 1..=n {
                l.record("c", "e", o, o * 10_000);
            }
            let delivered: Vec<u64> = (1..=n).filter(|o| !dropped[*o as usize - 1]).collect();
            prop_assume!(!delivered.is_empty());
            let wrong = delivered[which.index(delivered.len())];
            let mut c = at("e", 0);
            for o in &delivered {
                let seq = if *o == wrong {
                    if up { o * 10_000 + delta } else { o * 10_000 - delta }
                } else {
                    o * 10_000
                };
                c.publication(Delivery { offset: *o, seq: Some(seq) });
            }
            let t = c.finish(Some((n, "e")), l.index().channel("c"));
            prop_assert!(t.payload_mismatch >= 1, "{:?}", t);
        }
    }
}
