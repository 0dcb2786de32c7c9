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
        let size: usize = self.publications.iter().map(|p| p.data.len() + 64).sum();
        if size + 128 > room {
            return result(false, Vec::new());
        }
        result(true, self.publications.clone())
    }
}

impl Core {
    /// A router answered request `msg.request_id()`.
    pub(super) fn answer(&mut self, msg: ClusterMsg, now: u64) {
        if Self::is_user_command(&msg) {
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
            self.cx.send_line(s, sid, &line);
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
            if p.retries >= MAX_SUBSCRIBE_RETRIES {
                return self.refuse_subscription(sid, channel, ReplyError::INTERNAL);
            }
            // Ask again: what arrives from now on is held anew.
            let (recover, ep, offset) = (p.recover, p.epoch.clone(), p.offset);
            let ch = channel.to_string();
            let kind = Kind::Subscribe { channel: channel.clone() };
            match self.cx.request(sid, kind, now, |req| ClusterMsg::Recover {
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
            return;
        }
        if p.recover && !recovered && p.flag & FLAG_REJECT_UNRECOVERED != 0 {
            return self.refuse_subscription(sid, channel, ReplyError::UNRECOVERABLE_POSITION);
        }
        let answer = Answered { epoch, top, recovered, positioned, publications };
        // A subscription of the connection token, while the connect reply
        // waits for it: its result goes in the reply's `subs`.
        if let Some(pc) = s.connecting.as_mut()
            && let Some(i) = pc.waiting.iter().position(|c| **c == **channel)
        {
            pc.waiting.swap_remove(i);
            pc.answered.push((channel.clone(), answer));
            if pc.waiting.is_empty() {
                self.finish_connect(sid);
            }
            return;
        }
        let room = self.cx.queue_limit().saturating_sub(queued);
        let result = answer.result(p, room);
        let line = if p.server { result.push(channel) } else { result.reply(p.id) };
        self.cx.send_line(s, sid, &line);
        self.complete_subscription(sid, channel, answer.epoch, answer.top, answer.positioned);
    }

    /// Every token subscription of a pending connect is answered: the
    /// connect reply goes out with their results, then each subscription
    /// takes what was held for it.
    fn finish_connect(&mut self, sid: Sid) {
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let Some(pc) = s.connecting.take() else { return };
        let PendingConnect { id, mut result, mut subs_json, answered, .. } = *pc;
        let mut room = self.cx.queue_limit().saturating_sub(s.queued_bytes());
        for (channel, answer) in &answered {
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
        for (channel, a) in answered {
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
            if let Some(state) = s.subs.get_mut(channel) {
                *state = SubState::Follows;
            }
            self.cx.channels.follow(channel, sid);
            return;
        }
        // Merge what arrived while waiting: skip what the reply covered;
        // anything that would leave a gap or a duplicate resyncs.
        let mut own = StreamPosition::new(epoch, top);
        let limit = self.cx.queue_limit();
        for (e, first, last, frame) in held {
            match own.follow(&e, first, last) {
                Follow::Next => {
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
            *state = if follows { SubState::Follows } else { SubState::Own(own) };
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
            self.cx.send_line(s, sid, &line);
        }
        let client = s.is_connected().then(|| s.identity.client.clone());
        self.cx.unindex(&name, sid, client.as_deref());
    }
}
