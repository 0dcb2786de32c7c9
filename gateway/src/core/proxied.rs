//! The proxy hooks as a core sees them: which calls it has in flight
//! (at most `proxy.max_in_flight`), and what each answer does to the
//! session that asked. The HTTP side is [`crate::proxy`]; a call leaves as
//! an [`Action::Proxy`] and its answer comes back through the core's inbox
//! ([`Core::proxy_answer`]).
//!
//! Every hook gets the same three outcomes from the backend (`result`,
//! `error`, `disconnect`, see `proto::proxy`), and a failed call (timeout,
//! open breaker, transport error, bad answer, the in-flight bound) is
//! error 100 with `temporary`, so SDKs retry with backoff:
//! - connect: the frame that held the `connect` waits, unhandled, with the
//!   session's later input, until the answer is in; then it is handled
//!   again with the answer in place of a token — on the user's core: a
//!   connection whose user lives on another core moves there first, with
//!   the answer;
//! - refresh: when a connection's `expire_at` passes, the answer extends it
//!   or ends it (3005); a failed call is retried every
//!   [`RETRY_MS`] while the connection lives;
//! - subscribe: allows (with channel info and an expiry), or refuses;
//! - publish: allows (the answer's `data`, if any, replaces the client's),
//!   or refuses;
//! - rpc: the answer's `data` is the reply;
//! - sub_refresh: when a subscription's `expire_at` passes, the answer
//!   extends it or ends it (unsubscribe push 2501); without the hook it ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::client::Disconnect;
use proto::client::ReplyError;
use proto::client::channel::ChannelName;
use proto::client::codes::unsubscribe_code;
use proto::client::command::{PublishRequest, RpcRequest, SubscribeRequest};
use proto::client::reply::{self, client_info, strip_newlines};
use proto::cluster::ClusterMsg;
use proto::proxy::{self as wire, Answer, Hook, Request};
use proto::seeded::{self, Map};
use serde_json::value::RawValue;

use super::commands::{Origin, Refusal};
use super::requests::Kind;
use super::{Core, Ctx};
use crate::config::ProxyEndpoint;
use crate::effects::{Action, Sid};
use crate::proxy::{Failure, ProxyAnswer, ProxyCall};
use crate::session::ClientId;
use crate::session::{ConnectHook, Due, Expiring, Session, SessionProxy};

/// Milliseconds before a failed refresh or sub_refresh call is made again.
pub const RETRY_MS: u64 = 10_000;

/// What the connect hook said, as `connect` uses it.
#[derive(Debug)]
pub struct ConnectAnswer {
    /// The outcome: who the client is, or the refusal.
    pub outcome: Result<Connected, Refusal>,
}

/// A connect hook's `result`.
#[derive(Debug)]
pub struct Connected {
    /// The connection id the hook was told.
    pub client: ClientId,
    /// The user.
    pub user: String,
    /// Unix seconds of expiry (0: never).
    pub expire_at: u64,
    /// Connection info (newlines removed).
    pub info: Option<Bytes>,
    /// Data for the connect reply (newlines removed).
    pub data: Option<Bytes>,
    /// Server-side subscriptions, with channel info.
    pub subs: Vec<(String, Option<Bytes>)>,
}

/// One call in flight.
#[derive(Debug)]
struct Call {
    sid: Sid,
    what: What,
}

#[derive(Debug)]
enum What {
    Connect { client: ClientId },
    Refresh,
    Subscribe { id: u32, channel: Arc<str>, recovery: (bool, String, u64, u64) },
    Publish { id: u32, channel: String, data: Bytes },
    Rpc { id: u32 },
    SubRefresh { channel: Arc<str> },
}

/// A core's proxy calls in flight.
#[derive(Debug)]
pub struct Proxied {
    next: u64,
    calls: Map<u64, Call>,
}

impl Proxied {
    /// None in flight.
    pub fn new(seed: u64) -> Proxied {
        Proxied { next: 0, calls: seeded::map(seed) }
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        self.calls.len()
    }
}

/// A hook's answer read: the result, or the refusal the client gets.
fn read<T: serde::de::DeserializeOwned>(
    hook: Hook,
    outcome: Result<Bytes, Failure>,
    cx: &Ctx,
) -> Result<T, Refusal> {
    let body = outcome.map_err(|_| Refusal::Reply(ReplyError::INTERNAL))?;
    match Answer::<T>::parse(&body) {
        Ok(Answer::Result(r)) => Ok(r),
        Ok(Answer::Error(e)) => {
            Err(Refusal::Custom { code: e.code, message: e.message, temporary: e.temporary })
        }
        Ok(Answer::Disconnect(d)) => Err(Refusal::Close(Disconnect {
            code: d.code,
            reason: super::users::close_reason(d.code, &d.reason),
        })),
        Err(why) => {
            tracing::debug!(hook = hook.name(), why, "bad proxy answer");
            cx.fx.metrics_all().proxy.failed(hook, Failure::BadAnswer);
            Err(Refusal::Reply(ReplyError::INTERNAL))
        }
    }
}

/// `b` (JSON) as a raw value for a reply.
pub(super) fn raw(b: &Bytes) -> Option<Box<RawValue>> {
    RawValue::from_string(String::from_utf8(b.to_vec()).ok()?).ok()
}

fn stripped(v: &Option<Box<RawValue>>) -> Option<Bytes> {
    v.as_ref().map(|v| strip_newlines(v.get().as_bytes()))
}

impl Ctx {
    /// Sends a call for session `s` to `endpoint`; returns its id. Past the
    /// session's bound (`limits.max_requests_in_flight`): error 111, a
    /// refusal; past the core's (`proxy.max_in_flight`): error 100 — both
    /// temporary, both counted (`kind="in_flight"`).
    fn call(
        &mut self,
        s: &mut Session,
        sid: Sid,
        hook: Hook,
        endpoint: &ProxyEndpoint,
        body: Vec<u8>,
        what: What,
    ) -> Result<u64, Refusal> {
        let own = s.proxy.as_ref().map_or(0, |p| p.in_flight);
        if own >= self.cfg.limits.max_requests_in_flight {
            self.fx.metrics_all().proxy.failed(hook, Failure::InFlight);
            return Err(ReplyError::TOO_MANY_REQUESTS.into());
        }
        if self.proxied.in_flight() >= self.cfg.proxy.max_in_flight {
            self.fx.metrics_all().proxy.failed(hook, Failure::InFlight);
            return Err(ReplyError::INTERNAL.into());
        }
        self.proxied.next += 1;
        let id = self.proxied.next;
        self.proxied.calls.insert(id, Call { sid, what });
        let p = self.proxy_state(s);
        p.in_flight += 1;
        let headers = p.headers.clone();
        self.fx.act(Action::Proxy(ProxyCall {
            core: self.id,
            id,
            hook,
            endpoint: Arc::from(endpoint.endpoint.as_str()),
            timeout: Duration::from_millis(endpoint.timeout_ms),
            body,
            headers,
        }));
        Ok(id)
    }

    /// The session's proxy state, made on first use.
    fn proxy_state<'a>(&self, s: &'a mut Session) -> &'a mut SessionProxy {
        s.proxy.get_or_insert_with(Box::default)
    }

    /// A `connect` without a token, with the connect hook on: asks it; the
    /// frame waits (see [`ConnectHook::Waiting`]).
    pub(super) fn connect_hook(
        &mut self,
        s: &mut Session,
        sid: Sid,
        c: &proto::client::command::ConnectRequest,
        endpoint: &ProxyEndpoint,
    ) -> Result<(), Refusal> {
        let client = self.client_id();
        let body = Request {
            name: &c.name,
            version: &c.version,
            data: c.data.as_deref(),
            channels: c.subs.keys().map(String::as_str).collect(),
            transport: s.transport.name(),
            ..Request::new(&client.text(), "")
        }
        .to_body();
        self.call(s, sid, Hook::Connect, endpoint, body, What::Connect { client })?;
        self.proxy_state(s).connect = ConnectHook::Waiting { frame: Bytes::new(), from: 0 };
        Ok(())
    }

    /// The connect hook's answer for `connect`, if the frame is being
    /// handled again with one.
    pub(super) fn take_connect_answer(&mut self, s: &mut Session) -> Option<Box<ConnectAnswer>> {
        let p = s.proxy.as_mut()?;
        match std::mem::take(&mut p.connect) {
            ConnectHook::Answered { answer, .. } => Some(answer),
            other => {
                p.connect = other;
                None
            }
        }
    }

    /// A `subscribe` without a token in a namespace with a subscribe hook:
    /// asks it (the checks of the subscription limit, the budget and
    /// duplicates ran already).
    pub(super) fn subscribe_hook(
        &mut self,
        s: &mut Session,
        sid: Sid,
        id: u32,
        r: SubscribeRequest,
        endpoint: &ProxyEndpoint,
    ) -> Result<(), Refusal> {
        let id_ = &s.identity;
        let body = Request {
            channel: &r.channel,
            data: r.data.as_deref(),
            ..Request::new(&id_.client.text(), &id_.user)
        }
        .to_body();
        let channel: Arc<str> = Arc::from(r.channel.as_str());
        let recovery = (r.recover, r.epoch, r.offset, r.flag);
        let what = What::Subscribe { id, channel: channel.clone(), recovery };
        let call = self.call(s, sid, Hook::Subscribe, endpoint, body, what)?;
        self.proxy_state(s).subscribing.push((channel, call));
        Ok(())
    }

    /// A client `publish` in a namespace with a publish hook (the rates
    /// were charged already).
    pub(super) fn publish_hook(
        &mut self,
        s: &mut Session,
        sid: Sid,
        id: u32,
        r: PublishRequest,
        endpoint: &ProxyEndpoint,
    ) -> Result<(), Refusal> {
        let data = r.data.as_deref().ok_or(ReplyError::BAD_REQUEST)?;
        let id_ = &s.identity;
        let body =
            Request { channel: &r.channel, data: Some(data), ..Request::new(&id_.client.text(), &id_.user) }
                .to_body();
        let data = strip_newlines(data.get().as_bytes());
        self.call(s, sid, Hook::Publish, endpoint, body, What::Publish { id, channel: r.channel, data })?;
        Ok(())
    }

    /// A client `rpc`: error 108 without the rpc hook.
    pub(super) fn rpc(
        &mut self,
        s: &mut Session,
        sid: Sid,
        id: u32,
        r: RpcRequest,
        now: u64,
    ) -> Result<(), Refusal> {
        let Some(endpoint) = self.cfg.proxy.rpc.clone() else {
            return Err(ReplyError::NOT_AVAILABLE.into());
        };
        self.charge(s, now)?;
        let id_ = &s.identity;
        let body = Request {
            method: &r.method,
            data: r.data.as_deref(),
            ..Request::new(&id_.client.text(), &id_.user)
        }
        .to_body();
        self.call(s, sid, Hook::Rpc, &endpoint, body, What::Rpc { id })?;
        Ok(())
    }

    /// The channel hook `hook` of `channel`, if its namespace has one.
    pub(super) fn channel_hook(&self, hook: Hook, channel: &str) -> Option<ProxyEndpoint> {
        if !self.cfg.proxy.has_channel_hooks() {
            return None; // every publish and subscribe asks: no parsing when off
        }
        let name = ChannelName::parse(channel).ok()?;
        self.cfg.proxy.channel_hook(hook, name.namespace.unwrap_or("")).cloned()
    }
}

impl Core {
    /// The answer to proxy call `a.id`: acts on the session that asked, if
    /// it is still there.
    pub fn proxy_answer(&mut self, a: ProxyAnswer, now: Instant) {
        let ms = self.cx.clock.ms(now);
        let Some(Call { sid, what }) = self.cx.proxied.calls.remove(&a.id) else { return };
        let Some(s) = self.sessions.get_mut(sid) else { return };
        if let Some(p) = s.proxy.as_mut() {
            p.in_flight = p.in_flight.saturating_sub(1);
        }
        if s.is_ending() {
            return;
        }
        match what {
            What::Connect { client } => self.connect_answered(sid, client, a.outcome, ms),
            What::Refresh => self.refresh_answered(sid, a.id, a.outcome, ms),
            What::Subscribe { id, channel, recovery } => {
                self.subscribe_answered(sid, a.id, id, channel, recovery, a.outcome, ms)
            }
            What::Publish { id, channel, data } => {
                self.publish_answered(sid, id, channel, data, a.outcome, ms)
            }
            What::Rpc { id } => {
                let line = match read::<wire::RpcResult>(Hook::Rpc, a.outcome, &self.cx) {
                    Ok(r) => {
                        let data = stripped(&r.data).unwrap_or_else(|| Bytes::from_static(b"null"));
                        let mut body = b"{\"data\":".to_vec();
                        body.extend_from_slice(&data);
                        body.push(b'}');
                        Ok(reply::raw_reply(id, "rpc", &body))
                    }
                    Err(r) => Err(r),
                };
                self.after_hook(sid, id, line);
            }
            What::SubRefresh { channel } => self.sub_refresh_answered(sid, a.id, channel, a.outcome, ms),
        }
        self.settle();
    }

    /// Sends a hook's reply line (or its refusal) to a session, behind a
    /// connect reply that waits if there is one.
    fn after_hook(&mut self, sid: Sid, id: u32, line: Result<Vec<u8>, Refusal>) {
        let line = match line {
            Ok(l) => l,
            Err(Refusal::Reply(e)) => reply::error_reply(id, e),
            Err(Refusal::Custom { code, message, temporary }) => {
                reply::error_reply_with(id, code, &message, temporary)
            }
            Err(Refusal::Close(d)) => return self.close(sid, d.into()),
        };
        let Some(s) = self.sessions.get_mut(sid) else { return };
        match s.connecting.as_mut() {
            Some(pc) => pc.replies.push(line),
            None => self.cx.send_line(s, sid, &line),
        }
    }

    fn connect_answered(&mut self, sid: Sid, client: ClientId, outcome: Result<Bytes, Failure>, now: u64) {
        let outcome = read::<wire::ConnectResult>(Hook::Connect, outcome, &self.cx).map(|r| {
            let mut subs: Vec<(String, Option<Bytes>)> =
                r.subs.iter().map(|(ch, o)| (ch.clone(), stripped(&o.info))).collect();
            subs.extend(r.channels.into_iter().map(|ch| (ch, None)));
            Connected {
                client,
                user: r.user,
                expire_at: r.expire_at,
                info: stripped(&r.info),
                data: stripped(&r.data),
                subs,
            }
        });
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let Some(p) = s.proxy.as_mut() else { return };
        let ConnectHook::Waiting { frame, from } = std::mem::take(&mut p.connect) else { return };
        let target = match &outcome {
            Ok(c) if self.cx.cores > 1 => {
                Some(super::reading::core_of_user(&c.user, self.cx.cores)).filter(|t| *t != self.cx.id)
            }
            _ => None,
        };
        p.connect = ConnectHook::Answered { answer: Box::new(ConnectAnswer { outcome }), from };
        let pending = s.take_partial();
        if let Some(core) = target {
            // The user's sessions live on its core: the connection moves
            // there with the answer and is handled there.
            return self.hand_over(sid, core, frame, Bytes::from(pending));
        }
        self.handle_frame_from(sid, &frame, from, now);
        let Some(s) = self.sessions.get_mut(sid) else { return };
        if s.is_ending() || pending.is_empty() {
            return;
        }
        if s.connect_waits() {
            // A later connect of the frame asked again: what the client
            // sent since still waits.
            s.keep_partial(&pending);
            return;
        }
        let mut b = self.cx.take_scratch();
        b.extend_from_slice(&pending);
        self.feed(sid, b, now);
    }

    /// A connected session's `expire_at` passed with the refresh hook on.
    pub(super) fn refresh_hook(&mut self, sid: Sid, now: u64) {
        let Some(endpoint) = self.cx.cfg.proxy.refresh.clone() else { return };
        let Some(s) = self.sessions.get_mut(sid) else { return };
        if s.proxy.as_ref().is_some_and(|p| p.refreshing != 0) {
            return; // asked already: its answer sets the next expiry
        }
        let body = Request::new(&s.identity.client.text(), &s.identity.user).to_body();
        // No deadline while the call is in flight; its answer sets the next.
        s.deadlines.expires_at = Due::NONE;
        match self.cx.call(s, sid, Hook::Refresh, &endpoint, body, What::Refresh) {
            Ok(call) => self.cx.proxy_state(s).refreshing = call,
            Err(_) => s.deadlines.expires_at = Due::at(now + RETRY_MS),
        }
        self.cx.rearm(s, sid);
    }

    fn refresh_answered(&mut self, sid: Sid, call: u64, outcome: Result<Bytes, Failure>, now: u64) {
        let Some(p) = self.sessions.get_mut(sid).and_then(|s| s.proxy.as_mut()) else { return };
        if p.refreshing != call {
            return;
        }
        p.refreshing = 0;
        match read::<wire::RefreshResult>(Hook::Refresh, outcome, &self.cx) {
            Ok(r) => {
                if let Some(s) = self.sessions.get_mut(sid)
                    && let Some(info) = stripped(&r.info)
                {
                    s.identity.conn_info = Some(Box::new(info));
                }
                self.server_refresh(sid, r.expired, r.expire_at, now);
            }
            Err(Refusal::Close(d)) => self.close(sid, d.into()),
            Err(Refusal::Reply(_) | Refusal::Custom { .. }) => {
                // The backend could not say: the connection stays, asked again later.
                let Some(s) = self.sessions.get_mut(sid) else { return };
                s.deadlines.expires_at = Due::at(now + RETRY_MS);
                self.cx.rearm(s, sid);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn subscribe_answered(
        &mut self,
        sid: Sid,
        call: u64,
        id: u32,
        channel: Arc<str>,
        recovery: (bool, String, u64, u64),
        outcome: Result<Bytes, Failure>,
        now: u64,
    ) {
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let Some(p) = s.proxy.as_mut() else { return };
        let Some(i) = p.subscribing.iter().position(|c| c.1 == call) else {
            return; // unsubscribed meanwhile (its reply was the unsubscribe's)
        };
        p.subscribing.swap_remove(i);
        if s.subs.contains(&channel) {
            // Subscribed server-side meanwhile.
            return self.after_hook(sid, id, Err(Refusal::Reply(ReplyError::ALREADY_SUBSCRIBED)));
        }
        let r = match read::<wire::SubscribeResult>(Hook::Subscribe, outcome, &self.cx) {
            Ok(r) => r,
            Err(e) => return self.after_hook(sid, id, Err(e)),
        };
        let ns = match self.cx.cfg.namespaces.resolve_str(&channel) {
            Ok(ns) => ns.clone(),
            Err(e) => return self.after_hook(sid, id, Err(Refusal::Reply(e))),
        };
        let s = self.sessions.get_mut(sid).expect("looked up above");
        let info = stripped(&r.info);
        let started = self.cx.start_subscription(
            s,
            sid,
            &channel,
            &ns,
            info.as_deref(),
            Origin::Client(id),
            recovery,
            now,
        );
        match started {
            Ok(line) => {
                let at = (r.expire_at > 0).then(|| self.expiry_ms(r.expire_at, now));
                let s = self.sessions.get_mut(sid).expect("looked up above");
                if let Some(p) = s.proxy.as_mut() {
                    p.expiring.retain(|e| e.channel != channel);
                }
                if let Some(at) = at {
                    let channel = self.cx.channels.name(&channel);
                    self.cx.proxy_state(s).expiring.push(Expiring { channel, at, call: 0 });
                    self.cx.rearm(s, sid);
                }
                if let Some(line) = line {
                    self.after_hook(sid, id, Ok(line));
                }
            }
            Err(refusal) => self.after_hook(sid, id, Err(refusal)),
        }
    }

    /// Core milliseconds of Unix second `expire_at` (now, if it passed).
    fn expiry_ms(&self, expire_at: u64, now: u64) -> u64 {
        let unix = self.cx.clock.unix(now);
        now + expire_at.saturating_sub(unix).min(u32::MAX as u64) * 1000
    }

    fn publish_answered(
        &mut self,
        sid: Sid,
        id: u32,
        channel: String,
        data: Bytes,
        outcome: Result<Bytes, Failure>,
        now: u64,
    ) {
        let r = match read::<wire::PublishResult>(Hook::Publish, outcome, &self.cx) {
            Ok(r) => r,
            Err(e) => return self.after_hook(sid, id, Err(e)),
        };
        let data = stripped(&r.data).unwrap_or(data);
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let id_ = &s.identity;
        let info = client_info(&id_.user, &id_.client.text(), id_.info(), None);
        let sent = self.cx.request(s, sid, Kind::Publish { id }, now, |req| ClusterMsg::Publish {
            req,
            channel,
            data,
            info: Some(info),
            idempotency_key: String::new(),
        });
        if let Err(e) = sent {
            self.after_hook(sid, id, Err(Refusal::Reply(e)));
        }
    }

    /// A connected session's subscriptions whose expiry passed: each is
    /// refreshed through its sub_refresh hook, or ends.
    pub(super) fn subscriptions_expired(&mut self, sid: Sid, now: u64) {
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let Some(p) = s.proxy.as_mut() else { return };
        // A subscription that ended some other way (a resync, a refusal)
        // expires with it.
        p.expiring.retain(|e| s.subs.contains(&e.channel));
        let due: Vec<Arc<str>> =
            p.expiring.iter().filter(|e| e.call == 0 && e.at <= now).map(|e| e.channel.clone()).collect();
        for channel in due {
            let hook = self.cx.channel_hook(Hook::SubRefresh, &channel);
            let Some(s) = self.sessions.get_mut(sid) else { return };
            let Some(endpoint) = hook else {
                let reason = "subscription expired";
                self.server_unsubscribe_with(sid, &channel, unsubscribe_code::EXPIRED, reason, now);
                continue;
            };
            let id_ = &s.identity;
            let body = Request { channel: &channel, ..Request::new(&id_.client.text(), &id_.user) }.to_body();
            let what = What::SubRefresh { channel: channel.clone() };
            let called = self.cx.call(s, sid, Hook::SubRefresh, &endpoint, body, what);
            let e = s.proxy.as_mut().and_then(|p| p.expiring.iter_mut().find(|e| e.channel == channel));
            if let Some(e) = e {
                match called {
                    Ok(call) => e.call = call,
                    Err(_) => e.at = now + RETRY_MS,
                }
            }
        }
        if let Some(s) = self.sessions.get_mut(sid) {
            self.cx.rearm(s, sid);
        }
    }

    fn sub_refresh_answered(
        &mut self,
        sid: Sid,
        call: u64,
        channel: Arc<str>,
        outcome: Result<Bytes, Failure>,
        now: u64,
    ) {
        let Some(s) = self.sessions.get_mut(sid) else { return };
        if !s.proxy.as_ref().is_some_and(|p| p.expiring.iter().any(|e| e.call == call)) {
            return; // that subscription ended meanwhile
        }
        let r = read::<wire::RefreshResult>(Hook::SubRefresh, outcome, &self.cx);
        let unix = self.cx.clock.unix(now);
        let at = match r {
            Ok(r) if r.expired || (r.expire_at != 0 && r.expire_at <= unix) => {
                let reason = "subscription expired";
                return self.server_unsubscribe_with(sid, &channel, unsubscribe_code::EXPIRED, reason, now);
            }
            Ok(r) if r.expire_at == 0 => None,
            Ok(r) => Some(self.expiry_ms(r.expire_at, now)),
            Err(Refusal::Close(d)) => return self.close(sid, d.into()),
            // The backend could not say: asked again later.
            Err(Refusal::Reply(_) | Refusal::Custom { .. }) => Some(now + RETRY_MS),
        };
        let s = self.sessions.get_mut(sid).expect("looked up above");
        let p = s.proxy.as_mut().expect("checked above");
        match at {
            None => p.expiring.retain(|e| e.call != call),
            Some(at) => {
                if let Some(e) = p.expiring.iter_mut().find(|e| e.call == call) {
                    (e.at, e.call) = (at, 0);
                }
            }
        }
        self.cx.rearm(s, sid);
    }
}
