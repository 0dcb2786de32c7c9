//! What a session's socket gave: the upgrade request, then WebSocket frames
//! and the commands in them; the first message decides the core a
//! connection lives on.
//!
//! The shell reads a ready socket with one non-blocking `recv` (through
//! rustls for wss) into the core's scratch buffer, after the bytes of a
//! partial frame if any; nothing is pinned while idle and no read is in
//! flight, so one buffer per core serves every connection on it.

use bytes::{Bytes, BytesMut};
use proto::client::{Disconnect, Method};
use proto::ws::handshake;
use proto::ws::{Decoded, Decoder, DecoderConfig, Message, MessageRef, SharedFrame, WsError};

use super::Core;
use crate::bridge::Moved;
use crate::effects::{Action, Got, Sid};
use crate::session::{CloseReason, Deflate, Phase};

/// How a session goes on after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    /// Keep serving.
    Go,
    /// The session ends (a close was queued).
    Stop,
    /// The connection belongs to the user's core: hand it over with this
    /// message, unhandled.
    Move(usize),
}

/// Bytes a client may send while the connect hook has not answered its
/// connect (they wait, unread); beyond: close 3013.
const MAX_HELD_INPUT: usize = 64 * 1024;

/// Replies to a client's commands held behind its connect reply while
/// that waits for the routers' answers to the token's subscriptions.
const MAX_HELD_REPLIES: usize = 256;

impl Core {
    /// The session's socket is readable: `fill` appends what it has (one
    /// non-blocking read) to the buffer and says how it went.
    pub fn read(&mut self, sid: Sid, now: std::time::Instant, fill: impl FnOnce(&mut BytesMut) -> Got) {
        self.read_inner(sid, now, fill);
        self.settle();
    }

    fn read_inner(&mut self, sid: Sid, now: std::time::Instant, fill: impl FnOnce(&mut BytesMut) -> Got) {
        let ms = self.cx.clock.ms(now);
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let phase = s.phase();
        if let Phase::Closing = phase {
            return;
        }
        let mut b = self.cx.take_scratch();
        if s.has_partial() {
            b.extend_from_slice(&s.take_partial());
        }
        let got = fill(&mut b);
        match (phase, got) {
            (Phase::Lingering, Got::Data) => {
                let enough = s.discard(b.len());
                self.cx.give_scratch(b);
                if enough {
                    self.finish(sid);
                }
            }
            (Phase::Lingering, Got::Nothing) => self.cx.give_scratch(b),
            (Phase::Lingering, Got::Closed | Got::Failed) | (_, Got::Failed) => {
                self.cx.give_scratch(b);
                self.finish(sid);
            }
            (_, Got::Nothing) => {
                // Spurious readiness (or TLS records with no data yet): keep
                // what was partial and wait again.
                if !b.is_empty() {
                    s.keep_partial(&b);
                }
                self.cx.give_scratch(b);
            }
            (Phase::Upgrading, Got::Data | Got::Closed) => {
                self.upgrade(sid, b, ms);
                if got == Got::Closed {
                    self.peer_closed(sid);
                }
            }
            (_, Got::Data | Got::Closed) if s.transport.is_http() => {
                // A stream's client has said all it says in its request:
                // anything more is read and dropped.
                self.cx.give_scratch(b);
                if got == Got::Closed {
                    self.peer_closed(sid);
                }
            }
            (_, Got::Data | Got::Closed) => {
                if b.is_empty() {
                    self.cx.give_scratch(b);
                } else {
                    self.feed(sid, b, ms);
                }
                if got == Got::Closed {
                    self.peer_closed(sid);
                }
            }
        }
    }

    /// End of stream from the client: a session that is not already
    /// writing its close is over.
    fn peer_closed(&mut self, sid: Sid) {
        if self.sessions.get(sid).is_some_and(|s| !s.is_ending()) {
            self.finish(sid);
        }
    }

    /// The upgrade request is complete in `b` (or refused): answer it, then
    /// handle whatever followed it as WebSocket frames.
    fn upgrade(&mut self, sid: Sid, mut b: BytesMut, now: u64) {
        if self.sessions.get(sid).is_some_and(|s| s.http_conn) {
            // A connection of the HTTP fallbacks: its next request too.
            return self.http_request(sid, b, now);
        }
        let limits = handshake::HandshakeLimits::default();
        let (req, consumed) = match handshake::parse_request(&b, &limits) {
            Ok(Some(r)) => r,
            Ok(None) => {
                if let Some(s) = self.sessions.get_mut(sid) {
                    s.keep_partial(&b);
                }
                self.cx.give_scratch(b);
                return;
            }
            Err(e) => {
                if !super::fallback::upgrade_refusal(&e) && self.cx.cfg.fallback.enabled {
                    let path = proto::fallback::request_path(&b);
                    if path.is_some_and(|p| self.is_fallback_path(&p)) {
                        return self.http_request(sid, b, now);
                    }
                }
                self.cx.give_scratch(b);
                return self.refuse(sid, e.response());
            }
        };
        let cfg = self.cx.cfg.clone();
        let path = req.path_only();
        let echo = !cfg.echo_path.is_empty() && path == cfg.echo_path;
        if !echo && !cfg.path.is_empty() && path != cfg.path {
            self.cx.give_scratch(b);
            return self.refuse(sid, handshake::error_response(404, &[], "no websocket endpoint here"));
        }
        let deflate = if cfg.deflate { req.negotiate_deflate() } else { None };
        let protocol = req.select_protocol(&["centrifuge-json"]);
        let response = handshake::switching_protocols(&req.key, protocol, deflate.as_ref());
        let forwarded = self.cx.forwarded(&b[..consumed]);
        let Some(s) = self.sessions.get_mut(sid) else { return };
        if forwarded.is_some() {
            s.proxy = forwarded;
        }
        s.echo = echo;
        s.deflate = Deflate::agreed(deflate.as_ref());
        s.upgraded(now + cfg.limits.connect_timeout_secs * 1000);
        self.cx.handshake_done(s, true);
        self.cx.fx.metrics().handshakes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        s.queue(sid, Bytes::from(response), usize::MAX, &mut self.cx.fx);
        self.cx.rearm(s, sid);
        bytes::Buf::advance(&mut b, consumed);
        if b.is_empty() {
            self.cx.give_scratch(b);
        } else {
            self.feed(sid, b, now);
        }
    }

    /// Decodes and handles the bytes in `b` (a scratch buffer); keeps the
    /// bytes of a partial frame, and the decoder only while a message is in
    /// progress.
    pub(super) fn feed(&mut self, sid: Sid, mut b: BytesMut, now: u64) {
        let Some(s) = self.sessions.get_mut(sid) else {
            self.cx.give_scratch(b);
            return;
        };
        let limits = &self.cx.cfg.limits;
        if s.connect_waits() {
            // The connect hook has not answered: what follows waits, as
            // read, to be handled after the connect (bounded).
            if b.len() > MAX_HELD_INPUT {
                self.cx.give_scratch(b);
                self.close(sid, Disconnect::TOO_MANY_REQUESTS.into());
                return;
            }
            s.keep_partial(&b);
            self.cx.give_scratch(b);
            return;
        }
        let mut decoder = s.take_decoder().unwrap_or_else(|| {
            Box::new(Decoder::new(DecoderConfig {
                max_frame: limits.max_message,
                max_message: limits.max_message,
                deflate: s.deflate != Deflate::Off,
                ..DecoderConfig::server()
            }))
        });
        let echo = s.echo;
        let flow = self.process(sid, &mut decoder, &mut b, echo, now);
        match flow {
            Flow::Go => {
                if let Some(s) = self.sessions.get_mut(sid) {
                    if !decoder.is_idle() && !s.is_ending() {
                        s.keep_decoder(decoder);
                    }
                    if !b.is_empty() && !s.is_ending() {
                        // A partial frame header or control frame: keep just those bytes.
                        s.keep_partial(&b);
                    }
                }
                self.cx.give_scratch(b);
            }
            Flow::Stop => {
                if !b.is_empty()
                    && let Some(s) = self.sessions.get_mut(sid)
                {
                    // Bytes after the client's close frame: the lingering close.
                    s.peer_closed(false);
                }
                self.cx.give_scratch(b);
                if self.sessions.get(sid).is_some_and(|s| !s.is_ending()) {
                    self.finish(sid);
                }
            }
            Flow::Move(_) => unreachable!("process hands over itself"),
        }
    }

    /// Decodes and handles every complete message in `buf` (in place: whole
    /// frames are unmasked in the scratch buffer and parsed from there).
    fn process(&mut self, sid: Sid, decoder: &mut Decoder, buf: &mut BytesMut, echo: bool, now: u64) -> Flow {
        loop {
            let decoded = decoder.decode_in_place(buf, Some(&mut self.cx.inflater));
            let (flow, consumed, message) = match decoded {
                Ok(None) => return Flow::Go,
                Ok(Some(Decoded::InPlace { message, consumed })) => {
                    let (flow, keep) = match message {
                        MessageRef::Text(t) if echo => (self.echo(sid, SharedFrame::text(t)), None),
                        MessageRef::Binary(b) if echo => (self.echo(sid, SharedFrame::binary(b)), None),
                        MessageRef::Binary(_) => {
                            self.close(sid, CloseReason { code: 1003, reason: "text frames only" });
                            (Flow::Stop, None)
                        }
                        MessageRef::Text(t) => {
                            let f = self.handle_frame(sid, t, now);
                            (f, matches!(f, Flow::Move(_)).then(|| Bytes::copy_from_slice(t)))
                        }
                    };
                    (flow, consumed, keep)
                }
                Ok(Some(Decoded::Owned(m))) => {
                    let (flow, keep) = self.message(sid, m, echo, now);
                    (flow, 0, keep)
                }
                Err(e) => {
                    self.protocol_error(sid, &e);
                    return Flow::Stop;
                }
            };
            bytes::Buf::advance(buf, consumed);
            if self.sessions.get(sid).is_some_and(|s| s.connect_waits()) {
                // The rest waits for the connect hook's answer.
                return Flow::Go;
            }
            match flow {
                Flow::Go => {}
                Flow::Stop => return Flow::Stop,
                Flow::Move(target) => {
                    let pending = Bytes::copy_from_slice(buf);
                    buf.clear();
                    self.hand_over(sid, target, message.unwrap_or_default(), pending);
                    return Flow::Go;
                }
            }
        }
    }

    fn protocol_error(&mut self, sid: Sid, e: &WsError) {
        self.close(sid, CloseReason { code: e.close_code(), reason: e.close_reason() });
    }

    fn echo(&mut self, sid: Sid, frame: SharedFrame) -> Flow {
        if let Some(s) = self.sessions.get_mut(sid) {
            self.cx.send_own(s, sid, frame);
        }
        Flow::Go
    }

    fn message(&mut self, sid: Sid, m: Message, echo: bool, now: u64) -> (Flow, Option<Bytes>) {
        match m {
            Message::Ping(p) => {
                if let Some(s) = self.sessions.get_mut(sid) {
                    let limit = self.cx.queue_limit();
                    s.queue(sid, SharedFrame::pong(&p).into_bytes(), limit, &mut self.cx.fx);
                }
                (Flow::Go, None)
            }
            Message::Pong(_) => (Flow::Go, None),
            Message::Close(c) => {
                let code = match c {
                    Some(c) if c.code != 1005 => c.code,
                    _ => 1000,
                };
                if let Some(s) = self.sessions.get_mut(sid) {
                    s.peer_closed(true);
                }
                self.close(sid, CloseReason { code, reason: "" });
                (Flow::Stop, None)
            }
            Message::Text(t) if echo => (self.echo(sid, SharedFrame::text(&t)), None),
            Message::Binary(b) if echo => (self.echo(sid, SharedFrame::binary(&b)), None),
            Message::Binary(_) => {
                self.close(sid, CloseReason { code: 1003, reason: "text frames only" });
                (Flow::Stop, None)
            }
            Message::Text(t) => {
                let f = self.handle_frame(sid, &t, now);
                (f, matches!(f, Flow::Move(_)).then(|| t.clone()))
            }
        }
    }

    /// The core a not-yet-connected session should live on, if not this
    /// one: `hash(user) mod cores`, the user read (unverified) from the
    /// connect token of the frame's first command; the token is verified on
    /// that core.
    fn destination(&mut self, sid: Sid, frame: &[u8]) -> Option<usize> {
        let s = self.sessions.get_mut(sid)?;
        if std::mem::replace(&mut s.placed, true) || s.is_connected() || self.cx.cores < 2 {
            return None;
        }
        let Some(Ok(cmd)) = proto::client::decode_frame(frame).next() else { return None };
        let Method::Connect(c) = &cmd.method else { return None };
        let user = crate::auth::peek_user(&c.token)?;
        Some(core_of_user(&user, self.cx.cores)).filter(|t| *t != self.cx.id)
    }

    /// Handles the commands of one text frame, in order; their replies go
    /// out together in one frame.
    pub(super) fn handle_frame(&mut self, sid: Sid, frame: &[u8], now: u64) -> Flow {
        if let Some(target) = self.destination(sid, frame) {
            return Flow::Move(target);
        }
        self.handle_frame_from(sid, frame, 0, now)
    }

    /// Handles the commands of one text frame from its `from`th on (a
    /// frame held for the connect hook resumes at the connect that asked).
    pub(super) fn handle_frame_from(&mut self, sid: Sid, frame: &[u8], from: usize, now: u64) -> Flow {
        let mut replies: Vec<Vec<u8>> = Vec::new();
        let mut end = None;
        for (i, cmd) in proto::client::decode_frame(frame).enumerate().skip(from) {
            let cmd = match cmd {
                Ok(c) => c,
                Err(e) => {
                    end = Some(e.disconnect());
                    break;
                }
            };
            let connected = self.sessions.get(sid).is_some_and(|s| s.is_connected());
            if !connected && !matches!(cmd.method, Method::Connect(_)) {
                end = Some(Disconnect::BAD_REQUEST);
                break;
            }
            if let Err(d) = self.command(sid, cmd, &mut replies, now) {
                end = Some(d);
                break;
            }
            if let Some(p) = self.sessions.get_mut(sid).and_then(|s| s.proxy.as_mut())
                && let crate::session::ConnectHook::Waiting { frame: held, from } = &mut p.connect
            {
                // The connect hook was asked: this frame is handled again
                // from this command once it answers.
                *held = Bytes::copy_from_slice(frame);
                *from = i;
                break;
            }
        }
        if let Some(s) = self.sessions.get_mut(sid)
            && !replies.is_empty()
        {
            match s.connecting.as_mut() {
                // The connect reply waits for routers: these go after it
                // (at most MAX_HELD_REPLIES; a client that sends more
                // before its connect is answered is closed with 3013).
                Some(pc) => {
                    pc.replies.extend(replies);
                    if pc.replies.len() > MAX_HELD_REPLIES {
                        end = Some(Disconnect::TOO_MANY_REQUESTS);
                    }
                }
                None => {
                    let frame = SharedFrame::text_lines(replies.iter().map(|r| r.as_slice()));
                    self.cx.send_own(s, sid, frame);
                }
            }
        }
        match end {
            Some(d) => {
                self.close(sid, d.into());
                Flow::Stop
            }
            None if self.sessions.get(sid).is_some_and(|s| s.is_ending()) => Flow::Stop,
            None => Flow::Go,
        }
    }

    /// Gives the connection to its user's core. Nothing was done for it
    /// since the upgrade but queueing the upgrade's answer, which travels
    /// with it.
    pub(super) fn hand_over(&mut self, sid: Sid, core: usize, message: Bytes, pending: Bytes) {
        let Some(mut s) = self.sessions.remove(sid) else { return };
        let out = s.outbound();
        let queued = out.bytes();
        let unsent = out.take();
        self.cx.fx.metrics().queued_bytes.fetch_sub(queued as u64, std::sync::atomic::Ordering::Relaxed);
        self.cx.fx.metrics().connections.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.cx.fx.metrics().handovers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if s.transport.is_http() {
            self.cx.fx.metrics().fallback_open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        let moved = Moved {
            message,
            pending,
            unsent,
            deflate: s.deflate,
            transport: s.transport,
            proxy: s.proxy.take(),
        };
        self.cx.fx.act(Action::HandOver { sid, core, moved });
    }
}

/// The core a user's connections live on.
pub fn core_of_user(user: &str, cores: usize) -> usize {
    (proto::rendezvous::stable_hash(user.as_bytes()) % cores.max(1) as u64) as usize
}
