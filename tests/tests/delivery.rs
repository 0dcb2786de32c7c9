//! Delivery, order and recovery through real router and gateway processes.

use e2e::{Cluster, StreamCheck, metric};
use serde_json::json;

fn publish(ws: &mut e2e::Ws, channel: &str, n: u64) {
    let r = ws.call(json!({"publish": {"channel": channel, "data": {"n": n}}}));
    assert!(r.get("error").is_none(), "{r}");
}

fn subscribe_ok(ws: &mut e2e::Ws, channel: &str) -> serde_json::Value {
    // The gateway's uplink may still be connecting: a temporary error is retried.
    let r = e2e::call_retrying(ws, json!({"subscribe": {"channel": channel}}));
    assert!(r.get("error").is_none(), "{r}");
    r
}

#[test]
fn publications_reach_every_gateway_in_order_encoded_once() {
    let c = Cluster::start(1, 2, &[]);
    let mut subs: Vec<e2e::Ws> = Vec::new();
    for i in 0..6 {
        let mut ws = c.client(i % 2, &format!("u{i}"));
        let r = subscribe_ok(&mut ws, "chat:general");
        assert_eq!(r["subscribe"]["recoverable"], true, "{r}");
        assert_eq!(r["subscribe"]["positioned"], true);
        subs.push(ws);
    }
    let mut publisher = c.client(0, "pub");
    subscribe_ok(&mut publisher, "chat:general");
    let n = 20u64;
    for i in 0..n {
        publish(&mut publisher, "chat:general", i);
    }
    // The publisher is a subscriber too: it gets its own publications.
    subs.push(publisher);
    for ws in subs.iter_mut() {
        let mut offsets = Vec::new();
        while offsets.len() < n as usize {
            let v = ws.next_pub().expect("publication");
            let p = &v["push"]["pub"];
            assert_eq!(v["push"]["channel"], "chat:general");
            assert_eq!(p["info"]["user"], "pub", "{v}");
            assert_eq!(p["data"]["n"].as_u64().unwrap() + 1, p["offset"].as_u64().unwrap());
            offsets.push(p["offset"].as_u64().unwrap());
        }
        assert_eq!(offsets, (1..=n).collect::<Vec<_>>(), "lost, duplicated or reordered");
    }
    // Encode once: each gateway framed each publication at most once
    // (fewer when several were packed into one frame).
    for g in 0..2 {
        let m = c.metrics(g);
        let encoded = metric(&m, "switchyard_gateway_frames_encoded_total");
        let received = metric(&m, "switchyard_gateway_publications_in_total");
        assert_eq!(received, n, "{m}");
        assert!((1..=n).contains(&encoded), "{m}");
        // Every recipient (the publisher is subscribed too) got each of
        // those few encodings once, as a clone.
        let recipients = if g == 0 { 4 } else { 3 };
        let deliveries = metric(&m, "switchyard_gateway_deliveries_total");
        assert_eq!(deliveries, recipients * encoded, "{m}");
    }
}

#[test]
fn reconnecting_subscriber_recovers_exactly_what_it_missed() {
    let c = Cluster::start(1, 1, &[]);
    let mut publisher = c.client(0, "pub");
    subscribe_ok(&mut publisher, "chat:r");
    let mut ws = c.client(0, "reader");
    let mut seen = StreamCheck::subscribe(&mut ws, "chat:r");
    for i in 0..3 {
        publish(&mut publisher, "chat:r", i);
    }
    seen.receive_through(&mut ws, 3);
    drop(ws);
    for i in 3..8 {
        publish(&mut publisher, "chat:r", i);
    }
    let mut ws = c.client(0, "reader");
    let r = ws.call(seen.recover_command());
    let s = &r["subscribe"];
    assert_eq!(s["offset"], 3, "the reply echoes the request's offset: {r}");
    assert!(seen.resubscribed(&r), "recovered: {r}");
    // Live publications continue from the recovered tail.
    publish(&mut publisher, "chat:r", 8);
    seen.receive_through(&mut ws, 9);
    assert_eq!(seen.offsets(), (1..=9).collect::<Vec<_>>(), "each once, in order, across the reconnect");
    let recovered: Vec<u64> = seen.received.iter().filter(|r| r.recovered).map(|r| r.offset).collect();
    assert_eq!(recovered, vec![4, 5, 6, 7, 8]);
    for r in &seen.received {
        assert_eq!(r.data, json!({"n": r.offset - 1}), "the payload published at offset {}", r.offset);
    }
    // A stale epoch is told explicitly: recovered false, no publications.
    let mut ws2 = c.client(0, "reader2");
    let r =
        ws2.call(json!({"subscribe": {"channel": "chat:r", "recover": true, "epoch": "stale", "offset": 2}}));
    assert_eq!(r["subscribe"]["recovered"], serde_json::Value::Null, "{r}");
    assert_eq!(r["subscribe"]["was_recovering"], true);
    assert_eq!(r["subscribe"]["offset"], 9);
    assert!(r["subscribe"].get("publications").is_none());
}

#[test]
fn presence_history_and_protocol_answers() {
    let c = Cluster::start(1, 1, &[]);
    let mut a = c.client(0, "alice");
    let mut b = c.client(0, "bob");
    subscribe_ok(&mut a, "chat:p");
    subscribe_ok(&mut b, "chat:p");
    publish(&mut a, "chat:p", 1);
    let stats = a.call(json!({"presence_stats": {"channel": "chat:p"}}));
    assert_eq!(stats["presence_stats"], json!({"num_clients": 2, "num_users": 2}), "{stats}");
    let p = a.call(json!({"presence": {"channel": "chat:p"}}));
    assert_eq!(p["presence"]["presence"].as_object().unwrap().len(), 2, "{p}");
    let h = a.call(json!({"history": {"channel": "chat:p", "limit": -1}}));
    assert_eq!(h["history"]["publications"].as_array().unwrap().len(), 1, "{h}");
    assert_eq!(h["history"]["offset"], 1);
    // Ephemeral namespace: no position, no history.
    let t = a.call(json!({"subscribe": {"channel": "typing:p"}}));
    assert_eq!(t["subscribe"], json!({}));
    let h = a.call(json!({"history": {"channel": "typing:p"}}));
    assert_eq!(h["error"]["code"], 108);
    // rpc without a backend, unknown method, ping command, unknown namespace.
    assert_eq!(a.call(json!({"rpc": {"method": "x"}}))["error"]["code"], 108);
    assert_eq!(a.call(json!({"nope": {}}))["error"]["code"], 104);
    assert_eq!(a.call(json!({"ping": {}}))["ping"], json!({}));
    assert_eq!(a.call(json!({"subscribe": {"channel": "nope:x"}}))["error"]["code"], 102);
    assert_eq!(a.call(json!({"subscribe": {"channel": "chat:p"}}))["error"]["code"], 105);
    // Personal channels: only their user.
    assert_eq!(a.call(json!({"subscribe": {"channel": "#bob"}}))["error"]["code"], 103);
    subscribe_ok(&mut b, "#bob");
    // Unsubscribe always succeeds; presence drops back.
    assert_eq!(b.call(json!({"unsubscribe": {"channel": "chat:p"}}))["unsubscribe"], json!({}));
    assert_eq!(b.call(json!({"unsubscribe": {"channel": "never"}}))["unsubscribe"], json!({}));
    let stats = a.call(json!({"presence_stats": {"channel": "chat:p"}}));
    assert_eq!(stats["presence_stats"], json!({"num_clients": 1, "num_users": 1}), "{stats}");
    // Publishing needs a subscription in chat:, and is refused in presence:.
    assert_eq!(b.call(json!({"publish": {"channel": "chat:p", "data": {}}}))["error"]["code"], 103);
    assert_eq!(a.call(json!({"publish": {"channel": "presence:x", "data": {}}}))["error"]["code"], 103);
    assert_eq!(a.call(json!({"publish": {"channel": "chat:p"}}))["error"]["code"], 107);
}

#[test]
fn a_thousand_subscribers_on_three_gateways_cost_three_router_sends_per_publication() {
    let c = Cluster::start(1, 3, &[]);
    let members = 1000usize;
    let mut subs: Vec<e2e::Ws> = (0..members).map(|i| c.client(i % 3, &format!("m{i}"))).collect::<Vec<_>>();
    for ws in subs.iter_mut() {
        subscribe_ok(ws, "chat:all-hands");
    }
    let router_metrics = || c.router_metrics(0);
    let sends_before = metric(&router_metrics(), "switchyard_router_gateway_sends_total");
    let n = 5u64;
    for i in 0..n {
        let (st, body) = c.api(0, "publish", &json!({"channel": "chat:all-hands", "data": {"n": i}}));
        assert_eq!(st, 200, "{body}");
    }
    for ws in subs.iter_mut() {
        for offset in 1..=n {
            let v = ws.next_pub().expect("publication");
            assert_eq!(v["push"]["pub"]["offset"], offset, "{v}");
            assert_eq!(v["push"]["pub"]["data"], json!({"n": offset - 1}), "{v}");
        }
    }
    let m = router_metrics();
    let sends = metric(&m, "switchyard_router_gateway_sends_total") - sends_before;
    assert_eq!(sends, 3 * n, "one send per gateway per publication, whatever the membership: {m}");
    for g in 0..3 {
        let m = c.metrics(g);
        assert_eq!(metric(&m, "switchyard_gateway_publications_in_total"), n, "{m}");
        let encoded = metric(&m, "switchyard_gateway_frames_encoded_total");
        assert!((1..=n).contains(&encoded), "{m}");
        // Each member on this gateway got each encoded frame once.
        let here = (0..members).filter(|i| i % 3 == g).count() as u64;
        assert_eq!(metric(&m, "switchyard_gateway_deliveries_total"), here * encoded, "{m}");
    }
}

#[test]
fn compressing_clients_share_one_deflated_frame_per_publication() {
    // One core, so "one twin per frame and core" is one per frame here.
    let c = Cluster::start(1, 1, &["--deflate", "--cores", "1"]);
    let connect = |deflate: bool, user: &str| {
        let mut ws = e2e::Ws::connect_with(c.ws_addrs[0], "/connection/websocket", deflate).expect("upgrade");
        assert_eq!(ws.deflate.is_some(), deflate);
        let r = ws.call(json!({"connect": {"token": e2e::token(user), "name": "e2e"}}));
        assert!(r["connect"]["client"].is_string(), "{r}");
        ws
    };
    let mut clients: Vec<(e2e::Ws, bool)> = (0..4).map(|i| (connect(true, &format!("z{i}")), true)).collect();
    clients.push((connect(false, "plain"), false));
    for (ws, _) in &mut clients {
        subscribe_ok(ws, "chat:zip");
    }
    let before = c.metrics(0);
    let start: Vec<(usize, usize)> = clients.iter().map(|(ws, _)| (ws.frames, ws.compressed)).collect();
    let text = "the quick brown fox jumps over the lazy dog, ".repeat(20);
    let n = 30u64;
    for i in 0..n {
        let (st, body) = c.api(0, "publish", &json!({"channel": "chat:zip", "data": {"n": i, "text": text}}));
        assert_eq!(st, 200, "{body}");
    }
    let mut frames_seen = Vec::new();
    for ((ws, deflate), (frames0, compressed0)) in clients.iter_mut().zip(start) {
        for i in 0..n {
            let p = ws.next_pub().expect("publication");
            assert_eq!(p["push"]["pub"]["data"]["n"], i, "{p}");
            assert_eq!(p["push"]["pub"]["data"]["text"], text.as_str());
        }
        let (frames, compressed) = (ws.frames - frames0, ws.compressed - compressed0);
        frames_seen.push(frames);
        if *deflate {
            assert_eq!(compressed, frames, "every publication frame compressed");
        } else {
            assert_eq!(ws.compressed, 0, "a client without permessage-deflate gets plain frames");
        }
    }
    let after = c.metrics(0);
    let delta = |name: &str| metric(&after, name) - metric(&before, name);
    let encoded = delta("switchyard_gateway_frames_encoded_total");
    assert!((1..=n).contains(&encoded), "{after}");
    // Each client got each encoded frame once (plain or as its twin).
    assert_eq!(frames_seen, vec![encoded as usize; clients.len()], "{after}");
    // Four compressing recipients, one compressed twin per frame.
    assert_eq!(delta("switchyard_gateway_frames_deflated_total"), encoded, "{after}");
}

#[test]
fn later_subscribers_are_answered_from_the_position_the_gateway_follows() {
    let c = Cluster::start(1, 1, &[]);
    let local = |c: &Cluster| metric(&c.metrics(0), "switchyard_gateway_local_subscribes_total");
    let core_of = |user: &str| (proto::rendezvous::stable_hash(user.as_bytes()) % 2) as usize;
    let users: Vec<String> = (0..).map(|i| format!("late{i}")).take(40).collect();
    let on = |core: usize| users.iter().filter(move |u| core_of(u) == core);
    let mut publisher = c.client(0, "pub");
    let r = subscribe_ok(&mut publisher, "chat:pos");
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    for i in 0..3 {
        publish(&mut publisher, "chat:pos", i);
    }
    for _ in 0..3 {
        publisher.next_pub().unwrap();
    }
    // One subscriber per core first: a core that had no subscriber of the
    // channel learns its position as it asks the router for its first one.
    let mut subs = Vec::new();
    for core in 0..2 {
        let mut ws = c.client(0, on(core).next().unwrap());
        assert_eq!(subscribe_ok(&mut ws, "chat:pos")["subscribe"]["offset"], 3);
        subs.push(ws);
    }
    let before = local(&c);
    // Every later subscribe on either core is answered by the gateway itself.
    for core in 0..2 {
        for user in on(core).skip(1).take(3) {
            let mut ws = c.client(0, user);
            let r = subscribe_ok(&mut ws, "chat:pos");
            assert_eq!(r["subscribe"]["offset"], 3, "{r}");
            assert_eq!(r["subscribe"]["epoch"], epoch.as_str(), "{r}");
            assert_eq!(r["subscribe"]["recoverable"], true, "{r}");
            subs.push(ws);
        }
    }
    // A recovery from the top recovers nothing, completely: answered here too.
    let mut at_top = c.client(0, on(0).nth(4).unwrap());
    let r = at_top
        .call(json!({"subscribe": {"channel": "chat:pos", "recover": true, "epoch": epoch, "offset": 3}}));
    assert_eq!(
        (r["subscribe"]["recovered"].clone(), r["subscribe"]["offset"].clone()),
        (json!(true), json!(3)),
        "{r}"
    );
    subs.push(at_top);
    assert_eq!(local(&c) - before, 7, "six subscribes and one recovery answered without a router");
    // A recovery that needs history still goes to the router.
    let mut behind = c.client(0, on(1).nth(4).unwrap());
    let r = behind
        .call(json!({"subscribe": {"channel": "chat:pos", "recover": true, "epoch": epoch, "offset": 1}}));
    let offsets: Vec<u64> = r["subscribe"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![2, 3], "{r}");
    assert_eq!(local(&c) - before, 7);
    subs.push(behind);
    // Everybody continues from where they were answered: exactly 4, 5, 6.
    for i in 3..6 {
        publish(&mut publisher, "chat:pos", i);
    }
    for ws in subs.iter_mut() {
        let got: Vec<u64> =
            (0..3).map(|_| ws.next_pub().unwrap()["push"]["pub"]["offset"].as_u64().unwrap()).collect();
        assert_eq!(got, vec![4, 5, 6]);
    }
}

/// Where a publication's time goes, hop by hop, is in `/metrics`: every
/// hop between the API and the last socket write counted each publication.
#[test]
fn every_hop_from_the_api_to_the_last_write_is_measured() {
    let c = Cluster::start(1, 1, &[]);
    c.settle();
    let mut subs: Vec<e2e::Ws> = (0..4).map(|i| c.client(0, &format!("hop-{i}"))).collect();
    for ws in subs.iter_mut() {
        subscribe_ok(ws, "chat:hops");
    }
    for n in 0..10 {
        let (st, body) = c.api(0, "publish", &json!({"channel": "chat:hops", "data": {"n": n}}));
        assert_eq!(st, 200, "{body}");
        for ws in subs.iter_mut() {
            assert_eq!(ws.next_pub().unwrap()["push"]["pub"]["data"]["n"], n);
        }
    }
    let count = |text: &str, name: &str, hop: &str| metric(text, &format!("{name}_count{{hop=\"{hop}\"}}"));
    let router = c.router_metrics(0);
    assert_eq!(count(&router, "switchyard_router_hop_seconds", "api_to_shard"), 10, "{router}");
    let written = count(&router, "switchyard_router_hop_seconds", "shard_to_link_write");
    assert!((1..=10).contains(&written), "one per written batch: {written}");
    let gw = c.metrics(0);
    let hop = "switchyard_gateway_hop_seconds";
    // One stamp per batch the router wrote (the gateway reads them all).
    let link = count(&gw, hop, "link");
    assert!((1..=10).contains(&link), "{link}: {gw}");
    // Each publication reached one or both cores (the users hash to cores).
    let to_core = count(&gw, hop, "uplink_to_core");
    assert!((10..=20).contains(&to_core), "{to_core}");
    let (first, last) = (count(&gw, hop, "core_to_first_write"), count(&gw, hop, "core_to_last_write"));
    assert!(first >= 1 && first == last && first <= to_core, "{first} {last} {to_core}");
}

/// The first subscriber of a busy channel on a gateway is answered at a
/// position its gateway's stream continues, and stays subscribed:
/// - the gateway registers its interest with the router before it asks for
///   the answer, so the publications between the two reach it (asked the
///   other way round, one landing between the answer and the registration
///   left a hole);
/// - a packed run of publications that straddles the answer's position is
///   cut to the ones after it (it used to resync).
///
/// Either way the subscriber was told to resubscribe (unsubscribe push
/// 2500) right after it subscribed: 1 to 3 of these 40 in every run.
#[test]
fn the_first_subscriber_of_a_busy_channel_is_not_sent_back_to_resubscribe() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    let c = Cluster::start(1, 1, &[]);
    c.settle();
    const CHANNELS: usize = 40;
    // Four publishers hammer the channel being subscribed (bounded: 50,000
    // publications each or 120 s).
    let stop = Arc::new(AtomicBool::new(false));
    let target = Arc::new(AtomicUsize::new(0));
    let publishers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, target, api) = (stop.clone(), target.clone(), c.api_addrs[0]);
            std::thread::spawn(move || {
                let mut conn = e2e::ApiConn::connect(api);
                let mut n = 0u64;
                let end = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && n < 50_000 && Instant::now() < end {
                    let ch = format!("chat:busy{}", target.load(Ordering::Relaxed));
                    let (st, v) = conn.call("publish", &json!({"channel": ch, "data": {"n": n}}));
                    assert_eq!(st, 200, "{v}");
                    n += 1;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut sent_back = Vec::new();
    for k in 0..CHANNELS {
        let ch = format!("chat:busy{k}");
        target.store(k, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        let mut ws = c.client(0, &format!("busy{k}"));
        let r = subscribe_ok(&mut ws, &ch);
        let mut offset = r["subscribe"]["offset"].as_u64().unwrap();
        // Its next publications follow the answer without a hole.
        let mut got = 0;
        let end = Instant::now() + Duration::from_secs(10);
        while got < 5 {
            let Some(e) = ws.event_by(end, "publications") else { panic!("{ch}: no publication") };
            let e2e::Event::Json(v) = e else { continue };
            let push = &v["push"];
            if push.get("unsubscribe").is_some() {
                sent_back.push(format!("{ch} after offset {offset}: {v}"));
                break;
            }
            if let Some(o) = push["pub"]["offset"].as_u64() {
                assert_eq!(o, offset + 1, "{ch}: {v}");
                offset = o;
                got += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let published: u64 = publishers.into_iter().map(|p| p.join().unwrap()).sum();
    let m = c.metrics(0);
    let resynced = metric(&m, "switchyard_gateway_subscriptions_resynced_total");
    assert!(
        sent_back.is_empty(),
        "{} of {CHANNELS} first subscribers sent back ({published} published): {sent_back:#?}",
        sent_back.len()
    );
    assert_eq!(resynced, 0, "no subscription was sent back later either");
    println!("{published} published; run tails cut: {}", metric(&m, "switchyard_gateway_frames_cut_total"));
}
