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
//! A router may acknowledge a publication of a channel only when all of
//! these hold (the shards check them on every publish, with the clock read
//! then):
//!
//! 1. **Its lease is certainly alive** ([`LeaseClock::live`]). The deadline
//!    counts from when the last answered keep-alive was **sent**, plus the
//!    TTL etcd answered, minus a margin: etcd received that request no
//!    earlier than it was sent, so etcd's own expiry of the lease is no
//!    earlier than the deadline. Others take a departed router's channels
//!    only once they see its key deleted, which etcd does only after expiry
//!    (or a revoke, which a draining router sends after it stopped
//!    acknowledging). So a router that left never acknowledges after
//!    anyone else took its channels.
//! 2. **Its view is fresh**: a linearizable read of the prefix, sent at
//!    `t`, confirmed that no newer registration existed ([`View::confirmed`]),
//!    and `t` is less than the freshness window `S` ago. A router whose
//!    watch is stuck or cut off stops acknowledging after `S`.
//! 3. **It owns the channel in its newest view.**
//! 4. **No other router still present may act on an older view**: for
//!    [`claim_delay`] (`S` plus the margin) after its view changed, a
//!    router acknowledges a channel only if, in every view it held during
//!    that time, the channel's owner was itself or a router that has since
//!    left. A router that joins (or comes back with a new lease) waits
//!    `claim_delay` before acknowledging anything. Why this is enough: the
//!    joiner B gains channel X at revision R. The former owner A still
//!    present acknowledges X only under a confirmation sent before R was
//!    committed (a later one would show B), hence only until
//!    `commit(R) + S`; B starts at `seen(R) + S + margin`, later.
//!
//! Together: two routers never assign offsets to one channel in
//! overlapping time, and a channel a router held before it lost its lease
//! or the channel (it drops its state then) starts a new epoch when it
//! comes back, so an epoch never continues across another owner's.
//!
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::rendezvous::score;

/// What a router registers about itself. Unknown fields are ignored, so
/// that a newer router's registration stays readable during an upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its name (the DNS name in its link certificate; also its name in the
    /// rendezvous hash, so ownership stays put when its address changes).
    pub name: String,
    /// UDP address of its QUIC endpoint (gateways and peers connect there).
    pub quic: SocketAddr,
    /// Its HTTP server API address.
    pub api: SocketAddr,
}

impl Member {
    /// The router as gateways and peers address it.
    pub fn router_addr(&self) -> crate::peer::RouterAddr {
        crate::peer::RouterAddr { name: self.name.clone(), addr: self.quic }
    }
}

/// The routers registered at a revision of the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// The store revision this view reflects (0: nothing read yet).
    pub revision: i64,
    /// Members by their key in the store.
    members: BTreeMap<String, Member>,
    /// When a linearizable read that produced (or matched) this view was
    /// sent: nothing newer was registered then. `None` for views built from
    /// watch events alone.
    pub confirmed: Option<Instant>,
}

impl View {
    /// A view of `members` (key → member) at `revision`.
    pub fn new(revision: i64, members: impl IntoIterator<Item = (String, Member)>) -> View {
        View { revision, members: members.into_iter().collect(), confirmed: None }
    }

    /// Whether two views register the same routers (revisions and
    /// confirmations aside).
    pub fn same_members(&self, other: &View) -> bool {
        self.members == other.members
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

    /// Whether a router with this name is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.members.values().any(|m| m.name == name)
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
    /// names (ties, practically impossible, to the smaller name).
    pub fn owner(&self, key: &str) -> Option<&Member> {
        self.members
            .values()
            .map(|m| (score(&m.name, key), std::cmp::Reverse(&m.name), m))
            .max_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)))
            .map(|(_, _, m)| m)
    }

    /// Whether the router named `name` owns `key` in this view.
    pub fn owns(&self, name: &str, key: &str) -> bool {
        self.owner(key).is_some_and(|m| m.name == name)
    }
}

/// How long after its view changed a router acknowledges only channels
/// whose owner in every view of that time was itself or a router that
/// left (rule 4 of the module's fencing): the freshness window plus the
/// margin.
pub fn claim_delay(freshness: Duration, margin: Duration) -> Duration {
    freshness + margin
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

    /// The share of `keys` whose owner differs between two views (0.0–1.0).
    fn moved_fraction<'a>(before: &View, after: &View, keys: impl IntoIterator<Item = &'a str>) -> f64 {
        let (mut n, mut moved) = (0usize, 0usize);
        for k in keys {
            n += 1;
            if before.owner(k).map(|m| &m.name) != after.owner(k).map(|m| &m.name) {
                moved += 1;
            }
        }
        if n == 0 { 0.0 } else { moved as f64 / n as f64 }
    }

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
        assert!(v.contains(&m2.name) && !v.contains(&m1.name));
        assert!(v.put("/x", b"not json", 8).is_err());
        assert_eq!(v.revision, 7, "a malformed value is not applied");
        // A newer router's registration with a field this one does not know.
        v.put("/r9", br#"{"name":"r9","quic":"10.0.0.9:7100","api":"10.0.0.9:8000","zone":"b"}"#, 9).unwrap();
        assert!(v.contains("r9"));
    }

    #[test]
    fn ownership_is_the_rendezvous_hash_and_moves_only_what_it_must() {
        let four = View::new(1, (1..=4).map(member));
        let five = View::new(2, (1..=5).map(member));
        let keys: Vec<String> = (0..20_000).map(|i| format!("chat:{i}")).collect();
        let moved = moved_fraction(&four, &five, keys.iter().map(String::as_str));
        assert!((0.17..0.23).contains(&moved), "about 1/5 moves to the newcomer: {moved}");
        // Only to the newcomer.
        let newcomer = member(5).1.name;
        for k in &keys {
            let (a, b) = (&four.owner(k).unwrap().name, &five.owner(k).unwrap().name);
            assert!(a == b || *b == newcomer, "{k} moved between old members");
        }
        // Same hash as the gateways' over the same names.
        let names: Vec<String> = five.members().map(|m| m.name.clone()).collect();
        for k in keys.iter().take(500) {
            let i = crate::rendezvous::owner(k, &names).unwrap();
            assert_eq!(five.owner(k).unwrap().name, names[i]);
            assert!(five.owns(&names[i], k));
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
