//! Faults with real processes: a slow consumer, a gateway drain, a gateway
//! crash, a router crash. Each asserts codes and counts, never speed.

use std::time::{Duration, Instant};

use e2e::{Cluster, Event, Ws, metric};
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
    let cfg = std::env::temp_dir().join(format!("sy-slow-{}.toml", std::process::id()));
    std::fs::write(&cfg, "[limits]\nmax_queue_bytes = 65536\nwrite_timeout_secs = 30\n").unwrap();
    let c = Cluster::start(1, 1, &["--config", cfg.to_str().unwrap()]);
    let mut slow = c.client(0, "slow");
    subscribe(&mut slow, "chat:firehose");
    let mut fast = c.client(0, "fast");
    subscribe(&mut fast, "chat:firehose");
    // Enough to fill the kernel's socket buffers toward the slow client
    // (several MiB on loopback) and then the 64 KiB queue.
    let blob = "x".repeat(16 * 1024);
    let n = 1500u64;
    let mut received = 0u64;
    for i in 0..n {
        api_publish(&c, "chat:firehose", json!({"i": i, "blob": blob}));
        // The fast subscriber keeps up: it reads each publication as it comes.
        while received <= i {
            let v = fast.next_pub().expect("fast subscriber keeps receiving");
            assert_eq!(v["push"]["pub"]["offset"], received + 1);
            received += 1;
        }
    }
    while received < n {
        let v = fast.next_pub().expect("fast subscriber gets everything");
        assert_eq!(v["push"]["pub"]["offset"], received + 1);
        received += 1;
    }
    let m = c.metrics(0);
    assert!(metric(&m, "switchyard_gateway_slow_disconnects_total") >= 1, "{m}");
    // The slow client, reading at last, finds its stream ended with 3008 (or cut).
    let end = Instant::now() + Duration::from_secs(30);
    let mut outcome = None;
    while Instant::now() < end {
        match slow.next_event() {
            Some(Event::Closed(code, _)) => {
                outcome = code;
                break;
            }
            Some(_) => continue,
            None => break,
        }
    }
    assert!(matches!(outcome, Some(3008) | None), "{outcome:?}");
}

#[test]
fn gateway_drain_moves_clients_without_loss() {
    let mut c = Cluster::start(1, 2, &["--drain-secs", "2"]);
    let mut ws = c.client(0, "mover");
    let r = subscribe(&mut ws, "chat:drain");
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    for i in 0..5 {
        api_publish(&c, "chat:drain", json!({"i": i}));
    }
    let mut last = 0;
    for _ in 0..5 {
        last = ws.next_pub().unwrap()["push"]["pub"]["offset"].as_u64().unwrap();
    }
    c.gateways[0].signal(15);
    // Publications keep flowing while the client is being moved.
    for i in 5..10 {
        api_publish(&c, "chat:drain", json!({"i": i}));
    }
    let mut code = None;
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        match ws.next_event() {
            Some(Event::Json(v)) if v.get("push").is_some() => {
                last = v["push"]["pub"]["offset"].as_u64().unwrap();
            }
            Some(Event::Closed(c, _)) => {
                code = c;
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(code, Some(3001), "drain closes with shutdown (reconnect)");
    assert_eq!(c.gateways[0].wait_exit(Duration::from_secs(20)), Some(0), "a drained gateway exits 0");
    // Reconnect elsewhere and recover exactly what was missed.
    let mut ws = c.client(1, "mover");
    let r = ws.call(
        json!({"subscribe": {"channel": "chat:drain", "recover": true, "epoch": epoch, "offset": last}}),
    );
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    let got: Vec<u64> = r["subscribe"]["publications"]
        .as_array()
        .map(|a| a.iter().map(|p| p["offset"].as_u64().unwrap()).collect())
        .unwrap_or_default();
    assert_eq!(got, ((last + 1)..=10).collect::<Vec<_>>());
    c.add_gateway(2, &[]);
}

#[test]
fn gateway_crash_clients_recover_from_the_ring() {
    let c = Cluster::start(1, 2, &[]);
    let mut ws = c.client(0, "victim");
    let r = subscribe(&mut ws, "chat:crash");
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    api_publish(&c, "chat:crash", json!({"i": 0}));
    let last = ws.next_pub().unwrap()["push"]["pub"]["offset"].as_u64().unwrap();
    c.gateways[0].signal(9);
    for i in 1..4 {
        api_publish(&c, "chat:crash", json!({"i": i}));
    }
    let mut ws = c.client(1, "victim");
    let r = ws.call(
        json!({"subscribe": {"channel": "chat:crash", "recover": true, "epoch": epoch, "offset": last}}),
    );
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    assert_eq!(r["subscribe"]["publications"].as_array().unwrap().len(), 3);
}

#[test]
fn router_crash_is_never_a_silent_gap() {
    let mut c = Cluster::start(1, 1, &[]);
    let mut ws = c.client(0, "watcher");
    let r = subscribe(&mut ws, "chat:rc");
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_owned();
    api_publish(&c, "chat:rc", json!({"i": 0}));
    assert_eq!(ws.next_pub().unwrap()["push"]["pub"]["offset"], 1);
    c.restart_router(0);
    // The gateway tells its subscribers to resubscribe (unsubscribe 2500)…
    let end = Instant::now() + Duration::from_secs(30);
    let mut told = false;
    while Instant::now() < end && !told {
        if let Some(Event::Json(v)) = ws.next_event() {
            told = v["push"]["unsubscribe"]["code"] == 2500 && v["push"]["channel"] == "chat:rc";
        }
    }
    assert!(told, "subscribers are told to resync when their router goes away");
    // …and once the gateway is back on a router, the old position is
    // explicitly unrecoverable (new epoch), never silently continued.
    e2e::wait_ready(c.admin_addrs[0]);
    let mut r = Value::Null;
    for _ in 0..50 {
        r = ws
            .call(json!({"subscribe": {"channel": "chat:rc", "recover": true, "epoch": epoch, "offset": 1}}));
        if r["error"]["temporary"] != true {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(r["subscribe"]["was_recovering"], true, "{r}");
    assert!(r["subscribe"].get("recovered").is_none(), "{r}");
    assert_ne!(r["subscribe"]["epoch"], json!(epoch));
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
    let errors = |c: &Cluster| metric(&c.metrics(0), "switchyard_gateway_accept_errors_total");
    let end = Instant::now() + Duration::from_secs(10);
    while errors(&c) == 0 {
        assert!(Instant::now() < end, "the gateway never ran out of descriptors");
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = errors(&c);
    std::thread::sleep(Duration::from_secs(3));
    // Backing off (5 ms doubling to 1 s per core), not spinning on a
    // listener that stays readable: a handful of attempts in 3 s, where a
    // busy loop would make millions.
    let retried = errors(&c) - first;
    assert!(retried <= 30, "{retried} accept errors in 3 s");
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
    subscribe(&mut ws, "chat:warm");
    // The router process stops (as if wedged): the link stays up for a
    // while, and the subscribe below is never answered by it.
    c.routers[0].signal(libc::SIGSTOP);
    ws.send_json(&json!({"id": 70, "subscribe": {"channel": "chat:stalled"}}));
    let end = Instant::now() + Duration::from_secs(40);
    let reply = loop {
        assert!(Instant::now() < end, "no answer to a subscribe the router never answered");
        match ws.next_event() {
            Some(Event::Json(v)) if v["id"] == 70 => break v,
            Some(Event::Closed(code, _)) => panic!("closed with {code:?}"),
            _ => continue,
        }
    };
    assert_eq!(reply["error"]["code"], 100, "{reply}");
    assert_eq!(reply["error"]["temporary"], true, "the SDKs retry a temporary error: {reply}");
    c.routers[0].signal(libc::SIGCONT);
    // Once the router answers again, the retry succeeds.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < end, "the retried subscribe never succeeded");
        let r = ws.call(json!({"subscribe": {"channel": "chat:stalled"}}));
        if r.get("error").is_none() {
            break;
        }
        assert_eq!(r["error"]["temporary"], true, "{r}");
        std::thread::sleep(Duration::from_millis(300));
    }
}
