//! The Centrifugo proxy protocol (JSON over HTTP): what the gateway asks
//! the app backend when a client connects, its connection expires, it
//! subscribes, publishes, calls an RPC method or its subscription expires,
//! and how the backend's answer reads.
//!
//! Every request is one JSON object POSTed to the hook's endpoint: the
//! connection (`client`, `transport`, `protocol`, `encoding`), then what the
//! hook is about (`user`, `channel`, `method`, `data`, …). Every answer is
//! one JSON object holding exactly one of:
//! - `result`: the hook's result (an empty object allows);
//! - `error`: `{code, message, temporary}`, handed to the client as the
//!   command's error reply;
//! - `disconnect`: `{code, reason}`, which ends the connection with that
//!   close code (3000–4999).
//!
//! An answer holding none of them, or a `disconnect` code outside
//! 3000–4999, is a bad answer ([`Answer::parse`]'s `Err`): the gateway
//! treats it as a failed call (error 100, temporary).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The hooks, in the order the gateway's metrics list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// A `connect` without a token.
    Connect,
    /// A connection's `expire_at` passed (the server refreshes it).
    Refresh,
    /// A `subscribe` without a subscription token, in a proxied namespace.
    Subscribe,
    /// A client `publish` in a proxied namespace.
    Publish,
    /// A subscription's `expire_at` passed (the server refreshes it).
    SubRefresh,
    /// A client `rpc`.
    Rpc,
}

impl Hook {
    /// Every hook.
    pub const ALL: [Hook; 6] =
        [Hook::Connect, Hook::Refresh, Hook::Subscribe, Hook::Publish, Hook::SubRefresh, Hook::Rpc];

    /// The hook's name (metrics labels, logs).
    pub fn name(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Refresh => "refresh",
            Hook::Subscribe => "subscribe",
            Hook::Publish => "publish",
            Hook::SubRefresh => "sub_refresh",
            Hook::Rpc => "rpc",
        }
    }

    /// Index in [`Hook::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One proxy request. Empty strings and absent data are left out.
#[derive(Debug, Default, Serialize)]
pub struct Request<'a> {
    /// The connection id.
    pub client: &'a str,
    /// Always `websocket` here.
    pub transport: &'a str,
    /// Always `json`.
    pub protocol: &'a str,
    /// Always `json`.
    pub encoding: &'a str,
    /// The user (every hook but connect).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub user: &'a str,
    /// The channel (subscribe, publish, sub_refresh).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub channel: &'a str,
    /// The RPC method.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub method: &'a str,
    /// The client's name (connect).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub name: &'a str,
    /// The client's version (connect).
    #[serde(skip_serializing_if = "str::is_empty")]
    pub version: &'a str,
    /// The channels the client asks to recover at connect (its `subs`).
    #[serde(skip_serializing_if = "<[&str]>::is_empty")]
    pub channels: Vec<&'a str>,
    /// The command's `data` (connect, subscribe, publish, rpc).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
}

impl<'a> Request<'a> {
    /// A request of connection `client` (of `user`, `""` before connect).
    pub fn new(client: &'a str, user: &'a str) -> Self {
        Request {
            client,
            transport: "websocket",
            protocol: "json",
            encoding: "json",
            user,
            ..Default::default()
        }
    }

    /// The JSON body.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a proxy request serializes")
    }
}

/// The `error` of an answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ErrorAnswer {
    /// The error code given to the client.
    pub code: u32,
    /// Its message.
    #[serde(default)]
    pub message: String,
    /// Whether the client should retry.
    #[serde(default)]
    pub temporary: bool,
}

/// The `disconnect` of an answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DisconnectAnswer {
    /// Close code, 3000–4999.
    pub code: u16,
    /// Close reason (cut to 123 bytes by the gateway).
    #[serde(default)]
    pub reason: String,
}

/// What the backend answered.
#[derive(Debug)]
pub enum Answer<T> {
    /// Allowed, with the hook's result.
    Result(T),
    /// Refused with an error reply.
    Error(ErrorAnswer),
    /// Refused: the connection ends.
    Disconnect(DisconnectAnswer),
}

#[derive(Deserialize)]
struct Envelope<T> {
    result: Option<T>,
    error: Option<ErrorAnswer>,
    disconnect: Option<DisconnectAnswer>,
}

impl<T: serde::de::DeserializeOwned> Answer<T> {
    /// Reads an answer body; `Err` says why it is not one.
    pub fn parse(body: &[u8]) -> Result<Answer<T>, String> {
        let e: Envelope<T> = serde_json::from_slice(body).map_err(|e| format!("not a proxy answer: {e}"))?;
        match (e.disconnect, e.error, e.result) {
            (Some(d), _, _) if !(3000..=4999).contains(&d.code) => {
                Err(format!("disconnect code {} is outside 3000-4999", d.code))
            }
            (Some(d), _, _) => Ok(Answer::Disconnect(d)),
            (None, Some(e), _) => Ok(Answer::Error(e)),
            (None, None, Some(r)) => Ok(Answer::Result(r)),
            (None, None, None) => Err("no result, error or disconnect".into()),
        }
    }
}

/// A server-side subscription in a connect result.
#[derive(Debug, Default, Deserialize)]
pub struct SubOptions {
    /// Channel info of the connection in that channel.
    #[serde(default)]
    pub info: Option<Box<RawValue>>,
}

/// The connect hook's result.
#[derive(Debug, Default, Deserialize)]
pub struct ConnectResult {
    /// The user (`""`: anonymous).
    #[serde(default)]
    pub user: String,
    /// Unix seconds when the connection expires (0: never); with a refresh
    /// hook the server refreshes it then, else the client must.
    #[serde(default)]
    pub expire_at: u64,
    /// Connection info (in the client info of its publications and presence).
    #[serde(default)]
    pub info: Option<Box<RawValue>>,
    /// Data for the client, in the connect reply.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    /// Channels subscribed server-side.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Channels subscribed server-side, with options.
    #[serde(default)]
    pub subs: std::collections::BTreeMap<String, SubOptions>,
}

/// The refresh and sub_refresh hooks' result.
#[derive(Debug, Default, Deserialize)]
pub struct RefreshResult {
    /// The connection (subscription) is over: close 3005 (unsubscribe).
    #[serde(default)]
    pub expired: bool,
    /// The new expiry, Unix seconds (0: never).
    #[serde(default)]
    pub expire_at: u64,
    /// New connection (channel) info.
    #[serde(default)]
    pub info: Option<Box<RawValue>>,
}

/// The subscribe hook's result.
#[derive(Debug, Default, Deserialize)]
pub struct SubscribeResult {
    /// Channel info of the connection in that channel.
    #[serde(default)]
    pub info: Option<Box<RawValue>>,
    /// Unix seconds when the subscription expires (0: never); the server
    /// refreshes it then through the sub_refresh hook, or ends it.
    #[serde(default)]
    pub expire_at: u64,
}

/// The publish hook's result.
#[derive(Debug, Default, Deserialize)]
pub struct PublishResult {
    /// Replaces the publication's data when present.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

/// The rpc hook's result.
#[derive(Debug, Default, Deserialize)]
pub struct RpcResult {
    /// The reply's data.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_leave_out_what_is_empty() {
        let data = RawValue::from_string(r#"{"a":1}"#.into()).unwrap();
        let r = Request { channel: "chat:1", data: Some(&data), ..Request::new("c1", "u1") };
        let body = String::from_utf8(r.to_body()).unwrap();
        assert_eq!(
            body,
            r#"{"client":"c1","transport":"websocket","protocol":"json","encoding":"json","user":"u1","channel":"chat:1","data":{"a":1}}"#
        );
        let connect = String::from_utf8(Request::new("c2", "").to_body()).unwrap();
        assert!(!connect.contains("user") && !connect.contains("data"), "{connect}");
    }

    #[test]
    fn answers_read_each_outcome() {
        let r = Answer::<ConnectResult>::parse(br#"{"result":{"user":"56","expire_at":9,"channels":["a"]}}"#);
        let Ok(Answer::Result(c)) = r else { panic!("{r:?}") };
        assert_eq!((c.user.as_str(), c.expire_at, c.channels.len()), ("56", 9, 1));
        let r = Answer::<ConnectResult>::parse(br#"{"error":{"code":1000,"message":"no"}}"#);
        let want = ErrorAnswer { code: 1000, message: "no".into(), temporary: false };
        assert!(matches!(r, Ok(Answer::Error(ref e)) if *e == want), "{r:?}");
        let r = Answer::<RpcResult>::parse(br#"{"disconnect":{"code":4500,"reason":"bye"}}"#);
        let want = DisconnectAnswer { code: 4500, reason: "bye".into() };
        assert!(matches!(r, Ok(Answer::Disconnect(ref d)) if *d == want), "{r:?}");
        let r = Answer::<PublishResult>::parse(br#"{"result":{}}"#);
        assert!(matches!(r, Ok(Answer::Result(PublishResult { data: None }))));
    }

    #[test]
    fn bad_answers_are_refused() {
        for bad in
            [&b""[..], b"[]", b"{}", b"not json", br#"{"disconnect":{"code":1000}}"#, br#"{"result":7}"#]
        {
            assert!(Answer::<SubscribeResult>::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
