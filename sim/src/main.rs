//! `sim`: runs seeds of the deterministic simulation and reports
//! violations; see `scripts/sim.sh`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Parser;

/// Runs seeds of the deterministic simulation.
#[derive(Parser, Debug)]
struct Args {
    /// How many seeds to run.
    #[arg(default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Run only this seed and print every violation in it.
    #[arg(long)]
    seed: Option<u64>,
    /// Plant this bug (needs the `mutants` feature): drop-delivery,
    /// no-resubscribe, lose-offline.
    #[arg(long)]
    mutant: Option<String>,
    /// Worker threads (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Stop at the first seed with a violation.
    #[arg(long)]
    stop_at_first: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if let Some(name) = &a.mutant {
        plant(name)?;
    }
    if let Some(seed) = a.seed {
        let o = sim::run(seed);
        println!("seed {seed}: {:?}", o.spec);
        println!(
            "{} publications, {} checked, {} told (forgiving {}), {} steps",
            o.publications,
            o.verdict.checked,
            o.verdict.told.len(),
            o.verdict.forgiven(),
            o.steps
        );
        for v in &o.verdict.violations {
            println!("  {v}");
        }
        println!("1 seeds, {} violations", o.verdict.violations.len());
        std::process::exit(if o.verdict.violations.is_empty() { 0 } else { 1 });
    }
    let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let next = Arc::new(AtomicU64::new(a.first));
    let end = a.first + a.seeds;
    let bad = Arc::new(Mutex::new(Vec::<(u64, usize, String)>::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let checked = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (next, bad, done, checked, cut, stop) =
                (next.clone(), bad.clone(), done.clone(), checked.clone(), cut.clone(), stop.clone());
            let stop_at_first = a.stop_at_first;
            std::thread::spawn(move || {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end || stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let o = sim::run(seed);
                    checked.fetch_add(o.verdict.checked, Ordering::Relaxed);
                    cut.fetch_add(o.runs_cut, Ordering::Relaxed);
                    if let Some(first) = o.verdict.violations.first() {
                        bad.lock().expect("not poisoned").push((
                            seed,
                            o.verdict.violations.len(),
                            first.to_string(),
                        ));
                        if stop_at_first {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut bad = bad.lock().expect("not poisoned").clone();
    bad.sort();
    let n = done.load(Ordering::Relaxed);
    let violations: usize = bad.iter().map(|b| b.1).sum();
    for (seed, count, first) in bad.iter().take(20) {
        let mutant = a.mutant.as_deref().map(|m| format!(" --mutant {m}")).unwrap_or_default();
        println!(
            "seed {seed}: {count} violations, first: {first}\n  replay: bash scripts/sim.sh{mutant} --seed {seed}"
        );
    }
    println!(
        "{n} seeds, {violations} violations, {:.1} seeds/s ({} failing seeds, {} publications checked, {} packed runs cut, {threads} threads, {secs:.1} s)",
        n as f64 / secs,
        bad.len(),
        checked.load(Ordering::Relaxed),
        cut.load(Ordering::Relaxed)
    );
    std::process::exit(if violations == 0 { 0 } else { 1 });
}

#[cfg(feature = "mutants")]
fn plant(name: &str) -> anyhow::Result<()> {
    let m = proto::mutant::Mutant::from_name(name).ok_or_else(|| anyhow::anyhow!("no mutant {name}"))?;
    proto::mutant::set(Some(m));
    Ok(())
}

#[cfg(not(feature = "mutants"))]
fn plant(name: &str) -> anyhow::Result<()> {
    anyhow::bail!(
        "--mutant {name}: this build has no planted bugs (build with --features mutants: scripts/sim.sh does)"
    )
}
