//! One client connection as the core's state machine sees it: a small
//! record, no socket, no task, no buffer while idle.
//!
//! A session goes through [`Phase`]s: the HTTP upgrade is read
//! (`Upgrading`), then it waits for `connect` (`Open`), serves
//! (`Connected`), and ends by `Closing` (the close frame, or an HTTP
//! refusal, is queued behind what is left to write) and `Lingering`: once
//! the close is written the shell shuts down the write side, and the session
//! reads and discards what the client still sends, for at most
//! [`LINGER`] and [`LINGER_BYTES`], before the socket is closed. Closing a
//! socket with unread input makes the kernel answer with a reset, and a
//! reset makes the client's kernel throw away the close frame it had not
//! read yet: the lingering close is what lets a flooding client see 3013
//! rather than a broken pipe. A client that closed first (its close frame
//! read with nothing after it) has nothing left to send: once the answer
//! is written its socket is closed at once, without the lingering.
//!
//! - [`subs`]: the session's subscriptions and where each stands.
//! - [`outbound`]: the bounded queue of shared frames.

pub mod outbound;
pub mod subs;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proto::client::Disconnect;
use proto::fallback::Transport;
use proto::ws::{Decoder, SharedFrame};

pub use crate::bridge::Deflate;
use crate::effects::{Action, Effects, Sid};
use outbound::{Flushed, Outbound, Written};
use subs::Subs;

/// Version string in connect replies.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Longest a closed session reads and discards what its client still sends.
pub const LINGER: Duration = Duration::from_secs(2);

/// Most bytes a closed session reads and discards before it stops waiting.
pub const LINGER_BYTES: usize = 256 * 1024;

/// How long an HTTP stream's end (its last chunk) waits after its
/// disconnect push. centrifuge-js's `http_stream` transport handles the end
/// of the response at once but a push a few promise turns later, so a push
/// and an end that arrive together lose the push (the client would see
/// "transport closed" instead of, say, 3001): the SDK closes the stream
/// itself on the push, and the server's end comes after only if it did not.
pub const STREAM_TAIL_DELAY: Duration = Duration::from_millis(250);

/// Why a session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    /// WebSocket close code.
    pub code: u16,
    /// Close reason.
    pub reason: &'static str,
}

impl From<Disconnect> for CloseReason {
    fn from(d: Disconnect) -> Self {
        CloseReason { code: d.code, reason: d.reason }
    }
}

/// A connection lost without a close handshake (never sent: it only ends the session).
pub const LOST: CloseReason = CloseReason { code: 1006, reason: "" };

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The HTTP upgrade request is being read.
    Upgrading,
    /// Upgraded; `connect` not yet accepted.
    Open,
    /// `connect` accepted.
    Connected,
    /// Ending: what is queued, then the close, is being written.
    Closing,
    /// The close is written and the write side shut down; reading and
    /// discarding until the client closes, [`LINGER`] or [`LINGER_BYTES`].
    Lingering,
}

/// A connection's id: a random UUID (the gateway makes every one), kept as
/// its 16 bytes and written out in its 36-character form where it is sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientId([u8; 16]);

impl ClientId {
    /// A fresh random id.
    pub fn random(rng: &mut impl rand::Rng) -> ClientId {
        ClientId(rng.random())
    }

    /// The id's text form (`8-4-4-4-12` lowercase hex), on the stack.
    pub fn text(&self) -> ClientText {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b'-'; 36];
        let mut at = 0;
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                at += 1;
            }
            out[at] = HEX[usize::from(b >> 4)];
            out[at + 1] = HEX[usize::from(b & 15)];
            at += 2;
        }
        ClientText(out)
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

/// A [`ClientId`] written out.
#[derive(Debug, Clone, Copy)]
pub struct ClientText([u8; 36]);

impl std::ops::Deref for ClientText {
    type Target = str;
    fn deref(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits and dashes")
    }
}

/// Who the connection is, once `connect` succeeded.
#[derive(Debug, Default)]
pub struct Identity {
    /// Connection id sent to the client.
    pub client: ClientId,
    /// User id (`""` anonymous).
    pub user: Arc<str>,
    /// `conn_info` from the connection token (boxed: most have none).
    pub conn_info: Option<Box<Bytes>>,
}

impl Identity {
    /// `conn_info`, if any.
    pub fn info(&self) -> Option<&[u8]> {
        self.conn_info.as_deref().map(Bytes::as_ref)
    }
}

/// The session's rate budgets: the tokens left in its publish and request
/// buckets (rates and bursts are the configuration's), refilled together.
/// `f32` counts whole tokens exactly up to 2^24, far past any burst a
/// session is given.
/// Kept inline, 16 bytes: most sessions send at least a subscribe.
#[derive(Debug, Clone, Copy, Default)]
pub struct Budget {
    publish: f32,
    requests: f32,
    /// When both were last refilled (core milliseconds); 0: never used,
    /// both full.
    at: u64,
}

/// One bucket's rate (tokens per second) and burst.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// Tokens per second.
    pub per_sec: f64,
    /// The bucket's size.
    pub burst: u32,
}

impl Budget {
    fn refill(&mut self, publish: Rate, requests: Rate, now: u64) {
        if self.at == 0 {
            (self.publish, self.requests) = (publish.burst.max(1) as f32, requests.burst.max(1) as f32);
        } else {
            let secs = now.saturating_sub(self.at) as f64 / 1000.0;
            let fill = |tokens: f32, r: Rate| {
                (tokens as f64 + secs * r.per_sec.max(0.0)).min(r.burst.max(1) as f64) as f32
            };
            (self.publish, self.requests) = (fill(self.publish, publish), fill(self.requests, requests));
        }
        self.at = self.at.max(now).max(1);
    }

    /// Takes a publish token at `now` (core ms) if there is one.
    pub fn take_publish(&mut self, publish: Rate, requests: Rate, now: u64) -> bool {
        self.refill(publish, requests, now);
        take(&mut self.publish)
    }

    /// Takes a request token at `now` (core ms) if there is one.
    pub fn take_request(&mut self, publish: Rate, requests: Rate, now: u64) -> bool {
        self.refill(publish, requests, now);
        take(&mut self.requests)
    }
}

fn take(tokens: &mut f32) -> bool {
    if *tokens >= 1.0 {
        *tokens -= 1.0;
        true
    } else {
        false
    }
}

/// A read's leftovers (see `Session::reading`).
#[derive(Debug, Default)]
struct Reading {
    decoder: Option<Box<Decoder>>,
    partial: Vec<u8>,
}

/// A session's deadlines.
#[derive(Debug, Default, Clone, Copy)]
pub struct Deadlines {
    /// The deadline of the phase: upgrading, the upgrade's; open, the
    /// connect's; lingering, when it stops waiting for its client.
    pub phase_by: Due,
    /// When the next server ping is due.
    pub next_ping: Due,
    /// When the outstanding pong is due.
    pub pong_due: Due,
    /// When the connection expires (token `exp`), with its grace added.
    pub expires_at: Due,
    /// When a drain closes this session.
    pub drain_at: Due,
}

/// A deadline in 4 bytes: a core-clock moment rounded **up** to the core's
/// timer tick, the only resolution deadlines act at (the wheel fires at
/// tick boundaries). `u32` ticks of 250 ms last 34 years of a core's life;
/// later ones saturate.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Due(u32);

/// The unit of [`Due`], in milliseconds: the core's timer tick.
const DUE_MS: u64 = crate::core::TIMER_TICK.as_millis() as u64;

impl Due {
    /// No deadline.
    pub const NONE: Due = Due(0);

    /// The deadline at `ms` core milliseconds (0: none), rounded up to a tick.
    pub fn at(ms: u64) -> Due {
        Due(u32::try_from(ms.div_ceil(DUE_MS)).unwrap_or(u32::MAX))
    }

    /// In core milliseconds (0: none); never earlier than asked.
    pub fn ms(self) -> u64 {
        u64::from(self.0) * DUE_MS
    }

    /// Whether there is a deadline.
    pub fn is_set(self) -> bool {
        self.0 != 0
    }
}

/// A connect reply that waits for the token's subscriptions: sent, with
/// every result in its `subs`, once the last router answer is in.
#[derive(Debug)]
pub struct PendingConnect {
    /// The connect command's id.
    pub id: u32,
    /// The reply, but for `subs`.
    pub result: proto::client::reply::ConnectResult,
    /// The `subs` object so far (`{` and the results known at connect).
    pub subs_json: Vec<u8>,
    /// Channels of the token whose answer is awaited.
    pub waiting: Vec<Arc<str>>,
    /// Subscription answers in, held until the reply goes out: those of
    /// the token's channels (`true`: their results go in the reply) and
    /// any other subscription's (its reply or push follows the reply).
    pub answered: Vec<(Arc<str>, crate::core::answers::Answered, bool)>,
    /// Replies to the client's other commands meanwhile (centrifuge-js
    /// sends its subscribes in the connect's frame): after the reply.
    pub replies: Vec<Vec<u8>>,
}

/// Where a session's connect stands with the connect hook.
#[derive(Debug, Default)]
pub enum ConnectHook {
    /// Not asked.
    #[default]
    None,
    /// Asked by the `from`th command of the text frame `frame`: that
    /// command and the ones after it wait, handled again once the answer
    /// is in.
    Waiting {
        /// The frame.
        frame: Bytes,
        /// Index of the `connect` that asked.
        from: usize,
    },
    /// Answered: the frame is handled again from command `from`, whose
    /// `connect` takes the answer.
    Answered {
        /// The answer.
        answer: Box<crate::core::proxied::ConnectAnswer>,
        /// Index of the `connect` that asked.
        from: usize,
    },
}

/// A subscription that expires (the subscribe hook gave `expire_at`).
#[derive(Debug, Clone)]
pub struct Expiring {
    /// The channel.
    pub channel: Arc<str>,
    /// When, in core milliseconds.
    pub at: u64,
    /// The sub_refresh call in flight for it (0: none).
    pub call: u64,
}

/// A session's proxy state, kept only when the proxy has something of it:
/// forwarded headers, a connect hook in progress, subscribe hooks not yet
/// answered, subscriptions that expire (sub_refresh), calls in flight.
#[derive(Debug, Default)]
pub struct SessionProxy {
    /// Headers of the upgrade request forwarded with every call.
    pub headers: Arc<[(String, String)]>,
    /// The connect hook.
    pub connect: ConnectHook,
    /// Channels whose subscribe hook has not answered yet, with the call
    /// (they count toward the subscription limit and refuse a second
    /// subscribe; an answer counts only for the call that asked).
    pub subscribing: Vec<(Arc<str>, u64)>,
    /// Subscriptions that expire, refreshed through the sub_refresh hook,
    /// or ended, when their time passes.
    pub expiring: Vec<Expiring>,
    /// The refresh call in flight for the connection (0: none).
    pub refreshing: u64,
    /// Calls of this session in flight (at most `limits.max_requests_in_flight`).
    pub in_flight: usize,
}

impl SessionProxy {
    /// Whether the connect hook has not answered yet.
    pub fn connect_waits(&self) -> bool {
        matches!(self.connect, ConnectHook::Waiting { .. })
    }

    /// The earliest expiry of a subscription with no call in flight (core ms).
    pub fn next_expiry(&self) -> Option<u64> {
        self.expiring.iter().filter(|e| e.call == 0).map(|e| e.at).min()
    }

    /// A subscription ended: nothing of the proxy's follows it any more.
    pub fn forget(&mut self, channel: &str) {
        self.subscribing.retain(|c| *c.0 != *channel);
        self.expiring.retain(|e| *e.channel != *channel);
    }
}

/// One connection.
#[derive(Debug)]
pub struct Session {
    phase: Phase,
    /// What permessage-deflate allows on this connection.
    pub deflate: Deflate,
    /// WebSocket, or an HTTP fallback stream (its frames are re-framed).
    pub transport: Transport,
    /// The echo endpoint (conformance), not the client protocol.
    pub echo: bool,
    /// Whether the session is on its user's core (adopted, or its first
    /// command was handled here): it never moves again.
    pub placed: bool,
    /// Whether the session waits in the turn's dirty list.
    dirty: bool,
    /// Whether the session counts toward the core's handshakes in progress.
    pub counted: bool,
    /// A connection that served an HTTP fallback request: its next
    /// requests go to the fallback endpoints, not the WebSocket parser.
    pub http_conn: bool,
    /// An HTTP stream whose disconnect push is out and whose last chunk
    /// waits [`STREAM_TAIL_DELAY`] (or for the client to close first).
    tail_pending: bool,
    /// What the socket is watched for: bit 0 read, bit 1 write.
    watched: u8,
    /// What a read left in progress for the next: decoder state while a
    /// message spans reads, the bytes of an incomplete frame (or upgrade
    /// request). None between messages, so an idle session holds neither.
    reading: Option<Box<Reading>>,
    /// Bytes read and discarded while lingering.
    discarded: u32,
    /// A frame did not fit the queue bound: nothing more is queued, and the
    /// core closes the session with 3008 (see [`Effects::overflowed`]).
    overflowed: bool,
    /// The client's close frame was read with nothing after it: the client
    /// has said all it will, so once the answering close is written the
    /// socket is closed at once, with nothing unread to reset it (no
    /// shutdown, no lingering, no change to the readiness set).
    peer_close: bool,
    /// Who, once connected.
    pub identity: Identity,
    /// Rate budgets.
    pub budget: Budget,
    /// Commands refused for a rate so far; past `max_refusals`: 3013.
    pub refusals: u32,
    /// Subscriptions.
    pub subs: Subs,
    /// The channels subscribed server-side (the server API, the token's
    /// `subs`), if any: the server restores them, not the client, so one
    /// whose stream broke closes the session with 3010 (the client
    /// reconnects and recovers) instead of asking it to resubscribe.
    #[allow(clippy::box_collection, reason = "one pointer inline: most sessions have none")]
    server_subs: Option<Box<Vec<Arc<str>>>>,
    /// A connect reply waiting for the routers' answers to the token's
    /// subscriptions (their results go in it).
    pub connecting: Option<Box<PendingConnect>>,
    /// Proxy hook state (forwarded headers, calls in progress), if any.
    pub proxy: Option<Box<SessionProxy>>,
    out: Outbound,
    /// Deadlines.
    pub deadlines: Deadlines,
    /// The timer-wheel tick the session is scheduled at (0: none).
    pub timer: u32,
    /// The generation its slot in the core's slab was given with (its
    /// [`Sid`] carries it too).
    pub generation: u32,
}

impl Session {
    /// A session whose upgrade request is still to be read by `upgrade_by`.
    pub fn new(upgrade_by: u64) -> Session {
        Session {
            phase: Phase::Upgrading,
            deflate: Deflate::Off,
            transport: Transport::WebSocket,
            echo: false,
            placed: false,
            dirty: false,
            counted: false,
            http_conn: false,
            tail_pending: false,
            watched: 0,
            reading: None,
            discarded: 0,
            overflowed: false,
            peer_close: false,
            identity: Identity::default(),
            budget: Budget::default(),
            refusals: 0,
            subs: Subs::default(),
            server_subs: None,
            connecting: None,
            proxy: None,
            out: Outbound::default(),
            deadlines: Deadlines { phase_by: Due::at(upgrade_by), ..Deadlines::default() },
            timer: 0,
            generation: 0,
        }
    }

    /// Whether bytes of an incomplete frame (or request) wait for more.
    pub fn has_partial(&self) -> bool {
        self.reading.as_ref().is_some_and(|r| !r.partial.is_empty())
    }

    /// Keeps `bytes`, an incomplete frame or request, for the next read
    /// (replacing what was kept).
    pub fn keep_partial(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            drop(self.take_partial());
        } else {
            let r = self.reading.get_or_insert_default();
            r.partial.clear();
            r.partial.extend_from_slice(bytes);
        }
    }

    /// Takes what [`keep_partial`](Self::keep_partial) kept.
    pub fn take_partial(&mut self) -> Vec<u8> {
        let Some(r) = self.reading.as_mut() else { return Vec::new() };
        let partial = std::mem::take(&mut r.partial);
        if r.decoder.is_none() {
            self.reading = None;
        }
        partial
    }

    /// Takes the decoder of a message in progress, if any.
    pub fn take_decoder(&mut self) -> Option<Box<Decoder>> {
        let r = self.reading.as_mut()?;
        let decoder = r.decoder.take();
        if r.partial.is_empty() {
            self.reading = None;
        }
        decoder
    }

    /// Keeps the decoder of a message in progress for the next read.
    pub fn keep_decoder(&mut self, decoder: Box<Decoder>) {
        self.reading.get_or_insert_default().decoder = Some(decoder);
    }

    /// Marks `channel` as subscribed server-side.
    pub fn mark_server_sub(&mut self, channel: Arc<str>) {
        if self.is_server_sub(&channel) {
            return;
        }
        self.server_subs.get_or_insert_default().push(channel);
    }

    /// `channel` is no longer subscribed server-side.
    pub fn unmark_server_sub(&mut self, channel: &str) {
        if !self.is_server_sub(channel) {
            return;
        }
        if let Some(list) = self.server_subs.as_mut() {
            list.retain(|c| &**c != channel);
            if list.is_empty() {
                self.server_subs = None;
            }
        }
    }

    /// Whether `channel` is subscribed server-side.
    pub fn is_server_sub(&self, channel: &str) -> bool {
        self.server_subs.as_ref().is_some_and(|l| l.iter().any(|c| &**c == channel))
    }

    /// Where the session is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether the connect hook has not answered this session's connect yet
    /// (its input waits, unread, meanwhile).
    pub fn connect_waits(&self) -> bool {
        self.proxy.as_ref().is_some_and(|p| p.connect_waits())
    }

    /// Whether `connect` succeeded (and the session is not ending).
    pub fn is_connected(&self) -> bool {
        self.phase == Phase::Connected
    }

    /// Whether the session is ending (closing or lingering).
    pub fn is_ending(&self) -> bool {
        matches!(self.phase, Phase::Closing | Phase::Lingering)
    }

    /// The upgrade is done: wait for `connect` until `connect_by`.
    pub fn upgraded(&mut self, connect_by: u64) {
        self.phase = Phase::Open;
        self.deadlines.phase_by = Due::at(connect_by);
    }

    /// `connect` succeeded.
    pub fn connected(&mut self, identity: Identity) {
        self.phase = Phase::Connected;
        self.identity = identity;
        self.deadlines.phase_by = Due::NONE;
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.out.bytes()
    }

    /// The outbound queue (for the shell's writes and hand-overs).
    pub fn outbound(&mut self) -> &mut Outbound {
        &mut self.out
    }

    /// Since when the socket has been full with no progress (0: it is not).
    pub fn blocked_since(&self) -> u64 {
        self.out.blocked_since()
    }

    /// Queues a frame and joins the dirty list. A frame that would take
    /// the queue past `limit` bytes is not queued, nor is anything after
    /// it: the session joins [`Effects::overflowed`] and the core closes it
    /// with 3008 "slow" (what is queued is dropped, the tail of a frame
    /// already partly written excepted); the client reconnects and
    /// recovers. Returns whether the frame was queued.
    /// An HTTP fallback session takes the frame re-framed for its
    /// transport (a frame with nothing for it is dropped); see
    /// [`queue_framed`](Self::queue_framed) for bytes framed already.
    pub fn queue(&mut self, sid: Sid, frame: Bytes, limit: usize, fx: &mut Effects) -> bool {
        if self.transport.is_http() {
            return match proto::fallback::reframe(self.transport, &frame) {
                Some(f) => self.queue_framed(sid, f, limit, fx),
                None => true,
            };
        }
        self.queue_framed(sid, frame, limit, fx)
    }

    /// [`queue`](Self::queue) for bytes in the session's own framing
    /// (raw HTTP, or a twin framed once per core for its transport).
    pub fn queue_framed(&mut self, sid: Sid, frame: Bytes, limit: usize, fx: &mut Effects) -> bool {
        if self.is_ending() || self.overflowed {
            return false;
        }
        if self.out.bytes() + frame.len() > limit {
            fx.metrics().slow_disconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.overflowed = true;
            fx.overflowed.push(sid);
            return false;
        }
        self.push(sid, frame, fx);
        true
    }

    fn push(&mut self, sid: Sid, frame: Bytes, fx: &mut Effects) {
        fx.metrics().queued_bytes.fetch_add(frame.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.out.push(frame);
        self.wants_flush(sid, fx);
    }

    /// Joins the turn's dirty list, unless already there or waiting for
    /// writability (the shell flushes it when the socket drains).
    pub fn wants_flush(&mut self, sid: Sid, fx: &mut Effects) {
        if !self.dirty && !self.out.blocked() {
            self.dirty = true;
            fx.dirty.push(sid);
        }
    }

    /// Starts closing with a WebSocket close frame: reading stops, what is
    /// queued goes out first (a slow session's queue was dropped already).
    pub fn close(&mut self, sid: Sid, reason: CloseReason, fx: &mut Effects) {
        if self.is_ending() {
            return;
        }
        if self.overflowed {
            let dropped = self.out.drop_unstarted();
            fx.metrics().queued_bytes.fetch_sub(dropped as u64, std::sync::atomic::Ordering::Relaxed);
        }
        let upgrading = self.phase == Phase::Upgrading;
        self.phase = Phase::Closing;
        self.reading = None;
        let last = if upgrading {
            // No upgrade yet (or a request connection between requests):
            // an HTTP answer, not a frame.
            Bytes::from(proto::ws::handshake::error_response(503, &[], reason.reason))
        } else if self.transport.is_http() {
            // A stream ends with the disconnect push, then (a moment later)
            // its last chunk.
            let code = if reason.code < 3000 { Disconnect::SHUTDOWN.code } else { reason.code };
            self.tail_pending = true;
            proto::fallback::ending(self.transport, Disconnect { code, reason: reason.reason })
        } else {
            SharedFrame::close(reason.code, reason.reason).into_bytes()
        };
        self.push(sid, last, fx);
        self.watch(sid, fx);
    }

    /// The client's close frame was read, and nothing after it (`clean`);
    /// see the field. Bytes after it take the lingering close.
    pub fn peer_closed(&mut self, clean: bool) {
        self.peer_close = clean;
    }

    /// Whether a frame did not fit (the session is to close with 3008).
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Ends the connection with a final HTTP answer (a refused upgrade).
    pub fn refuse(&mut self, sid: Sid, answer: Vec<u8>, fx: &mut Effects) {
        if self.is_ending() {
            return;
        }
        self.phase = Phase::Closing;
        self.reading = None;
        self.push(sid, Bytes::from(answer), fx);
        self.watch(sid, fx);
    }

    /// Whether the write side ends once the queue is written (the close
    /// frame is last in it, and the socket is closed or shut down right
    /// after): the shell lets the last bytes wait for the FIN to leave with
    /// them, one segment (and one wake-up of the client) less per close.
    pub fn ends_after_flush(&self) -> bool {
        self.phase == Phase::Closing && !self.tail_pending
    }

    /// Accounts for a flush at `now`; returns whether the session is now
    /// over (the socket failed, or it lingered long enough).
    pub fn flushed(
        &mut self,
        sid: Sid,
        result: std::io::Result<Flushed>,
        written: Written,
        now: u64,
        fx: &mut Effects,
    ) -> bool {
        self.dirty = false;
        let before = self.out.bytes();
        let result = match result {
            Ok(r) => r,
            Err(_) => {
                let left = self.out.clear();
                fx.metrics().queued_bytes.fetch_sub(left as u64, std::sync::atomic::Ordering::Relaxed);
                return true;
            }
        };
        self.out.wrote(written, result, now);
        let gone = before - self.out.bytes();
        fx.metrics().queued_bytes.fetch_sub(gone as u64, std::sync::atomic::Ordering::Relaxed);
        if result == Flushed::All
            && let Phase::Closing = self.phase
        {
            if self.peer_close {
                // The close handshake is complete and nothing is unread.
                return true;
            }
            self.phase = Phase::Lingering;
            if self.tail_pending {
                // Reading on (a client that closes ends it), the last
                // chunk after the delay ([`Session::stream_tail`]).
                self.deadlines.phase_by = Due::at(now + STREAM_TAIL_DELAY.as_millis() as u64);
            } else {
                self.deadlines.phase_by = Due::at(now + LINGER.as_millis() as u64);
                fx.act(Action::Shutdown { sid });
            }
        }
        self.watch(sid, fx);
        false
    }

    /// The delay after an HTTP stream's disconnect push passed: whether the
    /// stream had its last chunk to send (now queued; the session closes as
    /// any other after it).
    pub fn stream_tail(&mut self, sid: Sid, fx: &mut Effects) -> bool {
        if !std::mem::take(&mut self.tail_pending) || self.phase != Phase::Lingering {
            return false;
        }
        self.phase = Phase::Closing;
        self.push(sid, Bytes::from_static(proto::fallback::LAST_CHUNK), fx);
        self.watch(sid, fx);
        true
    }

    /// Bytes read from a lingering session's socket; whether it is time to
    /// stop waiting (past the byte bound).
    pub fn discard(&mut self, n: usize) -> bool {
        self.discarded = self.discarded.saturating_add(n.try_into().unwrap_or(u32::MAX));
        self.discarded as usize > LINGER_BYTES
    }

    /// Brings what the socket is watched for in line with the phase.
    pub fn watch(&mut self, sid: Sid, fx: &mut Effects) {
        let write = self.out.blocked();
        // A client that closed first sends nothing more: its socket stays
        // in the set while the answer is written (in the same turn, as a
        // rule, and then it is closed), and leaves it only if the answer
        // has to wait for room.
        let read = !matches!(self.phase, Phase::Closing) || (self.peer_close && !write);
        let want = u8::from(read) | (u8::from(write) << 1);
        if want != self.watched {
            self.watched = want;
            fx.act(Action::Watch { sid, read, write });
        }
    }

    /// The earliest moment one of the session's deadlines may act (core
    /// milliseconds), with `write_timeout` for a socket that stays full.
    pub fn next_deadline(&self, write_timeout: u64) -> Option<u64> {
        let d = &self.deadlines;
        let blocked = self.out.blocked_since();
        let mut candidates =
            [(blocked != 0).then(|| blocked + write_timeout), None, None, None, None, None, None];
        match self.phase {
            Phase::Upgrading | Phase::Open => {
                candidates[1] = Some(d.phase_by.ms());
                candidates[2] = Some(d.drain_at.ms());
            }
            Phase::Connected => {
                candidates[2] = Some(d.drain_at.ms());
                candidates[3] = Some(d.next_ping.ms());
                candidates[4] = Some(d.pong_due.ms());
                candidates[5] = Some(d.expires_at.ms());
                candidates[6] = self.proxy.as_ref().and_then(|p| p.next_expiry());
            }
            Phase::Closing => {}
            Phase::Lingering => candidates[1] = Some(d.phase_by.ms()),
        }
        candidates.into_iter().flatten().filter(|t| *t != 0).min()
    }
}

#[cfg(test)]
mod size {
    use super::ClientId;

    #[test]
    fn client_ids_read_as_uuids() {
        let id =
            ClientId([0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0xf0, 0x0d, 0, 0, 0, 0, 0xbe, 0xef]);
        assert_eq!(&*id.text(), "01234567-89ab-cdef-f00d-00000000beef");
        assert_eq!(id.to_string(), "01234567-89ab-cdef-f00d-00000000beef");
    }

    /// Every idle connection holds one boxed session: it stays within
    /// mimalloc's 192-byte size class (the next one is 224).
    #[test]
    fn a_session_fits_192_bytes() {
        assert!(std::mem::size_of::<super::Session>() <= 192, "{}", std::mem::size_of::<super::Session>());
    }

    #[test]
    fn a_deadline_never_comes_early_and_none_stays_none() {
        use super::Due;
        assert!(!Due::at(0).is_set() && Due::at(0) == Due::NONE && Due::NONE.ms() == 0);
        assert_eq!(Due::at(1).ms(), 250);
        assert_eq!(Due::at(250).ms(), 250);
        assert_eq!(Due::at(251).ms(), 500);
        assert!(Due::at(u64::MAX).ms() >= u64::from(u32::MAX), "saturates, far ahead");
    }
}
