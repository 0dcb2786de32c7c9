#!/usr/bin/env bash
# Runs every fuzz target in proto/fuzz for N seconds each (default 60) and
# prints how many executions each ran. Installs cargo-fuzz if missing.
# A crash leaves its input in proto/fuzz/artifacts/<target>/ and fails the run;
# `cargo test -p switchyard-proto --test fuzz_corpus` then replays it.
set -euo pipefail
cd "$(dirname "$0")/../proto"
secs="${1:-60}"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
for t in handshake frame_decoder client_decoder cluster_decoder http_request; do
  mkdir -p "fuzz/corpus/$t"
  # Work on a scratch copy so new corpus entries don't churn the repo.
  work=$(mktemp -d)
  cp "fuzz/corpus/$t"/* "$work"/
  log=$(mktemp)
  if ! cargo fuzz run "$t" "$work" -- -max_total_time="$secs" -rss_limit_mb=2048 >"$log" 2>&1; then
    tail -40 "$log"; echo "FUZZ FAILURE in $t"; exit 1
  fi
  execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
  echo "$t: ${execs:-0} executions in ${secs}s, no finding"
  rm -rf "$work" "$log"
done
