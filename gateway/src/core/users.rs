//! The server API's commands for a user: `subscribe`, `unsubscribe`,
//! `disconnect` and `refresh` act on every connection of the user.
//!
//! The router that owns the user's presence knows which gateways hold the
//! user and sends each of them one [`ClusterMsg`]; the uplink hands it to
//! the user's core (connected sessions live on their user's core), which
//! finds the user's sessions in its [`UserIndex`] and acts on each: a
//! server-side subscription (the `subscribe` push, then the channel's
//! publications, recovered from a position when one is given), an
//! unsubscribe push 2000, a close with the given code, a new expiry.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use hashbrown::HashTable;
use proto::client::Disconnect;
use proto::client::channel::ChannelName;
use proto::client::codes::unsubscribe_code;
use proto::client::reply::unsubscribe_push;
use proto::cluster::ClusterMsg;
use proto::seeded::{self, Map, State};

use super::Core;
use super::commands::Origin;
use crate::effects::Sid;
use crate::paged::Paged;
use crate::session::subs::SubState;
use crate::session::{CloseReason, Due};

/// The connected sessions of each user on one core (anonymous sessions are
/// not addressable and not indexed). The core holds one copy of each
/// user's id: its sessions' identities share it.
///
/// Most users have one session here. The table holds just that session's
/// id (9 bytes a bucket); the user's id it is found by is kept by the
/// session's slot in `ids`, in pages that grow without slack. A user with
/// more sessions has all of them, in order, in `more` too.
#[derive(Debug)]
pub struct UserIndex {
    first: HashTable<Sid>,
    /// The user of every indexed session, by its slot.
    ids: Paged<Option<Arc<str>>>,
    more: Map<Arc<str>, Vec<Sid>>,
    state: State,
    /// The anonymous user's id, shared by every anonymous session.
    anonymous: Arc<str>,
    len: usize,
}

impl UserIndex {
    /// An empty index.
    pub fn new(seed: u64) -> Self {
        UserIndex {
            first: HashTable::new(),
            ids: Paged::default(),
            more: seeded::map(seed ^ 1),
            state: seeded::state(seed),
            anonymous: Arc::from(""),
            len: 0,
        }
    }

    fn user_of(&self, sid: Sid) -> Option<&Arc<str>> {
        self.ids.get(sid.index())?.as_ref()
    }

    fn is(&self, sid: Sid, user: &str) -> bool {
        self.user_of(sid).is_some_and(|u| **u == *user)
    }

    /// Session `sid` of `user` connected; returns the core's copy of the
    /// user's id for the session's identity.
    pub fn add(&mut self, user: &str, sid: Sid) -> Arc<str> {
        if user.is_empty() {
            return self.anonymous.clone();
        }
        let hash = self.state.hash_one(user);
        let Some(&first) = self.first.find(hash, |s| self.is(*s, user)) else {
            let key: Arc<str> = Arc::from(user);
            *self.ids.at(sid.index()) = Some(key.clone());
            let (ids, state) = (&self.ids, &self.state);
            self.first.insert_unique(hash, sid, |s| {
                state.hash_one(
                    &**ids.get(s.index()).and_then(Option::as_ref).expect("indexed sessions have ids"),
                )
            });
            self.len += 1;
            return key;
        };
        let key = self.user_of(first).expect("indexed").clone();
        *self.ids.at(sid.index()) = Some(key.clone());
        self.more.entry(key.clone()).or_insert_with(|| vec![first]).push(sid);
        key
    }

    /// Session `sid` of `user` is gone.
    pub fn remove(&mut self, user: &str, sid: Sid) {
        let hash = self.state.hash_one(user);
        let Some(all) = self.more.get_mut(user) else {
            if let Ok(entry) = self.first.find_entry(hash, |s| *s == sid) {
                entry.remove();
                self.len -= 1;
                *self.ids.at(sid.index()) = None;
            }
            return;
        };
        let Some(i) = all.iter().position(|s| *s == sid) else { return };
        all.remove(i);
        *self.ids.at(sid.index()) = None;
        let head = all.first().copied();
        if all.len() <= 1 {
            self.more.remove(user);
        }
        let Ok(mut entry) = self.first.find_entry(hash, |s| {
            *s == sid || self.ids.get(s.index()).is_some_and(|u| u.as_deref() == Some(user))
        }) else {
            return;
        };
        match head {
            Some(head) => *entry.get_mut() = head,
            None => {
                entry.remove();
                self.len -= 1;
            }
        }
    }

    /// The user's sessions on this core.
    pub fn sessions(&self, user: &str) -> &[Sid] {
        match self.more.get(user) {
            Some(all) => all,
            None => self
                .first
                .find(self.state.hash_one(user), |s| self.is(*s, user))
                .map_or(&[], std::slice::from_ref),
        }
    }

    /// Users indexed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no user is indexed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Close reasons given through the server API, kept for the process's life
/// (a close reason is `&'static str` all the way to the frame): at most
/// this many distinct ones; past it, the code's standard reason is used.
const MAX_CUSTOM_REASONS: usize = 256;

/// A close reason is at most 123 bytes (RFC 6455 §5.5: 125 with the code).
const MAX_REASON_BYTES: usize = 123;

pub(super) fn close_reason(code: u16, reason: &str) -> &'static str {
    static REASONS: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason[..end];
    if reason.is_empty() {
        return if code == Disconnect::FORCE_DISCONNECT.code {
            Disconnect::FORCE_DISCONNECT.reason
        } else {
            ""
        };
    }
    let mut guard = REASONS.lock().unwrap_or_else(|e| e.into_inner());
    let set = guard.get_or_insert_with(HashSet::new);
    if let Some(r) = set.get(reason) {
        return r;
    }
    if set.len() >= MAX_CUSTOM_REASONS {
        return "disconnected by server";
    }
    let r: &'static str = Box::leak(reason.to_owned().into_boxed_str());
    set.insert(r);
    r
}

impl Core {
    /// The sessions of `user` (all, or the one whose client id is `client`).
    fn targets(&self, user: &str, client: &str) -> Vec<Sid> {
        self.cx
            .users
            .sessions(user)
            .iter()
            .copied()
            .filter(|sid| {
                client.is_empty()
                    || self.sessions.get(*sid).is_some_and(|s| *s.identity.client.text() == *client)
            })
            .collect()
    }

    /// Acts on a server API command for a user, on each of the user's
    /// sessions on this core.
    pub(super) fn user_command(&mut self, msg: ClusterMsg, now: u64) {
        let Some((user, client)) = msg.user_target() else { return };
        let targets = self.targets(user, client);
        self.cx.fx.metrics().user_commands.fetch_add(targets.len() as u64, Ordering::Relaxed);
        for sid in targets {
            match &msg {
                ClusterMsg::SubscribeUser { channel, recover, epoch, offset, .. } => {
                    self.server_subscribe(sid, channel, (*recover, epoch.clone(), *offset), now)
                }
                ClusterMsg::UnsubscribeUser { channel, .. } => self.server_unsubscribe(sid, channel, now),
                ClusterMsg::DisconnectUser { code, reason, whitelist, .. } => {
                    let kept = self
                        .sessions
                        .get(sid)
                        .is_some_and(|s| whitelist.iter().any(|c| **c == *s.identity.client.text()));
                    if !kept {
                        self.close(sid, CloseReason { code: *code, reason: close_reason(*code, reason) })
                    }
                }
                ClusterMsg::RefreshUser { expired, expire_at, .. } => {
                    self.server_refresh(sid, *expired, *expire_at, now)
                }
                _ => {}
            }
        }
    }

    /// Subscribes one session server-side; a session already subscribed
    /// stays as it is. Refused (counted) past the subscription limit or for
    /// an unknown namespace; a router request that cannot be made closes
    /// the session with 3010 (it reconnects and the server subscribes it
    /// again from the token's `subs`).
    fn server_subscribe(&mut self, sid: Sid, channel: &str, recovery: (bool, String, u64), now: u64) {
        let ns = match ChannelName::parse(channel).map(|n| self.cx.cfg.namespaces.resolve(&n).cloned()) {
            Ok(Ok(ns)) => ns,
            _ => {
                self.cx.fx.metrics().server_subscribes_refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let Some(s) = self.sessions.get_mut(sid) else { return };
        if !s.is_connected() || s.subs.contains(channel) {
            return;
        }
        if s.subs.len() >= self.cx.cfg.limits.max_subscriptions {
            self.cx.fx.metrics().server_subscribes_refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (recover, epoch, offset) = recovery;
        let cx = &mut self.cx;
        match cx.start_subscription(
            s,
            sid,
            channel,
            &ns,
            None,
            Origin::Server,
            (recover, epoch, offset, 0),
            now,
        ) {
            Ok(Some(line)) => cx.send_line(s, sid, &line),
            Ok(None) => {}
            Err(_) => self.close(sid, Disconnect::INSUFFICIENT_STATE.into()),
        }
    }

    /// Unsubscribes one session (push 2000 "server unsubscribe"), if it is
    /// subscribed.
    fn server_unsubscribe(&mut self, sid: Sid, channel: &str, now: u64) {
        self.server_unsubscribe_with(sid, channel, unsubscribe_code::SERVER, "server unsubscribe", now)
    }

    /// Unsubscribes one session with an unsubscribe push of `code`, if it
    /// is subscribed.
    pub(super) fn server_unsubscribe_with(
        &mut self,
        sid: Sid,
        channel: &str,
        code: u32,
        reason: &str,
        now: u64,
    ) {
        let Some(s) = self.sessions.get_mut(sid) else { return };
        if let Some(p) = s.proxy.as_mut() {
            p.forget(channel);
        }
        s.unmark_server_sub(channel);
        let Some((name, state)) = s.subs.remove(channel) else { return };
        // A server-side subscription the router has not answered yet: its
        // subscribe push has not gone out, so no unsubscribe push either
        // (the client never heard of the channel).
        let unheard = matches!(&state, SubState::Pending(p) if p.server);
        if let SubState::Pending(p) = &state {
            self.cx.requests.finish(p.req);
        }
        let push = unsubscribe_push(channel, code, reason);
        match s.connecting.as_mut() {
            // A channel of the waiting connect reply: it leaves the reply
            // (the client never heard of it); another: after the reply.
            Some(pc) => {
                let waited = pc.waiting.len() + pc.answered.iter().filter(|a| a.2).count();
                pc.waiting.retain(|c| **c != *channel);
                pc.answered.retain(|a| *a.0 != *channel);
                if waited == pc.waiting.len() + pc.answered.iter().filter(|a| a.2).count() {
                    pc.replies.push(push);
                }
                if pc.waiting.is_empty() {
                    let client = s.is_connected().then(|| s.identity.client.text());
                    self.cx.unindex(&name, sid, client.as_deref());
                    return self.finish_connect(sid, now);
                }
            }
            None if unheard => {}
            None => self.cx.send_line(s, sid, &push),
        }
        let client = s.is_connected().then(|| s.identity.client.text());
        self.cx.unindex(&name, sid, client.as_deref());
    }

    /// A new expiry for one session: closed with 3005 when `expired` or
    /// the time has passed; no expiry when `expire_at` is 0.
    pub(super) fn server_refresh(&mut self, sid: Sid, expired: bool, expire_at: u64, now: u64) {
        let unix = self.cx.clock.unix(now);
        if expired || (expire_at != 0 && expire_at <= unix) {
            return self.close(sid, Disconnect::EXPIRED.into());
        }
        let Some(s) = self.sessions.get_mut(sid) else { return };
        let ms = expire_at.saturating_sub(unix).min(u32::MAX as u64).saturating_mul(1000);
        s.deadlines.expires_at = Due::at(if expire_at == 0 { 0 } else { now.saturating_add(ms) });
        self.cx.rearm(s, sid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_bounded_and_reused() {
        let a = close_reason(4000, "moved to another workspace");
        let b = close_reason(4000, "moved to another workspace");
        assert!(std::ptr::eq(a, b), "one copy of each reason");
        assert_eq!(close_reason(3503, ""), "force disconnect");
        let long = "é".repeat(100);
        let r = close_reason(4001, &long);
        assert!(r.len() <= MAX_REASON_BYTES && long.starts_with(r));
    }

    #[test]
    fn the_index_follows_sessions() {
        let mut ix = UserIndex::new(1);
        let u = ix.add("42", Sid(1));
        assert!(Arc::ptr_eq(&u, &ix.add("42", Sid(2))), "one copy of the id per core");
        assert!(Arc::ptr_eq(&ix.add("", Sid(3)), &ix.add("", Sid(4))));
        ix.add("42", Sid(5));
        assert_eq!(ix.sessions("42"), &[Sid(1), Sid(2), Sid(5)]);
        assert_eq!(ix.len(), 1, "anonymous sessions are not indexed");
        ix.remove("42", Sid(1));
        assert_eq!(ix.sessions("42"), &[Sid(2), Sid(5)]);
        ix.remove("42", Sid(9));
        ix.remove("42", Sid(2));
        assert_eq!(ix.sessions("42"), &[Sid(5)]);
        ix.add("42", Sid(6));
        assert_eq!(ix.sessions("42"), &[Sid(5), Sid(6)]);
        ix.remove("42", Sid(6));
        ix.remove("42", Sid(5));
        assert!(ix.is_empty());
        assert_eq!(ix.sessions("42"), &[] as &[Sid]);
        ix.remove("42", Sid(5));
        assert_eq!(ix.sessions("42"), &[] as &[Sid]);
    }

    /// Against a plain list, through thousands of adds and removes (the
    /// table rehashes many times, finding each user's id by slot).
    #[test]
    fn the_index_agrees_with_a_list_of_every_session() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut ix = UserIndex::new(3);
        let mut model: Vec<(String, Sid)> = Vec::new();
        let mut free: Vec<u64> = (0..4000).rev().collect();
        let mut generation = 1u64;
        for _ in 0..40_000 {
            if !free.is_empty() && (model.len() < 100 || rng.random_bool(0.55)) {
                let slot = free.pop().unwrap();
                generation += 1;
                let sid = Sid(generation << 32 | slot);
                let user = format!("u{}", rng.random_range(0..1500));
                let shared = ix.add(&user, sid);
                assert_eq!(*shared, *user);
                model.push((user, sid));
            } else {
                let (user, sid) = model.swap_remove(rng.random_range(0..model.len()));
                ix.remove(&user, sid);
                ix.remove(&user, sid); // idempotent
                free.push(sid.index() as u64);
            }
            if rng.random_bool(0.01) {
                for u in 0..1500 {
                    let user = format!("u{u}");
                    let want: Vec<Sid> = model.iter().filter(|(m, _)| *m == user).map(|(_, s)| *s).collect();
                    let mut got = ix.sessions(&user).to_vec();
                    let mut want_sorted = want.clone();
                    got.sort_by_key(|s| s.0);
                    want_sorted.sort_by_key(|s| s.0);
                    assert_eq!(got, want_sorted, "{user}");
                }
                let users: std::collections::HashSet<&str> = model.iter().map(|(u, _)| u.as_str()).collect();
                assert_eq!(ix.len(), users.len());
            }
        }
    }
}
