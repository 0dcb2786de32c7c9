//! # Switchyard `proto`: everything on the wire, sans-IO
//!
//! This crate holds the codecs and state machines both ends of Switchyard's
//! wires share. It has no sockets, no runtime and never reads the clock:
//! functions take bytes (and, where time matters, an `Instant`) and return
//! bytes and decisions. The gateway, router and loadgen are IO shells around it.
//!
//! ## Contents
//! - [`ws`]: WebSocket. [`ws::handshake`] (the upgrade, both sides, bounded),
//!   [`ws::Decoder`] (streaming, strict RFC 6455, zero-copy for whole frames),
//!   [`ws::SharedFrame`] (a server frame encoded once, written to every
//!   recipient by reference count), [`ws::deflate`] (permessage-deflate with
//!   no context takeover, so one compressed frame also serves everyone).
//! - [`client`]: the Centrifugo client protocol v2 (JSON) that unmodified
//!   `centrifuge-js` and `centrifuge-python` speak: commands, replies, pushes,
//!   codes, token claims, channel names.
//! - [`namespace`]: per-deployment channel options (history, presence,
//!   publish and subscribe policies) that gateway and router both apply.
//! - [`cluster`]: the gateway ⇄ router protocol, versioned length-delimited
//!   binary frames whose payload fields are zero-copy slices.
//! - [`fallback`]: the HTTP fallback transports (`http_stream`, `sse` with
//!   `POST /emulation`, `uni_http_stream`, `uni_sse`): request heads,
//!   framing, and the re-framing of a shared WebSocket text frame.
//! - [`membership`]: the routers registered in etcd as a [`membership::View`]
//!   at a store revision, ownership over it, and the lease clock behind the
//!   fencing rule (a router acknowledges only while its lease is certainly
//!   alive).
//! - [`proxy`]: the Centrifugo proxy protocol (JSON over HTTP) the gateway
//!   speaks to the app backend's hooks (connect, refresh, subscribe,
//!   publish, sub_refresh, rpc).
//! - [`peer`]: router names (`NAME@ADDR`) and the router ⇄ router call
//!   protocol that carries forwarded API calls over mutual TLS.
//! - Small shared units: [`hist`] (latency histograms for `/metrics`), [`backoff`] (exponential, full jitter),
//!   [`token_bucket`], [`rendezvous`] (highest-random-weight hashing),
//!   [`timer_wheel`] (coarse deadlines for every connection of a core),
//!   [`position`] (where a subscriber stands in a channel's stream),
//!   [`seeded`] (hash maps whose order replays with a seed).
//! - [`mutant`]: planted bugs, compiled in only for the simulation's
//!   `--mutant` runs, so the simulation can show it finds them.
//!
//! ## Invariants
//! - **Encode once.** A publication becomes one [`ws::SharedFrame`] per
//!   gateway; server frames are never masked, so the same bytes are valid on
//!   every socket.
//! - **Bounded.** Every parser has a byte bound with a defined answer:
//!   handshake header bytes and lines (431), frame and message sizes (close
//!   1009, inflation included), cluster frames ([`cluster::DEFAULT_MAX_FRAME`]).
//! - **Any split.** Every decoder accepts its input split at any byte.
//!
//! ## Numbers (see `BENCHMARKS.md`, `cargo bench -p benches`)
//! Decode + unmask of a masked 1 KiB and 64 KiB frame is measured beside
//! tungstenite in one criterion group; cloning a [`ws::SharedFrame`] for
//! 10,000 recipients costs 10,000 reference-count increments and no copy.

#![warn(missing_docs, unreachable_pub)]

pub mod backoff;
pub mod client;
pub mod cluster;
pub mod fallback;
#[doc(hidden)]
pub mod fuzzing;
pub mod hist;
pub mod membership;
pub mod mutant;
pub mod namespace;
pub mod peer;
pub mod position;
pub mod proxy;
pub mod rendezvous;
pub mod seeded;
pub mod timer_wheel;
pub mod token_bucket;
pub mod ws;
