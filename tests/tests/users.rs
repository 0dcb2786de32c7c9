//! The server API acting on a user everywhere: `subscribe`, `unsubscribe`,
//! `disconnect` and `refresh` reach every connection of the user on every
//! gateway, through the router that owns the user's presence, with one
//! router → gateway message per gateway holding the user.
//!
//! The latency from the call to its effect on all three gateways is
//! printed (p50/p99; BENCHMARKS.md has a release run); the test asserts the
//! effects and the message counts, never a time.

use std::time::{Duration, Instant};

use e2e::{Cluster, Event, Ws, metric};
use serde_json::{Value, json};

/// Waits for the next event of `ws` that `pick` accepts, skipping the
/// others; panics after 15 s or on a close.
fn wait_for(ws: &mut Ws, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        match ws.event_by(end, what) {
            Some(Event::Json(v)) if pick(&v) => return v,
            Some(Event::Json(_)) => continue,
            Some(other) => panic!("waiting for {what}, got {other:?}"),
            None => panic!("no {what} within 15 s"),
        }
    }
}

fn api_ok(c: &Cluster, r: usize, method: &str, body: Value) {
    let (status, text) = c.api(r, method, &body);
    assert_eq!(status, 200, "{method}: {text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method}: {text}"));
    assert_eq!(v, json!({"result": {}}), "{method} {body}: {text}");
}

fn user_commands(c: &Cluster) -> u64 {
    (0..c.router_admin_addrs.len())
        .map(|r| metric(&c.router_metrics(r), "switchyard_router_user_commands_total"))
        .sum()
}

/// Waits until the router owning `user`'s presence knows the user on
/// `gateways` gateways (a presence fact travels on its own after a
/// connect): a refresh that changes nothing, sent until it reaches them all.
fn wait_known(c: &Cluster, user: &str, gateways: u64) {
    let far = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 7200;
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let before = user_commands(c);
        api_ok(c, 0, "refresh", json!({"user": user, "expire_at": far}));
        if user_commands(c) - before == gateways {
            return;
        }
        assert!(Instant::now() < end, "{user} not known on {gateways} gateways within 15 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[test]
fn api_commands_reach_a_user_on_every_gateway() {
    // Two routers: the user's presence has one owner; a call made at the
    // other is forwarded to it.
    let c = Cluster::start(2, 3, &[]);
    c.settle();
    let mut alice: Vec<(Ws, String)> = (0..3).map(|g| c.client_with_id(g, "alice")).collect();
    let mut bob = c.client(0, "bob");
    let r = bob.call(json!({"subscribe": {"channel": "chat:bob"}}));
    assert!(r.get("error").is_none(), "{r}");

    // History before alice is subscribed, to recover later.
    let mut epoch = String::new();
    for i in 1..=3 {
        let (s, t) = c.api(0, "publish", &json!({"channel": "chat:room", "data": {"i": i}}));
        assert_eq!(s, 200, "{t}");
        let v: Value = serde_json::from_str(&t).unwrap();
        epoch = v["result"]["epoch"].as_str().unwrap().to_owned();
    }

    wait_known(&c, "alice", 3);

    // Subscribe and unsubscribe, timed call → effect on all three.
    let mut subscribe_times = Vec::new();
    let mut unsubscribe_times = Vec::new();
    let rounds = 100;
    for i in 0..rounds {
        let ch = format!("chat:join-{i}");
        let before = user_commands(&c);
        let t0 = Instant::now();
        api_ok(&c, i % 2, "subscribe", json!({"user": "alice", "channel": ch}));
        for (ws, _) in &mut alice {
            let v = wait_for(ws, "the subscribe push", |v| v["push"]["channel"] == ch.as_str());
            assert!(v["push"]["subscribe"].is_object(), "{v}");
        }
        subscribe_times.push(t0.elapsed());
        assert_eq!(user_commands(&c) - before, 3, "one message per gateway holding the user");
        // The subscription is live: a publication reaches all three.
        let (_, t) = c.api(0, "publish", &json!({"channel": ch, "data": {"round": i}}));
        assert!(t.contains("offset"), "{t}");
        for (ws, _) in &mut alice {
            let v = wait_for(ws, "the publication", |v| v["push"]["channel"] == ch.as_str());
            assert_eq!(v["push"]["pub"]["data"], json!({"round": i}), "{v}");
        }
        let t0 = Instant::now();
        api_ok(&c, (i + 1) % 2, "unsubscribe", json!({"user": "alice", "channel": ch}));
        for (ws, _) in &mut alice {
            let v = wait_for(ws, "the unsubscribe push", |v| v["push"]["channel"] == ch.as_str());
            assert_eq!(v["push"]["unsubscribe"]["code"], 2000, "{v}");
        }
        unsubscribe_times.push(t0.elapsed());
    }
    for (name, times) in [("subscribe", &mut subscribe_times), ("unsubscribe", &mut unsubscribe_times)] {
        times.sort();
        println!(
            "user-wide {name}, call → effect on all 3 gateways over {rounds} calls: p50 {:?} p99 {:?} max {:?}",
            percentile(times, 0.5),
            percentile(times, 0.99),
            times.last().unwrap()
        );
    }

    // A subscribe that recovers from a position: the push, then what was missed.
    api_ok(
        &c,
        1,
        "subscribe",
        json!({"user": "alice", "channel": "chat:room", "recover_since": {"offset": 1, "epoch": epoch}}),
    );
    for (ws, _) in &mut alice {
        let v = wait_for(ws, "the subscribe push", |v| v["push"]["channel"] == "chat:room");
        assert_eq!(v["push"]["subscribe"]["epoch"], epoch.as_str(), "{v}");
        for offset in [2, 3] {
            let v = wait_for(ws, "a recovered publication", |v| v["push"]["channel"] == "chat:room");
            assert_eq!(v["push"]["pub"]["offset"], offset, "{v}");
            assert_eq!(v["push"]["pub"]["data"], json!({"i": offset}), "{v}");
        }
    }
    let (_, t) = c.api(0, "publish", &json!({"channel": "chat:room", "data": {"i": 4}}));
    assert!(t.contains("\"offset\":4"), "{t}");
    for (ws, _) in &mut alice {
        let v = wait_for(ws, "the next publication", |v| v["push"]["channel"] == "chat:room");
        assert_eq!(v["push"]["pub"]["offset"], 4, "{v}");
    }

    // Refresh: one client expired now (3005), the others given a new expiry.
    let later = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    api_ok(&c, 0, "refresh", json!({"user": "alice", "expire_at": later}));
    let target = alice[2].1.clone();
    api_ok(&c, 1, "refresh", json!({"user": "alice", "client": target, "expired": true}));
    let (mut gone, _) = alice.pop().unwrap();
    assert_eq!(gone.expect_close(), Some(3005));

    // Disconnect with the backend's code and reason, keeping one client (the
    // whitelist), then without: the user's other two, one after the other.
    let closed = |ws: &mut Ws| {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            match ws.event_by(end, "the close") {
                Some(Event::Closed(code, reason)) => return (code, reason),
                Some(_) => continue,
                None => panic!("not closed"),
            }
        }
    };
    let kept = alice[0].1.clone();
    let before = user_commands(&c);
    let t0 = Instant::now();
    api_ok(
        &c,
        0,
        "disconnect",
        json!({"user": "alice", "whitelist": [kept], "disconnect": {"code": 4001, "reason": "moved"}}),
    );
    assert_eq!(closed(&mut alice[1].0), (Some(4001), "moved".to_owned()));
    println!("user-wide disconnect, call → closed: {:?}", t0.elapsed());
    // One message per gateway that held the user then: the two left (the
    // third's gateway may still list alice until its offline lands).
    let sent = user_commands(&c) - before;
    assert!((2..=3).contains(&sent), "{sent} messages for a user on 2 gateways");
    api_ok(&c, 1, "disconnect", json!({"user": "alice"}));
    assert_eq!(closed(&mut alice[0].0), (Some(3503), "force disconnect".to_owned()), "the default code");

    // Bob, on one of the same gateways, saw none of it and is served.
    let (_, t) = c.api(1, "publish", &json!({"channel": "chat:bob", "data": {"still": "here"}}));
    assert!(t.contains("offset"), "{t}");
    let v = bob.next_pub().expect("bob's publication");
    assert_eq!(v["push"]["channel"], "chat:bob", "bob got only his own channel: {v}");
    assert_eq!(v["push"]["pub"]["data"], json!({"still": "here"}));
}

#[test]
fn bad_user_commands_get_error_107_and_change_nothing() {
    let c = Cluster::start(1, 1, &[]);
    let mut alice = c.client(0, "alice");
    let r = alice.call(json!({"subscribe": {"channel": "chat:keep"}}));
    assert!(r.get("error").is_none(), "{r}");
    wait_known(&c, "alice", 1);
    for (method, body) in [
        ("subscribe", json!({"channel": "chat:x"})),
        ("subscribe", json!({"user": "alice"})),
        ("subscribe", json!({"user": "alice", "channel": ""})),
        ("unsubscribe", json!({"user": "", "channel": "chat:keep"})),
        ("disconnect", json!({"user": "alice", "disconnect": {"code": 1000, "reason": "x"}})),
        ("disconnect", json!({"user": "alice", "disconnect": {"code": 4000, "reason": "x".repeat(200)}})),
        ("refresh", json!({"expired": true})),
    ] {
        let (status, text) = c.api(0, method, &body);
        assert_eq!(status, 200, "{method} {body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], 107, "{method} {body}: {text}");
    }
    let (status, _) = c.api(0, "subscribe", &json!("not an object"));
    assert_eq!(status, 400);
    // A user with no connection: accepted, nothing to do.
    api_ok(&c, 0, "disconnect", json!({"user": "nobody"}));
    // An unknown namespace is not subscribed (the session is not closed).
    api_ok(&c, 0, "subscribe", json!({"user": "alice", "channel": "nope:x"}));
    // Alice kept her connection and subscription through all of it.
    let (_, t) = c.api(0, "publish", &json!({"channel": "chat:keep", "data": {"n": 1}}));
    assert!(t.contains("offset"), "{t}");
    let v = alice.next_pub().expect("still subscribed");
    assert_eq!(v["push"]["channel"], "chat:keep", "{v}");
    let refused = metric(&c.metrics(0), "switchyard_gateway_server_subscribes_refused_total");
    assert_eq!(refused, 1, "the unknown namespace was refused and counted");
}

/// Connects to gateway `g` with `token` and `subs` (the SDKs' recovery
/// positions for server-side subscriptions); returns the socket and, per
/// expected channel, its result: from the connect reply's `subs`, or from
/// the `subscribe` push that follows it.
fn connect_server_side(
    c: &Cluster,
    g: usize,
    token: &str,
    subs: Value,
    channels: &[&str],
) -> (Ws, Vec<Value>) {
    let mut ws = Ws::connect(c.ws_addrs[g], "/connection/websocket").expect("upgrade");
    let reply = ws.call(json!({"connect": {"token": token, "subs": subs}}));
    assert!(reply["connect"]["client"].is_string(), "{reply}");
    let mut results = Vec::new();
    for ch in channels {
        let r = match reply["connect"]["subs"].get(*ch) {
            Some(r) => r.clone(),
            None => {
                let v = wait_for(&mut ws, "the subscribe push", |v| v["push"]["channel"] == *ch);
                assert!(
                    v["push"]["subscribe"].is_object(),
                    "{ch}: expected the subscribe push first, got {v}"
                );
                v["push"]["subscribe"].clone()
            }
        };
        results.push(r);
    }
    (ws, results)
}

#[test]
fn token_channels_are_subscribed_at_connect_and_recovered_after_a_drain() {
    let c = Cluster::start(1, 2, &["--drain-secs", "1"]);
    let publish = |ch: &str, i: u64| {
        let (_, t) = c.api(0, "publish", &json!({"channel": ch, "data": {"i": i}}));
        let v: Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["result"]["offset"], i, "{t}");
        v["result"]["epoch"].as_str().unwrap().to_owned()
    };
    let epoch = publish("chat:srv-a", 1);
    let token = e2e::token_with(json!({
        "sub": "carol",
        "channels": ["chat:srv-a"],
        "subs": {"chat:srv-b": {"info": {"role": "reader"}}},
    }));
    let (mut ws, results) = connect_server_side(&c, 0, &token, json!({}), &["chat:srv-a", "chat:srv-b"]);
    assert_eq!(results[0]["epoch"], epoch.as_str(), "{results:?}");
    assert_eq!(results[0]["offset"], 1, "{results:?}");
    // A second connection of the token on the same gateway: the positions
    // are known there now, and the results come in the connect reply.
    let mut second = Ws::connect(c.ws_addrs[0], "/connection/websocket").expect("upgrade");
    let reply = second.call(json!({"connect": {"token": token}}));
    assert_eq!(reply["connect"]["subs"]["chat:srv-a"]["offset"], 1, "{reply}");
    assert!(reply["connect"]["subs"]["chat:srv-b"].is_object(), "{reply}");
    drop(second);
    for i in 2..=3 {
        publish("chat:srv-a", i);
        let v = wait_for(&mut ws, "a publication", |v| v["push"]["channel"] == "chat:srv-a");
        assert_eq!(v["push"]["pub"]["offset"], i, "{v}");
    }
    // The gateway drains: the client comes back on the other one and
    // recovers what was published while it was away.
    c.gateways[0].signal(libc::SIGTERM);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match ws.event_by(end, "the drain's close") {
            Some(Event::Closed(code, _)) => {
                assert_eq!(code, Some(3001));
                break;
            }
            Some(_) => continue,
            None => panic!("not closed by the drain"),
        }
    }
    for i in 4..=5 {
        publish("chat:srv-a", i);
    }
    let positions = json!({"chat:srv-a": {"recover": true, "epoch": epoch, "offset": 3}});
    let (mut ws, results) = connect_server_side(&c, 1, &token, positions, &["chat:srv-a"]);
    let r = &results[0];
    // Recovered in the result (publications) or as pushes after it.
    let mut got: Vec<u64> = r["publications"]
        .as_array()
        .map(|p| p.iter().map(|p| p["offset"].as_u64().unwrap()).collect())
        .unwrap_or_default();
    while got.len() < 2 {
        let v = wait_for(&mut ws, "a recovered publication", |v| v["push"]["channel"] == "chat:srv-a");
        got.push(v["push"]["pub"]["offset"].as_u64().unwrap());
    }
    assert_eq!(got, vec![4, 5], "missed publications recovered in order: {r}");
    publish("chat:srv-a", 6);
    let v = wait_for(&mut ws, "the next publication", |v| v["push"]["channel"] == "chat:srv-a");
    assert_eq!(v["push"]["pub"]["offset"], 6, "{v}");
}

#[test]
fn a_token_with_more_channels_than_the_limit_is_closed_with_3505() {
    let c = Cluster::start(1, 1, &[]);
    let channels: Vec<String> = (0..129).map(|i| format!("chat:many-{i}")).collect();
    let token = e2e::token_with(json!({"sub": "dave", "channels": channels}));
    let mut ws = Ws::connect(c.ws_addrs[0], "/connection/websocket").expect("upgrade");
    ws.send_json(&json!({"id": 1, "connect": {"token": token}}));
    assert_eq!(ws.expect_close(), Some(3505));
    // 128 is within the limit.
    let token = e2e::token_with(json!({"sub": "dave", "channels": channels[..128]}));
    let (_ws, results) = connect_server_side(&c, 0, &token, json!({}), &[channels[0].as_str()]);
    assert!(results[0].is_object());
}

/// centrifuge-js sends its subscribes in the connect's frame: while the
/// connect reply waits for the routers (the token's channel), the other
/// replies wait behind it, so the connect reply comes first.
#[test]
fn the_connect_reply_comes_first_when_it_waits_for_token_channels() {
    let c = Cluster::start(1, 1, &[]);
    let (_, t) = c.api(0, "publish", &json!({"channel": "chat:tok", "data": {"i": 1}}));
    assert!(t.contains("\"offset\":1"), "{t}");
    let token = e2e::token_with(json!({"sub": "erin", "channels": ["chat:tok"]}));
    let mut ws = Ws::connect(c.ws_addrs[0], "/connection/websocket").expect("upgrade");
    let frame = [
        json!({"id": 1, "connect": {"token": token}}).to_string(),
        json!({"id": 2, "subscribe": {"channel": "chat:own"}}).to_string(),
        json!({"id": 3, "ping": {}}).to_string(),
    ]
    .join("\n");
    ws.send_frame(proto::ws::OpCode::Text, frame.as_bytes());
    let mut ids = Vec::new();
    let end = Instant::now() + Duration::from_secs(15);
    while ids.len() < 3 {
        match ws.event_by(end, "the replies") {
            Some(Event::Json(v)) if v.get("id").is_some() => {
                if v["id"] == 1 {
                    assert_eq!(v["connect"]["subs"]["chat:tok"]["offset"], 1, "{v}");
                }
                ids.push(v["id"].as_u64().unwrap());
            }
            Some(Event::Json(v)) => panic!("a push before the replies: {v}"),
            Some(other) => panic!("{other:?}"),
            None => panic!("replies missing: {ids:?}"),
        }
    }
    assert_eq!(ids[0], 1, "the connect reply first: {ids:?}");
    // Both subscriptions are live.
    for ch in ["chat:tok", "chat:own"] {
        let (_, t) = c.api(0, "publish", &json!({"channel": ch, "data": {"to": ch}}));
        assert!(t.contains("offset"), "{t}");
        let v = wait_for(&mut ws, "a publication", |v| v["push"]["channel"] == ch);
        assert_eq!(v["push"]["pub"]["data"], json!({"to": ch}), "{v}");
    }
}

/// A user-wide unsubscribe that overtakes its subscribe (the gateway still
/// waits for the router's answer to the subscription): the client, which
/// never heard of the channel, gets no push for it. Otherwise it gets the
/// subscribe push, then the unsubscribe push. Never an unsubscribe alone.
#[test]
fn an_unsubscribe_that_overtakes_its_subscribe_sends_no_push_alone() {
    let c = Cluster::start(1, 1, &[]);
    c.settle();
    let mut ws = c.client(0, "racer");
    let n = 40;
    std::thread::scope(|s| {
        for i in 0..n {
            let c = &c;
            let channel = format!("chat:race-{i}");
            s.spawn(move || {
                let body = json!({"user": "racer", "channel": channel});
                let sub = std::thread::scope(|t| {
                    let sub = t.spawn(|| c.api(0, "subscribe", &body));
                    let unsub = c.api(0, "unsubscribe", &body);
                    assert_eq!(unsub.0, 200, "{}", unsub.1);
                    sub.join().unwrap()
                });
                assert_eq!(sub.0, 200, "{}", sub.1);
            });
        }
    });
    // Whatever the order, each channel ends unsubscribed: the final
    // unsubscribe of every channel, once more, settles it.
    for i in 0..n {
        api_ok(&c, 0, "unsubscribe", json!({"user": "racer", "channel": format!("chat:race-{i}")}));
    }
    // A marker: every push before it has arrived.
    api_ok(&c, 0, "subscribe", json!({"user": "racer", "channel": "chat:race-end"}));
    let mut seen: std::collections::HashMap<String, Vec<&'static str>> = Default::default();
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        match ws.event_by(end, "the marker's subscribe push") {
            Some(Event::Json(v)) => {
                let Some(channel) = v["push"]["channel"].as_str() else { continue };
                if channel == "chat:race-end" {
                    break;
                }
                let kind = if v["push"]["subscribe"].is_object() {
                    "subscribe"
                } else if v["push"]["unsubscribe"].is_object() {
                    "unsubscribe"
                } else {
                    "other"
                };
                seen.entry(channel.to_owned()).or_default().push(kind);
            }
            Some(other) => panic!("{other:?}"),
            None => panic!("no marker push"),
        }
    }
    let mut raced = 0;
    for i in 0..n {
        let kinds = seen.remove(&format!("chat:race-{i}")).unwrap_or_default();
        match kinds.as_slice() {
            [] => raced += 1,
            ["subscribe", "unsubscribe"] => {}
            other => panic!("chat:race-{i}: {other:?}"),
        }
    }
    println!("{raced} of {n} unsubscribes overtook their subscribe");
}
