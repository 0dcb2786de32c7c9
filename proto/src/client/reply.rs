//! Server → client replies and pushes, written straight to bytes.
//!
//! Publication payloads stay opaque: they are raw JSON [`Bytes`] that were
//! validated once where they entered the system (the gateway for client
//! publishes, the router's HTTP API for backend publishes) and are copied
//! into replies and pushes without being parsed again. Zero values are
//! omitted, as Go's `omitempty` does, except the fields SDKs index directly.

use bytes::Bytes;
use serde::Serialize;

use super::codes::{Disconnect, ReplyError};

/// Appends `s` as a JSON string literal.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// Removes raw `\n` bytes from JSON (they are whitespace outside strings and
/// cannot occur inside valid strings), so embedded payloads never break the
/// newline framing of a batch.
pub fn strip_newlines(json: &[u8]) -> Bytes {
    if json.contains(&b'\n') {
        Bytes::from(json.iter().copied().filter(|b| *b != b'\n').collect::<Vec<u8>>())
    } else {
        Bytes::copy_from_slice(json)
    }
}

/// A publication as the wire knows it. `data`, `info` and `tags` are raw JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Publication {
    /// Offset in the channel's stream (0 for streams without positions).
    pub offset: u64,
    /// Payload, raw JSON without newlines.
    pub data: Bytes,
    /// Publisher's `ClientInfo`, raw JSON (from [`client_info`]), if any.
    pub info: Option<Bytes>,
    /// `tags` object, raw JSON, if any.
    pub tags: Option<Bytes>,
}

impl Publication {
    /// Appends the publication object.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"data\":");
        out.extend_from_slice(if self.data.is_empty() { b"null" } else { &self.data });
        if let Some(info) = &self.info {
            out.extend_from_slice(b",\"info\":");
            out.extend_from_slice(info);
        }
        if self.offset > 0 {
            out.extend_from_slice(b",\"offset\":");
            out.extend_from_slice(self.offset.to_string().as_bytes());
        }
        if let Some(tags) = &self.tags {
            out.extend_from_slice(b",\"tags\":");
            out.extend_from_slice(tags);
        }
        out.push(b'}');
    }
}

/// `ClientInfo` as raw JSON: `user` and `client` always present.
pub fn client_info(user: &str, client: &str, conn_info: Option<&[u8]>, chan_info: Option<&[u8]>) -> Bytes {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"{\"user\":");
    write_str(&mut out, user);
    out.extend_from_slice(b",\"client\":");
    write_str(&mut out, client);
    if let Some(ci) = conn_info {
        out.extend_from_slice(b",\"conn_info\":");
        out.extend_from_slice(ci);
    }
    if let Some(ci) = chan_info {
        out.extend_from_slice(b",\"chan_info\":");
        out.extend_from_slice(ci);
    }
    out.push(b'}');
    Bytes::from(out)
}

/// The bytes of a `pub` push for one (channel, publication): built once per
/// gateway and shared by every recipient.
pub fn pub_push(channel: &str, publication: &Publication) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + channel.len() + publication.data.len());
    out.extend_from_slice(b"{\"push\":{\"channel\":");
    write_str(&mut out, channel);
    out.extend_from_slice(b",\"pub\":");
    publication.write(&mut out);
    out.extend_from_slice(b"}}");
    out
}

fn push_with(channel: Option<&str>, kind: &str, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.extend_from_slice(b"{\"push\":{");
    if let Some(ch) = channel {
        out.extend_from_slice(b"\"channel\":");
        write_str(&mut out, ch);
        out.push(b',');
    }
    write_str(&mut out, kind);
    out.push(b':');
    body(&mut out);
    out.extend_from_slice(b"}}");
    out
}

/// `join` push: `{"push":{"channel":"c","join":{"info":{…}}}}`.
pub fn join_push(channel: &str, info: &[u8]) -> Vec<u8> {
    push_with(Some(channel), "join", |o| {
        o.extend_from_slice(b"{\"info\":");
        o.extend_from_slice(info);
        o.push(b'}');
    })
}

/// `leave` push.
pub fn leave_push(channel: &str, info: &[u8]) -> Vec<u8> {
    push_with(Some(channel), "leave", |o| {
        o.extend_from_slice(b"{\"info\":");
        o.extend_from_slice(info);
        o.push(b'}');
    })
}

/// `unsubscribe` push with its code and reason (codes ≥ 2500 make the SDK resubscribe).
pub fn unsubscribe_push(channel: &str, code: u32, reason: &str) -> Vec<u8> {
    push_with(Some(channel), "unsubscribe", |o| {
        o.extend_from_slice(format!("{{\"code\":{code},\"reason\":").as_bytes());
        write_str(o, reason);
        o.push(b'}');
    })
}

/// `disconnect` push (non-WebSocket transports; WebSocket uses the close frame).
pub fn disconnect_push(d: Disconnect) -> Vec<u8> {
    push_with(None, "disconnect", |o| {
        o.extend_from_slice(format!("{{\"code\":{},\"reason\":", d.code).as_bytes());
        write_str(o, d.reason);
        o.push(b'}');
    })
}

/// `message` push (no channel).
pub fn message_push(data: &[u8]) -> Vec<u8> {
    push_with(None, "message", |o| {
        o.extend_from_slice(b"{\"data\":");
        o.extend_from_slice(data);
        o.push(b'}');
    })
}

/// The server ping, `{}`.
pub const PING: &[u8] = b"{}";

/// `{"id":N,"error":{…}}`.
pub fn error_reply(id: u32, e: ReplyError) -> Vec<u8> {
    error_reply_with(id, e.code, e.message, e.temporary)
}

/// An error reply with a message of the app backend's (a proxy hook's).
pub fn error_reply_with(id: u32, code: u32, message: &str, temporary: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + message.len());
    out.extend_from_slice(format!("{{\"id\":{id},\"error\":{{\"code\":{code},\"message\":").as_bytes());
    write_str(&mut out, message);
    if temporary {
        out.extend_from_slice(b",\"temporary\":true");
    }
    out.extend_from_slice(b"}}");
    out
}

/// `{"id":N,"<method>":<result>}` where `result` is already JSON.
pub fn raw_reply(id: u32, method: &str, result: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + method.len() + result.len());
    out.extend_from_slice(format!("{{\"id\":{id},").as_bytes());
    write_str(&mut out, method);
    out.push(b':');
    out.extend_from_slice(result);
    out.push(b'}');
    out
}

/// `{"id":N,"<method>":<serde result>}`.
pub fn reply<T: Serialize>(id: u32, method: &str, result: &T) -> Vec<u8> {
    let body = serde_json::to_vec(result).expect("results serialize");
    raw_reply(id, method, &body)
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `connect` result.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectResult {
    /// Connection id (required).
    pub client: String,
    /// Server version.
    pub version: String,
    /// The connection expires and must `refresh`.
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    /// Seconds until expiry.
    #[serde(skip_serializing_if = "is_zero")]
    pub ttl: u32,
    /// Server-side subscriptions, raw JSON `SubscribeResult`s keyed by channel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subs: Option<Box<serde_json::value::RawValue>>,
    /// Data for the client from the app backend (the connect hook's `data`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<serde_json::value::RawValue>>,
    /// Seconds between server pings.
    #[serde(skip_serializing_if = "is_zero")]
    pub ping: u32,
    /// Client must answer pings.
    #[serde(skip_serializing_if = "is_false")]
    pub pong: bool,
    /// The session an emulated transport's commands name (`POST /emulation`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub session: String,
    /// The node that holds it (ditto).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node: String,
}

/// `refresh` result.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RefreshResult {
    /// Connection id.
    pub client: String,
    /// Server version.
    pub version: String,
    /// Whether the connection still expires.
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    /// Seconds until expiry.
    #[serde(skip_serializing_if = "is_zero")]
    pub ttl: u32,
}

/// `sub_refresh` result.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SubRefreshResult {
    /// Whether the subscription still expires.
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    /// Seconds until expiry.
    #[serde(skip_serializing_if = "is_zero")]
    pub ttl: u32,
}

/// `presence_stats` result (both fields always present).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct PresenceStatsResult {
    /// Connections subscribed.
    pub num_clients: u32,
    /// Distinct users (anonymous counts as one).
    pub num_users: u32,
}

/// The body of a `subscribe` result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeResult {
    /// Subscription expires (needs `sub_refresh`).
    pub expires: bool,
    /// Seconds until it expires.
    pub ttl: u32,
    /// Stream is recoverable.
    pub recoverable: bool,
    /// Stream is positioned.
    pub positioned: bool,
    /// Current epoch.
    pub epoch: String,
    /// Top offset, or the request's offset when recovered.
    pub offset: u64,
    /// Recovered publications, ascending.
    pub publications: Vec<Publication>,
    /// Recovery succeeded.
    pub recovered: bool,
    /// The request asked to recover.
    pub was_recovering: bool,
}

impl SubscribeResult {
    /// Appends the result object.
    pub fn write(&self, out: &mut Vec<u8>) {
        let mut w = ObjWriter::new(out);
        if self.expires {
            w.raw("expires", b"true");
            w.raw("ttl", self.ttl.to_string().as_bytes());
        }
        if self.recoverable {
            w.raw("recoverable", b"true");
        }
        if !self.epoch.is_empty() {
            w.string("epoch", &self.epoch);
        }
        if !self.publications.is_empty() {
            w.key("publications");
            w.out.push(b'[');
            for (i, p) in self.publications.iter().enumerate() {
                if i > 0 {
                    w.out.push(b',');
                }
                p.write(w.out);
            }
            w.out.push(b']');
        }
        if self.recovered {
            w.raw("recovered", b"true");
        }
        if self.offset > 0 {
            w.raw("offset", self.offset.to_string().as_bytes());
        }
        if self.positioned {
            w.raw("positioned", b"true");
        }
        if self.was_recovering {
            w.raw("was_recovering", b"true");
        }
        w.finish();
    }

    /// A server-side subscription's lines, as one frame: the `subscribe`
    /// push (`{"push":{"channel":"c","subscribe":{…}}}`: `recoverable`,
    /// `epoch`, `offset`, `positioned`; the push carries no publications),
    /// then each recovered publication as a `pub` push, newline-separated.
    pub fn push(&self, channel: &str) -> Vec<u8> {
        let mut out = push_with(Some(channel), "subscribe", |o| {
            let mut w = ObjWriter::new(o);
            if self.recoverable {
                w.raw("recoverable", b"true");
            }
            if !self.epoch.is_empty() {
                w.string("epoch", &self.epoch);
            }
            if self.offset > 0 {
                w.raw("offset", self.offset.to_string().as_bytes());
            }
            if self.positioned {
                w.raw("positioned", b"true");
            }
            w.finish();
        });
        for p in &self.publications {
            out.push(b'\n');
            out.extend_from_slice(&pub_push(channel, p));
        }
        out
    }

    /// The whole reply line.
    pub fn reply(&self, id: u32) -> Vec<u8> {
        let mut body = Vec::with_capacity(64);
        self.write(&mut body);
        raw_reply(id, "subscribe", &body)
    }
}

/// `history` result: `publications`, `epoch`, `offset` always present.
pub fn history_result(publications: &[Publication], epoch: &str, offset: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + publications.iter().map(|p| p.data.len() + 32).sum::<usize>());
    out.extend_from_slice(b"{\"publications\":[");
    for (i, p) in publications.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        p.write(&mut out);
    }
    out.extend_from_slice(b"],\"epoch\":");
    write_str(&mut out, epoch);
    out.extend_from_slice(format!(",\"offset\":{offset}}}").as_bytes());
    out
}

/// `presence` result: `{"presence":{client_id: ClientInfo, …}}` from raw infos.
pub fn presence_result<'a>(entries: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"{\"presence\":{");
    for (i, (client, info)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(&mut out, client);
        out.push(b':');
        out.extend_from_slice(info);
    }
    out.extend_from_slice(b"}}");
    out
}

/// Writes a JSON object field by field.
struct ObjWriter<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> ObjWriter<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        ObjWriter { out, first: true }
    }
    fn key(&mut self, k: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        write_str(self.out, k);
        self.out.push(b':');
    }
    fn raw(&mut self, k: &str, v: &[u8]) {
        self.key(k);
        self.out.extend_from_slice(v);
    }
    fn string(&mut self, k: &str, v: &str) {
        self.key(k);
        write_str(self.out, v);
    }
    fn finish(self) {
        self.out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn pub_push_shape() {
        let p = Publication {
            offset: 43,
            data: Bytes::from_static(br#"{"text":"live"}"#),
            info: Some(client_info("7", "9e1a", None, None)),
            tags: None,
        };
        let push = pub_push("chat:1", &p);
        assert_eq!(
            parse(&push),
            json!({"push":{"channel":"chat:1","pub":{"data":{"text":"live"},"info":{"user":"7","client":"9e1a"},"offset":43}}})
        );
        assert!(!push.contains(&b'\n'));
    }

    #[test]
    fn subscribe_results() {
        let r = SubscribeResult::default();
        assert_eq!(r.reply(2), br#"{"id":2,"subscribe":{}}"#.to_vec());
        let r = SubscribeResult {
            recoverable: true,
            positioned: true,
            epoch: "Xq3a".into(),
            offset: 41,
            was_recovering: true,
            recovered: true,
            publications: vec![Publication {
                offset: 42,
                data: Bytes::from_static(b"{}"),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            parse(&r.reply(2)),
            json!({"id":2,"subscribe":{"recoverable":true,"positioned":true,"epoch":"Xq3a","offset":41,
                "was_recovering":true,"recovered":true,"publications":[{"data":{},"offset":42}]}})
        );
        // Server-side: the subscribe push, then the recovered publications as pushes.
        let push = r.push("chat:1");
        let lines: Vec<Value> = push.split(|b| *b == b'\n').map(parse).collect();
        assert_eq!(
            lines,
            vec![
                json!({"push":{"channel":"chat:1","subscribe":{"recoverable":true,"epoch":"Xq3a","offset":41,"positioned":true}}}),
                json!({"push":{"channel":"chat:1","pub":{"data":{},"offset":42}}}),
            ]
        );
    }

    #[test]
    fn errors_and_others() {
        assert_eq!(
            parse(&error_reply(5, ReplyError::TOO_MANY_REQUESTS)),
            json!({"id":5,"error":{"code":111,"message":"too many requests","temporary":true}})
        );
        assert_eq!(parse(&history_result(&[], "E", 0)), json!({"publications":[],"epoch":"E","offset":0}));
        let info = client_info("", "c1", Some(b"{\"a\":1}"), None);
        assert_eq!(
            parse(&presence_result([("c1", &info[..])])),
            json!({"presence":{"c1":{"user":"","client":"c1","conn_info":{"a":1}}}})
        );
        assert_eq!(
            parse(&reply(
                1,
                "connect",
                &ConnectResult {
                    client: "x".into(),
                    version: "1".into(),
                    ping: 25,
                    pong: true,
                    ..Default::default()
                }
            )),
            json!({"id":1,"connect":{"client":"x","version":"1","ping":25,"pong":true}})
        );
        assert_eq!(
            parse(&unsubscribe_push("c", 2500, "insufficient state")),
            json!({"push":{"channel":"c","unsubscribe":{"code":2500,"reason":"insufficient state"}}})
        );
        assert_eq!(
            parse(&disconnect_push(Disconnect::SHUTDOWN)),
            json!({"push":{"disconnect":{"code":3001,"reason":"shutdown"}}})
        );
        assert_eq!(&strip_newlines(b"{\n\"a\":\n1}")[..], b"{\"a\":1}");
    }
}
