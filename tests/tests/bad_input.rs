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
    // The gateway answers and closes: EOF, not our read timeout, nor a
    // reset that could have destroyed the answer.
    let r = s.read_to_end(&mut out);
    assert!(r.is_ok(), "the gateway did not end the connection cleanly: {r:?} after {out:?}");
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
    let r = s.read_to_end(&mut out);
    assert!(r.is_ok(), "closed by the gateway, not by our 30 s read timeout: {r:?}");
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
    // Publish rate: burst 5, then 111 (temporary), then after too many
    // refusals 3013. The rate (one token per 100 s) refills nothing while
    // the test runs, so every call after the burst is refused.
    let mut codes = Vec::new();
    for _ in 0..12 {
        let r = ws.call(json!({"publish": {"channel": "typing:0", "data": {}}}));
        codes.push(r["error"]["code"].as_u64().unwrap_or(0));
        if r["error"]["code"] == 111 {
            assert_eq!(r["error"]["temporary"], true);
        }
    }
    assert_eq!(codes, [0, 0, 0, 0, 0, 111, 111, 111, 111, 111, 111, 111], "{codes:?}");
    // Seven refusals so far; the eighth (max_refusals) closes with 3013,
    // and until the close every answer is a refusal.
    for _ in 0..10 {
        ws.send_json(&json!({"id": 900, "publish": {"channel": "typing:0", "data": {}}}));
    }
    let end = std::time::Instant::now() + Duration::from_secs(15);
    let closed = loop {
        match ws.event_by(end, "the 3013 close") {
            Some(e2e::Event::Closed(code, _)) => break code,
            Some(e2e::Event::Json(v)) if v["id"] == 900 => assert_eq!(v["error"]["code"], 111, "{v}"),
            Some(e2e::Event::Json(_)) => {} // its own earlier publications, pushed back
            Some(e) => panic!("{e:?}"),
            None => panic!("no close within 15 s"),
        }
    };
    assert_eq!(closed, Some(3013));
}

#[test]
fn the_per_user_publish_rate_spans_the_users_connections() {
    let p = std::env::temp_dir().join(format!("sy-user-limits-{}.toml", std::process::id()));
    std::fs::write(
        &p,
        "[limits]\npublish_rate = 0.1\npublish_burst = 10\nuser_publish_rate = 0.1\nuser_publish_burst = 4\n",
    )
    .unwrap();
    // One core, so both connections share it (per-user buckets are per core).
    let c = Cluster::start(1, 1, &["--config", p.to_str().unwrap(), "--cores", "1"]);
    let mut a = connected(&c, "chatty");
    let mut b = connected(&c, "chatty");
    let mut other = connected(&c, "quiet");
    for ws in [&mut a, &mut b, &mut other] {
        assert!(ws.call(json!({"subscribe": {"channel": "typing:x"}})).get("error").is_none());
    }
    let mut codes = Vec::new();
    for i in 0..6 {
        let ws = if i % 2 == 0 { &mut a } else { &mut b };
        let r = ws.call(json!({"publish": {"channel": "typing:x", "data": {}}}));
        codes.push(r["error"]["code"].as_u64().unwrap_or(0));
    }
    // Four between the two connections (each alone could send ten), then 111.
    assert_eq!(codes, [0, 0, 0, 0, 111, 111], "{codes:?}");
    // Another user is not affected.
    let r = other.call(json!({"publish": {"channel": "typing:x", "data": {}}}));
    assert!(r.get("error").is_none(), "{r}");
}

fn limits_config() -> String {
    let p = std::env::temp_dir().join(format!("sy-limits-{}.toml", std::process::id()));
    std::fs::write(
        &p,
        "[limits]\nmax_subscriptions = 3\npublish_rate = 0.01\npublish_burst = 5\nmax_refusals = 8\n",
    )
    .unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn storm_admission_answers_503_with_retry_after_and_established_sessions_keep_receiving() {
    let p = std::env::temp_dir().join(format!("sy-adm-{}.toml", std::process::id()));
    std::fs::write(
        &p,
        "[admission]\naccept_rate = 1.0\naccept_burst = 3\nretry_after_min_secs = 1\nretry_after_max_secs = 2\n",
    )
    .unwrap();
    let c = Cluster::start(1, 1, &["--config", p.to_str().unwrap()]);
    // An established subscriber, connected before the storm (honouring a
    // Retry-After if the harness's readiness probe took its core's tokens).
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let mut early_refusals = 0u64;
    let mut old = loop {
        match Ws::connect(c.ws_addrs[0], "/connection/websocket") {
            Ok(ws) => break ws,
            Err(ClientHandshakeError::Rejected { status: 503, retry_after }) => {
                assert!(std::time::Instant::now() < end, "never admitted");
                early_refusals += 1;
                std::thread::sleep(Duration::from_secs(retry_after.expect("Retry-After").into()));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let r = old.call(json!({"connect": {"token": e2e::token("established")}}));
    assert!(r["connect"]["client"].is_string(), "{r}");
    assert!(old.call(json!({"subscribe": {"channel": "chat:storm"}})).get("error").is_none());
    // The storm: 2 cores × burst 3 admitted at once, the rest refused with
    // a jittered Retry-After within the configured bounds.
    let mut admitted = Vec::new();
    let mut retry: Vec<u32> = Vec::new();
    for _ in 0..20 {
        match Ws::connect(c.ws_addrs[0], "/connection/websocket") {
            Ok(ws) => admitted.push(ws),
            Err(ClientHandshakeError::Rejected { status: 503, retry_after }) => {
                let r = retry_after.expect("Retry-After");
                assert!((1..=2).contains(&r), "{r}");
                retry.push(r);
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(retry.len() >= 10, "refused {}", retry.len());
    let mut refusals = early_refusals + retry.len() as u64;
    // Meanwhile the established session keeps receiving.
    for i in 0..3 {
        let (st, body) = c.api(0, "publish", &json!({"channel": "chat:storm", "data": {"i": i}}));
        assert_eq!(st, 200, "{body}");
        assert_eq!(old.next_pub().expect("delivered during the storm")["push"]["pub"]["offset"], i + 1);
    }
    // Every refused client that honours Retry-After gets in later.
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while let Some(wait) = retry.iter().max().copied() {
        std::thread::sleep(Duration::from_secs(wait as u64));
        for _ in std::mem::take(&mut retry) {
            match Ws::connect(c.ws_addrs[0], "/connection/websocket") {
                Ok(ws) => admitted.push(ws),
                Err(ClientHandshakeError::Rejected { status: 503, retry_after }) => {
                    let r = retry_after.expect("Retry-After");
                    assert!((1..=2).contains(&r), "{r}");
                    refusals += 1;
                    retry.push(r);
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(std::time::Instant::now() < end, "refused clients never got in");
    }
    assert_eq!(admitted.len(), 20);
    let m = c.metrics(0);
    // Every 503 this test was answered is counted.
    assert!(e2e::metric(&m, "switchyard_gateway_admission_rejections_total") >= refusals, "{refusals}: {m}");
}

#[test]
fn refused_clients_are_told_later_and_later_seconds_at_the_admission_rate() {
    // 2 admissions per second and core, a burst of 1: a run of refusals is
    // handed slots half a second apart, from 1 s on, so the Retry-After
    // values climb instead of sending everyone back at once.
    let p = std::env::temp_dir().join(format!("sy-adm-slots-{}.toml", std::process::id()));
    std::fs::write(
        &p,
        "[admission]\naccept_rate = 2.0\naccept_burst = 1\nretry_after_min_secs = 1\nretry_after_max_secs = 30\n",
    )
    .unwrap();
    let c = Cluster::start(1, 1, &["--config", p.to_str().unwrap()]);
    let mut told: Vec<u32> = Vec::new();
    let mut admitted = Vec::new();
    for _ in 0..24 {
        match Ws::connect(c.ws_addrs[0], "/connection/websocket") {
            Ok(ws) => admitted.push(ws),
            Err(ClientHandshakeError::Rejected { status: 503, retry_after }) => {
                told.push(retry_after.expect("Retry-After"));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(told.len() >= 16, "refused {} of 24", told.len());
    assert!(told.iter().all(|r| (1..=30).contains(r)), "{told:?}");
    // Two cores, two slots per second each: no second is handed to many
    // more than four refusals (rounding moves some to the next second).
    for second in 1..=30 {
        let n = told.iter().filter(|r| **r == second).count();
        assert!(n <= 8, "{n} told to come back in {second} s: {told:?}");
    }
    assert!(*told.iter().max().unwrap() >= 3, "{told:?}");
}

#[test]
fn a_decompression_bomb_is_closed_with_1009_and_harms_nobody() {
    use std::io::Write;
    let c = Cluster::start(1, 1, &["--deflate"]);
    let mut bystander = connected(&c, "bystander");
    assert!(bystander.call(json!({"subscribe": {"channel": "chat:bomb"}})).get("error").is_none());
    let mut ws = Ws::connect_with(c.ws_addrs[0], "/connection/websocket", true).expect("upgrade");
    // 16 MiB of spaces deflate to ~16 KiB (a frame well within the limit)
    // and would inflate far past the 64 KiB message limit.
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![b' '; 1 << 20];
    for _ in 0..16 {
        z.write_all(&zeros).unwrap();
    }
    z.flush().unwrap(); // a sync flush ends with 00 00 ff ff, which RFC 7692 drops
    let mut payload = z.get_ref().clone();
    assert!(payload.ends_with(&[0, 0, 0xff, 0xff]));
    payload.truncate(payload.len() - 4);
    assert!(payload.len() < 32 * 1024, "{}", payload.len());
    let mask: [u8; 4] = rand::random();
    // FIN + RSV1 (compressed) + text, masked, with the minimal length encoding.
    let mut frame = vec![0x80 | 0x40 | 0x1];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    ws.send_raw(&frame);
    assert_eq!(ws.expect_close(), Some(1009));
    // The bystander is unaffected.
    let (st, body) = c.api(0, "publish", &json!({"channel": "chat:bomb", "data": {"ok": true}}));
    assert_eq!(st, 200, "{body}");
    assert_eq!(bystander.next_pub().unwrap()["push"]["pub"]["data"]["ok"], true);
}

#[test]
fn deadlines_close_with_their_codes() {
    let p = std::env::temp_dir().join(format!("sy-deadlines-{}.toml", std::process::id()));
    // The upgrade deadline is long: the connect deadline, set at the
    // upgrade, must replace it (the client's reads give up after 10 s).
    let limits =
        "connect_timeout_secs = 1\nhandshake_timeout_secs = 60\nping_secs = 1\npong_timeout_secs = 1\n";
    std::fs::write(&p, format!("[limits]\n{limits}")).unwrap();
    let c = Cluster::start(1, 1, &["--config", p.to_str().unwrap()]);
    // Upgraded, never sends `connect`: 3502 stale.
    let mut idle = Ws::connect(c.ws_addrs[0], "/connection/websocket").expect("upgrade");
    // Connected, never answers the server's pings: 3012 no pong.
    let mut deaf = c.client(0, "deaf");
    deaf.set_answer_pings(false);
    // Connected and answering every ping (by hand, counting them): kept.
    let mut alive = c.client(0, "alive");
    alive.set_answer_pings(false);
    let mut pongs = 0;
    while pongs < 4 {
        match alive.next_event() {
            Some(e2e::Event::Json(v)) if v == json!({}) => {
                alive.send_json(&json!({}));
                pongs += 1;
            }
            other => panic!("expected the server's pings, got {other:?}"),
        }
    }
    assert_eq!(alive.call(json!({"ping": {}}))["ping"], json!({}), "answering pings keeps a session");
    assert_eq!(idle.expect_close(), Some(3502));
    assert_eq!(deaf.expect_close(), Some(3012));
}

/// The bystander's channel and what was published on it.
struct Log<'a> {
    api: std::net::SocketAddr,
    channel: &'a str,
    published: e2e::Published,
    step: u64,
}

impl Log<'_> {
    /// Publishes the next step through the API (recorded); its offset.
    fn publish(&mut self, after: &str) -> u64 {
        self.step += 1;
        self.published.publish(self.api, self.channel, json!({"step": self.step, "after": after}))
    }
}

/// Every hardening bound answered as documented while a bystander on the
/// same gateway keeps receiving every offset of its channel, once, in order,
/// with the payloads published: tokens (`nbf`, `aud`, `iss`, an empty
/// `sub`), the router-bound request budget and in-flight cap (111, then
/// 3013), a publish flood's 3013 surviving the close, API keys (headers
/// only; the old forwarded marker carries no authority), and the router's
/// channel cap (error 100, temporary).
#[test]
fn hardening_bounds_answer_and_a_bystander_receives_every_offset_in_order() {
    let dir = std::env::temp_dir().join(format!("sy-hardening-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let router_cfg = dir.join("router.toml");
    std::fs::write(&router_cfg, "shards = 1\nmax_channels = 24\n").unwrap();
    let budget = dir.join("budget.toml");
    std::fs::write(
        &budget,
        "[limits]\nrequest_rate = 0.01\nrequest_burst = 3\nmax_refusals = 6\npublish_rate = 0.01\npublish_burst = 5\n",
    )
    .unwrap();
    let claims = dir.join("claims.toml");
    std::fs::write(&claims, "[auth]\naudience = \"chat\"\nissuer = \"backend\"\n").unwrap();
    // Gateway 0: defaults; 1: a tight budget (the bystander's); 2: aud and iss.
    let mut c = Cluster::start_with(1, 1, &["--config", router_cfg.to_str().unwrap()], &[]);
    c.add_gateway(1, &["--config", budget.to_str().unwrap()]);
    c.add_gateway(2, &["--config", claims.to_str().unwrap()]);

    let mut log =
        Log { api: c.api_addrs[0], channel: "chat:bystander", published: Default::default(), step: 0 };
    let mut bystander = c.client(1, "bystander");
    let mut stream = e2e::StreamCheck::subscribe(&mut bystander, log.channel);
    log.publish("start");

    // Tokens. `nbf` in the future: invalid (3500). A signed token with an
    // empty `sub` is an anonymous user, as in Centrifugo.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut ws = Ws::connect(c.ws_addrs[1], "/connection/websocket").unwrap();
    ws.send_json(&json!({"id": 1, "connect": {"token": token_with(json!({"sub": "u", "nbf": now + 3600}))}}));
    assert_eq!(ws.expect_close(), Some(3500), "nbf in the future");
    let mut anon = Ws::connect(c.ws_addrs[1], "/connection/websocket").unwrap();
    let r = anon.call(json!({"connect": {"token": token_with(json!({"sub": ""}))}}));
    assert!(r["connect"]["client"].is_string(), "an empty sub connects anonymously: {r}");
    // With `aud` and `iss` configured, a token must carry both, right.
    for (claims, ok) in [
        (json!({"sub": "u"}), false),
        (json!({"sub": "u", "aud": "chat"}), false),
        (json!({"sub": "u", "aud": "other", "iss": "backend"}), false),
        (json!({"sub": "u", "aud": "chat", "iss": "someone"}), false),
        (json!({"sub": "u", "aud": "chat", "iss": "backend"}), true),
    ] {
        let mut ws = Ws::connect(c.ws_addrs[2], "/connection/websocket").unwrap();
        if ok {
            let r = ws.call(json!({"connect": {"token": token_with(claims.clone())}}));
            assert!(r["connect"]["client"].is_string(), "{claims}: {r}");
        } else {
            ws.send_json(&json!({"id": 1, "connect": {"token": token_with(claims.clone())}}));
            assert_eq!(ws.expect_close(), Some(3500), "{claims}");
        }
    }
    log.publish("tokens");

    // Requests in flight: 40 history requests in one frame, all read in one
    // turn before any answer can come back: the first 32 (the default cap)
    // go to the router, the other 8 are refused with 111 (temporary).
    let mut eager = c.client(0, "eager");
    let lines: Vec<String> = (0..40)
        .map(|i| json!({"id": 100 + i, "history": {"channel": log.channel, "limit": 1}}).to_string())
        .collect();
    eager.send_frame(OpCode::Text, lines.join("\n").as_bytes());
    let (mut answered, mut refused) = (0, 0);
    while answered + refused < 40 {
        match eager.next_event() {
            Some(e2e::Event::Json(v)) if v["id"].as_u64().is_some_and(|id| (100..140).contains(&id)) => {
                if v["error"]["code"] == 111 {
                    assert_eq!(v["error"]["temporary"], true, "{v}");
                    refused += 1;
                } else {
                    assert!(v["history"].is_object(), "{v}");
                    answered += 1;
                }
            }
            Some(e2e::Event::Json(_)) => {}
            other => panic!("expected history answers, got {other:?}"),
        }
    }
    assert_eq!((answered, refused), (32, 8), "the in-flight cap");
    log.publish("in flight");

    // The request budget (burst 3, no refill while the test runs): one
    // request at a time, 3 answered, then 111 until `max_refusals` (6),
    // then 3013 — and the close frame arrives (no reset destroys it).
    let mut greedy = c.client(1, "greedy");
    let mut codes = Vec::new();
    for _ in 0..9 {
        let r = greedy.call(json!({"history": {"channel": log.channel, "limit": 1}}));
        codes.push(r["error"]["code"].as_u64().unwrap_or(0));
    }
    assert_eq!(codes, [0, 0, 0, 111, 111, 111, 111, 111, 111], "{codes:?}");
    greedy.send_json(&json!({"id": 999, "presence_stats": {"channel": log.channel}}));
    assert_eq!(greedy.expect_close(), Some(3013));
    log.publish("budget");

    // A publish flood: 3013, and the close frame survives the close.
    let mut flood = c.client(1, "flood");
    assert!(flood.call(json!({"subscribe": {"channel": "chat:flood"}})).get("error").is_none());
    let mut frames = Vec::new();
    for i in 0..2000 {
        let cmd = json!({"id": i + 1, "publish": {"channel": "chat:flood", "data": {"i": i}}}).to_string();
        proto::ws::encode_frame(&mut frames, true, OpCode::Text, cmd.as_bytes(), Some(rand::random()));
    }
    flood.send_raw(&frames);
    assert_eq!(flood.expect_close(), Some(3013), "publish flood");
    log.publish("flood");

    // API keys: only from headers, compared whole; the old forwarded marker
    // gives a caller nothing (no key: 401; with the key: an ordinary call,
    // answered by the owner).
    let body = json!({"channel": log.channel, "data": {"step": "never"}}).to_string();
    let short = &e2e::API_KEY[..e2e::API_KEY.len() - 1];
    for (path, headers) in [
        (format!("/api/publish?api_key={}", e2e::API_KEY), vec![]),
        ("/api/publish".to_owned(), vec![("X-API-Key", "dev-api-key")]),
        ("/api/publish".to_owned(), vec![("X-API-Key", short)]),
        ("/api/publish".to_owned(), vec![("x-switchyard-forwarded", "1")]),
    ] {
        let (st, _) = e2e::http_request(log.api, "POST", &path, &headers, &body);
        assert_eq!(st, 401, "{path} {headers:?}");
    }
    let marked = json!({"step": "marked"});
    let (st, out) = e2e::http_request(
        log.api,
        "POST",
        "/api/publish",
        &[("X-API-Key", e2e::API_KEY), ("x-switchyard-forwarded", "1")],
        &json!({"channel": log.channel, "data": marked}).to_string(),
    );
    assert_eq!(st, 200, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let marked_offset = v["result"]["offset"].as_u64().unwrap_or_else(|| panic!("{v}"));
    let epoch = v["result"]["epoch"].as_str().unwrap();
    assert_eq!(marked_offset, log.published.top(log.channel, epoch) + 1);

    // The router's channel cap: fresh names until error 100 (temporary).
    let mut hog = c.client(0, "hog");
    let mut made = 0;
    let refusal = loop {
        let r = hog.call(json!({"subscribe": {"channel": format!("chat:hog-{made}")}}));
        if r.get("error").is_some() {
            break r;
        }
        made += 1;
        assert!(made < 24, "the cap never answered");
    };
    assert_eq!(refusal["error"]["code"], 100, "{refusal}");
    assert_eq!(refusal["error"]["message"], "channel limit reached", "{refusal}");
    assert_eq!(refusal["error"]["temporary"], true, "{refusal}");
    assert!(e2e::metric(&c.router_metrics(0), "switchyard_router_channel_limit_refusals_total") >= 1);
    // The bystander's channel exists: it keeps working at the cap.
    let last = log.publish("channel cap");

    // Everything, in order, once, with its payload.
    stream.receive_through(&mut bystander, last);
    let marked_got: Vec<_> = stream.received.iter().filter(|r| r.offset == marked_offset).collect();
    assert_eq!(marked_got.len(), 1);
    assert_eq!(marked_got[0].data, marked);
    stream.received.retain(|r| r.offset != marked_offset);
    stream.verify_payloads(&log.published);
    assert_eq!(stream.received.len() as u64, last - 1, "every other offset, once");
    assert_eq!(stream.offset, last);
    std::fs::remove_dir_all(dir).unwrap();
}
