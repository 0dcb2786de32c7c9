#!/usr/bin/env bash
# The test command from the README: every crate's unit, property, corpus,
# simulation-regression and end-to-end tests. It installs or checks what the
# tests need first:
#   - cargo-nextest (cargo install, if missing);
#   - node, npm, python3 with venv and chromium for the compatibility tests, etcd for
#     the membership tests and protoc for the etcd client's build (through
#     apt-get when run as root; otherwise one line naming what is missing);
#   - an open-file limit high enough for the 10,000-connection memory test
#     (the soft limit is raised to the hard limit here).
# End-to-end tests start the real gateway and router binaries, so those are
# built first. Linux with io_uring only (tested on 6.18).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
need_apt=()
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if ! command -v python3 >/dev/null 2>&1; then
  need_apt+=(python3 python3-venv)
elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  need_apt+=(python3-venv)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    missing+=("${need_apt[@]}")
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "scripts/test.sh: missing ${missing[*]} (install them, e.g. apt-get install ${missing[*]}): the compatibility and membership tests need them" >&2
  exit 1
fi

hard=$(ulimit -Hn)
ulimit -n "$hard"
if [ "$hard" != unlimited ] && [ "$hard" -lt 12000 ]; then
  echo "scripts/test.sh: the open-file hard limit is $hard; the memory test holds 10,000 connections and needs about 10,600" >&2
  exit 1
fi

# The tests run the binaries with etcd support (cargo feature `etcd`).
features=(--features router/etcd,gateway/etcd)
cargo build --workspace --bins "${features[@]}"
cargo nextest run --workspace --no-fail-fast "${features[@]}" "$@"
