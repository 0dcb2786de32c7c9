//! Channel shards: each owns the channels whose stable hash maps to it, so
//! no lock is taken on the publish path. A shard orders publications and
//! sends each one exactly once to every gateway with online subscribers.
//!
//! A [`Shard`] is a state machine without IO: it takes commands
//! ([`Shard::handle`]) and ticks ([`Shard::tick`]), each with an explicit
//! `now`, and sends through the gateways' link queues it was given
//! ([`LinkTx`]: a tokio channel in production, a bounded queue in the
//! simulation). A full link queue drops the message and the shard makes up
//! for it: a delivery becomes a resync of that channel for that gateway,
//! sent as soon as the queue has room.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::client::ReplyError;
use proto::client::reply::{join_push, leave_push};
use proto::cluster::ClusterMsg;
use proto::membership::View;
use proto::namespace::Namespaces;
use proto::seeded::{self, Map, Set};
use proto::timer_wheel::TimerWheel;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot};

use crate::channel::{ChannelState, PublishOutcome, StreamOptions};
use crate::presence::{ChannelPresence, PresenceChange, UserPresence};

/// Link index of a connected gateway.
pub type GatewayId = u32;

/// Router-wide counters (Prometheus text is rendered from these).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Publications ordered.
    pub publications: AtomicU64,
    /// Router → gateway deliveries sent (one per interested gateway per publication).
    pub gateway_sends: AtomicU64,
    /// Deliveries that found a gateway's queue full (the gateway is told to resync).
    pub gateway_queue_full: AtomicU64,
    /// Malformed link frames.
    pub link_errors: AtomicU64,
    /// Join/leave pushes sent to gateways (outside the offset stream).
    pub pushes: AtomicU64,
    /// Gateways evicted for silence (no message within `evict_secs`).
    pub evictions: AtomicU64,
    /// API publish → its shard (the shard's queue).
    pub hop_api_to_shard: proto::hist::Histogram,
    /// A delivery queued by a shard → written to its gateway's link (the
    /// oldest of each batch written).
    pub hop_shard_to_link_write: proto::hist::Histogram,
    /// Emulated sessions' commands relayed to the gateway that holds them.
    pub emulations_relayed: AtomicU64,
    /// Ditto, dropped: that gateway is not linked here, too old, or full.
    pub emulations_dropped: AtomicU64,
    /// Channels held (every shard's).
    pub channels: AtomicU64,
    /// Idle channels dropped (no subscribers, no history, no idempotency key).
    pub channels_evicted: AtomicU64,
    /// Requests for a new channel refused at `max_channels`.
    pub channel_limit_refusals: AtomicU64,
    /// Peer-call connections refused (certificate not a configured peer's).
    pub peer_refusals: AtomicU64,
    /// Channels dropped because their ownership moved away, or may have
    /// (etcd mode: a new view, or the lease lost).
    pub ownership_moves: AtomicU64,
    /// Publications refused because this router did not own the channel
    /// under a live lease (etcd mode).
    pub fenced: AtomicU64,
    /// Server API user commands sent to gateways (one per gateway holding
    /// the user, never one per gateway of the cluster).
    pub user_commands: AtomicU64,
}

/// A gateway link's outbound queue, as a shard sees it.
pub trait LinkTx {
    /// Queues `msg`; false when the queue is full or the link gone (the
    /// message is dropped: the shard makes up for it).
    fn try_send(&self, msg: ClusterMsg) -> bool;
}

impl LinkTx for mpsc::Sender<ClusterMsg> {
    fn try_send(&self, msg: ClusterMsg) -> bool {
        mpsc::Sender::try_send(self, msg).is_ok()
    }
}

/// A gateway link's queue as the shards see it: the queue, and when the
/// oldest delivery not yet written was queued (nanoseconds since
/// [`clock_origin`], 0: none), which the link's writer takes once a batch
/// is written (`switchyard_router_hop_seconds{hop="shard_to_link_write"}`).
#[derive(Debug, Clone)]
pub struct GatewayTx {
    /// The queue.
    pub tx: mpsc::Sender<ClusterMsg>,
    /// The oldest unwritten delivery's queueing time.
    pub oldest: Arc<AtomicU64>,
}

/// The process's origin for [`GatewayTx::oldest`] stamps.
pub fn clock_origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Nanoseconds since [`clock_origin`] (never 0).
pub fn clock_nanos() -> u64 {
    clock_origin().elapsed().as_nanos() as u64 + 1
}

impl LinkTx for GatewayTx {
    fn try_send(&self, msg: ClusterMsg) -> bool {
        let deliver = matches!(msg, ClusterMsg::Deliver { .. });
        stamped(&self.oldest, deliver, || mpsc::Sender::try_send(&self.tx, msg).is_ok())
    }
}

/// Queues with `send` and keeps [`GatewayTx::oldest`] true: the first
/// delivery of a batch is stamped *before* the writer can see it, so a
/// writer that drains and takes the stamp between the send and the stamp
/// cannot leave a stamp behind for a delivery already written (it would
/// charge the next batch with the idle time in between). A send that fails
/// leaves its stamp: the queue is full of older deliveries (or the link is
/// gone, and its stamp with it), and other shards may have queued behind
/// the stamp without stamping. The clock is read only for the first
/// delivery of a batch.
fn stamped(oldest: &AtomicU64, deliver: bool, send: impl FnOnce() -> bool) -> bool {
    if deliver && oldest.load(Ordering::Relaxed) == 0 {
        let _ = oldest.compare_exchange(0, clock_nanos(), Ordering::Relaxed, Ordering::Relaxed);
    }
    send()
}

/// Work for a shard.
#[derive(Debug)]
pub enum ShardCmd<L = GatewayTx> {
    /// A gateway link is up; deliveries go to `tx`.
    GatewayUp {
        /// Gateway.
        gw: GatewayId,
        /// Its link's queue.
        tx: L,
        /// The protocol version agreed on the link (positions from version 2).
        version: u16,
    },
    /// A gateway link is gone: drop its interest and presence.
    GatewayDown(GatewayId),
    /// Interest changes (`snapshot` replaces this gateway's set within the shard).
    Interest {
        /// Gateway.
        gw: GatewayId,
        /// Channels gaining a subscriber.
        add: Vec<String>,
        /// Channels losing their last subscriber.
        remove: Vec<String>,
        /// Whether `add` is the whole set.
        snapshot: bool,
    },
    /// A request from a gateway (publish, recover, history, presence…), answered on its link.
    Request(GatewayId, ClusterMsg),
    /// A request from the HTTP server API.
    Api(ApiOp),
    /// The newest membership view (etcd mode), with its confirmation if a
    /// linearizable read made it: channels this router no longer owns are
    /// reset (a new epoch if they come back).
    View(Arc<View>),
    /// This router lost its lease (etcd mode): every channel is reset, as
    /// another router may have taken any of them over.
    LeaseLost,
}

/// This router's lease as every shard reads it (etcd mode), written by the
/// registration task: the id (0: none) and the deadline until which it is
/// certainly alive, in nanoseconds after `origin`. Atomics, so a keep-alive
/// never waits on a busy shard's queue.
#[derive(Debug)]
pub struct LeaseCell {
    origin: Instant,
    id: std::sync::atomic::AtomicI64,
    deadline: AtomicU64,
}

impl LeaseCell {
    /// No lease yet.
    pub fn new(origin: Instant) -> LeaseCell {
        LeaseCell { origin, id: std::sync::atomic::AtomicI64::new(0), deadline: AtomicU64::new(0) }
    }

    /// Records the lease `id` (0: none) certainly alive until `deadline`.
    pub fn set(&self, id: i64, deadline: Option<Instant>) {
        let d = deadline.map_or(0, |d| d.saturating_duration_since(self.origin).as_nanos() as u64);
        self.deadline.store(d, Ordering::SeqCst);
        self.id.store(id, Ordering::SeqCst);
    }

    /// The lease id (0: none).
    pub fn id(&self) -> i64 {
        self.id.load(Ordering::SeqCst)
    }

    /// Whether the lease is certainly alive at `now`.
    pub fn live(&self, now: Instant) -> bool {
        let d = self.deadline.load(Ordering::SeqCst);
        self.id() != 0 && d != 0 && (now.saturating_duration_since(self.origin).as_nanos() as u64) < d
    }
}

/// What a shard fences with in etcd mode.
#[derive(Debug, Clone)]
pub struct FenceSpec {
    /// This router's name (its name in the membership's rendezvous hash).
    pub me: String,
    /// Its lease.
    pub lease: Arc<LeaseCell>,
    /// How long a confirmed view stays fresh.
    pub freshness: Duration,
    /// How long after a view change the claim rule applies
    /// (`proto::membership::claim_delay`).
    pub claim_delay: Duration,
}

/// A publish result: (offset, epoch).
pub type PublishResult = Result<(u64, String), ReplyError>;
/// A history result: (publications, epoch, top offset).
pub type HistoryResult = Result<(Vec<proto::client::Publication>, String, u64), ReplyError>;

/// HTTP API operations on one shard's channels.
#[derive(Debug)]
pub enum ApiOp {
    /// Publish from the backend.
    Publish {
        /// Channel.
        channel: String,
        /// Payload JSON.
        data: Bytes,
        /// `tags` JSON object.
        tags: Option<Bytes>,
        /// Idempotency key (empty: none).
        idempotency_key: String,
        /// Answer.
        reply: oneshot::Sender<PublishResult>,
        /// When the API handler sent it (the shard's queue is a hop).
        at: Instant,
    },
    /// A server API command for a user (`subscribe`, `unsubscribe`,
    /// `disconnect`, `refresh`): sent to each gateway holding the user.
    User {
        /// The command (its user is the key of this shard's presence).
        msg: ClusterMsg,
        /// Answer: the gateways it was sent to.
        reply: oneshot::Sender<usize>,
    },
    /// `presence`.
    Presence {
        /// Channel.
        channel: String,
        /// Answer.
        reply: oneshot::Sender<Result<Vec<(String, Bytes)>, ReplyError>>,
    },
    /// `presence_stats`.
    PresenceStats {
        /// Channel.
        channel: String,
        /// Answer.
        reply: oneshot::Sender<Result<(u32, u32), ReplyError>>,
    },
    /// `history`.
    History {
        /// Channel.
        channel: String,
        /// Limit (0 position only, -1 all).
        limit: i64,
        /// Read after (offset, epoch).
        since: Option<(u64, String)>,
        /// Newest first.
        reverse: bool,
        /// Answer.
        reply: oneshot::Sender<HistoryResult>,
    },
    /// `history_remove`.
    HistoryRemove {
        /// Channel.
        channel: String,
        /// Answer.
        reply: oneshot::Sender<Result<(), ReplyError>>,
    },
    /// Channels with interest or presence: (name, clients known by presence, gateways).
    Channels {
        /// Answer.
        reply: oneshot::Sender<Vec<(String, u32)>>,
    },
}

/// How often a shard ticks (presence grace periods, resyncs owed, idle
/// channels).
pub const SHARD_TICK: Duration = Duration::from_millis(250);

/// Slots of the eviction wheel (one turn: 64 s).
const WHEEL_SLOTS: usize = 256;

/// A new channel refused because the shard holds its share of
/// `max_channels`: temporary (eviction frees room), so clients retry.
pub const CHANNEL_LIMIT: ReplyError = ReplyError::CHANNEL_LIMIT;

/// One shard's state.
pub struct Shard<L: LinkTx = GatewayTx> {
    namespaces: Arc<Namespaces>,
    max_recover: usize,
    channels: Map<String, ChannelState>,
    presence: Map<String, ChannelPresence>,
    users: UserPresence,
    gateways: Map<GatewayId, L>,
    /// Gateways that take [`ClusterMsg::Position`] (protocol version ≥ 2).
    positioned: Set<GatewayId>,
    /// Gateways that take the server API's user commands.
    user_commands: Set<GatewayId>,
    /// Each gateway's current presence round (facts it sends are stamped
    /// with it).
    rounds: Map<GatewayId, u64>,
    lagging: Map<GatewayId, Set<String>>,
    metrics: Arc<Metrics>,
    rng: SmallRng,
    seed: u64,
    /// Idle checks of channels (history TTL, idempotency window, no interest).
    wheel: TimerWheel,
    /// Channel names by their wheel key.
    ids: Map<u64, String>,
    next_id: u64,
    max_channels: usize,
    /// When the channel limit was last logged (once per interval).
    limit_logged: Option<Instant>,
    /// Ownership fencing (etcd mode); `None`: every channel asked of this
    /// shard is its own (one router, or a static list).
    fence: Option<Fence>,
}

/// What decides, in etcd mode, whether this router may acknowledge a
/// publication of a channel: the four rules of `proto::membership`'s
/// fencing (live lease, fresh view, owner in the newest view, and no router
/// still present that owned it in a view of the last `claim_delay`).
#[derive(Debug)]
struct Fence {
    spec: FenceSpec,
    view: Arc<View>,
    /// Until when the view is confirmed fresh.
    fresh_until: Option<Instant>,
    /// Views replaced within the last `claim_delay`, with when they were
    /// replaced; `None` stands for "not known" (before the first view, or
    /// before the current lease), under which nothing may be claimed.
    earlier: std::collections::VecDeque<(Instant, Option<Arc<View>>)>,
    /// The lease id the claim rule last saw: a new lease restarts it.
    lease_seen: i64,
}

impl Fence {
    fn new(spec: FenceSpec, now: Instant) -> Fence {
        let mut earlier = std::collections::VecDeque::new();
        earlier.push_back((now, None));
        Fence { spec, view: Arc::new(View::default()), fresh_until: None, earlier, lease_seen: 0 }
    }

    /// Takes a newer view (and its confirmation, if it has one).
    fn view(&mut self, view: Arc<View>, now: Instant) {
        if let Some(at) = view.confirmed {
            self.fresh_until = Some(at + self.spec.freshness);
        }
        if !view.same_members(&self.view) {
            let old = std::mem::replace(&mut self.view, view);
            self.earlier.push_back((now, Some(old)));
        } else {
            self.view = view;
        }
    }

    /// Forgets every view before now: nothing can be claimed for a
    /// `claim_delay` (the lease was lost, or a new one taken).
    fn unknown_since(&mut self, now: Instant) {
        self.earlier.clear();
        self.earlier.push_back((now, None));
    }

    fn may_publish(&mut self, channel: &str, now: Instant) -> bool {
        let lease = self.spec.lease.id();
        if lease != self.lease_seen {
            self.lease_seen = lease;
            self.unknown_since(now);
        }
        if !self.spec.lease.live(now)
            || self.fresh_until.is_none_or(|f| now >= f)
            || !self.view.owns(&self.spec.me, channel)
        {
            return false;
        }
        while self.earlier.front().is_some_and(|(t, _)| now >= *t + self.spec.claim_delay) {
            self.earlier.pop_front();
        }
        let (me, view) = (&self.spec.me, &self.view);
        self.earlier.iter().all(|(_, v)| match v {
            None => false,
            Some(v) => v.owner(channel).is_none_or(|o| o.name == *me || !view.contains(&o.name)),
        })
    }
}

/// What a shard is built from.
pub struct ShardSpec {
    /// Channel options.
    pub namespaces: Arc<Namespaces>,
    /// Most publications one recovery returns.
    pub max_recover: usize,
    /// Presence grace period.
    pub grace: Duration,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Seed of the shard's epochs and hash tables (random in production).
    pub seed: u64,
    /// Channels this shard holds at most (its share of the router's
    /// `max_channels`); a request for a new one beyond gets [`CHANNEL_LIMIT`].
    pub max_channels: usize,
    /// When the shard starts.
    pub now: Instant,
    /// In etcd mode, what fences this router's acknowledgements.
    pub fence: Option<FenceSpec>,
}

impl<L: LinkTx> Shard<L> {
    /// An empty shard.
    pub fn new(spec: ShardSpec) -> Self {
        let ShardSpec { namespaces, max_recover, grace, metrics, seed, max_channels, now, fence } = spec;
        Shard {
            namespaces,
            max_recover,
            channels: seeded::map(seed),
            presence: seeded::map(seed ^ 1),
            users: UserPresence::new(grace),
            gateways: seeded::map(seed ^ 2),
            positioned: seeded::set(seed ^ 3),
            user_commands: seeded::set(seed ^ 5),
            rounds: seeded::map(seed ^ 4),
            lagging: seeded::map(seed ^ 5),
            metrics,
            rng: SmallRng::seed_from_u64(seed),
            seed,
            wheel: TimerWheel::new(now, SHARD_TICK, WHEEL_SLOTS),
            ids: seeded::map(seed ^ 6),
            next_id: 1,
            max_channels: max_channels.max(1),
            limit_logged: None,
            fence: fence.map(|spec| Fence::new(spec, now)),
        }
    }

    /// A fresh epoch: 8 random alphanumerics (47 bits: a new epoch never
    /// repeats one a client may still hold, in practice).
    fn new_epoch(&mut self) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        (0..8).map(|_| char::from(ALPHABET[self.rng.random_range(0..62)])).collect()
    }

    /// The coarse tick: grace periods that ended, resyncs owed to gateways
    /// whose queue was full, channels that became idle.
    pub fn tick(&mut self, now: Instant) {
        for change in self.users.expire(now) {
            self.publish_presence(change, now);
        }
        self.flush_lagging();
        let mut due = Vec::new();
        self.wheel.expire(now, &mut due);
        for (id, tick) in due {
            let Some(name) = self.ids.get(&id).cloned() else { continue };
            let Some(ch) = self.channels.get_mut(&name) else { continue };
            if ch.check != tick {
                continue; // rescheduled
            }
            ch.check = 0;
            self.check_idle(&name, now);
        }
        // A churn of names leaves the tables' capacity behind: give it back.
        if self.channels.capacity() > 4 * self.channels.len() + 1024 {
            self.channels.shrink_to_fit();
            self.ids.shrink_to_fit();
        }
    }

    /// Drops `name` if nothing refers to it any more; otherwise checks again
    /// when its history or idempotency keys expire (while it has no
    /// subscribers: losing the last one schedules a check too).
    fn check_idle(&mut self, name: &str, now: Instant) {
        let Ok(opts) = self.options(name) else { return };
        let Some(ch) = self.channels.get_mut(name) else { return };
        ch.expire(now, &opts);
        if ch.is_idle() {
            let id = ch.id;
            self.channels.remove(name);
            self.ids.remove(&id);
            self.metrics.channels.fetch_sub(1, Ordering::Relaxed);
            self.metrics.channels_evicted.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if ch.gateways.is_empty()
            && let Some(at) = ch.next_expiry(&opts)
        {
            ch.check = self.wheel.insert(ch.id, at);
        }
    }

    /// Schedules an idle check of `name` (now, or when what it holds
    /// expires), unless one is scheduled already.
    fn watch(&mut self, name: &str, now: Instant) {
        let Ok(opts) = self.options(name) else { return };
        let Some(ch) = self.channels.get_mut(name) else { return };
        if ch.check == 0 && ch.gateways.is_empty() {
            let at = ch.next_expiry(&opts).unwrap_or(now);
            ch.check = self.wheel.insert(ch.id, at);
        }
    }

    /// Whether `user` counts as online here (connected, or within grace).
    pub fn is_online(&self, user: &str) -> bool {
        self.users.is_online(user)
    }

    /// The connections (client ids) of `user` this shard knows.
    pub fn user_clients(&self, user: &str) -> Vec<String> {
        self.users.clients(user)
    }

    /// Where `channel`'s stream stands here, if the shard holds it.
    pub fn stream(&self, channel: &str) -> Option<(&str, u64)> {
        self.channels.get(channel).map(|c| (c.epoch(), c.top()))
    }

    /// Channels held (for memory and eviction metrics).
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Publishes a user's aggregate presence change on their presence channel
    /// (`presence:<user>`), which this shard owns (the link routes a user's
    /// online/offline events by that channel).
    fn publish_presence(&mut self, change: PresenceChange, now: Instant) {
        let (user, online) = match change {
            PresenceChange::Online(u) => (u, true),
            PresenceChange::Away(u) => (u, false),
        };
        let channel = self.namespaces.presence_channel(&user);
        let mut data = b"{\"user\":".to_vec();
        proto::client::reply::write_str(&mut data, &user);
        data.extend_from_slice(if online { b",\"online\":true}" } else { b",\"online\":false}" });
        if let Err(e) = self.publish(&channel, Bytes::from(data), None, None, "", now) {
            tracing::warn!(%channel, error = e.message, "presence publish refused");
        }
    }

    fn options(&self, channel: &str) -> Result<StreamOptions, ReplyError> {
        let ns = self.namespaces.resolve_str(channel)?;
        Ok(StreamOptions {
            history_size: if ns.has_history() { ns.history_size } else { 0 },
            history_ttl: ns.history_ttl(),
            positioned: ns.positioned(),
            max_recover: self.max_recover,
        })
    }

    /// The channel's state, made (with a fresh epoch) if the shard has
    /// room for one more; a new channel is checked for idleness at once.
    fn channel(&mut self, name: &str, now: Instant) -> Result<&mut ChannelState, ReplyError> {
        if !self.channels.contains_key(name) {
            if self.channels.len() >= self.max_channels {
                self.metrics.channel_limit_refusals.fetch_add(1, Ordering::Relaxed);
                if self
                    .limit_logged
                    .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(10))
                {
                    self.limit_logged = Some(now);
                    tracing::warn!(
                        max = self.max_channels,
                        "shard holds its share of max_channels: new channels refused"
                    );
                }
                return Err(CHANNEL_LIMIT);
            }
            let epoch = self.new_epoch();
            let mut ch = ChannelState::new(epoch, self.seed);
            ch.id = self.next_id;
            self.next_id += 1;
            ch.check = self.wheel.insert(ch.id, now);
            self.ids.insert(ch.id, name.to_owned());
            self.channels.insert(name.to_owned(), ch);
            self.metrics.channels.fetch_add(1, Ordering::Relaxed);
        }
        Ok(self.channels.get_mut(name).expect("just made"))
    }

    fn send(&mut self, gw: GatewayId, msg: ClusterMsg) {
        if let Some(tx) = self.gateways.get(&gw)
            && !tx.try_send(msg)
        {
            self.metrics.gateway_queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Tells a gateway that just registered interest in `channel` where its
    /// stream stands, on the channel's delivery stream, ahead of every
    /// publication it will get: the gateway answers later subscribes to the
    /// channel itself. Ephemeral channels have no position to tell.
    fn send_position(&mut self, gw: GatewayId, channel: String) {
        if !self.positioned.contains(&gw) || !self.options(&channel).is_ok_and(|o| o.positioned) {
            return;
        }
        let Some(ch) = self.channels.get(&channel) else { return };
        let msg = ClusterMsg::Position { epoch: ch.epoch().to_owned(), top: ch.top(), channel };
        // A full queue drops it (counted): the gateway then asks for positions.
        self.send(gw, msg);
    }

    /// Handles one command at `now`.
    pub fn handle(&mut self, cmd: ShardCmd<L>, now: Instant) {
        match cmd {
            ShardCmd::GatewayUp { gw, tx, version } => {
                self.gateways.insert(gw, tx);
                if version >= proto::cluster::POSITIONS_SINCE {
                    self.positioned.insert(gw);
                }
                if version >= proto::cluster::USER_COMMANDS_SINCE {
                    self.user_commands.insert(gw);
                }
            }
            ShardCmd::GatewayDown(gw) => {
                // Its users enter the grace period; they are away only if no
                // connection of theirs comes back in time.
                self.users.gateway_lost(gw, now);
                self.gateways.remove(&gw);
                self.positioned.remove(&gw);
                self.user_commands.remove(&gw);
                self.rounds.remove(&gw);
                self.lagging.remove(&gw);
                self.drop_interest(gw, now);
                let mut leaves = Vec::new();
                for (channel, p) in self.presence.iter_mut() {
                    for info in p.gateway_lost(gw) {
                        leaves.push((channel.clone(), info));
                    }
                }
                self.presence.retain(|_, p| !p.is_empty());
                for (channel, info) in leaves {
                    if self.join_leave(&channel) {
                        self.push(&channel, leave_push(&channel, &info));
                    }
                }
            }
            ShardCmd::Interest { gw, add, remove, snapshot } => {
                if snapshot {
                    self.drop_interest(gw, now);
                }
                for c in add {
                    // At the channel limit the interest is not kept: the
                    // subscribe's own request gets the error.
                    if let Ok(ch) = self.channel(&c, now) {
                        ch.gateways.insert(gw);
                        self.send_position(gw, c);
                    }
                }
                for c in remove {
                    if let Some(ch) = self.channels.get_mut(&c) {
                        ch.gateways.remove(&gw);
                        if ch.gateways.is_empty() {
                            self.watch(&c, now);
                        }
                    }
                }
            }
            ShardCmd::Request(gw, msg) => self.request(gw, msg, now),
            ShardCmd::Api(op) => self.api(op, now),
            ShardCmd::View(view) => {
                let Some(f) = &mut self.fence else { return };
                f.view(view, now);
                let (me, view) = (f.spec.me.clone(), f.view.clone());
                self.reset_channels(|name| !view.owns(&me, name), now);
            }
            ShardCmd::LeaseLost => {
                let Some(f) = &mut self.fence else { return };
                f.unknown_since(now);
                self.reset_channels(|_| true, now);
            }
        }
    }

    /// Resets the channels `gone` names (their ownership moved away, or may
    /// have): their stream starts over in a new epoch, so a publication here
    /// never continues one a subscriber may hold from before another
    /// owner's. The gateways interested stay registered (a gateway whose
    /// view still names this router keeps getting what it publishes when it
    /// owns the channel again) and are told to resync, so their subscribers
    /// learn the position is gone instead of waiting. Counted as ownership
    /// moves.
    fn reset_channels(&mut self, gone: impl Fn(&str) -> bool, now: Instant) {
        let names: Vec<String> = self.channels.keys().filter(|n| gone(n)).cloned().collect();
        let mut told: Map<GatewayId, Vec<String>> = seeded::map(self.seed ^ 7);
        for name in names {
            let Some(old) = self.channels.remove(&name) else { continue };
            self.ids.remove(&old.id);
            self.metrics.channels.fetch_sub(1, Ordering::Relaxed);
            self.metrics.ownership_moves.fetch_add(1, Ordering::Relaxed);
            if old.gateways.is_empty() {
                continue;
            }
            for gw in &old.gateways {
                told.entry(*gw).or_default().push(name.clone());
            }
            if let Ok(ch) = self.channel(&name, now) {
                ch.gateways = old.gateways;
            }
        }
        for (gw, channels) in told {
            // The new position (delivery stream) and the resync (control
            // stream) may arrive in either order: either way the subscribers
            // resubscribe into the new epoch.
            for c in &channels {
                self.send_position(gw, c.clone());
            }
            self.send(gw, ClusterMsg::Resync { channels });
        }
    }

    /// Forgets every interest of `gw`; channels left without subscribers
    /// are checked for idleness.
    fn drop_interest(&mut self, gw: GatewayId, now: Instant) {
        let mut emptied = Vec::new();
        for (name, ch) in self.channels.iter_mut() {
            if ch.gateways.remove(&gw) && ch.gateways.is_empty() {
                emptied.push(name.clone());
            }
        }
        for name in emptied {
            self.watch(&name, now);
        }
    }

    fn api(&mut self, op: ApiOp, now: Instant) {
        match op {
            ApiOp::Publish { channel, data, tags, idempotency_key, reply, at } => {
                self.metrics.hop_api_to_shard.record(now.saturating_duration_since(at));
                let _ = reply.send(self.publish(&channel, data, None, tags, &idempotency_key, now));
            }
            ApiOp::User { msg, reply } => {
                let user = msg.user_target().map_or("", |(user, _)| user);
                let gateways: Vec<GatewayId> = self
                    .users
                    .gateways(user)
                    .into_iter()
                    .filter(|gw| self.user_commands.contains(gw))
                    .collect();
                for gw in &gateways {
                    self.send(*gw, msg.clone());
                }
                self.metrics.user_commands.fetch_add(gateways.len() as u64, Ordering::Relaxed);
                let _ = reply.send(gateways.len());
            }
            ApiOp::Presence { channel, reply } => {
                let r = match self.namespaces.resolve_str(&channel) {
                    Ok(ns) if ns.presence => {
                        Ok(self.presence.get(&channel).map(|p| p.entries()).unwrap_or_default())
                    }
                    Ok(_) => Err(ReplyError::NOT_AVAILABLE),
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            ApiOp::PresenceStats { channel, reply } => {
                let r = match self.namespaces.resolve_str(&channel) {
                    Ok(ns) if ns.presence => {
                        Ok(self.presence.get(&channel).map(|p| p.stats()).unwrap_or((0, 0)))
                    }
                    Ok(_) => Err(ReplyError::NOT_AVAILABLE),
                    Err(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            ApiOp::History { channel, limit, since, reverse, reply } => {
                let r = self.options(&channel).and_then(|opts| {
                    let since = since.as_ref().map(|(o, e)| (*o, e.as_str()));
                    self.channel(&channel, now)?.history(limit, since, reverse, usize::MAX, now, &opts)
                });
                let _ = reply.send(r);
            }
            ApiOp::HistoryRemove { channel, reply } => {
                let r = self.options(&channel).map(|_| {
                    if let Some(ch) = self.channels.get_mut(&channel) {
                        ch.remove_history();
                    }
                });
                let _ = reply.send(r);
            }
            ApiOp::Channels { reply } => {
                let mut out: Vec<(String, u32)> = self
                    .channels
                    .iter()
                    .filter(|(_, c)| !c.gateways.is_empty())
                    .map(|(n, _)| (n.clone(), self.presence.get(n).map(|p| p.stats().0).unwrap_or(0)))
                    .collect();
                for (n, p) in &self.presence {
                    if self.channels.get(n).is_none_or(|c| c.gateways.is_empty()) {
                        out.push((n.clone(), p.stats().0));
                    }
                }
                let _ = reply.send(out);
            }
        }
    }

    fn request(&mut self, gw: GatewayId, msg: ClusterMsg, now: Instant) {
        let fail = |req: u64, e: ReplyError| ClusterMsg::RequestError {
            req,
            code: e.code,
            message: e.message.into(),
        };
        match msg {
            ClusterMsg::Publish { req, channel, data, info, idempotency_key } => {
                let answer = match self.publish(&channel, data, info, None, &idempotency_key, now) {
                    Ok((offset, epoch)) => ClusterMsg::PublishOk { req, offset, epoch },
                    Err(e) => fail(req, e),
                };
                self.send(gw, answer);
            }
            ClusterMsg::Recover { req, channel, recover, epoch, offset } => {
                let answer = match self.options(&channel) {
                    Err(e) => fail(req, e),
                    Ok(opts) => match self.channel(&channel, now) {
                        Err(e) => fail(req, e),
                        Ok(ch) => {
                            let replay = if recover {
                                ch.recover(&epoch, offset, now, &opts)
                            } else {
                                ch.recover(ch.epoch().to_owned().as_str(), ch.top(), now, &opts)
                            };
                            ClusterMsg::Replay {
                                req,
                                epoch: replay.epoch,
                                top: replay.top,
                                recovered: replay.recovered,
                                positioned: opts.positioned,
                                publications: replay.publications,
                            }
                        }
                    },
                };
                self.send(gw, answer);
            }
            ClusterMsg::History { req, channel, limit, since, reverse } => {
                let answer = match self.options(&channel) {
                    Err(e) => fail(req, e),
                    Ok(opts) => {
                        let since = since.as_ref().map(|(o, e)| (*o, e.as_str()));
                        match self
                            .channel(&channel, now)
                            .and_then(|ch| ch.history(limit, since, reverse, 300, now, &opts))
                        {
                            Ok((publications, epoch, top)) => {
                                ClusterMsg::HistoryResult { req, epoch, top, publications }
                            }
                            Err(e) => fail(req, e),
                        }
                    }
                };
                self.send(gw, answer);
            }
            ClusterMsg::UserOnline { user, client } if !user.is_empty() => {
                let round = self.rounds.get(&gw).copied().unwrap_or(0);
                if let Some(change) = self.users.connect(&user, &client, gw, round) {
                    self.publish_presence(change, now);
                }
            }
            ClusterMsg::UserOffline { user, client } if !user.is_empty() => {
                self.users.disconnect(&user, &client, gw, now)
            }
            ClusterMsg::UserOnline { .. } | ClusterMsg::UserOffline { .. } => {}
            ClusterMsg::Join { channel, client, user, info } => {
                let round = self.rounds.get(&gw).copied().unwrap_or(0);
                let push = join_push(&channel, &info);
                let new =
                    self.presence.entry(channel.clone()).or_default().join(&client, &user, info, gw, round);
                if new && self.join_leave(&channel) {
                    self.push(&channel, push);
                }
            }
            ClusterMsg::PresenceBegin { round } => {
                self.rounds.insert(gw, round);
            }
            ClusterMsg::PresenceEnd { round } => {
                if self.rounds.get(&gw) != Some(&round) {
                    return; // not the round this gateway began here
                }
                self.users.sweep(gw, round, now);
                let mut leaves = Vec::new();
                for (channel, p) in self.presence.iter_mut() {
                    for info in p.sweep(gw, round) {
                        leaves.push((channel.clone(), info));
                    }
                }
                self.presence.retain(|_, p| !p.is_empty());
                for (channel, info) in leaves {
                    if self.join_leave(&channel) {
                        self.push(&channel, leave_push(&channel, &info));
                    }
                }
            }
            ClusterMsg::Leave { channel, client } => {
                let mut left = None;
                if let Some(p) = self.presence.get_mut(&channel) {
                    left = p.leave(&client);
                    if p.is_empty() {
                        self.presence.remove(&channel);
                    }
                }
                if let Some(info) = left.filter(|_| self.join_leave(&channel)) {
                    self.push(&channel, leave_push(&channel, &info));
                }
            }
            ClusterMsg::Presence { req, channel } => {
                let answer = match self.namespaces.resolve_str(&channel) {
                    Ok(ns) if ns.presence => ClusterMsg::PresenceResult {
                        req,
                        entries: self.presence.get(&channel).map(|p| p.entries()).unwrap_or_default(),
                    },
                    Ok(_) => fail(req, ReplyError::NOT_AVAILABLE),
                    Err(e) => fail(req, e),
                };
                self.send(gw, answer);
            }
            ClusterMsg::PresenceStats { req, channel } => {
                let answer = match self.namespaces.resolve_str(&channel) {
                    Ok(ns) if ns.presence => {
                        let (num_clients, num_users) =
                            self.presence.get(&channel).map(|p| p.stats()).unwrap_or((0, 0));
                        ClusterMsg::PresenceStatsResult { req, num_clients, num_users }
                    }
                    Ok(_) => fail(req, ReplyError::NOT_AVAILABLE),
                    Err(e) => fail(req, e),
                };
                self.send(gw, answer);
            }
            other => {
                tracing::warn!(gateway = gw, msg = other.name(), "unexpected request routed to a shard");
            }
        }
    }

    /// Orders one publication and sends it once to each interested gateway.
    pub fn publish(
        &mut self,
        channel: &str,
        data: Bytes,
        info: Option<Bytes>,
        tags: Option<Bytes>,
        idempotency_key: &str,
        now: Instant,
    ) -> Result<(u64, String), ReplyError> {
        let opts = self.options(channel)?;
        // The clock read now, not (only) the batch's: a pause since must count.
        let at = now.max(Instant::now());
        if self.fence.as_mut().is_some_and(|f| !f.may_publish(channel, at)) {
            self.metrics.fenced.fetch_add(1, Ordering::Relaxed);
            return Err(ReplyError::NOT_OWNER);
        }
        let ch = self.channel(channel, now)?;
        let key = (!idempotency_key.is_empty()).then_some(idempotency_key);
        match ch.publish(data, info, tags, key, now, &opts) {
            PublishOutcome::Duplicate { offset } => Ok((offset, ch.epoch().to_owned())),
            PublishOutcome::Published(publication) => {
                let epoch = ch.epoch().to_owned();
                let offset = publication.offset;
                let targets: Vec<GatewayId> = ch.gateways.iter().copied().collect();
                self.metrics.publications.fetch_add(1, Ordering::Relaxed);
                for gw in targets {
                    let msg = ClusterMsg::Deliver {
                        channel: channel.to_owned(),
                        epoch: epoch.clone(),
                        publication: publication.clone(),
                    };
                    let sent = self.gateways.get(&gw).is_some_and(|tx| tx.try_send(msg));
                    if sent {
                        self.metrics.gateway_sends.fetch_add(1, Ordering::Relaxed);
                    } else {
                        // The gateway fell behind: it must resync this channel
                        // rather than slow everyone else down.
                        self.metrics.gateway_queue_full.fetch_add(1, Ordering::Relaxed);
                        self.lagging.entry(gw).or_default().insert(channel.to_owned());
                    }
                }
                self.watch(channel, now);
                Ok((offset, epoch))
            }
        }
    }

    fn join_leave(&self, channel: &str) -> bool {
        self.namespaces.resolve_str(channel).is_ok_and(|ns| ns.join_leave)
    }

    /// Sends a join/leave push once to each gateway with subscribers of the
    /// channel. These are outside the offset stream (as in Centrifugo): a
    /// gateway that cannot take one drops it and counts it.
    fn push(&mut self, channel: &str, line: Vec<u8>) {
        let Some(ch) = self.channels.get(channel) else { return };
        let push = Bytes::from(line);
        for gw in ch.gateways.iter() {
            let msg = ClusterMsg::Push { channel: channel.to_owned(), push: push.clone() };
            match self.gateways.get(gw) {
                Some(tx) if tx.try_send(msg) => {
                    self.metrics.pushes.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    self.metrics.gateway_queue_full.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Sends the resyncs owed to gateways whose queue was full, while it
    /// takes them (the shell calls it after each batch of commands).
    pub fn flush_lagging(&mut self) {
        if self.lagging.is_empty() {
            return;
        }
        let lagging = std::mem::take(&mut self.lagging);
        for (gw, channels) in lagging {
            let msg = ClusterMsg::Resync { channels: channels.iter().cloned().collect() };
            match self.gateways.get(&gw) {
                Some(tx) if !tx.try_send(msg) => {
                    self.lagging.insert(gw, channels);
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::namespace::NamespaceOptions;

    struct Sink;

    impl LinkTx for Sink {
        fn try_send(&self, _msg: ClusterMsg) -> bool {
            true
        }
    }

    /// The link's writer, run at the worst moment: right after the send,
    /// it drains the queue and takes the stamp, as `server.rs`'s writer does
    /// once a batch is written.
    fn send_and_write(oldest: &AtomicU64, queue: &mut Vec<u64>, taken: &mut Vec<u64>, msg: u64) -> bool {
        stamped(oldest, true, || {
            queue.push(msg);
            queue.clear();
            taken.push(oldest.swap(0, Ordering::Relaxed));
            true
        })
    }

    #[test]
    fn a_delivery_written_before_it_was_stamped_leaves_no_stamp_behind() {
        let oldest = AtomicU64::new(0);
        let (mut queue, mut taken) = (Vec::new(), Vec::new());
        assert!(send_and_write(&oldest, &mut queue, &mut taken, 1));
        // Stamped after the send, the stamp would outlive its delivery and
        // the next batch, however quick, would be charged with the idle time.
        assert_eq!(oldest.load(Ordering::Relaxed), 0, "a stamp outlived the delivery it was for");
        assert_ne!(taken[0], 0, "the writer found the batch's stamp");
        assert!(send_and_write(&oldest, &mut queue, &mut taken, 2));
        assert!(taken[1] > taken[0], "the second batch carries its own stamp");
    }

    #[test]
    fn only_the_first_delivery_of_a_batch_is_stamped_and_the_stamp_stays() {
        let oldest = AtomicU64::new(0);
        // Only deliveries are stamped.
        assert!(stamped(&oldest, false, || true));
        assert_eq!(oldest.load(Ordering::Relaxed), 0);
        // An older stamp stays, whether the send goes or the queue is full
        // (of older deliveries, which other shards may have queued behind
        // the stamp without stamping).
        oldest.store(7, Ordering::Relaxed);
        assert!(stamped(&oldest, true, || true));
        assert!(!stamped(&oldest, true, || false));
        assert_eq!(oldest.load(Ordering::Relaxed), 7);
    }

    fn shard(max_channels: usize, t0: Instant) -> Shard<Sink> {
        let mut ns = Namespaces::default();
        ns.namespaces
            .insert("brief".into(), NamespaceOptions { history_ttl_secs: 5, ..NamespaceOptions::default() });
        Shard::new(ShardSpec {
            namespaces: Arc::new(ns),
            max_recover: 300,
            grace: Duration::from_secs(1),
            metrics: Arc::new(Metrics::default()),
            seed: 1,
            max_channels,
            now: t0,
            fence: None,
        })
    }

    fn interest(s: &mut Shard<Sink>, add: &[&str], remove: &[&str], now: Instant) {
        let cmd = ShardCmd::Interest {
            gw: 1,
            add: add.iter().map(|c| c.to_string()).collect(),
            remove: remove.iter().map(|c| c.to_string()).collect(),
            snapshot: false,
        };
        s.handle(cmd, now);
    }

    fn tick_until(s: &mut Shard<Sink>, from: Instant, secs: u64) -> Instant {
        let mut t = from;
        for _ in 0..secs * 4 {
            t += SHARD_TICK;
            s.tick(t);
        }
        t
    }

    #[test]
    fn idle_channels_are_dropped_and_history_keeps_them_for_its_ttl() {
        let t0 = Instant::now();
        let mut s = shard(100, t0);
        s.handle(ShardCmd::GatewayUp { gw: 1, tx: Sink, version: 3 }, t0);
        interest(&mut s, &["brief:a", "brief:b"], &[], t0);
        s.publish("brief:b", Bytes::from_static(b"{}"), None, None, "", t0).unwrap();
        assert_eq!(s.channel_count(), 2);
        let t = tick_until(&mut s, t0, 2);
        assert_eq!(s.channel_count(), 2, "subscribed channels stay");
        interest(&mut s, &[], &["brief:a", "brief:b"], t);
        let t = tick_until(&mut s, t, 1);
        assert_eq!(s.channel_count(), 1, "no subscriber and no history: gone; history keeps b");
        assert!(s.stream("brief:b").is_some());
        tick_until(&mut s, t, 5);
        assert_eq!(s.channel_count(), 0, "b's history expired");
        assert_eq!(s.metrics.channels.load(Ordering::Relaxed), 0);
        assert_eq!(s.metrics.channels_evicted.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn new_channels_past_the_limit_are_refused_until_room_is_made() {
        let t0 = Instant::now();
        let mut s = shard(2, t0);
        s.handle(ShardCmd::GatewayUp { gw: 1, tx: Sink, version: 3 }, t0);
        interest(&mut s, &["chat:a", "chat:b"], &[], t0);
        assert_eq!(s.publish("chat:c", Bytes::from_static(b"{}"), None, None, "", t0), Err(CHANNEL_LIMIT));
        assert!(
            s.publish("chat:a", Bytes::from_static(b"{}"), None, None, "", t0).is_ok(),
            "known channels go on"
        );
        assert_eq!(s.metrics.channel_limit_refusals.load(Ordering::Relaxed), 1);
        interest(&mut s, &[], &["chat:b"], t0);
        tick_until(&mut s, t0, 1);
        assert!(s.publish("chat:c", Bytes::from_static(b"{}"), None, None, "", t0).is_ok(), "b made room");
    }

    #[derive(Clone, Default)]
    struct Recorder(Arc<std::sync::Mutex<Vec<ClusterMsg>>>);

    impl LinkTx for Recorder {
        fn try_send(&self, msg: ClusterMsg) -> bool {
            self.0.lock().unwrap().push(msg);
            true
        }
    }

    fn member(name: &str, i: u8) -> (String, proto::membership::Member) {
        let m = proto::membership::Member {
            name: name.into(),
            quic: std::net::SocketAddr::from(([10, 0, 0, i], 7100)),
            api: std::net::SocketAddr::from(([10, 0, 0, i], 8000)),
        };
        (format!("/r/{name}"), m)
    }

    fn view(rev: i64, names: &[&str], confirmed: Option<Instant>) -> ShardCmd<Recorder> {
        let mut v = View::new(rev, names.iter().enumerate().map(|(i, n)| member(n, i as u8 + 1)));
        v.confirmed = confirmed;
        ShardCmd::View(Arc::new(v))
    }

    /// The fencing rules of `proto::membership`, one by one, with the clock
    /// the test drives (ahead of the real one).
    #[test]
    fn fencing_acknowledges_only_under_a_live_lease_a_fresh_view_and_a_settled_claim() {
        let t0 = Instant::now() + Duration::from_secs(1000);
        let lease = Arc::new(LeaseCell::new(t0));
        let sec = |n: u64| t0 + Duration::from_secs(n);
        let fence = FenceSpec {
            me: "a".into(),
            lease: lease.clone(),
            freshness: Duration::from_secs(5),
            claim_delay: Duration::from_secs(6),
        };
        let metrics = Arc::new(Metrics::default());
        let mut s: Shard<Recorder> = Shard::new(ShardSpec {
            namespaces: Arc::new(Namespaces::default()),
            max_recover: 300,
            grace: Duration::from_secs(1),
            metrics: metrics.clone(),
            seed: 1,
            max_channels: 1000,
            now: t0,
            fence: Some(fence),
        });
        let link = Recorder::default();
        s.handle(ShardCmd::GatewayUp { gw: 1, tx: link.clone(), version: 3 }, t0);
        let two = View::new(1, [member("a", 1), member("b", 2)]);
        let ours = |v: &View, who: &str| (0..).map(|i| format!("chat:{i}")).find(|c| v.owns(who, c)).unwrap();
        let x = ours(&two, "a");
        let y = ours(&two, "b");
        let publish = |s: &mut Shard<Recorder>, c: &str, at: Instant| {
            s.publish(c, Bytes::from_static(b"{}"), None, None, "", at)
        };

        // No lease, no view: refused.
        assert_eq!(publish(&mut s, &x, sec(1)), Err(ReplyError::NOT_OWNER));
        lease.set(1, Some(sec(100)));
        s.handle(view(1, &["a", "b"], Some(sec(1))), sec(1));
        // Owner, lease, fresh view: still refused while the claim rule holds
        // (nothing is known of the views before this router's first one).
        assert_eq!(publish(&mut s, &x, sec(2)), Err(ReplyError::NOT_OWNER));
        // After the claim delay, but the view is no longer fresh: refused.
        assert_eq!(publish(&mut s, &x, sec(8)), Err(ReplyError::NOT_OWNER));
        s.handle(view(1, &["a", "b"], Some(sec(8))), sec(8));
        assert!(publish(&mut s, &x, sec(8)).is_ok(), "owner, live lease, fresh, settled");
        assert_eq!(publish(&mut s, &y, sec(8)), Err(ReplyError::NOT_OWNER), "b's channel");
        interest_of(&mut s, &x, sec(8));
        let epoch = s.stream(&x).unwrap().0.to_owned();

        // b leaves: its channels are ours at once (a router that left
        // acknowledges nothing any more).
        s.handle(view(2, &["a"], None), sec(9));
        assert!(publish(&mut s, &y, sec(9)).is_ok());

        // b comes back: y is b's again, and our state of y is reset.
        s.handle(view(3, &["a", "b"], Some(sec(10))), sec(10));
        assert_eq!(publish(&mut s, &y, sec(10)), Err(ReplyError::NOT_OWNER));
        assert!(s.stream(&y).is_none(), "no interest: dropped");

        // The lease is lost: everything is reset, interest kept, the
        // gateway told to resync; nothing acknowledged until a new lease's
        // claim delay has passed.
        link.0.lock().unwrap().clear();
        lease.set(0, None);
        s.handle(ShardCmd::LeaseLost, sec(11));
        let (new_epoch, top) = s.stream(&x).map(|(e, t)| (e.to_owned(), t)).unwrap();
        assert!(new_epoch != epoch && top == 0, "a new epoch, kept for the interested gateway");
        let sent = link.0.lock().unwrap().clone();
        assert!(
            sent.iter().any(|m| matches!(m, ClusterMsg::Resync { channels } if channels.contains(&x))),
            "{sent:?}"
        );
        assert_eq!(publish(&mut s, &x, sec(11)), Err(ReplyError::NOT_OWNER));
        lease.set(2, Some(sec(100)));
        s.handle(view(4, &["a", "b"], Some(sec(12))), sec(12));
        assert_eq!(publish(&mut s, &x, sec(12)), Err(ReplyError::NOT_OWNER), "a new lease waits");
        s.handle(view(4, &["a", "b"], Some(sec(18))), sec(18));
        assert!(publish(&mut s, &x, sec(18)).is_ok());
        assert!(metrics.fenced.load(Ordering::Relaxed) >= 7);
    }

    fn interest_of(s: &mut Shard<Recorder>, channel: &str, now: Instant) {
        let cmd =
            ShardCmd::Interest { gw: 1, add: vec![channel.to_owned()], remove: Vec::new(), snapshot: false };
        s.handle(cmd, now);
    }
}
