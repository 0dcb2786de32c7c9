//! User presence across gateways: a user is online while any connection is
//! up, and away only when none comes back within the grace period; changes
//! are published on `presence:<user>`.

use std::time::{Duration, Instant};

use e2e::{Cluster, Event, Ws};
use serde_json::{Value, json};

fn next_presence(ws: &mut Ws, timeout: Duration) -> Option<Value> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        match ws.next_event() {
            Some(Event::Json(v)) if v["push"]["channel"] == "presence:bob" => {
                return Some(v["push"]["pub"]["data"].clone());
            }
            Some(_) => continue,
            None => return None,
        }
    }
    None
}

#[test]
fn presence_changes_are_published_once_and_do_not_flap() {
    let c = Cluster::start_with(1, 2, &["--presence-grace-secs", "2"], &[]);
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
    // The first device drops and comes back quickly: still online, no flap.
    drop(bob1);
    std::thread::sleep(Duration::from_millis(300));
    let bob3 = c.client(0, "bob");
    drop(bob2);
    drop(bob3);
    // Last device gone: away after the 2 s grace period, exactly once.
    let t0 = Instant::now();
    assert_eq!(
        next_presence(&mut watcher, Duration::from_secs(15)),
        Some(json!({"user": "bob", "online": false}))
    );
    assert!(t0.elapsed() >= Duration::from_millis(1500), "away came before the grace period");
    assert_eq!(next_presence(&mut watcher, Duration::from_secs(3)), None, "no further change");
}

/// The latest presence of `user` as its channel's history holds it.
fn presence_state(c: &Cluster, user: &str) -> Option<Value> {
    let (st, body) = c.api(0, "history", &json!({"channel": format!("presence:{user}"), "limit": -1}));
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["result"]["publications"].as_array()?.last().map(|p| p["data"]["online"].clone())
}

fn wait_presence(c: &Cluster, user: &str, online: bool) {
    let end = Instant::now() + Duration::from_secs(20);
    while presence_state(c, user) != Some(json!(online)) {
        assert!(Instant::now() < end, "presence of {user} never became online={online}");
        std::thread::sleep(Duration::from_millis(100));
    }
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
    let cfg = std::env::temp_dir().join(format!("sy-flap-{}.toml", std::process::id()));
    std::fs::write(&cfg, "evict_secs = 5\npresence_grace_secs = 8\n").unwrap();
    let c = Cluster::start_with(1, 2, &["--config", cfg.to_str().unwrap()], &[]);
    let mut watcher = c.client(1, "alice");
    let r = watcher.call(json!({"subscribe": {"channel": "presence:bob"}}));
    assert!(r.get("error").is_none(), "{r}");
    let _bob = c.client(0, "bob");
    assert_eq!(
        next_presence(&mut watcher, Duration::from_secs(10)),
        Some(json!({"user": "bob", "online": true}))
    );
    // bob's gateway dies; his client reconnects to the other one at once.
    c.gateways[0].signal(9);
    let bob = c.client(1, "bob");
    // The dead gateway is evicted after 5 s; bob stays online throughout.
    assert_eq!(next_presence(&mut watcher, Duration::from_secs(14)), None, "no flap within the grace period");
    drop(bob);
    assert_eq!(
        next_presence(&mut watcher, Duration::from_secs(20)),
        Some(json!({"user": "bob", "online": false}))
    );
    let _ = std::fs::remove_file(&cfg);
}
