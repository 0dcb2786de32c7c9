//! The gateway ⇄ router protocol: versioned, length-delimited binary frames.
//!
//! Each frame is `u32` big-endian body length, then the body: a one-byte tag
//! and the fields of one [`ClusterMsg`]. Integers are big-endian, strings are
//! `u16` length + UTF-8, byte blobs `u32` length + bytes, lists `u32` count +
//! items. Decoding takes the frame out of the read buffer as [`Bytes`] and
//! hands out payload fields as slices of it: a delivered publication's JSON is
//! never copied between the socket and the gateway's shared WebSocket frame.
//!
//! The first frame on a link is [`ClusterMsg::Hello`]; its layout (version
//! first) is frozen across versions, so a router can read any gateway's hello
//! and answer [`ClusterMsg::Refuse`] to a version it does not speak.
//!
//! Links batch: many frames go into one write (quinn collapses to ~46 k
//! messages/s with one message per write; see `CRATES.md`).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::client::Publication;

/// The protocol version this build speaks. Version 2 added
/// [`ClusterMsg::Position`]; version 3 added presence rounds
/// ([`ClusterMsg::PresenceBegin`], [`ClusterMsg::PresenceEnd`]). A router
/// still accepts version-1 and -2 gateways (it sends version 1 no positions;
/// neither sends rounds). Version 4 added the user commands of the server
/// API ([`ClusterMsg::SubscribeUser`], [`ClusterMsg::UnsubscribeUser`],
/// [`ClusterMsg::DisconnectUser`], [`ClusterMsg::RefreshUser`]), sent only
/// to gateways of version ≥ [`USER_COMMANDS_SINCE`]. Version 5 added
/// [`ClusterMsg::Emulation`] (an HTTP fallback session's commands read by
/// another gateway process), relayed only to gateways of version ≥
/// [`EMULATION_SINCE`], and [`ClusterMsg::Stamp`] (the router's clock ahead
/// of a batch of deliveries, for the gateway's per-hop latency).
pub const PROTOCOL_VERSION: u16 = 5;

/// The oldest version a router accepts on a link.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The congestion controller a link's sender runs (router: deliveries;
/// gateway: requests and interest). Measured across a WAN of 40 ms ± 10 ms
/// one way with 1 % loss at 1,000 publications/s
/// (`benches/scripts/wan_bench.py`): with Cubic the jitter's reordering and
/// the loss keep the window collapsed and a backlog builds (p50 1.5 s, p99
/// 3.1 s); with BBR p50 46 ms, p99 117 ms (52 ms with the gateway's
/// datagram copies, `uplink.datagram_copies`); on loopback both alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkCongestion {
    /// BBR (the default): paced by measured bandwidth and RTT, not by loss.
    #[default]
    Bbr,
    /// Cubic (loss-based; QUIC's usual default).
    Cubic,
}

/// The first version whose gateways take [`ClusterMsg::Position`].
pub const POSITIONS_SINCE: u16 = 2;

/// The first version whose gateways send presence rounds.
pub const PRESENCE_ROUNDS_SINCE: u16 = 3;

/// The first version whose gateways take the user commands.
pub const USER_COMMANDS_SINCE: u16 = 4;

/// The first version whose gateways send and take [`ClusterMsg::Emulation`].
pub const EMULATION_SINCE: u16 = 5;

/// Default bound on one frame's body (16 MiB; a replay answer is capped below it).
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// One message on a gateway ⇄ router link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterMsg {
    /// Gateway → router, first on the control stream.
    Hello {
        /// Protocol version ([`PROTOCOL_VERSION`]).
        version: u16,
        /// Stable gateway id (config).
        gateway_id: String,
        /// Random per process start, so a restart is told from a reconnect.
        instance: u64,
    },
    /// Router → gateway: hello accepted.
    Welcome {
        /// Version the router speaks on this link.
        version: u16,
        /// The router's id.
        router_id: String,
        /// Random per router process start.
        instance: u64,
    },
    /// Router → gateway: hello refused (e.g. unknown version); the link closes.
    Refuse {
        /// Why.
        reason: String,
    },
    /// Either way; the peer answers with the same sequence number.
    Heartbeat {
        /// Sequence number.
        seq: u64,
        /// Whether this is the answer.
        reply: bool,
    },
    /// Gateway → router: channels that got their first local subscriber.
    Subscribe {
        /// Channels.
        channels: Vec<String>,
    },
    /// Gateway → router: channels that lost their last local subscriber.
    Unsubscribe {
        /// Channels.
        channels: Vec<String>,
    },
    /// Gateway → router: the gateway's whole interest set (after a reconnect),
    /// replacing what the router held for it.
    Snapshot {
        /// Channels.
        channels: Vec<String>,
    },
    /// Gateway → router: a client joined a presence-enabled channel.
    Join {
        /// Channel.
        channel: String,
        /// Client id.
        client: String,
        /// User id.
        user: String,
        /// `ClientInfo` JSON.
        info: Bytes,
    },
    /// Gateway → router: a client left a presence-enabled channel.
    Leave {
        /// Channel.
        channel: String,
        /// Client id.
        client: String,
    },
    /// Gateway → router: a user's connection came up on this gateway.
    UserOnline {
        /// User id.
        user: String,
        /// Client id.
        client: String,
    },
    /// Gateway → router: a user's connection went away.
    UserOffline {
        /// User id.
        user: String,
        /// Client id.
        client: String,
    },
    /// Gateway → router: a client publish.
    Publish {
        /// Request id, echoed in the answer.
        req: u64,
        /// Channel.
        channel: String,
        /// Payload JSON.
        data: Bytes,
        /// Publisher's `ClientInfo` JSON.
        info: Option<Bytes>,
        /// Idempotency key (empty: none).
        idempotency_key: String,
    },
    /// Router → gateway: publish accepted at this position.
    PublishOk {
        /// Request id.
        req: u64,
        /// Offset given (0 for ephemeral channels).
        offset: u64,
        /// Epoch of the channel.
        epoch: String,
    },
    /// Router → gateway: a request failed with a client-protocol error code.
    RequestError {
        /// Request id.
        req: u64,
        /// Client-protocol error code (100–113).
        code: u32,
        /// Message.
        message: String,
    },
    /// Router → gateway: a publication to deliver to local subscribers.
    Deliver {
        /// Channel.
        channel: String,
        /// Epoch.
        epoch: String,
        /// The publication (offset inside).
        publication: Publication,
    },
    /// Gateway → router: the stream position, and the publications after
    /// (`epoch`, `offset`) when `recover` is set (a subscribe with recovery).
    Recover {
        /// Request id.
        req: u64,
        /// Channel.
        channel: String,
        /// Whether to read publications after the position.
        recover: bool,
        /// Client's epoch.
        epoch: String,
        /// Client's offset.
        offset: u64,
    },
    /// Router → gateway: answer to [`ClusterMsg::Recover`]: all missed
    /// publications (`recovered`), or none and the current position.
    Replay {
        /// Request id.
        req: u64,
        /// Current epoch.
        epoch: String,
        /// Current top offset.
        top: u64,
        /// Whether every missed publication is included.
        recovered: bool,
        /// Whether the channel keeps positions (false: ephemeral).
        positioned: bool,
        /// Missed publications, ascending.
        publications: Vec<Publication>,
    },
    /// Gateway → router: client `history`.
    History {
        /// Request id.
        req: u64,
        /// Channel.
        channel: String,
        /// 0 → position only, -1 → all (capped), N → at most N.
        limit: i64,
        /// Read after this (offset, epoch).
        since: Option<(u64, String)>,
        /// Newest first.
        reverse: bool,
    },
    /// Router → gateway: answer to `History`.
    HistoryResult {
        /// Request id.
        req: u64,
        /// Epoch.
        epoch: String,
        /// Top offset.
        top: u64,
        /// Publications in the requested order.
        publications: Vec<Publication>,
    },
    /// Gateway → router: client `presence`.
    Presence {
        /// Request id.
        req: u64,
        /// Channel.
        channel: String,
    },
    /// Router → gateway: (client id, `ClientInfo` JSON) pairs.
    PresenceResult {
        /// Request id.
        req: u64,
        /// Entries.
        entries: Vec<(String, Bytes)>,
    },
    /// Gateway → router: client `presence_stats`.
    PresenceStats {
        /// Request id.
        req: u64,
        /// Channel.
        channel: String,
    },
    /// Router → gateway: counts.
    PresenceStatsResult {
        /// Request id.
        req: u64,
        /// Connections.
        num_clients: u32,
        /// Distinct users.
        num_users: u32,
    },
    /// Either way: the sender is draining; move interest elsewhere.
    Drain,
    /// Router → gateway: you fell behind on these channels; subscribers must
    /// recover (their positions are re-checked).
    Resync {
        /// Channels.
        channels: Vec<String>,
    },
    /// Router → gateway: disconnect a user's connections (server API
    /// `disconnect`), sent by the router owning the user's presence to the
    /// gateways holding the user.
    DisconnectUser {
        /// User id.
        user: String,
        /// Only this client, if non-empty.
        client: String,
        /// Close code.
        code: u16,
        /// Close reason.
        reason: String,
        /// Clients to keep connected.
        whitelist: Vec<String>,
    },
    /// Router → gateway: unsubscribe a user's connections from a channel
    /// (server API `unsubscribe`; the clients get unsubscribe push 2000).
    UnsubscribeUser {
        /// User id.
        user: String,
        /// Channel.
        channel: String,
        /// Only this client, if non-empty.
        client: String,
    },
    /// Router → gateway: subscribe a user's connections to a channel (server
    /// API `subscribe`; the clients get a `subscribe` push, then the
    /// channel's publications, from (`epoch`, `offset`) when `recover`).
    SubscribeUser {
        /// User id.
        user: String,
        /// Channel.
        channel: String,
        /// Only this client, if non-empty.
        client: String,
        /// Whether to recover from (`epoch`, `offset`).
        recover: bool,
        /// Epoch to recover from.
        epoch: String,
        /// Offset to recover from.
        offset: u64,
    },
    /// Router → gateway: a user's connections expire at `expire_at` (unix
    /// seconds; 0: never), or now when `expired` (server API `refresh`).
    RefreshUser {
        /// User id.
        user: String,
        /// Only this client, if non-empty.
        client: String,
        /// Expired now: close 3005.
        expired: bool,
        /// New expiry (unix seconds, 0: none).
        expire_at: u64,
    },
    /// Router → gateway, on a delivery stream ahead of a batch of
    /// deliveries (version ≥ [`EMULATION_SINCE`]): when the router's link
    /// writer wrote it (Unix microseconds). The gateway counts the time to
    /// its reading as the link's hop (clocks of one box, or synchronized).
    Stamp {
        /// Unix time, microseconds.
        unix_micros: u64,
    },
    /// Gateway → router → gateway: the commands of an emulated session
    /// (`POST /emulation`) that another gateway process read; the router
    /// relays them to the gateway `node` names.
    Emulation {
        /// The session's node (`<gateway id>/<core>`).
        node: String,
        /// The session.
        session: String,
        /// The commands (lines).
        data: Bytes,
    },
    /// Router → gateway: a client push outside the offset stream (join and
    /// leave), already serialized as one client-protocol line, delivered to
    /// the channel's local subscribers as it is.
    Push {
        /// Channel.
        channel: String,
        /// The push line (`{"push":{"channel":…,"join":…}}`).
        push: Bytes,
    },
    /// Router → gateway, on the channel's delivery stream (so it is ordered
    /// with the channel's deliveries): the gateway's interest in `channel`
    /// was registered when the stream stood at `top` in `epoch`; every
    /// publication after it follows on this stream. The gateway then knows
    /// the channel's position without asking (version ≥ [`POSITIONS_SINCE`]).
    Position {
        /// Channel.
        channel: String,
        /// Epoch.
        epoch: String,
        /// Offset of the last publication before the ones that follow.
        top: u64,
    },
    /// Gateway → router, on the control stream: a presence round starts.
    /// Every presence fact (user online, channel join) this gateway sent
    /// before is now unconfirmed; the gateway sends every fact it holds
    /// again (to each key's current owner), then [`ClusterMsg::PresenceEnd`].
    PresenceBegin {
        /// Round number (increasing per link).
        round: u64,
    },
    /// Gateway → router: the round's facts are all sent; what this gateway
    /// had not confirmed since the matching begin is gone (users enter the
    /// grace period, channel members leave).
    PresenceEnd {
        /// Round number.
        round: u64,
    },
}

/// Why a link's bytes were refused; the link is closed with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// A frame longer than the bound.
    #[error("frame of {0} bytes exceeds the limit")]
    TooBig(usize),
    /// An unknown tag.
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    /// A body that ends early, has trailing bytes, or invalid UTF-8.
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

mod tag {
    pub(super) const HELLO: u8 = 1;
    pub(super) const WELCOME: u8 = 2;
    pub(super) const REFUSE: u8 = 3;
    pub(super) const HEARTBEAT: u8 = 4;
    pub(super) const SUBSCRIBE: u8 = 5;
    pub(super) const UNSUBSCRIBE: u8 = 6;
    pub(super) const SNAPSHOT: u8 = 7;
    pub(super) const JOIN: u8 = 8;
    pub(super) const LEAVE: u8 = 9;
    pub(super) const USER_ONLINE: u8 = 10;
    pub(super) const USER_OFFLINE: u8 = 11;
    pub(super) const PUBLISH: u8 = 12;
    pub(super) const PUBLISH_OK: u8 = 13;
    pub(super) const REQUEST_ERROR: u8 = 14;
    pub(super) const DELIVER: u8 = 15;
    pub(super) const RECOVER: u8 = 16;
    pub(super) const REPLAY: u8 = 17;
    pub(super) const HISTORY: u8 = 18;
    pub(super) const HISTORY_RESULT: u8 = 19;
    pub(super) const PRESENCE: u8 = 20;
    pub(super) const PRESENCE_RESULT: u8 = 21;
    pub(super) const PRESENCE_STATS: u8 = 22;
    pub(super) const PRESENCE_STATS_RESULT: u8 = 23;
    pub(super) const DRAIN: u8 = 24;
    pub(super) const RESYNC: u8 = 25;
    pub(super) const DISCONNECT_USER: u8 = 26;
    pub(super) const UNSUBSCRIBE_USER: u8 = 27;
    pub(super) const PUSH: u8 = 28;
    pub(super) const POSITION: u8 = 29;
    pub(super) const PRESENCE_BEGIN: u8 = 30;
    pub(super) const PRESENCE_END: u8 = 31;
    pub(super) const SUBSCRIBE_USER: u8 = 32;
    pub(super) const REFRESH_USER: u8 = 33;
    pub(super) const EMULATION: u8 = 34;
    pub(super) const STAMP: u8 = 35;
}

struct W<'a>(&'a mut BytesMut);

impl W<'_> {
    fn str(&mut self, s: &str) {
        let len = s.len().min(u16::MAX as usize);
        self.0.put_u16(len as u16);
        self.0.put_slice(&s.as_bytes()[..len]);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.put_u32(b.len() as u32);
        self.0.put_slice(b);
    }
    fn opt_bytes(&mut self, b: &Option<Bytes>) {
        match b {
            Some(b) => {
                self.0.put_u8(1);
                self.bytes(b);
            }
            None => self.0.put_u8(0),
        }
    }
    fn strs(&mut self, v: &[String]) {
        self.0.put_u32(v.len() as u32);
        for s in v {
            self.str(s);
        }
    }
    fn publication(&mut self, p: &Publication) {
        self.0.put_u64(p.offset);
        self.bytes(&p.data);
        self.opt_bytes(&p.info);
        self.opt_bytes(&p.tags);
    }
    fn publications(&mut self, v: &[Publication]) {
        self.0.put_u32(v.len() as u32);
        for p in v {
            self.publication(p);
        }
    }
}

struct R {
    buf: Bytes,
    what: &'static str,
}

impl R {
    fn err(&self) -> ClusterError {
        ClusterError::Malformed(self.what)
    }
    fn need(&self, n: usize) -> Result<(), ClusterError> {
        if self.buf.remaining() < n { Err(self.err()) } else { Ok(()) }
    }
    fn u8(&mut self) -> Result<u8, ClusterError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn bool(&mut self) -> Result<bool, ClusterError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.err()),
        }
    }
    fn u16(&mut self) -> Result<u16, ClusterError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, ClusterError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self) -> Result<u64, ClusterError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    fn i64(&mut self) -> Result<i64, ClusterError> {
        self.need(8)?;
        Ok(self.buf.get_i64())
    }
    fn str(&mut self) -> Result<String, ClusterError> {
        let n = self.u16()? as usize;
        self.need(n)?;
        let b = self.buf.split_to(n);
        String::from_utf8(b.to_vec()).map_err(|_| self.err())
    }
    fn bytes(&mut self) -> Result<Bytes, ClusterError> {
        let n = self.u32()? as usize;
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn opt_bytes(&mut self) -> Result<Option<Bytes>, ClusterError> {
        Ok(if self.bool()? { Some(self.bytes()?) } else { None })
    }
    /// A count of items each at least `min_item` bytes long, checked against
    /// what is left so a forged count cannot make us allocate.
    fn count(&mut self, min_item: usize) -> Result<usize, ClusterError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.buf.remaining() {
            return Err(self.err());
        }
        Ok(n)
    }
    fn strs(&mut self) -> Result<Vec<String>, ClusterError> {
        let n = self.count(2)?;
        (0..n).map(|_| self.str()).collect()
    }
    fn publication(&mut self) -> Result<Publication, ClusterError> {
        Ok(Publication {
            offset: self.u64()?,
            data: self.bytes()?,
            info: self.opt_bytes()?,
            tags: self.opt_bytes()?,
        })
    }
    fn publications(&mut self) -> Result<Vec<Publication>, ClusterError> {
        let n = self.count(14)?;
        (0..n).map(|_| self.publication()).collect()
    }
    fn end(self) -> Result<(), ClusterError> {
        if self.buf.has_remaining() { Err(ClusterError::Malformed(self.what)) } else { Ok(()) }
    }
}

impl ClusterMsg {
    /// Short name, for logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            ClusterMsg::Hello { .. } => "hello",
            ClusterMsg::Welcome { .. } => "welcome",
            ClusterMsg::Refuse { .. } => "refuse",
            ClusterMsg::Heartbeat { .. } => "heartbeat",
            ClusterMsg::Subscribe { .. } => "subscribe",
            ClusterMsg::Unsubscribe { .. } => "unsubscribe",
            ClusterMsg::Snapshot { .. } => "snapshot",
            ClusterMsg::Join { .. } => "join",
            ClusterMsg::Leave { .. } => "leave",
            ClusterMsg::UserOnline { .. } => "user_online",
            ClusterMsg::UserOffline { .. } => "user_offline",
            ClusterMsg::Publish { .. } => "publish",
            ClusterMsg::PublishOk { .. } => "publish_ok",
            ClusterMsg::RequestError { .. } => "request_error",
            ClusterMsg::Deliver { .. } => "deliver",
            ClusterMsg::Recover { .. } => "recover",
            ClusterMsg::Replay { .. } => "replay",
            ClusterMsg::History { .. } => "history",
            ClusterMsg::HistoryResult { .. } => "history_result",
            ClusterMsg::Presence { .. } => "presence",
            ClusterMsg::PresenceResult { .. } => "presence_result",
            ClusterMsg::PresenceStats { .. } => "presence_stats",
            ClusterMsg::PresenceStatsResult { .. } => "presence_stats_result",
            ClusterMsg::Drain => "drain",
            ClusterMsg::Resync { .. } => "resync",
            ClusterMsg::DisconnectUser { .. } => "disconnect_user",
            ClusterMsg::UnsubscribeUser { .. } => "unsubscribe_user",
            ClusterMsg::SubscribeUser { .. } => "subscribe_user",
            ClusterMsg::RefreshUser { .. } => "refresh_user",
            ClusterMsg::Emulation { .. } => "emulation",
            ClusterMsg::Stamp { .. } => "stamp",
            ClusterMsg::Push { .. } => "push",
            ClusterMsg::Position { .. } => "position",
            ClusterMsg::PresenceBegin { .. } => "presence_begin",
            ClusterMsg::PresenceEnd { .. } => "presence_end",
        }
    }

    /// A server API command for a user's connections: (user, client; empty
    /// for all of the user's).
    pub fn user_target(&self) -> Option<(&str, &str)> {
        match self {
            ClusterMsg::SubscribeUser { user, client, .. }
            | ClusterMsg::UnsubscribeUser { user, client, .. }
            | ClusterMsg::DisconnectUser { user, client, .. }
            | ClusterMsg::RefreshUser { user, client, .. } => Some((user, client)),
            _ => None,
        }
    }

    /// The id of a request to a router, or of its answer.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            ClusterMsg::Publish { req, .. }
            | ClusterMsg::Recover { req, .. }
            | ClusterMsg::History { req, .. }
            | ClusterMsg::Presence { req, .. }
            | ClusterMsg::PresenceStats { req, .. }
            | ClusterMsg::PublishOk { req, .. }
            | ClusterMsg::RequestError { req, .. }
            | ClusterMsg::Replay { req, .. }
            | ClusterMsg::HistoryResult { req, .. }
            | ClusterMsg::PresenceResult { req, .. }
            | ClusterMsg::PresenceStatsResult { req, .. } => Some(*req),
            _ => None,
        }
    }

    /// Whether this is a router's answer to a request.
    pub fn is_answer(&self) -> bool {
        matches!(
            self,
            ClusterMsg::PublishOk { .. }
                | ClusterMsg::RequestError { .. }
                | ClusterMsg::Replay { .. }
                | ClusterMsg::HistoryResult { .. }
                | ClusterMsg::PresenceResult { .. }
                | ClusterMsg::PresenceStatsResult { .. }
        )
    }

    /// The channel a per-channel message concerns (it decides the owner).
    pub fn channel(&self) -> Option<&str> {
        match self {
            ClusterMsg::Publish { channel, .. }
            | ClusterMsg::Recover { channel, .. }
            | ClusterMsg::History { channel, .. }
            | ClusterMsg::Presence { channel, .. }
            | ClusterMsg::PresenceStats { channel, .. }
            | ClusterMsg::Join { channel, .. }
            | ClusterMsg::Leave { channel, .. }
            | ClusterMsg::Deliver { channel, .. }
            | ClusterMsg::Push { channel, .. }
            | ClusterMsg::Position { channel, .. } => Some(channel),
            _ => None,
        }
    }

    /// Appends the framed message (length prefix included) to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0);
        let mut w = W(out);
        match self {
            ClusterMsg::Hello { version, gateway_id, instance } => {
                w.0.put_u8(tag::HELLO);
                w.0.put_u16(*version);
                w.str(gateway_id);
                w.0.put_u64(*instance);
            }
            ClusterMsg::Welcome { version, router_id, instance } => {
                w.0.put_u8(tag::WELCOME);
                w.0.put_u16(*version);
                w.str(router_id);
                w.0.put_u64(*instance);
            }
            ClusterMsg::Refuse { reason } => {
                w.0.put_u8(tag::REFUSE);
                w.str(reason);
            }
            ClusterMsg::Heartbeat { seq, reply } => {
                w.0.put_u8(tag::HEARTBEAT);
                w.0.put_u64(*seq);
                w.0.put_u8(*reply as u8);
            }
            ClusterMsg::Subscribe { channels } => {
                w.0.put_u8(tag::SUBSCRIBE);
                w.strs(channels);
            }
            ClusterMsg::Unsubscribe { channels } => {
                w.0.put_u8(tag::UNSUBSCRIBE);
                w.strs(channels);
            }
            ClusterMsg::Snapshot { channels } => {
                w.0.put_u8(tag::SNAPSHOT);
                w.strs(channels);
            }
            ClusterMsg::Join { channel, client, user, info } => {
                w.0.put_u8(tag::JOIN);
                w.str(channel);
                w.str(client);
                w.str(user);
                w.bytes(info);
            }
            ClusterMsg::Leave { channel, client } => {
                w.0.put_u8(tag::LEAVE);
                w.str(channel);
                w.str(client);
            }
            ClusterMsg::UserOnline { user, client } => {
                w.0.put_u8(tag::USER_ONLINE);
                w.str(user);
                w.str(client);
            }
            ClusterMsg::UserOffline { user, client } => {
                w.0.put_u8(tag::USER_OFFLINE);
                w.str(user);
                w.str(client);
            }
            ClusterMsg::Publish { req, channel, data, info, idempotency_key } => {
                w.0.put_u8(tag::PUBLISH);
                w.0.put_u64(*req);
                w.str(channel);
                w.bytes(data);
                w.opt_bytes(info);
                w.str(idempotency_key);
            }
            ClusterMsg::PublishOk { req, offset, epoch } => {
                w.0.put_u8(tag::PUBLISH_OK);
                w.0.put_u64(*req);
                w.0.put_u64(*offset);
                w.str(epoch);
            }
            ClusterMsg::RequestError { req, code, message } => {
                w.0.put_u8(tag::REQUEST_ERROR);
                w.0.put_u64(*req);
                w.0.put_u32(*code);
                w.str(message);
            }
            ClusterMsg::Deliver { channel, epoch, publication } => {
                w.0.put_u8(tag::DELIVER);
                w.str(channel);
                w.str(epoch);
                w.publication(publication);
            }
            ClusterMsg::Recover { req, channel, recover, epoch, offset } => {
                w.0.put_u8(tag::RECOVER);
                w.0.put_u64(*req);
                w.str(channel);
                w.0.put_u8(*recover as u8);
                w.str(epoch);
                w.0.put_u64(*offset);
            }
            ClusterMsg::Replay { req, epoch, top, recovered, positioned, publications } => {
                w.0.put_u8(tag::REPLAY);
                w.0.put_u64(*req);
                w.str(epoch);
                w.0.put_u64(*top);
                w.0.put_u8(*recovered as u8);
                w.0.put_u8(*positioned as u8);
                w.publications(publications);
            }
            ClusterMsg::History { req, channel, limit, since, reverse } => {
                w.0.put_u8(tag::HISTORY);
                w.0.put_u64(*req);
                w.str(channel);
                w.0.put_i64(*limit);
                match since {
                    Some((offset, epoch)) => {
                        w.0.put_u8(1);
                        w.0.put_u64(*offset);
                        w.str(epoch);
                    }
                    None => w.0.put_u8(0),
                }
                w.0.put_u8(*reverse as u8);
            }
            ClusterMsg::HistoryResult { req, epoch, top, publications } => {
                w.0.put_u8(tag::HISTORY_RESULT);
                w.0.put_u64(*req);
                w.str(epoch);
                w.0.put_u64(*top);
                w.publications(publications);
            }
            ClusterMsg::Presence { req, channel } => {
                w.0.put_u8(tag::PRESENCE);
                w.0.put_u64(*req);
                w.str(channel);
            }
            ClusterMsg::PresenceResult { req, entries } => {
                w.0.put_u8(tag::PRESENCE_RESULT);
                w.0.put_u64(*req);
                w.0.put_u32(entries.len() as u32);
                for (client, info) in entries {
                    w.str(client);
                    w.bytes(info);
                }
            }
            ClusterMsg::PresenceStats { req, channel } => {
                w.0.put_u8(tag::PRESENCE_STATS);
                w.0.put_u64(*req);
                w.str(channel);
            }
            ClusterMsg::PresenceStatsResult { req, num_clients, num_users } => {
                w.0.put_u8(tag::PRESENCE_STATS_RESULT);
                w.0.put_u64(*req);
                w.0.put_u32(*num_clients);
                w.0.put_u32(*num_users);
            }
            ClusterMsg::Drain => w.0.put_u8(tag::DRAIN),
            ClusterMsg::Resync { channels } => {
                w.0.put_u8(tag::RESYNC);
                w.strs(channels);
            }
            ClusterMsg::DisconnectUser { user, client, code, reason, whitelist } => {
                w.0.put_u8(tag::DISCONNECT_USER);
                w.str(user);
                w.str(client);
                w.0.put_u16(*code);
                w.str(reason);
                w.strs(whitelist);
            }
            ClusterMsg::UnsubscribeUser { user, channel, client } => {
                w.0.put_u8(tag::UNSUBSCRIBE_USER);
                w.str(user);
                w.str(channel);
                w.str(client);
            }
            ClusterMsg::SubscribeUser { user, channel, client, recover, epoch, offset } => {
                w.0.put_u8(tag::SUBSCRIBE_USER);
                w.str(user);
                w.str(channel);
                w.str(client);
                w.0.put_u8(u8::from(*recover));
                w.str(epoch);
                w.0.put_u64(*offset);
            }
            ClusterMsg::RefreshUser { user, client, expired, expire_at } => {
                w.0.put_u8(tag::REFRESH_USER);
                w.str(user);
                w.str(client);
                w.0.put_u8(u8::from(*expired));
                w.0.put_u64(*expire_at);
            }
            ClusterMsg::Stamp { unix_micros } => {
                w.0.put_u8(tag::STAMP);
                w.0.put_u64(*unix_micros);
            }
            ClusterMsg::Emulation { node, session, data } => {
                w.0.put_u8(tag::EMULATION);
                w.str(node);
                w.str(session);
                w.bytes(data);
            }
            ClusterMsg::Push { channel, push } => {
                w.0.put_u8(tag::PUSH);
                w.str(channel);
                w.bytes(push);
            }
            ClusterMsg::Position { channel, epoch, top } => {
                w.0.put_u8(tag::POSITION);
                w.str(channel);
                w.str(epoch);
                w.0.put_u64(*top);
            }
            ClusterMsg::PresenceBegin { round } => {
                w.0.put_u8(tag::PRESENCE_BEGIN);
                w.0.put_u64(*round);
            }
            ClusterMsg::PresenceEnd { round } => {
                w.0.put_u8(tag::PRESENCE_END);
                w.0.put_u64(*round);
            }
        }
        let body = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&body.to_be_bytes());
    }

    /// Decodes one message body (tag and fields, without the length prefix).
    pub fn decode_body(body: Bytes) -> Result<ClusterMsg, ClusterError> {
        if body.is_empty() {
            return Err(ClusterError::Malformed("empty"));
        }
        let t = body[0];
        let mut r = R { buf: body.slice(1..), what: "?" };
        let msg = match t {
            tag::HELLO => {
                r.what = "hello";
                ClusterMsg::Hello { version: r.u16()?, gateway_id: r.str()?, instance: r.u64()? }
            }
            tag::WELCOME => {
                r.what = "welcome";
                ClusterMsg::Welcome { version: r.u16()?, router_id: r.str()?, instance: r.u64()? }
            }
            tag::REFUSE => {
                r.what = "refuse";
                ClusterMsg::Refuse { reason: r.str()? }
            }
            tag::HEARTBEAT => {
                r.what = "heartbeat";
                ClusterMsg::Heartbeat { seq: r.u64()?, reply: r.bool()? }
            }
            tag::SUBSCRIBE => {
                r.what = "subscribe";
                ClusterMsg::Subscribe { channels: r.strs()? }
            }
            tag::UNSUBSCRIBE => {
                r.what = "unsubscribe";
                ClusterMsg::Unsubscribe { channels: r.strs()? }
            }
            tag::SNAPSHOT => {
                r.what = "snapshot";
                ClusterMsg::Snapshot { channels: r.strs()? }
            }
            tag::JOIN => {
                r.what = "join";
                ClusterMsg::Join { channel: r.str()?, client: r.str()?, user: r.str()?, info: r.bytes()? }
            }
            tag::LEAVE => {
                r.what = "leave";
                ClusterMsg::Leave { channel: r.str()?, client: r.str()? }
            }
            tag::USER_ONLINE => {
                r.what = "user_online";
                ClusterMsg::UserOnline { user: r.str()?, client: r.str()? }
            }
            tag::USER_OFFLINE => {
                r.what = "user_offline";
                ClusterMsg::UserOffline { user: r.str()?, client: r.str()? }
            }
            tag::PUBLISH => {
                r.what = "publish";
                ClusterMsg::Publish {
                    req: r.u64()?,
                    channel: r.str()?,
                    data: r.bytes()?,
                    info: r.opt_bytes()?,
                    idempotency_key: r.str()?,
                }
            }
            tag::PUBLISH_OK => {
                r.what = "publish_ok";
                ClusterMsg::PublishOk { req: r.u64()?, offset: r.u64()?, epoch: r.str()? }
            }
            tag::REQUEST_ERROR => {
                r.what = "request_error";
                ClusterMsg::RequestError { req: r.u64()?, code: r.u32()?, message: r.str()? }
            }
            tag::DELIVER => {
                r.what = "deliver";
                ClusterMsg::Deliver { channel: r.str()?, epoch: r.str()?, publication: r.publication()? }
            }
            tag::RECOVER => {
                r.what = "recover";
                ClusterMsg::Recover {
                    req: r.u64()?,
                    channel: r.str()?,
                    recover: r.bool()?,
                    epoch: r.str()?,
                    offset: r.u64()?,
                }
            }
            tag::REPLAY => {
                r.what = "replay";
                ClusterMsg::Replay {
                    req: r.u64()?,
                    epoch: r.str()?,
                    top: r.u64()?,
                    recovered: r.bool()?,
                    positioned: r.bool()?,
                    publications: r.publications()?,
                }
            }
            tag::HISTORY => {
                r.what = "history";
                let req = r.u64()?;
                let channel = r.str()?;
                let limit = r.i64()?;
                let since = if r.bool()? { Some((r.u64()?, r.str()?)) } else { None };
                ClusterMsg::History { req, channel, limit, since, reverse: r.bool()? }
            }
            tag::HISTORY_RESULT => {
                r.what = "history_result";
                ClusterMsg::HistoryResult {
                    req: r.u64()?,
                    epoch: r.str()?,
                    top: r.u64()?,
                    publications: r.publications()?,
                }
            }
            tag::PRESENCE => {
                r.what = "presence";
                ClusterMsg::Presence { req: r.u64()?, channel: r.str()? }
            }
            tag::PRESENCE_RESULT => {
                r.what = "presence_result";
                let req = r.u64()?;
                let n = r.count(6)?;
                let entries =
                    (0..n).map(|_| Ok((r.str()?, r.bytes()?))).collect::<Result<_, ClusterError>>()?;
                ClusterMsg::PresenceResult { req, entries }
            }
            tag::PRESENCE_STATS => {
                r.what = "presence_stats";
                ClusterMsg::PresenceStats { req: r.u64()?, channel: r.str()? }
            }
            tag::PRESENCE_STATS_RESULT => {
                r.what = "presence_stats_result";
                ClusterMsg::PresenceStatsResult { req: r.u64()?, num_clients: r.u32()?, num_users: r.u32()? }
            }
            tag::DRAIN => {
                r.what = "drain";
                ClusterMsg::Drain
            }
            tag::RESYNC => {
                r.what = "resync";
                ClusterMsg::Resync { channels: r.strs()? }
            }
            tag::DISCONNECT_USER => {
                r.what = "disconnect_user";
                ClusterMsg::DisconnectUser {
                    user: r.str()?,
                    client: r.str()?,
                    code: r.u16()?,
                    reason: r.str()?,
                    whitelist: r.strs()?,
                }
            }
            tag::UNSUBSCRIBE_USER => {
                r.what = "unsubscribe_user";
                ClusterMsg::UnsubscribeUser { user: r.str()?, channel: r.str()?, client: r.str()? }
            }
            tag::SUBSCRIBE_USER => {
                r.what = "subscribe_user";
                ClusterMsg::SubscribeUser {
                    user: r.str()?,
                    channel: r.str()?,
                    client: r.str()?,
                    recover: r.bool()?,
                    epoch: r.str()?,
                    offset: r.u64()?,
                }
            }
            tag::REFRESH_USER => {
                r.what = "refresh_user";
                ClusterMsg::RefreshUser {
                    user: r.str()?,
                    client: r.str()?,
                    expired: r.bool()?,
                    expire_at: r.u64()?,
                }
            }
            tag::STAMP => {
                r.what = "stamp";
                ClusterMsg::Stamp { unix_micros: r.u64()? }
            }
            tag::EMULATION => {
                r.what = "emulation";
                ClusterMsg::Emulation { node: r.str()?, session: r.str()?, data: r.bytes()? }
            }
            tag::PUSH => {
                r.what = "push";
                ClusterMsg::Push { channel: r.str()?, push: r.bytes()? }
            }
            tag::POSITION => {
                r.what = "position";
                ClusterMsg::Position { channel: r.str()?, epoch: r.str()?, top: r.u64()? }
            }
            tag::PRESENCE_BEGIN => {
                r.what = "presence_begin";
                ClusterMsg::PresenceBegin { round: r.u64()? }
            }
            tag::PRESENCE_END => {
                r.what = "presence_end";
                ClusterMsg::PresenceEnd { round: r.u64()? }
            }
            other => return Err(ClusterError::UnknownTag(other)),
        };
        r.end()?;
        Ok(msg)
    }
}

/// Splits a byte stream into [`ClusterMsg`]s; any split of the stream works.
#[derive(Debug, Clone)]
pub struct ClusterDecoder {
    max_frame: usize,
}

impl Default for ClusterDecoder {
    fn default() -> Self {
        ClusterDecoder { max_frame: DEFAULT_MAX_FRAME }
    }
}

impl ClusterDecoder {
    /// A decoder refusing bodies over `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        ClusterDecoder { max_frame }
    }

    /// The next message, `Ok(None)` when more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<ClusterMsg>, ClusterError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > self.max_frame {
            return Err(ClusterError::TooBig(len));
        }
        if buf.len() < 4 + len {
            buf.reserve(4 + len - buf.len());
            return Ok(None);
        }
        buf.advance(4);
        let body = buf.split_to(len).freeze();
        ClusterMsg::decode_body(body).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s() -> impl Strategy<Value = String> {
        ".{0,12}"
    }
    fn b() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from)
    }
    fn publication() -> impl Strategy<Value = Publication> {
        (any::<u64>(), b(), proptest::option::of(b()), proptest::option::of(b()))
            .prop_map(|(offset, data, info, tags)| Publication { offset, data, info, tags })
    }
    fn msg() -> impl Strategy<Value = ClusterMsg> {
        let strs = || proptest::collection::vec(s(), 0..4);
        let pubs = || proptest::collection::vec(publication(), 0..3);
        prop_oneof![
            (any::<u16>(), s(), any::<u64>()).prop_map(|(version, gateway_id, instance)| ClusterMsg::Hello {
                version,
                gateway_id,
                instance
            }),
            (any::<u16>(), s(), any::<u64>()).prop_map(|(version, router_id, instance)| {
                ClusterMsg::Welcome { version, router_id, instance }
            }),
            s().prop_map(|reason| ClusterMsg::Refuse { reason }),
            (any::<u64>(), any::<bool>()).prop_map(|(seq, reply)| ClusterMsg::Heartbeat { seq, reply }),
            strs().prop_map(|channels| ClusterMsg::Subscribe { channels }),
            strs().prop_map(|channels| ClusterMsg::Unsubscribe { channels }),
            strs().prop_map(|channels| ClusterMsg::Snapshot { channels }),
            (s(), s(), s(), b()).prop_map(|(channel, client, user, info)| ClusterMsg::Join {
                channel,
                client,
                user,
                info
            }),
            (s(), s()).prop_map(|(channel, client)| ClusterMsg::Leave { channel, client }),
            (s(), s()).prop_map(|(user, client)| ClusterMsg::UserOnline { user, client }),
            (s(), s()).prop_map(|(user, client)| ClusterMsg::UserOffline { user, client }),
            (any::<u64>(), s(), b(), proptest::option::of(b()), s()).prop_map(
                |(req, channel, data, info, idempotency_key)| ClusterMsg::Publish {
                    req,
                    channel,
                    data,
                    info,
                    idempotency_key
                }
            ),
            (any::<u64>(), any::<u64>(), s()).prop_map(|(req, offset, epoch)| ClusterMsg::PublishOk {
                req,
                offset,
                epoch
            }),
            (any::<u64>(), any::<u32>(), s()).prop_map(|(req, code, message)| ClusterMsg::RequestError {
                req,
                code,
                message
            }),
            (s(), s(), publication()).prop_map(|(channel, epoch, publication)| ClusterMsg::Deliver {
                channel,
                epoch,
                publication
            }),
            (any::<u64>(), s(), any::<bool>(), s(), any::<u64>()).prop_map(
                |(req, channel, recover, epoch, offset)| ClusterMsg::Recover {
                    req,
                    channel,
                    recover,
                    epoch,
                    offset
                }
            ),
            (any::<u64>(), s(), any::<u64>(), any::<bool>(), any::<bool>(), pubs()).prop_map(
                |(req, epoch, top, recovered, positioned, publications)| ClusterMsg::Replay {
                    req,
                    epoch,
                    top,
                    recovered,
                    positioned,
                    publications
                }
            ),
            (any::<u64>(), s(), any::<i64>(), proptest::option::of((any::<u64>(), s())), any::<bool>())
                .prop_map(|(req, channel, limit, since, reverse)| ClusterMsg::History {
                    req,
                    channel,
                    limit,
                    since,
                    reverse
                }),
            (any::<u64>(), s(), any::<u64>(), pubs()).prop_map(|(req, epoch, top, publications)| {
                ClusterMsg::HistoryResult { req, epoch, top, publications }
            }),
            (any::<u64>(), s()).prop_map(|(req, channel)| ClusterMsg::Presence { req, channel }),
            (any::<u64>(), proptest::collection::vec((s(), b()), 0..3))
                .prop_map(|(req, entries)| ClusterMsg::PresenceResult { req, entries }),
            (any::<u64>(), s()).prop_map(|(req, channel)| ClusterMsg::PresenceStats { req, channel }),
            (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(req, num_clients, num_users)| {
                ClusterMsg::PresenceStatsResult { req, num_clients, num_users }
            }),
            Just(ClusterMsg::Drain),
            strs().prop_map(|channels| ClusterMsg::Resync { channels }),
            (s(), b()).prop_map(|(channel, push)| ClusterMsg::Push { channel, push }),
            (s(), s(), any::<u64>()).prop_map(|(channel, epoch, top)| ClusterMsg::Position {
                channel,
                epoch,
                top
            }),
            any::<u64>().prop_map(|round| ClusterMsg::PresenceBegin { round }),
            any::<u64>().prop_map(|round| ClusterMsg::PresenceEnd { round }),
            (s(), s(), any::<u16>(), s(), proptest::collection::vec(s(), 0..3)).prop_map(
                |(user, client, code, reason, whitelist)| ClusterMsg::DisconnectUser {
                    user,
                    client,
                    code,
                    reason,
                    whitelist
                }
            ),
            (s(), s(), s()).prop_map(|(user, channel, client)| ClusterMsg::UnsubscribeUser {
                user,
                channel,
                client
            }),
            (s(), s(), s(), any::<bool>(), s(), any::<u64>()).prop_map(
                |(user, channel, client, recover, epoch, offset)| ClusterMsg::SubscribeUser {
                    user,
                    channel,
                    client,
                    recover,
                    epoch,
                    offset
                }
            ),
            (s(), s(), any::<bool>(), any::<u64>()).prop_map(|(user, client, expired, expire_at)| {
                ClusterMsg::RefreshUser { user, client, expired, expire_at }
            }),
            any::<u64>().prop_map(|unix_micros| ClusterMsg::Stamp { unix_micros }),
            (s(), s(), proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(node, session, data)| {
                ClusterMsg::Emulation { node, session, data: Bytes::from(data) }
            }),
        ]
    }

    proptest! {
        #[test]
        fn encode_decode_identity_at_any_split(msgs in proptest::collection::vec(msg(), 1..8), chunk in 1usize..50) {
            let mut wire = BytesMut::new();
            for m in &msgs { m.encode(&mut wire); }
            let mut d = ClusterDecoder::default();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(m) = d.decode(&mut buf).unwrap() { got.push(m); }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, msgs);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut d = ClusterDecoder::new(1 << 16);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = d.decode(&mut buf) {}
        }
    }

    #[test]
    fn deliver_payload_is_a_slice_of_the_frame() {
        let msg = ClusterMsg::Deliver {
            channel: "chat:1".into(),
            epoch: "e".into(),
            publication: Publication {
                offset: 1,
                data: Bytes::from_static(b"{\"a\":1}"),
                info: None,
                tags: None,
            },
        };
        let mut wire = BytesMut::new();
        msg.encode(&mut wire);
        let range = wire.as_ptr_range();
        let mut d = ClusterDecoder::default();
        match d.decode(&mut wire).unwrap().unwrap() {
            ClusterMsg::Deliver { publication, .. } => {
                assert!(range.contains(&publication.data.as_ptr()), "payload was copied");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn routing_keys() {
        let p = ClusterMsg::Publish {
            req: 7,
            channel: "c".into(),
            data: Bytes::new(),
            info: None,
            idempotency_key: String::new(),
        };
        assert_eq!((p.request_id(), p.channel(), p.is_answer()), (Some(7), Some("c"), false));
        let a = ClusterMsg::PublishOk { req: 7, offset: 1, epoch: "e".into() };
        assert_eq!((a.request_id(), a.channel(), a.is_answer()), (Some(7), None, true));
        assert_eq!((ClusterMsg::Drain.request_id(), ClusterMsg::Drain.channel()), (None, None));
    }

    #[test]
    fn refusals() {
        let mut d = ClusterDecoder::new(100);
        let mut buf = BytesMut::from(&[0, 0, 1, 0][..]);
        assert_eq!(d.decode(&mut buf), Err(ClusterError::TooBig(256)));
        let mut buf = BytesMut::from(&[0, 0, 0, 1, 200][..]);
        assert_eq!(d.decode(&mut buf), Err(ClusterError::UnknownTag(200)));
        let mut buf = BytesMut::from(&[0, 0, 0, 2, tag::HEARTBEAT, 0][..]);
        assert_eq!(d.decode(&mut buf), Err(ClusterError::Malformed("heartbeat")));
        // Trailing bytes are refused too.
        let mut buf = BytesMut::from(&[0, 0, 0, 2, tag::DRAIN, 0][..]);
        assert_eq!(d.decode(&mut buf), Err(ClusterError::Malformed("drain")));
        // A forged list count cannot force a large allocation.
        let mut buf = BytesMut::from(&[0, 0, 0, 5, tag::SUBSCRIBE, 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(d.decode(&mut buf), Err(ClusterError::Malformed("subscribe")));
    }
}
