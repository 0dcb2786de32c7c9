#!/usr/bin/env bash
# The deterministic simulation (sim/): gateways × cores × routers × clients
# in one thread, under a seeded scheduler, a fake clock and a faulty network,
# checked by an oracle after every run.
#
#   bash scripts/sim.sh 2000                  # seeds 1..=2000: "N seeds, V violations, S seeds/s"
#   bash scripts/sim.sh --seed 129            # replay one seed, every violation printed
#   SIM_TRACE=1 bash scripts/sim.sh --seed 129  # ... with a trace of what happened
#   bash scripts/sim.sh --mutant drop-delivery 1000   # a planted bug; the run must find it
#
# Exit status: 0 when no seed had a violation, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
features=()
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --mutant) features=(--features mutants); args+=(--mutant "$2"); shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
cargo build --quiet --release -p sim "${features[@]}"
exec target/release/sim "${args[@]}"
