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
use crate::session::subs::SubState;

/// Times a subscribe is asked again after its answer could not be used.
const MAX_SUBSCRIBE_RETRIES: u8 = 3;

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
        let result = |recovered: bool, publications: Vec<_>| SubscribeResult {
            recoverable: p.history,
            positioned: true,
            epoch: epoch.clone(),
            offset: if recovered { p.offset } else { top },
            publications,
            recovered,
            was_recovering: p.recover,
            ..Default::default()
        };
        let (server, id) = (p.server, p.id);
        let answer = |r: SubscribeResult| if server { r.push(channel) } else { r.reply(id) };
        let mut line = if p.recover && recovered {
            answer(result(true, publications))
        } else {
            answer(result(false, Vec::new()))
        };
        let room = self.cx.queue_limit().saturating_sub(queued);
        if line.len() + 16 > room && p.recover && recovered {
            // The recovery does not fit the session's queue: rather than
            // closing it as slow (and failing the same way on every
            // reconnect), say the position cannot be recovered; the client
            // reloads its state and goes on from the top.
            line = answer(result(false, Vec::new()));
        }
        let held = std::mem::take(&mut p.held);
        self.cx.send_line(s, sid, &line);
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

    /// A subscribe that cannot go on: the error reply, and the subscription
    /// leaves the index (and the channel's presence).
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
