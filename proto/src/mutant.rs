//! Planted bugs for the deterministic simulation (`sim/`), so that it can
//! show it finds what it is meant to find.
//!
//! Each [`Mutant`] re-creates a silent stall the simulation must catch. The
//! switch exists only when this crate is built with the `mutants` feature
//! (which only the simulation's `--mutant` build enables); otherwise
//! [`active`] is a constant `false` and every planted branch compiles away.

/// A planted bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mutant {
    /// A full core inbox drops a delivery and tells no one (no resync).
    DropDelivery = 1,
    /// A relinked uplink forgets to send its interest again.
    NoResubscribe = 2,
    /// A core's `UserOffline` that the uplink's full queue did not take vanishes.
    LoseOffline = 3,
}

impl Mutant {
    /// Every mutant.
    pub const ALL: [Mutant; 3] = [Mutant::DropDelivery, Mutant::NoResubscribe, Mutant::LoseOffline];

    /// The name `scripts/sim.sh --mutant` takes.
    pub fn name(self) -> &'static str {
        match self {
            Mutant::DropDelivery => "drop-delivery",
            Mutant::NoResubscribe => "no-resubscribe",
            Mutant::LoseOffline => "lose-offline",
        }
    }

    /// The mutant called `name`.
    pub fn from_name(name: &str) -> Option<Mutant> {
        Mutant::ALL.into_iter().find(|m| m.name() == name)
    }
}

#[cfg(feature = "mutants")]
static ACTIVE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Turns `m` on for the whole process (`None`: all off).
#[cfg(feature = "mutants")]
pub fn set(m: Option<Mutant>) {
    ACTIVE.store(m.map_or(0, |m| m as u8), std::sync::atomic::Ordering::SeqCst);
}

/// Whether `m` is planted in this run.
#[cfg(feature = "mutants")]
#[inline]
pub fn active(m: Mutant) -> bool {
    ACTIVE.load(std::sync::atomic::Ordering::Relaxed) == m as u8
}

/// Whether `m` is planted in this run: never, without the `mutants` feature.
#[cfg(not(feature = "mutants"))]
#[inline(always)]
pub const fn active(_m: Mutant) -> bool {
    false
}
