//! Client → server commands: `{"id":N,"<method>":{…}}`, several per frame.
//!
//! Key order is free (centrifuge-js 5.8 writes the method before `id`), ids
//! are client-chosen and not reset on reconnect, and an object with no id and
//! no method is the pong `{}`. A line that is not a command object is a
//! [`DecodeError`], which the server answers with close 3501 (bad request).

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::position::StreamPosition;

/// `connect.subs` entry: recovery data for a server-side subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct SubscribeRecovery {
    /// Whether the client asks to recover.
    #[serde(default)]
    pub recover: bool,
    /// Last epoch seen.
    #[serde(default)]
    pub epoch: String,
    /// Last offset seen.
    #[serde(default)]
    pub offset: u64,
}

/// `connect`.
#[derive(Debug, Default, Deserialize)]
pub struct ConnectRequest {
    /// Connection JWT.
    #[serde(default)]
    pub token: String,
    /// Opaque application data.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    /// Server-side subscriptions to recover.
    #[serde(default)]
    pub subs: HashMap<String, SubscribeRecovery>,
    /// SDK name (`js`, `python`).
    #[serde(default)]
    pub name: String,
    /// SDK version.
    #[serde(default)]
    pub version: String,
}

/// `subscribe`.
#[derive(Debug, Default, Deserialize)]
pub struct SubscribeRequest {
    /// Channel name.
    pub channel: String,
    /// Subscription JWT.
    #[serde(default)]
    pub token: String,
    /// Recover from `epoch`/`offset`.
    #[serde(default)]
    pub recover: bool,
    /// Epoch last seen.
    #[serde(default)]
    pub epoch: String,
    /// Offset last seen.
    #[serde(default)]
    pub offset: u64,
    /// Opaque application data.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
    /// Client asks for a positioned stream.
    #[serde(default)]
    pub positioned: bool,
    /// Client asks for a recoverable stream.
    #[serde(default)]
    pub recoverable: bool,
    /// Client wants join/leave pushes.
    #[serde(default)]
    pub join_leave: bool,
    /// Bit 2: answer 112 instead of `recovered:false`.
    #[serde(default)]
    pub flag: u64,
    /// Subscription type; only 0 (plain stream) is served.
    #[serde(default, rename = "type")]
    pub kind: i32,
}

/// Subscribe `flag` bit: the client wants error 112 rather than `recovered:false`.
pub const FLAG_REJECT_UNRECOVERED: u64 = 2;

/// `unsubscribe`.
#[derive(Debug, Default, Deserialize)]
pub struct UnsubscribeRequest {
    /// Channel name.
    #[serde(default)]
    pub channel: String,
}

/// `publish`.
#[derive(Debug, Default, Deserialize)]
pub struct PublishRequest {
    /// Channel name.
    #[serde(default)]
    pub channel: String,
    /// Payload (raw JSON); missing → error 107.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

/// `presence`, `presence_stats` and `unsubscribe`-like requests naming one channel.
#[derive(Debug, Default, Deserialize)]
pub struct ChannelRequest {
    /// Channel name.
    #[serde(default)]
    pub channel: String,
}

/// `history`.
#[derive(Debug, Default, Deserialize)]
pub struct HistoryRequest {
    /// Channel name.
    #[serde(default)]
    pub channel: String,
    /// 0 → position only; -1 → all (capped); N → at most N.
    #[serde(default)]
    pub limit: i64,
    /// Read after this position.
    #[serde(default)]
    pub since: Option<StreamPosition>,
    /// Newest first.
    #[serde(default)]
    pub reverse: bool,
}

/// `refresh`.
#[derive(Debug, Default, Deserialize)]
pub struct RefreshRequest {
    /// New connection JWT.
    #[serde(default)]
    pub token: String,
}

/// `sub_refresh`.
#[derive(Debug, Default, Deserialize)]
pub struct SubRefreshRequest {
    /// Channel name.
    #[serde(default)]
    pub channel: String,
    /// New subscription JWT.
    #[serde(default)]
    pub token: String,
}

/// `rpc`.
#[derive(Debug, Default, Deserialize)]
pub struct RpcRequest {
    /// Method name.
    #[serde(default)]
    pub method: String,
    /// Payload.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

/// `send` (no reply).
#[derive(Debug, Default, Deserialize)]
pub struct SendRequest {
    /// Payload.
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

/// The method of a command, with its request.
#[derive(Debug)]
pub enum Method {
    /// `connect`.
    Connect(ConnectRequest),
    /// `subscribe`.
    Subscribe(SubscribeRequest),
    /// `unsubscribe`.
    Unsubscribe(UnsubscribeRequest),
    /// `publish`.
    Publish(PublishRequest),
    /// `presence`.
    Presence(ChannelRequest),
    /// `presence_stats`.
    PresenceStats(ChannelRequest),
    /// `history`.
    History(HistoryRequest),
    /// Legacy `ping` command.
    Ping,
    /// `send`.
    Send(SendRequest),
    /// `rpc`.
    Rpc(RpcRequest),
    /// `refresh`.
    Refresh(RefreshRequest),
    /// `sub_refresh`.
    SubRefresh(SubRefreshRequest),
    /// `{}`: the answer to a server ping.
    Pong,
    /// An id with no method this server knows (answered with error 104).
    Unknown,
}

impl Method {
    /// The JSON key of the method, used as the reply key.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Connect(_) => "connect",
            Method::Subscribe(_) => "subscribe",
            Method::Unsubscribe(_) => "unsubscribe",
            Method::Publish(_) => "publish",
            Method::Presence(_) => "presence",
            Method::PresenceStats(_) => "presence_stats",
            Method::History(_) => "history",
            Method::Ping => "ping",
            Method::Send(_) => "send",
            Method::Rpc(_) => "rpc",
            Method::Refresh(_) => "refresh",
            Method::SubRefresh(_) => "sub_refresh",
            Method::Pong | Method::Unknown => "",
        }
    }
}

/// One decoded command.
#[derive(Debug)]
pub struct Command {
    /// Client-chosen id; 0 for `send` and pong.
    pub id: u32,
    /// What it asks for.
    pub method: Method,
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    id: u32,
    connect: Option<ConnectRequest>,
    subscribe: Option<SubscribeRequest>,
    unsubscribe: Option<UnsubscribeRequest>,
    publish: Option<PublishRequest>,
    presence: Option<ChannelRequest>,
    presence_stats: Option<ChannelRequest>,
    history: Option<HistoryRequest>,
    ping: Option<serde::de::IgnoredAny>,
    send: Option<SendRequest>,
    rpc: Option<RpcRequest>,
    refresh: Option<RefreshRequest>,
    sub_refresh: Option<SubRefreshRequest>,
}

/// Why a line is not a command; always answered with close 3501.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, or fields of the wrong type.
    #[error("malformed command: {0}")]
    Malformed(String),
    /// More than one method key in one command.
    #[error("more than one method in a command")]
    AmbiguousMethod,
    /// A method other than `send` without an id.
    #[error("command without id")]
    MissingId,
}

impl DecodeError {
    /// The answer to any undecodable command: close 3501 (bad request), as
    /// Centrifuge does; the SDKs do not reconnect after it.
    pub fn disconnect(&self) -> super::Disconnect {
        super::Disconnect::BAD_REQUEST
    }
}

/// Decodes one command line.
pub fn decode_command(line: &[u8]) -> Result<Command, DecodeError> {
    let env: Envelope = serde_json::from_slice(line).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let mut methods = Vec::with_capacity(1);
    if let Some(r) = env.connect {
        methods.push(Method::Connect(r));
    }
    if let Some(r) = env.subscribe {
        methods.push(Method::Subscribe(r));
    }
    if let Some(r) = env.unsubscribe {
        methods.push(Method::Unsubscribe(r));
    }
    if let Some(r) = env.publish {
        methods.push(Method::Publish(r));
    }
    if let Some(r) = env.presence {
        methods.push(Method::Presence(r));
    }
    if let Some(r) = env.presence_stats {
        methods.push(Method::PresenceStats(r));
    }
    if let Some(r) = env.history {
        methods.push(Method::History(r));
    }
    if env.ping.is_some() {
        methods.push(Method::Ping);
    }
    if let Some(r) = env.send {
        methods.push(Method::Send(r));
    }
    if let Some(r) = env.rpc {
        methods.push(Method::Rpc(r));
    }
    if let Some(r) = env.refresh {
        methods.push(Method::Refresh(r));
    }
    if let Some(r) = env.sub_refresh {
        methods.push(Method::SubRefresh(r));
    }
    if methods.len() > 1 {
        return Err(DecodeError::AmbiguousMethod);
    }
    let method = match methods.pop() {
        Some(m) => m,
        None if env.id == 0 => Method::Pong,
        None => Method::Unknown,
    };
    if env.id == 0 && !matches!(method, Method::Send(_) | Method::Pong) {
        return Err(DecodeError::MissingId);
    }
    Ok(Command { id: env.id, method })
}

/// Splits a frame into command lines (`\n`-separated, surrounding whitespace
/// and blank lines ignored) and decodes each, in order.
pub fn decode_frame(frame: &[u8]) -> impl Iterator<Item = Result<Command, DecodeError>> + '_ {
    frame.split(|b| *b == b'\n').map(|l| l.trim_ascii()).filter(|l| !l.is_empty()).map(decode_command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn js_first_frame_connect_then_subscribe() {
        let frame = br#"{"connect":{"token":"t","name":"js"},"id":7}
{"id":8,"subscribe":{"channel":"chat:1","recover":true,"epoch":"E","offset":41,"flag":1}}"#;
        let cmds: Vec<Command> = decode_frame(frame).collect::<Result<_, _>>().unwrap();
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0].id, 7);
        assert!(matches!(&cmds[0].method, Method::Connect(c) if c.token == "t" && c.name == "js"));
        match &cmds[1].method {
            Method::Subscribe(s) => {
                assert_eq!(
                    (s.channel.as_str(), s.recover, s.epoch.as_str(), s.offset),
                    ("chat:1", true, "E", 41)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pong_send_unknown_and_errors() {
        assert!(matches!(decode_command(b"{}").unwrap().method, Method::Pong));
        assert!(matches!(decode_command(br#"{"send":{"data":{"a":1}}}"#).unwrap().method, Method::Send(_)));
        assert!(matches!(decode_command(br#"{"id":3,"nope":{}}"#).unwrap().method, Method::Unknown));
        assert!(matches!(decode_command(br#"{"id":3,"ping":{}}"#).unwrap().method, Method::Ping));
        assert_eq!(
            decode_command(br#"{"id":1,"publish":{"channel":"a"},"presence":{"channel":"a"}}"#).unwrap_err(),
            DecodeError::AmbiguousMethod
        );
        assert_eq!(decode_command(br#"{"publish":{"channel":"a"}}"#).unwrap_err(), DecodeError::MissingId);
        assert!(matches!(decode_command(b"{not json").unwrap_err(), DecodeError::Malformed(_)));
        assert_eq!(decode_command(b"{not json").unwrap_err().disconnect().code, 3501);
        assert!(matches!(decode_command(br#"{"id":-1}"#).unwrap_err(), DecodeError::Malformed(_)));
        assert!(matches!(decode_command(b"[]").unwrap_err(), DecodeError::Malformed(_)));
        // Python sends spaces; whitespace around lines is fine.
        let frame = b"  { \"id\" : 2 , \"presence_stats\" : { \"channel\" : \"x\" } }  \r\n\n";
        assert_eq!(decode_frame(frame).count(), 1);
    }
}
