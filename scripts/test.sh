#!/usr/bin/env bash
# The test command from the README: every crate's unit, property, corpus and
# end-to-end tests. End-to-end tests start the real gateway and router
# binaries, so those are built first.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast "$@"
