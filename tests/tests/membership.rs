//! Routers on etcd (Debian's etcd-server, started by the test): membership
//! and ownership from one view, fencing by lease, and gateways that follow
//! the same view.
//!
//! - A router stopped (SIGSTOP) past its lease loses its channels to the
//!   others while publishes continue: no acknowledged publication is lost
//!   silently or acknowledged twice, and each move starts a new epoch that
//!   never repeats an old one.
//! - A fifth router joining four moves exactly the channels the rendezvous
//!   hash moves (about a fifth), and no other.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::{Cluster, Etcd, Event, Published, StreamCheck, Ws, call_retrying, metric, wait_until};
use proto::rendezvous::owner;
use serde_json::json;

fn router_metric(c: &Cluster, r: usize, name: &str) -> u64 {
    metric(&c.router_metrics(r), name)
}

/// Waits until every router in `live` sees exactly those routers in its
/// view under a live lease, and every gateway is linked to all of them.
fn settled(c: &Cluster, live: &[usize]) {
    let n = live.len() as u64;
    wait_until(
        Duration::from_secs(60),
        "the membership settles",
        || {
            let routers: Vec<(u64, u64)> = live
                .iter()
                .map(|&r| {
                    let m = c.router_metrics(r);
                    (
                        metric(&m, "switchyard_router_membership_routers"),
                        metric(&m, "switchyard_router_lease_live"),
                    )
                })
                .collect();
            let gateways: Vec<(u64, u64)> = (0..c.gateways.len())
                .map(|g| {
                    let m = c.metrics(g);
                    (
                        metric(&m, "switchyard_gateway_routers_known"),
                        metric(&m, "switchyard_gateway_routers_up"),
                    )
                })
                .collect();
            (routers, gateways)
        },
        |(r, g)| r.iter().all(|&v| v == (n, 1)) && g.iter().all(|&v| v == (n, n)),
    );
}

/// Where each channel's stream must end: its last epoch and offset.
type Goal = HashMap<String, (String, u64)>;

/// A subscriber pumping in its own thread (so it answers pings and
/// resyncs while the test publishes), until told the final position of
/// every channel.
struct Pump {
    target: Arc<Mutex<Option<Goal>>>,
    handle: std::thread::JoinHandle<HashMap<String, StreamCheck>>,
}

impl Pump {
    fn start(mut ws: Ws, channels: &[String]) -> Pump {
        let mut streams: HashMap<String, StreamCheck> =
            channels.iter().map(|ch| (ch.clone(), StreamCheck::subscribe(&mut ws, ch))).collect();
        let target: Arc<Mutex<Option<Goal>>> = Arc::new(Mutex::new(None));
        let t = target.clone();
        let handle = std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(180);
            loop {
                if let Some(goal) = &*t.lock().unwrap()
                    && goal.iter().all(|(ch, (e, top))| streams[ch].epoch == *e && streams[ch].offset >= *top)
                {
                    return streams;
                }
                assert!(Instant::now() < end, "the subscriber did not reach the final positions");
                let Some(ev) = ws.event_by(Instant::now() + Duration::from_millis(200), "publications")
                else {
                    continue;
                };
                let Event::Json(v) = ev else { panic!("unexpected {ev:?}") };
                let push = &v["push"];
                let Some(channel) = push["channel"].as_str() else { continue };
                let st = streams.get_mut(channel).unwrap_or_else(|| panic!("a push for {channel}: {v}"));
                if let Some(p) = push.get("pub") {
                    st.publication(p);
                } else if push["unsubscribe"]["code"] == 2500 {
                    let r = call_retrying(&mut ws, st.recover_command());
                    st.resubscribed(&r);
                } else {
                    panic!("unexpected push {v}");
                }
            }
        });
        Pump { target, handle }
    }

    fn finish(self, goal: Goal) -> HashMap<String, StreamCheck> {
        *self.target.lock().unwrap() = Some(goal);
        self.handle.join().expect("the subscriber failed")
    }
}

/// When each epoch of each channel had its first and last acknowledgement.
type AckTimes = HashMap<(String, String), (Instant, Instant)>;

/// Publishes through router 0's API until acknowledged (a refusal while
/// ownership moves is temporary), with an idempotency key per message, and
/// records when its epoch was acknowledged.
fn publish(c: &Cluster, log: &mut Published, acks: &mut AckTimes, channel: &str, i: u64) -> (String, u64) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        match log.try_publish(c.api_addrs[0], channel, json!({"i": i}), &format!("{channel}-{i}")) {
            Ok(at) => {
                let now = Instant::now();
                acks.entry((channel.to_owned(), at.0.clone())).or_insert((now, now)).1 = now;
                return at;
            }
            Err(v) => {
                // 100: internal (a peer that did not answer in time) or the
                // owner moving; both temporary.
                assert_eq!(v["error"]["code"], 100, "{channel} #{i}: {v}");
                assert!(Instant::now() < end, "{channel} #{i} never acknowledged: {v}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
fn a_router_stopped_past_its_lease_loses_its_channels_and_nothing_acknowledged_is_lost() {
    let etcd = Etcd::start();
    let c = Cluster::start_with_etcd(&etcd, 3, 1, &["--etcd-lease-ttl-secs", "2"], &[]);
    settled(&c, &[0, 1, 2]);
    // Routers hash by name in a membership view.
    let names: Vec<String> = (0..3).map(e2e::router_name).collect();
    // Three channels router 1 owns, three the others own.
    let (mut theirs, mut others) = (Vec::new(), Vec::new());
    for i in 0.. {
        let ch = format!("chat:fence-{i}");
        let list = if owner(&ch, &names) == Some(1) { &mut theirs } else { &mut others };
        if list.len() < 3 {
            list.push(ch);
        }
        if theirs.len() == 3 && others.len() == 3 {
            break;
        }
    }
    let channels: Vec<String> = theirs.iter().chain(&others).cloned().collect();
    let pump = Pump::start(c.client(0, "watcher"), &channels);
    let mut log = Published::default();
    let mut last: HashMap<String, (String, u64)> = HashMap::new();
    let mut i = 0u64;
    let mut acks = AckTimes::new();
    let mut round = |log: &mut Published, last: &mut HashMap<String, (String, u64)>, i: &mut u64| {
        for ch in &channels {
            last.insert(ch.clone(), publish(&c, log, &mut acks, ch, *i));
        }
        *i += 1;
    };
    for _ in 0..10 {
        round(&mut log, &mut last, &mut i);
    }
    let before: HashMap<String, String> =
        theirs.iter().map(|ch| (ch.clone(), log.positions(ch)[0].0.clone())).collect();

    // Router 1 stops; publishes go on until the others see it gone.
    c.routers[1].stop();
    let seen_gone = || router_metric(&c, 0, "switchyard_router_membership_routers") == 2;
    let end = Instant::now() + Duration::from_secs(60);
    while !seen_gone() {
        assert!(Instant::now() < end, "router 1's lease never expired");
        round(&mut log, &mut last, &mut i);
    }
    for _ in 0..5 {
        round(&mut log, &mut last, &mut i);
    }
    // Its channels were taken over in new epochs.
    for ch in &theirs {
        let (epoch, _) = &last[ch];
        assert_ne!(epoch, &before[ch], "{ch} moved with a new epoch");
    }

    // It comes back: it refuses everything until it holds a new lease,
    // drops what it held, and takes its channels back in new epochs again.
    c.routers[1].signal(libc::SIGCONT);
    settled(&c, &[0, 1, 2]);
    for _ in 0..10 {
        round(&mut log, &mut last, &mut i);
    }
    let goal: Goal = channels
        .iter()
        .map(|ch| {
            let (e, _) = last[ch].clone();
            let top = log.top(ch, &e);
            (ch.clone(), (e, top))
        })
        .collect();
    let streams = pump.finish(goal);
    // Fencing: no two epochs of a channel were acknowledged in overlapping
    // time (one router at a time assigned its offsets).
    for ch in &channels {
        let mut spans: Vec<(Instant, Instant, &str)> =
            acks.iter().filter(|((c, _), _)| c == ch).map(|((_, e), (a, b))| (*a, *b, e.as_str())).collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(
                w[0].1 < w[1].0,
                "{ch}: epochs {} and {} were acknowledged in overlapping time",
                w[0].2,
                w[1].2
            );
        }
        if theirs.contains(ch) {
            assert!(spans.len() >= 3, "{ch} moved away and back: {} epochs", spans.len());
        }
    }

    let mut forgiven = 0u64;
    for ch in &channels {
        let st = &streams[ch];
        // Checked as it arrived: each offset once, in order, gaps only where
        // the subscriber was told (`recovered: false`); payloads as acknowledged.
        st.verify(&log);
        // Epochs: the order the subscriber saw them in never comes back to one.
        let mut seen: Vec<&str> = Vec::new();
        for r in &st.received {
            if seen.last() != Some(&r.epoch.as_str()) {
                assert!(!seen.contains(&r.epoch.as_str()), "{ch}: epoch {} came back", r.epoch);
                seen.push(&r.epoch);
            }
        }
        // What was acknowledged and not received is exactly what a
        // `recovered: false` told the subscriber about (counted apart).
        let got: HashSet<(String, u64)> = st.received.iter().map(|r| (r.epoch.clone(), r.offset)).collect();
        let missed = log.positions(ch).into_iter().filter(|p| !got.contains(p)).count() as u64;
        assert!(
            missed == 0 || st.unrecovered > 0,
            "{ch}: {missed} acknowledged publications missed silently"
        );
        forgiven += missed;
        if theirs.contains(ch) {
            assert!(st.unrecovered >= 1, "{ch}: moved twice, the subscriber must have been told");
        }
    }
    assert!(
        router_metric(&c, 1, "switchyard_router_ownership_moves_total") >= 3,
        "router 1 dropped its channels"
    );
    eprintln!(
        "acknowledged {} publications over {} channels; {} forgiven by recovered:false; 0 lost silently, 0 acknowledged twice",
        i * channels.len() as u64,
        channels.len(),
        forgiven
    );
}

#[test]
fn a_fifth_router_moves_exactly_the_channels_the_hash_moves() {
    let etcd = Etcd::start();
    // A short lease: the newcomer waits its claim delay (TTL + margin)
    // before it acknowledges, and the clients wait with it.
    let mut c = Cluster::start_with_etcd(&etcd, 4, 1, &["--etcd-lease-ttl-secs", "2"], &[]);
    settled(&c, &[0, 1, 2, 3]);
    let channels: Vec<String> = (0..100).map(|i| format!("chat:move-{i}")).collect();
    let mut subs: Vec<(Ws, HashMap<String, StreamCheck>)> = channels
        .chunks(50)
        .enumerate()
        .map(|(k, part)| {
            let mut ws = c.client(0, &format!("mover-{k}"));
            let streams = part.iter().map(|ch| (ch.clone(), StreamCheck::subscribe(&mut ws, ch))).collect();
            (ws, streams)
        })
        .collect();
    // Routers hash by name in a membership view.
    let four: Vec<String> = (0..4).map(e2e::router_name).collect();
    c.add_router();
    settled(&c, &[0, 1, 2, 3, 4]);
    let five: Vec<String> = (0..5).map(e2e::router_name).collect();
    let expected: HashSet<String> =
        channels.iter().filter(|ch| owner(ch, &four) != owner(ch, &five)).cloned().collect();
    assert!(expected.iter().all(|ch| owner(ch, &five) == Some(4)), "only to the newcomer");

    // Every moved channel's subscriber is told to resync; then one
    // publication on every channel reaches everyone, and no channel that
    // did not move was resynced.
    let mut resynced: HashSet<String> = HashSet::new();
    let mut log = Published::default();
    let end = Instant::now() + Duration::from_secs(30);
    while resynced.len() < expected.len() {
        assert!(Instant::now() < end, "resyncs: {resynced:?} of {expected:?}");
        for (ws, streams) in &mut subs {
            let Some(ev) = ws.event_by(Instant::now() + Duration::from_millis(100), "resyncs") else {
                continue;
            };
            let Event::Json(v) = ev else { panic!("{ev:?}") };
            let push = &v["push"];
            let Some(ch) = push["channel"].as_str() else { continue };
            assert_eq!(push["unsubscribe"]["code"], 2500, "{v}");
            let st = streams.get_mut(ch).unwrap();
            let r = call_retrying(ws, st.recover_command());
            st.resubscribed(&r);
            resynced.insert(ch.to_owned());
        }
    }
    for ch in &channels {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            match log.try_publish(c.api_addrs[0], ch, json!({"after": "join"}), &format!("{ch}-join")) {
                Ok(_) => break,
                Err(v) => {
                    assert!(Instant::now() < end, "{ch}: {v}");
                    // Keep the clients answering pings while the newcomer
                    // waits out its claim delay.
                    for (ws, _) in &mut subs {
                        let mut seen = Vec::new();
                        while let Some(ev) = ws.event_by(Instant::now() + Duration::from_millis(20), "pings")
                        {
                            seen.push(ev);
                        }
                        ws.put_back(seen);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
    for (ws, streams) in &mut subs {
        for (ch, st) in streams.iter_mut() {
            st.receive_through(ws, log.top(ch, &st.epoch).max(st.offset + 1));
        }
    }
    assert_eq!(resynced, expected, "exactly the channels whose owner changed");
    let fraction = expected.len() as f64 / channels.len() as f64;
    eprintln!("a fifth router moved {} of {} channels ({fraction:.2})", expected.len(), channels.len());
    assert!((0.08..=0.35).contains(&fraction), "about a fifth: {fraction}");
}

/// Gateways can find their routers by DNS instead (A/AAAA records
/// re-resolved on an interval, a Kubernetes headless Service's way): a
/// gateway given `localhost:PORT` links to the router listening there and
/// serves its clients, checking the router's certificate against the
/// configured name.
#[test]
fn a_gateway_finds_its_router_by_dns() {
    let mut c = Cluster::start(1, 0, &[]);
    let port = c.router_addrs[0].port();
    let name = e2e::router_name(0);
    c.add_gateway_routed(0, &[], &["--dns", &format!("localhost:{port}"), "--dns-name", &name]);
    let mut ws = c.client(0, "resolved");
    let mut st = StreamCheck::subscribe(&mut ws, "chat:dns");
    let mut log = Published::default();
    let top = log.publish(c.api_addrs[0], "chat:dns", json!({"via": "dns"}));
    st.receive_through(&mut ws, top);
    st.verify(&log);
    assert!(metric(&c.metrics(0), "switchyard_gateway_routers_known") >= 1);
    assert_eq!(metric(&c.metrics(0), "switchyard_gateway_routers_up"), 1);
}
