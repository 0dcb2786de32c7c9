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
