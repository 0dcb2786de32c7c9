//! The HTTP fallback transports on a core: requests that are not a
//! WebSocket upgrade, to the fallback paths (see `proto::fallback`).
//!
//! A stream (`http_stream`, `sse`, `uni_http_stream`, `uni_sse`) is a
//! session like a WebSocket one — same phases, limits, deadlines, drain,
//! hand-over to its user's core — whose queued frames are re-framed for
//! its transport ([`crate::session::Session::queue`]); its first commands
//! come with the request. An emulated one (`http_stream`, `sse`) takes its
//! later commands from `POST /emulation` requests, which any core may read:
//! the connect reply's `node` names the gateway and core that hold the
//! session, `session` the session there; the request is answered 204 once
//! the session has the commands, 404 when there is no such session; one
//! of another gateway process sharing the port goes there through a router
//! (answered 202: accepted, the delivery is the router's). A
//! request connection is kept alive between requests (until the
//! handshake timeout) and answers them in order.

use bytes::{Bytes, BytesMut};
use proto::fallback::{self, EmulationRequest, HttpMethod, HttpRequest, Transport};
use proto::ws::handshake;
use std::sync::atomic::Ordering;

use super::Core;
use super::reading::Flow;
use crate::bridge::{Emulation, UpMsg};
use crate::effects::{Action, Sid};
use crate::session::{Due, Phase};
use proto::cluster::ClusterMsg;

/// Largest request head (bytes), as for the WebSocket upgrade.
const MAX_HEAD: usize = handshake::HandshakeLimits::DEFAULT_HEADER_BYTES;

/// An emulation request waiting for another core's word on its session.
#[derive(Debug)]
pub struct Waiting {
    origin: Option<String>,
    close: bool,
}

impl Core {
    /// Whether `path` is one the fallback endpoints answer.
    pub(super) fn is_fallback_path(&self, path: &str) -> bool {
        let fb = &self.cx.cfg.fallback;
        fb.enabled
            && (fb.transport_of(path).is_some()
                || (!fb.emulation_path.is_empty() && path == fb.emulation_path))
    }

    /// Requests to the fallback paths are in `b` (the last maybe not all
    /// of it yet): answered in order, in a loop (at most
    /// [`MAX_PIPELINED`] per read: a client that writes more at once is
    /// answered 429 and closed), each complete one before the next.
    pub(super) fn http_request(&mut self, sid: Sid, mut b: BytesMut, now: u64) {
        if let Some(s) = self.sessions.get_mut(sid) {
            // Its later requests skip the WebSocket parser.
            s.http_conn = true;
        }
        for _ in 0..MAX_PIPELINED {
            if b.is_empty() {
                return self.cx.give_scratch(b);
            }
            if self.cx.waiting.contains_key(&sid) {
                // The previous request's answer is not out yet: this one
                // waits (bounded like any request).
                return self.hold(sid, b);
            }
            match self.one_request(sid, &mut b, now) {
                Step::Next => {}
                Step::Incomplete => return self.hold(sid, b),
                Step::Done => return self.cx.give_scratch(b),
            }
        }
        self.cx.give_scratch(b);
        self.refuse(sid, fallback::error(429, None, "too many pipelined requests"));
    }

    /// Handles the first request in `b`, taking its bytes out of `b`.
    fn one_request(&mut self, sid: Sid, b: &mut BytesMut, now: u64) -> Step {
        let max_body = self.cx.cfg.fallback.max_request_bytes;
        let req = match fallback::parse_request(b, MAX_HEAD, max_body) {
            Ok(Some(r)) => r,
            Ok(None) => return Step::Incomplete,
            Err(e) => {
                self.refuse(sid, fallback::error(e.status(), None, &e.to_string()));
                return Step::Done;
            }
        };
        if b.len() < req.total_len() {
            return Step::Incomplete;
        }
        let head = b.split_to(req.head_len);
        let body = b.split_to(req.content_length);
        let origin = req.origin.clone();
        let path = req.path().to_owned();
        let fb = self.cx.cfg.fallback.clone();
        let refuse = |core: &mut Core, status: u16, why: &str| {
            core.refuse(sid, fallback::error(status, origin.as_deref(), why));
            Step::Done
        };
        if !fb.origin_allowed(origin.as_deref()) {
            return refuse(self, 403, "origin not allowed");
        }
        if req.method == HttpMethod::Options {
            let preflight = Some(req.request_headers.as_deref().unwrap_or(""));
            let answer = fallback::empty(204, origin.as_deref(), preflight, req.close);
            return self.answered(sid, answer, req.close, now);
        }
        if req.binary {
            return refuse(self, 415, "JSON only");
        }
        if path == fb.emulation_path {
            if req.method != HttpMethod::Post {
                return refuse(self, 405, "POST only");
            }
            return self.emulation_request(sid, &req, &body, b, now);
        }
        let Some(t) = fb.transport_of(&path) else {
            return refuse(self, 404, "no such endpoint");
        };
        let commands = match (req.method, t) {
            (HttpMethod::Post, _) => body.to_vec(),
            (HttpMethod::Get, Transport::Sse | Transport::UniSse) => match req.query_param("cf_connect") {
                Some(c) => c.into_bytes(),
                None if t == Transport::UniSse => Vec::new(),
                None => return refuse(self, 400, "no cf_connect"),
            },
            _ => return refuse(self, 405, "method not allowed"),
        };
        self.start_stream(sid, t, &head, origin.as_deref(), commands, now);
        Step::Done
    }

    /// Keeps a request's bytes for the next read (bounded: a head and a body).
    fn hold(&mut self, sid: Sid, b: BytesMut) {
        let bound = MAX_HEAD + self.cx.cfg.fallback.max_request_bytes;
        if b.len() > bound {
            self.cx.give_scratch(b);
            return self.refuse(sid, fallback::error(413, None, "request too large"));
        }
        if let Some(s) = self.sessions.get_mut(sid) {
            s.keep_partial(&b);
        }
        self.cx.give_scratch(b);
    }

    /// A request was answered with `answer`: the connection waits for the
    /// next one, or ends when the client asked to close. The answers a
    /// connection has not read are bounded by the session queue's bound.
    fn answered(&mut self, sid: Sid, answer: Vec<u8>, close: bool, now: u64) -> Step {
        let idle = self.cx.cfg.limits.handshake_timeout_secs * 1000;
        let limit = self.cx.queue_limit();
        let Some(s) = self.sessions.get_mut(sid) else { return Step::Done };
        // Answered: no longer a handshake in progress.
        self.cx.handshake_done(s, true);
        if close {
            s.refuse(sid, answer, &mut self.cx.fx);
            self.cx.rearm(s, sid);
            return Step::Done;
        }
        if !s.queue_framed(sid, Bytes::from(answer), limit, &mut self.cx.fx) {
            return Step::Done;
        }
        s.deadlines.phase_by = Due::at(now + idle);
        self.cx.rearm(s, sid);
        Step::Next
    }

    /// Starts a stream: the response head, then the request's commands
    /// (for a unidirectional stream, its `ConnectRequest`) as the
    /// session's first frame.
    fn start_stream(
        &mut self,
        sid: Sid,
        t: Transport,
        head: &[u8],
        origin: Option<&str>,
        commands: Vec<u8>,
        now: u64,
    ) {
        let connect_by = now + self.cx.cfg.limits.connect_timeout_secs * 1000;
        let forwarded = self.cx.forwarded(head);
        let Some(s) = self.sessions.get_mut(sid) else { return };
        if forwarded.is_some() {
            s.proxy = forwarded;
        }
        s.transport = t;
        s.http_conn = false;
        s.placed = false;
        s.upgraded(connect_by);
        self.cx.handshake_done(s, true);
        self.cx.fx.metrics().fallback_streams.fetch_add(1, Ordering::Relaxed);
        self.cx.fx.metrics().fallback_open.fetch_add(1, Ordering::Relaxed);
        s.queue_framed(sid, Bytes::from(fallback::stream_head(t, origin)), usize::MAX, &mut self.cx.fx);
        self.cx.rearm(s, sid);
        let frame = if t.is_uni() { uni_connect(&commands) } else { commands };
        let frame = Bytes::from(frame);
        match self.handle_frame(sid, &frame, now) {
            Flow::Move(target) => self.hand_over(sid, target, frame, Bytes::new()),
            Flow::Stop => {
                if self.sessions.get(sid).is_some_and(|s| !s.is_ending()) {
                    self.finish(sid);
                }
            }
            Flow::Go => {}
        }
    }

    /// A `POST /emulation`: its commands go to the session's core, here or
    /// another, or (a session of another gateway process sharing the port)
    /// to a router that relays them there.
    fn emulation_request(
        &mut self,
        sid: Sid,
        req: &HttpRequest,
        body: &[u8],
        rest: &mut BytesMut,
        now: u64,
    ) -> Step {
        let origin = req.origin.clone();
        let Some(e) = EmulationRequest::decode(body) else {
            self.refuse(sid, fallback::error(400, origin.as_deref(), "not an emulation request"));
            return Step::Done;
        };
        let (gateway, core) = match e.node.rsplit_once('/') {
            Some((g, c)) => (g, c.parse::<usize>().ok()),
            None => (e.node.as_str(), None),
        };
        let unknown = |c: &mut Core, why: &str| {
            c.cx.fx.metrics().emulation_unknown.fetch_add(1, Ordering::Relaxed);
            c.refuse(sid, fallback::error(404, origin.as_deref(), why));
            Step::Done
        };
        if parse_session(&e.session).is_none() {
            return unknown(self, "unknown session");
        }
        if gateway != self.cx.cfg.id {
            // Another gateway process holds the session (several share the
            // port): a router relays the commands there. Accepted, not
            // known to be delivered: 202. Bounded: relays per second per
            // core, and never more than half the uplink's backlog.
            if gateway.is_empty() || core.is_none() {
                return unknown(self, "unknown node");
            }
            let at = self.cx.clock.at(now);
            if !self.cx.up.has_room_for_optional() || !self.cx.relays.try_take(1, at) {
                self.refuse(sid, fallback::error(503, origin.as_deref(), "too many relayed requests"));
                return Step::Done;
            }
            let data = Bytes::from(e.data.into_bytes());
            let msg = ClusterMsg::Emulation { node: e.node.clone(), session: e.session.clone(), data };
            self.cx.up.push(UpMsg::Forward { key: e.session, msg });
            self.cx.fx.metrics().emulation_relayed.fetch_add(1, Ordering::Relaxed);
            let answer = fallback::empty(202, origin.as_deref(), None, req.close);
            return self.answered(sid, answer, req.close, now);
        }
        let Some(core) = core.filter(|c| *c < self.cx.cores) else { return unknown(self, "unknown node") };
        let data = Bytes::from(e.data.into_bytes());
        if core == self.cx.id {
            let found = self.emulate_here(&e.session, &data, now);
            return self.emulation_done(sid, found, Waiting { origin, close: req.close }, now);
        }
        if let Some(s) = self.sessions.get_mut(sid) {
            // What follows this request waits for its answer.
            s.keep_partial(&rest.split());
        }
        self.cx.waiting.insert(sid, Waiting { origin, close: req.close });
        let emulation = Box::new(Emulation { session: e.session, data, from: Some((self.cx.id, sid)) });
        self.cx.fx.act(Action::Emulate { core, emulation });
        Step::Done
    }

    fn emulation_done(&mut self, sid: Sid, found: bool, w: Waiting, now: u64) -> Step {
        if found {
            let answer = fallback::empty(204, w.origin.as_deref(), None, w.close);
            self.answered(sid, answer, w.close, now)
        } else {
            self.refuse(sid, fallback::error(404, w.origin.as_deref(), "unknown session"));
            Step::Done
        }
    }

    /// Hands the commands to the emulated session, if this core holds it.
    pub(super) fn emulate_here(&mut self, session: &str, data: &[u8], now: u64) -> bool {
        let target = self.cx.session_named(session);
        let emulated = |s: &crate::session::Session| s.is_connected() && s.transport.is_emulation();
        let Some(target) = target.filter(|t| self.sessions.get(*t).is_some_and(emulated)) else {
            self.cx.fx.metrics().emulation_unknown.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        self.cx.fx.metrics().emulation_requests.fetch_add(1, Ordering::Relaxed);
        if let Flow::Stop = self.handle_frame_from(target, data, 0, now)
            && self.sessions.get(target).is_some_and(|s| !s.is_ending())
        {
            self.finish(target);
        }
        true
    }

    /// Commands for an emulated session of this core, read by another.
    pub fn emulate(&mut self, e: Emulation, now: std::time::Instant) {
        let ms = self.cx.clock.ms(now);
        let found = self.emulate_here(&e.session, &e.data, ms);
        if let Some((core, sid)) = e.from {
            self.cx.fx.act(Action::Emulated { core, sid, found });
        }
        self.settle();
    }

    /// Another core's word on an emulation request this core read: its
    /// answer, then the requests that waited behind it.
    pub fn emulated(&mut self, sid: Sid, found: bool, now: std::time::Instant) {
        let ms = self.cx.clock.ms(now);
        let Some(w) = self.cx.waiting.remove(&sid) else { return };
        let Some(s) = self.sessions.get_mut(sid) else { return };
        if s.phase() != Phase::Upgrading {
            return;
        }
        let held = s.take_partial();
        if let Step::Next = self.emulation_done(sid, found, w, ms)
            && !held.is_empty()
        {
            let mut rest = self.cx.take_scratch();
            rest.extend_from_slice(&held);
            self.http_request(sid, rest, ms);
        }
        self.settle();
    }
}

/// How a request's handling left its connection.
enum Step {
    /// Answered and kept: the next request may follow.
    Next,
    /// The request is not complete yet.
    Incomplete,
    /// Nothing more to parse now: a stream started, the connection is
    /// closing, or it waits for another core's answer.
    Done,
}

/// Requests answered from one read at most; more: 429 and closed.
const MAX_PIPELINED: usize = 64;

/// A unidirectional stream's `ConnectRequest` (empty: `{}`) as the one
/// command of a frame.
fn uni_connect(request: &[u8]) -> Vec<u8> {
    let body: Vec<u8> = request.iter().copied().filter(|&c| c != b'\n' && c != b'\r').collect();
    let body = if body.iter().all(u8::is_ascii_whitespace) { b"{}".to_vec() } else { body };
    let mut out = b"{\"id\":1,\"connect\":".to_vec();
    out.extend_from_slice(&body);
    out.push(b'}');
    out
}

/// The two halves of an emulated session's name: its id and its MAC
/// (16 + 32 lowercase hex digits); `None` for anything else.
pub fn parse_session(session: &str) -> Option<(Sid, [u8; 16])> {
    if session.len() != 48 || !session.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let sid = u64::from_str_radix(&session[..16], 16).ok()?;
    let mac = u128::from_str_radix(&session[16..], 16).ok()?;
    Some((Sid(sid), mac.to_be_bytes()))
}

/// The `node` an emulated session's connect reply names: gateway and core.
pub fn node_name(gateway: &str, core: usize) -> String {
    format!("{gateway}/{core}")
}

/// Not a fallback request: the WebSocket upgrade's refusal stands.
pub(super) fn upgrade_refusal(e: &handshake::HandshakeError) -> bool {
    !matches!(e, handshake::HandshakeError::MethodNotAllowed | handshake::HandshakeError::UpgradeRequired)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_are_an_id_and_a_mac_and_nothing_else_parses() {
        let name = format!("{:016x}{:032x}", 0x0000_0002_0000_0007u64, 0xabcdu128);
        let (sid, mac) = parse_session(&name).unwrap();
        assert_eq!(sid, Sid(0x0000_0002_0000_0007));
        assert_eq!(u128::from_be_bytes(mac), 0xabcd);
        for bad in [
            "",
            "no-such-session",
            "254bfcdc-ed6f-0ac0-81b4-031944688035",
            &name[1..],
            &name.to_uppercase(),
            &format!("+{}", &name[1..]),
        ] {
            assert_eq!(parse_session(bad), None, "{bad}");
        }
        assert_eq!(node_name("gw-1", 3), "gw-1/3");
        assert_eq!(uni_connect(b""), b"{\"id\":1,\"connect\":{}}");
        assert_eq!(uni_connect(b"{\"token\":\n\"t\"}"), b"{\"id\":1,\"connect\":{\"token\":\"t\"}}");
    }
}
