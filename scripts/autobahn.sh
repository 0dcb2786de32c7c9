#!/usr/bin/env bash
# Autobahn TestSuite (PyPI `autobahntestsuite`, fuzzingclient) against the
# gateway's echo endpoint, with permessage-deflate on.
#
#   bash scripts/autobahn.sh            # cases 1-7, 9, 10, 12, 13
#   bash scripts/autobahn.sh 1 2 10     # only these case groups
#
# The suite is Python 2 code. Python 2.7 is no longer in this machine's
# Debian release, so it comes from Debian 11's packages (unpacked under
# target/autobahn, nothing installed system-wide), and the suite from PyPI
# with Python 2's last pip. Exits non-zero if any case is FAILED (in its
# behaviour or its closing handshake). Reports: target/autobahn/reports.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
AB="$ROOT/target/autobahn"
PY_ROOT="$AB/python2"
PY="$PY_ROOT/usr/bin/python2.7"
WSTEST="$AB/site/bin/wstest"
# Python 2.7 from its folder (the environment is its own, not the shell's).
py2() {
    env PYTHONHOME="$PY_ROOT/usr" PYTHONUSERBASE="$AB/site" \
        LD_LIBRARY_PATH="$PY_ROOT/usr/lib/x86_64-linux-gnu" "$PY" "$@"
}

install_suite() {
    [ -x "$PY" ] && [ -f "$WSTEST" ] && return 0
    echo "== installing Python 2.7 (Debian 11 packages) and autobahntestsuite under $AB"
    local apt="$AB/apt"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs" "$PY_ROOT"
    echo "deb [trusted=yes] http://deb.debian.org/debian bullseye main" >"$apt/sources.list"
    local opts=(-q -o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update >/dev/null
    (cd "$apt/debs" && apt-get "${opts[@]}" download python2.7 python2.7-minimal libpython2.7 \
        libpython2.7-stdlib libpython2.7-minimal libpython2.7-dev libssl1.1 libffi7 >/dev/null)
    for deb in "$apt/debs"/*.deb; do dpkg -x "$deb" "$PY_ROOT"; done
    py2 -c 'import ssl, zlib, ctypes' # the interpreter runs from its folder
    # Python 2's last pip, run from its wheel to install itself.
    pip3 download -q --no-deps -d "$apt/wheels" pip==20.3.4
    local pip="$apt/wheels/pip-20.3.4-py2.py3-none-any.whl/pip"
    local quiet=(-q --disable-pip-version-check --no-warn-script-location --user)
    py2 "$pip" install "${quiet[@]}" pip==20.3.4 setuptools==44.1.1 wheel==0.37.1 2>&1 | grep -v DEPRECATION || true
    # wsaccel and twisted build C extensions against the unpacked headers.
    CFLAGS="-I$PY_ROOT/usr/include/python2.7 -I$PY_ROOT/usr/include" \
        LDFLAGS="-L$PY_ROOT/usr/lib/x86_64-linux-gnu" \
        py2 -m pip install "${quiet[@]}" autobahntestsuite==25.10.1 2>&1 | grep -v DEPRECATION || true
    [ -f "$WSTEST" ] || { echo "autobahntestsuite did not install" >&2; exit 1; }
}

install_suite

if [ "$#" -gt 0 ]; then groups=("$@"); else groups=(1 2 3 4 5 6 7 9 10 12 13); fi
cases=$(printf '"%s.*",' "${groups[@]}")
cases="[${cases%,}]"

cargo build --release -q -p gateway -p router
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
WS_PORT=$(free_port)
ADMIN_PORT=$(free_port)
rm -rf "$AB/run" && mkdir -p "$AB/run"
target/release/router certs --out "$AB/run/certs" >/dev/null
# Cases 9.* echo messages up to 16 MiB: the message and queue bounds are
# raised for this run only (defaults: 64 KiB and 1 MiB).
cat >"$AB/run/gateway.toml" <<EOF
listen = "127.0.0.1:$WS_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
echo_path = "/echo"
deflate = true
cores = 2
pin_cores = false
[limits]
max_message = 20971520
max_queue_bytes = 41943040
write_timeout_secs = 60
[uplink]
ca_cert = "$AB/run/certs/ca.pem"
cert = "$AB/run/certs/gateway.pem"
key = "$AB/run/certs/gateway.key"
EOF
cat >"$AB/run/spec.json" <<EOF
{
  "outdir": "$AB/reports",
  "servers": [{"agent": "switchyard", "url": "ws://127.0.0.1:$WS_PORT/echo"}],
  "cases": $cases,
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
EOF

target/release/gateway run --config "$AB/run/gateway.toml" >"$AB/run/gateway.log" 2>&1 &
GW=$!
trap 'kill -9 $GW 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    (echo >"/dev/tcp/127.0.0.1/$WS_PORT") 2>/dev/null && break
    sleep 0.1
done
rm -rf "$AB/reports"
echo "== autobahn fuzzingclient, cases $cases"
start=$(date +%s)
(cd "$AB/run" && py2 "$WSTEST" -m fuzzingclient -s spec.json >"$AB/run/wstest.log" 2>&1) || {
    tail -20 "$AB/run/wstest.log"
    exit 1
}
echo "   took $(($(date +%s) - start)) s"
kill -0 "$GW" || { echo "the gateway exited during the run" >&2; tail "$AB/run/gateway.log"; exit 1; }
python3 - "$AB/reports/index.json" <<'EOF'
import collections, json, sys
results = json.load(open(sys.argv[1]))["switchyard"]
tally = collections.Counter()
failed = []
for case, r in results.items():
    verdict = "FAILED" if "FAILED" in (r["behavior"], r["behaviorClose"]) else r["behavior"]
    tally[verdict] += 1
    if verdict == "FAILED":
        failed.append(case)
print("   %d cases: %s" % (len(results), ", ".join("%s %d" % kv for kv in sorted(tally.items()))))
if failed:
    print("   FAILED: " + " ".join(sorted(failed)))
    sys.exit(1)
EOF
