//! Real client compatibility: the unmodified `centrifuge` npm SDK under Node
//! against the gateway, and the unmodified `cent` PyPI client against the
//! router's HTTP API. `scripts/compat-setup.sh` installs both (the tests run
//! it themselves; it does nothing when they are already installed).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use e2e::{API_KEY, Cluster, Event, metric, token};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs the setup script once per test process (nextest runs each test in
/// its own process; the script is idempotent and serialised by a lock file).
fn setup() {
    static ONCE: Mutex<bool> = Mutex::new(false);
    let mut done = ONCE.lock().unwrap();
    if *done {
        return;
    }
    let st = Command::new("flock")
        .arg(root().join("target/.compat-setup.lock"))
        .arg("bash")
        .arg(root().join("scripts/compat-setup.sh"))
        .status()
        .expect("flock and bash");
    assert!(st.success(), "scripts/compat-setup.sh failed (npm and PyPI must be reachable)");
    *done = true;
}

fn publish(c: &Cluster, channel: &str, i: u64) {
    let (st, body) = c.api(0, "publish", &json!({"channel": channel, "data": {"i": i}}));
    assert_eq!(st, 200, "{body}");
}

/// Which SDK, and whether its channel is a client-side subscription or a
/// server-side one from the token's `channels` claim (which the SDK did not
/// ask for, and recovers through `connect.subs`).
#[derive(Clone, Copy, PartialEq)]
enum Sdk {
    Js,
    JsServerSide,
    /// No token: the gateway's connect hook (an HTTP backend started by
    /// the test) names the user and the server-side channel.
    JsConnectHook,
    Browser,
    BrowserServerSide,
    /// In Chromium, with WebSocket failing: the SDK falls back to this
    /// HTTP transport (`http_stream` or `sse`) with `POST /emulation`.
    BrowserFallback(&'static str),
    PythonServerSide,
}

#[test]
fn centrifuge_js_subscribes_receives_and_recovers_after_a_gateway_drain() {
    sdk_receives_and_recovers_after_a_gateway_drain(Sdk::Js);
}

#[test]
fn centrifuge_js_server_side_subscription_recovers_after_a_gateway_drain() {
    sdk_receives_and_recovers_after_a_gateway_drain(Sdk::JsServerSide);
}

#[test]
fn centrifuge_js_without_a_token_is_connected_by_the_connect_hook_and_recovers_after_a_drain() {
    sdk_receives_and_recovers_after_a_gateway_drain(Sdk::JsConnectHook);
}

/// The SDK's browser bundle in headless Chromium, with the browser's own
/// WebSocket.
#[test]
fn centrifuge_js_in_chromium_subscribes_receives_and_recovers_after_a_gateway_drain() {
    sdk_receives_and_recovers_after_a_gateway_drain(Sdk::Browser);
}

#[test]
fn centrifuge_js_in_chromium_server_side_subscription_recovers_after_a_gateway_drain() {
    sdk_receives_and_recovers_after_a_gateway_drain(Sdk::BrowserServerSide);
}

/// WebSocket fails (its upgrade is refused): the SDK falls back to
/// `http_stream`, its commands go through `POST /emulation` to whichever
/// of the two gateway processes sharing the port holds its session.
#[test]
fn centrifuge_js_in_chromium_falls_back_to_http_stream_and_recovers_after_a_gateway_drain() {
    sdk_receives_and_recovers_after_a_gateway_drain(Sdk::BrowserFallback("http_stream"));
}

/// The same with Server-Sent Events.
#[test]
fn centrifuge_js_in_chromium_falls_back_to_sse_and_recovers_after_a_gateway_drain() {
    sdk_receives_and_recovers_after_a_gateway_drain(Sdk::BrowserFallback("sse"));
}

#[test]
fn centrifuge_python_server_side_subscription_recovers_after_a_gateway_drain() {
    sdk_receives_and_recovers_after_a_gateway_drain(Sdk::PythonServerSide);
}

fn sdk_receives_and_recovers_after_a_gateway_drain(sdk: Sdk) {
    setup();
    let mut c = Cluster::start(1, 0, &[]);
    // Two gateways on one address: the SDK's reconnect after the drain lands
    // on the survivor.
    let ws: std::net::SocketAddr = format!("127.0.0.1:{}", e2e::free_tcp_port()).parse().unwrap();
    let hook_channel = "chat:compat-js-hook";
    let backend = e2e::backend::Backend::start(move |_| {
        e2e::backend::Reply::json(json!({"result": {"user": "js-user", "channels": [hook_channel]}}))
    });
    let hook_cfg = std::env::temp_dir().join(format!("sy-compat-hook-{}.toml", std::process::id()));
    std::fs::write(&hook_cfg, format!("[proxy.connect]\nendpoint = \"{}\"\n", backend.url("connect")))
        .unwrap();
    let mut extra = vec!["--drain-secs", "1"];
    if sdk == Sdk::JsConnectHook {
        extra.extend(["--config", hook_cfg.to_str().unwrap()]);
    }
    c.add_gateway_at(0, ws, &extra);
    c.add_gateway_at(1, ws, &extra);
    let (channel, token) = match sdk {
        Sdk::Js => ("chat:compat-js", token("js-user")),
        Sdk::Browser => ("chat:compat-browser", token("js-user")),
        Sdk::BrowserFallback(t) => {
            (if t == "sse" { "chat:compat-sse" } else { "chat:compat-http-stream" }, token("js-user"))
        }
        Sdk::JsServerSide | Sdk::BrowserServerSide => {
            let ch =
                if sdk == Sdk::JsServerSide { "chat:compat-js-server" } else { "chat:compat-browser-server" };
            (ch, e2e::token_with(json!({"sub": "js-user", "channels": [ch]})))
        }
        Sdk::JsConnectHook => (hook_channel, String::new()),
        Sdk::PythonServerSide => {
            let ch = "chat:compat-py-server";
            (ch, e2e::token_with(json!({"sub": "py-user", "channels": [ch]})))
        }
    };
    let url = format!("ws://{ws}/connection/websocket");
    let mut cmd = match sdk {
        Sdk::Js | Sdk::JsServerSide | Sdk::JsConnectHook => {
            let mut c = Command::new("node");
            c.arg(root().join("tests/compat/centrifuge_client.mjs"));
            c
        }
        Sdk::Browser | Sdk::BrowserServerSide | Sdk::BrowserFallback(_) => {
            let mut c = Command::new("node");
            c.arg(root().join("tests/compat/centrifuge_browser.mjs"));
            c
        }
        Sdk::PythonServerSide => {
            let mut c = Command::new(root().join("target/compat-venv/bin/python"));
            c.arg(root().join("tests/compat/centrifuge_python_client.py"));
            c
        }
    };
    cmd.args([url.as_str(), &token, channel, "10"]);
    if matches!(sdk, Sdk::JsServerSide | Sdk::BrowserServerSide | Sdk::JsConnectHook) {
        cmd.arg("server");
    }
    if let Sdk::BrowserFallback(t) = sdk {
        cmd.arg(t);
    }
    let mut node = cmd
        .current_dir(root().join("tests/compat"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("the SDK's script");
    let (tx, rx) = mpsc::channel::<Value>();
    let stdout = node.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let v: Value =
                serde_json::from_str(&line).unwrap_or_else(|_| json!({"event": "raw", "line": line}));
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    let mut events: Vec<Value> = Vec::new();
    let mut wait_for = |pred: &dyn Fn(&[Value]) -> bool, what: &str| {
        let end = Instant::now() + Duration::from_secs(30);
        while !pred(&events) {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(v) => events.push(v),
                Err(_) => panic!("no {what}; events: {events:?}"),
            }
        }
    };
    let count = |evs: &[Value], e: &str| evs.iter().filter(|v| v["event"] == e).count();
    wait_for(&|e| count(e, "subscribed") >= 1, "subscription");
    for i in 1..=5 {
        publish(&c, channel, i);
    }
    wait_for(&|e| count(e, "publication") >= 5, "first five publications");
    // Drain the gateway holding the SDK's connection.
    // (A fallback session is a stream; the SDK's emulation requests may
    // keep connections of their own to either gateway.)
    let holds = |g: usize| match sdk {
        Sdk::BrowserFallback(_) => {
            let m = c.metrics(g);
            (0..2)
                .map(|core| metric(&m, &format!("switchyard_gateway_fallback_streams{{core=\"{core}\"}}")))
                .sum::<u64>()
                == 1
        }
        _ => metric(&c.metrics(g), "switchyard_gateway_connections") == 1,
    };
    if !matches!(sdk, Sdk::BrowserFallback(_)) {
        // The harness's probes of the shared port (a connection opened and
        // dropped per gateway started) are counted until their gateway reads
        // their end: wait (bounded) until the SDK's is the only connection.
        let end = Instant::now() + Duration::from_secs(10);
        let total = |c: &Cluster| {
            (0..2).map(|g| metric(&c.metrics(g), "switchyard_gateway_connections")).sum::<u64>()
        };
        while total(&c) != 1 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let each: Vec<u64> =
            (0..2).map(|g| metric(&c.metrics(g), "switchyard_gateway_connections")).collect();
        assert_eq!(each.iter().sum::<u64>(), 1, "only the SDK's connection is left, per gateway: {each:?}");
    }
    let holder = (0..2).find(|g| holds(*g)).expect("one gateway holds the connection");
    c.gateways[holder].signal(15);
    // Publish while the SDK is away (it waits ≥ ½ s before reconnecting): it
    // must get these back by recovery.
    // (centrifuge-js reports it as `connecting` with the code, Python as
    // `disconnected` with the code, then reconnects: 3001 is not terminal.)
    let drained =
        |v: &Value| (v["event"] == "connecting" || v["event"] == "disconnected") && v["code"] == 3001;
    wait_for(&|e| e.iter().any(drained), "drain disconnect");
    for i in 6..=10 {
        publish(&c, channel, i);
    }
    // The script exits by itself (0 with everything, 2 at its 60 s
    // deadline); a script still running after 70 s is a hang.
    let end = Instant::now() + Duration::from_secs(70);
    let st = loop {
        if let Some(st) = node.try_wait().expect("node's status") {
            break st;
        }
        if Instant::now() >= end {
            let _ = node.kill();
            panic!("the SDK script neither finished nor gave up: {events:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    wait_for(&|e| count(e, "publication") >= 10, "all ten publications");
    assert!(st.success(), "the SDK received everything in time: {events:?}");

    let offsets: Vec<u64> = events
        .iter()
        .filter(|v| v["event"] == "publication")
        .map(|v| v["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, (1..=10).collect::<Vec<_>>(), "in order, no loss, no duplicate: {events:?}");
    let data: Vec<u64> = events
        .iter()
        .filter(|v| v["event"] == "publication")
        .map(|v| v["data"]["i"].as_u64().unwrap())
        .collect();
    assert_eq!(data, (1..=10).collect::<Vec<_>>());
    // The SDK was moved by the drain (3001 shutdown → reconnect) and resubscribed with recovery.
    assert!(events.iter().any(drained), "the drain's disconnect code reached the SDK: {events:?}");
    if let Sdk::BrowserFallback(t) = sdk {
        // Every connect was over the fallback transport: WebSocket failed first.
        let connected: Vec<&Value> = events.iter().filter(|v| v["event"] == "connected").collect();
        assert!(connected.len() >= 2 && connected.iter().all(|v| v["transport"] == t), "{events:?}");
        assert!(
            events.iter().any(
                |v| v["event"] == "error" && v["error"].as_str().is_some_and(|e| e.contains("transport"))
            ),
            "the WebSocket attempt failed first: {events:?}"
        );
    }
    if matches!(sdk, Sdk::Browser | Sdk::BrowserServerSide | Sdk::BrowserFallback(_)) {
        assert!(
            events.iter().any(|v| v["event"] == "browser"
                && v["userAgent"].as_str().is_some_and(|ua| ua.contains("HeadlessChrome"))),
            "the SDK ran in headless Chromium: {events:?}"
        );
    }
    let resub: Vec<&Value> = events.iter().filter(|v| v["event"] == "subscribed").collect();
    assert!(resub.len() >= 2, "{events:?}");
    assert_eq!(resub.last().unwrap()["wasRecovering"], true, "{events:?}");
    assert_eq!(resub.last().unwrap()["recovered"], true, "{events:?}");
    assert_eq!(c.gateways[holder].wait_exit(Duration::from_secs(20)), Some(0));
    if sdk == Sdk::JsConnectHook {
        // Both connects (the first, and the reconnect after the drain)
        // were the hook's, without a token.
        let calls = backend.calls_to("/connect");
        assert!(calls.len() >= 2, "{calls:?}");
        assert!(calls.iter().all(|c| c.body["transport"] == "websocket" && c.body["client"].is_string()));
    }
}

#[test]
fn cent_python_client_drives_the_http_api() {
    setup();
    let c = Cluster::start(1, 1, &[]);
    let channel = "chat:compat-py";
    let mut ws = c.client(0, "py-watcher");
    let r = ws.call(json!({"subscribe": {"channel": channel}}));
    assert!(r.get("error").is_none(), "{r}");
    let out = Command::new(root().join("target/compat-venv/bin/python"))
        .arg(root().join("tests/compat/cent_client.py"))
        .arg(format!("http://{}/api", c.api_addrs[0]))
        .arg(API_KEY)
        .arg(channel)
        .output()
        .expect("python");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cent script failed: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(v["publish"]["offset"], 1, "{v}");
    assert!(v["publish"]["epoch"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    assert_eq!(v["idempotent"], json!([2, 2]), "a repeated idempotency key returns the first result: {v}");
    assert_eq!(v["broadcast"][0], 3, "{v}");
    assert_eq!(v["history"]["offset"], 3, "{v}");
    assert_eq!(v["history"]["data"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["presence"], json!(["py-watcher"]), "{v}");
    assert_eq!(v["presence_stats"], json!([1, 1]), "{v}");
    assert!(v["channels"].as_array().unwrap().iter().any(|c| c == channel), "{v}");
    assert_eq!(v["info_nodes"], 1, "{v}");
    assert_eq!(v["history_after_remove"], 0, "{v}");
    assert_eq!(v["bad_key"], "CentUnauthorizedError", "{v}");
    assert_eq!(v["unknown_namespace"][1], 102, "{v}");
    assert_eq!(v["user_commands"], "sent", "{v}");
    // The subscriber got the three publications cent made, in order, then
    // the user-wide commands' effects: subscribed to `-srv`, unsubscribed
    // from it (2000), closed with cent's code and reason.
    let srv = format!("{channel}-srv");
    let mut pubs = Vec::new();
    let mut pushes = Vec::new();
    let end = Instant::now() + Duration::from_secs(15);
    let close = loop {
        match ws.event_by(end, "cent's disconnect") {
            Some(Event::Json(p)) if p["push"]["channel"] == channel => pubs.push(p),
            Some(Event::Json(p)) if p["push"]["channel"] == srv.as_str() => pushes.push(p),
            Some(Event::Json(_)) => {}
            Some(Event::Closed(code, reason)) => break (code, reason),
            Some(other) => panic!("{other:?}"),
            None => panic!("not disconnected by cent; pushes {pushes:?}"),
        }
    };
    assert_eq!(close, (Some(4000), "cent".to_owned()));
    assert_eq!(pubs.len(), 3, "{pubs:?}");
    for ((offset, i), p) in [(1, 1), (2, 1), (3, 2)].into_iter().zip(&pubs) {
        assert_eq!(p["push"]["pub"]["offset"], offset, "{p}");
        assert_eq!(p["push"]["pub"]["data"], json!({"from": "cent", "i": i}));
    }
    // cent sends the unsubscribe right after the subscribe: when it reaches
    // the gateway before the router has answered the subscription, the
    // subscription ends while pending, and the client, which never heard
    // of it, gets neither push (seen once in a fresh-clone CI run on a
    // busy box). Otherwise the subscribe push, then the unsubscribe push
    // (2000). Never an unsubscribe alone, never a publication of `-srv`.
    match pushes.len() {
        0 => {}
        2 => {
            assert!(pushes[0]["push"]["subscribe"].is_object(), "{pushes:?}");
            assert_eq!(pushes[1]["push"]["unsubscribe"]["code"], 2000, "{pushes:?}");
        }
        _ => panic!("{pushes:?}"),
    }
}
