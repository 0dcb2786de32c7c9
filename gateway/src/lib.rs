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
//! - [`cores`]: spawning and pinning the cores, runtime choice (io_uring or
//!   epoll fallback), drain lifecycle.
//! - [`core`]: one core's state: admission control, command handling,
//!   channel index (with each channel's stream position, so subscribes are
//!   answered without a router round trip), router requests, the timer
//!   wheel (pings, pongs, deadlines: work per tick is what is due).
//! - [`session`]: one connection: bounded upgrade, readiness-first reads into
//!   a per-core scratch buffer (an idle connection pins no buffer), frames.
//! - [`listener`]: each core's `SO_REUSEPORT` listener, accepted from in
//!   bounded batches when the readiness set reports it.
//! - [`poller`]: the core's readiness set (epoll, keyed by session id).
//! - [`write`]: the bounded per-session queue of shared frames and its
//!   non-blocking vectored flush ("slow" close at the bound).
//! - [`tls`]: wss with rustls driven by hand on the same read/flush paths.
//! - [`uplink`]: routers, `channel → bitmask of cores`, encode-once framing.
//! - [`auth`]: JWT verification (HS*, RS*, ES256).
//! - [`config`], [`metrics`], [`admin`], [`cli`]: operations.
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
//!   upgrade time and size (→ 408/431), connect deadline (→ 3502).
//!
//! ## Memory budget
//! Target ≤ 1 KiB of user space per idle, authenticated, subscribed
//! connection. There is no task, future or buffer per connection: each core
//! keeps its established sockets in one epoll set ([`poller`]) that its
//! reactor task waits on, reads a ready socket synchronously into the core's
//! scratch buffer, and its flusher writes the sessions that queued frames in
//! the turn ([`write`]). A session is a record: the fd, identity, a short
//! subscription list, an empty queue, a decoder only while a message is in
//! progress. The allocator commits memory on demand ([`alloc`]).
//! Measured (release, 2 cores, `benches/scripts/idle_memory.py`): ~827 B of
//! RSS growth per open session at 19,000 in one process, ~846 B at 102,000
//! over six processes and ~849 B at 204,000 over twelve (BENCHMARKS.md);
//! `tests/tests/memory.rs`
//! asserts ≤ 2 KiB at 10,000 in the test build. With TLS (wss) a session
//! also holds rustls' connection state: ~8.7 KB per idle connection at
//! 10,000.

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
pub mod session;
pub mod shell;
pub mod uplink;
