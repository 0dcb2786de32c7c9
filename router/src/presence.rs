//! Presence: who is online (per user, with a grace timer) and who is
//! subscribed to a presence-enabled channel (per client).
//!
//! A user is online while any of their connections, on any gateway, is up.
//! When the last one drops the user is not "away" at once: a grace period
//! (default 15 s) starts, and a connection that comes back within it cancels
//! the change, so a reconnect after a deploy or a gateway crash does not make
//! the user flap offline and online for everyone who shows them. Pure state:
//! time is an argument and [`UserPresence::expire`] is driven by a timer.
//!
//! Every fact a gateway sent (a connection, a channel member) carries the
//! presence round it was last confirmed in. A gateway starts a round when
//! its routers changed or it could not send a fact; it sends every fact it
//! holds again, then ends the round, and what it did not confirm is gone
//! ([`UserPresence::sweep`], [`ChannelPresence::sweep`]). So a lost
//! "offline" cannot keep a user online for good, and a fact whose key moved
//! to another router does not stay behind at the old one.

use std::collections::BTreeMap;

use proto::seeded::{Map, Set};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// A change of a user's aggregate presence, to publish on their presence channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceChange {
    /// The user's first connection came up (and no grace period was running).
    Online(String),
    /// The user's last connection went away and none came back within the grace period.
    Away(String),
}

#[derive(Debug, Default)]
struct UserState {
    /// Connections (client id → round last confirmed) per gateway link.
    /// A map, so that a gateway announcing a connection again (a presence
    /// round) is harmless.
    per_gateway: Map<u32, Map<String, u64>>,
    /// When the grace period ends, if one is running.
    grace_until: Option<Instant>,
}

impl UserState {
    fn total(&self) -> usize {
        self.per_gateway.values().map(Map::len).sum()
    }
}

/// Aggregate presence of every user whose presence this router owns.
#[derive(Debug)]
pub struct UserPresence {
    grace: Duration,
    users: Map<String, UserState>,
    /// The users with a connection on each gateway link: what a lost link
    /// or the end of its presence round looks at (a router of a million
    /// users must not walk them all for each of its gateways).
    on_gateway: Map<u32, Set<String>>,
    /// Grace deadlines in time order (deadline, user); stale entries are skipped.
    deadlines: BTreeMap<(Instant, u64), String>,
    seq: u64,
}

impl UserPresence {
    /// Presence with the given grace period.
    pub fn new(grace: Duration) -> Self {
        UserPresence {
            grace,
            users: Map::default(),
            on_gateway: Map::default(),
            deadlines: BTreeMap::new(),
            seq: 0,
        }
    }

    /// Users known (online or in grace).
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether no user is known.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether the user counts as online (connected, or within the grace period).
    pub fn is_online(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// The connections (client ids) of `user` known here.
    pub fn clients(&self, user: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .users
            .get(user)
            .map(|s| s.per_gateway.values().flat_map(|c| c.keys().cloned()).collect())
            .unwrap_or_default();
        out.sort();
        out
    }

    /// The gateway links holding connections of `user`.
    pub fn gateways(&self, user: &str) -> Vec<u32> {
        self.users.get(user).map(|s| s.per_gateway.keys().copied().collect()).unwrap_or_default()
    }

    /// Connection `client` of `user` came up on `gateway`, or was confirmed
    /// in presence round `round` (again: no change).
    pub fn connect(&mut self, user: &str, client: &str, gateway: u32, round: u64) -> Option<PresenceChange> {
        let state = self.users.entry(user.to_owned()).or_default();
        let was_known = state.total() > 0 || state.grace_until.is_some();
        state.grace_until = None;
        state.per_gateway.entry(gateway).or_default().insert(client.to_owned(), round);
        let users = self.on_gateway.entry(gateway).or_default();
        if !users.contains(user) {
            users.insert(user.to_owned());
        }
        (!was_known).then(|| PresenceChange::Online(user.to_owned()))
    }

    /// `gateway` ended presence round `round`: its connections not
    /// confirmed in it are gone (their users may enter the grace period).
    pub fn sweep(&mut self, gateway: u32, round: u64, now: Instant) {
        let Some(users) = self.on_gateway.get(&gateway) else { return };
        let stale: Vec<(String, String)> = users
            .iter()
            .filter_map(|u| Some((u, self.users.get(u)?.per_gateway.get(&gateway)?)))
            .flat_map(|(u, clients)| {
                clients.iter().filter(|(_, r)| **r < round).map(move |(c, _)| (u.clone(), c.clone()))
            })
            .collect();
        for (user, client) in stale {
            self.disconnect(&user, &client, gateway, now);
        }
    }

    /// Connection `client` of `user` on `gateway` went away.
    pub fn disconnect(&mut self, user: &str, client: &str, gateway: u32, now: Instant) {
        let Some(state) = self.users.get_mut(user) else { return };
        if let Some(clients) = state.per_gateway.get_mut(&gateway) {
            clients.remove(client);
            if clients.is_empty() {
                state.per_gateway.remove(&gateway);
                if let Some(users) = self.on_gateway.get_mut(&gateway) {
                    users.remove(user);
                    if users.is_empty() {
                        self.on_gateway.remove(&gateway);
                    }
                }
            }
        }
        if state.total() == 0 && state.grace_until.is_none() {
            let until = now + self.grace;
            state.grace_until = Some(until);
            self.seq += 1;
            self.deadlines.insert((until, self.seq), user.to_owned());
        }
    }

    /// A gateway link was lost (evicted or drained): all its connections are
    /// gone, and their users enter the grace period.
    pub fn gateway_lost(&mut self, gateway: u32, now: Instant) {
        let users: Vec<String> =
            self.on_gateway.get(&gateway).map(|s| s.iter().cloned().collect()).unwrap_or_default();
        for user in users {
            let clients: Vec<String> = self.users[&user].per_gateway[&gateway].keys().cloned().collect();
            for client in clients {
                self.disconnect(&user, &client, gateway, now);
            }
        }
    }

    /// Users whose grace period ended by `now` with no connection back.
    pub fn expire(&mut self, now: Instant) -> Vec<PresenceChange> {
        let mut out = Vec::new();
        while let Some(entry) = self.deadlines.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((deadline, _), user) = entry.remove_entry();
            let expired =
                self.users.get(&user).is_some_and(|s| s.total() == 0 && s.grace_until == Some(deadline));
            if expired {
                self.users.remove(&user);
                out.push(PresenceChange::Away(user));
            }
        }
        out
    }

    /// The next grace deadline, for the timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.keys().next().map(|(t, _)| *t)
    }
}

#[derive(Debug, Clone)]
struct Member {
    user: String,
    info: Bytes,
    gateway: u32,
    /// The presence round it was last confirmed in.
    round: u64,
}

/// Clients subscribed to one presence-enabled channel.
#[derive(Debug, Default)]
pub struct ChannelPresence {
    members: Map<String, Member>,
    /// The members each gateway link holds: what a lost link or the end of
    /// its presence round looks at (one channel of a million members must
    /// not be walked whole for each of its gateways).
    on_gateway: Map<u32, Set<String>>,
}

impl ChannelPresence {
    /// A client joined (or was confirmed in presence round `round`);
    /// whether it is new.
    pub fn join(&mut self, client: &str, user: &str, info: Bytes, gateway: u32, round: u64) -> bool {
        let old =
            self.members.insert(client.to_owned(), Member { user: user.to_owned(), info, gateway, round });
        match &old {
            Some(o) if o.gateway == gateway => {}
            _ => {
                if let Some(o) = &old {
                    self.unindex(o.gateway, client);
                }
                self.on_gateway.entry(gateway).or_default().insert(client.to_owned());
            }
        }
        old.is_none()
    }

    fn unindex(&mut self, gateway: u32, client: &str) {
        if let Some(clients) = self.on_gateway.get_mut(&gateway) {
            clients.remove(client);
            if clients.is_empty() {
                self.on_gateway.remove(&gateway);
            }
        }
    }

    /// `gateway` ended presence round `round`: its members not confirmed in
    /// it leave; returns their infos.
    pub fn sweep(&mut self, gateway: u32, round: u64) -> Vec<Bytes> {
        let Some(clients) = self.on_gateway.get(&gateway) else { return Vec::new() };
        let gone: Vec<String> = clients
            .iter()
            .filter(|c| self.members.get(*c).is_some_and(|m| m.round < round))
            .cloned()
            .collect();
        gone.into_iter().filter_map(|c| self.leave(&c)).collect()
    }

    /// A client left; returns its `ClientInfo` for a leave push.
    pub fn leave(&mut self, client: &str) -> Option<Bytes> {
        let m = self.members.remove(client)?;
        self.unindex(m.gateway, client);
        Some(m.info)
    }

    /// Removes every client of a lost gateway; returns their infos.
    pub fn gateway_lost(&mut self, gateway: u32) -> Vec<Bytes> {
        let gone: Vec<String> =
            self.on_gateway.get(&gateway).map(|s| s.iter().cloned().collect()).unwrap_or_default();
        gone.into_iter().filter_map(|c| self.leave(&c)).collect()
    }

    /// (client id, `ClientInfo`) of every member.
    pub fn entries(&self) -> Vec<(String, Bytes)> {
        self.members.iter().map(|(c, m)| (c.clone(), m.info.clone())).collect()
    }

    /// Connections and distinct users (the anonymous user `""` counts as one).
    pub fn stats(&self) -> (u32, u32) {
        let mut users: Vec<&str> = self.members.values().map(|m| m.user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        (self.members.len() as u32, users.len() as u32)
    }

    /// Whether nobody is subscribed.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(15);

    #[test]
    fn several_devices_are_one_user() {
        let t = Instant::now();
        let mut p = UserPresence::new(GRACE);
        assert_eq!(p.connect("42", "a", 1, 0), Some(PresenceChange::Online("42".into())));
        assert_eq!(p.connect("42", "b", 2, 0), None);
        // Announced again (a presence round): still one connection there.
        assert_eq!(p.connect("42", "a", 1, 1), None);
        p.disconnect("42", "a", 1, t);
        assert!(p.expire(t + GRACE * 2).is_empty(), "still online on gateway 2");
        p.disconnect("42", "b", 2, t);
        assert!(p.expire(t + GRACE - Duration::from_millis(1)).is_empty());
        assert_eq!(p.expire(t + GRACE), vec![PresenceChange::Away("42".into())]);
        assert!(p.is_empty());
    }

    #[test]
    fn reconnect_within_grace_does_not_flap() {
        let t = Instant::now();
        let mut p = UserPresence::new(GRACE);
        p.connect("7", "a", 1, 0);
        p.gateway_lost(1, t);
        assert!(p.is_online("7"));
        // Comes back on another gateway 5 s later: no Online change, no Away later.
        assert_eq!(p.connect("7", "b", 2, 0), None);
        assert!(p.expire(t + GRACE * 3).is_empty());
        // Leaves again: a fresh grace period from the new time.
        let t2 = t + Duration::from_secs(100);
        p.disconnect("7", "b", 2, t2);
        assert!(p.expire(t2 + Duration::from_secs(14)).is_empty());
        assert_eq!(p.expire(t2 + GRACE), vec![PresenceChange::Away("7".into())]);
        assert_eq!(p.next_deadline(), None);
    }

    #[test]
    fn channel_presence_counts() {
        let mut c = ChannelPresence::default();
        assert!(c.join("c1", "", Bytes::from_static(b"{}"), 1, 0));
        assert!(c.join("c2", "", Bytes::from_static(b"{}"), 1, 0));
        assert!(c.join("c3", "42", Bytes::from_static(b"{}"), 2, 0));
        assert!(!c.join("c3", "42", Bytes::from_static(b"{}"), 2, 0), "confirmed again, not new");
        assert_eq!(c.stats(), (3, 2));
        assert_eq!(c.gateway_lost(1).len(), 2);
        assert_eq!(c.stats(), (1, 1));
        assert!(c.leave("c3").is_some());
        assert!(c.is_empty());
    }

    #[test]
    fn a_round_keeps_what_it_confirmed_and_sweeps_the_rest() {
        let t = Instant::now();
        let mut p = UserPresence::new(GRACE);
        p.connect("1", "a", 7, 0);
        p.connect("2", "b", 7, 0);
        p.connect("3", "c", 8, 0);
        // Gateway 7 starts round 1 and confirms only user 1; its "offline"
        // for user 2 was lost.
        p.connect("1", "a", 7, 1);
        p.sweep(7, 1, t);
        assert!(p.expire(t + GRACE).contains(&PresenceChange::Away("2".into())));
        assert!(p.is_online("1") && p.is_online("3"), "confirmed, or another gateway's");
        let mut c = ChannelPresence::default();
        c.join("a", "1", Bytes::from_static(b"{}"), 7, 0);
        c.join("b", "2", Bytes::from_static(b"{}"), 7, 0);
        c.join("a", "1", Bytes::from_static(b"{}"), 7, 1);
        assert_eq!(c.sweep(7, 1).len(), 1);
        assert_eq!(c.stats(), (1, 1));
    }

    #[test]
    fn a_lost_gateway_takes_only_its_own_users_and_leaves_no_index_behind() {
        let t = Instant::now();
        let mut p = UserPresence::new(GRACE);
        for u in 0..100 {
            p.connect(&u.to_string(), &format!("c{u}"), u % 3, 0);
        }
        // User 0 also has a connection on gateway 1.
        p.connect("0", "x", 1, 0);
        p.gateway_lost(0, t);
        // Gateway 0 had users 0, 3, ..., 99 (34); all but user 0 are in grace.
        let away = p.expire(t + GRACE);
        assert_eq!(away.len(), 33);
        assert!(!away.contains(&PresenceChange::Away("0".into())));
        assert!(
            away.iter().all(|c| matches!(c, PresenceChange::Away(u) if u.parse::<u32>().unwrap() % 3 == 0))
        );
        assert!(!p.on_gateway.contains_key(&0));
        // A round on gateway 1 that confirms nobody sweeps exactly its users.
        p.sweep(1, 1, t);
        assert!(!p.on_gateway.contains_key(&1));
        assert_eq!(p.expire(t + GRACE).len(), 34, "gateway 1's 33 users and user 0");
        assert_eq!(p.on_gateway.len(), 1);
        assert_eq!(p.len(), 33, "gateway 2's users");
    }

    #[test]
    fn a_channel_finds_a_gateway_s_members_through_its_index() {
        let info = || Bytes::from_static(b"{}");
        let mut c = ChannelPresence::default();
        for k in 0..30 {
            c.join(&format!("c{k}"), "", info(), k % 3, 0);
        }
        // c0 moves to gateway 1 (a reconnect there), c3 is confirmed again on 0.
        assert!(!c.join("c0", "", info(), 1, 1));
        assert!(!c.join("c3", "", info(), 0, 1));
        assert_eq!(c.gateway_lost(0).len(), 9, "gateway 0's ten, less c0 which moved");
        assert!(c.members.contains_key("c0"));
        // Gateway 1 ends round 1 having confirmed only c0: its other ten leave.
        assert_eq!(c.sweep(1, 1).len(), 10);
        assert_eq!(c.stats().0, 11, "c0 and gateway 2's ten");
        assert!(!c.on_gateway.contains_key(&0));
        assert_eq!(c.on_gateway[&1].len(), 1);
        for k in 0..30 {
            c.leave(&format!("c{k}"));
        }
        assert!(c.is_empty() && c.on_gateway.is_empty());
    }
}
