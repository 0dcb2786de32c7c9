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
//! subscribers are told to resync, so nothing is lost silently.
//!
//! Nothing is lost at a full queue either:
//! - a delivery (or position) that a full core inbox refuses becomes a
//!   resync of that channel owed to that core, sent as soon as the inbox has
//!   room; until then that core gets no more of the channel (it would only
//!   see a gap);
//! - an answer a full core inbox refuses becomes a failure owed to the core
//!   (error 100 to the client), so no request waits for its deadline;
//! - interest a full link queue refuses is reconciled by sending the
//!   router the whole interest set it should hold ([`ClusterMsg::Snapshot`]);
//! - a presence fact a full link queue refuses is reconciled by a presence
//!   round: every router is told a round begins, every core announces every
//!   fact it holds again, and the round's end makes each router drop what
//!   this gateway did not confirm. Rounds also follow every change of the
//!   set of live routers, so facts follow their keys to the new owners and
//!   the old owners forget them.
//!
//! The IO shell ([`quic`]) owns the QUIC connections and the core inboxes
//! behind [`UplinkIo`]; the simulation drives the same machine through its
//! own.
//!
//! - [`quic`]: the tokio + quinn shell.

pub mod quic;

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

/// Largest frame the uplink packs publications into (well under the 1 MiB
/// centrifuge-python accepts).
pub const MAX_PACKED_FRAME: usize = 256 * 1024;

/// Where the uplink's messages go.
pub trait UplinkIo {
    /// Queues `msg` on router `router`'s link; false when the link is down
    /// or its queue is full (the message is dropped: the caller reconciles).
    fn to_router(&mut self, router: usize, msg: ClusterMsg) -> bool;
    /// Hands `msg` to core `core`'s inbox; false when it is full (the
    /// message is dropped: the caller owes the core what it stood for).
    fn to_core(&mut self, core: CoreId, msg: DownMsg) -> bool;
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
    /// Its interest registrations may differ from the routes: send it the
    /// whole set it should hold.
    needs_snapshot: bool,
    /// It was told that the current presence round began.
    in_round: bool,
    /// A round's end it still has to be told.
    owed_end: Option<u64>,
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
}

/// What one core is owed.
#[derive(Debug)]
struct Owed {
    /// Channels to resync.
    resync: Set<Arc<str>>,
    /// A presence round to announce.
    reannounce: Option<u64>,
    /// Requests to fail (their answers could not be handed over).
    failures: Vec<u64>,
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
    metrics: Arc<Metrics>,
}

impl Uplink {
    /// An uplink for `cores` cores and the routers named `routers` (none
    /// linked yet); `seed` seeds its hash tables.
    pub fn new(cores: usize, routers: Vec<String>, metrics: Arc<Metrics>, seed: u64) -> Uplink {
        Uplink {
            cores,
            links: routers
                .into_iter()
                .map(|name| RouterLink {
                    name,
                    up: false,
                    version: 0,
                    draining: false,
                    needs_snapshot: false,
                    in_round: false,
                    owed_end: None,
                })
                .collect(),
            routes: seeded::map(seed),
            owed: (0..cores)
                .map(|c| Owed {
                    resync: seeded::set(seed ^ c as u64),
                    reannounce: None,
                    failures: Vec::new(),
                })
                .collect(),
            round: 0,
            current: None,
            round_wanted: false,
            metrics,
        }
    }

    fn live(&self, i: usize) -> bool {
        self.links[i].up && !self.links[i].draining
    }

    /// The owner of `key` among the live routers.
    pub fn owner(&self, key: &str) -> Option<usize> {
        (0..self.links.len()).filter(|i| self.live(*i)).max_by_key(|i| score(&self.links[*i].name, key))
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
        self.owed.iter().all(|o| o.resync.is_empty() && o.reannounce.is_none() && o.failures.is_empty())
            && self.links.iter().all(|l| !l.up || (!l.needs_snapshot && l.owed_end.is_none()))
            && self.current.is_none()
            && !self.round_wanted
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
                let sent = match self.owner(key) {
                    Some(o) => io.to_router(o, msg),
                    None => false,
                };
                if !sent {
                    self.fail(req, "no router available", io);
                }
            }
            UpMsg::Forward { key, msg } => {
                let Some(o) = self.owner(&key) else { return };
                let offline = matches!(msg, ClusterMsg::UserOffline { .. });
                let planted = offline && mutant::active(Mutant::LoseOffline);
                if !(io.to_router(o, msg) || planted) {
                    self.round_wanted = true;
                }
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
        }
        let after = route.cores;
        if before == 0 && after != 0 {
            route.owner = owner;
            route.epoch = None;
            if let Some(o) = owner
                && !io.to_router(o, ClusterMsg::Subscribe { channels: vec![channel.to_string()] })
            {
                self.links[o].needs_snapshot = true;
            }
        } else if after == 0 {
            let owner = route.owner;
            self.routes.remove(&channel);
            if let Some(o) = owner
                && self.links[o].up
                && !io.to_router(o, ClusterMsg::Unsubscribe { channels: vec![channel.to_string()] })
            {
                self.links[o].needs_snapshot = true;
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
        let msg = DownMsg::Response(ClusterMsg::RequestError { req, code: 100, message: why.into() });
        if !io.to_core(core, msg) {
            self.metrics.core_queue_full.fetch_add(1, Ordering::Relaxed);
            self.owed[core].failures.push(req);
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
        if !io.to_core(core, msg) {
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
        l.owed_end = None;
        // A fresh link holds no registration: the router gets the whole set
        // it owns (after the rebalance below moved those channels to it).
        l.needs_snapshot = true;
        self.rebalance(io);
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
        l.needs_snapshot = false;
        l.in_round = false;
        l.owed_end = None;
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
            ClusterMsg::DisconnectUser { .. } | ClusterMsg::UnsubscribeUser { .. } => {}
            other => {
                let Some(req) = other.request_id().filter(|_| other.is_answer()) else { return };
                let core = core_of(req);
                if core >= self.cores {
                    return;
                }
                if !io.to_core(core, DownMsg::Response(other)) {
                    self.metrics.core_queue_full.fetch_add(1, Ordering::Relaxed);
                    self.owed[core].failures.push(req);
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
                route.epoch = None;
            }
            if old.is_some() {
                self.resync(&name, mask, io);
            }
        }
        for (o, channels) in unsubscribe.into_iter().enumerate() {
            if !channels.is_empty() && !io.to_router(o, ClusterMsg::Unsubscribe { channels }) {
                self.links[o].needs_snapshot = true;
            }
        }
        for (n, channels) in subscribe.into_iter().enumerate() {
            if channels.is_empty() || self.links[n].needs_snapshot {
                continue; // the snapshot will carry them
            }
            if !io.to_router(n, ClusterMsg::Subscribe { channels }) {
                self.links[n].needs_snapshot = true;
            }
        }
    }

    /// Messages of router `router`'s delivery stream (deliveries, pushes,
    /// positions). Only the channel's owner is listened to: a router the
    /// channel moved away from may still have deliveries in flight.
    pub fn deliveries(&mut self, router: usize, msgs: Vec<ClusterMsg>, io: &mut impl UplinkIo) {
        let mut i = 0;
        while i < msgs.len() {
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
            match &msgs[i] {
                ClusterMsg::Position { epoch, top, .. } => {
                    let epoch: Arc<str> = Arc::from(epoch.as_str());
                    for core in cores_of(targets, self.cores) {
                        let msg =
                            DownMsg::Position { channel: name.clone(), epoch: epoch.clone(), top: *top };
                        self.hand_or_owe(core, &name, msg, io);
                    }
                    i += 1;
                }
                ClusterMsg::Push { push, .. } => {
                    let frame = SharedFrame::text_lines([push.as_ref()]).into_bytes();
                    for core in cores_of(targets, self.cores) {
                        // Outside the offset stream: a full inbox drops it (counted).
                        let msg = DownMsg::Push { channel: name.clone(), frame: frame.clone() };
                        if !io.to_core(core, msg) {
                            self.metrics.core_queue_full.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                }
                ClusterMsg::Deliver { .. } => {
                    i = self.deliver_run(&name, &msgs, i, targets, io);
                }
                _ => i += 1,
            }
        }
        self.settle(io);
    }

    /// Frames the run of consecutive publications of one channel and epoch
    /// starting at `msgs[i]` once, and hands the frame to `targets`;
    /// returns the index after the run.
    fn deliver_run(
        &mut self,
        name: &Arc<str>,
        msgs: &[ClusterMsg],
        i: usize,
        targets: u64,
        io: &mut impl UplinkIo,
    ) -> usize {
        let ClusterMsg::Deliver { epoch: run_epoch, publication: p0, .. } = &msgs[i] else { return i + 1 };
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
        let Some(route) = self.routes.get_mut(&**name) else { return j };
        let epoch = match &route.epoch {
            Some(e) if **e == **run_epoch => e.clone(),
            _ => {
                let e: Arc<str> = Arc::from(run_epoch.as_str());
                route.epoch = Some(e.clone());
                e
            }
        };
        let frame = SharedFrame::text_lines(pushes.iter().map(|p| p.as_slice())).into_bytes();
        self.metrics.frames_encoded.fetch_add(1, Ordering::Relaxed);
        for core in cores_of(targets, self.cores) {
            let msg = DownMsg::Deliver {
                channel: name.clone(),
                epoch: epoch.clone(),
                first,
                last,
                frame: frame.clone(),
            };
            self.hand_or_owe(core, name, msg, io);
        }
        j
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
            while let Some(req) = self.owed[core].failures.last().copied() {
                let msg = DownMsg::Response(ClusterMsg::RequestError {
                    req,
                    code: 100,
                    message: "gateway busy".into(),
                });
                if !io.to_core(core, msg) {
                    break;
                }
                self.owed[core].failures.pop();
            }
            if !self.owed[core].resync.is_empty() {
                let channels: Vec<Arc<str>> = self.owed[core].resync.iter().cloned().collect();
                for channel in channels {
                    if !io.to_core(core, DownMsg::Resync { channel: channel.clone() }) {
                        break;
                    }
                    self.owed[core].resync.remove(&channel);
                    if let Some(r) = self.routes.get_mut(&channel) {
                        r.blocked &= !(1 << core);
                    }
                }
            }
            if let Some(round) = self.owed[core].reannounce
                && io.to_core(core, DownMsg::Reannounce { round })
            {
                self.owed[core].reannounce = None;
            }
        }
    }

    /// Sends each router the interest snapshot or round end it is owed.
    fn settle_routers(&mut self, io: &mut impl UplinkIo) {
        for r in 0..self.links.len() {
            if !self.links[r].up {
                continue;
            }
            if self.links[r].needs_snapshot {
                if mutant::active(Mutant::NoResubscribe) {
                    self.links[r].needs_snapshot = false;
                    continue;
                }
                let channels: Vec<String> = self
                    .routes
                    .iter()
                    .filter(|(_, route)| route.owner == Some(r))
                    .map(|(n, _)| n.to_string())
                    .collect();
                if io.to_router(r, ClusterMsg::Snapshot { channels }) {
                    self.links[r].needs_snapshot = false;
                }
            }
            if let Some(round) = self.links[r].owed_end
                && io.to_router(r, ClusterMsg::PresenceEnd { round })
            {
                self.links[r].owed_end = None;
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
                    if !io.to_router(l, ClusterMsg::PresenceEnd { round: r.round }) {
                        self.links[l].owed_end = Some(r.round);
                    }
                }
            }
        }
        if !self.round_wanted || self.current.is_some() {
            return;
        }
        let rounds: Vec<usize> = (0..self.links.len())
            .filter(|l| self.links[*l].up && self.links[*l].version >= PRESENCE_ROUNDS_SINCE)
            .collect();
        if rounds.iter().any(|l| self.links[*l].owed_end.is_some()) {
            return; // the last round's end goes first
        }
        self.round += 1;
        let round = self.round;
        for &l in &rounds {
            if !io.to_router(l, ClusterMsg::PresenceBegin { round }) {
                // Not begun everywhere: try again on the next tick (a router
                // that began it just begins the next one).
                for &k in &rounds {
                    self.links[k].in_round = false;
                }
                return;
            }
            self.links[l].in_round = true;
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
