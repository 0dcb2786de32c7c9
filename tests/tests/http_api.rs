//! The router's HTTP server API, end to end: backend publishes reach
//! WebSocket subscribers through the same ordered path as client publishes.

use e2e::{API_KEY, Cluster, http_request};
use serde_json::{Value, json};

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Calls the API and returns the parsed body; a Centrifugo API answers 200
/// even for a command error (it is in the body).
fn call(c: &Cluster, method: &str, body: &Value) -> Value {
    let (st, out) = c.api(0, method, body);
    assert_eq!(st, 200, "{method}: {out}");
    parse(&out)
}

#[test]
fn publish_broadcast_history_presence_channels_info() {
    let c = Cluster::start(1, 1, &[]);
    let mut ws = c.client(0, "42");
    let r = ws.call(json!({"subscribe": {"channel": "chat:api"}}));
    assert!(r.get("error").is_none(), "{r}");

    let (st, body) = c.api(0, "publish", &json!({"channel": "chat:api", "data": {"text": "from backend"}}));
    assert_eq!(st, 200);
    let v = parse(&body);
    assert_eq!(v["result"]["offset"], 1, "{v}");
    let epoch = v["result"]["epoch"].as_str().unwrap().to_owned();
    let push = ws.next_pub().unwrap();
    assert_eq!(push["push"]["pub"]["data"]["text"], "from backend");
    assert_eq!(push["push"]["pub"]["offset"], 1);

    // Idempotency: a repeated key returns the first result and delivers nothing new.
    let p = json!({"channel": "chat:api", "data": {"n": 2}, "idempotency_key": "k1"});
    let first = call(&c, "publish", &p);
    let again = call(&c, "publish", &p);
    assert_eq!(first["result"], again["result"]);
    let pushed = ws.next_pub().unwrap();
    assert_eq!(pushed["push"]["pub"]["offset"], 2, "{pushed}");
    assert_eq!(pushed["push"]["pub"]["data"], json!({"n": 2}), "{pushed}");

    // Broadcast: one response per channel, errors inline.
    let v = call(
        &c,
        "broadcast",
        &json!({"channels": ["chat:api", "nope:x"], "data": {"n": 3}, "tags": {"k": "v"}}),
    );
    let responses = v["result"]["responses"].as_array().unwrap();
    assert_eq!(responses[0]["result"]["offset"], 3, "{v}");
    assert_eq!(responses[1]["error"]["code"], 102);
    let pushed = ws.next_pub().unwrap();
    assert_eq!(pushed["push"]["pub"]["tags"]["k"], "v");
    assert_eq!(pushed["push"]["pub"]["offset"], 3, "{pushed}");
    assert_eq!(pushed["push"]["pub"]["data"], json!({"n": 3}), "{pushed}");

    let v = call(&c, "history", &json!({"channel": "chat:api", "limit": -1}));
    assert_eq!(v["result"]["publications"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["result"]["epoch"], epoch);
    let v = call(&c, "history", &json!({"channel": "chat:api", "since": {"offset": 1, "epoch": "other"}}));
    assert_eq!(v["error"]["code"], 112, "{v}");

    let v = call(&c, "presence_stats", &json!({"channel": "chat:api"}));
    assert_eq!(v["result"], json!({"num_clients": 1, "num_users": 1}));
    let v = call(&c, "presence", &json!({"channel": "chat:api"}));
    let entry = v["result"]["presence"].as_object().unwrap().values().next().unwrap().clone();
    assert_eq!(entry["user"], "42");
    assert_eq!(call(&c, "presence", &json!({"channel": "typing:x"}))["error"]["code"], 108);

    let v = call(&c, "channels", &json!({"pattern": "chat:*"}));
    assert!(v["result"]["channels"]["chat:api"].is_object(), "{v}");
    let v = call(&c, "info", &json!({}));
    assert_eq!(v["result"]["nodes"][0]["name"], "router-0", "{v}");

    let v = call(&c, "history_remove", &json!({"channel": "chat:api"}));
    assert_eq!(v["result"], json!({}));
    let v = call(&c, "history", &json!({"channel": "chat:api", "limit": -1}));
    assert_eq!(v["result"]["publications"], json!([]));
    assert_eq!(v["result"]["offset"], 3, "history_remove keeps the position");
}

#[test]
fn bad_calls_get_their_status() {
    let c = Cluster::start(1, 0, &[]);
    let addr = c.api_addrs[0];
    let body = json!({"channel": "chat:x", "data": {}}).to_string();
    let (st, b) = http_request(addr, "POST", "/api/publish", &[("X-API-Key", "wrong")], &body);
    assert_eq!((st, b.as_str()), (401, ""));
    let (st, _) = http_request(addr, "POST", "/api/publish", &[], &body);
    assert_eq!(st, 401);
    let (st, _) =
        http_request(addr, "POST", "/api/publish", &[("Authorization", &format!("apikey {API_KEY}"))], &body);
    assert_eq!(st, 200);
    // A key in the URL is refused, with the reason (access logs keep URLs).
    let (st, why) = http_request(addr, "POST", &format!("/api/publish?api_key={API_KEY}"), &[], &body);
    assert_eq!(st, 401);
    assert!(why.contains("never from the URL"), "{why}");
    let (st, _) = http_request(
        addr,
        "POST",
        &format!("/api/publish?api_key={API_KEY}"),
        &[("X-API-Key", API_KEY)],
        &body,
    );
    assert_eq!(st, 401, "not even beside a good header");
    // Metrics are on the admin port, not the API port.
    let (st, _) = http_request(addr, "GET", "/metrics", &[], "");
    assert_eq!(st, 404);
    assert!(c.router_metrics(0).contains("switchyard_router_publications_total"));
    let (st, _) = http_request(addr, "GET", "/api/publish", &[("X-API-Key", API_KEY)], "");
    assert_eq!(st, 405);
    let (st, _) = http_request(addr, "POST", "/api/publish", &[("X-API-Key", API_KEY)], "{not json");
    assert_eq!(st, 400);
    let (st, _) = http_request(addr, "POST", "/api/nope", &[("X-API-Key", API_KEY)], "{}");
    assert_eq!(st, 404);
    let (st, b) = c.api(0, "publish", &json!({"channel": "chat:x"}));
    assert_eq!((st, parse(&b)["error"]["code"].as_u64()), (200, Some(107)));
    let (st, b) = c.api(0, "publish", &json!({"channel": "", "data": {}}));
    assert_eq!((st, parse(&b)["error"]["code"].as_u64()), (200, Some(107)));
    let big = format!("{{\"channel\":\"chat:x\",\"data\":\"{}\"}}", "a".repeat(2 << 20));
    let (st, _) = http_request(addr, "POST", "/api/publish", &[("X-API-Key", API_KEY)], &big);
    assert_eq!(st, 413);
}
