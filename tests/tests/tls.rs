//! wss: a gateway serving TLS on its client listener (the cluster's CA-signed
//! `localhost` certificate), with real rustls clients. Users of both cores
//! (so connections are handed over between cores with their TLS state),
//! ordered delivery, a large message, and hostile bytes: plain HTTP and a
//! garbage record on the TLS port close only their own connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use e2e::{Cluster, Ws, metric, token};
use serde_json::{Value, json};

fn tls_cluster() -> Cluster {
    tls_cluster_with("")
}

/// A cluster whose gateway serves TLS with `config` (TOML; "" for none).
fn tls_cluster_with(config: &str) -> Cluster {
    let mut c = Cluster::start(1, 0, &[]);
    let cert = c.certs.join("router.pem");
    let key = c.certs.join("router.key");
    let mut args = vec![
        "--tls-cert".to_owned(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ];
    if !config.is_empty() {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("sy-tls-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, config).unwrap();
        args.extend(["--config".to_owned(), path.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    c.add_gateway(0, &args);
    c
}

fn wss_client(c: &Cluster, user: &str) -> Ws {
    let mut ws = Ws::connect_tls(c.ws_addrs[0], "/connection/websocket", &c.certs.join("ca.pem"))
        .expect("wss upgrade");
    let r = ws.call(json!({"connect": {"token": token(user)}}));
    assert!(r["connect"]["client"].is_string(), "{r}");
    ws
}

/// Asserts a read to the end stopped because the gateway ended the
/// connection (EOF, a reset, a TLS EOF without close_notify), not because
/// our 10 s read timeout gave up on a connection it kept open.
fn closed_by_gateway(r: std::io::Result<usize>, what: &str) {
    if let Err(e) = &r {
        use std::io::ErrorKind::{TimedOut, WouldBlock};
        assert!(
            !matches!(e.kind(), WouldBlock | TimedOut),
            "{what}: the gateway kept the connection open: {e}"
        );
    }
}

fn api_publish(c: &Cluster, channel: &str, data: Value) {
    let (st, body) = c.api(0, "publish", &json!({"channel": channel, "data": data}));
    assert_eq!(st, 200, "{body}");
}

#[test]
fn wss_clients_on_both_cores_receive_everything_in_order() {
    let c = tls_cluster();
    let mut clients: Vec<Ws> = (0..8).map(|i| wss_client(&c, &format!("tls-user-{i}"))).collect();
    for ws in &mut clients {
        let r = ws.call(json!({"subscribe": {"channel": "chat:tls"}}));
        assert!(r.get("error").is_none(), "{r}");
    }
    // Eight users spread over two cores: some connections were accepted on
    // the other core and moved, TLS session and all.
    let m = c.metrics(0);
    assert!(metric(&m, "switchyard_gateway_handovers_total") >= 1, "{m}");
    let blob = "y".repeat(40_000);
    for i in 0..20 {
        let data = if i == 10 { json!({"i": i, "blob": blob}) } else { json!({"i": i}) };
        api_publish(&c, "chat:tls", data);
    }
    for ws in &mut clients {
        for i in 0..20u64 {
            let v = ws.next_pub().expect("publication over wss");
            assert_eq!(v["push"]["pub"]["offset"], i + 1, "{v}");
            assert_eq!(v["push"]["pub"]["data"]["i"], i);
        }
    }
    // Client commands go the other way too.
    let r = clients[0].call(json!({"publish": {"channel": "chat:tls", "data": {"from": "client"}}}));
    assert!(r.get("error").is_none(), "{r}");
    for ws in &mut clients {
        let v = ws.next_pub().expect("the client's publication over wss");
        assert_eq!(v["push"]["pub"]["data"]["from"], "client");
        assert_eq!(v["push"]["pub"]["offset"], 21, "{v}");
    }
}

#[test]
fn plain_http_and_garbage_records_on_the_tls_port_close_only_their_connection() {
    let c = tls_cluster();
    let mut bystander = wss_client(&c, "bystander");
    let r = bystander.call(json!({"subscribe": {"channel": "chat:tls-bad"}}));
    assert!(r.get("error").is_none(), "{r}");

    // A plain-text upgrade request is not a TLS ClientHello: the gateway
    // answers with a TLS alert (or nothing) and closes.
    let mut plain = TcpStream::connect(c.ws_addrs[0]).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    plain
        .write_all(b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    closed_by_gateway(plain.read_to_end(&mut got), "a plain upgrade on the TLS port");
    assert!(!got.starts_with(b"HTTP/1.1 101"), "a plain upgrade must not succeed on the TLS port");

    // A record of random bytes after a good handshake: closed.
    let mut garbage = e2e::tls_stream(c.ws_addrs[0], &c.certs.join("ca.pem"));
    garbage.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    closed_by_gateway(garbage.read_to_end(&mut answer), "a bad upgrade over TLS");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 4"), "a bad upgrade over TLS gets its HTTP answer: {text}");
    let mut raw = TcpStream::connect(c.ws_addrs[0]).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]).unwrap();
    let mut sink = Vec::new();
    closed_by_gateway(raw.read_to_end(&mut sink), "a garbage TLS record");

    // The bystander is unaffected.
    api_publish(&c, "chat:tls-bad", json!({"ok": true}));
    let v = bystander.next_pub().expect("bystander keeps receiving");
    assert_eq!(v["push"]["pub"]["data"]["ok"], true);
    assert_eq!(v["push"]["pub"]["offset"], 1, "{v}");
}

#[test]
fn an_unfinished_tls_handshake_is_cut_at_the_handshake_deadline() {
    let c = tls_cluster_with("[limits]\nhandshake_timeout_secs = 1\n");
    // Half a ClientHello, then silence.
    let mut s = TcpStream::connect(c.ws_addrs[0]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    let mut sink = Vec::new();
    let r = s.read_to_end(&mut sink);
    assert!(r.is_ok(), "closed by the gateway, not by our read timeout: {r:?}");
    let m = c.metrics(0);
    assert!(metric(&m, "switchyard_gateway_rejections_total") >= 1, "{m}");
}

#[test]
fn a_wss_client_refused_by_admission_gets_its_503_over_tls() {
    // One handshake per core, then refusals for a long while.
    let c = tls_cluster_with("[admission]\naccept_rate = 0.001\naccept_burst = 1\n");
    let ca = c.certs.join("ca.pem");
    let upgrade = b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let mut refused = 0;
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut s = e2e::tls_stream(c.ws_addrs[0], &ca);
        s.write_all(upgrade).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                other => panic!("the answer ended early ({other:?}): {}", String::from_utf8_lossy(&head)),
            }
        }
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        if text.starts_with("http/1.1 503") {
            assert!(text.contains("retry-after:"), "{text}");
            refused += 1;
        } else {
            assert!(text.starts_with("http/1.1 101"), "{text}");
            held.push(s);
        }
    }
    assert!(held.len() <= 2, "one admitted per core at most");
    assert_eq!(refused + held.len(), 6);
    let m = c.metrics(0);
    assert!(metric(&m, "switchyard_gateway_admission_rejections_total") >= refused as u64, "{m}");
}
