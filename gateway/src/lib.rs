//! # Switchyard `gateway`: the WebSocket edge
//!
//! A thread-per-core WebSocket server on io_uring (monoio). Each worker core
//! is pinned, binds its own `SO_REUSEPORT` listener, and owns its sessions,
//! its `channel → sessions` index and a coarse timer wheel; cores share nothing and
//! talk to the uplink thread (tokio + quinn, one QUIC connection per router)
//! by bounded channels.
//!
//! Users are sharded by core: a connection accepted by any core's listener
//! moves, socket and all, to `hash(user) mod cores` on its first message
//! (the user read, unverified, from the `connect` token; the token is then
//! verified there), so all of a user's sessions, and per-user state such as
//! the publish bucket, live on one core.
//!
//! The logic is state machines without IO, driven by IO shells:
//!
//! - [`core`]: one core as a state machine — its sessions, channel index
//!   (with each channel's one stream position, so subscribes are answered
//!   without a router round trip), router requests with deadlines, the
//!   backlog for the uplink, the timer wheel. Events in (bytes read, a
//!   flush, a message from the uplink, a tick, each with `now`), effects out.
//! - [`session`]: one connection's record: phase (upgrade, open, connected,
//!   closing, lingering), subscriptions and where each stands, the bounded
//!   outbound queue of shared frames.
//! - [`uplink`]: routes (`channel → bitmask of cores`), router links,
//!   encode-once framing, and what is owed to full queues (resyncs,
//!   positions, answers) — a state machine; [`uplink::quic`] is its shell.
//! - [`shell`]: each core's IO — the readiness set, non-blocking reads and
//!   vectored writes, the listener, TLS, the timer; [`cores`] spawns and
//!   pins the cores.
//! - [`bridge`], [`effects`]: the messages between cores and uplink, and
//!   what a core's machine asks its shell to do.
//! - [`auth`]: JWT verification (HS*, RS*, ES256), at the machine's time.
//! - [`proxy`]: the proxy hooks' HTTP client thread (the app backend
//!   decides connects, refreshes, subscribes, publishes, RPCs), with
//!   timeouts and a circuit breaker per endpoint.
//! - [`config`], [`metrics`], [`admin`], [`cli`], [`process`]: operations.
//!
//! The deterministic simulation (`sim/`) drives these same machines with a
//! fake clock and a faulty network.
//!
//! ## Costs (one core, loopback, BENCHMARKS.md)
//! A WebSocket upgrade costs ~14 µs of gateway CPU (kernel included); a
//! whole session start (upgrade, JWT `connect`, two subscribes answered from
//! the channel positions the core follows) ~31 µs, most of it the kernel's
//! two sends. One publication stream reaches 10,000 subscribers on one core
//! at ~1.7 M deliveries/s, framed once per gateway.
//!
//! ## Invariants
//! - **Encode once**: a publication is framed once by the uplink; every
//!   recipient's queue holds a clone of the same `Bytes`
//!   (`frames_encoded` counts it).
//! - **Interest by transition**: the owning router hears about a channel only
//!   on this gateway's 0→1 and 1→0 subscriber transitions.
//! - **Bounded**: queue bytes per session (1 MiB → 3008), message size (64 KiB
//!   → 1009), subscriptions (128 → 106), publish rate per connection and per
//!   user (→ 111, then 3013),
//!   upgrade time and size (→ 408/431), connect deadline (→ 3502), the
//!   core's backlog for the uplink (65,536 → new work refused with error
//!   100), the uplink's messages held for full link queues (65,536 → core
//!   batches wait).
//! - **Nothing lost silently**: a delivery a full queue cannot take becomes
//!   an explicit resync of exactly the affected subscriptions; interest and
//!   presence are never dropped (held in order, reconciled after a relink
//!   by a snapshot and a presence round).
//! - **Clean closes**: a closed session lingers (reads and discards for up
//!   to 2 s / 256 KiB after its close frame) so a reset never destroys the
//!   close code.
//!
//! ## Memory budget
//! Target ≤ 512 B of user space per idle, authenticated, subscribed
//! connection. There is no task, future or buffer per connection: each core
//! keeps its established sockets in one epoll set ([`shell::poller`]) that
//! its reactor task waits on, reads a ready socket synchronously into the
//! core's scratch buffer, and its flusher writes the sessions that queued
//! frames in the turn ([`shell::socket`]). A session is a boxed 192-byte
//! record in the core's slab (identity, a short subscription list, an empty
//! queue, deadlines in timer ticks, nothing of a read in progress); the
//! slab's slot is 8 bytes and the shell's socket slot 12, both in pages
//! that grow without slack ([`paged`]); the user index, the channel index
//! and the timer wheel hold a few bytes more each. The allocator commits
//! memory on demand and returns what a storm freed once a core settles
//! ([`alloc`]). Measured (release, 2 cores,
//! `benches/scripts/idle_memory.py --per-process 19000`): ~495 B of RSS
//! growth per open session, ~475 B of it anonymous memory (BENCHMARKS.md);
//! `tests/tests/memory.rs` asserts ≤ 600 B at 10,000 in the test build. With
//! TLS (wss) a session also holds rustls' key schedule and the record
//! layer's keys ([`shell::tls`]): ~1.5 KB per idle connection in all at
//! 19,000.

#![warn(missing_docs, unreachable_pub)]

pub mod admin;
pub mod alloc;
pub mod auth;
pub mod bridge;
pub mod cli;
pub mod config;
pub mod core;
pub mod cores;
pub mod effects;
pub mod metrics;
pub mod paged;
pub mod process;
pub mod proxy;
pub mod session;
pub mod shell;
pub mod uplink;
