//! The uplink as a state machine without IO: routes, router links, and
//! what is owed to whom.
//!
//! It keeps `channel → bitmask of cores` and tells a channel's owning router
//! only about the gateway's 0→1 and 1→0 transitions. Each run of
//! publications that arrives is framed **once** (one `pub` push, or several
//! consecutive ones of a channel packed into one text frame) and handed, as
//! the same `Bytes`, to exactly the cores whose bit is set.
//!
//! Ownership is the rendezvous hash of the channel over the routers that are
//! linked and not draining; when a router comes or goes, the channels whose
//! owner changed are re-subscribed at their new owner and their local
//! subscribers are told to resync, so nothing is lost silently. With a
//! membership view (etcd: [`Uplink::strict`]) the hash runs over the routers
//! in the view instead, as the routers compute it: a channel whose owner in
//! the view is not linked from here has no router until it is (its
//! subscribers resync, its requests fail with a temporary error), rather
//! than being registered at a router that does not own it. Routers join the
//! uplink as they are discovered ([`Uplink::add_router`]) and leave the
//! view without losing their slot ([`Uplink::set_in_view`]).
//!
//! Nothing is lost at a full queue either:
//! - a delivery that a full core inbox refuses becomes a resync of that
//!   channel owed to that core, handed over as soon as the inbox has room;
//!   until then that core gets no more of the channel (it would only see a
//!   gap); a position or an answer a full inbox refuses is owed as it is;
//! - everything for a router (interest, requests, presence facts, round
//!   begins and ends) goes through that router's outbox in order; what its
//!   link queue does not take waits there, and past [`MAX_HELD`] waiting
//!   messages the uplink stops taking the cores' batches (the cores keep
//!   theirs and refuse new work when their own backlog is full);
//! - after a relink the router gets the whole interest set it owns
//!   ([`ClusterMsg::Snapshot`]), and after every change of the set of live
//!   routers a presence round runs: every router is told a round begins,
//!   every core announces every fact it holds again, and the round's end
//!   makes each router drop what this gateway did not confirm, so facts
//!   follow their keys to the new owners and the old owners forget them.
//!
//! The IO shell ([`quic`]) owns the QUIC connections and the core inboxes
//! behind [`UplinkIo`]; the simulation drives the same machine through its
//! own.
//!
//! - [`quic`]: the tokio + quinn shell.

pub mod quic;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use proto::client::reply::pub_push;
use proto::cluster::{ClusterMsg, PRESENCE_ROUNDS_SINCE};
use proto::mutant::{self, Mutant};
use proto::rendezvous::score;
use proto::seeded::{self, Map, Set};
use proto::ws::SharedFrame;

use crate::bridge::{CoreId, DownMsg, UpMsg, core_of};
use crate::metrics::Metrics;

/// Messages the uplink holds for full link queues before it stops taking
/// the cores' batches (the cores then keep theirs, and refuse new work once
/// their own backlog is full).
pub const MAX_HELD: usize = 65_536;

/// Datagram copies a channel holds at most while an earlier publication is
/// missing (past it the highest offsets go: the stream brings them).
pub const MAX_HELD_COPIES: usize = 256;

/// Largest frame the uplink packs publications into (well under the 1 MiB
/// centrifuge-python accepts).
pub const MAX_PACKED_FRAME: usize = 256 * 1024;

/// Where the uplink's messages go. A message that does not fit comes back
/// by value, as from a channel's `try_send` (no copy, no allocation).
#[allow(clippy::result_large_err)]
pub trait UplinkIo {
    /// Queues `msg` on router `router`'s link; the message back when the
    /// link is down or its queue is full.
    fn to_router(&mut self, router: usize, msg: ClusterMsg) -> Result<(), ClusterMsg>;
    /// Hands `msg` to core `core`'s inbox; the message back when it is full
    /// (the caller owes the core what it stood for).
    fn to_core(&mut self, core: CoreId, msg: DownMsg) -> Result<(), DownMsg>;
}

/// One router as the uplink sees it.
#[derive(Debug)]
struct RouterLink {
    /// Its rendezvous name (its address as configured).
    name: String,
    /// The link is up (welcomed).
    up: bool,
    /// The protocol version agreed on the link.
    version: u16,
    /// It announced a drain: linked, but owning nothing new.
    draining: bool,
    /// It is in the membership (always, with a static list).
    in_view: bool,
    /// It was told that the current presence round began.
    in_round: bool,
    /// Messages waiting for room in its queue, in order: nothing for a
    /// router is dropped while its link is up (interest, requests, presence
    /// facts, round begins and ends all keep their order).
    outbox: VecDeque<ClusterMsg>,
}

/// What the uplink knows of one channel with local subscribers.
#[derive(Debug, Default)]
struct Route {
    /// Cores with subscribers.
    cores: u64,
    /// Cores owed a resync of this channel: they get nothing of it until
    /// the resync is handed over.
    blocked: u64,
    /// The router it is registered at.
    owner: Option<usize>,
    /// The epoch of the last delivery, shared by the frames handed to the
    /// cores (one allocation per epoch, not per delivery).
    epoch: Option<Arc<str>>,
    /// The last offset handed to the cores in `epoch` (0: unknown, or an
    /// ephemeral channel): a copy of a publication that arrives again (its
    /// datagram copy first, then the stream's) is handed over once.
    last: u64,
    /// Datagram copies that came ahead of an earlier publication, by
    /// offset (at most [`MAX_HELD_COPIES`]): handed over as soon as the
    /// publications before them are, from either path.
    held: std::collections::BTreeMap<u64, ClusterMsg>,
}

impl Route {
    /// Whether the publication at `offset` of `epoch` was handed over
    /// already (ephemeral publications, offset 0, never count as such).
    fn delivered(&self, epoch: &str, offset: u64) -> bool {
        offset != 0 && offset <= self.last && self.epoch.as_deref() == Some(epoch)
    }
}

/// Server API user commands a core's full inbox may be owed (behind the
/// answers to its own requests, which its request bound limits); past it a
/// command is dropped and counted (`user_commands_dropped_total`).
pub const MAX_OWED_USER_COMMANDS: usize = 4096;

/// What one core is owed.
#[derive(Debug)]
struct Owed {
    /// Channels to resync.
    resync: Set<Arc<str>>,
    /// Positions to tell (after the resync of the channel, if one is owed too).
    positions: Map<Arc<str>, (Arc<str>, u64)>,
    /// A presence round to announce.
    reannounce: Option<u64>,
    /// Answers to hand over (the routers' own, or the uplink's error 100
    /// for a request it could not send), in order.
    answers: VecDeque<ClusterMsg>,
}

/// A presence round in progress.
#[derive(Debug, Clone, Copy)]
struct Round {
    round: u64,
    /// Cores that have not announced yet.
    waiting: u64,
}

/// The uplink.
pub struct Uplink {
    cores: usize,
    links: Vec<RouterLink>,
    routes: Map<Arc<str>, Route>,
    owed: Vec<Owed>,
    round: u64,
    current: Option<Round>,
    round_wanted: bool,
    /// Messages held for full link queues before core batches wait.
    max_held: usize,
    /// Ownership over the view, not over the linked routers (etcd).
    strict: bool,
    metrics: Arc<Metrics>,
}

fn new_link(name: String) -> RouterLink {
    RouterLink {
        name,
        up: false,
        version: 0,
        draining: false,
        in_view: true,
        in_round: false,
        outbox: VecDeque::new(),
    }
}

impl Uplink {
    /// An uplink for `cores` cores and the routers named `routers` (none
    /// linked yet); `seed` seeds its hash tables.
    pub fn new(cores: usize, routers: Vec<String>, metrics: Arc<Metrics>, seed: u64) -> Uplink {
        Uplink::with_bound(cores, routers, metrics, seed, MAX_HELD)
    }

    /// The same, holding at most `max_held` messages for full link queues
    /// before it stops taking the cores' batches.
    pub fn with_bound(
        cores: usize,
        routers: Vec<String>,
        metrics: Arc<Metrics>,
        seed: u64,
        max_held: usize,
    ) -> Uplink {
        Uplink {
            cores,
            links: routers.into_iter().map(new_link).collect(),
            routes: seeded::map(seed),
            owed: (0..cores)
                .map(|c| Owed {
                    resync: seeded::set(seed ^ c as u64),
                    positions: seeded::map(seed ^ !(c as u64)),
                    reannounce: None,
                    answers: VecDeque::new(),
                })
                .collect(),
            round: 0,
            current: None,
            round_wanted: false,
            max_held: max_held.max(1),
            strict: false,
            metrics,
        }
    }

    /// Ownership over the membership view (etcd) rather than over the
    /// linked routers: set once, before any router is linked.
    pub fn strict(mut self) -> Uplink {
        self.strict = true;
        self
    }

    fn candidate(&self, i: usize) -> bool {
        let l = &self.links[i];
        l.in_view && !l.draining && (self.strict || l.up)
    }

    /// The owner of `key`: the highest rendezvous score among the linked
    /// routers that are not draining; in strict mode among the routers of
    /// the view, and `None` while that owner is not linked.
    pub fn owner(&self, key: &str) -> Option<usize> {
        (0..self.links.len())
            .filter(|i| self.candidate(*i))
            .max_by_key(|i| score(&self.links[*i].name, key))
            .filter(|i| self.links[*i].up)
    }

    /// A router discovered (its rendezvous name, the QUIC address it is
    /// listed by): a new slot, in the view, not linked yet.
    pub fn add_router(&mut self, name: String, io: &mut impl UplinkIo) -> usize {
        self.links.push(new_link(name));
        self.rebalance(io);
        self.links.len() - 1
    }

    /// Whether slot `router` can be given to another router: out of the
    /// view, unlinked, holding nothing (no channel names it as owner then).
    pub fn slot_free(&self, router: usize) -> bool {
        let l = &self.links[router];
        !l.in_view && !l.up && l.outbox.is_empty() && !self.routes.values().any(|r| r.owner == Some(router))
    }

    /// Gives the free slot `router` ([`Uplink::slot_free`]) to a newly
    /// discovered router named `name`, in the view: slots do not pile up as
    /// routers come and go with new addresses.
    pub fn reuse_router(&mut self, router: usize, name: String, io: &mut impl UplinkIo) {
        debug_assert!(self.slot_free(router));
        self.links[router] = new_link(name);
        self.rebalance(io);
    }

    /// Router `router` entered or left the membership view. Leaving moves
    /// its channels (to their next owner, with a resync) even while its
    /// link is still up.
    pub fn set_in_view(&mut self, router: usize, in_view: bool, io: &mut impl UplinkIo) {
        if self.links[router].in_view == in_view {
            return;
        }
        self.links[router].in_view = in_view;
        self.rebalance(io);
        self.round_wanted = true;
        self.settle(io);
    }

    /// Routers of the view whose link is down, in strict mode (their
    /// channels have no router here: the gateway's `/readyz` names them);
    /// none otherwise (their channels moved to the linked routers).
    pub fn unlinked_in_view(&self) -> Vec<&str> {
        if !self.strict {
            return Vec::new();
        }
        self.links.iter().filter(|l| l.in_view && !l.up).map(|l| l.name.as_str()).collect()
    }

    /// Whether any router link is up.
    pub fn routers_up(&self) -> usize {
        self.links.iter().filter(|l| l.up).count()
    }

    /// Channels with local subscribers.
    pub fn routes(&self) -> usize {
        self.routes.len()
    }

    /// Whether nothing is owed to any core or router and no presence round
    /// is wanted or running (the simulation's quiescence check).
    pub fn settled(&self) -> bool {
        self.owed.iter().all(|o| {
            o.resync.is_empty() && o.positions.is_empty() && o.reannounce.is_none() && o.answers.is_empty()
        }) && self.links.iter().all(|l| !l.up || l.outbox.is_empty())
            && self.current.is_none()
            && !self.round_wanted
    }

    /// Whether the uplink takes the cores' batches now (not while it holds
    /// [`MAX_HELD`] messages for full link queues).
    pub fn takes_core_batches(&self) -> bool {
        self.links.iter().map(|l| l.outbox.len()).sum::<usize>() < self.max_held
    }

    /// Sends `msg` to `router` behind what it holds already; a message that
    /// does not fit waits there.
    fn send(&mut self, router: usize, msg: ClusterMsg, io: &mut impl UplinkIo) {
        let l = &mut self.links[router];
        if !l.up {
            return;
        }
        if !l.outbox.is_empty() {
            l.outbox.push_back(msg);
            return;
        }
        if let Err(msg) = io.to_router(router, msg) {
            self.links[router].outbox.push_back(msg);
        }
    }

    /// Sends what `router` holds while its queue takes it.
    fn flush_outbox(&mut self, router: usize, io: &mut impl UplinkIo) {
        while let Some(msg) = self.links[router].outbox.pop_front() {
            if let Err(msg) = io.to_router(router, msg) {
                self.links[router].outbox.push_front(msg);
                return;
            }
        }
    }

    /// A batch of a core's messages.
    pub fn core_batch(&mut self, batch: Vec<UpMsg>, io: &mut impl UplinkIo) {
        for m in batch {
            self.core_message(m, io);
        }
        self.settle(io);
    }

    fn core_message(&mut self, m: UpMsg, io: &mut impl UplinkIo) {
        match m {
            UpMsg::Interest { core, channel, on } => self.interest(core, channel, on, io),
            UpMsg::Request(msg) => {
                let (Some(req), Some(key)) = (msg.request_id(), msg.channel()) else { return };
                match self.owner(key) {
                    Some(o) => self.send(o, msg, io),
                    None => self.fail(req, "no router available", io),
                }
            }
            UpMsg::Forward { key, msg } => {
                let Some(o) = self.owner(&key) else { return };
                if matches!(msg, ClusterMsg::Emulation { .. })
                    && self.links[o].version < proto::cluster::EMULATION_SINCE
                {
                    // A router that does not relay emulation would close
                    // the link on it: dropped here (counted).
                    self.metrics.user_commands_dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                self.send(o, msg, io);
            }
            UpMsg::Announced { core, round } => {
                if let Some(r) = &mut self.current
                    && r.round == round
                {
                    r.waiting &= !(1 << core);
                }
            }
        }
    }

    fn interest(&mut self, core: CoreId, channel: Arc<str>, on: bool, io: &mut impl UplinkIo) {
        let owner = self.owner(&channel);
        let route = self.routes.entry(channel.clone()).or_default();
        let before = route.cores;
        let bit = 1u64 << core;
        if on {
            route.cores |= bit;
        } else {
            route.cores &= !bit;
            route.blocked &= !bit;
            self.owed[core].resync.remove(&channel);
            self.owed[core].positions.remove(&channel);
        }
        let after = route.cores;
        if before == 0 && after != 0 {
            route.owner = owner;
            (route.epoch, route.last) = (None, 0);
            route.held.clear();
            if let Some(o) = owner {
                self.send(o, ClusterMsg::Subscribe { channels: vec![channel.to_string()] }, io);
            }
        } else if after == 0 {
            let owner = route.owner;
            self.routes.remove(&channel);
            if let Some(o) = owner {
                self.send(o, ClusterMsg::Unsubscribe { channels: vec![channel.to_string()] }, io);
            }
        }
    }

    /// Fails request `req` at its core (error 100): now, or as soon as the
    /// core's inbox has room.
    fn fail(&mut self, req: u64, why: &str, io: &mut impl UplinkIo) {
        let core = core_of(req);
        if core >= self.cores {
            return;
        }
        self.answer(core, ClusterMsg::RequestError { req, code: 100, message: why.into() }, io);
    }

    /// Hands an answer to its core: now, or as soon as the core's inbox has
    /// room (behind the answers it is owed already).
    fn answer(&mut self, core: CoreId, msg: ClusterMsg, io: &mut impl UplinkIo) {
        if !self.owed[core].answers.is_empty() {
            self.owed[core].answers.push_back(msg);
            return;
        }
        if let Err(DownMsg::Response(msg)) = io.to_core(core, DownMsg::Response(msg)) {
            self.metrics.core_queue_full.fetch_add(1, Ordering::Relaxed);
            self.owed[core].answers.push_back(msg);
        }
    }

    /// The subscribers of `channel` on the cores in `mask` must resync.
    fn resync(&mut self, channel: &Arc<str>, mask: u64, io: &mut impl UplinkIo) {
        self.metrics.resyncs.fetch_add(1, Ordering::Relaxed);
        for core in 0..self.cores {
            if mask & (1 << core) != 0 {
                self.owe_resync(core, channel);
            }
        }
        self.settle_cores(io);
    }

    fn owe_resync(&mut self, core: CoreId, channel: &Arc<str>) {
        if let Some(r) = self.routes.get_mut(channel) {
            r.blocked |= 1 << core;
        }
        self.owed[core].resync.insert(channel.clone());
    }

    /// Hands `msg` to `core`; a full inbox makes it a resync of `channel`
    /// owed to that core (or, with the planted bug, nothing at all).
    fn hand_or_owe(&mut self, core: CoreId, channel: &Arc<str>, msg: DownMsg, io: &mut impl UplinkIo) {
        if io.to_core(core, msg).is_err() {
            self.metrics.core_queue_full.fetch_add(1, Ordering::Relaxed);
            if !mutant::active(Mutant::DropDelivery) {
                self.owe_resync(core, channel);
            }
        }
    }

    /// Router `router`'s link is up (welcomed, protocol `version`).
    pub fn link_up(&mut self, router: usize, version: u16, io: &mut impl UplinkIo) {
        let l = &mut self.links[router];
        if !l.up {
            self.metrics.routers_up.fetch_add(1, Ordering::Relaxed);
        }
        l.up = true;
        l.version = version;
        l.draining = false;
        l.in_round = false;
        l.outbox.clear();
        if mutant::active(Mutant::NoResubscribe) {
            // The planted bug: the channels this router owns again are taken
            // as registered there, so neither the rebalance nor a snapshot
            // tells it.
            for (name, route) in self.routes.iter_mut() {
                if route.owner.is_none() || route.owner == Some(router) {
                    let owner = (0..self.links.len())
                        .filter(|i| self.links[*i].up && !self.links[*i].draining)
                        .max_by_key(|i| score(&self.links[*i].name, name));
                    if owner == Some(router) {
                        route.owner = owner;
                    }
                }
            }
        }
        self.rebalance(io);
        // A fresh link holds no registration: the router gets the whole set
        // it owns (the rebalance just moved those channels to it), ahead of
        // anything else.
        if !mutant::active(Mutant::NoResubscribe) {
            let channels: Vec<String> = self
                .routes
                .iter()
                .filter(|(_, route)| route.owner == Some(router))
                .map(|(n, _)| n.to_string())
                .collect();
            self.send(router, ClusterMsg::Snapshot { channels }, io);
        }
        self.round_wanted = true;
        self.settle(io);
    }

    /// Router `router`'s link is gone.
    pub fn link_down(&mut self, router: usize, io: &mut impl UplinkIo) {
        let l = &mut self.links[router];
        if !l.up {
            return; // a failed attempt, not a lost link
        }
        self.metrics.routers_up.fetch_sub(1, Ordering::Relaxed);
        l.up = false;
        l.draining = false;
        l.in_round = false;
        // Requests waiting for it will not be answered: fail them now.
        let held = std::mem::take(&mut l.outbox);
        for m in held {
            if let Some(req) = m.request_id() {
                self.fail(req, "router link lost", io);
            }
        }
        // Its channels' subscribers may have missed publications; rebalance
        // moves the channels to their next owner and resyncs them.
        for r in self.routes.values_mut() {
            if r.owner == Some(router) {
                r.owner = None;
            }
        }
        let orphaned: Vec<(Arc<str>, u64)> = self
            .routes
            .iter()
            .filter(|(_, r)| r.owner.is_none())
            .map(|(n, r)| (n.clone(), r.cores))
            .collect();
        for (name, mask) in orphaned {
            self.resync(&name, mask, io);
        }
        self.rebalance(io);
        self.round_wanted = true;
        self.settle(io);
    }

    /// A message on router `router`'s control stream.
    pub fn control(&mut self, router: usize, msg: ClusterMsg, io: &mut impl UplinkIo) {
        match msg {
            ClusterMsg::Drain => {
                // The router is going away: its channels move to their next
                // owner now (a new epoch there: subscribers resync and learn
                // `recovered: false` rather than miss anything silently).
                tracing::info!(router = %self.links[router].name, "router draining: moving its channels");
                self.links[router].draining = true;
                self.rebalance(io);
                self.round_wanted = true;
            }
            ClusterMsg::Resync { channels } => {
                for c in channels {
                    let Some((name, r)) = self.routes.get_key_value(c.as_str()) else { continue };
                    if r.owner != Some(router) {
                        continue;
                    }
                    let (name, mask) = (name.clone(), r.cores);
                    self.resync(&name, mask, io);
                }
            }
            ClusterMsg::Heartbeat { .. } | ClusterMsg::Welcome { .. } => {}
            ClusterMsg::Emulation { ref node, .. } => {
                // Another gateway process read an emulated session's
                // commands: to the core its node names (bounded like the
                // user commands).
                let core = node.rsplit_once('/').and_then(|(_, c)| c.parse::<usize>().ok());
                match core.filter(|c| *c < self.cores) {
                    Some(core) if self.owed[core].answers.len() < MAX_OWED_USER_COMMANDS => {
                        self.answer(core, msg, io)
                    }
                    _ => {
                        self.metrics.user_commands_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            ref m if let Some((user, _)) = m.user_target() => {
                // The user's connected sessions live on the user's core; on
                // its queue behind the answers owed to it.
                let core = crate::core::reading::core_of_user(user, self.cores);
                if self.owed[core].answers.len() >= MAX_OWED_USER_COMMANDS {
                    self.metrics.user_commands_dropped.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.answer(core, msg, io);
                }
            }
            other => {
                let Some(req) = other.request_id().filter(|_| other.is_answer()) else { return };
                let core = core_of(req);
                if core < self.cores {
                    self.answer(core, other, io);
                }
            }
        }
        self.settle(io);
    }

    /// Re-evaluates every channel's owner after a router came or went.
    fn rebalance(&mut self, io: &mut impl UplinkIo) {
        let moves: Vec<Move> = self
            .routes
            .iter()
            .filter_map(|(name, r)| {
                let new = self.owner(name);
                (new != r.owner).then(|| (name.clone(), r.owner, new, r.cores))
            })
            .collect();
        let mut subscribe: Vec<Vec<String>> = vec![Vec::new(); self.links.len()];
        let mut unsubscribe: Vec<Vec<String>> = vec![Vec::new(); self.links.len()];
        for (name, old, new, mask) in moves {
            if let Some(o) = old.filter(|o| self.links[*o].up) {
                unsubscribe[o].push(name.to_string());
            }
            if let Some(n) = new {
                subscribe[n].push(name.to_string());
            }
            if let Some(route) = self.routes.get_mut(&name) {
                route.owner = new;
                (route.epoch, route.last) = (None, 0);
                route.held.clear();
            }
            if old.is_some() {
                self.resync(&name, mask, io);
            }
        }
        for (o, channels) in unsubscribe.into_iter().enumerate() {
            if !channels.is_empty() {
                self.send(o, ClusterMsg::Unsubscribe { channels }, io);
            }
        }
        for (n, channels) in subscribe.into_iter().enumerate() {
            if !channels.is_empty() {
                self.send(n, ClusterMsg::Subscribe { channels }, io);
            }
        }
    }

    /// Messages of router `router`'s delivery stream (deliveries, pushes,
    /// positions). Only the channel's owner is listened to: a router the
    /// channel moved away from may still have deliveries in flight.
    pub fn deliveries(&mut self, router: usize, msgs: Vec<ClusterMsg>, io: &mut impl UplinkIo) {
        let mut i = 0;
        while i < msgs.len() {
            if let ClusterMsg::Stamp { unix_micros } = msgs[i] {
                // The router's link writer wrote what follows at this time.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64);
                self.metrics.hop_link.record_us(now.saturating_sub(unix_micros));
                i += 1;
                continue;
            }
            let Some(channel) = msgs[i].channel() else {
                i += 1;
                continue;
            };
            let Some((name, route)) = self.routes.get_key_value(channel) else {
                i += 1;
                continue;
            };
            if route.owner != Some(router) {
                i += 1;
                continue;
            }
            let name = name.clone();
            let targets = route.cores & !route.blocked;
            let blocked = route.cores & route.blocked;
            match &msgs[i] {
                ClusterMsg::Position { epoch, top, .. } => {
                    let epoch: Arc<str> = Arc::from(epoch.as_str());
                    if let Some(r) = self.routes.get_mut(&name) {
                        // A second position of the same epoch (the answer to
                        // a snapshot after a subscribe) never moves `last`
                        // back past what datagram copies handed over.
                        if r.epoch.as_deref() == Some(&*epoch) {
                            r.last = r.last.max(*top);
                        } else {
                            (r.epoch, r.last) = (Some(epoch.clone()), *top);
                            r.held.clear();
                        }
                    }
                    for core in cores_of(blocked, self.cores) {
                        // Behind what it is owed already: the newer position
                        // replaces the older.
                        self.owed[core].positions.insert(name.clone(), (epoch.clone(), *top));
                    }
                    for core in cores_of(targets, self.cores) {
                        let msg =
                            DownMsg::Position { channel: name.clone(), epoch: epoch.clone(), top: *top };
                        if io.to_core(core, msg).is_err() {
                            // Told later, ahead of the channel's next deliveries.
                            self.metrics.core_queue_full.fetch_add(1, Ordering::Relaxed);
                            self.owed[core].positions.insert(name.clone(), (epoch.clone(), *top));
                            if let Some(r) = self.routes.get_mut(&name) {
                                r.blocked |= 1 << core;
                            }
                        }
                    }
                    i += 1;
                }
                ClusterMsg::Push { push, .. } => {
                    let frame = SharedFrame::text_lines([push.as_ref()]).into_bytes();
                    for core in cores_of(targets, self.cores) {
                        // Outside the offset stream: a full inbox drops it (counted).
                        let msg = DownMsg::Push { channel: name.clone(), frame: frame.clone() };
                        if io.to_core(core, msg).is_err() {
                            self.metrics.core_queue_full.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                }
                ClusterMsg::Deliver { epoch, publication, .. }
                    if route.delivered(epoch, publication.offset) =>
                {
                    // Handed over already, from its datagram copy.
                    self.metrics.duplicate_copies.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                ClusterMsg::Deliver { .. } => {
                    // A core still owed something of this channel gets none
                    // of its deliveries until then: it is owed a resync too.
                    for core in cores_of(blocked, self.cores) {
                        if !mutant::active(Mutant::DropDelivery) {
                            self.owe_resync(core, &name);
                        }
                    }
                    let (j, held) = self.deliver_run(&name, &msgs, i, targets, io);
                    i = j;
                    if held {
                        self.release_held(&name, io);
                    }
                }
                _ => i += 1,
            }
        }
        self.settle(io);
    }

    /// Datagram copies of a router's deliveries (the WAN's fast path,
    /// `uplink.datagram_copies`): a copy is handed over only when it is the
    /// very next publication of its channel in the epoch the uplink follows
    /// (the stream then skips it); anything else — an unknown position, a
    /// gap, another epoch — is left to the ordered stream, so order and the
    /// once-only rule never depend on which copy came first.
    pub fn datagram_deliveries(&mut self, router: usize, msgs: Vec<ClusterMsg>, io: &mut impl UplinkIo) {
        let mut i = 0;
        while i < msgs.len() {
            let ClusterMsg::Deliver { channel, epoch, publication } = &msgs[i] else {
                i += 1;
                continue;
            };
            let Some((name, route)) = self.routes.get_key_value(channel.as_str()) else {
                i += 1;
                continue;
            };
            let ours = route.owner == Some(router)
                && route.last != 0
                && publication.offset > route.last
                && route.epoch.as_deref() == Some(epoch.as_str());
            if !ours {
                i += 1;
                continue;
            }
            let name = name.clone();
            if publication.offset > route.last + 1 {
                // Ahead of a publication still on its way: held until it comes.
                let offset = publication.offset;
                if let Some(r) = self.routes.get_mut(&name) {
                    let held = &mut r.held;
                    held.insert(offset, msgs[i].clone());
                    if held.len() > MAX_HELD_COPIES {
                        held.pop_last();
                    }
                }
                i += 1;
                continue;
            }
            let (j, held) = self.deliver_from(&name, &msgs, i, io);
            self.metrics.datagram_deliveries.fetch_add((j - i) as u64, Ordering::Relaxed);
            i = j;
            if held {
                self.release_held(&name, io);
            }
        }
        self.settle(io);
    }

    /// Hands over the run at `msgs[i]` as the stream path does (a core owed
    /// something of the channel is owed a resync instead); the index after
    /// it, and whether copies are held for the channel.
    fn deliver_from(
        &mut self,
        name: &Arc<str>,
        msgs: &[ClusterMsg],
        i: usize,
        io: &mut impl UplinkIo,
    ) -> (usize, bool) {
        let Some(route) = self.routes.get(name) else { return (i + 1, false) };
        let (targets, blocked) = (route.cores & !route.blocked, route.cores & route.blocked);
        for core in cores_of(blocked, self.cores) {
            self.owe_resync(core, name);
        }
        self.deliver_run(name, msgs, i, targets, io)
    }

    /// Hands over the held datagram copies of `name` that now come next,
    /// and forgets those the stream brought already.
    fn release_held(&mut self, name: &Arc<str>, io: &mut impl UplinkIo) {
        loop {
            let Some(route) = self.routes.get_mut(name) else { return };
            let last = route.last;
            let held = &mut route.held;
            while held.first_key_value().is_some_and(|(o, _)| *o <= last) {
                held.pop_first();
            }
            let mut run = Vec::new();
            while let Some(entry) = held.first_entry() {
                if *entry.key() != last + 1 + run.len() as u64 {
                    break;
                }
                run.push(entry.remove());
            }
            if run.is_empty() {
                return;
            }
            let n = run.len();
            self.deliver_from(name, &run, 0, io);
            self.metrics.datagram_deliveries.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Frames the run of consecutive publications of one channel and epoch
    /// starting at `msgs[i]` once, and hands the frame to `targets`;
    /// returns the index after the run, and whether datagram copies are
    /// held for the channel (to release, now that `last` moved).
    fn deliver_run(
        &mut self,
        name: &Arc<str>,
        msgs: &[ClusterMsg],
        i: usize,
        targets: u64,
        io: &mut impl UplinkIo,
    ) -> (usize, bool) {
        let ClusterMsg::Deliver { epoch: run_epoch, publication: p0, .. } = &msgs[i] else {
            return (i + 1, false);
        };
        let (first, mut last) = (p0.offset, p0.offset);
        let mut pushes: Vec<Vec<u8>> = Vec::new();
        let mut size = 0;
        let mut j = i;
        while j < msgs.len() {
            let ClusterMsg::Deliver { channel, epoch, publication } = &msgs[j] else { break };
            let consecutive = j == i
                || (first == 0 && publication.offset == 0)
                || (first != 0 && publication.offset == last + 1);
            if **channel != **name || epoch != run_epoch || !consecutive || size > MAX_PACKED_FRAME {
                break;
            }
            last = publication.offset;
            let push = pub_push(channel, publication);
            size += push.len() + 1;
            pushes.push(push);
            j += 1;
        }
        self.metrics.publications_in.fetch_add((j - i) as u64, Ordering::Relaxed);
        let Some(route) = self.routes.get_mut(&**name) else { return (j, false) };
        let epoch = match &route.epoch {
            Some(e) if **e == **run_epoch => e.clone(),
            _ => {
                let e: Arc<str> = Arc::from(run_epoch.as_str());
                route.epoch = Some(e.clone());
                // Copies held for the old epoch mean nothing in the new one.
                route.held.clear();
                e
            }
        };
        route.last = last;
        let held = !route.held.is_empty();
        let frame = SharedFrame::text_lines(pushes.iter().map(|p| p.as_slice())).into_bytes();
        self.metrics.frames_encoded.fetch_add(1, Ordering::Relaxed);
        for core in cores_of(targets, self.cores) {
            let msg = DownMsg::Deliver {
                channel: name.clone(),
                epoch: epoch.clone(),
                first,
                last,
                frame: frame.clone(),
                at: std::time::Instant::now(),
            };
            self.hand_or_owe(core, name, msg, io);
        }
        (j, held)
    }

    /// Retries what is owed (call it on a timer too: a full inbox or link
    /// queue gives no signal when it drains).
    pub fn tick(&mut self, io: &mut impl UplinkIo) {
        self.settle(io);
    }

    fn settle(&mut self, io: &mut impl UplinkIo) {
        self.settle_cores(io);
        self.settle_routers(io);
        self.settle_round(io);
    }

    /// Hands each core what it is owed, while its inbox takes it.
    fn settle_cores(&mut self, io: &mut impl UplinkIo) {
        for core in 0..self.cores {
            while let Some(msg) = self.owed[core].answers.pop_front() {
                if let Err(DownMsg::Response(msg)) = io.to_core(core, DownMsg::Response(msg)) {
                    self.owed[core].answers.push_front(msg);
                    break;
                }
            }
            let mut channels: Vec<Arc<str>> = self.owed[core].resync.iter().cloned().collect();
            channels.extend(
                self.owed[core].positions.keys().filter(|c| !self.owed[core].resync.contains(*c)).cloned(),
            );
            for channel in channels {
                if self.owed[core].resync.contains(&channel) {
                    if io.to_core(core, DownMsg::Resync { channel: channel.clone() }).is_err() {
                        break;
                    }
                    self.owed[core].resync.remove(&channel);
                }
                if let Some((epoch, top)) = self.owed[core].positions.get(&channel).cloned() {
                    let msg = DownMsg::Position { channel: channel.clone(), epoch, top };
                    if io.to_core(core, msg).is_err() {
                        break;
                    }
                    self.owed[core].positions.remove(&channel);
                }
                if let Some(r) = self.routes.get_mut(&channel) {
                    r.blocked &= !(1 << core);
                }
            }
            if let Some(round) = self.owed[core].reannounce
                && io.to_core(core, DownMsg::Reannounce { round }).is_ok()
            {
                self.owed[core].reannounce = None;
            }
        }
    }

    /// Sends each router what it holds, while its queue takes it.
    fn settle_routers(&mut self, io: &mut impl UplinkIo) {
        for r in 0..self.links.len() {
            if self.links[r].up {
                self.flush_outbox(r, io);
            }
        }
    }

    /// Ends the presence round once every core announced; starts one when
    /// wanted and none runs.
    fn settle_round(&mut self, io: &mut impl UplinkIo) {
        if let Some(r) = self.current
            && r.waiting == 0
        {
            self.current = None;
            for l in 0..self.links.len() {
                if self.links[l].up && self.links[l].in_round {
                    self.links[l].in_round = false;
                    self.send(l, ClusterMsg::PresenceEnd { round: r.round }, io);
                }
            }
        }
        if !self.round_wanted || self.current.is_some() {
            return;
        }
        self.round += 1;
        let round = self.round;
        for l in 0..self.links.len() {
            if self.links[l].up && self.links[l].version >= PRESENCE_ROUNDS_SINCE {
                self.links[l].in_round = true;
                self.send(l, ClusterMsg::PresenceBegin { round }, io);
            }
        }
        self.round_wanted = false;
        let waiting = if self.cores >= 64 { u64::MAX } else { (1u64 << self.cores) - 1 };
        self.current = Some(Round { round, waiting });
        for core in 0..self.cores {
            self.owed[core].reannounce = Some(round);
        }
        self.settle_cores(io);
    }
}

/// A channel whose owner changes: (name, old owner, new owner, cores).
type Move = (Arc<str>, Option<usize>, Option<usize>, u64);

/// The cores whose bits are set in `mask`.
fn cores_of(mask: u64, cores: usize) -> impl Iterator<Item = CoreId> {
    (0..cores).filter(move |c| mask & (1 << c) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::client::Publication;

    /// Core inboxes and link queues that take everything, recorded.
    #[derive(Default)]
    struct Recorder {
        cores: Vec<DownMsg>,
        routers: Vec<ClusterMsg>,
    }

    impl UplinkIo for Recorder {
        fn to_router(&mut self, _: usize, msg: ClusterMsg) -> Result<(), ClusterMsg> {
            self.routers.push(msg);
            Ok(())
        }
        fn to_core(&mut self, _: CoreId, msg: DownMsg) -> Result<(), DownMsg> {
            self.cores.push(msg);
            Ok(())
        }
    }

    fn deliver(epoch: &str, offset: u64) -> ClusterMsg {
        let publication =
            Publication { offset, data: bytes::Bytes::from_static(b"{}"), info: None, tags: None };
        ClusterMsg::Deliver { channel: "chat:x".into(), epoch: epoch.into(), publication }
    }

    /// What the core was handed: (first, last) of each delivery.
    fn handed(io: &mut Recorder) -> Vec<(u64, u64)> {
        io.cores
            .drain(..)
            .filter_map(|m| match m {
                DownMsg::Deliver { first, last, .. } => Some((first, last)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn datagram_copies_are_taken_only_in_order_and_handed_over_once() {
        let metrics = Arc::new(Metrics::new(1));
        let mut up = Uplink::new(1, vec!["r0".into()], metrics.clone(), 1);
        let mut io = Recorder::default();
        up.link_up(0, proto::cluster::PROTOCOL_VERSION, &mut io);
        up.core_batch(vec![UpMsg::Interest { core: 0, channel: "chat:x".into(), on: true }], &mut io);
        // Before the stream told a position, a copy is not trusted.
        up.datagram_deliveries(0, vec![deliver("E", 6)], &mut io);
        assert!(handed(&mut io).is_empty());
        up.deliveries(
            0,
            vec![ClusterMsg::Position { channel: "chat:x".into(), epoch: "E".into(), top: 5 }],
            &mut io,
        );
        io.cores.clear();
        // 6 by datagram first; the stream's 6 is skipped, its 7 handed over.
        up.datagram_deliveries(0, vec![deliver("E", 6)], &mut io);
        up.deliveries(0, vec![deliver("E", 6), deliver("E", 7)], &mut io);
        assert_eq!(handed(&mut io), vec![(6, 6), (7, 7)]);
        // A copy of another epoch, or unpositioned: left to the stream; one
        // past a gap is held until the publication before it comes.
        up.datagram_deliveries(0, vec![deliver("E", 9), deliver("F", 8), deliver("E", 0)], &mut io);
        assert!(handed(&mut io).is_empty());
        up.deliveries(0, vec![deliver("E", 8)], &mut io);
        assert_eq!(handed(&mut io), vec![(8, 8), (9, 9)], "8 from the stream releases the held 9");
        up.deliveries(0, vec![deliver("E", 9)], &mut io);
        assert!(handed(&mut io).is_empty(), "the stream's 9 came second");
        // Two consecutive copies in one datagram make one run.
        up.datagram_deliveries(0, vec![deliver("E", 10), deliver("E", 11)], &mut io);
        up.deliveries(0, vec![deliver("E", 10), deliver("E", 11), deliver("E", 12)], &mut io);
        assert_eq!(handed(&mut io), vec![(10, 11), (12, 12)]);
        assert_eq!(metrics.datagram_deliveries.load(Ordering::Relaxed), 4);
        assert_eq!(metrics.duplicate_copies.load(Ordering::Relaxed), 4);
        // Copies out of order: 14 and 15 wait for 13, then all go at once.
        up.datagram_deliveries(0, vec![deliver("E", 15)], &mut io);
        up.datagram_deliveries(0, vec![deliver("E", 14)], &mut io);
        assert!(handed(&mut io).is_empty());
        up.datagram_deliveries(0, vec![deliver("E", 13)], &mut io);
        assert_eq!(handed(&mut io), vec![(13, 13), (14, 15)]);
        // A copy from a router that does not own the channel: ignored.
        up.datagram_deliveries(1, vec![deliver("E", 16)], &mut io);
        assert!(handed(&mut io).is_empty());
    }

    #[test]
    fn a_slot_is_reused_only_once_its_router_left_for_good() {
        let metrics = Arc::new(Metrics::new(1));
        let mut up = Uplink::new(1, Vec::new(), metrics, 1).strict();
        let mut io = Recorder::default();
        let r0 = up.add_router("r0".into(), &mut io);
        up.link_up(r0, proto::cluster::PROTOCOL_VERSION, &mut io);
        up.core_batch(vec![UpMsg::Interest { core: 0, channel: "chat:x".into(), on: true }], &mut io);
        assert_eq!(up.owner("chat:x"), Some(r0));
        assert!(!up.slot_free(r0), "in the view and linked");
        up.set_in_view(r0, false, &mut io);
        assert!(!up.slot_free(r0), "still linked");
        up.link_down(r0, &mut io);
        assert!(up.slot_free(r0));
        up.reuse_router(r0, "r1".into(), &mut io);
        up.link_up(r0, proto::cluster::PROTOCOL_VERSION, &mut io);
        assert_eq!(up.owner("chat:x"), Some(r0), "the newcomer owns it in that slot");
        assert_eq!(up.unlinked_in_view(), Vec::<&str>::new());
    }
}
