//! # Switchyard `sim`: the whole system in one thread, deterministically
//!
//! N gateways × K cores × M routers × clients, under a seeded scheduler,
//! a fake clock and a network that delays, reorders across QUIC streams
//! (never within one), drops and re-establishes links, kills, restarts and
//! drains routers and gateways, and fills every bounded queue. It runs the
//! same state machines as production ([`gateway::core::Core`],
//! [`gateway::uplink::Uplink`], [`router::shard::Shard`]); only the IO
//! shells are replaced. After each run the [`oracle`] checks every
//! (client, channel) stream and every user's presence.
//!
//! A seed decides everything: the world's shape ([`world::Spec`]), the
//! faults and every scheduling choice, so a failing seed replays exactly
//! (`scripts/sim.sh --seed S`). Planted bugs ([`proto::mutant`], built in
//! only with the `mutants` feature) show the oracle can fail.
//!
//! - [`world`]: the world and its scheduler.
//! - [`client`]: an SDK-like client.
//! - [`oracle`]: the checks.

#![warn(missing_docs, unreachable_pub)]

pub mod client;
pub mod oracle;
pub mod world;

/// What one seed gave.
#[derive(Debug)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// The oracle's findings.
    pub verdict: oracle::Verdict,
    /// Events the scheduler ran.
    pub steps: u64,
    /// Publications made.
    pub publications: usize,
    /// Packed runs cut for subscribers answered inside them.
    pub runs_cut: u64,
    /// The world's shape.
    pub spec: world::Spec,
}

/// Runs seed `seed` to the end and checks it.
pub fn run(seed: u64) -> Outcome {
    let w = world::World::new(seed);
    let spec = w.spec.clone();
    let (verdict, w) = w.run();
    Outcome { seed, verdict, steps: w.steps, publications: w.log.len(), runs_cut: w.runs_cut(), spec }
}
