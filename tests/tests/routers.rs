//! Three routers, two gateways: channels spread over the routers by
//! rendezvous hash, the HTTP API reaches each channel's owner from any
//! router, per-channel order holds across gateways, and a router that drains
//! (SIGTERM) hands its channels over with an explicit resync, never a silent
//! gap. Also join/leave pushes where a namespace enables them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use e2e::{Cluster, Event, Ws, http_get, metric};
use proto::rendezvous::ranked;
use serde_json::{Value, json};

/// What one client saw of one channel.
#[derive(Debug, Default)]
struct Stream {
    epoch: String,
    last: u64,
    /// The `i` of every publication received, in order.
    data: Vec<u64>,
    /// Times the server said `recovered: false` (an explicit, allowed gap).
    told: u32,
}

/// A client subscribed to some channels, checking every push as it comes:
/// offsets consecutive within an epoch, and an epoch change only after the
/// server said the position was not recovered.
struct Subscriber {
    ws: Ws,
    streams: HashMap<String, Stream>,
}

impl Subscriber {
    fn new(ws: Ws, channels: &[String]) -> Subscriber {
        let mut s = Subscriber { ws, streams: HashMap::new() };
        for ch in channels {
            let r = s.ws.call(json!({"subscribe": {"channel": ch, "recover": true}}));
            assert!(r.get("error").is_none(), "{r}");
            let st = s.streams.entry(ch.clone()).or_default();
            st.epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
            st.last = r["subscribe"]["offset"].as_u64().unwrap_or(0);
        }
        s
    }

    fn apply(&mut self, channel: &str, p: &Value) {
        let st = self.streams.get_mut(channel).expect("subscribed channel");
        let offset = p["offset"].as_u64().unwrap();
        assert_eq!(offset, st.last + 1, "{channel}: no gap, duplicate or reordering within an epoch");
        st.last = offset;
        st.data.push(p["data"]["i"].as_u64().unwrap());
    }

    /// Resubscribes after an `unsubscribe` 2500 push, recovering from the
    /// last position; retries while no router is available.
    fn resubscribe(&mut self, channel: &str) {
        let (epoch, last) = {
            let st = &self.streams[channel];
            (st.epoch.clone(), st.last)
        };
        let mut r = Value::Null;
        for _ in 0..100 {
            r = self.ws.call(
                json!({"subscribe": {"channel": channel, "recover": true, "epoch": epoch, "offset": last}}),
            );
            if r["error"]["temporary"] != true {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(r.get("error").is_none(), "{r}");
        let sub = &r["subscribe"];
        if sub["recovered"] == true {
            for p in sub["publications"].as_array().cloned().unwrap_or_default() {
                self.apply(channel, &p);
            }
        } else {
            let st = self.streams.get_mut(channel).unwrap();
            st.told += 1;
            st.epoch = sub["epoch"].as_str().unwrap().to_owned();
            st.last = sub["offset"].as_u64().unwrap_or(0);
        }
    }

    /// Handles pushes until `done` holds or `timeout` passes.
    fn pump(&mut self, timeout: Duration, done: impl Fn(&HashMap<String, Stream>) -> bool) -> bool {
        let end = Instant::now() + timeout;
        while !done(&self.streams) {
            if Instant::now() > end {
                return false;
            }
            let Some(ev) = self.ws.next_event() else { continue };
            let Event::Json(v) = ev else { panic!("unexpected {ev:?}") };
            let push = &v["push"];
            let Some(channel) = push["channel"].as_str().map(str::to_owned) else { continue };
            if let Some(p) = push.get("pub") {
                self.apply(&channel, p);
            } else if push["unsubscribe"]["code"] == 2500 {
                self.resubscribe(&channel);
            }
        }
        true
    }
}

fn publish(c: &Cluster, router: usize, channel: &str, i: u64) {
    let (st, body) = c.api(router, "publish", &json!({"channel": channel, "data": {"i": i}}));
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["result"]["offset"].as_u64().is_some(), "{v}");
}

fn router_metric(c: &Cluster, r: usize, name: &str) -> u64 {
    metric(&http_get(c.api_addrs[r], "/metrics"), name)
}

/// Waits until every router sees its peers ready and every gateway is
/// linked to every router (both compute owners over what they see).
fn settle(c: &Cluster) {
    let n = c.routers.len() as u64;
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let routers =
            (0..c.routers.len()).all(|r| router_metric(c, r, "switchyard_router_peers_ready") == n - 1);
        let gateways =
            (0..c.gateways.len()).all(|g| metric(&c.metrics(g), "switchyard_gateway_routers_up") == n);
        if routers && gateways {
            return;
        }
        assert!(Instant::now() < end, "the cluster did not settle");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn three_routers_order_every_channel_across_two_gateways() {
    let c = Cluster::start(3, 2, &[]);
    settle(&c);
    let channels: Vec<String> = (0..9).map(|i| format!("chat:spread-{i}")).collect();
    let mut a = Subscriber::new(c.client(0, "ann"), &channels);
    let mut b = Subscriber::new(c.client(1, "ben"), &channels);
    let per_channel = 15u64;
    for i in 0..per_channel {
        for (k, ch) in channels.iter().enumerate() {
            // Any router takes any channel's call; non-owners forward it.
            publish(&c, (i as usize + k) % 3, ch, i);
        }
    }
    let all = |s: &HashMap<String, Stream>| s.values().all(|st| st.data.len() as u64 == per_channel);
    assert!(a.pump(Duration::from_secs(30), all), "ann got everything");
    assert!(b.pump(Duration::from_secs(30), all), "ben got everything");
    for s in [&a, &b] {
        for (ch, st) in &s.streams {
            assert_eq!(st.data, (0..per_channel).collect::<Vec<_>>(), "{ch} in publish order");
            assert_eq!(st.told, 0);
        }
    }
    // Each publication was ordered by exactly one router (plus one presence
    // change each for ann and ben, on presence:<user>), and the channels
    // spread over more than one router.
    let pubs: Vec<u64> =
        (0..3).map(|r| router_metric(&c, r, "switchyard_router_publications_total")).collect();
    assert_eq!(pubs.iter().sum::<u64>(), per_channel * channels.len() as u64 + 2, "{pubs:?}");
    assert!(pubs.iter().filter(|n| **n > 0).count() >= 2, "{pubs:?}");
    // And crossed to each of the two gateways once.
    let sends: u64 = (0..3).map(|r| router_metric(&c, r, "switchyard_router_gateway_sends_total")).sum();
    assert_eq!(sends, 2 * per_channel * channels.len() as u64);
}

#[test]
fn a_draining_router_hands_its_channels_over_without_a_silent_gap() {
    let mut c = Cluster::start_with(3, 2, &["--drain-secs", "3"], &[]);
    settle(&c);
    // Channels of the router that will drain, and channels of the others,
    // as the gateways and routers compute ownership.
    let names: Vec<String> = c.router_addrs.iter().map(|a| a.to_string()).collect();
    let owner = |ch: &str| ranked(ch, &names)[0];
    let moved: Vec<String> =
        (0..).map(|i| format!("chat:drain-{i}")).filter(|c| owner(c) == 1).take(3).collect();
    let stay: Vec<String> =
        (0..).map(|i| format!("chat:drain-{i}")).filter(|c| owner(c) != 1).take(3).collect();
    let channels: Vec<String> = moved.iter().chain(&stay).cloned().collect();
    let mut a = Subscriber::new(c.client(0, "ann"), &channels);
    let mut b = Subscriber::new(c.client(1, "ben"), &channels);
    let survivors = [0usize, 2];

    let mut i = 0u64;
    let round = |c: &Cluster, i: &mut u64| {
        for ch in &channels {
            publish(c, survivors[*i as usize % 2], ch, *i);
        }
        *i += 1;
    };
    for _ in 0..5 {
        round(&c, &mut i);
    }
    let upto = |n: usize| move |s: &HashMap<String, Stream>| s.values().all(|st| st.data.len() >= n);
    assert!(a.pump(Duration::from_secs(30), upto(5)));
    assert!(b.pump(Duration::from_secs(30), upto(5)));

    c.routers[1].signal(15);
    let end = Instant::now() + Duration::from_secs(5);
    while !http_get(c.api_addrs[1], "/readyz").contains("draining") {
        assert!(Instant::now() < end, "a draining router is not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Traffic goes on while the channels move.
    for _ in 0..5 {
        round(&c, &mut i);
    }
    let told = |moved: Vec<String>| move |s: &HashMap<String, Stream>| moved.iter().all(|ch| s[ch].told >= 1);
    assert!(a.pump(Duration::from_secs(30), told(moved.clone())), "ann is told to resync the moved channels");
    assert!(b.pump(Duration::from_secs(30), told(moved.clone())), "ben is told to resync the moved channels");
    assert_eq!(c.routers[1].wait_exit(Duration::from_secs(20)), Some(0), "a drained router exits 0");

    // Once settled, everything published reaches everyone, in order.
    let from = i;
    for _ in 0..5 {
        round(&c, &mut i);
    }
    let last = i - 1;
    let done = move |s: &HashMap<String, Stream>| s.values().all(|st| st.data.last() == Some(&last));
    assert!(a.pump(Duration::from_secs(30), done), "ann gets what was published after the move");
    assert!(b.pump(Duration::from_secs(30), done), "ben gets what was published after the move");
    for s in [&a, &b] {
        for (ch, st) in &s.streams {
            let tail: Vec<u64> = st.data.iter().copied().filter(|d| *d >= from).collect();
            assert_eq!(tail, (from..i).collect::<Vec<_>>(), "{ch}: nothing lost after the hand-over");
            if stay.contains(ch) {
                assert_eq!(st.data, (0..i).collect::<Vec<_>>(), "{ch}: untouched by the drain");
                assert_eq!(st.told, 0, "{ch}: no needless resync");
            }
        }
    }
}

#[test]
fn join_and_leave_pushes_where_the_namespace_enables_them() {
    let cfg = std::env::temp_dir().join(format!("sy-jl-{}.toml", std::process::id()));
    let ns = "[namespaces.namespaces.room]\njoin_leave = true\npresence = true\n";
    std::fs::write(&cfg, ns).unwrap();
    let path = cfg.to_str().unwrap();
    let c = Cluster::start_with(1, 2, &["--config", path], &["--config", path]);
    let mut ann = c.client(0, "ann");
    let r = ann.call(json!({"subscribe": {"channel": "room:1"}}));
    assert!(r.get("error").is_none(), "{r}");
    let mut ben = c.client(1, "ben");
    let r = ben.call(json!({"subscribe": {"channel": "room:1"}}));
    assert!(r.get("error").is_none(), "{r}");
    // Ann sees her own join too (as in Centrifugo), then Ben's.
    let next = |ws: &mut Ws, kind: &str, user: &str| -> Value {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Some(Event::Json(v)) = ws.next_event()
                && v["push"][kind]["info"]["user"] == user
            {
                return v;
            }
        }
        panic!("no {kind} push for {user}");
    };
    let j = next(&mut ann, "join", "ben");
    assert_eq!(j["push"]["channel"], "room:1");
    assert!(j["push"]["join"]["info"]["client"].is_string(), "{j}");
    drop(ben);
    let l = next(&mut ann, "leave", "ben");
    assert_eq!(l["push"]["leave"]["info"]["user"], "ben");
    let _ = std::fs::remove_file(&cfg);
}
