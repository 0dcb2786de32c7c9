//! One worker core as a state machine without IO.
//!
//! [`Core`] holds a core's sessions, its channel index (with each channel's
//! stream position), the router requests in flight, its backlog for the
//! uplink and its timer wheel. It takes events — bytes read from a session's
//! socket ([`Core::read`]), a flush of a session's queue ([`Core::flush`]),
//! a message from the uplink ([`Core::down`]), a tick ([`Core::tick`]) —
//! each with an explicit `now`, and answers with effects: frames in session
//! queues plus the dirty list, kernel [`Action`]s, and messages for the
//! uplink ([`Core::flush_up`]). It never reads the clock, never draws from
//! an unseeded generator and never touches a socket, so the production core
//! loop ([`crate::shell`]) and the deterministic simulation (`sim/`) drive
//! the very same code.
//!
//! - [`sessions`]: the slab of session records.
//! - [`channels`]: `channel → subscribers`, and where each stream stands.
//! - [`reading`]: the upgrade, WebSocket frames, moving a connection to its
//!   user's core.
//! - [`commands`]: the client protocol's commands.
//! - [`fanout`]: what the uplink delivers (publications, pushes, resyncs,
//!   positions, presence rounds).
//! - [`fallback`]: the HTTP fallback transports' requests (streams,
//!   `POST /emulation`).
//! - [`answers`]: the routers' answers to requests.
//! - [`timers`]: deadlines on the timer wheel, admission control, drain.
//! - [`requests`], [`upstream`]: requests in flight; the uplink backlog.
//! - [`users`]: the server API's commands for a user's sessions.
//! - [`proxied`]: the proxy hooks' calls and what their answers do.

pub mod answers;
pub mod channels;
pub mod commands;
pub mod fallback;
pub mod fanout;
pub mod proxied;
pub mod reading;
pub mod requests;
pub mod sessions;
pub mod timers;
pub mod upstream;
pub mod users;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use proto::backoff::RetrySchedule;
use proto::client::reply::{self, client_info, unsubscribe_push};
use proto::client::{Disconnect, ReplyError, codes::unsubscribe_code};
use proto::cluster::ClusterMsg;
use proto::seeded::{self, Map};
use proto::timer_wheel::TimerWheel;
use proto::token_bucket::TokenBucket;
use proto::ws::SharedFrame;
use proto::ws::deflate::{Deflater, Inflater};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::auth::Verifier;
use crate::bridge::{CoreId, DownMsg, Moved, UpMsg};
use crate::config::GatewayConfig;
use crate::effects::{Action, Effects, Sid};
use crate::metrics::Metrics;
use crate::session::ClientId;
use crate::session::outbound::{Flushed, Written};
use crate::session::subs::SubState;
use crate::session::{CloseReason, Deflate, Session};
use channels::ChannelIndex;
use requests::Requests;
use sessions::Sessions;
use upstream::Upstream;

pub use crate::effects::Got;

/// The granularity of each core's timer: deadlines are kept to within it.
pub const TIMER_TICK: Duration = Duration::from_millis(250);

/// Slots of the timer wheel (one turn: 64 s; later deadlines wait turns).
const TIMER_SLOTS: usize = 256;

/// Frames shorter than this (header included) go out uncompressed even to
/// sessions that negotiated permessage-deflate: a fresh-window deflate of a
/// few dozen bytes rarely comes out smaller.
const MIN_DEFLATE_FRAME: usize = 96;

/// Users with a publish bucket on one core at most.
pub const MAX_USER_BUCKETS: usize = 65_536;

/// The core's time: milliseconds since it started (never 0, so 0 can mean
/// "no deadline"), and the wall clock it started at (token expiry).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
    unix_at_origin: u64,
}

impl Clock {
    /// A clock starting at `origin`, when the wall clock read `unix_secs`.
    pub fn new(origin: Instant, unix_secs: u64) -> Clock {
        Clock { origin, unix_at_origin: unix_secs }
    }

    /// `now` in core milliseconds.
    pub fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_millis() as u64 + 1
    }

    /// Core milliseconds as an instant.
    pub fn at(&self, ms: u64) -> Instant {
        self.origin + Duration::from_millis(ms.saturating_sub(1))
    }

    /// Unix seconds at core milliseconds `ms`.
    pub fn unix(&self, ms: u64) -> u64 {
        self.unix_at_origin + ms / 1000
    }
}

/// Everything a session's handling may touch besides the sessions
/// themselves (split so a handler can hold one session and the core's
/// tables at once).
pub struct Ctx {
    /// This core's index.
    pub id: CoreId,
    /// Cores in this gateway.
    pub cores: usize,
    /// Configuration.
    pub cfg: Arc<GatewayConfig>,
    verifier: Arc<Verifier>,
    /// Time.
    pub clock: Clock,
    rng: SmallRng,
    /// Channel index.
    pub channels: ChannelIndex,
    requests: Requests,
    up: Upstream,
    timers: TimerWheel,
    /// Effects for the shell.
    pub fx: Effects,
    admission: TokenBucket,
    /// The refused clients' `Retry-After` slots: at the rate pending
    /// handshakes drain while they queue, else at the admission rate.
    retry_slots: RetrySchedule,
    /// Handshakes finished since `drain_since` (their rate paces the slots).
    drained: u32,
    drain_since: Instant,
    handshakes: usize,
    draining: bool,
    inflater: Inflater,
    deflater: Deflater,
    ping: Bytes,
    user_buckets: Map<Arc<str>, TokenBucket>,
    users: users::UserIndex,
    proxied: proxied::Proxied,
    scratch: Vec<BytesMut>,
    /// The key of the emulated sessions' secrets: a session's `session`
    /// is its id and the 128-bit HMAC-SHA256 of it under this key (from
    /// the OS in production), so no table is kept per session and nobody
    /// who only saw the session's client id can name it.
    session_mac: ring::hmac::Key,
    /// Emulation requests relayed to other gateway processes, per second.
    relays: TokenBucket,
    /// Emulation requests read here waiting for another core's word.
    waiting: Map<Sid, fallback::Waiting>,
    /// When the oldest delivery not yet flushed reached the core (the
    /// shell's flush measures its hops to the first and last write).
    write_probe: Option<Instant>,
}

/// A worker core's state machine.
pub struct Core {
    sessions: Sessions,
    cx: Ctx,
}

/// What a core is built from.
pub struct CoreSpec {
    /// This core's index.
    pub id: CoreId,
    /// Cores in this gateway.
    pub cores: usize,
    /// Configuration.
    pub cfg: Arc<GatewayConfig>,
    /// Token verification.
    pub verifier: Arc<Verifier>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Seed of the core's generator and hash tables (random in production).
    pub seed: u64,
    /// When the core starts.
    pub now: Instant,
    /// The wall clock then (Unix seconds).
    pub unix_now: u64,
    /// Messages the core holds for the uplink before it refuses new work
    /// ([`upstream::MAX_UP_BACKLOG`] in production).
    pub up_backlog: usize,
    /// Seed of the generator of emulated sessions' secrets (from the OS in
    /// production: a session's secret is the right to send its commands).
    pub secret_seed: [u8; 32],
}

impl Core {
    /// A core with no sessions.
    pub fn new(spec: CoreSpec) -> Core {
        let CoreSpec { id, cores, cfg, verifier, metrics, seed, now, unix_now, up_backlog, secret_seed } =
            spec;
        let adm = &cfg.admission;
        Core {
            sessions: Sessions::default(),
            cx: Ctx {
                id,
                cores: cores.max(1),
                verifier,
                clock: Clock::new(now, unix_now),
                rng: SmallRng::seed_from_u64(seed),
                channels: ChannelIndex::new(seed ^ 0x9e37_79b9),
                requests: Requests::new(id, seed ^ 0x7f4a_7c15),
                up: Upstream::new(up_backlog),
                timers: TimerWheel::new(now, TIMER_TICK, TIMER_SLOTS),
                fx: Effects::new(metrics, id),
                admission: TokenBucket::new(adm.accept_rate, adm.accept_burst, now),
                retry_slots: RetrySchedule::new(
                    adm.accept_rate,
                    adm.retry_after_min_secs,
                    adm.retry_after_max_secs,
                ),
                drained: 0,
                drain_since: now,
                handshakes: 0,
                draining: false,
                inflater: Inflater::new(),
                deflater: Deflater::default(),
                ping: SharedFrame::text(reply::PING).into_bytes(),
                user_buckets: seeded::map(seed ^ 0x3c6e_f372),
                users: users::UserIndex::new(seed ^ 0x5be0_cd19),
                proxied: proxied::Proxied::new(seed ^ 0x1f83_d9ab),
                scratch: Vec::new(),
                session_mac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret_seed),
                relays: TokenBucket::new(
                    cfg.fallback.relay_rate,
                    cfg.fallback.relay_rate.max(1.0) as u32,
                    now,
                ),
                waiting: seeded::map(seed ^ 0xbb67_ae85),
                write_probe: None,
                cfg,
            },
        }
    }

    /// This core's index.
    pub fn id(&self) -> CoreId {
        self.cx.id
    }

    /// The effects of the events fed so far (the shell drains them).
    pub fn effects(&mut self) -> &mut Effects {
        &mut self.cx.fx
    }

    /// When the oldest delivery not yet flushed reached the core, taken
    /// by the flush that writes it (for the per-hop latency).
    pub fn take_write_probe(&mut self) -> Option<Instant> {
        self.cx.write_probe.take()
    }

    /// Whether sessions queued frames since the shell last flushed.
    pub fn has_writes(&self) -> bool {
        !self.cx.fx.dirty.is_empty()
    }

    /// Sessions held (any phase).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// A session, for inspection (tests, the simulation).
    pub fn session(&self, sid: Sid) -> Option<&Session> {
        self.sessions.get(sid)
    }

    /// The channel index, for inspection.
    pub fn channels(&self) -> &ChannelIndex {
        &self.cx.channels
    }

    /// Router requests in flight.
    pub fn requests_in_flight(&self) -> usize {
        self.cx.requests.len()
    }

    /// Messages waiting for the uplink.
    pub fn backlog(&self) -> usize {
        self.cx.up.len()
    }

    /// Whether messages wait for the uplink and the last offer did not fail
    /// (the shell offers them at the end of the turn; a blocked backlog
    /// waits for the timer).
    pub fn wants_up(&self) -> bool {
        !self.cx.up.is_empty() && !self.cx.up.is_blocked()
    }

    /// Offers the backlog to the uplink; `send` gives it back when the
    /// uplink's queue is full.
    pub fn flush_up(&mut self, send: impl FnOnce(Vec<UpMsg>) -> Result<(), Vec<UpMsg>>) {
        self.cx.up.offer(send);
    }

    /// A new connection's socket (admission control decides: either a
    /// session waiting for its upgrade request, or one ending with a 503).
    pub fn accept(&mut self, now: Instant) -> Sid {
        let ms = self.cx.clock.ms(now);
        let refusal = self.cx.admit(now, self.sessions.len());
        let upgrade_by = ms + self.cx.cfg.limits.handshake_timeout_secs * 1000;
        let sid = self.sessions.insert(Session::new(upgrade_by));
        self.cx.fx.metrics().connections.fetch_add(1, Ordering::Relaxed);
        let s = self.sessions.get_mut(sid).expect("just inserted");
        s.watch(sid, &mut self.cx.fx);
        match refusal {
            None => {
                self.cx.handshakes += 1;
                s.counted = true;
                self.cx.fx.metrics().pending_handshakes.store(self.cx.handshakes as u64, Ordering::Relaxed);
            }
            Some(answer) => {
                self.cx.fx.metrics().rejections.fetch_add(1, Ordering::Relaxed);
                self.cx.fx.metrics().admission_rejections.fetch_add(1, Ordering::Relaxed);
                s.placed = true;
                s.refuse(sid, answer, &mut self.cx.fx);
            }
        }
        self.cx.rearm(s, sid);
        sid
    }

    /// A connection another core handed over (its user lives here): its
    /// first message is handled now.
    pub fn adopt(&mut self, moved: Moved, now: Instant) -> Sid {
        let ms = self.cx.clock.ms(now);
        let mut s = Session::new(0);
        s.upgraded(ms + self.cx.cfg.limits.connect_timeout_secs * 1000);
        s.deflate = moved.deflate;
        s.transport = moved.transport;
        if s.transport.is_http() {
            self.cx.fx.metrics().fallback_open.fetch_add(1, Ordering::Relaxed);
        }
        s.proxy = moved.proxy;
        s.placed = true;
        let sid = self.sessions.insert(s);
        self.cx.fx.metrics().connections.fetch_add(1, Ordering::Relaxed);
        let s = self.sessions.get_mut(sid).expect("just inserted");
        s.watch(sid, &mut self.cx.fx);
        for f in moved.unsent {
            s.queue_framed(sid, f, usize::MAX, &mut self.cx.fx);
        }
        self.cx.rearm(s, sid);
        // A connection moved with the connect hook's answer resumes at the
        // connect that asked.
        let from = match s.proxy.as_ref().map(|p| &p.connect) {
            Some(crate::session::ConnectHook::Answered { from, .. }) => *from,
            _ => 0,
        };
        self.handle_frame_from(sid, &moved.message, from, ms);
        if !moved.pending.is_empty() && self.sessions.get(sid).is_some_and(|s| !s.is_ending()) {
            let mut b = self.cx.take_scratch();
            b.extend_from_slice(&moved.pending);
            self.feed(sid, b, ms);
        }
        self.settle();
        sid
    }

    /// The session's socket hung up or failed: the session ends now,
    /// discarding what is queued.
    pub fn lost(&mut self, sid: Sid, _now: Instant) {
        self.finish(sid);
    }

    /// Writes the session's queue: `write` is the shell's non-blocking
    /// write (it pops what it wrote and says whether the socket took all);
    /// its flag says the write side ends once all is written
    /// ([`Session::ends_after_flush`]).
    pub fn flush(
        &mut self,
        sid: Sid,
        now: Instant,
        write: impl FnOnce(&mut VecDeque<Bytes>, bool) -> (std::io::Result<Flushed>, Written),
    ) {
        let ms = self.cx.clock.ms(now);
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let ends = s.ends_after_flush();
        let (result, written) = write(s.outbound().frames_mut(), ends);
        let failed = result.is_err();
        if s.flushed(sid, result, written, ms, &mut self.cx.fx) {
            // Over: the socket failed, or the close handshake completed
            // (then a wss session's close_notify goes first).
            self.finish_with(sid, !failed);
            return;
        }
        self.cx.rearm(s, sid);
    }

    /// The session has something for the socket besides its queue (TLS
    /// records): it joins the dirty list.
    pub fn wants_flush(&mut self, sid: Sid) {
        if let Some(s) = self.sessions.get_mut(sid) {
            s.wants_flush(sid, &mut self.cx.fx);
        }
    }

    /// A message from the uplink.
    pub fn down(&mut self, msg: DownMsg, now: Instant) {
        let ms = self.cx.clock.ms(now);
        match msg {
            DownMsg::Deliver { channel, epoch, first, last, frame, at } => {
                self.cx.fx.gateway_metrics().hop_uplink_to_core.record(now.saturating_duration_since(at));
                // The flush that writes it measures the hops to its writes.
                self.cx.write_probe.get_or_insert(now);
                self.deliver(&channel, &epoch, first, last, frame, ms)
            }
            DownMsg::Push { channel, frame } => self.push(&channel, frame),
            DownMsg::Response(msg) => self.answer(msg, ms),
            DownMsg::Reannounce { round } => self.reannounce(round),
            DownMsg::Resync { channel } => self.resync_channel(&channel, ms),
            DownMsg::Position { channel, epoch, top } => self.position(&channel, epoch, top),
        }
        self.settle();
    }

    /// Ends a session's protocol life (subscriptions, presence) and starts
    /// its close: the close frame goes out after what is queued, then the
    /// session lingers.
    fn close(&mut self, sid: Sid, reason: CloseReason) {
        self.retire(sid);
        if let Some(s) = self.sessions.get_mut(sid) {
            if !s.is_ending() {
                self.cx.fx.metrics().closed(reason.code);
            }
            s.close(sid, reason, &mut self.cx.fx);
            self.cx.rearm(s, sid);
        }
    }

    /// Refuses an upgrade with an HTTP answer (written, then the socket
    /// lingers and closes).
    fn refuse(&mut self, sid: Sid, answer: Vec<u8>) {
        self.cx.fx.metrics().rejections.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = self.sessions.get_mut(sid) {
            self.cx.handshake_done(s, false);
            s.refuse(sid, answer, &mut self.cx.fx);
            self.cx.rearm(s, sid);
        }
    }

    /// The session is over: out of every table, socket released.
    fn finish(&mut self, sid: Sid) {
        self.finish_with(sid, false);
    }

    /// [`finish`](Self::finish); `notify`: the close handshake completed
    /// and the write side is still open (a wss session's close_notify is
    /// due before the socket closes).
    fn finish_with(&mut self, sid: Sid, notify: bool) {
        self.retire(sid);
        self.cx.waiting.remove(&sid);
        let Some(mut s) = self.sessions.remove(sid) else { return };
        self.cx.handshake_done(&mut s, false);
        if s.transport.is_http() {
            self.cx.fx.metrics().fallback_open.fetch_sub(1, Ordering::Relaxed);
        }
        let left = s.outbound().clear();
        self.cx.fx.metrics().queued_bytes.fetch_sub(left as u64, Ordering::Relaxed);
        self.cx.fx.metrics().connections.fetch_sub(1, Ordering::Relaxed);
        self.cx.fx.act(Action::Release { sid, notify });
    }

    /// Withdraws what a session holds in the core's tables and the
    /// routers' views: its subscriptions (interest, presence) and, if it
    /// was connected, its user's connection. Idempotent.
    fn retire(&mut self, sid: Sid) {
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let connected = s.is_connected();
        for (name, state) in s.subs.take() {
            if let SubState::Pending(p) = &state {
                self.cx.requests.finish(p.req);
            }
            self.cx.unindex(&name, sid, connected.then(|| s.identity.client.text()).as_deref());
        }
        if connected {
            let user = s.identity.user.clone();
            self.cx.users.remove(&user, sid);
            if !user.is_empty() {
                let key = self.cx.cfg.namespaces.presence_channel(&user);
                let msg =
                    ClusterMsg::UserOffline { user: user.to_string(), client: s.identity.client.to_string() };
                self.cx.up.push(UpMsg::Forward { key, msg });
            }
        }
    }

    /// Tells one session to resubscribe a channel (unsubscribe push 2500):
    /// it recovers from its own position through a router.
    /// A server-side subscription is the server's to restore: its session
    /// closes with 3010 (the client reconnects and recovers).
    fn resync_session(&mut self, sid: Sid, channel: &str) {
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let resynced = &self.cx.fx.gateway_metrics().subscriptions_resynced;
        if s.is_server_sub(channel) {
            resynced.fetch_add(1, Ordering::Relaxed);
            return self.close(sid, Disconnect::INSUFFICIENT_STATE.into());
        }
        let Some((name, state)) = s.subs.remove(channel) else { return };
        resynced.fetch_add(1, Ordering::Relaxed);
        if let SubState::Pending(p) = &state {
            self.cx.requests.finish(p.req);
        }
        let client = s.is_connected().then(|| s.identity.client.text());
        let push = unsubscribe_push(channel, unsubscribe_code::INSUFFICIENT_STATE, "insufficient state");
        self.cx.send_line(s, sid, &push);
        self.cx.unindex(&name, sid, client.as_deref());
    }
}

impl Ctx {
    /// A read buffer for the duration of one read (pooled per core).
    fn take_scratch(&mut self) -> BytesMut {
        let mut b = self.scratch.pop().unwrap_or_default();
        b.reserve(self.cfg.limits.max_message + 64);
        b
    }

    /// Returns a read buffer to the pool.
    fn give_scratch(&mut self, mut b: BytesMut) {
        b.clear();
        if self.scratch.len() < 64 {
            self.scratch.push(b);
        }
    }

    /// A session's handshake is over (upgraded, refused, answered or
    /// gone): it no longer counts toward `max_pending_handshakes`. Once.
    /// `completed`: upgraded or answered, what the pace of retries counts
    /// (a refusal or a hang-up is not the core taking a client).
    fn handshake_done(&mut self, s: &mut Session, completed: bool) {
        if std::mem::take(&mut s.counted) {
            self.handshakes = self.handshakes.saturating_sub(1);
            if completed {
                self.drained = self.drained.saturating_add(1);
            }
            self.fx.metrics().pending_handshakes.store(self.handshakes as u64, Ordering::Relaxed);
        }
    }

    /// The proxy state of a session whose request head is `head`, when the
    /// proxy forwards some of its headers (configured and present).
    fn forwarded(&self, head: &[u8]) -> Option<Box<crate::session::SessionProxy>> {
        let headers = &self.cfg.proxy.http_headers;
        let h = (!headers.is_empty() && self.cfg.proxy.enabled())
            .then(|| proto::ws::handshake::headers_named(head, headers))
            .filter(|h| !h.is_empty())?;
        Some(Box::new(crate::session::SessionProxy { headers: h.into(), ..Default::default() }))
    }

    /// The secret half of session `sid`'s emulation name.
    fn session_mac(&self, sid: Sid) -> [u8; 16] {
        let tag = ring::hmac::sign(&self.session_mac, &sid.0.to_be_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&tag.as_ref()[..16]);
        out
    }

    /// The `session` an emulated session's connect reply names.
    fn session_name(&self, sid: Sid) -> String {
        let mac = self.session_mac(sid);
        let mut out = format!("{:016x}", sid.0);
        for b in mac {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    /// The session a `session` names, if it is one of this core's names
    /// (the MAC checked in constant time).
    fn session_named(&self, session: &str) -> Option<Sid> {
        let (sid, mac) = fallback::parse_session(session)?;
        let want = self.session_mac(sid);
        let diff = want.iter().zip(mac.iter()).fold(0u8, |d, (a, b)| d | (a ^ b));
        (diff == 0).then_some(sid)
    }

    /// The outbound queue bound of a session.
    fn queue_limit(&self) -> usize {
        self.cfg.limits.max_queue_bytes
    }

    /// Queues a client-protocol line (a reply or a push) as its own frame.
    fn send_line(&mut self, s: &mut Session, sid: Sid, line: &[u8]) {
        self.send_own(s, sid, SharedFrame::text(line));
    }

    /// Queues a data frame built for this session alone (replies, echoes):
    /// compressed when the session takes compressed frames and it pays.
    fn send_own(&mut self, s: &mut Session, sid: Sid, frame: SharedFrame) {
        let packed = match s.deflate {
            Deflate::Both => self.deflate_twin(frame.bytes()),
            Deflate::Off | Deflate::Inbound => None,
        };
        let limit = self.queue_limit();
        s.queue(sid, packed.unwrap_or_else(|| frame.into_bytes()), limit, &mut self.fx);
    }

    /// The permessage-deflate twin of an encoded data frame (counted in
    /// `frames_deflated`), or `None` when the payload is too small to gain.
    fn deflate_twin(&mut self, frame: &[u8]) -> Option<Bytes> {
        if frame.len() < MIN_DEFLATE_FRAME {
            return None;
        }
        let twin = SharedFrame::deflate_encoded(frame, &mut self.deflater)?;
        self.fx.gateway_metrics().frames_deflated.fetch_add(1, Ordering::Relaxed);
        Some(twin.into_bytes())
    }

    /// Removes a subscriber from the channel index, telling the uplink when
    /// it was the channel's last on this core, and the channel's router
    /// when the client was in its presence (`client`: the connected
    /// client's id).
    fn unindex(&mut self, name: &Arc<str>, sid: Sid, client: Option<&str>) {
        if self.channels.remove(name, sid) {
            self.up.push(UpMsg::Interest { core: self.id, channel: name.clone(), on: false });
        }
        if let Some(client) = client
            && self.cfg.namespaces.resolve_str(name).is_ok_and(|ns| ns.presence || ns.join_leave)
        {
            let msg = ClusterMsg::Leave { channel: name.to_string(), client: client.to_owned() };
            self.up.push(UpMsg::Forward { key: name.to_string(), msg });
        }
    }

    /// Adds a subscriber to the channel index, telling the uplink when it is
    /// the channel's first on this core.
    fn index(&mut self, name: &Arc<str>, sid: Sid, follows: bool) {
        if self.channels.add(name, sid, follows) {
            self.up.push(UpMsg::Interest { core: self.id, channel: name.clone(), on: true });
        }
    }

    /// Tells the channel's router that a connected client joined it, when
    /// the namespace keeps presence or join/leave pushes.
    fn join(&mut self, s: &Session, channel: &Arc<str>, chan_info: Option<&[u8]>) {
        let id = &s.identity;
        let info = client_info(&id.user, &id.client.text(), id.info(), chan_info);
        let msg = ClusterMsg::Join {
            channel: channel.to_string(),
            client: id.client.to_string(),
            user: id.user.to_string(),
            info,
        };
        self.up.push(UpMsg::Forward { key: channel.to_string(), msg });
    }

    /// A router request for `sid`: error 100 while the uplink backlog is
    /// full, 111 past the session's requests in flight.
    /// The client's requests are bounded apart from the server-side
    /// subscriptions the session is waiting for.
    fn request(
        &mut self,
        s: &Session,
        sid: Sid,
        kind: requests::Kind,
        now: u64,
        msg_for: impl FnOnce(u64) -> ClusterMsg,
    ) -> Result<u64, ReplyError> {
        // The subscriptions are looked at only when the client's own bound is reached.
        let mut limit = self.cfg.limits.max_requests_in_flight;
        if self.requests.of(sid) as usize >= limit {
            limit += s.subs.pending_server();
        }
        self.request_within(sid, kind, now, limit, msg_for)
    }

    /// [`request`](Self::request) with a session bound of `limit` requests
    /// in flight (server-side subscriptions, bounded by the subscription
    /// limit, may add that many to the client's own).
    fn request_within(
        &mut self,
        sid: Sid,
        kind: requests::Kind,
        now: u64,
        limit: usize,
        msg_for: impl FnOnce(u64) -> ClusterMsg,
    ) -> Result<u64, ReplyError> {
        self.request_room(sid, limit)?;
        Ok(self.start_request(sid, kind, now, msg_for))
    }

    /// Makes a router request for `sid` that [`request_room`](Self::request_room)
    /// found room for; its id.
    fn start_request(
        &mut self,
        sid: Sid,
        kind: requests::Kind,
        now: u64,
        msg_for: impl FnOnce(u64) -> ClusterMsg,
    ) -> u64 {
        let req = self.requests.start(sid, kind, now);
        self.up.push(UpMsg::Request(msg_for(req)));
        req
    }

    /// Whether a router request for `sid` can be made now: error 100 while
    /// the uplink backlog is full (counted), 111 with `limit` requests of
    /// the session in flight.
    fn request_room(&mut self, sid: Sid, limit: usize) -> Result<(), ReplyError> {
        if !self.up.has_room() {
            self.fx.metrics().uplink_dropped.fetch_add(1, Ordering::Relaxed);
            return Err(ReplyError::INTERNAL);
        }
        if self.requests.of(sid) as usize >= limit {
            return Err(ReplyError::TOO_MANY_REQUESTS);
        }
        Ok(())
    }

    /// A fresh random connection id.
    fn client_id(&mut self) -> ClientId {
        ClientId::random(&mut self.rng)
    }
}
