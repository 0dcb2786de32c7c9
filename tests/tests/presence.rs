//! User presence across gateways: a user is online while any connection is
//! up, and away only when none comes back within the grace period; changes
//! are published on `presence:<user>`.
//!
//! The watching connection must stay up: a close or an ended connection
//! while waiting for (or for the absence of) a change is a failure.

use std::time::{Duration, Instant};

use e2e::{Cluster, Event, Ws, metric, wait_until};
use serde_json::{Value, json};

/// The next change on `presence:bob` within `within`, `None` when none
/// comes. Panics when the watching connection closes or ends.
fn next_presence(ws: &mut Ws, within: Duration) -> Option<Value> {
    let end = Instant::now() + within;
    loop {
        match ws.event_by(end, "a change on presence:bob")? {
            Event::Json(v) if v["push"]["channel"] == "presence:bob" => {
                assert!(v["push"]["pub"].is_object(), "presence:bob: not a publication: {v}");
                return Some(v["push"]["pub"]["data"].clone());
            }
            Event::Json(_) => continue,
            Event::Closed(code, reason) => panic!("the watcher was closed ({code:?} {reason:?})"),
            Event::Binary => panic!("a binary frame"),
        }
    }
}

/// Connections gateway `g` holds.
fn connections(c: &Cluster, g: usize) -> u64 {
    metric(&c.metrics(g), "switchyard_gateway_connections")
}

/// Waits until gateway `g` holds `n` connections (a drop or a connect has
/// been handled there, and so told to the router).
fn wait_connections(c: &Cluster, g: usize, n: u64) {
    wait_until(
        Duration::from_secs(10),
        &format!("connections on gateway {g}"),
        || connections(c, g),
        |v| *v == n,
    );
}

#[test]
fn presence_changes_are_published_once_and_do_not_flap() {
    let grace = Duration::from_secs(3);
    let c = Cluster::start_with(1, 2, &["--presence-grace-secs", "3"], &[]);
    let mut watcher = c.client(0, "alice");
    let r = watcher.call(json!({"subscribe": {"channel": "presence:bob"}}));
    assert!(r.get("error").is_none(), "{r}");

    let bob1 = c.client(0, "bob");
    assert_eq!(
        next_presence(&mut watcher, Duration::from_secs(10)),
        Some(json!({"user": "bob", "online": true}))
    );
    // A second device on another gateway changes nothing.
    let bob2 = c.client(1, "bob");
    wait_connections(&c, 1, 1);
    // The first device drops (while the second is up) and comes back.
    drop(bob1);
    wait_connections(&c, 0, 1);
    let bob3 = c.client(0, "bob");
    // Both devices drop; a new one returns within the grace period.
    drop(bob2);
    drop(bob3);
    wait_connections(&c, 0, 1);
    wait_connections(&c, 1, 0);
    let bob4 = c.client(1, "bob");
    // No change for any of that: not the second device, not the drops.
    // Had the router published "away" for the moment no device was up, it
    // would have done so when the grace timer armed at the last drop fired,
    // by `grace` after it; 2 s more is ample on a loaded machine.
    let bound = grace + Duration::from_secs(2);
    assert_eq!(next_presence(&mut watcher, bound), None, "no flap, no repeated online");
    // Last device gone: away, exactly once.
    drop(bob4);
    assert_eq!(
        next_presence(&mut watcher, Duration::from_secs(15)),
        Some(json!({"user": "bob", "online": false}))
    );
    // Nothing follows: nobody connects, and a repeat would come from the
    // same (already fired) grace timer or one armed with it, within `grace`.
    assert_eq!(next_presence(&mut watcher, bound), None, "no further change");
}

/// The latest presence of `user` as its channel's history holds it.
fn presence_state(c: &Cluster, user: &str) -> Option<Value> {
    let (st, body) = c.api(0, "history", &json!({"channel": format!("presence:{user}"), "limit": -1}));
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["result"]["publications"].as_array()?.last().map(|p| p["data"]["online"].clone())
}

fn wait_presence(c: &Cluster, user: &str, online: bool) {
    wait_until(
        Duration::from_secs(20),
        &format!("presence of {user} (want online={online})"),
        || presence_state(c, user),
        |v| *v == Some(json!(online)),
    );
}

#[test]
fn presence_settles_on_a_restarted_router() {
    let mut c = Cluster::start_with(1, 1, &["--presence-grace-secs", "1"], &[]);
    let bob = c.client(0, "bob");
    wait_presence(&c, "bob", true);
    // The router crashes and comes back empty: the gateway tells it again
    // who is connected, so bob is online there without reconnecting…
    c.restart_router(0);
    e2e::wait_ready(c.admin_addrs[0]);
    wait_presence(&c, "bob", true);
    // …and goes away when he really leaves.
    drop(bob);
    wait_presence(&c, "bob", false);
}

#[test]
fn a_gateway_crash_does_not_make_its_users_flap() {
    let grace = Duration::from_secs(8);
    let cfg = std::env::temp_dir().join(format!("sy-flap-{}.toml", std::process::id()));
    std::fs::write(&cfg, "evict_secs = 5\npresence_grace_secs = 8\n").unwrap();
    let c = Cluster::start_with(1, 2, &["--config", cfg.to_str().unwrap()], &[]);
    let links = || metric(&c.router_metrics(0), "switchyard_router_gateway_links");
    let mut watcher = c.client(1, "alice");
    let r = watcher.call(json!({"subscribe": {"channel": "presence:bob"}}));
    assert!(r.get("error").is_none(), "{r}");
    let _bob = c.client(0, "bob");
    assert_eq!(
        next_presence(&mut watcher, Duration::from_secs(10)),
        Some(json!({"user": "bob", "online": true}))
    );
    wait_until(Duration::from_secs(10), "both gateways linked to the router", links, |n| *n == 2);
    // bob's gateway dies; his client reconnects to the other one at once.
    c.gateways[0].signal(9);
    let bob = c.client(1, "bob");
    // The router gives the dead gateway up (eviction after 5 s of silence,
    // or the link's end) and so drops bob's connection there…
    wait_until(Duration::from_secs(30), "the router evicting the dead gateway", links, |n| *n == 1);
    // …and bob stays online throughout: a wrong "away" would come when a
    // grace timer armed at the eviction fires, `grace` after it; the bound
    // adds 3 s for a loaded machine.
    assert_eq!(next_presence(&mut watcher, grace + Duration::from_secs(3)), None, "no flap");
    drop(bob);
    assert_eq!(
        next_presence(&mut watcher, Duration::from_secs(20)),
        Some(json!({"user": "bob", "online": false}))
    );
    let _ = std::fs::remove_file(&cfg);
}
