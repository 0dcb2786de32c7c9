//! What a core's state machine asks its IO shell to do.
//!
//! The machine never touches a socket: frames it queues stay in each
//! session's outbound queue and the session joins the turn's dirty list
//! (the shell writes the dirty sessions once per turn, see
//! [`crate::shell`]); everything else that needs the kernel is an
//! [`Action`]. The shell drains both after every event it fed in.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::bridge::{CoreId, Moved};
use crate::metrics::{CoreMetrics, Metrics};

/// A session's id on its core: slot index in the low 32 bits, the slot's
/// generation in the high 32 (a recycled slot never answers to an old id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sid(pub u64);

impl Sid {
    /// The slot index.
    pub fn index(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    /// The slot's generation when the session took it.
    pub fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// What a read of a session's socket gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Got {
    /// Bytes (plaintext) were appended.
    Data,
    /// The peer closed (after the bytes appended, if any).
    Closed,
    /// Nothing yet.
    Nothing,
    /// A socket or TLS error.
    Failed,
}

/// Something only the IO shell can do.
#[derive(Debug)]
pub enum Action {
    /// Change what the session's socket is watched for (both false: nothing).
    Watch {
        /// Session.
        sid: Sid,
        /// Input (and hang-up).
        read: bool,
        /// Writability (the socket's buffer was full).
        write: bool,
    },
    /// Everything queued, the close frame last, is written: shut down the
    /// write side (after TLS close_notify); the machine keeps reading and
    /// discarding for a bounded time so the close is not destroyed by a
    /// reset (see [`crate::session`]).
    Shutdown {
        /// Session.
        sid: Sid,
    },
    /// The session is over: close its socket and forget its IO state.
    Release {
        /// Session.
        sid: Sid,
        /// The write side is open and the close handshake complete: a wss
        /// session sends its close_notify first.
        notify: bool,
    },
    /// The connection belongs to its user's core: take the socket (and TLS
    /// session) out of this core, without closing it, and send it there.
    HandOver {
        /// Session (already gone from the machine).
        sid: Sid,
        /// The user's core.
        core: CoreId,
        /// What the new core needs.
        moved: Moved,
    },
    /// Send a call to the app backend's proxy hook (the answer comes back
    /// through the core's inbox).
    Proxy(crate::proxy::ProxyCall),
    /// Pass an emulated session's commands to the core that holds it.
    Emulate {
        /// That core.
        core: CoreId,
        /// The commands.
        emulation: Box<crate::bridge::Emulation>,
    },
    /// Tell the core that read an emulation request how it went.
    Emulated {
        /// That core.
        core: CoreId,
        /// Its session.
        sid: Sid,
        /// Whether the emulated session was found.
        found: bool,
    },
}

/// The machine's outputs of one event, drained by the shell.
#[derive(Debug)]
pub struct Effects {
    /// Kernel work, in order.
    pub actions: VecDeque<Action>,
    /// Sessions that queued frames since the last flush (each once).
    pub dirty: Vec<Sid>,
    /// Sessions whose queue bound a frame did not fit: the core closes them
    /// with 3008 "slow" at the end of the event (after the fan-out loop that
    /// found them, which cannot change the channel index under its feet).
    pub overflowed: Vec<Sid>,
    metrics: Arc<Metrics>,
    core: CoreId,
}

impl Effects {
    /// No effects yet.
    pub fn new(metrics: Arc<Metrics>, core: CoreId) -> Effects {
        Effects { actions: VecDeque::new(), dirty: Vec::new(), overflowed: Vec::new(), metrics, core }
    }

    /// This core's counters.
    pub fn metrics(&self) -> &CoreMetrics {
        &self.metrics.cores[self.core]
    }

    /// The gateway's counters.
    pub fn metrics_all(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The gateway's counters.
    pub fn gateway_metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The gateway-wide counters, shared.
    pub fn shared_metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Queues an action.
    pub fn act(&mut self, action: Action) {
        self.actions.push_back(action);
    }
}
