//! Channel shards: each owns the channels whose stable hash maps to it, so
//! no lock is taken on the publish path. A shard orders publications and
//! sends each one exactly once to every gateway with online subscribers.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::client::ReplyError;
use proto::client::reply::{join_push, leave_push};
use proto::cluster::ClusterMsg;
use proto::namespace::Namespaces;
use rand::Rng;
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
}

/// Work for a shard.
#[derive(Debug)]
pub enum ShardCmd {
    /// A gateway link is up; deliveries go to `tx`.
    GatewayUp {
        /// Gateway.
        gw: GatewayId,
        /// Its link's queue.
        tx: mpsc::Sender<ClusterMsg>,
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

/// One shard's state and loop.
pub struct Shard {
    namespaces: Arc<Namespaces>,
    max_recover: usize,
    channels: HashMap<String, ChannelState>,
    presence: HashMap<String, ChannelPresence>,
    users: UserPresence,
    gateways: HashMap<GatewayId, mpsc::Sender<ClusterMsg>>,
    /// Gateways that take [`ClusterMsg::Position`] (protocol version ≥ 2).
    positioned: HashSet<GatewayId>,
    lagging: HashMap<GatewayId, HashSet<String>>,
    metrics: Arc<Metrics>,
}

fn new_epoch() -> String {
    let mut rng = rand::rng();
    (0..8)
        .map(|_| {
            char::from(
                b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[rng.random_range(0..62)],
            )
        })
        .collect()
}

impl Shard {
    /// An empty shard.
    pub fn new(
        namespaces: Arc<Namespaces>,
        max_recover: usize,
        grace: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Shard {
            namespaces,
            max_recover,
            channels: HashMap::new(),
            presence: HashMap::new(),
            users: UserPresence::new(grace),
            gateways: HashMap::new(),
            positioned: HashSet::new(),
            lagging: HashMap::new(),
            metrics,
        }
    }

    /// Runs until every sender is dropped. A coarse tick (250 ms) expires
    /// presence grace periods.
    pub async fn run(mut self, mut rx: mpsc::Receiver<ShardCmd>) {
        let mut batch = Vec::with_capacity(256);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        return;
                    }
                    let now = Instant::now();
                    for cmd in batch.drain(..) {
                        self.handle(cmd, now);
                    }
                    self.flush_lagging();
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    for change in self.users.expire(now) {
                        self.publish_presence(change, now);
                    }
                    self.flush_lagging();
                }
            }
        }
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

    fn channel(&mut self, name: &str) -> &mut ChannelState {
        self.channels.entry(name.to_owned()).or_insert_with(|| ChannelState::new(new_epoch()))
    }

    fn send(&mut self, gw: GatewayId, msg: ClusterMsg) {
        if let Some(tx) = self.gateways.get(&gw)
            && tx.try_send(msg).is_err()
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
        let ch = self.channel(&channel);
        let msg = ClusterMsg::Position { epoch: ch.epoch().to_owned(), top: ch.top(), channel };
        // A full queue drops it (counted): the gateway then asks for positions.
        self.send(gw, msg);
    }

    fn handle(&mut self, cmd: ShardCmd, now: Instant) {
        match cmd {
            ShardCmd::GatewayUp { gw, tx, version } => {
                self.gateways.insert(gw, tx);
                if version >= proto::cluster::POSITIONS_SINCE {
                    self.positioned.insert(gw);
                }
            }
            ShardCmd::GatewayDown(gw) => {
                // Its users enter the grace period; they are away only if no
                // connection of theirs comes back in time.
                self.users.gateway_lost(gw, now);
                self.gateways.remove(&gw);
                self.positioned.remove(&gw);
                self.lagging.remove(&gw);
                for ch in self.channels.values_mut() {
                    ch.gateways.remove(&gw);
                }
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
                    for ch in self.channels.values_mut() {
                        ch.gateways.remove(&gw);
                    }
                }
                for c in add {
                    self.channel(&c).gateways.insert(gw);
                    self.send_position(gw, c);
                }
                for c in remove {
                    if let Some(ch) = self.channels.get_mut(&c) {
                        ch.gateways.remove(&gw);
                    }
                }
            }
            ShardCmd::Request(gw, msg) => self.request(gw, msg, now),
            ShardCmd::Api(op) => self.api(op, now),
        }
    }

    fn api(&mut self, op: ApiOp, now: Instant) {
        match op {
            ApiOp::Publish { channel, data, tags, idempotency_key, reply } => {
                let _ = reply.send(self.publish(&channel, data, None, tags, &idempotency_key, now));
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
                    self.channel(&channel).history(limit, since, reverse, usize::MAX, now, &opts)
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
                    Ok(opts) => {
                        let ch = self.channel(&channel);
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
                };
                self.send(gw, answer);
            }
            ClusterMsg::History { req, channel, limit, since, reverse } => {
                let answer = match self.options(&channel) {
                    Err(e) => fail(req, e),
                    Ok(opts) => {
                        let since = since.as_ref().map(|(o, e)| (*o, e.as_str()));
                        match self.channel(&channel).history(limit, since, reverse, 300, now, &opts) {
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
                if let Some(change) = self.users.connect(&user, &client, gw) {
                    self.publish_presence(change, now);
                }
            }
            ClusterMsg::UserOffline { user, client } if !user.is_empty() => {
                self.users.disconnect(&user, &client, gw, now)
            }
            ClusterMsg::UserOnline { .. } | ClusterMsg::UserOffline { .. } => {}
            ClusterMsg::Join { channel, client, user, info } => {
                if self.join_leave(&channel) {
                    self.push(&channel, join_push(&channel, &info));
                }
                self.presence.entry(channel).or_default().join(&client, &user, info, gw);
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
        let ch = self.channel(channel);
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
                    let sent = self.gateways.get(&gw).is_some_and(|tx| tx.try_send(msg).is_ok());
                    if sent {
                        self.metrics.gateway_sends.fetch_add(1, Ordering::Relaxed);
                    } else {
                        // The gateway fell behind: it must resync this channel
                        // rather than slow everyone else down.
                        self.metrics.gateway_queue_full.fetch_add(1, Ordering::Relaxed);
                        self.lagging.entry(gw).or_default().insert(channel.to_owned());
                    }
                }
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
                Some(tx) if tx.try_send(msg).is_ok() => {
                    self.metrics.pushes.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    self.metrics.gateway_queue_full.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn flush_lagging(&mut self) {
        if self.lagging.is_empty() {
            return;
        }
        let lagging = std::mem::take(&mut self.lagging);
        for (gw, channels) in lagging {
            let msg = ClusterMsg::Resync { channels: channels.iter().cloned().collect() };
            match self.gateways.get(&gw) {
                Some(tx) if tx.try_send(msg).is_err() => {
                    self.lagging.insert(gw, channels);
                }
                _ => {}
            }
        }
    }
}
