//! Three routers, two gateways: channels spread over the routers by
//! rendezvous hash, the HTTP API reaches each channel's owner from any
//! router, per-channel order holds across gateways, and a router that drains
//! (SIGTERM) hands its channels over with an explicit resync, never a silent
//! gap. Also join/leave pushes where a namespace enables them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use e2e::{
    Cluster, Event, Published, StreamCheck, Ws, call_retrying, http_get, metric, router_name, wait_until,
};
use proto::rendezvous::ranked;
use serde_json::{Value, json};

/// A client subscribed to some channels, checking every push as it comes
/// with one [`StreamCheck`] per channel: offsets consecutive from the
/// position (each once, in order), a resubscribe on `unsubscribe` 2500 that
/// either recovers exactly or is told explicitly (`recovered: false`), and
/// nothing for a channel it is not subscribed to.
struct Subscriber {
    ws: Ws,
    streams: HashMap<String, StreamCheck>,
}

impl Subscriber {
    fn new(mut ws: Ws, channels: &[String]) -> Subscriber {
        let streams = channels.iter().map(|ch| (ch.clone(), StreamCheck::subscribe(&mut ws, ch))).collect();
        Subscriber { ws, streams }
    }

    /// Handles pushes until `done` holds or `timeout` passes. A close or an
    /// ended connection fails the test.
    fn pump(&mut self, timeout: Duration, done: impl Fn(&HashMap<String, StreamCheck>) -> bool) -> bool {
        let end = Instant::now() + timeout;
        while !done(&self.streams) {
            let Some(ev) = self.ws.event_by(end, "publications") else { return false };
            let Event::Json(v) = ev else { panic!("unexpected {ev:?}") };
            let push = &v["push"];
            let Some(channel) = push["channel"].as_str() else { continue };
            let st = self.streams.get_mut(channel).unwrap_or_else(|| panic!("a push for {channel}: {v}"));
            if let Some(p) = push.get("pub") {
                st.publication(p);
            } else if push["unsubscribe"]["code"] == 2500 {
                let r = call_retrying(&mut self.ws, st.recover_command());
                st.resubscribed(&r);
            } else {
                panic!("unexpected push {v}");
            }
        }
        true
    }
}

/// The `i` of every publication a stream received, in order.
fn indices(st: &StreamCheck) -> Vec<u64> {
    st.data().iter().map(|d| d["i"].as_u64().unwrap()).collect()
}

fn publish(c: &Cluster, published: &mut Published, router: usize, channel: &str, i: u64) {
    published.publish(c.api_addrs[router], channel, json!({"i": i}));
}

fn router_metric(c: &Cluster, r: usize, name: &str) -> u64 {
    metric(&c.router_metrics(r), name)
}

fn settle(c: &Cluster) {
    c.settle();
}

#[test]
fn three_routers_order_every_channel_across_two_gateways() {
    let c = Cluster::start(3, 2, &[]);
    settle(&c);
    let channels: Vec<String> = (0..9).map(|i| format!("chat:spread-{i}")).collect();
    let mut a = Subscriber::new(c.client(0, "ann"), &channels);
    let mut b = Subscriber::new(c.client(1, "ben"), &channels);
    let mut published = Published::default();
    let per_channel = 15u64;
    for i in 0..per_channel {
        for (k, ch) in channels.iter().enumerate() {
            // Any router takes any channel's call; non-owners forward it.
            publish(&c, &mut published, (i as usize + k) % 3, ch, i);
        }
    }
    let all = |s: &HashMap<String, StreamCheck>| s.values().all(|st| st.received.len() as u64 == per_channel);
    assert!(a.pump(Duration::from_secs(30), all), "ann got everything");
    assert!(b.pump(Duration::from_secs(30), all), "ben got everything");
    for s in [&a, &b] {
        for (ch, st) in &s.streams {
            assert_eq!(indices(st), (0..per_channel).collect::<Vec<_>>(), "{ch} in publish order");
            assert_eq!(st.offsets(), (1..=per_channel).collect::<Vec<_>>(), "{ch}");
            assert_eq!((st.unrecovered, st.recoveries), (0, 0), "{ch}: no resync");
            st.verify(&published);
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
    let mut published = Published::default();

    let mut i = 0u64;
    let round = |c: &Cluster, published: &mut Published, i: &mut u64| {
        for ch in &channels {
            publish(c, published, survivors[*i as usize % 2], ch, *i);
        }
        *i += 1;
    };
    for _ in 0..5 {
        round(&c, &mut published, &mut i);
    }
    let upto = |n: usize| move |s: &HashMap<String, StreamCheck>| s.values().all(|st| st.received.len() >= n);
    assert!(a.pump(Duration::from_secs(30), upto(5)));
    assert!(b.pump(Duration::from_secs(30), upto(5)));

    c.routers[1].signal(15);
    wait_until(
        Duration::from_secs(5),
        "a draining router's /readyz",
        || http_get(c.api_addrs[1], "/readyz"),
        |r| r.contains("draining"),
    );
    // Traffic goes on while the channels move.
    for _ in 0..5 {
        round(&c, &mut published, &mut i);
    }
    let told = |moved: Vec<String>| {
        move |s: &HashMap<String, StreamCheck>| moved.iter().all(|ch| s[ch].unrecovered >= 1)
    };
    assert!(a.pump(Duration::from_secs(30), told(moved.clone())), "ann is told to resync the moved channels");
    assert!(b.pump(Duration::from_secs(30), told(moved.clone())), "ben is told to resync the moved channels");
    assert_eq!(c.routers[1].wait_exit(Duration::from_secs(20)), Some(0), "a drained router exits 0");

    // Once settled, everything published reaches everyone, in order.
    let from = i;
    for _ in 0..5 {
        round(&c, &mut published, &mut i);
    }
    let last = i - 1;
    let done = move |s: &HashMap<String, StreamCheck>| {
        s.values().all(|st| st.received.last().is_some_and(|r| r.data["i"] == last))
    };
    assert!(a.pump(Duration::from_secs(30), done), "ann gets what was published after the move");
    assert!(b.pump(Duration::from_secs(30), done), "ben gets what was published after the move");
    for s in [&a, &b] {
        for (ch, st) in &s.streams {
            // Every payload is what was published at its epoch and offset,
            // and the client is at the top of its channel's current epoch.
            st.verify(&published);
            let got = indices(st);
            let tail: Vec<u64> = got.iter().copied().filter(|d| *d >= from).collect();
            assert_eq!(tail, (from..i).collect::<Vec<_>>(), "{ch}: nothing lost after the hand-over");
            if stay.contains(ch) {
                assert_eq!(got, (0..i).collect::<Vec<_>>(), "{ch}: untouched by the drain");
                assert_eq!(st.offsets(), (1..=i).collect::<Vec<_>>(), "{ch}");
                assert_eq!((st.unrecovered, st.recoveries), (0, 0), "{ch}: no needless resync");
            } else {
                // What a moved channel's client missed is explicit: it was
                // told (recovered:false), and its indices only jump there.
                assert!(st.unrecovered >= 1, "{ch}");
                assert_eq!(got.first(), Some(&0), "{ch}");
                assert!(got.windows(2).all(|w| w[0] < w[1]), "{ch}: once, in publish order: {got:?}");
                let jumps = got.windows(2).filter(|w| w[1] != w[0] + 1).count();
                assert!(jumps <= st.unrecovered as usize, "{ch}: a gap it was not told about: {got:?}");
            }
        }
    }
}

#[test]
fn join_and_leave_pushes_where_the_namespace_enables_them() {
    let cfg = std::env::temp_dir().join(format!("sy-jl-{}.toml", std::process::id()));
    let ns = "[namespaces.namespaces.room]\njoin_leave = true\npresence = true\n[namespaces.namespaces.quiet]\njoin_leave = false\npresence = true\n";
    std::fs::write(&cfg, ns).unwrap();
    let path = cfg.to_str().unwrap();
    let c = Cluster::start_with(1, 2, &["--config", path], &["--config", path]);
    // quiet: has presence but no join/leave; room: has both.
    let mut ann = c.client(0, "ann");
    let mut ben = c.client(1, "ben");
    for ws in [&mut ann, &mut ben] {
        for ch in ["quiet:1", "room:1"] {
            let r = ws.call(json!({"subscribe": {"channel": ch}}));
            assert!(r.get("error").is_none(), "{r}");
        }
    }
    // Ann sees her own join too (as in Centrifugo), then Ben's, then his
    // leave when he goes, and nothing of the kind on quiet:1.
    let mut seen: Vec<(String, String, String)> = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    let record = |v: &Value, seen: &mut Vec<_>| {
        for kind in ["join", "leave"] {
            if let Some(info) = v["push"].get(kind) {
                assert!(info["info"]["client"].is_string(), "{v}");
                let user = info["info"]["user"].as_str().unwrap().to_owned();
                seen.push((v["push"]["channel"].as_str().unwrap().to_owned(), kind.to_owned(), user));
            }
        }
    };
    let room = |kind: &str, user: &str| ("room:1".to_owned(), kind.to_owned(), user.to_owned());
    while seen.len() < 2 {
        match ann.event_by(end, "join pushes") {
            Some(Event::Json(v)) => record(&v, &mut seen),
            other => panic!("no join pushes (so far {seen:?}): {other:?}"),
        }
    }
    assert_eq!(seen, [room("join", "ann"), room("join", "ben")]);
    drop(ben);
    while seen.len() < 3 {
        match ann.event_by(end, "a leave push") {
            Some(Event::Json(v)) => record(&v, &mut seen),
            other => panic!("no leave push (so far {seen:?}): {other:?}"),
        }
    }
    assert_eq!(seen[2], room("leave", "ben"));
    // A publication on quiet:1, made after Ben's leave reached Ann: a
    // join or leave of quiet:1 (Ben's subscribe, his disconnect) would
    // have come from the same channel's owner before it.
    let (st, body) = c.api(0, "publish", &json!({"channel": "quiet:1", "data": {"sentinel": true}}));
    assert_eq!(st, 200, "{body}");
    loop {
        match ann.event_by(end, "the quiet:1 publication") {
            Some(Event::Json(v)) if v["push"]["channel"] == "quiet:1" && v["push"]["pub"].is_object() => {
                break;
            }
            Some(Event::Json(v)) => record(&v, &mut seen),
            other => panic!("no quiet:1 publication: {other:?}"),
        }
    }
    assert_eq!(seen.len(), 3, "join/leave only where the namespace enables them: {seen:?}");
    let _ = std::fs::remove_file(&cfg);
}

/// Each router has a name and a certificate for that name only. A gateway
/// that lists router 0's name at router 1's address refuses router 1 (its
/// certificate is not router 0's) and is served by the genuine router 0; a
/// router calling router 0 as a peer with a certificate that is not one of
/// router 0's peers' is refused by router 0; a router expecting router 1 at
/// router 0's address refuses router 0's certificate. The cluster itself
/// stays whole throughout.
#[test]
fn a_router_with_another_routers_certificate_is_refused_by_gateways_and_peers() {
    let mut c = Cluster::start(2, 1, &[]);
    settle(&c);
    let (n0, n1) = (router_name(0), router_name(1));
    let (a0, a1) = (c.router_addrs[0], c.router_addrs[1]);

    c.add_gateway_routed(1, &[format!("{n0}@{a0}"), format!("{n0}@{a1}")], &[]);
    wait_until(
        Duration::from_secs(30),
        "the gateway refuses router 1 posing as router 0",
        || metric(&c.metrics(1), "switchyard_gateway_router_link_refusals_total"),
        |n| *n >= 2,
    );
    assert_eq!(metric(&c.metrics(1), "switchyard_gateway_routers_up"), 1, "only the genuine router 0");
    assert_eq!(router_metric(&c, 1, "switchyard_router_gateway_links"), 1, "router 1 serves only gateway 0");
    // The refusing gateway's clients are served by router 0 (on a channel
    // router 0 owns: this gateway knows no other router).
    let names = [a0.to_string(), a1.to_string()];
    let channel = (0..).map(|i| format!("chat:identity-{i}")).find(|ch| ranked(ch, &names)[0] == 0).unwrap();
    let mut ws = c.client(1, "careful");
    let mut st = StreamCheck::subscribe(&mut ws, &channel);
    let mut published = Published::default();
    let top = published.publish(c.api_addrs[1], &channel, serde_json::json!({"n": 1}));
    st.receive_through(&mut ws, top);
    st.verify(&published);

    // A stranger (the development certificate, `localhost`) calling router 0.
    let (_stranger, stranger_admin) = c.spawn_stray_router("localhost", &[format!("{n0}@{a0}")]);
    wait_until(
        Duration::from_secs(30),
        "router 0 refuses a caller that is not its peer",
        || router_metric(&c, 0, "switchyard_router_peer_refusals_total"),
        |n| *n >= 2,
    );
    assert_eq!(metric(&http_get(stranger_admin, "/metrics"), "switchyard_router_peers_ready"), 0);

    // A router that expects router 1 at router 0's address.
    let (_fooled, fooled_admin) = c.spawn_stray_router(&n1, &[format!("{n1}@{a0}")]);
    let failures = wait_until(
        Duration::from_secs(30),
        "router 0's certificate is refused for router 1's name",
        || metric(&http_get(fooled_admin, "/metrics"), "switchyard_router_peer_call_failures_total"),
        |n| *n >= 2,
    );
    assert!(failures >= 2);
    assert_eq!(metric(&http_get(fooled_admin, "/metrics"), "switchyard_router_peers_ready"), 0);

    // The cluster's own routers still see each other.
    for r in 0..2 {
        assert_eq!(router_metric(&c, r, "switchyard_router_peers_ready"), 1, "router {r}");
    }
}
