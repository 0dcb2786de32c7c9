//! Messages between the worker cores and the uplink thread.
//!
//! The cores run monoio (io_uring) and the uplink runs tokio (quinn needs a
//! `Send` runtime), so they meet over bounded channels (flume: async on both
//! sides, wakes a monoio core from the tokio thread). Nothing here is shared
//! memory on the hot path: a publication crosses as one [`SharedFrame`]-backed
//! `Bytes` per interested core, and each core hands clones of it to its sessions.
//!
//! Neither direction loses a message silently: a core keeps its control
//! messages until the uplink takes them (see [`crate::core::upstream`]), and
//! the uplink turns a delivery it could not hand to a full core inbox into a
//! resync of that channel on that core (see [`crate::uplink`]).
//!
//! [`SharedFrame`]: proto::ws::SharedFrame

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use bytes::Bytes;
use proto::cluster::ClusterMsg;

use proto::ws::deflate::DeflateParams;

/// Index of a worker core.
pub type CoreId = usize;

/// Most cores a gateway runs (the uplink keeps a `u64` bitmask per channel).
pub const MAX_CORES: usize = 64;

/// Core → uplink. A core sends what one turn produced as one batch
/// (`Vec<UpMsg>`), so a storm costs the uplink one wake-up per core turn,
/// not one per connection.
#[derive(Debug, Clone, PartialEq)]
pub enum UpMsg {
    /// The core's first subscriber of `channel` arrived (`on`) or its last left.
    Interest {
        /// Core.
        core: CoreId,
        /// Channel (the core's shared name).
        channel: Arc<str>,
        /// Gained (true) or lost (false) local interest.
        on: bool,
    },
    /// A request whose answer comes back to the core; `req` carries the core
    /// in its top byte (see [`request_id`]).
    Request(ClusterMsg),
    /// A presence fact (join, leave, user online/offline) for the router
    /// owning `key` (the channel, or the user's presence channel).
    Forward {
        /// Rendezvous key deciding the router.
        key: String,
        /// The message.
        msg: ClusterMsg,
    },
    /// The core sent every presence fact it holds for presence round `round`
    /// (its answer to [`DownMsg::Reannounce`]).
    Announced {
        /// Core.
        core: CoreId,
        /// Round.
        round: u64,
    },
}

/// Uplink → core.
#[derive(Debug, PartialEq)]
pub enum DownMsg {
    /// Publications of one channel with consecutive offsets `first..=last` in
    /// `epoch`, encoded once as one WebSocket frame (several
    /// newline-separated pushes when they arrived together).
    Deliver {
        /// Channel.
        channel: Arc<str>,
        /// Epoch of the stream (empty for unpositioned channels).
        epoch: Arc<str>,
        /// Offset of the first publication in the frame (0: unpositioned).
        first: u64,
        /// Offset of the last publication in the frame.
        last: u64,
        /// The frame's wire bytes, shared by every recipient.
        frame: Bytes,
        /// When the uplink handed it over (the core's inbox is a hop).
        at: std::time::Instant,
    },
    /// A join/leave push of `channel`, framed once, for its live subscribers
    /// (outside the offset stream: no position check).
    Push {
        /// Channel.
        channel: Arc<str>,
        /// The frame's wire bytes, shared by every recipient.
        frame: Bytes,
    },
    /// The answer to a [`UpMsg::Request`].
    Response(ClusterMsg),
    /// A presence round began: send [`UpMsg::Forward`] for every connected
    /// user and every presence subscription, then [`UpMsg::Announced`].
    Reannounce {
        /// Round.
        round: u64,
    },
    /// Subscribers of `channel` may have missed publications (link loss, a
    /// gap, a delivery dropped at a full queue): they must resubscribe and
    /// recover.
    Resync {
        /// Channel.
        channel: Arc<str>,
    },
    /// Where `channel`'s stream stood when the router registered this
    /// gateway's interest: every publication after `top` in `epoch` follows
    /// in this inbox (or a [`DownMsg::Resync`] says otherwise).
    Position {
        /// Channel.
        channel: Arc<str>,
        /// Epoch.
        epoch: Arc<str>,
        /// Offset of the last publication before the ones that follow.
        top: u64,
    },
}

/// What a core's inbox carries: the uplink's messages and connections
/// handed over by other cores.
#[derive(Debug)]
pub enum Inbox {
    /// From the uplink.
    Down(DownMsg),
    /// A connection whose user lives on this core.
    Adopt(Box<Handover>),
    /// The answer to one of this core's proxy calls.
    Proxy(crate::proxy::ProxyAnswer),
    /// An emulated session's commands, from the core that read the
    /// `POST /emulation` (its answer goes back as [`Inbox::Emulated`]).
    Emulate(Box<Emulation>),
    /// How an emulation request this core passed on went.
    Emulated {
        /// The session that read the request.
        sid: crate::effects::Sid,
        /// Whether the session was found (204) or not (404).
        found: bool,
    },
}

/// Commands for an emulated session (`POST /emulation`), on their way to
/// the session's core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emulation {
    /// The session, as its connect reply named it.
    pub session: String,
    /// The commands (lines).
    pub data: Bytes,
    /// Who waits for the outcome: the core and session of the request
    /// (`None`: nobody, it came from another gateway through a router).
    pub from: Option<(CoreId, crate::effects::Sid)>,
}

/// A connection moving to its user's core, before anything was done for it
/// beyond the upgrade: the socket, its TLS session, and the bytes read and
/// queued so far. It owns the socket: dropping it closes the socket, once;
/// it cannot be cloned.
#[derive(Debug)]
pub struct Handover {
    /// The socket, out of the old core's readiness set.
    pub fd: OwnedFd,
    /// The TLS session (wss), which travels with its socket.
    pub tls: Option<crate::shell::tls::Tls>,
    /// The hand-over as the state machines see it.
    pub moved: Moved,
}

/// The protocol side of a hand-over: what the new core needs to serve the
/// connection from its first message on.
#[derive(Debug, Default)]
pub struct Moved {
    /// The text message holding `connect` (and whatever followed it in it).
    pub message: Bytes,
    /// Bytes read after that message, not yet decoded.
    pub pending: Bytes,
    /// Bytes queued for the client and not yet written (the tail of the
    /// upgrade's answer), to go out first.
    pub unsent: VecDeque<Bytes>,
    /// What permessage-deflate allows on this connection.
    pub deflate: Deflate,
    /// WebSocket, or the HTTP fallback stream it is.
    pub transport: proto::fallback::Transport,
    /// The proxy state: forwarded headers, and the connect hook's answer
    /// that placed the connection on its user's core.
    pub proxy: Option<Box<crate::session::SessionProxy>>,
}

/// What permessage-deflate allows on one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Deflate {
    /// Not negotiated: RSV1 is a protocol error, nothing is compressed.
    #[default]
    Off,
    /// Compressed messages from the client; plain ones to it (it limited the
    /// server's window below the 15 bits the shared compressor uses).
    Inbound,
    /// Both ways: publications reach the session in the core's one
    /// compressed twin of each frame.
    Both,
}

impl Deflate {
    /// The mode for what the upgrade agreed.
    pub fn agreed(params: Option<&DeflateParams>) -> Deflate {
        match params {
            None => Deflate::Off,
            Some(p) if p.server_compresses() => Deflate::Both,
            Some(_) => Deflate::Inbound,
        }
    }
}

/// A request id that routes the answer back to `core`.
pub fn request_id(core: CoreId, seq: u64) -> u64 {
    ((core as u64) << 56) | (seq & ((1 << 56) - 1))
}

/// The core a request id belongs to.
pub fn core_of(req: u64) -> CoreId {
    (req >> 56) as CoreId
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_route_back() {
        for core in [0, 1, 63] {
            let id = request_id(core, u64::MAX);
            assert_eq!(core_of(id), core);
        }
    }
}
