//! The routers' answers to a core's requests.
//!
//! A subscribe that went to a router is answered with the stream's
//! position (and, for a recovery, the missed publications); the deliveries
//! that arrived meanwhile were held and are merged behind the reply, so the
//! client sees the reply, then every later offset once, in order. If the
//! answer cannot make the subscription whole (something was not held, or a
//! resync hit the channel meanwhile), the request is sent again, a few
//! times, before the client gets a temporary error.

use std::sync::Arc;

use proto::client::command::FLAG_REJECT_UNRECOVERED;
use proto::client::reply::{self, PresenceStatsResult, SubscribeResult};
use proto::client::{Disconnect, ReplyError};
use proto::cluster::ClusterMsg;
use proto::position::{Follow, StreamPosition};

use super::Core;
use super::requests::Kind;
use crate::effects::Sid;
use crate::session::PendingConnect;
use crate::session::subs::{PendingSub, SubState};

/// Times a subscribe is asked again after its answer could not be used.
const MAX_SUBSCRIBE_RETRIES: u8 = 3;

/// A router's answer to a subscribe.
#[derive(Debug)]
pub struct Answered {
    epoch: String,
    top: u64,
    recovered: bool,
    positioned: bool,
    publications: Vec<proto::client::Publication>,
}

impl Answered {
    /// The subscribe result for `p`, its recovered publications included
    /// when they fit in `room` bytes of the session's queue (if not, it
    /// says the position cannot be recovered: rather than closing the
    /// session as slow, and failing the same way on every reconnect, the
    /// client reloads its state and goes on from the top).
    fn result(&self, p: &PendingSub, room: usize) -> SubscribeResult {
        let result = |recovered: bool, publications: Vec<_>| SubscribeResult {
            recoverable: p.history,
            positioned: true,
            epoch: self.epoch.clone(),
            offset: if recovered { p.offset } else { self.top },
            publications,
            recovered,
            was_recovering: p.recover,
            ..Default::default()
        };
        if !(p.recover && self.recovered) {
            return result(false, Vec::new());
        }
        let full = result(true, self.publications.clone());
        // Measured as written (publications with their info and tags).
        let mut body = Vec::new();
        full.write(&mut body);
        if body.len() + 64 > room { result(false, Vec::new()) } else { full }
    }
}

impl Core {
    /// A router answered request `msg.request_id()`.
    pub(super) fn answer(&mut self, msg: ClusterMsg, now: u64) {
        if let ClusterMsg::Emulation { session, data, .. } = msg {
            // Read by another gateway process, relayed by a router.
            self.emulate_here(&session, &data, now);
            return;
        }
        if msg.user_target().is_some() {
            return self.user_command(msg, now);
        }
        let Some(req) = msg.request_id().filter(|_| msg.is_answer()) else { return };
        let Some((sid, kind)) = self.cx.requests.finish(req) else { return };
        let id = match kind {
            Kind::Subscribe { channel } => return self.subscribe_answer(sid, &channel, req, msg, now),
            Kind::Publish { id }
            | Kind::History { id }
            | Kind::Presence { id }
            | Kind::PresenceStats { id } => id,
        };
        let line = match msg {
            ClusterMsg::RequestError { code, message, .. } => {
                reply::error_reply(id, ReplyError::from_router(code, &message))
            }
            ClusterMsg::PublishOk { .. } => reply::raw_reply(id, "publish", b"{}"),
            ClusterMsg::HistoryResult { epoch, top, publications, .. } => {
                reply::raw_reply(id, "history", &reply::history_result(&publications, &epoch, top))
            }
            ClusterMsg::PresenceResult { entries, .. } => {
                let body = reply::presence_result(entries.iter().map(|(c, i)| (c.as_str(), &i[..])));
                reply::raw_reply(id, "presence", &body)
            }
            ClusterMsg::PresenceStatsResult { num_clients, num_users, .. } => {
                reply::reply(id, "presence_stats", &PresenceStatsResult { num_clients, num_users })
            }
            _ => return,
        };
        if let Some(s) = self.sessions.get_mut(sid) {
            match s.connecting.as_mut() {
                Some(pc) => pc.replies.push(line), // after the connect reply
                None => self.cx.send_line(s, sid, &line),
            }
        }
    }

    fn subscribe_answer(&mut self, sid: Sid, channel: &Arc<str>, req: u64, msg: ClusterMsg, now: u64) {
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let queued = s.queued_bytes();
        let Some(SubState::Pending(p)) = s.subs.get_mut(channel) else { return };
        if p.req != req {
            return;
        }
        let (epoch, top, recovered, positioned, publications) = match msg {
            ClusterMsg::Replay { epoch, top, recovered, positioned, publications, .. } => {
                (epoch, top, recovered, positioned, publications)
            }
            ClusterMsg::RequestError { code, message, .. } => {
                return self.refuse_subscription(sid, channel, ReplyError::from_router(code, &message));
            }
            _ => return,
        };
        if p.broken {
            return self.retry_subscription(sid, channel, now);
        }
        if p.recover && !recovered && p.flag & FLAG_REJECT_UNRECOVERED != 0 {
            return self.refuse_subscription(sid, channel, ReplyError::UNRECOVERABLE_POSITION);
        }
        let answer = Answered { epoch, top, recovered, positioned, publications };
        // While the connect reply waits: a token channel's result goes in
        // it, any other subscription's answer after it.
        if let Some(pc) = s.connecting.as_mut() {
            let token = pc.waiting.iter().position(|c| **c == **channel).map(|i| pc.waiting.swap_remove(i));
            pc.answered.push((channel.clone(), answer, token.is_some()));
            if pc.waiting.is_empty() {
                self.finish_connect(sid, now);
            }
            return;
        }
        let room = self.cx.queue_limit().saturating_sub(queued);
        let result = answer.result(p, room);
        let line = if p.server { result.push(channel) } else { result.reply(p.id) };
        self.cx.send_line(s, sid, &line);
        self.complete_subscription(sid, channel, answer.epoch, answer.top, answer.positioned);
    }

    /// Asks a router again for a pending subscription whose answer cannot
    /// make it whole (something was not held, or a resync hit it): what
    /// arrives from now on is held anew. After a few tries, or when the
    /// request cannot be made, the subscription is refused.
    fn retry_subscription(&mut self, sid: Sid, channel: &Arc<str>, now: u64) {
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let Some(SubState::Pending(p)) = s.subs.get_mut(channel) else { return };
        if p.retries >= MAX_SUBSCRIBE_RETRIES {
            return self.refuse_subscription(sid, channel, ReplyError::INTERNAL);
        }
        let (recover, ep, offset) = (p.recover, p.epoch.clone(), p.offset);
        let ch = channel.to_string();
        let kind = Kind::Subscribe { channel: channel.clone() };
        let lim = &self.cx.cfg.limits;
        let limit = lim.max_requests_in_flight + if p.server { lim.max_subscriptions } else { 0 };
        match self.cx.request_within(sid, kind, now, limit, |req| ClusterMsg::Recover {
            req,
            channel: ch,
            recover,
            epoch: ep,
            offset,
        }) {
            Ok(req) => {
                p.req = req;
                p.retries += 1;
                p.broken = false;
                p.held = Vec::new();
                p.held_bytes = 0;
            }
            Err(e) => self.refuse_subscription(sid, channel, e),
        }
    }

    /// Every token subscription of a pending connect is answered: the
    /// connect reply goes out with their results, then each subscription
    /// takes what was held for it.
    pub(super) fn finish_connect(&mut self, sid: Sid, now: u64) {
        let Some(s) = self.sessions.get_mut(sid) else { return };
        // An answer held here that a resync or the hold bound broke since
        // cannot be used: asked again (a token channel's is waited for anew).
        let broken: Vec<(Arc<str>, bool)> = s.connecting.as_ref().map_or(Vec::new(), |pc| {
            pc.answered
                .iter()
                .filter(|a| matches!(s.subs.get(&a.0), Some(SubState::Pending(p)) if p.broken))
                .map(|a| (a.0.clone(), a.2))
                .collect()
        });
        if !broken.is_empty() {
            if let Some(pc) = s.connecting.as_mut() {
                pc.answered.retain(|a| !broken.iter().any(|b| b.0 == a.0));
                pc.waiting.extend(broken.iter().filter(|b| b.1).map(|b| b.0.clone()));
            }
            for (channel, _) in &broken {
                self.retry_subscription(sid, channel, now);
            }
            let Some(s) = self.sessions.get_mut(sid) else { return };
            if s.connecting.as_ref().is_none_or(|pc| !pc.waiting.is_empty()) {
                return;
            }
        }
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let Some(pc) = s.connecting.take() else { return };
        let PendingConnect { id, mut result, mut subs_json, answered, replies, .. } = *pc;
        let mut room = self.cx.queue_limit().saturating_sub(s.queued_bytes());
        for (channel, answer, _) in answered.iter().filter(|a| a.2) {
            let Some(SubState::Pending(p)) = s.subs.get(channel) else { continue };
            let r = answer.result(p, room);
            if subs_json.len() > 1 {
                subs_json.push(b',');
            }
            reply::write_str(&mut subs_json, channel);
            subs_json.push(b':');
            let before = subs_json.len();
            r.write(&mut subs_json);
            room = room.saturating_sub(subs_json.len() - before);
        }
        subs_json.push(b'}');
        result.subs =
            serde_json::value::RawValue::from_string(String::from_utf8_lossy(&subs_json).into_owned()).ok();
        let line = reply::reply(id, "connect", &result);
        self.cx.send_line(s, sid, &line);
        if !replies.is_empty() {
            let frame = proto::ws::SharedFrame::text_lines(replies.iter().map(|r| r.as_slice()));
            self.cx.send_own(s, sid, frame);
        }
        for (channel, a, in_reply) in answered {
            if !in_reply {
                // Another subscription answered meanwhile: its own line now.
                let Some(s) = self.sessions.get_mut(sid) else { return };
                let room = self.cx.queue_limit().saturating_sub(s.queued_bytes());
                let Some(SubState::Pending(p)) = s.subs.get(&channel) else { continue };
                let r = a.result(p, room);
                let line = if p.server { r.push(&channel) } else { r.reply(p.id) };
                self.cx.send_line(s, sid, &line);
            }
            self.complete_subscription(sid, &channel, a.epoch, a.top, a.positioned);
        }
    }

    /// After a subscription's answer went out: what arrived meanwhile is
    /// merged behind it (what the answer covered skipped; a gap or a
    /// duplicate resyncs), and the subscription follows the channel's
    /// stream or keeps its own position.
    fn complete_subscription(
        &mut self,
        sid: Sid,
        channel: &Arc<str>,
        epoch: String,
        top: u64,
        positioned: bool,
    ) {
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let Some(SubState::Pending(p)) = s.subs.get_mut(channel) else { return };
        let held = std::mem::take(&mut p.held);
        if !positioned {
            // No offsets to merge by: what was held follows the answer as it came.
            let limit = self.cx.queue_limit();
            for (_, _, _, frame) in held {
                s.queue(sid, frame, limit, &mut self.cx.fx);
            }
            if let Some(state) = s.subs.get_mut(channel) {
                *state = SubState::Follows;
            }
            self.cx.channels.follow(channel, sid);
            return;
        }
        // Merge what arrived while waiting: skip what the reply covered
        // (of a run it straddles, the part after it is taken); anything that
        // would leave a gap resyncs.
        let mut own = StreamPosition::new(epoch, top);
        let limit = self.cx.queue_limit();
        for (e, first, last, frame) in held {
            let verdict = own.follow(&e, first, last);
            let frame = match verdict {
                Follow::Overlaps => match super::fanout::tail(&frame, last - own.offset, &self.cx.fx) {
                    Some(t) => t,
                    None => return self.resync_session(sid, channel),
                },
                _ => frame,
            };
            match verdict {
                Follow::Next | Follow::Overlaps => {
                    own.offset = last;
                    let frame = match s.deflate {
                        crate::session::Deflate::Both => self.cx.deflate_twin(&frame).unwrap_or(frame),
                        _ => frame,
                    };
                    s.queue(sid, frame, limit, &mut self.cx.fx);
                }
                Follow::Behind => {}
                Follow::Broken => return self.resync_session(sid, channel),
            }
        }
        let follows = match self.cx.channels.get_mut(channel) {
            Some(ch) => match &ch.position {
                None => {
                    // Every publication after `own` reaches this core after
                    // the answer and what was held: the core's stream is there.
                    ch.position = Some(own.clone());
                    true
                }
                Some(p) if *p == own => true,
                Some(p) if p.epoch == own.epoch && p.offset < own.offset => false,
                // Behind the core's stream, or another epoch: it cannot
                // catch up by itself.
                Some(_) => return self.resync_session(sid, channel),
            },
            None => return,
        };
        let Some(s) = self.sessions.get_mut(sid) else { return };
        if let Some(state) = s.subs.get_mut(channel) {
            *state = if follows { SubState::Follows } else { SubState::Own(Box::new(own)) };
        }
        if follows {
            self.cx.channels.follow(channel, sid);
        }
    }

    /// A server-side subscription has no command to answer: its session
    /// closes with 3010 and the client reconnects.
    fn refuse_subscription(&mut self, sid: Sid, channel: &str, e: ReplyError) {
        let Some(s) = self.sessions.get_mut(sid) else { return };
        if s.is_server_sub(channel) {
            tracing::debug!(channel, code = e.code, "a server-side subscription failed");
            return self.close(sid, Disconnect::INSUFFICIENT_STATE.into());
        }
        let Some((name, state)) = s.subs.remove(channel) else { return };
        if let SubState::Pending(p) = &state {
            self.cx.requests.finish(p.req);
            let line = reply::error_reply(p.id, e);
            match s.connecting.as_mut() {
                Some(pc) => pc.replies.push(line), // after the connect reply
                None => self.cx.send_line(s, sid, &line),
            }
        }
        let client = s.is_connected().then(|| s.identity.client.text());
        self.cx.unindex(&name, sid, client.as_deref());
    }
}
