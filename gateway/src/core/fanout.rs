//! What the uplink hands a core: publications framed once, join/leave
//! pushes, resyncs, stream positions and presence rounds.
//!
//! A delivery reaches the channel's followers without a look at their
//! subscriptions: they are, by construction, at the channel's position, and
//! a delivery that continues it continues them. Subscribers with their own
//! position are checked one by one; one that catches up joins the
//! followers. A hole is never passed over: whoever cannot continue is told
//! to resubscribe (unsubscribe push 2500), and recovers through a router.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use proto::client::reply::client_info;
use proto::cluster::ClusterMsg;
use proto::position::{Follow, StreamPosition};

use super::Core;
use crate::bridge::UpMsg;
use crate::effects::Sid;
use crate::session::Deflate;
use crate::session::subs::SubState;

impl Core {
    /// Publications `first..=last` of `channel` in `epoch`, as one frame.
    pub(super) fn deliver(
        &mut self,
        channel: &str,
        epoch: &Arc<str>,
        first: u64,
        last: u64,
        frame: Bytes,
        _now: u64,
    ) {
        let cx = &mut self.cx;
        let limit = cx.cfg.limits.max_queue_bytes;
        let Some(ch) = cx.channels.get_mut(channel) else { return };
        // The followers' verdict, from the channel's one position.
        let followers = if first == 0 {
            Follow::Next
        } else {
            match &ch.position {
                Some(p) => p.follow(epoch, first, last),
                None => Follow::Broken,
            }
        };
        // What the followers take: the run, or the part of it after their
        // position when it straddles it (framed anew, once for all of them).
        let for_followers = match followers {
            Follow::Next => Some(frame.clone()),
            Follow::Overlaps if ch.followers.is_empty() => None,
            Follow::Overlaps => ch.position.as_ref().and_then(|p| tail(&frame, last - p.offset, &cx.fx)),
            Follow::Behind | Follow::Broken => None,
        };
        if first != 0 && followers != Follow::Behind {
            // Whatever came before, every publication after `last` reaches
            // this core after this one.
            ch.position = Some(StreamPosition { epoch: epoch.clone(), offset: last });
        }
        let mut twin = Twins::default();
        let mut sent = 0u64;
        let mut resync: Vec<Sid> = Vec::new();
        let mut caught_up: Vec<Sid> = Vec::new();
        match for_followers {
            Some(run) => {
                // The whole run's twins are shared with the catching; a tail has its own.
                let mut tail_twin = Twins::default();
                let twins = if followers == Follow::Next { &mut twin } else { &mut tail_twin };
                for sid in ch.followers.iter() {
                    let Some(s) = self.sessions.get_mut(sid) else { continue };
                    let Some(f) = pick(s, &run, twins, &mut cx.deflater, &cx.fx) else { continue };
                    if s.queue_framed(sid, f, limit, &mut cx.fx) {
                        sent += 1;
                    }
                }
            }
            None if followers == Follow::Behind => {}
            None => resync.extend(ch.followers.iter()),
        }
        for &sid in ch.catching() {
            let Some(s) = self.sessions.get_mut(sid) else { continue };
            let Some(state) = s.subs.get_mut(&ch.name) else { continue };
            match state {
                SubState::Own(p) => match p.follow(epoch, first, last) {
                    verdict @ (Follow::Next | Follow::Overlaps) => {
                        let run = match verdict {
                            Follow::Next => Some(frame.clone()),
                            _ => tail(&frame, last - p.offset, &cx.fx),
                        };
                        let Some(run) = run else {
                            resync.push(sid);
                            continue;
                        };
                        p.offset = last;
                        let now_follows = ch.position.as_ref() == Some(&*p);
                        // The whole run's twins serve it; a tail has its own.
                        let mut own_twin = Twins::default();
                        let twins = if verdict == Follow::Next { &mut twin } else { &mut own_twin };
                        if let Some(f) = pick(s, &run, twins, &mut cx.deflater, &cx.fx)
                            && s.queue_framed(sid, f, limit, &mut cx.fx)
                        {
                            sent += 1;
                        }
                        if now_follows {
                            caught_up.push(sid);
                        }
                    }
                    Follow::Behind => {}
                    Follow::Broken => resync.push(sid),
                },
                SubState::Pending(p) => {
                    p.held_bytes += frame.len();
                    if p.held_bytes <= limit && !p.broken {
                        p.held.push((epoch.clone(), first, last, frame.clone()));
                    } else {
                        p.broken = true;
                        p.held = Vec::new();
                    }
                }
                SubState::Follows => {}
            }
        }
        let name = ch.name.clone();
        for sid in caught_up {
            if let Some(SubState::Own(_)) = self.sessions.get(sid).and_then(|s| s.subs.get(&name)) {
                let s = self.sessions.get_mut(sid).expect("looked up");
                if let Some(state) = s.subs.get_mut(&name) {
                    *state = SubState::Follows;
                }
                self.cx.channels.follow(&name, sid);
            }
        }
        self.cx.fx.metrics().deliveries.fetch_add(sent, Ordering::Relaxed);
        if !resync.is_empty() {
            self.cx.fx.gateway_metrics().resyncs.fetch_add(1, Ordering::Relaxed);
        }
        for sid in resync {
            self.resync_session(sid, &name);
        }
    }

    /// A join/leave push for the channel's subscribers that are receiving
    /// (outside the offset stream: no position check).
    pub(super) fn push(&mut self, channel: &str, frame: Bytes) {
        let cx = &mut self.cx;
        let limit = cx.cfg.limits.max_queue_bytes;
        let Some(ch) = cx.channels.get(channel) else { return };
        // An HTTP transport's framing of the push, made once for all its sessions.
        let mut twins = Twins::default();
        for sid in ch.members() {
            let Some(s) = self.sessions.get_mut(sid) else { continue };
            if !matches!(s.subs.get(&ch.name), Some(SubState::Follows | SubState::Own(_))) {
                continue;
            }
            if s.transport.is_http() {
                if let Some(f) = twins.http(s.transport, &frame, || {}) {
                    s.queue_framed(sid, f, limit, &mut cx.fx);
                }
            } else {
                s.queue(sid, frame.clone(), limit, &mut cx.fx);
            }
        }
    }

    /// The channel's subscribers on this core may have missed publications:
    /// those receiving resubscribe and recover; those waiting for a
    /// router's answer ask again once it comes (it may not cover what was
    /// missed). The channel's position is forgotten until the next delivery.
    pub(super) fn resync_channel(&mut self, channel: &str, _now: u64) {
        let Some(ch) = self.cx.channels.get_mut(channel) else { return };
        ch.position = None;
        let name = ch.name.clone();
        let members: Vec<Sid> = ch.members().collect();
        self.cx.fx.gateway_metrics().resyncs.fetch_add(1, Ordering::Relaxed);
        for sid in members {
            let pending = match self.sessions.get_mut(sid).and_then(|s| s.subs.get_mut(&name)) {
                Some(SubState::Pending(p)) => {
                    p.broken = true;
                    p.held = Vec::new();
                    true
                }
                _ => false,
            };
            if !pending {
                self.resync_session(sid, &name);
            }
        }
    }

    /// The router registered this gateway's interest in `channel` when its
    /// stream stood at `top` in `epoch`; everything after follows. A core
    /// that knew nothing learns the position; one whose subscribers are
    /// behind it missed publications, and those subscribers resync.
    pub(super) fn position(&mut self, channel: &str, epoch: Arc<str>, top: u64) {
        let Some(ch) = self.cx.channels.get_mut(channel) else { return };
        let new = StreamPosition { epoch, offset: top };
        let behind = |p: &StreamPosition| p.epoch != new.epoch || p.offset < new.offset;
        let mut resync: Vec<Sid> = Vec::new();
        match &ch.position {
            Some(p) if !behind(p) => return,
            Some(_) => resync.extend(ch.followers.iter()),
            None => {}
        }
        ch.position = Some(new.clone());
        let name = ch.name.clone();
        for &sid in ch.catching() {
            if let Some(SubState::Own(p)) = self.sessions.get(sid).and_then(|s| s.subs.get(&name)) {
                if **p == new {
                    resync.retain(|x| *x != sid);
                } else if behind(p) {
                    resync.push(sid);
                }
            }
        }
        for sid in resync {
            self.resync_session(sid, &name);
        }
    }

    /// A presence round: every fact this core holds goes to the routers
    /// again (its users' connections, its presence subscriptions), then the
    /// core says it is done.
    pub(super) fn reannounce(&mut self, round: u64) {
        let cx = &mut self.cx;
        for sid in self.sessions.ids() {
            let Some(s) = self.sessions.get(sid) else { continue };
            if !s.is_connected() {
                continue;
            }
            let id = &s.identity;
            if !id.user.is_empty() {
                let key = cx.cfg.namespaces.presence_channel(&id.user);
                let msg = ClusterMsg::UserOnline { user: id.user.to_string(), client: id.client.to_string() };
                cx.up.push(UpMsg::Forward { key, msg });
            }
            for channel in s.subs.channels() {
                if !cx.cfg.namespaces.resolve_str(channel).is_ok_and(|ns| ns.presence || ns.join_leave) {
                    continue;
                }
                let info = client_info(&id.user, &id.client.text(), id.info(), None);
                let msg = ClusterMsg::Join {
                    channel: channel.to_string(),
                    client: id.client.to_string(),
                    user: id.user.to_string(),
                    info,
                };
                cx.up.push(UpMsg::Forward { key: channel.to_string(), msg });
            }
        }
        cx.up.push(UpMsg::Announced { core: cx.id, round });
    }
}

/// The frames of one delivery made for some sessions: the compressed
/// twin and the HTTP transports' framings, each made at most once per
/// delivery and core (`None` inside: not worth it, or nothing for it).
#[derive(Default)]
struct Twins {
    deflated: Option<Option<Bytes>>,
    http: [Option<Option<Bytes>>; 4],
}

impl Twins {
    /// `plain` in HTTP transport `t`'s framing (`None`: nothing in it for
    /// `t`), made on the first call for `t` (`made` is told).
    fn http(&mut self, t: proto::fallback::Transport, plain: &Bytes, made: impl FnOnce()) -> Option<Bytes> {
        let i = t.http_index()?;
        self.http[i]
            .get_or_insert_with(|| {
                made();
                proto::fallback::reframe(t, plain)
            })
            .clone()
    }
}

/// The frame of a run's last `n` publications (counted in `frames_cut`):
/// what subscribers whose position falls inside the run
/// still need. `None` when the frame is not a packed run of lines.
pub(super) fn tail(run: &Bytes, n: u64, fx: &crate::effects::Effects) -> Option<Bytes> {
    let t = proto::ws::SharedFrame::last_lines(run, n)?;
    fx.gateway_metrics().frames_cut.fetch_add(1, Ordering::Relaxed);
    Some(t.into_bytes())
}

/// The bytes a publication reaches a session in, in its framing: the plain
/// frame, its compressed twin, or its HTTP transport's framing; `None`
/// when there is nothing in it for the session's transport.
fn pick(
    s: &crate::session::Session,
    plain: &Bytes,
    twins: &mut Twins,
    deflater: &mut proto::ws::deflate::Deflater,
    fx: &crate::effects::Effects,
) -> Option<Bytes> {
    if s.transport.is_http() {
        return twins.http(s.transport, plain, || {
            fx.gateway_metrics().frames_reframed.fetch_add(1, Ordering::Relaxed);
        });
    }
    match s.deflate {
        Deflate::Both => Some(
            twins
                .deflated
                .get_or_insert_with(|| {
                    if plain.len() < super::MIN_DEFLATE_FRAME {
                        return None;
                    }
                    let t = proto::ws::SharedFrame::deflate_encoded(plain, deflater)?;
                    fx.gateway_metrics().frames_deflated.fetch_add(1, Ordering::Relaxed);
                    Some(t.into_bytes())
                })
                .clone()
                .unwrap_or_else(|| plain.clone()),
        ),
        Deflate::Off | Deflate::Inbound => Some(plain.clone()),
    }
}
