//! The HTTP fallback transports against real gateway and router processes:
//! `http_stream` and `sse` sessions whose later commands come through
//! `POST /emulation` (read by whichever core the kernel picks, routed to
//! the session's core), `uni_http_stream` and `uni_sse` (server-side
//! subscriptions only, read with curl), bad requests and their statuses,
//! the drain, and the publication framed once per core and transport.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::fallback::{Stream, emulate, encode};
use e2e::{Cluster, http_request, metric, token, token_with, wait_until};
use serde_json::{Value, json};

fn secs(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

/// Opens an emulated session (`http_stream` by POST, `sse` by GET) for
/// `user`; returns it with its connect result.
fn open(c: &Cluster, transport: &str, user: &str) -> (Stream, Value) {
    open_at(c.ws_addrs[0], transport, user)
}

fn open_at(addr: std::net::SocketAddr, transport: &str, user: &str) -> (Stream, Value) {
    let connect = json!({"id": 1, "connect": {"token": token(user), "name": "e2e"}}).to_string();
    let mut st = match transport {
        "http_stream" => Stream::post(addr, "/connection/http_stream", &connect),
        _ => Stream::get(addr, &format!("/connection/sse?cf_connect={}", encode(&connect))),
    };
    assert_eq!(st.status, 200, "{}", st.head);
    assert!(st.head.contains("Transfer-Encoding: chunked"), "{}", st.head);
    if transport == "sse" {
        assert!(st.head.contains("text/event-stream"), "{}", st.head);
    } else {
        assert!(st.head.contains("Access-Control-Allow-Origin: http://page.example"), "{}", st.head);
    }
    let reply = st.until(secs(10), "the connect reply", |v| v["id"] == 1);
    let result = reply["connect"].clone();
    assert!(result["session"].is_string() && result["node"].is_string(), "{reply}");
    assert_eq!(result["pong"], true, "{reply}");
    (st, result)
}

/// A settled router and 2-core gateway, the gateway with this config file.
fn configured(name: &str, toml: &str) -> Cluster {
    let p = std::env::temp_dir().join(format!("sy-fallback-{name}-{}.toml", std::process::id()));
    std::fs::write(&p, toml).unwrap();
    let c = Cluster::start(1, 1, &["--config", p.to_str().unwrap()]);
    c.settle();
    c
}

fn session(r: &Value) -> (String, String) {
    (r["session"].as_str().unwrap().to_owned(), r["node"].as_str().unwrap().to_owned())
}

#[test]
fn emulated_sessions_take_commands_from_any_core_and_receive_publications() {
    let c = Cluster::start(1, 1, &[]);
    c.settle();
    // Users land on both cores; each emulation request is read by the core
    // the kernel gives its connection, usually not the session's.
    let mut sessions = Vec::new();
    for i in 0..8 {
        let transport = if i % 2 == 0 { "http_stream" } else { "sse" };
        let (st, r) = open(&c, transport, &format!("fb-user-{i}"));
        sessions.push((transport, st, r));
    }
    let mut nodes = std::collections::HashSet::new();
    for (i, (transport, st, r)) in sessions.iter_mut().enumerate() {
        let (sid, node) = session(r);
        nodes.insert(node.clone());
        let sub = json!({"id": 2, "subscribe": {"channel": "chat:fallback"}}).to_string();
        let ping = json!({"id": 3, "ping": {}}).to_string();
        // Two commands in one request, as the SDK batches them.
        assert_eq!(emulate(c.ws_addrs[0], &sid, &node, &format!("{sub}\n{ping}")), 204, "{transport} {i}");
        // Replies come as they are ready (the subscribe's after a router's answer).
        let mut ids = Vec::new();
        while ids.len() < 2 {
            let reply =
                st.until(secs(10), "the subscribe and ping replies", |v| v["id"] == 2 || v["id"] == 3);
            assert!(reply.get("error").is_none(), "{reply}");
            ids.push(reply["id"].as_u64().unwrap());
        }
        ids.sort();
        assert_eq!(ids, [2, 3]);
    }
    assert_eq!(nodes.len(), 2, "the users live on both cores: {nodes:?}");
    for n in 0..5 {
        let (status, body) = c.api(0, "publish", &json!({"channel": "chat:fallback", "data": {"n": n}}));
        assert_eq!(status, 200, "{body}");
    }
    for (transport, st, _) in sessions.iter_mut() {
        for n in 0..5 {
            let p = st.until(secs(10), "a publication", |v| v["push"]["pub"].is_object());
            assert_eq!(p["push"]["channel"], "chat:fallback", "{transport}");
            assert_eq!(p["push"]["pub"]["data"]["n"], n, "{transport}: in order, once");
        }
    }
    // A client publish through emulation reaches everyone.
    let (sid, node) = session(&sessions[0].2);
    let publish = json!({"id": 4, "publish": {"channel": "chat:fallback", "data": {"from": "client"}}});
    assert_eq!(emulate(c.ws_addrs[0], &sid, &node, &publish.to_string()), 204);
    for (_, st, _) in sessions.iter_mut() {
        let p = st.until(secs(10), "the client's publication", |v| v["push"]["pub"].is_object());
        assert_eq!(p["push"]["pub"]["data"]["from"], "client");
    }
    // Every publication was framed once per core for each transport with
    // sessions there (2 cores × 2 transports × 6 publications at most), not
    // once per session.
    let framed = metric(&c.metrics(0), "switchyard_gateway_frames_reframed_total");
    assert!(framed > 0 && framed <= 24, "{framed} framings for 6 publications to 8 sessions");
    let m = c.metrics(0);
    assert!(metric(&m, "switchyard_gateway_emulation_requests_total{core=\"0\"}") > 0, "{m}");
    assert!(metric(&m, "switchyard_gateway_emulation_requests_total{core=\"1\"}") > 0, "{m}");
}

#[test]
fn bad_fallback_requests_get_their_status_and_other_sessions_go_on() {
    let c = Cluster::start(1, 1, &[]);
    c.settle();
    let (mut st, r) = open(&c, "http_stream", "fb-bad");
    let (sid, node) = session(&r);
    let addr = c.ws_addrs[0];
    let post = |path: &str, body: &str| http_request(addr, "POST", path, &[], body).0;
    assert_eq!(emulate(addr, "no-such-session", &node, "{\"id\":9,\"ping\":{}}"), 404, "unknown session");
    // A node of another gateway process goes to a router, which has no
    // such gateway linked: accepted here, dropped there, counted.
    assert_eq!(
        emulate(addr, &sid, "gw-elsewhere/0", "{\"id\":9,\"ping\":{}}"),
        202,
        "another gateway's node"
    );
    wait_until(
        Duration::from_secs(10),
        "the router's count of relays dropped",
        || metric(&c.router_metrics(0), "switchyard_router_emulations_dropped_total"),
        |n| *n == 1,
    );
    assert_eq!(emulate(addr, &sid, "", "{\"id\":9,\"ping\":{}}"), 404, "no node");
    assert_eq!(emulate(addr, &sid, "gw-elsewhere/x", "{}"), 404, "a node without a core");
    assert_eq!(
        emulate(addr, &sid, &format!("{}/99", node.split('/').next().unwrap()), "{}"),
        404,
        "no such core"
    );
    assert_eq!(post("/emulation", "not json"), 400, "not an emulation request");
    assert_eq!(post("/emulation", "{\"session\":1}"), 400, "fields of the wrong type");
    assert_eq!(http_request(addr, "GET", "/emulation", &[], "").0, 405, "GET /emulation");
    assert_eq!(http_request(addr, "PUT", "/connection/http_stream", &[], "").0, 405, "PUT");
    assert_eq!(http_request(addr, "GET", "/connection/http_stream", &[], "").0, 405, "GET http_stream");
    assert_eq!(http_request(addr, "GET", "/connection/sse", &[], "").0, 400, "sse without cf_connect");
    let big = "x".repeat(70_000);
    assert_eq!(post("/emulation", &big), 413, "a body over 64 KiB");
    let (status, _) =
        http_request(addr, "POST", "/emulation", &[("Content-Type", "application/octet-stream")], "\x01\x02");
    assert_eq!(status, 415, "protobuf is not served");
    // A chunked request body: the length is required.
    let mut raw = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    raw.write_all(b"POST /emulation HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    let _ = raw.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 411"), "{out}");
    // A preflight is answered with what the page may send.
    let (status, _) = http_request(
        addr,
        "OPTIONS",
        "/emulation",
        &[("Origin", "http://page.example"), ("Access-Control-Request-Headers", "content-type")],
        "",
    );
    assert_eq!(status, 204);
    // A stream whose first command is not connect ends with 3501.
    let mut bad = Stream::post(addr, "/connection/http_stream", "{\"id\":1,\"ping\":{}}");
    assert_eq!(bad.status, 200);
    let (clean, lines) = bad.wait_end(secs(10));
    assert!(clean && lines.iter().any(|l| l.contains("\"code\":3501")), "{lines:?}");
    // Garbage commands through emulation end that session (3501), cleanly.
    let (mut victim, vr) = open(&c, "sse", "fb-victim");
    let (vsid, vnode) = session(&vr);
    assert_eq!(emulate(addr, &vsid, &vnode, "{not json"), 204);
    let (clean, lines) = victim.wait_end(secs(10));
    assert!(clean && lines.iter().any(|l| l.contains("\"disconnect\"")), "{lines:?}");
    // The first session never noticed.
    assert_eq!(emulate(addr, &sid, &node, "{\"id\":5,\"ping\":{}}"), 204);
    st.until(secs(10), "the ping reply", |v| v["id"] == 5);
}

#[test]
fn emulation_requests_reach_sessions_of_another_gateway_process_through_a_router() {
    let mut c = Cluster::start(2, 0, &[]);
    // Two gateway processes on one port: the kernel spreads both the
    // streams and the emulation requests over them.
    let ws: std::net::SocketAddr = format!("127.0.0.1:{}", e2e::free_tcp_port()).parse().unwrap();
    c.add_gateway_at(0, ws, &[]);
    c.add_gateway_at(1, ws, &[]);
    c.settle();
    let mut sessions = Vec::new();
    for i in 0..12 {
        let (st, r) = open_at(ws, if i % 2 == 0 { "http_stream" } else { "sse" }, &format!("multi-{i}"));
        sessions.push((st, session(&r)));
    }
    let gateways: std::collections::HashSet<String> =
        sessions.iter().map(|(_, (_, node))| node.split('/').next().unwrap().to_owned()).collect();
    assert_eq!(gateways.len(), 2, "the streams landed on both processes: {gateways:?}");
    let mut statuses = std::collections::HashMap::new();
    for round in 0..3u32 {
        for (_, (sid, node)) in sessions.iter() {
            let data = json!({"id": 20 + round, "ping": {}}).to_string();
            let status = emulate(ws, sid, node, &data);
            assert!(status == 204 || status == 202, "{status}");
            *statuses.entry(status).or_insert(0) += 1;
        }
    }
    for (st, _) in sessions.iter_mut() {
        for round in 0..3u32 {
            st.until(secs(10), "each round's ping reply, through whichever process", |v| {
                v["id"] == 20 + round
            });
        }
    }
    assert!(statuses.contains_key(&202) && statuses.contains_key(&204), "both paths taken: {statuses:?}");
    let relayed: u64 =
        (0..2).map(|r| metric(&c.router_metrics(r), "switchyard_router_emulations_relayed_total")).sum();
    assert_eq!(relayed, statuses[&202], "every 202 was relayed");
}

#[test]
fn keep_alive_emulation_requests_are_answered_in_order_on_one_connection() {
    use std::io::{Read, Write};
    let c = Cluster::start(1, 1, &[]);
    c.settle();
    let mut sessions: Vec<(Stream, String, String)> = (0..4)
        .map(|i| {
            let (st, r) = open(&c, "http_stream", &format!("ka-{i}"));
            let (sid, node) = session(&r);
            (st, sid, node)
        })
        .collect();
    let mut conn = std::net::TcpStream::connect(c.ws_addrs[0]).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Nine requests written at once (pipelined), to sessions on both cores:
    // two rounds of four, then one for a session that does not exist (its
    // 404 must come ninth, after every 204, and close the connection).
    let request = |sid: &str, node: &str, id: u32| {
        let data = json!({"id": id, "ping": {}}).to_string();
        let body = json!({"session": sid, "node": node, "data": data}).to_string();
        format!("POST /emulation HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len())
    };
    let mut all = String::new();
    for round in 0..2u32 {
        for (_, sid, node) in sessions.iter() {
            all.push_str(&request(sid, node, 10 + round));
        }
    }
    all.push_str(&request(&"0".repeat(32), &sessions[0].2, 99));
    conn.write_all(all.as_bytes()).unwrap();
    let mut text = String::new();
    let _ = conn.read_to_string(&mut text);
    let statuses: Vec<&str> = text.match_indices("HTTP/1.1 ").map(|(i, _)| &text[i + 9..i + 12]).collect();
    assert_eq!(statuses, ["204", "204", "204", "204", "204", "204", "204", "204", "404"], "{text}");
    for (st, _, _) in sessions.iter_mut() {
        st.until(secs(10), "round 0", |v| v["id"] == 10);
        st.until(secs(10), "round 1", |v| v["id"] == 11);
    }
}

#[test]
fn request_connections_are_bounded_and_never_hold_a_handshake_slot() {
    use std::io::{Read, Write};
    let c = configured("adm", "[admission]\nmax_pending_handshakes = 5\n");
    let addr = c.ws_addrs[0];
    // Preflights answered and closed: none of them keeps a handshake slot.
    for _ in 0..20 {
        let (status, _) =
            http_request(addr, "OPTIONS", "/emulation", &[("Origin", "http://page.example")], "");
        assert_eq!(status, 204);
    }
    let pending = |c: &Cluster| {
        let m = c.metrics(0);
        (0..2)
            .map(|core| metric(&m, &format!("switchyard_gateway_pending_handshakes{{core=\"{core}\"}}")))
            .sum::<u64>()
    };
    wait_until(Duration::from_secs(10), "no handshake in progress", || pending(&c), |n| *n == 0);
    // Thousands of requests in one write: 429, the connection closed, and
    // the gateway serves on (no unbounded work, no stack to run out of).
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let flood = "OPTIONS /emulation HTTP/1.1\r\nHost: x\r\n\r\n".repeat(3000);
    let _ = conn.write_all(flood.as_bytes());
    let mut text = String::new();
    let _ = conn.read_to_string(&mut text);
    assert!(text.contains("HTTP/1.1 429"), "{}", &text[text.len().saturating_sub(300)..]);
    assert!(text.matches("HTTP/1.1 204").count() <= 64, "at most 64 answered per read");
    let mut ws = c.client(0, "after-the-flood");
    let r = ws.call(json!({"id": 2, "ping": {}}));
    assert!(r.get("error").is_none(), "{r}");
    wait_until(Duration::from_secs(10), "no handshake in progress", || pending(&c), |n| *n == 0);
    // A session's commands need its secret: its client id, which others
    // see (presence, join/leave), is not enough.
    let (mut st, r) = open(&c, "http_stream", "owner");
    let (_, node) = session(&r);
    let client = r["client"].as_str().unwrap();
    assert_eq!(emulate(addr, client, &node, "{\"id\":5,\"ping\":{}}"), 404);
    assert_eq!(emulate(addr, &client.replace('-', "")[..32], &node, "{\"id\":5,\"ping\":{}}"), 404);
    assert!(
        st.next_line(Instant::now() + Duration::from_millis(300)).is_none(),
        "nothing reached the session"
    );
}

#[test]
fn unidirectional_streams_deliver_server_side_subscriptions_to_curl() {
    let c = Cluster::start(1, 1, &["--drain-secs", "1"]);
    c.settle();
    let tok = token_with(json!({"sub": "uni-user", "channels": ["chat:uni"]}));
    let connect = json!({"token": tok}).to_string();
    let addr = c.ws_addrs[0];
    let curl = |args: &[String]| {
        Command::new("curl")
            .args(["-sS", "-N", "--max-time", "8"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("curl")
    };
    let http = curl(&[
        "-X".into(),
        "POST".into(),
        "--data".into(),
        connect.clone(),
        format!("http://{addr}/connection/uni_http_stream"),
    ]);
    let sse = curl(&[format!("http://{addr}/connection/uni_sse?cf_connect={}", encode(&connect))]);
    // Both are subscribed once the presence of the user says two clients.
    wait_until(
        Duration::from_secs(10),
        "both unidirectional clients in the channel's presence",
        || {
            let (_, body) = c.api(0, "presence", &json!({"channel": "chat:uni"}));
            serde_json::from_str::<Value>(&body).ok()?["result"]["presence"].as_object().map(|p| p.len())
        },
        |n| *n == Some(2),
    );
    for n in 0..3 {
        let (status, body) = c.api(0, "publish", &json!({"channel": "chat:uni", "data": {"n": n}}));
        assert_eq!(status, 200, "{body}");
    }
    // The drain ends both streams with the disconnect push and the last chunk.
    std::thread::sleep(Duration::from_millis(300));
    c.gateways[0].signal(libc::SIGTERM);
    let http = http.wait_with_output().unwrap();
    let sse = sse.wait_with_output().unwrap();
    let http = String::from_utf8_lossy(&http.stdout).into_owned();
    let sse = String::from_utf8_lossy(&sse.stdout).into_owned();
    let lines: Vec<Value> =
        http.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect();
    assert!(lines[0]["connect"]["client"].is_string(), "{http}");
    assert!(lines[0]["connect"]["subs"]["chat:uni"].is_object(), "{http}");
    assert_eq!(lines[0]["connect"].get("pong"), None, "a unidirectional client is not asked to pong");
    let pubs: Vec<&Value> = lines.iter().filter(|v| v["pub"].is_object()).collect();
    assert_eq!(pubs.len(), 3, "{http}");
    for (n, p) in pubs.iter().enumerate() {
        assert_eq!(p["channel"], "chat:uni");
        assert_eq!(p["pub"]["data"]["n"], n as u64);
    }
    assert_eq!(lines.last().unwrap()["disconnect"]["code"], 3001, "{http}");
    let events: Vec<Value> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(events[0]["connect"]["client"].is_string(), "{sse}");
    assert_eq!(events.iter().filter(|v| v["pub"].is_object()).count(), 3, "{sse}");
    assert_eq!(events.last().unwrap()["disconnect"]["code"], 3001, "{sse}");
}

#[test]
fn a_drain_ends_emulated_streams_with_3001_and_the_last_chunk() {
    let c = Cluster::start(1, 1, &["--drain-secs", "1"]);
    c.settle();
    let mut streams: Vec<Stream> = (0..4)
        .map(|i| open(&c, if i % 2 == 0 { "http_stream" } else { "sse" }, &format!("drain-{i}")).0)
        .collect();
    c.gateways[0].signal(libc::SIGTERM);
    for st in streams.iter_mut() {
        let (clean, lines) = st.wait_end(secs(15));
        assert!(clean, "the last chunk came: {lines:?}");
        let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
        assert_eq!(last["push"]["disconnect"]["code"], 3001, "{lines:?}");
    }
}

#[test]
fn emulated_sessions_answer_pings_through_emulation_or_close_with_3012() {
    let c = configured("ping", "[limits]\nping_secs = 1\npong_timeout_secs = 1\n");
    let (mut alive, r) = open(&c, "sse", "pinged-alive");
    let (sid, node) = session(&r);
    let (mut deaf, _) = open(&c, "http_stream", "pinged-deaf");
    // The server's pings arrive on the stream; the pongs go back through
    // emulation, and the session lives on.
    for _ in 0..4 {
        alive.until(secs(10), "a server ping", |v| *v == json!({}));
        assert_eq!(emulate(c.ws_addrs[0], &sid, &node, "{}"), 204);
    }
    assert_eq!(emulate(c.ws_addrs[0], &sid, &node, "{\"id\":7,\"ping\":{}}"), 204);
    alive.until(secs(10), "the session still answers", |v| v["id"] == 7);
    // Without pongs: the stream ends with 3012.
    let (clean, lines) = deaf.wait_end(secs(15));
    assert!(clean, "{lines:?}");
    let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(last["push"]["disconnect"]["code"], 3012, "{lines:?}");
}
