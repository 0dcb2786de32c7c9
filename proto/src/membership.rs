//! Cluster membership as routers and gateways agree on it: a [`View`] of the
//! routers registered in a coordination store (etcd), stamped with the
//! store's revision, and the [`LeaseClock`] that tells a router whether its
//! own registration is still certainly alive. Sans-IO: the etcd client lives
//! in the router and the gateway; this module only keeps what they read and
//! decides from it.
//!
//! A router registers `PREFIX + name` → [`Member`] (JSON) under a lease it
//! keeps alive. Everyone watches the prefix; the view at revision R is the
//! set of keys present at R. The owner of a channel (or of a user's
//! presence) is the rendezvous hash of the key over the view's QUIC
//! addresses — the same names gateways hash when no store is used — so a
//! router that joins or leaves moves only the keys it wins or held.
//!
//! # Fencing
//!
//! A router may acknowledge a publication only for a channel it owns in its
//! newest view **and** while [`LeaseClock::live`] holds. The clock's deadline
//! is computed from when the last answered keep-alive was **sent**, plus the
//! TTL etcd answered, minus a margin: etcd received that request no earlier
//! than it was sent, so etcd's own expiry of the lease is no earlier than the
//! deadline (the margin covers clock-rate differences and the time between
//! the check and the offset it guards). Another router takes a channel over
//! only after it sees the old owner's key deleted, which etcd does only once
//! the lease expired — after the old owner's deadline. So two routers never
//! both assign offsets to one channel: the old owner's last acknowledged
//! offset precedes the new owner's first, and the new owner starts a new
//! epoch (it never held the channel, or dropped it when it lost it). A
//! router that was stopped (SIGSTOP, a long pause) past its deadline wakes
//! up refusing publishes, and takes the channels back only under a new
//! lease, whose registration is a newer revision.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::rendezvous::score;

/// What a router registers about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// Its name (the DNS name in its link certificate).
    pub name: String,
    /// UDP address of its QUIC endpoint (gateways and peers connect there;
    /// also its name in the rendezvous hash).
    pub quic: SocketAddr,
    /// Its HTTP server API address.
    pub api: SocketAddr,
}

impl Member {
    /// The router as gateways and peers address it.
    pub fn router_addr(&self) -> crate::peer::RouterAddr {
        crate::peer::RouterAddr { name: self.name.clone(), addr: self.quic }
    }

    /// Its name in the rendezvous hash.
    pub fn hash_name(&self) -> String {
        self.quic.to_string()
    }
}

/// The routers registered at a revision of the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// The store revision this view reflects (0: nothing read yet).
    pub revision: i64,
    /// Members by their key in the store.
    members: BTreeMap<String, Member>,
}

impl View {
    /// A view of `members` (key → member) at `revision`.
    pub fn new(revision: i64, members: impl IntoIterator<Item = (String, Member)>) -> View {
        View { revision, members: members.into_iter().collect() }
    }

    /// The members, in key order.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// How many routers are registered.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether no router is registered.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether a router with this QUIC address is registered.
    pub fn contains(&self, quic: SocketAddr) -> bool {
        self.members.values().any(|m| m.quic == quic)
    }

    /// A key was put at `revision` (a malformed value is refused: it names
    /// no router anyone could reach). Events below the view's revision are
    /// stale and change nothing; one revision may carry several events (one
    /// per key), and an event applied twice changes nothing more.
    pub fn put(&mut self, key: &str, value: &[u8], revision: i64) -> Result<(), serde_json::Error> {
        if revision < self.revision {
            return Ok(());
        }
        let m: Member = serde_json::from_slice(value)?;
        self.revision = revision;
        self.members.insert(key.to_owned(), m);
        Ok(())
    }

    /// A key was deleted (or its lease expired) at `revision`.
    pub fn delete(&mut self, key: &str, revision: i64) {
        if revision < self.revision {
            return;
        }
        self.revision = revision;
        self.members.remove(key);
    }

    /// The owner of `key`: the highest rendezvous score over the members'
    /// QUIC addresses (ties, practically impossible, to the smaller address).
    pub fn owner(&self, key: &str) -> Option<&Member> {
        self.members.values().max_by(|a, b| {
            score(&a.hash_name(), key)
                .cmp(&score(&b.hash_name(), key))
                .then_with(|| b.hash_name().cmp(&a.hash_name()))
        })
    }

    /// Whether the router at `quic` owns `key` in this view.
    pub fn owns(&self, quic: SocketAddr, key: &str) -> bool {
        self.owner(key).is_some_and(|m| m.quic == quic)
    }
}

/// The share of `keys` whose owner differs between two views (0.0–1.0).
pub fn moved_fraction<'a>(before: &View, after: &View, keys: impl IntoIterator<Item = &'a str>) -> f64 {
    let (mut n, mut moved) = (0usize, 0usize);
    for k in keys {
        n += 1;
        if before.owner(k).map(|m| m.quic) != after.owner(k).map(|m| m.quic) {
            moved += 1;
        }
    }
    if n == 0 { 0.0 } else { moved as f64 / n as f64 }
}

/// Whether this router's lease is certainly alive at etcd, from the
/// keep-alives it sent and the answers it got (see the module's fencing
/// rule).
#[derive(Debug, Clone)]
pub struct LeaseClock {
    /// Lease id (0: none held).
    id: i64,
    deadline: Option<Instant>,
    margin: Duration,
}

impl LeaseClock {
    /// No lease yet; deadlines are kept `margin` short of what etcd answers.
    pub fn new(margin: Duration) -> LeaseClock {
        LeaseClock { id: 0, deadline: None, margin }
    }

    /// A lease was granted (or kept alive): the request left at `sent_at`
    /// and etcd answered a remaining TTL of `ttl` for lease `id`. A TTL of
    /// zero or less means the lease is gone.
    pub fn answered(&mut self, id: i64, sent_at: Instant, ttl_secs: i64) {
        if ttl_secs <= 0 {
            self.lost();
            return;
        }
        self.id = id;
        let until = sent_at + Duration::from_secs(ttl_secs as u64);
        let until = until.checked_sub(self.margin).unwrap_or(sent_at);
        // An answer to an older request never moves the deadline back.
        if self.deadline.is_none_or(|d| until > d) {
            self.deadline = Some(until);
        }
    }

    /// The lease is gone (etcd said so, or a new one must be granted).
    pub fn lost(&mut self) {
        self.id = 0;
        self.deadline = None;
    }

    /// Whether the lease is certainly alive at `now`.
    pub fn live(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now < d)
    }

    /// The lease id (0: none).
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The deadline of the lease as this router must assume it.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(i: u16) -> (String, Member) {
        let m = Member {
            name: format!("r{i}"),
            quic: SocketAddr::from(([10, 0, 0, i as u8], 7100)),
            api: SocketAddr::from(([10, 0, 0, i as u8], 8000)),
        };
        (format!("/switchyard/routers/r{i}"), m)
    }

    #[test]
    fn views_follow_revisions_and_ignore_stale_events() {
        let mut v = View::default();
        let (k1, m1) = member(1);
        v.put(&k1, &serde_json::to_vec(&m1).unwrap(), 5).unwrap();
        assert_eq!((v.revision, v.len()), (5, 1));
        let (k2, m2) = member(2);
        v.put(&k2, &serde_json::to_vec(&m2).unwrap(), 4).unwrap();
        assert_eq!(v.len(), 1, "an event older than the view changes nothing");
        v.put(&k2, &serde_json::to_vec(&m2).unwrap(), 6).unwrap();
        v.delete(&k1, 6);
        assert_eq!((v.revision, v.len()), (6, 1), "two events of one revision");
        v.put(&k1, &serde_json::to_vec(&m1).unwrap(), 5).unwrap();
        assert_eq!(v.len(), 1, "stale");
        v.delete(&k1, 7);
        assert_eq!((v.revision, v.len()), (7, 1));
        assert!(v.contains(m2.quic) && !v.contains(m1.quic));
        assert!(v.put("/x", b"not json", 8).is_err());
        assert_eq!(v.revision, 7, "a malformed value is not applied");
    }

    #[test]
    fn ownership_is_the_rendezvous_hash_and_moves_only_what_it_must() {
        let four = View::new(1, (1..=4).map(member));
        let five = View::new(2, (1..=5).map(member));
        let keys: Vec<String> = (0..20_000).map(|i| format!("chat:{i}")).collect();
        let moved = moved_fraction(&four, &five, keys.iter().map(String::as_str));
        assert!((0.17..0.23).contains(&moved), "about 1/5 moves to the newcomer: {moved}");
        // Only to the newcomer.
        let newcomer = member(5).1.quic;
        for k in &keys {
            let (a, b) = (four.owner(k).unwrap().quic, five.owner(k).unwrap().quic);
            assert!(a == b || b == newcomer, "{k} moved between old members");
        }
        // Same hash as the gateways' over the same addresses.
        let names: Vec<String> = five.members().map(Member::hash_name).collect();
        for k in keys.iter().take(500) {
            let i = crate::rendezvous::owner(k, &names).unwrap();
            assert_eq!(five.owner(k).unwrap().hash_name(), names[i]);
            assert!(five.owns(five.owner(k).unwrap().quic, k));
        }
        assert!(View::default().owner("chat:x").is_none());
    }

    #[test]
    fn the_lease_clock_counts_from_the_send_and_never_backwards() {
        let t0 = Instant::now();
        let mut c = LeaseClock::new(Duration::from_millis(500));
        assert!(!c.live(t0));
        c.answered(7, t0, 5);
        assert!(c.live(t0 + Duration::from_millis(4_499)));
        assert!(!c.live(t0 + Duration::from_millis(4_500)), "deadline = send + ttl - margin");
        // A late answer to an earlier request does not shorten it.
        c.answered(7, t0 + Duration::from_secs(2), 5);
        c.answered(7, t0 + Duration::from_secs(1), 5);
        assert_eq!(c.deadline(), Some(t0 + Duration::from_millis(6_500)));
        // etcd says the lease is gone.
        c.answered(7, t0 + Duration::from_secs(3), 0);
        assert!(!c.live(t0 + Duration::from_secs(3)));
        assert_eq!(c.id(), 0);
    }
}
