//! Messages between the worker cores and the uplink thread.
//!
//! The cores run monoio (io_uring) and the uplink runs tokio (quinn needs a
//! `Send` runtime), so they meet over bounded channels (flume: async on both
//! sides, wakes a monoio core from the tokio thread). Nothing here is shared
//! memory on the hot path: a publication crosses as one [`SharedFrame`]-backed
//! `Bytes` per interested core, and each core hands clones of it to its sessions.
//!
//! [`SharedFrame`]: proto::ws::SharedFrame

use std::sync::Arc;

use bytes::Bytes;
use proto::cluster::ClusterMsg;

/// Index of a worker core.
pub type CoreId = usize;

/// Most cores a gateway runs (the uplink keeps a `u64` bitmask per channel).
pub const MAX_CORES: usize = 64;

/// Core → uplink. A core sends what one turn produced as one batch
/// (`Vec<UpMsg>`), so a storm costs the uplink one wake-up per core turn,
/// not one per connection.
#[derive(Debug)]
pub enum UpMsg {
    /// The core's first subscriber of `channel` arrived (`on`) or its last left.
    Interest {
        /// Core.
        core: CoreId,
        /// Channel.
        channel: String,
        /// Gained (true) or lost (false) local interest.
        on: bool,
    },
    /// A request whose answer comes back to the core; `req` carries the core
    /// in its top byte (see [`request_id`]).
    Request(ClusterMsg),
    /// Fire-and-forget (join, leave, user online/offline) to the router
    /// owning `key` (the channel, or the user's presence channel).
    Forward {
        /// Rendezvous key deciding the router.
        key: String,
        /// The message.
        msg: ClusterMsg,
    },
    /// A core's answer to [`DownMsg::Reannounce`]: a user online or a join
    /// it holds, sent again only where the key's owner changed.
    Replay {
        /// Rendezvous key deciding the router.
        key: String,
        /// `UserOnline` or `Join`.
        msg: ClusterMsg,
    },
}

/// A connection moving to its user's core, before anything was done for
/// it beyond the upgrade: the socket and the bytes read so far.
#[derive(Debug, Clone)]
pub struct Handover {
    /// The socket, deregistered from the old core's driver (owned: the
    /// receiver closes it if it cannot adopt it).
    pub fd: std::os::fd::RawFd,
    /// The text message holding `connect` (and whatever followed it).
    pub message: Bytes,
    /// Bytes read after that message, not yet decoded.
    pub pending: Bytes,
    /// What permessage-deflate allows on this connection.
    pub deflate: crate::session::Deflate,
    /// The TLS session (wss), which travels with its socket.
    pub tls: TlsSlot,
}

/// A TLS session in transit between cores, taken once by the core that
/// adopts the connection (messages are `Clone` for fan-out; a hand-over is
/// never fanned out, and a clone would find the slot empty).
#[derive(Debug, Clone, Default)]
pub struct TlsSlot(Option<std::sync::Arc<std::sync::Mutex<Option<Box<rustls::ServerConnection>>>>>);

impl TlsSlot {
    /// A slot holding `conn` (empty for a plain connection).
    pub fn new(conn: Option<Box<rustls::ServerConnection>>) -> TlsSlot {
        TlsSlot(conn.map(|c| std::sync::Arc::new(std::sync::Mutex::new(Some(c)))))
    }

    /// Takes the session out.
    pub fn take(&self) -> Option<Box<rustls::ServerConnection>> {
        self.0.as_ref().and_then(|m| m.lock().ok().and_then(|mut g| g.take()))
    }
}

/// Uplink → core.
#[derive(Debug, Clone)]
pub enum DownMsg {
    /// Publications of one channel, encoded once as one WebSocket frame
    /// (several newline-separated pushes when they arrived together).
    Deliver {
        /// Channel.
        channel: Arc<str>,
        /// Offset of the first publication in the frame (0: unpositioned).
        first: u64,
        /// Offset of the last publication in the frame.
        last: u64,
        /// The frame's wire bytes, shared by every recipient.
        frame: Bytes,
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
    /// A connection handed over by another core because its user belongs
    /// here (`hash(user) mod cores`): serve it from its first command on.
    Adopt(Box<Handover>),
    /// Routers came or went: send [`UpMsg::Replay`] for every connected
    /// user and every presence subscription, so presence follows its keys
    /// to their new owners.
    Reannounce,
    /// Subscribers of `channel` may have missed publications (link loss, a
    /// gap, router back-pressure): they must resubscribe and recover.
    Resync {
        /// Channel.
        channel: Arc<str>,
    },
    /// Where `channel`'s stream stands for this core: every publication
    /// after `top` in `epoch` follows in this inbox (or a [`DownMsg::Resync`]
    /// says otherwise). The core answers subscribes to the channel from it,
    /// without asking a router.
    Position {
        /// Channel.
        channel: Arc<str>,
        /// Epoch.
        epoch: Arc<str>,
        /// Offset of the last publication before the ones that follow.
        top: u64,
    },
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
