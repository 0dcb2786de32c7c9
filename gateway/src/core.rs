//! One worker core: its listener, sessions, channel index, pending router
//! requests and its coarse timer wheel. Everything here is single-threaded
//! (`Rc`/`RefCell`); cores share nothing and talk to the uplink by messages.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use monoio::net::TcpStream;
use proto::client::channel::ChannelName;
use proto::client::command::{Command, FLAG_REJECT_UNRECOVERED};
use proto::client::reply::{self, SubscribeResult, client_info, strip_newlines, unsubscribe_push};
use proto::client::{Disconnect, Method, ReplyError};
use proto::cluster::ClusterMsg;
use proto::namespace::{PublishPolicy, SubscribePolicy};
use proto::timer_wheel::TimerWheel;
use proto::token_bucket::TokenBucket;
use proto::ws::SharedFrame;
use proto::ws::deflate::{Deflater, Inflater};
use proto::ws::handshake;
use rand::Rng;

use crate::auth::{TokenError, Verifier};
use crate::bridge::{CoreId, DownMsg, UpMsg, request_id};
use crate::config::GatewayConfig;
use crate::listener::{self, ACCEPTS_PER_TURN, Accepted, LISTENER};
use crate::metrics::{CoreMetrics, Metrics};
use crate::poller::{self, Poller};
use crate::session::{self, Session, Step, Sub};

/// What a router request was for.
#[derive(Debug)]
enum Pending {
    Publish {
        session: u64,
        id: u32,
    },
    Subscribe {
        session: u64,
        id: u32,
        channel: Arc<str>,
        recover: bool,
        offset: u64,
        flag: u64,
        history: bool,
    },
    History {
        session: u64,
        id: u32,
    },
    Presence {
        session: u64,
        id: u32,
    },
    PresenceStats {
        session: u64,
        id: u32,
    },
}

/// Messages for the routers a core holds at most while the uplink's queue
/// is full (it retries every turn and on its timer); beyond, requests are
/// answered with error 100 and other messages are dropped and counted in
/// `switchyard_gateway_uplink_dropped_total`.
pub const MAX_UP_BACKLOG: usize = 65_536;

/// A channel's subscribers on this core and, when the uplink told it, where
/// the channel's stream stands.
struct Members {
    /// The channel's name, shared by every local subscription to it (one
    /// allocation per channel; a subscription finds itself by pointer).
    name: Arc<str>,
    sessions: HashMap<u64, Rc<Session>>,
    /// (epoch, offset of the last publication handed to this core): the
    /// core answers subscribes from it. Kept current by deliveries; `None`
    /// when something did not follow on (the router is asked instead).
    position: Option<(Arc<str>, u64)>,
}

impl Members {
    fn new(name: Arc<str>) -> Members {
        Members { name, sessions: HashMap::new(), position: None }
    }

    /// Follows a delivery of offsets `first..=last` (0: unpositioned).
    fn advance(&mut self, first: u64, last: u64) {
        if first == 0 {
            return;
        }
        self.position = match self.position.take() {
            Some((epoch, top)) if first == top + 1 => Some((epoch, last)),
            _ => None,
        };
    }
}

/// How long a router request (subscribe recovery, publish, history,
/// presence) may go unanswered: then the client gets error 100, which is
/// temporary (the SDKs retry), and the request is forgotten.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The granularity of each core's timer: deadlines are kept to within it.
pub const TIMER_TICK: Duration = Duration::from_millis(250);

/// Slots of the timer wheel (one turn: 64 s; later deadlines wait turns).
const TIMER_SLOTS: usize = 256;

/// Frames shorter than this (header included) go out uncompressed even to
/// sessions that negotiated permessage-deflate: a fresh-window deflate of a
/// few dozen bytes rarely comes out smaller.
const MIN_DEFLATE_FRAME: usize = 96;

/// A worker core.
pub struct Core {
    /// This core's index.
    pub id: CoreId,
    /// Configuration.
    pub cfg: Arc<GatewayConfig>,
    verifier: Arc<Verifier>,
    up: flume::Sender<Vec<UpMsg>>,
    /// This turn's messages for the routers, sent as one batch by the flusher.
    up_batch: RefCell<Vec<UpMsg>>,
    /// The uplink's queue was full at the last try: the timer retries.
    up_blocked: Cell<bool>,
    metrics: Arc<Metrics>,
    sessions: RefCell<HashMap<u64, Rc<Session>>>,
    index: RefCell<HashMap<Arc<str>, Members>>,
    pending: RefCell<HashMap<u64, Pending>>,
    /// (deadline, request id) in the order requests were sent: the timer
    /// fails those still pending at their deadline.
    pending_deadlines: RefCell<VecDeque<(Instant, u64)>>,
    next_req: Cell<u64>,
    next_session: Cell<u64>,
    scratch: RefCell<Vec<BytesMut>>,
    /// Every core's inbox (this one's too), for handing connections over.
    peers: Vec<flume::Sender<DownMsg>>,
    /// Publish buckets of the users publishing through this core.
    user_buckets: RefCell<HashMap<String, TokenBucket>>,
    /// The core's pooled inflater (permessage-deflate resets it per message).
    pub inflater: RefCell<Inflater>,
    /// The core's compressor: one compressed twin per publication frame,
    /// shared by every session that takes compressed frames.
    deflater: RefCell<Deflater>,
    admission: RefCell<TokenBucket>,
    handshakes: Cell<usize>,
    draining: Cell<bool>,
    /// The readiness set of this core's established connections and its listener.
    pub poller: Poller,
    /// The core's `SO_REUSEPORT` listener (gone once draining).
    listener: RefCell<Option<std::net::TcpListener>>,
    /// Whether the listener is in the readiness set (out while backing off).
    listening: Cell<bool>,
    /// The next pause after an accept error.
    accept_backoff: Cell<Duration>,
    /// TLS on the client listener (wss), if configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Every session's earliest deadline.
    timers: RefCell<TimerWheel>,
    /// Sessions due at a tick (reused between ticks).
    due: RefCell<Vec<(u64, u64)>>,
    /// The server ping frame, encoded once.
    ping: Bytes,
    /// A delivery's recipients (reused between deliveries).
    recipients: RefCell<Vec<Rc<Session>>>,
    /// Sessions that queued frames this turn (each once), for the flusher.
    dirty: RefCell<Vec<Rc<Session>>>,
    flush_waker: Cell<Option<std::task::Waker>>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Core {
    /// A core with no sessions.
    pub fn new(
        id: CoreId,
        cfg: Arc<GatewayConfig>,
        verifier: Arc<Verifier>,
        up: flume::Sender<Vec<UpMsg>>,
        peers: Vec<flume::Sender<DownMsg>>,
        metrics: Arc<Metrics>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Rc<Core>> {
        let adm = &cfg.admission;
        let admission = TokenBucket::new(adm.accept_rate, adm.accept_burst, Instant::now());
        Ok(Rc::new(Core {
            id,
            verifier,
            up,
            up_batch: RefCell::new(Vec::new()),
            up_blocked: Cell::new(false),
            metrics,
            sessions: RefCell::new(HashMap::new()),
            index: RefCell::new(HashMap::new()),
            pending: RefCell::new(HashMap::new()),
            pending_deadlines: RefCell::new(VecDeque::new()),
            next_req: Cell::new(1),
            next_session: Cell::new(1),
            scratch: RefCell::new(Vec::new()),
            inflater: RefCell::new(Inflater::new()),
            deflater: RefCell::new(Deflater::default()),
            user_buckets: RefCell::new(HashMap::new()),
            peers,
            admission: RefCell::new(admission),
            handshakes: Cell::new(0),
            draining: Cell::new(false),
            poller: Poller::new()?,
            listener: RefCell::new(None),
            listening: Cell::new(false),
            accept_backoff: Cell::new(MIN_ACCEPT_BACKOFF),
            tls,
            timers: RefCell::new(TimerWheel::new(Instant::now(), TIMER_TICK, TIMER_SLOTS)),
            due: RefCell::new(Vec::new()),
            ping: SharedFrame::text(reply::PING).into_bytes(),
            recipients: RefCell::new(Vec::new()),
            dirty: RefCell::new(Vec::new()),
            flush_waker: Cell::new(None),
            cfg,
        }))
    }

    /// Reads the established connections whose sockets are ready: waits for
    /// the readiness set itself, then takes a bounded number of ready
    /// sessions per turn so handshakes and deliveries get their turns too.
    pub async fn reactor(self: Rc<Self>) {
        let waiter = match self.poller.waiter() {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(core = self.id, error = %e, "cannot poll the readiness set");
                std::process::exit(2);
            }
        };
        let mut events = crate::poller::events();
        loop {
            if let Err(e) = waiter.readable(false).await {
                tracing::error!(core = self.id, error = %e, "readiness wait failed");
                monoio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            for _ in 0..4 {
                let n = self.poller.ready(&mut events);
                for ev in &events[..n] {
                    let (id, bits) = (ev.u64, ev.events);
                    if id == LISTENER {
                        self.accept_ready();
                        continue;
                    }
                    let Some(s) = self.session(id) else { continue };
                    if bits & crate::poller::WRITE != 0 {
                        s.flush(&self);
                    }
                    if bits & (crate::poller::READ | crate::poller::HANGUP) != 0 {
                        if !s.is_closing() {
                            session::on_readable(&self, &s);
                        } else if bits & crate::poller::HANGUP != 0 {
                            s.lost(&self);
                        }
                    }
                }
                if n < events.len() {
                    break;
                }
            }
        }
    }

    /// This core's counters.
    pub fn metrics(&self) -> &CoreMetrics {
        &self.metrics.cores[self.id]
    }

    /// A fresh session id.
    pub fn next_session_id(&self) -> u64 {
        let id = self.next_session.get();
        self.next_session.set(id + 1);
        id
    }

    /// A read buffer for the duration of one read (pooled per core).
    pub fn take_scratch(&self) -> BytesMut {
        let mut b = self.scratch.borrow_mut().pop().unwrap_or_default();
        b.reserve(self.cfg.limits.max_message + 64);
        b
    }

    /// Returns a read buffer to the pool.
    pub fn give_scratch(&self, mut b: BytesMut) {
        b.clear();
        let mut pool = self.scratch.borrow_mut();
        if pool.len() < 64 {
            pool.push(b);
        }
    }

    /// An upgrade finished (either way).
    pub fn handshake_done(&self) {
        self.handshakes.set(self.handshakes.get().saturating_sub(1));
    }

    /// Tracks a new session.
    pub fn register(&self, s: &Rc<Session>) {
        self.sessions.borrow_mut().insert(s.id, s.clone());
        self.rearm(s);
        self.metrics().connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets a session: its subscriptions, presence and user.
    pub fn unregister(&self, s: &Rc<Session>) {
        self.sessions.borrow_mut().remove(&s.id);
        self.metrics().connections.fetch_sub(1, Ordering::Relaxed);
        let queued = s.queued_bytes();
        if queued > 0 {
            // The writer will not run again for a closed session.
            self.metrics().queued_bytes.fetch_sub(queued as u64, Ordering::Relaxed);
        }
        let channels: Vec<Arc<str>> = s.subs.borrow_mut().drain().map(|(c, _)| c).collect();
        for c in channels {
            self.unindex(&c, s);
        }
        if s.connected.get() {
            let user = s.user.borrow().clone();
            let key = self.cfg.namespaces.presence_channel(&user);
            let msg = ClusterMsg::UserOffline { user, client: s.client.borrow().clone() };
            self.send_up(UpMsg::Forward { key, msg });
        }
    }

    /// Queues a message for the routers; the flusher sends the turn's
    /// messages as one batch.
    fn send_up(&self, msg: UpMsg) {
        let mut batch = self.up_batch.borrow_mut();
        if batch.len() >= MAX_UP_BACKLOG {
            self.metrics().uplink_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        batch.push(msg);
        drop(batch);
        self.wake_flusher();
    }

    /// Hands this turn's messages to the uplink; a full queue keeps them
    /// for the next try (bounded by [`MAX_UP_BACKLOG`]).
    fn flush_up(&self) {
        let batch = std::mem::take(&mut *self.up_batch.borrow_mut());
        if batch.is_empty() {
            return;
        }
        match self.up.try_send(batch) {
            Ok(()) => self.up_blocked.set(false),
            Err(flume::TrySendError::Full(batch)) => {
                // Retried by the timer, not spun on.
                self.up_blocked.set(true);
                let mut kept = self.up_batch.borrow_mut();
                let newer = std::mem::replace(&mut *kept, batch);
                kept.extend(newer);
            }
            Err(flume::TrySendError::Disconnected(_)) => {}
        }
    }

    /// The shared name of a channel with local subscribers (a new one otherwise).
    fn channel_name(&self, channel: &str) -> Arc<str> {
        self.index.borrow().get(channel).map_or_else(|| Arc::from(channel), |m| m.name.clone())
    }

    /// The channel's local subscribers, in `out` (reused between calls),
    /// after `update` saw the channel's entry; the channel's shared name.
    fn members_of(
        &self,
        channel: &str,
        out: &mut Vec<Rc<Session>>,
        update: impl FnOnce(&mut Members),
    ) -> Option<Arc<str>> {
        let mut idx = self.index.borrow_mut();
        let members = idx.get_mut(channel)?;
        update(members);
        out.extend(members.sessions.values().cloned());
        Some(members.name.clone())
    }

    fn index_add(&self, channel: &Arc<str>, s: &Rc<Session>) {
        let mut idx = self.index.borrow_mut();
        let members = idx.entry(channel.clone()).or_insert_with(|| Members::new(channel.clone()));
        members.sessions.insert(s.id, s.clone());
        if members.sessions.len() == 1 {
            drop(idx);
            self.send_up(UpMsg::Interest { core: self.id, channel: channel.to_string(), on: true });
        }
    }

    fn unindex(&self, channel: &Arc<str>, s: &Session) {
        let mut idx = self.index.borrow_mut();
        if let Some(members) = idx.get_mut(channel) {
            members.sessions.remove(&s.id);
            if members.sessions.is_empty() {
                idx.remove(channel);
                drop(idx);
                self.send_up(UpMsg::Interest { core: self.id, channel: channel.to_string(), on: false });
            }
        }
        if self.cfg.namespaces.resolve_str(channel).is_ok_and(|ns| ns.presence || ns.join_leave)
            && s.connected.get()
        {
            let msg = ClusterMsg::Leave { channel: channel.to_string(), client: s.client.borrow().clone() };
            self.send_up(UpMsg::Forward { key: channel.to_string(), msg });
        }
    }

    fn request(&self, msg_for: impl FnOnce(u64) -> ClusterMsg, pending: Pending) -> Result<(), ReplyError> {
        let seq = self.next_req.get();
        self.next_req.set(seq + 1);
        let req = request_id(self.id, seq);
        if self.up_batch.borrow().len() >= MAX_UP_BACKLOG {
            self.metrics().uplink_dropped.fetch_add(1, Ordering::Relaxed);
            return Err(ReplyError::INTERNAL);
        }
        self.pending.borrow_mut().insert(req, pending);
        self.pending_deadlines.borrow_mut().push_back((Instant::now() + REQUEST_TIMEOUT, req));
        self.send_up(UpMsg::Request(msg_for(req)));
        Ok(())
    }

    /// Handles one command; `Err` closes the connection with that code.
    pub fn command(
        self: &Rc<Self>,
        s: &Rc<Session>,
        cmd: Command,
        replies: &mut Vec<Vec<u8>>,
    ) -> Result<(), Disconnect> {
        let id = cmd.id;
        tracing::debug!(core = self.id, session = s.id, id, method = cmd.method.name(), "command");
        match cmd.method {
            Method::Connect(c) => {
                if s.connected.get() {
                    return Err(Disconnect::BAD_REQUEST);
                }
                let (user, info, expires) = if c.token.is_empty() {
                    if !self.cfg.auth.allow_anonymous {
                        return Err(Disconnect::BAD_REQUEST);
                    }
                    (String::new(), None, None)
                } else {
                    match self.verifier.connection(&c.token) {
                        Ok(claims) => {
                            let exp = claims.expires_at();
                            (claims.sub.clone(), claims.info.map(|i| strip_newlines(i.get().as_bytes())), exp)
                        }
                        Err(TokenError::Expired) => {
                            replies.push(session::error(id, ReplyError::TOKEN_EXPIRED));
                            return Ok(());
                        }
                        Err(TokenError::Invalid) => return Err(Disconnect::INVALID_TOKEN),
                    }
                };
                let ttl = match expires {
                    Some(t) if t <= unix_now() => {
                        replies.push(session::error(id, ReplyError::TOKEN_EXPIRED));
                        return Ok(());
                    }
                    Some(t) => Some((t - unix_now()).min(u32::MAX as u64) as u32),
                    None => None,
                };
                let client = session::new_client_id();
                *s.client.borrow_mut() = client.clone();
                *s.user.borrow_mut() = user.clone();
                *s.conn_info.borrow_mut() = info;
                s.connected.set(true);
                s.connect_deadline.set(None);
                let now = Instant::now();
                let lim = &self.cfg.limits;
                *s.publish_bucket.borrow_mut() =
                    Some(TokenBucket::new(lim.publish_rate, lim.publish_burst, now));
                // First ping after a random ½–1 interval, so pings of a storm's
                // connections spread out.
                let ping = Duration::from_secs(lim.ping_secs.max(1) as u64);
                s.next_ping.set(now + ping.mul_f64(rand::rng().random_range(0.5..1.0)));
                s.expires_at.set(ttl.map(|t| now + Duration::from_secs(t as u64 + 25)));
                self.rearm(s);
                replies.push(session::connect_reply(id, &client, ttl, lim.ping_secs));
                let key = self.cfg.namespaces.presence_channel(&user);
                self.send_up(UpMsg::Forward { key, msg: ClusterMsg::UserOnline { user, client } });
                Ok(())
            }
            Method::Subscribe(r) => {
                match self.subscribe(s, id, r) {
                    Ok(Some(line)) => replies.push(line),
                    Ok(None) => {}
                    Err(SubscribeRefusal::Reply(e)) => replies.push(session::error(id, e)),
                    Err(SubscribeRefusal::Close(d)) => return Err(d),
                }
                Ok(())
            }
            Method::Unsubscribe(r) => {
                let removed = s.subs.borrow_mut().remove_entry(r.channel.as_str());
                if let Some((c, _)) = removed {
                    self.unindex(&c, s);
                }
                replies.push(reply::raw_reply(id, "unsubscribe", b"{}"));
                Ok(())
            }
            Method::Publish(r) => {
                let result = self.publish(s, id, r);
                if let Err(e) = result {
                    if e == ReplyError::TOO_MANY_REQUESTS {
                        s.refusals.set(s.refusals.get() + 1);
                        if s.refusals.get() > self.cfg.limits.max_refusals {
                            replies.push(session::error(id, e));
                            return Err(Disconnect::TOO_MANY_REQUESTS);
                        }
                    }
                    replies.push(session::error(id, e));
                }
                Ok(())
            }
            method @ (Method::Presence(_) | Method::PresenceStats(_)) => {
                let (Method::Presence(r) | Method::PresenceStats(r)) = &method else {
                    unreachable!("matched above")
                };
                let channel = r.channel.clone();
                let result = self.presence_allowed(&channel).and_then(|()| match method {
                    Method::Presence(_) => self.request(
                        |req| ClusterMsg::Presence { req, channel },
                        Pending::Presence { session: s.id, id },
                    ),
                    _ => self.request(
                        |req| ClusterMsg::PresenceStats { req, channel },
                        Pending::PresenceStats { session: s.id, id },
                    ),
                });
                if let Err(e) = result {
                    replies.push(session::error(id, e));
                }
                Ok(())
            }
            Method::History(r) => {
                let ns = match self.cfg.namespaces.resolve_str(&r.channel) {
                    Ok(ns) => ns,
                    Err(e) => {
                        replies.push(session::error(id, e));
                        return Ok(());
                    }
                };
                if !ns.has_history() || !ns.history_for_clients {
                    replies.push(session::error(id, ReplyError::NOT_AVAILABLE));
                    return Ok(());
                }
                let since = r.since.map(|p| (p.offset, p.epoch));
                let (channel, limit, reverse) = (r.channel, r.limit, r.reverse);
                if let Err(e) = self.request(
                    |req| ClusterMsg::History { req, channel, limit, since, reverse },
                    Pending::History { session: s.id, id },
                ) {
                    replies.push(session::error(id, e));
                }
                Ok(())
            }
            Method::Ping => {
                replies.push(reply::raw_reply(id, "ping", b"{}"));
                Ok(())
            }
            Method::Pong => {
                s.pong_due.set(None);
                Ok(())
            }
            Method::Send(_) => Ok(()),
            Method::Rpc(_) => {
                replies.push(session::error(id, ReplyError::NOT_AVAILABLE));
                Ok(())
            }
            Method::Refresh(r) => {
                let claims = match self.verifier.connection(&r.token) {
                    Ok(c) => c,
                    Err(TokenError::Expired) => return Err(Disconnect::EXPIRED),
                    Err(TokenError::Invalid) => return Err(Disconnect::INVALID_TOKEN),
                };
                if claims.sub != *s.user.borrow() {
                    return Err(Disconnect::INVALID_TOKEN);
                }
                let ttl =
                    claims.expires_at().map(|t| t.saturating_sub(unix_now()).min(u32::MAX as u64) as u32);
                s.expires_at.set(ttl.map(|t| Instant::now() + Duration::from_secs(t as u64 + 25)));
                self.rearm(s);
                replies.push(session::refresh_reply(id, &s.client.borrow(), ttl));
                Ok(())
            }
            Method::SubRefresh(r) => {
                if !s.subs.borrow().contains_key(r.channel.as_str()) {
                    replies.push(session::error(id, ReplyError::UNKNOWN_CHANNEL));
                    return Ok(());
                }
                let user = s.user.borrow().clone();
                let ttl = match self.verifier.subscription(&r.token, &r.channel, &user, &s.client.borrow()) {
                    Ok(c) => c.expires_at().map(|t| t.saturating_sub(unix_now()).min(u32::MAX as u64) as u32),
                    Err(TokenError::Expired) => {
                        replies.push(session::error(id, ReplyError::TOKEN_EXPIRED));
                        return Ok(());
                    }
                    Err(TokenError::Invalid) => return Err(Disconnect::INVALID_TOKEN),
                };
                replies.push(session::sub_refresh_reply(id, ttl));
                Ok(())
            }
            Method::Unknown => {
                replies.push(session::error(id, ReplyError::METHOD_NOT_FOUND));
                Ok(())
            }
        }
    }

    fn presence_allowed(&self, channel: &str) -> Result<(), ReplyError> {
        let ns = self.cfg.namespaces.resolve_str(channel)?;
        if ns.presence { Ok(()) } else { Err(ReplyError::NOT_AVAILABLE) }
    }

    fn publish(
        &self,
        s: &Rc<Session>,
        id: u32,
        r: proto::client::command::PublishRequest,
    ) -> Result<(), ReplyError> {
        let ns = self.cfg.namespaces.resolve_str(&r.channel)?;
        let data = r.data.ok_or(ReplyError::BAD_REQUEST)?;
        match ns.publish {
            PublishPolicy::Backend => return Err(ReplyError::PERMISSION_DENIED),
            PublishPolicy::Subscribers if !s.subs.borrow().contains_key(r.channel.as_str()) => {
                return Err(ReplyError::PERMISSION_DENIED);
            }
            _ => {}
        }
        let now = Instant::now();
        let allowed = s.publish_bucket.borrow_mut().as_mut().is_none_or(|b| b.try_take(1, now));
        if !allowed || !self.user_may_publish(&s.user.borrow(), now) {
            return Err(ReplyError::TOO_MANY_REQUESTS);
        }
        let data = strip_newlines(data.get().as_bytes());
        let info = client_info(&s.user.borrow(), &s.client.borrow(), s.conn_info.borrow().as_deref(), None);
        let channel = r.channel;
        self.request(
            |req| ClusterMsg::Publish {
                req,
                channel,
                data,
                info: Some(info),
                idempotency_key: String::new(),
            },
            Pending::Publish { session: s.id, id },
        )
    }

    fn subscribe(
        &self,
        s: &Rc<Session>,
        id: u32,
        r: proto::client::command::SubscribeRequest,
    ) -> Result<Option<Vec<u8>>, SubscribeRefusal> {
        use SubscribeRefusal::Reply;
        let name = ChannelName::parse(&r.channel).map_err(|_| Reply(ReplyError::BAD_REQUEST))?;
        let ns = self.cfg.namespaces.resolve(&name).map_err(Reply)?.clone();
        if r.kind != 0 {
            return Err(Reply(ReplyError::NOT_AVAILABLE));
        }
        if s.subs.borrow().contains_key(r.channel.as_str()) {
            return Err(Reply(ReplyError::ALREADY_SUBSCRIBED));
        }
        if s.subs.borrow().len() >= self.cfg.limits.max_subscriptions {
            return Err(Reply(ReplyError::LIMIT_EXCEEDED));
        }
        let user = s.user.borrow().clone();
        let mut chan_info = None;
        if !r.token.is_empty() {
            match self.verifier.subscription(&r.token, &r.channel, &user, &s.client.borrow()) {
                Ok(c) => chan_info = c.info.map(|i| strip_newlines(i.get().as_bytes())),
                Err(TokenError::Expired) => return Err(Reply(ReplyError::TOKEN_EXPIRED)),
                Err(TokenError::Invalid) => return Err(SubscribeRefusal::Close(Disconnect::INVALID_TOKEN)),
            }
        }
        match ns.subscribe {
            SubscribePolicy::Anyone => {}
            SubscribePolicy::Token if r.token.is_empty() => return Err(Reply(ReplyError::PERMISSION_DENIED)),
            SubscribePolicy::Token => {}
            SubscribePolicy::Personal if !name.allows_user(&user) => {
                return Err(Reply(ReplyError::PERMISSION_DENIED));
            }
            SubscribePolicy::Personal => {}
        }
        let channel = self.channel_name(&r.channel);
        if !ns.positioned() {
            s.subs.borrow_mut().insert(channel.clone(), Sub::Live { position: 0 });
            self.index_add(&channel, s);
            self.join(s, &channel, ns.presence || ns.join_leave, chan_info);
            return Ok(Some(SubscribeResult::default().reply(id)));
        }
        // The channel's position is known here: answer without a router
        // round trip, as the router would (a recovery from the very top
        // recovers nothing and is complete).
        if let Some((epoch, top)) = self.channel_position(&channel) {
            let recovered = r.recover && (r.epoch.is_empty() || *r.epoch == *epoch) && r.offset == top;
            if !r.recover || recovered {
                s.subs.borrow_mut().insert(channel.clone(), Sub::Live { position: top });
                self.index_add(&channel, s);
                self.join(s, &channel, ns.presence || ns.join_leave, chan_info);
                self.metrics().local_subscribes.fetch_add(1, Ordering::Relaxed);
                let result = SubscribeResult {
                    recoverable: ns.has_history(),
                    positioned: true,
                    epoch: epoch.to_string(),
                    offset: top,
                    recovered,
                    was_recovering: r.recover,
                    ..Default::default()
                };
                return Ok(Some(result.reply(id)));
            }
        }
        s.subs.borrow_mut().insert(channel.clone(), Sub::Pending { held: Vec::new(), held_bytes: 0 });
        self.index_add(&channel, s);
        self.join(s, &channel, ns.presence || ns.join_leave, chan_info);
        let (recover, epoch, offset) = (r.recover, r.epoch, r.offset);
        let ch = channel.to_string();
        let pending = Pending::Subscribe {
            session: s.id,
            id,
            channel: channel.clone(),
            recover,
            offset,
            flag: r.flag,
            history: ns.has_history(),
        };
        if let Err(e) =
            self.request(|req| ClusterMsg::Recover { req, channel: ch, recover, epoch, offset }, pending)
        {
            s.subs.borrow_mut().remove(&channel);
            self.unindex(&channel, s);
            return Err(Reply(e));
        }
        Ok(None)
    }

    fn join(&self, s: &Session, channel: &Arc<str>, presence: bool, chan_info: Option<Bytes>) {
        if presence {
            let info = client_info(
                &s.user.borrow(),
                &s.client.borrow(),
                s.conn_info.borrow().as_deref(),
                chan_info.as_deref(),
            );
            let msg = ClusterMsg::Join {
                channel: channel.to_string(),
                client: s.client.borrow().clone(),
                user: s.user.borrow().clone(),
                info,
            };
            self.send_up(UpMsg::Forward { key: channel.to_string(), msg });
        }
    }

    fn session(&self, id: u64) -> Option<Rc<Session>> {
        self.sessions.borrow().get(&id).cloned()
    }

    /// Handles a message from the uplink.
    pub fn inbox(self: &Rc<Self>, msg: DownMsg) {
        match msg {
            DownMsg::Deliver { channel, first, last, frame } => {
                let mut recipients = std::mem::take(&mut *self.recipients.borrow_mut());
                let Some(name) = self.members_of(&channel, &mut recipients, |m| m.advance(first, last))
                else {
                    return;
                };
                let mut n = 0;
                let mut gaps = Vec::new();
                let mut twin = None;
                for s in recipients.drain(..) {
                    let step = {
                        let mut subs = s.subs.borrow_mut();
                        match subs.get_mut(&name) {
                            // Each recipient is checked against its own position:
                            // a delivery that overtook the subscribe reply (they
                            // travel on different streams) is dropped, a hole
                            // is never passed over silently.
                            Some(Sub::Live { position }) => {
                                let step = Step::of(*position, first, last);
                                if let Step::Send(p) = step {
                                    *position = p;
                                }
                                step
                            }
                            Some(Sub::Pending { held, held_bytes }) => {
                                *held_bytes += frame.len();
                                if *held_bytes <= self.cfg.limits.max_queue_bytes {
                                    held.push((first, last, frame.clone()));
                                }
                                Step::Skip
                            }
                            None => Step::Skip,
                        }
                    };
                    match step {
                        Step::Send(_) => {
                            s.send(self, s.pick(self, &frame, &mut twin).clone());
                            n += 1;
                        }
                        Step::Skip => {}
                        Step::Gap => gaps.push(s),
                    }
                }
                *self.recipients.borrow_mut() = recipients;
                self.metrics().deliveries.fetch_add(n, Ordering::Relaxed);
                for s in gaps {
                    self.resync_session(&s, &name);
                }
            }
            DownMsg::Resync { channel } => {
                let mut recipients = Vec::new();
                let Some(name) = self.members_of(&channel, &mut recipients, |m| m.position = None) else {
                    return;
                };
                let push = unsubscribe_push(
                    &channel,
                    proto::client::codes::unsubscribe_code::INSUFFICIENT_STATE,
                    "insufficient state",
                );
                for s in recipients {
                    if s.subs.borrow_mut().remove(&name).is_some() {
                        self.unindex(&name, &s);
                        s.send_line(self, &push);
                    }
                }
            }
            DownMsg::Position { channel, epoch, top } => self.position(&channel, epoch, top),
            DownMsg::Push { channel, frame } => {
                let mut recipients = Vec::new();
                let Some(name) = self.members_of(&channel, &mut recipients, |_| {}) else { return };
                for s in recipients {
                    let live = matches!(s.subs.borrow().get(&name), Some(Sub::Live { .. }));
                    if live {
                        s.send(self, frame.clone());
                    }
                }
            }
            DownMsg::Response(msg) => self.response(msg),
            DownMsg::Reannounce => self.reannounce(),
            DownMsg::Adopt(h) => {
                session::adopt(self, *h);
            }
        }
    }

    /// The uplink told where `channel`'s stream stands for this core. A
    /// subscriber that was answered from an older position and has not
    /// reached this one missed publications: it resyncs (recovers).
    fn position(self: &Rc<Self>, channel: &Arc<str>, epoch: Arc<str>, top: u64) {
        let behind: Vec<Rc<Session>> = {
            let mut idx = self.index.borrow_mut();
            let Some(members) = idx.get_mut(channel) else { return };
            members.position = Some((epoch, top));
            members
                .sessions
                .values()
                .filter(|s| matches!(s.subs.borrow().get(channel), Some(Sub::Live { position }) if *position < top))
                .cloned()
                .collect()
        };
        for s in behind {
            self.resync_session(&s, channel);
        }
    }

    /// Where `channel`'s stream stands on this core, if the uplink told it.
    fn channel_position(&self, channel: &str) -> Option<(Arc<str>, u64)> {
        self.index.borrow().get(channel).and_then(|m| m.position.clone())
    }

    /// The permessage-deflate twin of an encoded data frame (counted in
    /// `frames_deflated`), or `None` when the payload is too small to gain.
    pub fn deflate_twin(&self, frame: &[u8]) -> Option<Bytes> {
        if frame.len() < MIN_DEFLATE_FRAME {
            return None;
        }
        let twin = SharedFrame::deflate_encoded(frame, &mut self.deflater.borrow_mut())?;
        self.metrics.frames_deflated.fetch_add(1, Ordering::Relaxed);
        Some(twin.into_bytes())
    }

    /// Puts a session in this turn's flush list (the session keeps it to once).
    pub fn mark_dirty(&self, s: Rc<Session>) {
        self.dirty.borrow_mut().push(s);
        self.wake_flusher();
    }

    fn wake_flusher(&self) {
        if let Some(w) = self.flush_waker.take() {
            w.wake();
        }
    }

    /// Writes the sessions that queued frames, once per turn: it runs after
    /// the tasks that were ready when the first frame was queued, so frames
    /// of one turn leave a socket in one syscall.
    pub async fn flusher(self: Rc<Self>) {
        let mut batch: Vec<Rc<Session>> = Vec::new();
        loop {
            std::future::poll_fn(|cx| {
                let up = !self.up_blocked.get() && !self.up_batch.borrow().is_empty();
                if self.dirty.borrow().is_empty() && !up {
                    self.flush_waker.set(Some(cx.waker().clone()));
                    std::task::Poll::Pending
                } else {
                    std::task::Poll::Ready(())
                }
            })
            .await;
            std::mem::swap(&mut batch, &mut *self.dirty.borrow_mut());
            for s in batch.drain(..) {
                s.flush(&self);
            }
            if !self.up_blocked.get() {
                self.flush_up();
            }
            if batch.capacity() > 4096 {
                batch = Vec::new();
            }
        }
    }

    /// How many cores this gateway runs.
    pub fn cores(&self) -> usize {
        self.peers.len()
    }

    /// The core a user's connections live on.
    pub fn core_of_user(&self, user: &str) -> usize {
        (proto::rendezvous::stable_hash(user.as_bytes()) % self.peers.len().max(1) as u64) as usize
    }

    /// Hands a connection to `core`; false (the socket closed) if that core
    /// cannot take it.
    pub fn hand_over(&self, core: usize, h: crate::bridge::Handover) -> bool {
        let Some(tx) = self.peers.get(core) else { return false };
        match tx.try_send(DownMsg::Adopt(Box::new(h))) {
            Ok(()) => {
                self.metrics().handovers.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                if let DownMsg::Adopt(h) = e.into_inner() {
                    // SAFETY: the fd was taken out of its stream for this hand-over
                    // and nobody else owns it.
                    drop(unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(h.fd) });
                }
                false
            }
        }
    }

    /// The per-user publish bucket (all of the user's connections on this
    /// core). Bounded: at [`MAX_USER_BUCKETS`] the buckets that refilled
    /// completely (idle users) are dropped; if none is, the user is refused.
    fn user_may_publish(&self, user: &str, now: Instant) -> bool {
        if user.is_empty() {
            return true; // anonymous connections have only their own bucket
        }
        let lim = &self.cfg.limits;
        let mut buckets = self.user_buckets.borrow_mut();
        if !buckets.contains_key(user) && buckets.len() >= MAX_USER_BUCKETS {
            buckets.retain(|_, b| !b.is_full(now));
            if buckets.len() >= MAX_USER_BUCKETS {
                return false;
            }
        }
        buckets
            .entry(user.to_owned())
            .or_insert_with(|| TokenBucket::new(lim.user_publish_rate, lim.user_publish_burst, now))
            .try_take(1, now)
    }

    /// Replays this core's presence facts (users online, joins) to the
    /// uplink, which forwards those whose owner changed.
    fn reannounce(&self) {
        let sessions: Vec<Rc<Session>> = self.sessions.borrow().values().cloned().collect();
        for s in sessions.iter().filter(|s| s.connected.get()) {
            let (user, client) = (s.user.borrow().clone(), s.client.borrow().clone());
            let key = self.cfg.namespaces.presence_channel(&user);
            let msg = ClusterMsg::UserOnline { user: user.clone(), client: client.clone() };
            self.send_up(UpMsg::Replay { key, msg });
            let channels: Vec<Arc<str>> = s.subs.borrow().keys().cloned().collect();
            for channel in channels {
                if !self.cfg.namespaces.resolve_str(&channel).is_ok_and(|ns| ns.presence || ns.join_leave) {
                    continue;
                }
                let info = client_info(&user, &client, s.conn_info.borrow().as_deref(), None);
                let msg = ClusterMsg::Join {
                    channel: channel.to_string(),
                    client: client.clone(),
                    user: user.clone(),
                    info,
                };
                self.send_up(UpMsg::Replay { key: channel.to_string(), msg });
            }
        }
    }

    /// Tells one session to resubscribe a channel (unsubscribe push 2500).
    fn resync_session(self: &Rc<Self>, s: &Rc<Session>, channel: &Arc<str>) {
        if s.subs.borrow_mut().remove(channel).is_some() {
            self.unindex(channel, s);
            let push = unsubscribe_push(
                channel,
                proto::client::codes::unsubscribe_code::INSUFFICIENT_STATE,
                "insufficient state",
            );
            s.send_line(self, &push);
        }
    }

    fn response(self: &Rc<Self>, msg: ClusterMsg) {
        let Some(req) = msg.request_id().filter(|_| msg.is_answer()) else { return };
        tracing::debug!(core = self.id, req, "response at core");
        let Some(pending) = self.pending.borrow_mut().remove(&req) else { return };
        let sid = match &pending {
            Pending::Publish { session, .. }
            | Pending::Subscribe { session, .. }
            | Pending::History { session, .. }
            | Pending::Presence { session, .. }
            | Pending::PresenceStats { session, .. } => *session,
        };
        let Some(s) = self.session(sid) else { return };
        if let ClusterMsg::RequestError { code, .. } = &msg {
            let e = ReplyError::from_code(*code);
            let id = match pending {
                Pending::Subscribe { id, channel, .. } => {
                    if s.subs.borrow_mut().remove(&channel).is_some() {
                        self.unindex(&channel, &s);
                    }
                    id
                }
                Pending::Publish { id, .. }
                | Pending::History { id, .. }
                | Pending::Presence { id, .. }
                | Pending::PresenceStats { id, .. } => id,
            };
            s.send_line(self, &session::error(id, e));
            return;
        }
        match (pending, msg) {
            (Pending::Publish { id, .. }, ClusterMsg::PublishOk { .. }) => {
                s.send_line(self, &reply::raw_reply(id, "publish", b"{}"));
            }
            (Pending::History { id, .. }, ClusterMsg::HistoryResult { epoch, top, publications, .. }) => {
                s.send_line(
                    self,
                    &reply::raw_reply(id, "history", &reply::history_result(&publications, &epoch, top)),
                );
            }
            (Pending::Presence { id, .. }, ClusterMsg::PresenceResult { entries, .. }) => {
                let body = reply::presence_result(entries.iter().map(|(c, i)| (c.as_str(), &i[..])));
                s.send_line(self, &reply::raw_reply(id, "presence", &body));
            }
            (
                Pending::PresenceStats { id, .. },
                ClusterMsg::PresenceStatsResult { num_clients, num_users, .. },
            ) => {
                let r = reply::PresenceStatsResult { num_clients, num_users };
                s.send_line(self, &reply::reply(id, "presence_stats", &r));
            }
            (
                Pending::Subscribe { id, channel, recover, offset, flag, history, .. },
                ClusterMsg::Replay { epoch, top, recovered, publications, .. },
            ) => self.subscribed(
                &s,
                id,
                channel,
                recover,
                offset,
                flag,
                history,
                epoch,
                top,
                recovered,
                publications,
            ),
            _ => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn subscribed(
        self: &Rc<Self>,
        s: &Rc<Session>,
        id: u32,
        channel: Arc<str>,
        recover: bool,
        offset: u64,
        flag: u64,
        history: bool,
        epoch: String,
        top: u64,
        recovered: bool,
        publications: Vec<proto::client::Publication>,
    ) {
        let held = match s.subs.borrow_mut().get_mut(&channel) {
            Some(sub @ Sub::Pending { .. }) => match std::mem::replace(sub, Sub::Live { position: top }) {
                Sub::Pending { held, held_bytes } => (held, held_bytes),
                Sub::Live { .. } => unreachable!("matched pending"),
            },
            _ => return, // unsubscribed meanwhile
        };
        if recover && !recovered && flag & FLAG_REJECT_UNRECOVERED != 0 {
            s.subs.borrow_mut().remove(&channel);
            self.unindex(&channel, s);
            s.send_line(self, &session::error(id, ReplyError::UNRECOVERABLE_POSITION));
            return;
        }
        let result = SubscribeResult {
            recoverable: history,
            positioned: true,
            epoch,
            offset: if recover && recovered { offset } else { top },
            publications: if recover && recovered { publications } else { Vec::new() },
            recovered: recover && recovered,
            was_recovering: recover,
            ..Default::default()
        };
        s.send_line(self, &result.reply(id));
        // Merge what arrived while waiting: skip what the reply covered, and
        // resync on anything that would leave a gap or a duplicate.
        let (held, held_bytes) = held;
        let mut position = top;
        let mut broken = held_bytes > self.cfg.limits.max_queue_bytes;
        for (first, last, frame) in held {
            if broken {
                break;
            }
            match Step::of(position, first, last) {
                Step::Send(p) => {
                    s.send(self, frame);
                    position = p;
                }
                Step::Skip => {}
                Step::Gap => broken = true,
            }
        }
        if let Some(Sub::Live { position: p }) = s.subs.borrow_mut().get_mut(&channel) {
            *p = position;
        }
        if broken {
            s.subs.borrow_mut().remove(&channel);
            self.unindex(&channel, s);
            let push = unsubscribe_push(
                &channel,
                proto::client::codes::unsubscribe_code::INSUFFICIENT_STATE,
                "insufficient state",
            );
            s.send_line(self, &push);
        }
    }

    /// The core's coarse timer, called every [`TIMER_TICK`]: the sessions
    /// whose earliest deadline came (pings, pong and connect deadlines,
    /// token expiry, drain closes, stalled writes) are taken from the
    /// wheel; the work is proportional to what is due, not to the sessions
    /// held.
    pub fn tick(self: &Rc<Self>, now: Instant) {
        if self.up_blocked.get() {
            self.flush_up();
        }
        self.expire_requests(now);
        let mut due = std::mem::take(&mut *self.due.borrow_mut());
        self.timers.borrow_mut().expire(now, &mut due);
        for &(id, tick) in &due {
            let Some(s) = self.session(id) else { continue };
            if s.timer.get() != tick {
                continue; // rescheduled earlier and already handled
            }
            s.timer.set(0);
            self.deadlines(&s, now);
            self.rearm(&s);
        }
        due.clear();
        *self.due.borrow_mut() = due;
    }

    /// Fails the router requests still unanswered at their deadline (an
    /// answer lost with a router, or dropped at a full inbox): the client
    /// gets error 100 (temporary) instead of waiting forever.
    fn expire_requests(self: &Rc<Self>, now: Instant) {
        loop {
            let req = {
                let mut deadlines = self.pending_deadlines.borrow_mut();
                match deadlines.front() {
                    Some(&(at, req)) if at <= now => {
                        deadlines.pop_front();
                        req
                    }
                    _ => return,
                }
            };
            if self.pending.borrow().contains_key(&req) {
                self.metrics().router_timeouts.fetch_add(1, Ordering::Relaxed);
                let e = ReplyError::INTERNAL;
                self.response(ClusterMsg::RequestError {
                    req,
                    code: e.code,
                    message: "router did not answer".into(),
                });
            }
        }
    }

    /// Acts on whichever of a session's deadlines passed.
    fn deadlines(self: &Rc<Self>, s: &Rc<Session>, now: Instant) {
        let write_timeout = Duration::from_secs(self.cfg.limits.write_timeout_secs.max(1));
        if s.write_stalled(now, write_timeout) {
            // A client that stops reading cannot pin its socket and queue.
            s.lost(self);
            return;
        }
        if s.is_closing() {
            return;
        }
        if s.connect_deadline.get().is_some_and(|d| now >= d) {
            if s.is_upgraded() {
                s.close(self, Disconnect::STALE.into());
            } else {
                // Slowloris: the upgrade request did not complete in time.
                let answer = handshake::error_response(408, &[], "upgrade timed out");
                session::refuse_session(self, s, answer);
            }
            return;
        }
        if s.drain_at.get().is_some_and(|d| now >= d) {
            s.close(self, Disconnect::SHUTDOWN.into());
            return;
        }
        if !s.connected.get() {
            return;
        }
        if s.pong_due.get().is_some_and(|d| now >= d) {
            s.close(self, Disconnect::NO_PONG.into());
            return;
        }
        if s.expires_at.get().is_some_and(|d| now >= d) {
            s.close(self, Disconnect::EXPIRED.into());
            return;
        }
        if now >= s.next_ping.get() {
            let ping_every = Duration::from_secs(self.cfg.limits.ping_secs.max(1) as u64);
            s.next_ping.set(now + ping_every);
            if s.pong_due.get().is_none() {
                s.pong_due.set(Some(now + Duration::from_secs(self.cfg.limits.pong_timeout_secs)));
            }
            s.send(self, self.ping.clone());
        }
    }

    /// Puts a session on the timer wheel for its earliest deadline, unless
    /// it is already there for an earlier one. Called whenever a deadline
    /// may have moved earlier; later ones are found when the earlier fires.
    pub fn rearm(&self, s: &Session) {
        let write_timeout = Duration::from_secs(self.cfg.limits.write_timeout_secs.max(1));
        let Some(at) = s.next_deadline(write_timeout) else { return };
        let mut wheel = self.timers.borrow_mut();
        let scheduled = s.timer.get();
        if scheduled == 0 || wheel.tick_for(at) < scheduled {
            s.timer.set(wheel.insert(s.id, at));
        }
    }

    /// Starts draining: stop accepting and close every session at a random
    /// moment within the drain window, with 3001 so clients reconnect elsewhere.
    pub fn drain(self: &Rc<Self>, window: Duration) {
        self.draining.set(true);
        // Stop accepting: out of the readiness set, and closed so the kernel
        // sends new connections to the other listeners on the port.
        self.set_listening(false);
        drop(self.listener.borrow_mut().take());
        let now = Instant::now();
        let mut rng = rand::rng();
        for s in self.sessions.borrow().values() {
            let at = now + window.mul_f64(rng.random_range(0.0..1.0));
            s.drain_at.set(Some(at));
            self.rearm(s);
        }
    }

    /// Whether the core drains and has no session left.
    pub fn drained(&self) -> bool {
        self.draining.get() && self.sessions.borrow().is_empty()
    }

    /// Whether the core is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.get()
    }

    /// Admission control: `Some(response)` when a new connection must be refused.
    fn admit(&self) -> Option<Vec<u8>> {
        let adm = &self.cfg.admission;
        let ok = self.handshakes.get() < adm.max_pending_handshakes
            && self.admission.borrow_mut().try_take(1, Instant::now())
            && !self.draining.get();
        if ok {
            self.handshakes.set(self.handshakes.get() + 1);
            None
        } else {
            let secs = proto::backoff::jittered_secs(
                adm.retry_after_min_secs,
                adm.retry_after_max_secs,
                &mut rand::rng(),
            );
            Some(handshake::service_unavailable(secs))
        }
    }

    /// Puts the core's listener in its readiness set: the reactor accepts
    /// from it (see [`crate::listener`]).
    pub fn listen(&self, listener: std::net::TcpListener) -> std::io::Result<()> {
        self.poller.change(listener.as_raw_fd(), LISTENER, 0, poller::READ)?;
        self.listening.set(true);
        *self.listener.borrow_mut() = Some(listener);
        Ok(())
    }

    /// The listener has connections queued: takes a bounded batch of them.
    fn accept_ready(self: &Rc<Self>) {
        for _ in 0..ACCEPTS_PER_TURN {
            let accepted = match self.listener.borrow().as_ref() {
                Some(l) => listener::accept(l),
                None => return,
            };
            match accepted {
                Accepted::Socket(fd) => {
                    self.accept_backoff.set(MIN_ACCEPT_BACKOFF);
                    self.admit_connection(fd);
                }
                Accepted::Empty => return,
                Accepted::Exhausted(e) => {
                    // EMFILE/ENFILE and friends: count, stop listening for a
                    // while (no busy loop on a listener that stays ready),
                    // keep serving the connected.
                    self.metrics().accept_errors.fetch_add(1, Ordering::Relaxed);
                    let backoff = self.accept_backoff.get();
                    self.accept_backoff.set((backoff * 2).min(MAX_ACCEPT_BACKOFF));
                    tracing::warn!(core = self.id, error = %e, ?backoff, "accept failed");
                    self.pause_listening(backoff);
                    return;
                }
            }
        }
    }

    /// Admission control, then a session for an accepted socket (or a 503).
    fn admit_connection(self: &Rc<Self>, fd: OwnedFd) {
        match self.admit() {
            None => session::accept(self, fd),
            Some(resp) => {
                self.metrics().rejections.fetch_add(1, Ordering::Relaxed);
                self.metrics().admission_rejections.fetch_add(1, Ordering::Relaxed);
                if let Ok(stream) = TcpStream::from_std(std::net::TcpStream::from(fd)) {
                    monoio::spawn(session::refuse(stream, resp));
                }
            }
        }
    }

    /// Takes the listener out of the readiness set for `pause`.
    fn pause_listening(self: &Rc<Self>, pause: Duration) {
        self.set_listening(false);
        let core = self.clone();
        monoio::spawn(async move {
            monoio::time::sleep(pause).await;
            if !core.draining.get() {
                core.set_listening(true);
            }
        });
    }

    fn set_listening(&self, on: bool) {
        let listener = self.listener.borrow();
        let Some(l) = listener.as_ref() else { return };
        if self.listening.get() == on {
            return;
        }
        let (from, to) = if on { (0, poller::READ) } else { (poller::READ, 0) };
        match self.poller.change(l.as_raw_fd(), LISTENER, from, to) {
            Ok(()) => self.listening.set(on),
            Err(e) => tracing::warn!(core = self.id, error = %e, "readiness set refused the listener"),
        }
    }
}

/// Users with a publish bucket on one core at most.
pub const MAX_USER_BUCKETS: usize = 65_536;

/// Why a subscribe was refused.
enum SubscribeRefusal {
    Reply(ReplyError),
    Close(Disconnect),
}

/// The first pause after an accept error (EMFILE…); doubled per error in a row.
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);

/// The longest pause after accept errors.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
