//! Users are sharded by core: whichever core's listener accepts a
//! connection, the session lives on `hash(user) mod cores` (the socket is
//! handed over before the token is verified there), so all of a user's
//! connections share one core and its per-user state.

use e2e::{Cluster, Ws, metric, token};
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

#[test]
fn a_users_connections_all_live_on_the_users_core() {
    let c = Cluster::start(1, 1, &[]);
    let base = per_core(&c);
    assert_eq!(base.len(), 2, "the harness runs two cores");
    let mut held = Vec::new();
    for _ in 0..12 {
        let mut ws = Ws::connect(c.ws_addrs[0], "/connection/websocket").expect("upgrade");
        let r = ws.call(json!({"connect": {"token": token("sam")}}));
        assert!(r["connect"]["client"].is_string(), "{r}");
        // The session works after the move: subscribe and publish.
        assert!(ws.call(json!({"subscribe": {"channel": "chat:cores"}})).get("error").is_none());
        held.push(ws);
    }
    let now = per_core(&c);
    let grown: Vec<u64> = now.iter().zip(&base).map(|(n, b)| n - b).collect();
    assert!(grown.contains(&12) && grown.contains(&0), "all of sam's sessions on one core: {grown:?}");
    let r = held[0].call(json!({"publish": {"channel": "chat:cores", "data": {"hi": 1}}}));
    assert!(r.get("error").is_none(), "{r}");
    for ws in held.iter_mut() {
        assert_eq!(ws.next_pub().unwrap()["push"]["pub"]["data"]["hi"], 1);
    }
    // The kernel spread the accepts over both listeners, so some were moved.
    let m = c.metrics(0);
    assert!(metric(&m, "switchyard_gateway_handovers_total") > 0, "{m}");
    // A bad token is refused on the user's core as anywhere else.
    let mut bad = Ws::connect(c.ws_addrs[0], "/connection/websocket").expect("upgrade");
    bad.send_json(&json!({"id": 1, "connect": {"token": format!("{}x", token("sam"))}}));
    assert_eq!(bad.expect_close(), Some(3500));
}
