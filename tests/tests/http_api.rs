//! The router's HTTP server API, end to end: backend publishes reach
//! WebSocket subscribers through the same ordered path as client publishes.

use e2e::{API_KEY, Cluster, http_request};
use serde_json::{Value, json};

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
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
    let first = parse(&c.api(0, "publish", &p).1);
    let again = parse(&c.api(0, "publish", &p).1);
    assert_eq!(first["result"], again["result"]);
    assert_eq!(ws.next_pub().unwrap()["push"]["pub"]["offset"], 2);

    // Broadcast: one response per channel, errors inline.
    let (_, body) = c.api(
        0,
        "broadcast",
        &json!({"channels": ["chat:api", "nope:x"], "data": {"n": 3}, "tags": {"k": "v"}}),
    );
    let v = parse(&body);
    let responses = v["result"]["responses"].as_array().unwrap();
    assert_eq!(responses[0]["result"]["offset"], 3, "{v}");
    assert_eq!(responses[1]["error"]["code"], 102);
    let pushed = ws.next_pub().unwrap();
    assert_eq!(pushed["push"]["pub"]["tags"]["k"], "v");

    let (_, body) = c.api(0, "history", &json!({"channel": "chat:api", "limit": -1}));
    let v = parse(&body);
    assert_eq!(v["result"]["publications"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["result"]["epoch"], epoch);
    let (_, body) =
        c.api(0, "history", &json!({"channel": "chat:api", "since": {"offset": 1, "epoch": "other"}}));
    assert_eq!(parse(&body)["error"]["code"], 112);

    let (_, body) = c.api(0, "presence_stats", &json!({"channel": "chat:api"}));
    assert_eq!(parse(&body)["result"], json!({"num_clients": 1, "num_users": 1}));
    let (_, body) = c.api(0, "presence", &json!({"channel": "chat:api"}));
    let v = parse(&body);
    let entry = v["result"]["presence"].as_object().unwrap().values().next().unwrap().clone();
    assert_eq!(entry["user"], "42");
    assert_eq!(parse(&c.api(0, "presence", &json!({"channel": "typing:x"})).1)["error"]["code"], 108);

    let (_, body) = c.api(0, "channels", &json!({"pattern": "chat:*"}));
    assert!(parse(&body)["result"]["channels"]["chat:api"].is_object(), "{body}");
    let (_, body) = c.api(0, "info", &json!({}));
    let v = parse(&body);
    assert_eq!(v["result"]["nodes"][0]["name"], "router-0", "{v}");

    let (_, body) = c.api(0, "history_remove", &json!({"channel": "chat:api"}));
    assert_eq!(parse(&body)["result"], json!({}));
    let (_, body) = c.api(0, "history", &json!({"channel": "chat:api", "limit": -1}));
    let v = parse(&body);
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
    let (st, _) = http_request(addr, "POST", &format!("/api/publish?api_key={API_KEY}"), &[], &body);
    assert_eq!(st, 200);
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
