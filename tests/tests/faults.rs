//! Faults with real processes: a slow consumer, a gateway drain, a gateway
//! crash, a router crash. Each asserts codes and counts, never speed.

use std::time::{Duration, Instant};

use e2e::{Cluster, Event, Published, StreamCheck, Ws, call_retrying, metric, wait_until};
use serde_json::{Value, json};

fn subscribe(ws: &mut Ws, channel: &str) -> Value {
    let r = ws.call(json!({"subscribe": {"channel": channel}}));
    assert!(r.get("error").is_none(), "{r}");
    r
}

fn api_publish(c: &Cluster, channel: &str, data: Value) -> u64 {
    let (st, body) = c.api(0, "publish", &json!({"channel": channel, "data": data}));
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["result"]["offset"].as_u64().unwrap_or_else(|| panic!("{v}"))
}

#[test]
fn slow_consumer_is_cut_off_and_others_keep_receiving() {
    // A write timeout far longer than the test needs: the slow client
    // starts reading well before it, so the session is ended by the 3008
    // close (behind what was written already), never by the timeout.
    let cfg = std::env::temp_dir().join(format!("sy-slow-{}.toml", std::process::id()));
    std::fs::write(&cfg, "[limits]\nmax_queue_bytes = 65536\nwrite_timeout_secs = 30\n").unwrap();
    let c = Cluster::start(1, 1, &["--config", cfg.to_str().unwrap()]);
    let (api, ch) = (c.api_addrs[0], "chat:firehose");
    let mut published = Published::default();
    let mut slow = c.client(0, "slow");
    let mut slow_seen = StreamCheck::subscribe(&mut slow, ch);
    let mut fast = c.client(0, "fast");
    let mut fast_seen = StreamCheck::subscribe(&mut fast, ch);
    let cut_off = || metric(&c.metrics(0), "switchyard_gateway_slow_disconnects_total");
    // Publish until the gateway cuts the slow client off: first the
    // kernel's socket buffers toward it fill (whatever their size; the loop
    // stops at the first cut-off), then its 64 KiB queue. The fast
    // subscriber reads each as it comes.
    let blob = "x".repeat(16 * 1024);
    let mut i = 0u64;
    loop {
        assert!(i < 3000, "3000 publications of 16 KiB and the slow client was never cut off");
        i += 1;
        let offset = published.publish(api, ch, json!({"i": i, "blob": blob}));
        fast_seen.receive_through(&mut fast, offset);
        if i.is_multiple_of(10) && cut_off() >= 1 {
            break;
        }
    }
    assert_eq!(cut_off(), 1, "only the slow client is cut off");
    // The fast subscriber keeps receiving after the cut-off. (These ten are
    // also more than the slow client's queue could take back at once.)
    for _ in 0..10 {
        i += 1;
        let offset = published.publish(api, ch, json!({"i": i, "blob": blob}));
        fast_seen.receive_through(&mut fast, offset);
    }
    // The slow client reads at last: everything the gateway had written,
    // from the first offset, each once, in order, then the close frame.
    let code = slow_seen.receive_until_close(&mut slow);
    assert_eq!(code, Some(3008), "a slow client is closed with 3008 (slow) after {:?}", slow_seen.offsets());
    slow_seen.verify_payloads(&published);
    let top = published.top(ch, &slow_seen.epoch);
    assert!(slow_seen.offset >= 1 && slow_seen.offset + 10 < top, "cut at {} of {top}", slow_seen.offset);
    // It reconnects: what it missed (at least ten 16 KiB publications) does
    // not fit its 64 KiB queue as one recovery, so it is told explicitly
    // that its position is lost, and goes on from the top.
    let mut slow = c.client(0, "slow");
    assert!(!slow_seen.resubscribe(&mut slow), "a recovery larger than the queue answers recovered:false");
    assert_eq!(slow_seen.offset, top);
    i += 1;
    let offset = published.publish(api, ch, json!({"i": i}));
    slow_seen.receive_through(&mut slow, offset);
    fast_seen.receive_through(&mut fast, offset);
    slow_seen.verify(&published);
    fast_seen.verify(&published);
    assert_eq!(fast_seen.offsets(), (1..=offset).collect::<Vec<_>>(), "the fast subscriber got everything");
    let _ = std::fs::remove_file(&cfg);
}

#[test]
fn gateway_drain_moves_clients_without_loss() {
    let mut c = Cluster::start(1, 2, &["--drain-secs", "2"]);
    let (api, ch) = (c.api_addrs[0], "chat:drain");
    let mut published = Published::default();
    let mut ws = c.client(0, "mover");
    let mut seen = StreamCheck::subscribe(&mut ws, ch);
    for i in 1..=5 {
        published.publish(api, ch, json!({"i": i}));
    }
    seen.receive_through(&mut ws, 5);
    c.gateways[0].signal(15);
    // Publications keep flowing while the client is being moved: it gets
    // some live before the close, and the rest by recovery.
    for i in 6..=10 {
        published.publish(api, ch, json!({"i": i}));
    }
    let code = seen.receive_until_close(&mut ws);
    assert_eq!(code, Some(3001), "drain closes with shutdown (reconnect)");
    assert_eq!(c.gateways[0].wait_exit(Duration::from_secs(20)), Some(0), "a drained gateway exits 0");
    // Reconnect elsewhere and recover exactly what was missed, then live.
    let live_before_close = seen.offset;
    let mut ws = c.client(1, "mover");
    assert!(seen.resubscribe(&mut ws), "a drained client recovers its position");
    assert_eq!(seen.offset, 10, "recovered up to the top");
    for i in 11..=13 {
        published.publish(api, ch, json!({"i": i}));
    }
    seen.receive_through(&mut ws, 13);
    assert_eq!(seen.offsets(), (1..=13).collect::<Vec<_>>(), "each once, in order, across the move");
    let recovered: Vec<u64> = seen.received.iter().filter(|r| r.recovered).map(|r| r.offset).collect();
    assert_eq!(recovered, ((live_before_close + 1)..=10).collect::<Vec<_>>(), "what the reply recovered");
    seen.verify(&published);
    assert_eq!(seen.data(), (1..=13).map(|i| json!({"i": i})).collect::<Vec<_>>());
    // The cluster still takes a new gateway after the drain.
    c.add_gateway(2, &[]);
}

#[test]
fn gateway_crash_clients_recover_from_the_ring() {
    let c = Cluster::start(1, 2, &[]);
    let (api, ch) = (c.api_addrs[0], "chat:crash");
    let mut published = Published::default();
    let mut ws = c.client(0, "victim");
    let mut seen = StreamCheck::subscribe(&mut ws, ch);
    published.publish(api, ch, json!({"i": 1}));
    seen.receive_through(&mut ws, 1);
    c.gateways[0].signal(9);
    // The connection ends without a close frame (the process is gone),
    // and nothing after offset 1 came on it.
    seen.receive_until_ended(&mut ws);
    for i in 2..=4 {
        published.publish(api, ch, json!({"i": i}));
    }
    let mut ws = c.client(1, "victim");
    assert!(seen.resubscribe(&mut ws), "recovered from the ring after a gateway crash");
    for i in 5..=6 {
        published.publish(api, ch, json!({"i": i}));
    }
    seen.receive_through(&mut ws, 6);
    assert_eq!(seen.offsets(), (1..=6).collect::<Vec<_>>(), "each once, in order, across the crash");
    let recovered: Vec<u64> = seen.received.iter().filter(|r| r.recovered).map(|r| r.offset).collect();
    assert_eq!(recovered, [2, 3, 4], "the missed ones came in the subscribe reply");
    seen.verify(&published);
    assert_eq!(seen.data(), (1..=6).map(|i| json!({"i": i})).collect::<Vec<_>>());
}

#[test]
fn router_crash_is_never_a_silent_gap() {
    let mut c = Cluster::start(1, 1, &[]);
    let ch = "chat:rc";
    let mut published = Published::default();
    let mut ws = c.client(0, "watcher");
    let mut seen = StreamCheck::subscribe(&mut ws, ch);
    for i in 1..=3 {
        published.publish(c.api_addrs[0], ch, json!({"i": i}));
    }
    seen.receive_through(&mut ws, 3);
    let old_epoch = seen.epoch.clone();
    c.restart_router(0);
    // The gateway tells its subscribers to resubscribe (unsubscribe 2500),
    // with nothing else on the channel before…
    assert_eq!(seen.receive_until_unsubscribed(&mut ws), 2500, "told to resync when the router goes away");
    // …and once the gateway is back on a router, the old position is
    // explicitly unrecoverable (the router restarted empty: a new epoch),
    // never silently continued.
    e2e::wait_ready(c.admin_addrs[0]);
    assert!(!seen.resubscribe(&mut ws), "a position on a crashed router is not recovered");
    assert_ne!(seen.epoch, old_epoch, "a restarted router starts a new epoch");
    // The stream goes on from the new position, each once, in order.
    let from = seen.offset;
    assert_eq!(from, 0, "nothing was published in the new epoch yet");
    for i in 4..=6 {
        published.publish(c.api_addrs[0], ch, json!({"i": i}));
    }
    let top = published.top(ch, &seen.epoch);
    seen.receive_through(&mut ws, top);
    let expected: Vec<u64> = (1..=3).chain((from + 1)..=top).collect();
    assert_eq!(seen.offsets(), expected);
    assert_eq!(seen.data(), (1..=6).map(|i| json!({"i": i})).collect::<Vec<_>>());
    seen.verify(&published);
}

#[test]
fn running_out_of_descriptors_backs_off_and_keeps_the_connected_served() {
    let mut c = Cluster::start(1, 0, &[]);
    c.add_gateway_with_fd_limit(0, 64, &[]);
    let mut reader = c.client(0, "reader");
    subscribe(&mut reader, "chat:fd");
    // Connections the kernel completes but the gateway has no descriptor to
    // accept: its listeners stay readable while accept4 fails with EMFILE.
    let flood: Vec<std::net::TcpStream> =
        (0..120).filter_map(|_| std::net::TcpStream::connect(c.ws_addrs[0]).ok()).collect();
    assert!(flood.len() > 64, "the kernel queues what the gateway cannot take");
    // Reading the metrics may wait for a descriptor; the reader answers the
    // gateway's pings meanwhile (as an SDK does), or it would be closed with
    // 3012 before the publication below.
    let errors = |c: &Cluster, reader: &mut Ws| {
        reader.serve_pings(Duration::from_millis(10));
        metric(&c.metrics(0), "switchyard_gateway_accept_errors_total")
    };
    let first = wait_until(
        Duration::from_secs(10),
        "accept errors (out of descriptors)",
        || errors(&c, &mut reader),
        |n| *n > 0,
    );
    // It keeps trying (the next failed accept comes)…
    wait_until(Duration::from_secs(10), "another accept attempt", || errors(&c, &mut reader), |n| *n > first);
    // …backing off (5 ms doubling to 1 s per core), not spinning on a
    // listener that stays readable. A backing-off core makes at most ~10
    // attempts in its first 1.3 s (5 + 10 + … + 640 ms) and then one a
    // second; two cores, ~20 plus two a second. A busy loop makes thousands
    // a second. The bound is taken over the time that really passed between
    // two reads of the counter (a read waits while the gateway has no
    // descriptor for the admin connection either).
    let (t0, base) = (Instant::now(), errors(&c, &mut reader));
    while t0.elapsed() < Duration::from_secs(3) {
        reader.serve_pings(Duration::from_millis(100));
        let n = errors(&c, &mut reader);
        let allowed = 20 + 2 * t0.elapsed().as_secs() + 2;
        let retried = n.saturating_sub(base);
        assert!(
            retried <= allowed,
            "{retried} accept errors in {:?}: the gateway spins on EMFILE",
            t0.elapsed()
        );
    }
    // The connected are served meanwhile.
    let offset = api_publish(&c, "chat:fd", json!({"n": 1}));
    assert_eq!(reader.next_pub().expect("still served")["push"]["pub"]["offset"], offset);
    // Descriptors come back: new clients get in again.
    drop(flood);
    let mut late = c.client(0, "late");
    subscribe(&mut late, "chat:fd");
    let offset = api_publish(&c, "chat:fd", json!({"n": 2}));
    assert_eq!(late.next_pub().expect("served")["push"]["pub"]["offset"], offset);
    assert_eq!(reader.next_pub().expect("still served")["push"]["pub"]["offset"], offset);
}

#[test]
fn a_router_that_stops_answering_gets_clients_a_temporary_error_not_a_hang() {
    let c = Cluster::start(1, 1, &[]);
    let mut ws = c.client(0, "waiter");
    let mut published = Published::default();
    let mut warm = StreamCheck::subscribe(&mut ws, "chat:warm");
    published.publish(c.api_addrs[0], "chat:warm", json!({"before": "stall"}));
    warm.receive_through(&mut ws, 1);
    // The router process stops (as if wedged): the link stays up for a
    // while, and the subscribe below is never answered by it.
    c.routers[0].stop();
    ws.send_json(&json!({"id": 70, "subscribe": {"channel": "chat:stalled"}}));
    let end = Instant::now() + Duration::from_secs(40);
    let mut others = Vec::new();
    let reply = loop {
        match ws.event_by(end, "the answer to a subscribe the router never answered") {
            Some(Event::Json(v)) if v["id"] == 70 => break v,
            Some(Event::Closed(code, _)) => panic!("closed with {code:?}"),
            Some(e) => others.push(e), // chat:warm's, checked below
            None => panic!("no answer within 40 s to a subscribe the router never answered"),
        }
    };
    ws.put_back(others);
    assert_eq!(reply["error"]["code"], 100, "{reply}");
    assert_eq!(reply["error"]["temporary"], true, "the SDKs retry a temporary error: {reply}");
    c.routers[0].signal(libc::SIGCONT);
    // Once the router answers again, the retry succeeds…
    let mut stalled = StreamCheck::from_reply(
        "chat:stalled",
        &call_retrying(&mut ws, json!({"subscribe": {"channel": "chat:stalled"}})),
    );
    // …and the session receives on both channels. chat:warm may have been
    // told to resubscribe (2500) if the gateway gave the silent link up;
    // then it recovers from the ring the router kept, without a gap.
    for ch in ["chat:warm", "chat:stalled"] {
        published.publish(c.api_addrs[0], ch, json!({"after": "stall"}));
    }
    warm.receive_through_resyncing(&mut ws, 2);
    assert_eq!(warm.unrecovered, 0, "the router kept chat:warm's ring: the position is recovered");
    stalled.receive_through(&mut ws, 1);
    warm.verify(&published);
    stalled.verify(&published);
    assert_eq!(warm.offsets(), [1, 2]);
}
