//! # Switchyard `gateway`: the WebSocket edge
//!
//! A thread-per-core WebSocket server on io_uring (monoio). Each worker core
//! is pinned, binds its own `SO_REUSEPORT` listener, and owns its sessions,
//! its `channel → sessions` index and a coarse timer; cores share nothing and
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
//!   channel index, router requests, the timer (pings, pongs, deadlines).
//! - [`session`]: one connection: bounded upgrade, readiness-first reads into
//!   a per-core scratch buffer (an idle connection pins no buffer), frames.
//! - [`write`]: the bounded per-session queue of shared frames and its
//!   vectored writer ("slow" close at the bound).
//! - [`uplink`]: routers, `channel → bitmask of cores`, encode-once framing.
//! - [`auth`]: JWT verification (HS*, RS*, ES256).
//! - [`config`], [`metrics`], [`admin`], [`cli`]: operations.
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
//! connection: the connection task waits on readiness with no buffer (reads
//! go synchronously into one scratch buffer per core); the session record
//! holds identity, subscriptions and no queue storage when idle.
//! Measured (release, 2 cores): ~3.2 KiB of RSS growth per open session at
//! 18,500 in one process and at 102,000 and 204,000 over six and twelve
//! processes (BENCHMARKS.md); the session task is ~584 B and the session
//! record 416 B. Not yet at target: the next
//! step is per-core slabs of small records driven by readiness events
//! instead of one task per connection. `tests/tests/memory.rs` guards 4 KiB.

#![warn(missing_docs, unreachable_pub)]

pub mod admin;
pub mod alloc;
pub mod auth;
pub mod bridge;
pub mod cli;
pub mod config;
pub mod core;
pub mod cores;
pub mod metrics;
pub mod poller;
pub mod session;
pub mod tls;
pub mod uplink;
pub mod write;
