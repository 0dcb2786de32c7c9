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
//!
//! The QUIC link to gateways, the HTTP server API and presence are being
//! built on top of this state (see the open Router issue).

#![warn(missing_docs, unreachable_pub)]

pub mod certs;
pub mod channel;
pub mod presence;
