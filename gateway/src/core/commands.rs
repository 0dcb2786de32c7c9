//! The client protocol's commands (`client-protocol.md` section 3), one
//! function each. A command either adds replies to the frame's reply list
//! or ends the connection with a close code (`Err`).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use proto::client::channel::ChannelName;
use proto::client::command::{
    ChannelRequest, Command, ConnectRequest, HistoryRequest, PublishRequest, RefreshRequest,
    SubRefreshRequest, SubscribeRequest, UnsubscribeRequest,
};
use proto::client::reply::{self, ConnectResult, RefreshResult, SubRefreshResult, SubscribeResult};
use proto::client::reply::{client_info, strip_newlines};
use proto::client::{Disconnect, Method, ReplyError};
use proto::cluster::ClusterMsg;
use proto::namespace::{PublishPolicy, SubscribePolicy};
use proto::token_bucket::TokenBucket;
use rand::Rng;

use super::requests::Kind;
use super::{Core, Ctx, MAX_USER_BUCKETS};
use crate::auth::TokenError;
use crate::bridge::UpMsg;
use crate::effects::Sid;
use crate::session::subs::{PendingSub, SubState};
use crate::session::{Due, Identity, PendingConnect, Rate, Session, VERSION};

/// Who asked for a subscription.
#[derive(Debug, Clone, Copy)]
pub(super) enum Origin {
    /// The client, with its command id.
    Client(u32),
    /// The server API: answered with a `subscribe` push.
    Server,
    /// The connection token (`channels`, `subs`): answered in the connect
    /// reply's `subs`, at once when `local` and the core knows the answer,
    /// else once every router answered (the reply waits; nothing of the
    /// channels reaches the client before it).
    Connect {
        /// Whether the core may answer from what it knows.
        local: bool,
    },
}

/// Why a command was refused.
#[derive(Debug)]
pub enum Refusal {
    /// An error reply; the connection goes on.
    Reply(ReplyError),
    /// An error reply of the app backend's (a proxy hook's); the
    /// connection goes on.
    Custom {
        /// Code.
        code: u32,
        /// Message.
        message: String,
        /// Whether the client should retry.
        temporary: bool,
    },
    /// The connection ends with this code.
    Close(Disconnect),
}

impl From<ReplyError> for Refusal {
    fn from(e: ReplyError) -> Self {
        Refusal::Reply(e)
    }
}

/// What one command produced besides its reply.
type Replies = Vec<Vec<u8>>;

impl Core {
    /// Handles one command of session `sid`; `Err` ends the connection.
    pub(super) fn command(
        &mut self,
        sid: Sid,
        cmd: Command,
        replies: &mut Replies,
        now: u64,
    ) -> Result<(), Disconnect> {
        let id = cmd.id;
        let Some(s) = self.sessions.get_mut(sid) else { return Ok(()) };
        let cx = &mut self.cx;
        let result = match cmd.method {
            Method::Connect(c) => cx.connect(s, sid, id, c, replies, now),
            Method::Subscribe(r) => cx.subscribe(s, sid, id, r, replies, now),
            Method::Unsubscribe(r) => {
                cx.unsubscribe(s, sid, id, r, replies);
                // A waiting connect reply may have waited for that channel only.
                if s.connecting.as_ref().is_some_and(|pc| pc.waiting.is_empty()) {
                    self.finish_connect(sid, now);
                }
                return Ok(());
            }
            Method::Publish(r) => cx.publish(s, sid, id, r, now),
            Method::Presence(r) => cx.presence(s, sid, id, r, false, now),
            Method::PresenceStats(r) => cx.presence(s, sid, id, r, true, now),
            Method::History(r) => cx.history(s, sid, id, r, now),
            Method::Ping => {
                replies.push(reply::raw_reply(id, "ping", b"{}"));
                Ok(())
            }
            Method::Pong => {
                s.deadlines.pong_due = Due::NONE;
                Ok(())
            }
            Method::Send(_) => Ok(()),
            Method::Rpc(r) => cx.rpc(s, sid, id, r, now),
            Method::Refresh(r) => cx.refresh(s, sid, id, r, replies, now),
            Method::SubRefresh(r) => cx.sub_refresh(s, id, r, replies, now),
            Method::Unknown => Err(Refusal::Reply(ReplyError::METHOD_NOT_FOUND)),
        };
        match result {
            Ok(()) => Ok(()),
            Err(Refusal::Reply(e)) if e == ReplyError::TOO_MANY_REQUESTS => {
                // A rate or the in-flight bound: tolerated up to a count.
                replies.push(reply::error_reply(id, e));
                let max = self.cx.cfg.limits.max_refusals;
                let s = self.sessions.get_mut(sid).expect("handled above");
                s.refusals += 1;
                if s.refusals > max { Err(Disconnect::TOO_MANY_REQUESTS) } else { Ok(()) }
            }
            Err(Refusal::Reply(e)) => {
                replies.push(reply::error_reply(id, e));
                Ok(())
            }
            Err(Refusal::Custom { code, message, temporary }) => {
                replies.push(reply::error_reply_with(id, code, &message, temporary));
                Ok(())
            }
            Err(Refusal::Close(d)) => Err(d),
        }
    }
}

impl Ctx {
    /// The session's publish and request rates.
    fn rates(&self) -> (Rate, Rate) {
        let lim = &self.cfg.limits;
        (
            Rate { per_sec: lim.publish_rate, burst: lim.publish_burst },
            Rate { per_sec: lim.request_rate, burst: lim.request_burst },
        )
    }

    /// Takes one router-bound command from the session's budget.
    pub(super) fn charge(&self, s: &mut Session, now: u64) -> Result<(), Refusal> {
        let (publish, requests) = self.rates();
        if s.budget.take_request(publish, requests, now) {
            Ok(())
        } else {
            Err(ReplyError::TOO_MANY_REQUESTS.into())
        }
    }

    fn ttl_of(&self, expires: Option<u64>, now: u64) -> Option<u32> {
        expires.map(|t| t.saturating_sub(self.clock.unix(now)).min(u32::MAX as u64) as u32)
    }

    fn connect(
        &mut self,
        s: &mut Session,
        sid: Sid,
        id: u32,
        c: ConnectRequest,
        replies: &mut Replies,
        now: u64,
    ) -> Result<(), Refusal> {
        if s.is_connected() {
            return Err(Refusal::Close(Disconnect::BAD_REQUEST));
        }
        // The connect hook's answer, when this frame is handled again with
        // one: only a connect without a token takes it.
        let answer = if c.token.is_empty() { self.take_connect_answer(s) } else { None };
        if !self.up.has_room() {
            // The routers cannot be told about this user now: try later.
            return Err(Refusal::Reply(ReplyError::INTERNAL));
        }
        let unix = self.clock.unix(now);
        // Server-side subscriptions: the token's `channels` and `subs`, in
        // name order, each once, with the `subs` entry's `info` as chan_info.
        let mut server_subs: Vec<(String, Option<bytes::Bytes>)> = Vec::new();
        let mut client = None;
        let mut data = None;
        let (user, info, expires) = if let Some(answer) = answer {
            // The connect hook answered: it, not a token, says who this is.
            let a = answer.outcome?;
            server_subs = a.subs;
            server_subs.sort_by(|a, b| a.0.cmp(&b.0));
            server_subs.dedup_by(|a, b| a.0 == b.0);
            client = Some(a.client);
            data = a.data;
            (a.user, a.info, (a.expire_at != 0).then_some(a.expire_at))
        } else if c.token.is_empty() && self.cfg.proxy.connect.is_some() {
            let endpoint = self.cfg.proxy.connect.clone().expect("checked");
            return self.connect_hook(s, sid, &c, &endpoint);
        } else if c.token.is_empty() {
            if !self.cfg.auth.allow_anonymous_connect_without_token {
                return Err(Refusal::Close(Disconnect::BAD_REQUEST));
            }
            (String::new(), None, None)
        } else {
            match self.verifier.connection(&c.token, unix) {
                Ok(claims) => {
                    let exp = claims.expires_at();
                    for (ch, sub) in claims.subs {
                        server_subs.push((ch, sub.info.map(|i| strip_newlines(i.get().as_bytes()))));
                    }
                    for ch in claims.channels {
                        server_subs.push((ch, None));
                    }
                    server_subs.sort_by(|a, b| a.0.cmp(&b.0));
                    server_subs.dedup_by(|a, b| a.0 == b.0);
                    (claims.sub, claims.info.map(|i| strip_newlines(i.get().as_bytes())), exp)
                }
                Err(TokenError::Expired) => return Err(Refusal::Reply(ReplyError::TOKEN_EXPIRED)),
                Err(TokenError::Invalid) => return Err(Refusal::Close(Disconnect::INVALID_TOKEN)),
            }
        };
        if expires.is_some_and(|t| t <= unix) {
            return Err(Refusal::Reply(ReplyError::TOKEN_EXPIRED));
        }
        if server_subs.len() > self.cfg.limits.max_subscriptions {
            // More than a connection may hold: the token is wrong, and a
            // reconnect would not help (3505 is terminal for the SDKs).
            return Err(Refusal::Close(Disconnect::CHANNEL_LIMIT));
        }
        let ttl = self.ttl_of(expires, now);
        let client = client.unwrap_or_else(|| self.client_id());
        let user = self.users.add(&user, sid);
        s.connected(Identity { client, user: user.clone(), conn_info: info.map(Box::new) });
        let (session, node) = if s.transport.is_emulation() {
            // The right to send this session's commands: a secret of its
            // own (the client id is seen by others: presence, join/leave).
            (self.session_name(sid), super::fallback::node_name(&self.cfg.id, self.id))
        } else {
            (String::new(), String::new())
        };
        if !user.is_empty() {
            // Before anything that can fail below: the retire that follows
            // a failure sends the matching offline.
            let key = self.cfg.namespaces.presence_channel(&user);
            let msg = ClusterMsg::UserOnline { user: user.to_string(), client: client.to_string() };
            self.up.push(UpMsg::Forward { key, msg });
        }
        let cfg = self.cfg.clone();
        let lim = &cfg.limits;
        // First ping after a random ½–1 interval, so pings of a storm's
        // connections spread out.
        let ping = lim.ping_secs.max(1) as u64 * 1000;
        s.deadlines.next_ping = Due::at(now + (ping as f64 * self.rng.random_range(0.5..1.0)) as u64);
        // With the refresh hook the server refreshes the connection when it
        // expires (the client is told it does not); else the client has
        // 25 s past the expiry to send a new token.
        let server_refresh = self.cfg.proxy.refresh.is_some();
        let grace = if server_refresh { 0 } else { 25 };
        s.deadlines.expires_at = Due::at(ttl.map_or(0, |t| now + (t as u64 + grace) * 1000));
        self.rearm(s, sid);
        // Subscribed before the reply goes out: the results known here go in
        // its `subs`; a router's answer comes later as a `subscribe` push
        // followed by what it recovered (nothing of a channel reaches the
        // client before its result).
        let mut subs_json = b"{".to_vec();
        let mut waiting = Vec::new();
        // Answered here only if every one of them can be: else a publication
        // of one answered here could reach the client before the reply.
        let local = server_subs.iter().all(|(channel, _)| {
            let ns = ChannelName::parse(channel).ok().and_then(|n| self.cfg.namespaces.resolve(&n).ok());
            let recovery = c.subs.get(channel);
            match ns {
                None => true,
                Some(ns) if !ns.positioned() => true,
                Some(_) => self
                    .channels
                    .position(channel)
                    .is_some_and(|p| recovery.is_none_or(|r| !r.recover || p.is(&r.epoch, r.offset))),
            }
        });
        for (channel, chan_info) in server_subs {
            let ns = match ChannelName::parse(&channel).map(|n| self.cfg.namespaces.resolve(&n).cloned()) {
                Ok(Ok(ns)) => ns,
                _ => {
                    self.fx.metrics().server_subscribes_refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            let recovery = c
                .subs
                .get(&channel)
                .map_or((false, String::new(), 0, 0), |r| (r.recover, r.epoch.clone(), r.offset, 0));
            let started = self.start_subscription(
                s,
                sid,
                &channel,
                &ns,
                chan_info.as_deref(),
                Origin::Connect { local },
                recovery,
                now,
            );
            match started {
                Ok(Some(result)) => {
                    if subs_json.len() > 1 {
                        subs_json.push(b',');
                    }
                    reply::write_str(&mut subs_json, &channel);
                    subs_json.push(b':');
                    subs_json.extend_from_slice(&result);
                }
                Ok(None) => waiting.push(self.channels.name(&channel)),
                Err(_) => return Err(Refusal::Close(Disconnect::INSUFFICIENT_STATE)),
            }
        }
        let result = ConnectResult {
            client: client.to_string(),
            version: VERSION.to_owned(),
            expires: ttl.is_some() && !server_refresh,
            ttl: if server_refresh { 0 } else { ttl.unwrap_or(0) },
            subs: None,
            data: data.as_ref().and_then(super::proxied::raw),
            ping: lim.ping_secs,
            // A unidirectional client cannot answer pings.
            pong: !s.transport.is_uni(),
            session,
            node,
        };
        if waiting.is_empty() {
            subs_json.push(b'}');
            let subs = (subs_json.len() > 2)
                .then(|| serde_json::value::RawValue::from_string(String::from_utf8(subs_json).ok()?).ok())
                .flatten();
            replies.push(reply::reply(id, "connect", &ConnectResult { subs, ..result }));
        } else {
            // The reply waits for the routers' answers (a request times
            // out into an error: the session then closes with 3010).
            let answered = Vec::with_capacity(waiting.len());
            let replies = Vec::new();
            s.connecting =
                Some(Box::new(PendingConnect { id, result, subs_json, waiting, answered, replies }));
        }

        Ok(())
    }

    fn subscribe(
        &mut self,
        s: &mut Session,
        sid: Sid,
        id: u32,
        r: SubscribeRequest,
        replies: &mut Replies,
        now: u64,
    ) -> Result<(), Refusal> {
        let name = ChannelName::parse(&r.channel).map_err(|_| ReplyError::BAD_REQUEST)?;
        let ns = self.cfg.namespaces.resolve(&name)?.clone();
        if r.kind != 0 {
            return Err(ReplyError::NOT_AVAILABLE.into());
        }
        let subscribing = s.proxy.as_ref().map_or(&[][..], |p| &p.subscribing[..]);
        if s.subs.contains(&r.channel) || subscribing.iter().any(|c| *c.0 == *r.channel) {
            return Err(ReplyError::ALREADY_SUBSCRIBED.into());
        }
        if s.subs.len() + subscribing.len() >= self.cfg.limits.max_subscriptions {
            return Err(ReplyError::LIMIT_EXCEEDED.into());
        }
        if !self.up.has_room() {
            return Err(ReplyError::INTERNAL.into());
        }
        self.charge(s, now)?;
        if r.token.is_empty()
            && let Some(endpoint) = self.channel_hook(proto::proxy::Hook::Subscribe, &r.channel)
        {
            // The app backend decides, instead of the namespace's policy.
            return self.subscribe_hook(s, sid, id, r, &endpoint);
        }
        let user = s.identity.user.clone();
        let mut chan_info = None;
        if !r.token.is_empty() {
            let unix = self.clock.unix(now);
            match self.verifier.subscription(&r.token, &r.channel, &user, &s.identity.client.text(), unix) {
                Ok(c) => chan_info = c.info.map(|i| strip_newlines(i.get().as_bytes())),
                Err(TokenError::Expired) => return Err(ReplyError::TOKEN_EXPIRED.into()),
                Err(TokenError::Invalid) => return Err(Refusal::Close(Disconnect::INVALID_TOKEN)),
            }
        }
        match ns.subscribe {
            SubscribePolicy::Anyone => {}
            SubscribePolicy::Token if r.token.is_empty() => return Err(ReplyError::PERMISSION_DENIED.into()),
            SubscribePolicy::Token => {}
            SubscribePolicy::Personal if !name.allows_user(&user) => {
                return Err(ReplyError::PERMISSION_DENIED.into());
            }
            SubscribePolicy::Personal => {}
        }
        let line = self.start_subscription(
            s,
            sid,
            &r.channel,
            &ns,
            chan_info.as_deref(),
            Origin::Client(id),
            (r.recover, r.epoch, r.offset, r.flag),
            now,
        )?;
        replies.extend(line);
        Ok(())
    }

    /// Subscribes session `sid` to `channel` (checked, within the limit),
    /// for the client's command `id` or server-side. The answer when it is
    /// known here (an ephemeral channel, or the core knows the stream's
    /// position): the reply line, the `subscribe` push of a server API
    /// subscription, or the result object for the connect reply's `subs`;
    /// `None` when a router answers later (a server-side one with a push).
    /// `recovery`: (recover, epoch, offset, flag).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_subscription(
        &mut self,
        s: &mut Session,
        sid: Sid,
        name: &str,
        ns: &proto::namespace::NamespaceOptions,
        chan_info: Option<&[u8]>,
        origin: Origin,
        recovery: (bool, String, u64, u64),
        now: u64,
    ) -> Result<Option<Vec<u8>>, Refusal> {
        let (recover, epoch, offset, flag) = recovery;
        let channel = self.channels.name(name);
        if !matches!(origin, Origin::Client(_)) {
            s.mark_server_sub(channel.clone());
        }
        let answer = |r: SubscribeResult| match origin {
            Origin::Client(id) => r.reply(id),
            Origin::Server => r.push(&channel),
            Origin::Connect { .. } => {
                let mut body = Vec::with_capacity(64);
                r.write(&mut body);
                body
            }
        };
        let presence = ns.presence || ns.join_leave;
        // While a connect reply waits for routers, every subscription is
        // answered through a router and held behind it.
        let local = !matches!(origin, Origin::Connect { local: false }) && s.connecting.is_none();
        if local && !ns.positioned() {
            s.subs.insert(channel.clone(), SubState::Follows);
            self.index(&channel, sid, true);
            if presence {
                self.join(s, &channel, chan_info);
            }
            return Ok(Some(answer(SubscribeResult::default())));
        }
        // The channel's position is known here: answer without a router
        // round trip, as the router would (a recovery from the very top
        // recovers nothing and is complete).
        if local
            && let Some(p) = self.channels.position(&channel)
            && (!recover || p.is(&epoch, offset))
        {
            let result = SubscribeResult {
                recoverable: ns.has_history(),
                positioned: true,
                epoch: p.epoch.to_string(),
                offset: p.offset,
                recovered: recover,
                was_recovering: recover,
                ..Default::default()
            };
            s.subs.insert(channel.clone(), SubState::Follows);
            self.index(&channel, sid, true);
            if presence {
                self.join(s, &channel, chan_info);
            }
            self.fx.metrics().local_subscribes.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(answer(result)));
        }
        let ch = channel.to_string();
        let ep = epoch.clone();
        let lim = &self.cfg.limits;
        let limit = match origin {
            Origin::Client(_) => lim.max_requests_in_flight + s.subs.pending_server(),
            Origin::Server | Origin::Connect { .. } => lim.max_requests_in_flight + lim.max_subscriptions,
        };
        let kind = Kind::Subscribe { channel: channel.clone() };
        // A request that cannot be made registers nothing either.
        if let Err(e) = self.request_room(sid, limit) {
            s.unmark_server_sub(&channel);
            return Err(e.into());
        }
        // Indexed first: a channel's first subscriber on this core registers
        // the gateway's interest ahead of its request, on the same link, so
        // the router answers from a position its deliveries here continue.
        // (Asked first, a publication between the answer and the interest
        // would reach no one here, and the subscriber would be sent back.)
        // The interest may take the backlog's last slot: the request, found
        // room for above, goes all the same (a must-send, like the interest).
        self.index(&channel, sid, false);
        let req = self.start_request(sid, kind, now, |req| ClusterMsg::Recover {
            req,
            channel: ch,
            recover,
            epoch: ep,
            offset,
        });
        let pending = PendingSub {
            req,
            id: match origin {
                Origin::Client(id) => id,
                Origin::Server | Origin::Connect { .. } => 0,
            },
            server: !matches!(origin, Origin::Client(_)),
            recover,
            epoch,
            offset,
            flag,
            history: ns.has_history(),
            held: Vec::new(),
            held_bytes: 0,
            broken: false,
            retries: 0,
        };
        s.subs.insert(channel.clone(), SubState::Pending(Box::new(pending)));
        if presence {
            self.join(s, &channel, chan_info);
        }
        Ok(None)
    }

    fn unsubscribe(
        &mut self,
        s: &mut Session,
        sid: Sid,
        id: u32,
        r: UnsubscribeRequest,
        replies: &mut Replies,
    ) {
        s.unmark_server_sub(&r.channel);
        if let Some(p) = s.proxy.as_mut() {
            // A subscribe hook's answer for it, or its expiry, no longer matters.
            p.forget(&r.channel);
        }
        if let Some(pc) = s.connecting.as_mut() {
            // A token channel of the waiting connect reply leaves it.
            pc.waiting.retain(|c| **c != *r.channel);
            pc.answered.retain(|a| *a.0 != *r.channel);
        }
        if let Some((name, state)) = s.subs.remove(&r.channel) {
            if let SubState::Pending(p) = &state {
                self.requests.finish(p.req);
            }
            self.unindex(&name, sid, Some(&s.identity.client.text()));
        }
        // Always a success: centrifuge-js reconnects on an unsubscribe error.
        replies.push(reply::raw_reply(id, "unsubscribe", b"{}"));
    }

    fn publish(
        &mut self,
        s: &mut Session,
        sid: Sid,
        id: u32,
        r: PublishRequest,
        now: u64,
    ) -> Result<(), Refusal> {
        let ns = self.cfg.namespaces.resolve_str(&r.channel)?;
        if r.data.is_none() {
            return Err(ReplyError::BAD_REQUEST.into());
        }
        let hook = self.channel_hook(proto::proxy::Hook::Publish, &r.channel);
        match ns.publish {
            // The app backend decides, instead of the namespace's policy.
            _ if hook.is_some() => {}
            PublishPolicy::Backend => return Err(ReplyError::PERMISSION_DENIED.into()),
            PublishPolicy::Subscribers if !s.subs.contains(&r.channel) => {
                return Err(ReplyError::PERMISSION_DENIED.into());
            }
            _ => {}
        }
        let at = self.clock.at(now);
        let (publish, requests) = self.rates();
        let allowed = s.budget.take_publish(publish, requests, now);
        if !allowed || !self.user_may_publish(&s.identity.user, at) {
            return Err(ReplyError::TOO_MANY_REQUESTS.into());
        }
        if let Some(endpoint) = hook {
            return self.publish_hook(s, sid, id, r, &endpoint);
        }
        let data = strip_newlines(r.data.expect("checked above").get().as_bytes());
        let id_ = &s.identity;
        let info = client_info(&id_.user, &id_.client.text(), id_.info(), None);
        let channel = r.channel;
        self.request(s, sid, Kind::Publish { id }, now, |req| ClusterMsg::Publish {
            req,
            channel,
            data,
            info: Some(info),
            idempotency_key: String::new(),
        })?;
        Ok(())
    }

    fn presence(
        &mut self,
        s: &mut Session,
        sid: Sid,
        id: u32,
        r: ChannelRequest,
        stats: bool,
        now: u64,
    ) -> Result<(), Refusal> {
        let ns = self.cfg.namespaces.resolve_str(&r.channel)?;
        if !ns.presence {
            return Err(ReplyError::NOT_AVAILABLE.into());
        }
        self.charge(s, now)?;
        let channel = r.channel;
        if stats {
            self.request(s, sid, Kind::PresenceStats { id }, now, |req| ClusterMsg::PresenceStats {
                req,
                channel,
            })?;
        } else {
            self.request(s, sid, Kind::Presence { id }, now, |req| ClusterMsg::Presence { req, channel })?;
        }
        Ok(())
    }

    fn history(
        &mut self,
        s: &mut Session,
        sid: Sid,
        id: u32,
        r: HistoryRequest,
        now: u64,
    ) -> Result<(), Refusal> {
        let ns = self.cfg.namespaces.resolve_str(&r.channel)?;
        if !ns.has_history() || !ns.history_for_clients {
            return Err(ReplyError::NOT_AVAILABLE.into());
        }
        self.charge(s, now)?;
        let since = r.since.map(|p| (p.offset, p.epoch.to_string()));
        let (channel, limit, reverse) = (r.channel, r.limit, r.reverse);
        self.request(s, sid, Kind::History { id }, now, |req| ClusterMsg::History {
            req,
            channel,
            limit,
            since,
            reverse,
        })?;
        Ok(())
    }

    fn refresh(
        &mut self,
        s: &mut Session,
        sid: Sid,
        id: u32,
        r: RefreshRequest,
        replies: &mut Replies,
        now: u64,
    ) -> Result<(), Refusal> {
        let claims = match self.verifier.connection(&r.token, self.clock.unix(now)) {
            Ok(c) => c,
            Err(TokenError::Expired) => return Err(Refusal::Close(Disconnect::EXPIRED)),
            Err(TokenError::Invalid) => return Err(Refusal::Close(Disconnect::INVALID_TOKEN)),
        };
        if *claims.sub != *s.identity.user {
            return Err(Refusal::Close(Disconnect::INVALID_TOKEN));
        }
        let ttl = self.ttl_of(claims.expires_at(), now);
        // With the refresh hook the server refreshes (no grace, no expiry told).
        let server_refresh = self.cfg.proxy.refresh.is_some();
        let grace = if server_refresh { 0 } else { 25 };
        s.deadlines.expires_at = Due::at(ttl.map_or(0, |t| now + (t as u64 + grace) * 1000));
        self.rearm(s, sid);
        replies.push(reply::reply(
            id,
            "refresh",
            &RefreshResult {
                client: s.identity.client.to_string(),
                version: VERSION.to_owned(),
                expires: ttl.is_some() && !server_refresh,
                ttl: if server_refresh { 0 } else { ttl.unwrap_or(0) },
            },
        ));
        Ok(())
    }

    fn sub_refresh(
        &mut self,
        s: &mut Session,
        id: u32,
        r: SubRefreshRequest,
        replies: &mut Replies,
        now: u64,
    ) -> Result<(), Refusal> {
        if !s.subs.contains(&r.channel) {
            return Err(ReplyError::UNKNOWN_CHANNEL.into());
        }
        let unix = self.clock.unix(now);
        let ttl = match self.verifier.subscription(
            &r.token,
            &r.channel,
            &s.identity.user,
            &s.identity.client.text(),
            unix,
        ) {
            Ok(c) => self.ttl_of(c.expires_at(), now),
            Err(TokenError::Expired) => return Err(ReplyError::TOKEN_EXPIRED.into()),
            Err(TokenError::Invalid) => return Err(Refusal::Close(Disconnect::INVALID_TOKEN)),
        };
        replies.push(reply::reply(
            id,
            "sub_refresh",
            &SubRefreshResult { expires: ttl.is_some(), ttl: ttl.unwrap_or(0) },
        ));
        Ok(())
    }

    /// The per-user publish bucket (all of the user's connections on this
    /// core). Bounded: at [`MAX_USER_BUCKETS`] the buckets that refilled
    /// completely (idle users) are dropped; if none is, the user is refused.
    fn user_may_publish(&mut self, user: &Arc<str>, now: std::time::Instant) -> bool {
        if user.is_empty() {
            return true; // anonymous connections have only their own bucket
        }
        let lim = &self.cfg.limits;
        if !self.user_buckets.contains_key(user) && self.user_buckets.len() >= MAX_USER_BUCKETS {
            self.user_buckets.retain(|_, b| !b.is_full(now));
            if self.user_buckets.len() >= MAX_USER_BUCKETS {
                return false;
            }
        }
        self.user_buckets
            .entry(user.clone())
            .or_insert_with(|| TokenBucket::new(lim.user_publish_rate, lim.user_publish_burst, now))
            .try_take(1, now)
    }
}
