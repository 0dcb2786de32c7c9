//! Hostile and malformed input against a real gateway: each class gets its
//! documented answer, and other sessions are unaffected.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use e2e::{Cluster, Ws, token_with};
use proto::ws::OpCode;
use proto::ws::handshake::client::ClientHandshakeError;
use serde_json::json;

fn raw_http(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn malformed_upgrades_get_their_status() {
    let c = Cluster::start(1, 1, &[]);
    let addr = c.ws_addrs[0];
    let good = "GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    assert!(raw_http(addr, good.replace("Version: 13", "Version: 8").as_bytes()).starts_with("HTTP/1.1 426"));
    assert!(raw_http(addr, good.replace("GET", "POST").as_bytes()).starts_with("HTTP/1.1 405"));
    assert!(
        raw_http(addr, good.replace("dGhlIHNhbXBsZSBub25jZQ==", "short").as_bytes())
            .starts_with("HTTP/1.1 400")
    );
    assert!(
        raw_http(addr, good.replace("/connection/websocket", "/elsewhere").as_bytes())
            .starts_with("HTTP/1.1 404")
    );
    let huge = good.replace("Host: x", &format!("Host: x\r\nX-Pad: {}", "a".repeat(10_000)));
    let r = raw_http(addr, huge.as_bytes());
    assert!(r.starts_with("HTTP/1.1 431"), "{r:?}");
    assert!(raw_http(addr, b"\x16\x03\x01garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
    // The gateway still serves a normal client afterwards.
    let mut ws = c.client(0, "ok");
    assert_eq!(ws.call(json!({"ping": {}}))["ping"], json!({}));
}

#[test]
fn slowloris_upgrade_is_cut_off() {
    let c = Cluster::start(1, 1, &[]);
    let mut s = TcpStream::connect(c.ws_addrs[0]).unwrap();
    s.write_all(b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 408"), "{}", String::from_utf8_lossy(&out));
}

fn connected(c: &Cluster, user: &str) -> Ws {
    c.client(0, user)
}

#[test]
fn protocol_violations_close_with_their_codes() {
    let c = Cluster::start(1, 1, &[]);
    let mut bystander = connected(&c, "bystander");

    // A command before connect: 3501.
    let mut ws = Ws::connect(c.ws_addrs[0], "/connection/websocket").unwrap();
    ws.send_json(&json!({"id": 1, "subscribe": {"channel": "chat:x"}}));
    assert_eq!(ws.expect_close(), Some(3501));

    // A bad token: 3500. A wrong signature is a bad token.
    let mut ws = Ws::connect(c.ws_addrs[0], "/connection/websocket").unwrap();
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "x"}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret"),
    )
    .unwrap();
    ws.send_json(&json!({"id": 1, "connect": {"token": forged}}));
    assert_eq!(ws.expect_close(), Some(3500));

    // A token with an algorithm the gateway has no key for (ES256), and an
    // unsigned `alg: none` token: both 3500.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    for alg in ["ES256", "none"] {
        let forged = format!(
            "{}.{}.{}",
            b64.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#)),
            b64.encode(r#"{"sub":"x"}"#),
            b64.encode("sig")
        );
        let mut ws = Ws::connect(c.ws_addrs[0], "/connection/websocket").unwrap();
        ws.send_json(&json!({"id": 1, "connect": {"token": forged}}));
        assert_eq!(ws.expect_close(), Some(3500), "{alg}");
    }

    // An expired token: error 109, the connection stays open.
    let mut ws = Ws::connect(c.ws_addrs[0], "/connection/websocket").unwrap();
    let r = ws.call(json!({"connect": {"token": token_with(json!({"sub": "x", "exp": 1000}))}}));
    assert_eq!(r["error"]["code"], 109, "{r}");
    // Claims of the wrong type: 3500.
    ws.send_json(&json!({"id": 9, "connect": {"token": token_with(json!({"sub": 42}))}}));
    assert_eq!(ws.expect_close(), Some(3500));

    // No token without anonymous access: 3501.
    let mut ws = Ws::connect(c.ws_addrs[0], "/connection/websocket").unwrap();
    ws.send_json(&json!({"id": 1, "connect": {}}));
    assert_eq!(ws.expect_close(), Some(3501));

    // Malformed JSON: 3501.
    let mut ws = connected(&c, "u1");
    ws.send_frame(OpCode::Text, b"{not json");
    assert_eq!(ws.expect_close(), Some(3501));

    // A binary frame on a JSON connection: 1003.
    let mut ws = connected(&c, "u2");
    ws.send_frame(OpCode::Binary, b"\x00\x01");
    assert_eq!(ws.expect_close(), Some(1003));

    // Invalid UTF-8 in a text frame: 1007.
    let mut ws = connected(&c, "u3");
    ws.send_frame(OpCode::Text, &[0xc3, 0x28]);
    assert_eq!(ws.expect_close(), Some(1007));

    // An unmasked client frame: 1002.
    let mut ws = connected(&c, "u4");
    let mut frame = Vec::new();
    proto::ws::encode_frame(&mut frame, true, OpCode::Text, b"{}", None);
    ws.send_raw(&frame);
    assert_eq!(ws.expect_close(), Some(1002));

    // A message over the size limit: 1009.
    let mut ws = connected(&c, "u5");
    ws.send_frame(OpCode::Text, &vec![b' '; 70_000]);
    assert_eq!(ws.expect_close(), Some(1009));

    // Reserved opcode: 1002.
    let mut ws = connected(&c, "u6");
    let mut frame = Vec::new();
    proto::ws::encode_frame(&mut frame, true, OpCode::Text, b"x", Some([1, 2, 3, 4]));
    frame[0] = 0x80 | 0x3;
    ws.send_raw(&frame);
    assert_eq!(ws.expect_close(), Some(1002));

    // The bystander never noticed.
    assert_eq!(bystander.call(json!({"ping": {}}))["ping"], json!({}));
}

#[test]
fn limits_answer_with_their_codes() {
    let c = Cluster::start(1, 1, &["--config", &limits_config()]);
    let mut ws = connected(&c, "limited");
    for i in 0..3 {
        let r = ws.call(json!({"subscribe": {"channel": format!("typing:{i}")}}));
        assert!(r.get("error").is_none(), "{r}");
    }
    let r = ws.call(json!({"subscribe": {"channel": "typing:overflow"}}));
    assert_eq!(r["error"]["code"], 106, "{r}");
    // Publish rate: burst 5, then 111 (temporary), then after too many refusals 3013.
    let mut codes = Vec::new();
    for _ in 0..12 {
        let r = ws.call(json!({"publish": {"channel": "typing:0", "data": {}}}));
        codes.push(r["error"]["code"].as_u64().unwrap_or(0));
        if r["error"]["code"] == 111 {
            assert_eq!(r["error"]["temporary"], true);
        }
    }
    assert_eq!(&codes[..5], &[0, 0, 0, 0, 0], "{codes:?}");
    assert!(codes[5..].contains(&111), "{codes:?}");
    let mut closed = None;
    for _ in 0..10 {
        ws.send_json(&json!({"id": 900, "publish": {"channel": "typing:0", "data": {}}}));
    }
    while let Some(e) = ws.next_event() {
        if let e2e::Event::Closed(code, _) = e {
            closed = code;
            break;
        }
    }
    assert_eq!(closed, Some(3013));
}

fn limits_config() -> String {
    let p = std::env::temp_dir().join(format!("sy-limits-{}.toml", std::process::id()));
    std::fs::write(
        &p,
        "[limits]\nmax_subscriptions = 3\npublish_rate = 0.5\npublish_burst = 5\nmax_refusals = 8\n",
    )
    .unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn storm_admission_answers_503_with_retry_after() {
    let p = std::env::temp_dir().join(format!("sy-adm-{}.toml", std::process::id()));
    std::fs::write(&p, "[admission]\naccept_rate = 0.001\naccept_burst = 3\nretry_after_min_secs = 2\nretry_after_max_secs = 4\n").unwrap();
    let c = Cluster::start(1, 1, &["--config", p.to_str().unwrap()]);
    // The harness runs 2 cores (burst 3 each) and its readiness probe used a
    // token: of 10 new connections at most 5 are admitted.
    let mut admitted = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        match Ws::connect(c.ws_addrs[0], "/connection/websocket") {
            Ok(ws) => admitted.push(ws),
            Err(ClientHandshakeError::Rejected { status: 503, retry_after }) => {
                let r = retry_after.expect("Retry-After");
                assert!((2..=4).contains(&r), "{r}");
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused >= 5, "refused {refused}");
    assert!(!admitted.is_empty());
    let m = c.metrics(0);
    assert!(e2e::metric(&m, "switchyard_gateway_admission_rejections_total") >= 3, "{m}");
}
