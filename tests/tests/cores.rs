//! Users are sharded by core: whichever core's listener accepts a
//! connection, the session lives on `hash(user) mod cores` (the socket is
//! handed over before the token is verified there), so all of a user's
//! connections share one core and its per-user state.

use e2e::{Cluster, Ws, token};
use serde_json::json;

/// `switchyard_gateway_connections` per core.
fn per_core(c: &Cluster) -> Vec<u64> {
    let m = c.metrics(0);
    let mut out = Vec::new();
    for line in m.lines().filter(|l| l.starts_with("switchyard_gateway_connections{")) {
        out.push(line.rsplit(' ').next().unwrap().parse().unwrap());
    }
    out
}

/// The core `hash(user) mod 2` (the harness runs two cores).
fn core_of(user: &str) -> usize {
    (proto::rendezvous::stable_hash(user.as_bytes()) % 2) as usize
}

#[test]
fn a_users_connections_all_live_on_the_users_core() {
    let c = Cluster::start(1, 1, &[]);
    // The harness's probe of the WebSocket port (a connection opened and
    // dropped) is counted until the gateway reads its end: wait for it to
    // go (bounded), or a core's growth would read one short.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let base = loop {
        let now = per_core(&c);
        if now.iter().sum::<u64>() == 0 || std::time::Instant::now() >= end {
            break now;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(base, [0, 0], "the harness runs two cores, and no connection is left from its probe");
    // Two users of different cores, six connections each.
    let a = "sam";
    let b = (0..).map(|i| format!("user{i}")).find(|u| core_of(u) != core_of(a)).unwrap();
    let mut held = Vec::new();
    for user in [a, b.as_str()] {
        for _ in 0..6 {
            let mut ws = Ws::connect(c.ws_addrs[0], "/connection/websocket").expect("upgrade");
            let r = ws.call(json!({"connect": {"token": token(user)}}));
            assert!(r["connect"]["client"].is_string(), "{r}");
            // The session works after a move: subscribe and receive.
            assert!(ws.call(json!({"subscribe": {"channel": "chat:cores"}})).get("error").is_none());
            held.push(ws);
        }
    }
    // Wherever the kernel accepted them, each user's six sessions are on
    // the user's core.
    let grown: Vec<u64> = per_core(&c).iter().zip(&base).map(|(n, b)| n - b).collect();
    assert_eq!(grown, [6, 6], "one user per core");
    let r = held[0].call(json!({"publish": {"channel": "chat:cores", "data": {"hi": 1}}}));
    assert!(r.get("error").is_none(), "{r}");
    for ws in held.iter_mut() {
        let v = ws.next_pub().expect("the publication, on every moved session");
        assert_eq!(v["push"]["pub"]["data"], json!({"hi": 1}), "{v}");
        assert_eq!(v["push"]["pub"]["offset"], 1, "{v}");
    }
    // A bad token is refused on the user's core as anywhere else.
    let mut bad = Ws::connect(c.ws_addrs[0], "/connection/websocket").expect("upgrade");
    bad.send_json(&json!({"id": 1, "connect": {"token": format!("{}x", token("sam"))}}));
    assert_eq!(bad.expect_close(), Some(3500));
}
