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
use crate::session::Phase;
use proto::cluster::ClusterMsg;

/// Largest request head (bytes), as for the WebSocket upgrade.
const MAX_HEAD: usize = 8192;

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

    /// A request to a fallback path is in `b` (maybe not all of it yet).
    pub(super) fn http_request(&mut self, sid: Sid, mut b: BytesMut, now: u64) {
        if self.cx.waiting.contains_key(&sid) {
            // The previous request's answer is not out yet: this one waits
            // (bounded like any request).
            return self.hold(sid, b);
        }
        let max_body = self.cx.cfg.fallback.max_request_bytes;
        let req = match fallback::parse_request(&b, MAX_HEAD, max_body) {
            Ok(Some(r)) => r,
            Ok(None) => return self.hold(sid, b),
            Err(e) => {
                self.cx.give_scratch(b);
                return self.refuse(sid, fallback::error(e.status(), None, &e.to_string()));
            }
        };
        if b.len() < req.total_len() {
            return self.hold(sid, b);
        }
        let body = b[req.head_len..req.total_len()].to_vec();
        bytes::Buf::advance(&mut b, req.total_len());
        let origin = req.origin.clone();
        let path = req.path().to_owned();
        let fb = self.cx.cfg.fallback.clone();
        if req.method == HttpMethod::Options {
            let answer = fallback::empty(
                204,
                origin.as_deref(),
                Some(req.request_headers.as_deref().unwrap_or("")),
                false,
            );
            return self.answered(sid, answer, req.close, b, now);
        }
        if req.binary {
            self.cx.give_scratch(b);
            return self.refuse(sid, fallback::error(415, origin.as_deref(), "JSON only"));
        }
        if path == fb.emulation_path {
            if req.method != HttpMethod::Post {
                self.cx.give_scratch(b);
                return self.refuse(sid, fallback::error(405, origin.as_deref(), "POST only"));
            }
            return self.emulation_request(sid, &req, &body, b, now);
        }
        self.cx.give_scratch(b);
        let Some(t) = fb.transport_of(&path) else {
            return self.refuse(sid, fallback::error(404, origin.as_deref(), "no such endpoint"));
        };
        let commands = match (req.method, t) {
            (HttpMethod::Post, _) => body,
            (HttpMethod::Get, Transport::Sse | Transport::UniSse) => match req.query_param("cf_connect") {
                Some(c) => c.into_bytes(),
                None if t == Transport::UniSse => Vec::new(),
                None => return self.refuse(sid, fallback::error(400, origin.as_deref(), "no cf_connect")),
            },
            _ => return self.refuse(sid, fallback::error(405, origin.as_deref(), "method not allowed")),
        };
        self.start_stream(sid, t, origin.as_deref(), commands, now);
    }

    /// Keeps a request's bytes for the next read (bounded: a head and a body).
    fn hold(&mut self, sid: Sid, b: BytesMut) {
        let bound = MAX_HEAD + self.cx.cfg.fallback.max_request_bytes;
        if b.len() > bound {
            self.cx.give_scratch(b);
            return self.refuse(sid, fallback::error(413, None, "request too large"));
        }
        if let Some(s) = self.sessions.get_mut(sid) {
            s.partial = b.to_vec();
        }
        self.cx.give_scratch(b);
    }

    /// A request was answered with `answer`: the connection waits for the
    /// next one (the bytes after this request, `rest`, may hold it), or
    /// ends when the client asked to close.
    fn answered(&mut self, sid: Sid, answer: Vec<u8>, close: bool, rest: BytesMut, now: u64) {
        if close {
            self.cx.give_scratch(rest);
            if let Some(s) = self.sessions.get_mut(sid) {
                s.refuse(sid, answer, &mut self.cx.fx);
                self.cx.rearm(s, sid);
            }
            return;
        }
        let idle = self.cx.cfg.limits.handshake_timeout_secs * 1000;
        let Some(s) = self.sessions.get_mut(sid) else { return self.cx.give_scratch(rest) };
        s.queue_framed(sid, Bytes::from(answer), usize::MAX, &mut self.cx.fx);
        s.deadlines.connect_by = now + idle;
        self.cx.rearm(s, sid);
        if rest.is_empty() {
            self.cx.give_scratch(rest);
        } else {
            self.http_request(sid, rest, now);
        }
    }

    /// Starts a stream: the response head, then the request's commands
    /// (for a unidirectional stream, its `ConnectRequest`) as the
    /// session's first frame.
    fn start_stream(&mut self, sid: Sid, t: Transport, origin: Option<&str>, commands: Vec<u8>, now: u64) {
        let connect_by = now + self.cx.cfg.limits.connect_timeout_secs * 1000;
        let Some(s) = self.sessions.get_mut(sid) else { return };
        s.transport = t;
        s.placed = false;
        s.upgraded(connect_by);
        self.cx.handshakes = self.cx.handshakes.saturating_sub(1);
        self.cx.fx.metrics().fallback_streams.fetch_add(1, Ordering::Relaxed);
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
    /// another; a session of another gateway process is not reachable
    /// from here (404).
    fn emulation_request(&mut self, sid: Sid, req: &HttpRequest, body: &[u8], rest: BytesMut, now: u64) {
        let origin = req.origin.clone();
        let Some(e) = EmulationRequest::decode(body) else {
            self.cx.give_scratch(rest);
            return self.refuse(sid, fallback::error(400, origin.as_deref(), "not an emulation request"));
        };
        let (gateway, core) = match e.node.rsplit_once('/') {
            Some((g, c)) => (g, c.parse::<usize>().ok()),
            None => (e.node.as_str(), None),
        };
        if gateway != self.cx.cfg.id {
            // Another gateway process holds the session (several share the
            // port): a router relays the commands there. Accepted, not
            // known to be delivered: 202.
            if gateway.is_empty() || core.is_none() || !self.cx.up.has_room() {
                self.cx.fx.metrics().emulation_unknown.fetch_add(1, Ordering::Relaxed);
                self.cx.give_scratch(rest);
                return self.refuse(sid, fallback::error(404, origin.as_deref(), "unknown node"));
            }
            let data = Bytes::from(e.data.into_bytes());
            let msg = ClusterMsg::Emulation { node: e.node.clone(), session: e.session.clone(), data };
            self.cx.up.push(UpMsg::Forward { key: e.session, msg });
            self.cx.fx.metrics().emulation_relayed.fetch_add(1, Ordering::Relaxed);
            let answer = fallback::empty(202, origin.as_deref(), None, req.close);
            return self.answered(sid, answer, req.close, rest, now);
        }
        let Some(core) = core.filter(|c| *c < self.cx.cores) else {
            self.cx.fx.metrics().emulation_unknown.fetch_add(1, Ordering::Relaxed);
            self.cx.give_scratch(rest);
            return self.refuse(sid, fallback::error(404, origin.as_deref(), "unknown node"));
        };
        let data = Bytes::from(e.data.into_bytes());
        if core == self.cx.id {
            let found = self.emulate_here(&e.session, &data, now);
            return self.emulation_done(sid, found, Waiting { origin, close: req.close }, rest, now);
        }
        if let Some(s) = self.sessions.get_mut(sid) {
            // What follows this request waits for its answer.
            s.partial = rest.to_vec();
        }
        self.cx.give_scratch(rest);
        self.cx.waiting.insert(sid, Waiting { origin, close: req.close });
        let emulation = Box::new(Emulation { session: e.session, data, from: Some((self.cx.id, sid)) });
        self.cx.fx.act(Action::Emulate { core, emulation });
    }

    fn emulation_done(&mut self, sid: Sid, found: bool, w: Waiting, rest: BytesMut, now: u64) {
        if found {
            let answer = fallback::empty(204, w.origin.as_deref(), None, w.close);
            self.answered(sid, answer, w.close, rest, now);
        } else {
            self.cx.give_scratch(rest);
            self.refuse(sid, fallback::error(404, w.origin.as_deref(), "unknown session"));
        }
    }

    /// Hands the commands to the emulated session, if this core holds it.
    pub(super) fn emulate_here(&mut self, session: &str, data: &[u8], now: u64) -> bool {
        let target = session_key(session).and_then(|k| self.cx.emulated.get(&k).copied());
        let Some(target) = target else {
            self.cx.fx.metrics().emulation_unknown.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        if !self.sessions.get(target).is_some_and(|s| s.is_connected() && *s.identity.client == *session) {
            self.cx.fx.metrics().emulation_unknown.fetch_add(1, Ordering::Relaxed);
            return false;
        }
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

    /// Another core's word on an emulation request this core read.
    pub fn emulated(&mut self, sid: Sid, found: bool, now: std::time::Instant) {
        let ms = self.cx.clock.ms(now);
        let Some(w) = self.cx.waiting.remove(&sid) else { return };
        let Some(s) = self.sessions.get_mut(sid) else { return };
        if s.phase() != Phase::Upgrading {
            return;
        }
        let mut rest = self.cx.take_scratch();
        rest.extend_from_slice(&std::mem::take(&mut s.partial));
        self.emulation_done(sid, found, w, rest, ms);
        self.settle();
    }
}

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

/// The key of an emulated session in its core's table: the 128 bits of
/// its client id (a UUID, as the core makes them); `None`
/// for anything else.
pub fn session_key(session: &str) -> Option<u128> {
    if session.len() != 36 {
        return None;
    }
    let mut v: u128 = 0;
    let mut digits = 0;
    for c in session.chars() {
        if c == '-' {
            continue;
        }
        v = (v << 4) | c.to_digit(16)? as u128;
        digits += 1;
    }
    (digits == 32).then_some(v)
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
    fn session_keys_are_the_uuid_bits_and_nothing_else_has_one() {
        let k = session_key("254bfcdc-ed6f-0ac0-81b4-031944688035").unwrap();
        assert_eq!(k, 0x254bfcdc_ed6f_0ac0_81b4_031944688035);
        for bad in [
            "",
            "no-such-session",
            "254bfcdc-ed6f-0ac0-81b4-03194468803x",
            "254bfcdc-ed6f-0ac0-81b4-0319446880355",
        ] {
            assert_eq!(session_key(bad), None, "{bad}");
        }
        assert_eq!(node_name("gw-1", 3), "gw-1/3");
        assert_eq!(uni_connect(b""), b"{\"id\":1,\"connect\":{}}");
        assert_eq!(uni_connect(b"{\"token\":\n\"t\"}"), b"{\"id\":1,\"connect\":{\"token\":\"t\"}}");
    }
}
