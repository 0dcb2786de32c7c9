//! # Switchyard `loadgen`: storms, workloads, a correctness checker, the demo
//!
//! One binary that speaks only the public client protocol and HTTP API, so it
//! can be pointed at any compatible server, and that also embeds the router
//! and gateway so `loadgen demo` needs nothing else.
//!
//! - [`worker`]: a worker process's clients (thread-per-core monoio) and
//!   latency histograms; it feeds each subscription's events to
//! - [`checker`]: the correctness checker, pure (no IO, no clock): one
//!   [`checker::StreamChecker`] per client and channel counts what was lost,
//!   duplicated, reordered, delivered with the wrong payload, forgiven by an
//!   explicit resync, or never checked at all.
//! - [`orchestrate`]: worker and server processes (one process's open-file
//!   limit is 20,000 here, so clients and gateways are spread over processes),
//!   the HTTP API publisher.
//! - [`demo`]: the scenarios, on a local cluster it starts (or against
//!   `--ws`/`--api`): `demo` (storm + fan-out, and `--serve`), `storm`,
//!   `fanout`, `reconnect-wave` (drain or `--kill` a gateway mid-traffic:
//!   reconnect curve, survivors' peak handshake rate, recovery), `soak`
//!   (steady fan-out for `--duration`) and `chat` (a Slack-like day).
//!   Clients reconnect with full-jitter backoff and resubscribe with
//!   recovery, as the SDKs do.
//! - [`publisher`]: fan-out publications through the HTTP API or, with
//!   `--client-publish`, as a client through a gateway.
//! - [`ramp`]: the demo's capacity ramp: steps of rising fan-out rates,
//!   judged (pure) on whether the box kept up; the steady fan-out runs at
//!   [`ramp::STEADY_FRACTION`] of the highest step it did.
//! - [`report`]: terminal table, `--json`, HTML report, whose line charts
//!   ([`chart`]: inline SVG, axes with units, gridlines, phases as bands)
//!   show connections, deliveries/s and latency over time.
//! - [`zipf`]: Zipf-distributed channel sizes.
//!
//! A run exits non-zero, and its report's headline says why
//! ([`report::RunReport::verdict`]), when anything was lost, duplicated,
//! reordered or delivered with the wrong payload without the server saying
//! so (`recovered:false` / unsubscribe 2500), and also when any client never
//! connected or gave up, any subscription was never positioned or was
//! refused, or any publish failed: "Nothing lost" only when every client was
//! checked to the end.

#![warn(missing_docs, unreachable_pub)]

pub mod chart;
pub mod checker;
pub mod demo;
pub mod orchestrate;
pub mod publisher;
pub mod ramp;
pub mod report;
pub mod worker;
pub mod zipf;
