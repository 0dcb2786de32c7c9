//! # Switchyard `router`: the channel-server tier
//!
//! Routers own channels (by rendezvous hash over the live routers). For each
//! owned channel a router orders publications (offsets within an epoch),
//! keeps a ring buffer for recovery and history, remembers idempotency keys,
//! and knows which gateways have online subscribers, so a publication crosses
//! the router→gateway link once per interested gateway, never per member.
//!
//! - [`channel`]: one channel's stream state and its rules (consecutive
//!   offsets, all-or-nothing recovery, idempotency window), pure and tested.
//! - [`presence`]: users online across gateways with a grace timer (no flap
//!   on reconnect), and per-channel presence for `presence`/`presence_stats`.
//! - [`certs`]: the development CA and link certificates (`router certs`).
//! - [`config`]: the TOML configuration with development defaults.
//! - [`shard`]: channel shards (one owner per channel, no lock on the publish
//!   path) that order publications and send each once per interested gateway.
//! - [`link`]: what a gateway link's messages mean (which shard, which
//!   stream), without IO.
//! - [`server`]: the QUIC endpoint (mutual TLS), hello/version check, one
//!   control stream and K delivery streams per gateway, batched writes.
//!
//! - [`api`]: the HTTP server API (Centrifugo-compatible subset for `cent`),
//!   `/metrics`, `/healthz`, `/readyz`.
//!
//! User presence: a gateway's user online/offline events go to the shard
//! owning `presence:<user>`, which keeps the aggregate state with a grace
//! timer and publishes changes on that channel.
//!
//! - [`peers`]: the other routers; the HTTP API forwards a call for a
//!   channel to its owner (rendezvous over their QUIC addresses, as the
//!   gateways compute it) over QUIC with mutual TLS.
//! - [`membership`] (cargo feature `etcd`): registration in etcd under a
//!   lease, the view of every router, and the fencing rule's timing.
//!
//! Liveness: gateways heartbeat every 2 s; a gateway silent for
//! `evict_secs` is evicted (its users enter the presence grace period).
//! SIGTERM drains: `/readyz` turns 503, gateways are told and move this
//! router's channels to their next owner (new epoch: clients resync with
//! `recovered: false`), requests in flight are answered for `drain_secs`.

#![warn(missing_docs, unreachable_pub)]

pub mod api;
pub mod certs;
pub mod channel;
pub mod cli;
pub mod config;
pub mod link;
#[cfg(feature = "etcd")]
pub mod membership;
pub mod peers;
pub mod presence;
pub mod server;
pub mod shard;
