//! Seeds on which the simulation found a bug, kept as tests: each must now
//! run clean. (A seed decides a world's shape and every choice in it, so a
//! seed replays exactly with the code it was found with; later changes to
//! the simulation give it other choices, and it stays a test of a busy,
//! faulty world.)

/// Seeds and what they found.
const SEEDS: &[(u64, &str)] = &[
    (12, "presence facts dropped at a full gateway→router queue; rounds re-announced into it forever"),
    (46, "a recovery larger than the session's queue closed it as slow on every reconnect"),
    (
        96,
        "a position dropped at a full core inbox became a resync, forever (and requests failed at a full link queue)",
    ),
    (129, "a delivery skipped for a core owed a position was lost without a resync"),
];

#[test]
fn seeds_that_found_bugs_run_clean() {
    for (seed, what) in SEEDS {
        let o = sim::run(*seed);
        assert!(
            o.verdict.violations.is_empty(),
            "seed {seed} ({what}): {:?}\nreplay: bash scripts/sim.sh --seed {seed}",
            o.verdict.violations
        );
        assert!(o.verdict.checked > 0, "seed {seed} checked nothing");
    }
}

#[test]
fn a_seed_replays_exactly() {
    let (a, b) = (sim::run(7), sim::run(7));
    assert_eq!((a.steps, a.publications, a.verdict.checked), (b.steps, b.publications, b.verdict.checked));
}
