//! The proxy hooks against a real HTTP backend started by the test: every
//! outcome of every hook (result, error, disconnect, a bad answer, a 5xx),
//! a slow backend (the timeout), a dead one (the circuit breaker), the
//! forwarded headers, and the per-hook metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e::backend::{Backend, Call, Reply};
use e2e::{Cluster, Event, Ws, metric, wait_until};
use proto::ws::OpCode;
use serde_json::{Value, json};

const PATH: &str = "/connection/websocket";

fn config(name: &str, text: &str) -> String {
    let p = std::env::temp_dir().join(format!("sy-proxy-{name}-{}.toml", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

fn unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn calls(c: &Cluster, i: usize, hook: &str) -> u64 {
    metric(&c.metrics(i), &format!("switchyard_gateway_proxy_calls_total{{hook=\"{hook}\"}}"))
}

fn errors(c: &Cluster, i: usize, hook: &str, kind: &str) -> u64 {
    metric(
        &c.metrics(i),
        &format!("switchyard_gateway_proxy_errors_total{{hook=\"{hook}\",kind=\"{kind}\"}}"),
    )
}

/// The connect hook: who connects is the backend's answer to the `data`.
fn connect_backend() -> Backend {
    Backend::start(|call: &Call| {
        let who = call.body["data"]["as"].as_str().unwrap_or("").to_owned();
        match who.as_str() {
            "refuse" => Reply::json(json!({"error": {"code": 1001, "message": "bad credentials"}})),
            "ban" => Reply::json(json!({"disconnect": {"code": 4501, "reason": "banned"}})),
            "garbage" => Reply { status: 200, body: "not json".into(), delay: Duration::ZERO },
            "crash" => Reply { status: 500, body: "{}".into(), delay: Duration::ZERO },
            "slow" => {
                Reply { delay: Duration::from_secs(2), ..Reply::json(json!({"result": {"user": "slow"}})) }
            }
            user => Reply::json(json!({"result": {
                "user": user,
                "info": {"name": user},
                "data": {"welcome": user},
                "channels": ["chat:news"],
            }})),
        }
    })
}

/// Upgrades with a cookie and an authorization header, and sends `connect`
/// (no token) and a `subscribe` in one frame, as centrifuge-js does.
fn connect_as(c: &Cluster, who: &str) -> (Ws, Value, Value) {
    let cookie = format!("session={who}");
    let headers = [("Cookie", cookie.as_str()), ("Authorization", "Bearer app-token"), ("X-Secret", "no")];
    let mut ws = Ws::connect_with_headers(c.ws_addrs[0], PATH, false, &headers).unwrap();
    let frame = format!(
        "{}\n{}",
        json!({"id": 1, "connect": {"data": {"as": who}, "name": "e2e"}}),
        json!({"id": 2, "subscribe": {"channel": "typing:side"}})
    );
    ws.send_frame(OpCode::Text, frame.as_bytes());
    let end = Instant::now() + Duration::from_secs(10);
    let (mut connect, mut subscribe) = (Value::Null, Value::Null);
    while connect.is_null() || subscribe.is_null() {
        match ws.event_by(end, "the connect and subscribe replies") {
            Some(Event::Json(v)) if v["id"] == 1 => connect = v,
            Some(Event::Json(v)) if v["id"] == 2 => subscribe = v,
            Some(Event::Json(_)) => {}
            other => panic!("{who}: {other:?}"),
        }
    }
    (ws, connect, subscribe)
}

#[test]
fn the_connect_hook_says_who_connects_and_every_outcome_reaches_the_client() {
    let backend = connect_backend();
    let cfg = config(
        "connect",
        &format!(
            "[proxy]\nhttp_headers = [\"Cookie\", \"Authorization\"]\n[proxy.connect]\nendpoint = \"{}\"\n",
            backend.url("connect")
        ),
    );
    let c = Cluster::start(1, 1, &["--config", &cfg]);
    c.settle();
    // Sixteen users on a 2-core gateway: most arrive on the core that is
    // not their user's, and move there with the hook's answer.
    let mut clients = Vec::new();
    for i in 0..16 {
        let who = format!("user-{i}");
        let (ws, connect, subscribe) = connect_as(&c, &who);
        let r = &connect["connect"];
        assert!(r["client"].is_string(), "{connect}");
        assert_eq!(r["data"], json!({"welcome": who}), "{connect}");
        assert!(r.get("expires").is_none(), "{connect}");
        assert!(r["subs"]["chat:news"].is_object(), "the hook's channels are subscribed: {connect}");
        assert!(subscribe.get("error").is_none(), "the frame's other command is handled after: {subscribe}");
        let call = backend.calls_to("/connect").into_iter().find(|c| c.body["data"]["as"] == who.as_str());
        let call = call.expect("the hook was called");
        assert_eq!(call.body["client"], r["client"], "the hook is told the connection id");
        assert_eq!(call.body["transport"], "websocket");
        assert_eq!(call.body["name"], "e2e");
        assert!(call.body.get("user").is_none(), "{:?}", call.body);
        assert_eq!(call.header("cookie"), Some(format!("session={who}").as_str()));
        assert_eq!(call.header("authorization"), Some("Bearer app-token"));
        assert_eq!(call.header("x-secret"), None, "only the configured headers are forwarded");
        clients.push((who, ws));
    }
    assert!(
        metric(&c.metrics(0), "switchyard_gateway_handovers_total") > 0,
        "some moved to their user's core"
    );
    // The server-side channel delivers, with the user the hook named.
    let (status, body) = c.api(0, "publish", &json!({"channel": "chat:news", "data": {"n": 1}}));
    assert_eq!(status, 200, "{body}");
    for (who, ws) in &mut clients {
        let p = ws.next_pub().unwrap_or_else(|| panic!("{who} got nothing"));
        assert_eq!(p["push"]["pub"]["data"], json!({"n": 1}), "{p}");
    }
    let (status, body) = c.api(0, "presence", &json!({"channel": "chat:news"}));
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("user-3") && body.contains("\"name\":\"user-3\""),
        "presence has the hook's user and info: {body}"
    );

    // An error answer is the connect's error reply.
    let mut ws = Ws::connect(c.ws_addrs[0], PATH).unwrap();
    let r = ws.call(json!({"connect": {"data": {"as": "refuse"}}}));
    assert_eq!(r["error"], json!({"code": 1001, "message": "bad credentials"}), "{r}");
    // Two connects in one frame, both refused: each asks the hook once and
    // gets its own answer (the frame resumes at the connect that asked).
    let refusals =
        || backend.calls_to("/connect").iter().filter(|c| c.body["data"]["as"] == "refuse").count();
    let before = refusals();
    let mut ws = Ws::connect(c.ws_addrs[0], PATH).unwrap();
    let both = format!(
        "{}\n{}",
        json!({"id": 1, "connect": {"data": {"as": "refuse"}}}),
        json!({"id": 2, "connect": {"data": {"as": "refuse"}}})
    );
    ws.send_frame(OpCode::Text, both.as_bytes());
    for id in [1, 2] {
        let r = ws.next_event();
        let Some(Event::Json(r)) = r else { panic!("{r:?}") };
        assert_eq!((r["id"].as_u64(), r["error"]["code"].as_u64()), (Some(id), Some(1001)), "{r}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(refusals() - before, 2, "one call per connect, no loop");
    // A disconnect answer closes with its code.
    let mut ws = Ws::connect(c.ws_addrs[0], PATH).unwrap();
    ws.send_json(&json!({"id": 1, "connect": {"data": {"as": "ban"}}}));
    assert_eq!(ws.expect_close(), Some(4501));
    // A bad answer and a 5xx: error 100, temporary (the SDK retries).
    for who in ["garbage", "crash"] {
        let mut ws = Ws::connect(c.ws_addrs[0], PATH).unwrap();
        let r = ws.call(json!({"connect": {"data": {"as": who}}}));
        assert_eq!(r["error"]["code"], 100, "{who}: {r}");
        assert_eq!(r["error"]["temporary"], true, "{who}: {r}");
    }
    // While the hook has not answered, what the client sends waits, up to
    // 64 KiB: more closes the connection with 3013.
    let mut ws = Ws::connect(c.ws_addrs[0], PATH).unwrap();
    ws.send_json(&json!({"id": 1, "connect": {"data": {"as": "slow"}}}));
    let filler =
        json!({"id": 2, "publish": {"channel": "chat:news", "data": "x".repeat(30_000)}}).to_string();
    for _ in 0..3 {
        ws.send_frame(OpCode::Text, filler.as_bytes());
    }
    assert_eq!(ws.expect_close(), Some(3013));
    let slow_seen = || backend.calls_to("/connect").iter().any(|c| c.body["data"]["as"] == "slow");
    wait_until(Duration::from_secs(5), "the slow call reached the backend", slow_seen, |seen| *seen);
    // A token is still verified as a JWT, without the hook.
    let before = backend.calls_to("/connect").len();
    let _jwt = c.client(0, "jwt-user");
    assert_eq!(backend.calls_to("/connect").len(), before, "a connect with a token does not ask the hook");
    assert_eq!(calls(&c, 0, "connect"), 16 + 7);
    assert_eq!(errors(&c, 0, "connect", "bad_answer"), 1);
    assert_eq!(errors(&c, 0, "connect", "status"), 1);
    // The latency of every call the backend answered in time (not the 5xx).
    let count = |c: &Cluster| {
        metric(&c.metrics(0), "switchyard_gateway_proxy_duration_seconds_count{hook=\"connect\"}")
    };
    wait_until(Duration::from_secs(10), "every answer timed", || count(&c), |n| *n == 16 + 5);
    // The slow one (2 s) outlived the default timeout (1 s).
    let timeouts = || errors(&c, 0, "connect", "timeout");
    wait_until(Duration::from_secs(10), "the slow call timed out", timeouts, |n| *n == 1);
    // Everyone connected through the hook is still served.
    for (who, ws) in &mut clients {
        let r = ws.call(json!({"presence_stats": {"channel": "chat:news"}}));
        assert!(r.get("error").is_none(), "{who}: {r}");
    }
}

#[test]
fn a_slow_backend_times_out_and_a_dead_one_opens_the_breaker_and_others_are_served() {
    let slow = Backend::start(|_: &Call| Reply {
        status: 200,
        body: json!({"result": {"user": "late"}}).to_string(),
        delay: Duration::from_secs(3),
    });
    let dead = format!("http://127.0.0.1:{}/connect", e2e::free_tcp_port());
    let slow_cfg = config(
        "slow",
        &format!("[proxy.connect]\nendpoint = \"{}\"\ntimeout_ms = 300\n", slow.url("connect")),
    );
    let dead_cfg = config(
        "dead",
        &format!(
            "[proxy]\nbreaker_failures = 3\nbreaker_open_ms = 60000\n[proxy.connect]\nendpoint = \"{dead}\"\n"
        ),
    );
    let mut c = Cluster::start(1, 0, &[]);
    c.add_gateway(0, &["--config", &slow_cfg]);
    c.add_gateway(1, &["--config", &dead_cfg]);
    c.settle();
    let mut established = c.client(0, "established");
    assert!(established.call(json!({"subscribe": {"channel": "chat:calm"}})).get("error").is_none());

    // Slow: the call times out into error 100, temporary.
    let mut ws = Ws::connect(c.ws_addrs[0], PATH).unwrap();
    let r = ws.call(json!({"connect": {}}));
    assert_eq!(r["error"]["code"], 100, "{r}");
    assert_eq!(r["error"]["temporary"], true, "{r}");
    assert_eq!(errors(&c, 0, "connect", "timeout"), 1);
    // The established session was not held up.
    let (status, _) = c.api(0, "publish", &json!({"channel": "chat:calm", "data": {"ok": true}}));
    assert_eq!(status, 200);
    assert_eq!(established.next_pub().expect("a publication")["push"]["pub"]["data"], json!({"ok": true}));

    // Dead: three refused connections open the breaker; after that the
    // calls fail at once, without a connection attempt.
    for i in 0..6 {
        let mut ws = Ws::connect(c.ws_addrs[1], PATH).unwrap();
        let r = ws.call(json!({"connect": {}}));
        assert_eq!(r["error"]["code"], 100, "attempt {i}: {r}");
        assert_eq!(r["error"]["temporary"], true, "attempt {i}: {r}");
    }
    assert_eq!(errors(&c, 1, "connect", "transport"), 3);
    assert_eq!(errors(&c, 1, "connect", "breaker_open"), 3);
    assert_eq!(calls(&c, 1, "connect"), 6);
    // A token connect on that gateway does not need the backend.
    let mut jwt = c.client(1, "with-token");
    assert!(jwt.call(json!({"subscribe": {"channel": "chat:calm"}})).get("error").is_none());
}

#[test]
fn channel_hooks_and_rpc_decide_allow_replace_refuse_and_disconnect() {
    let refreshes = Arc::new(AtomicU32::new(0));
    let r2 = refreshes.clone();
    let backend = Backend::start(move |call: &Call| {
        let b = &call.body;
        let user = b["user"].as_str().unwrap_or("");
        match (call.path.as_str(), b["channel"].as_str().unwrap_or(""), b["method"].as_str().unwrap_or("")) {
            ("/subscribe", "chat:deny", _) => {
                Reply::json(json!({"error": {"code": 1403, "message": "not a member"}}))
            }
            ("/subscribe", "chat:kick", _) => {
                Reply::json(json!({"disconnect": {"code": 4403, "reason": "kicked"}}))
            }
            ("/subscribe", "chat:short", _) => Reply::json(json!({"result": {"expire_at": unix() + 2}})),
            // The first subscribe (its data says which) allows, late; the
            // second refuses at once.
            ("/subscribe", "chat:slow", _) if b["data"]["n"] == 1 => {
                Reply { delay: Duration::from_millis(600), ..Reply::json(json!({"result": {}})) }
            }
            ("/subscribe", "chat:slow", _) => {
                Reply::json(json!({"error": {"code": 1404, "message": "left"}}))
            }
            ("/subscribe", "chat:broken", _) => {
                Reply { status: 500, body: "{}".into(), delay: Duration::ZERO }
            }
            ("/subscribe", _, _) => Reply::json(json!({"result": {"info": {"role": "member"}}})),
            ("/publish", _, _) if b["data"]["text"] == "kick" => {
                Reply::json(json!({"disconnect": {"code": 4501, "reason": "spam"}}))
            }
            ("/publish", _, _) if b["data"]["text"] == "broken" => {
                Reply { status: 200, body: "{}".into(), delay: Duration::ZERO }
            }
            ("/publish", _, _) if b["data"]["text"] == "deny" => {
                Reply::json(json!({"error": {"code": 1500, "message": "moderated"}}))
            }
            ("/publish", _, _) => {
                let text = b["data"]["text"].as_str().unwrap_or("").to_uppercase();
                Reply::json(json!({"result": {"data": {"text": text, "by": user}}}))
            }
            ("/rpc", _, "echo") => {
                Reply::json(json!({"result": {"data": {"echo": b["data"], "user": user}}}))
            }
            ("/rpc", _, "broken") => Reply { status: 503, body: String::new(), delay: Duration::ZERO },
            ("/rpc", _, "kick") => Reply::json(json!({"disconnect": {"code": 4600, "reason": "rpc kick"}})),
            ("/rpc", _, _) => Reply::json(json!({"error": {"code": 1600, "message": "no such method"}})),
            ("/sub_refresh", _, _) if r2.fetch_add(1, Ordering::Relaxed) == 0 => {
                Reply::json(json!({"result": {"expire_at": unix() + 2}}))
            }
            ("/sub_refresh", _, _) => Reply::json(json!({"result": {"expired": true}})),
            _ => Reply { status: 404, body: String::new(), delay: Duration::ZERO },
        }
    });
    let cfg = config(
        "channels",
        &format!(
            "[proxy.rpc]\nendpoint = \"{}\"\n[proxy.namespaces.chat.subscribe]\nendpoint = \"{}\"\n\
             [proxy.namespaces.chat.publish]\nendpoint = \"{}\"\n[proxy.namespaces.chat.sub_refresh]\nendpoint = \"{}\"\n",
            backend.url("rpc"),
            backend.url("subscribe"),
            backend.url("publish"),
            backend.url("sub_refresh")
        ),
    );
    let c = Cluster::start(1, 1, &["--config", &cfg]);
    c.settle();
    let mut alice = c.client(0, "alice");
    let mut bob = c.client(0, "bob");
    for ws in [&mut alice, &mut bob] {
        let r = ws.call(json!({"subscribe": {"channel": "chat:ok"}}));
        assert!(r.get("error").is_none(), "{r}");
    }
    let subs = backend.calls_to("/subscribe");
    assert_eq!(subs.len(), 2, "{subs:?}");
    assert!(subs.iter().any(|c| c.body["user"] == "alice" && c.body["channel"] == "chat:ok"), "{subs:?}");
    // A namespace without hooks is not asked.
    assert!(alice.call(json!({"subscribe": {"channel": "typing:t"}})).get("error").is_none());
    assert_eq!(backend.calls_to("/subscribe").len(), 2);
    // Refused: the error reply is the backend's; the session goes on.
    let r = alice.call(json!({"subscribe": {"channel": "chat:deny"}}));
    assert_eq!(r["error"], json!({"code": 1403, "message": "not a member"}), "{r}");
    // Subscribe, unsubscribe and subscribe again while the first call is
    // out: each answer counts for its own request only (the late "allow"
    // of the first does not subscribe the second, refused one).
    alice.send_json(&json!({"id": 101, "subscribe": {"channel": "chat:slow", "data": {"n": 1}}}));
    alice.send_json(&json!({"id": 102, "unsubscribe": {"channel": "chat:slow"}}));
    alice.send_json(&json!({"id": 103, "subscribe": {"channel": "chat:slow", "data": {"n": 2}}}));
    let end = Instant::now() + Duration::from_secs(2);
    let mut seen = Vec::new();
    while let Some(e) = alice.event_by(end, "the replies of the subscribe race") {
        if let Event::Json(v) = e
            && v["id"].as_u64().is_some()
        {
            seen.push(v);
        }
    }
    let by_id = |id: u64| seen.iter().find(|v| v["id"] == id).cloned();
    assert!(by_id(102).is_some_and(|v| v.get("error").is_none()), "{seen:?}");
    assert_eq!(by_id(103).map(|v| v["error"]["code"].clone()), Some(json!(1404)), "{seen:?}");
    assert!(by_id(101).is_none(), "the unsubscribed request is not answered after its unsubscribe: {seen:?}");
    let r = alice.call(json!({"presence": {"channel": "chat:slow"}}));
    let present = r["presence"]["presence"].as_object().map_or(0, |m| m.len());
    assert_eq!(present, 0, "not subscribed: {r}");
    // A failed call (a 5xx, a body that is no answer): error 100, temporary.
    let r = alice.call(json!({"subscribe": {"channel": "chat:broken"}}));
    assert_eq!(
        (r["error"]["code"].as_u64(), r["error"]["temporary"].as_bool()),
        (Some(100), Some(true)),
        "{r}"
    );
    let r = alice.call(json!({"publish": {"channel": "chat:ok", "data": {"text": "broken"}}}));
    assert_eq!(
        (r["error"]["code"].as_u64(), r["error"]["temporary"].as_bool()),
        (Some(100), Some(true)),
        "{r}"
    );
    let r = alice.call(json!({"rpc": {"method": "broken"}}));
    assert_eq!(
        (r["error"]["code"].as_u64(), r["error"]["temporary"].as_bool()),
        (Some(100), Some(true)),
        "{r}"
    );
    // Publish: the backend's data replaces the client's.
    let r = alice.call(json!({"publish": {"channel": "chat:ok", "data": {"text": "hi"}}}));
    assert!(r.get("error").is_none(), "{r}");
    let p = bob.next_pub().expect("bob gets the publication");
    assert_eq!(p["push"]["pub"]["data"], json!({"text": "HI", "by": "alice"}), "{p}");
    assert_eq!(p["push"]["pub"]["info"]["user"], "alice", "{p}");
    let r = alice.call(json!({"publish": {"channel": "chat:ok", "data": {"text": "deny"}}}));
    assert_eq!(r["error"], json!({"code": 1500, "message": "moderated"}), "{r}");
    let r = alice.call(json!({"publish": {"channel": "chat:ok", "data": {"text": "after"}}}));
    assert!(r.get("error").is_none(), "{r}");
    let p = bob.next_pub().expect("the next publication");
    assert_eq!(p["push"]["pub"]["data"]["text"], "AFTER", "the refused one never went out: {p}");
    // RPC.
    let r = alice.call(json!({"rpc": {"method": "echo", "data": {"q": 7}}}));
    assert_eq!(r["rpc"]["data"], json!({"echo": {"q": 7}, "user": "alice"}), "{r}");
    let r = alice.call(json!({"rpc": {"method": "nope"}}));
    assert_eq!(r["error"], json!({"code": 1600, "message": "no such method"}), "{r}");
    // A subscription that expires is refreshed once, then ends (2501).
    let r = alice.call(json!({"subscribe": {"channel": "chat:short"}}));
    assert!(r.get("error").is_none(), "{r}");
    let end = Instant::now() + Duration::from_secs(20);
    let unsub = loop {
        match alice.event_by(end, "the unsubscribe push of chat:short") {
            Some(Event::Json(v))
                if v["push"]["channel"] == "chat:short" && v["push"].get("unsubscribe").is_some() =>
            {
                break v;
            }
            Some(Event::Json(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(unsub["push"]["unsubscribe"]["code"], 2501, "{unsub}");
    assert_eq!(refreshes.load(Ordering::Relaxed), 2, "refreshed once, then expired");
    let r = alice.call(json!({"publish": {"channel": "chat:ok", "data": {"text": "still here"}}}));
    assert!(r.get("error").is_none(), "alice is still connected: {r}");
    // Disconnect answers end the connection with their code.
    let mut carol = c.client(0, "carol");
    carol.send_json(&json!({"id": 9, "subscribe": {"channel": "chat:kick"}}));
    assert_eq!(carol.expect_close(), Some(4403));
    let mut dave = c.client(0, "dave");
    dave.send_json(&json!({"id": 9, "rpc": {"method": "kick"}}));
    assert_eq!(dave.expect_close(), Some(4600));
    let mut erin = c.client(0, "erin");
    erin.send_json(&json!({"id": 9, "publish": {"channel": "chat:ok", "data": {"text": "kick"}}}));
    assert_eq!(erin.expect_close(), Some(4501));
    let m = c.metrics(0);
    let calls = |hook: &str| metric(&m, &format!("switchyard_gateway_proxy_calls_total{{hook=\"{hook}\"}}"));
    assert_eq!(
        (calls("subscribe"), calls("publish"), calls("rpc"), calls("sub_refresh")),
        (8, 6, 4, 2),
        "{m}"
    );
    assert_eq!(calls("connect"), 0);
    let failed = |hook: &str, kind: &str| {
        metric(&m, &format!("switchyard_gateway_proxy_errors_total{{hook=\"{hook}\",kind=\"{kind}\"}}"))
    };
    assert_eq!(
        (failed("subscribe", "status"), failed("publish", "bad_answer"), failed("rpc", "status")),
        (1, 1, 1)
    );
}

#[test]
fn the_refresh_hook_extends_a_connection_then_ends_it() {
    let refreshes = Arc::new(AtomicU32::new(0));
    let r2 = refreshes.clone();
    let backend = Backend::start(move |call: &Call| match call.path.as_str() {
        "/connect" => {
            let user = call.body["data"]["user"].as_str().unwrap_or("eve");
            Reply::json(json!({"result": {"user": user, "expire_at": unix() + 2}}))
        }
        _ if call.body["user"] == "frank" => {
            Reply::json(json!({"disconnect": {"code": 4700, "reason": "gone"}}))
        }
        // Eve's first refresh extends her connection; a wrong request
        // ends it with 4999, which fails the test below.
        _ if call.body["user"] != "eve" || call.body["client"].as_str().is_none() => {
            Reply::json(json!({"disconnect": {"code": 4999, "reason": "bad refresh request"}}))
        }
        _ if r2.fetch_add(1, Ordering::Relaxed) == 0 => {
            Reply::json(json!({"result": {"expire_at": unix() + 2, "info": {"fresh": true}}}))
        }
        _ => Reply::json(json!({"result": {"expired": true}})),
    });
    let cfg = config(
        "refresh",
        &format!(
            "[proxy.connect]\nendpoint = \"{}\"\n[proxy.refresh]\nendpoint = \"{}\"\n",
            backend.url("connect"),
            backend.url("refresh")
        ),
    );
    let c = Cluster::start(1, 1, &["--config", &cfg]);
    c.settle();
    let mut ws = Ws::connect(c.ws_addrs[0], PATH).unwrap();
    let r = ws.call(json!({"connect": {}}));
    assert!(r["connect"]["client"].is_string(), "{r}");
    assert!(r["connect"].get("expires").is_none(), "the server refreshes, not the client: {r}");
    let mut frank = Ws::connect(c.ws_addrs[0], PATH).unwrap();
    let r = frank.call(json!({"connect": {"data": {"user": "frank"}}}));
    assert!(r["connect"]["client"].is_string(), "{r}");
    assert_eq!(ws.expect_close(), Some(3005), "expired after one refresh");
    assert_eq!(refreshes.load(Ordering::Relaxed), 2);
    assert_eq!(frank.expect_close(), Some(4700), "a disconnect answer ends the connection");
    wait_until(Duration::from_secs(5), "the refresh calls counted", || calls(&c, 0, "refresh"), |n| *n == 3);
}
