#!/usr/bin/env python3
"""System calls the gateway makes per session start, counted by strace.

One router and one gateway (`--cores 1`); `strace -f -c` is attached to the
whole gateway process (its core, uplink and other threads) while this
script opens sessions one after another, then detached; the counts divided
by the sessions are the kernel round trips each session cost the gateway
(io_uring submissions count once per `io_uring_enter`, whatever they
carry). Two kinds, each its own strace run against the same process:

- upgrade: the WebSocket upgrade alone (accept, the request, the 101), then
  the client closes;
- session: the upgrade, `connect` with an HS256 JWT and two `subscribe`s in
  one frame, the three replies, then the client closes.

Sessions one at a time are the worst case (nothing shares a wake-up with
another session); a storm batches accepts and readiness waits.

    cargo build --release -p gateway -p router
    python3 benches/scripts/syscalls.py [--sessions 500]
"""
import argparse, os, signal, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proxy_bench import session, start_cluster, stop, upgrade  # noqa: E402


def counted(pid, run, n):
    """Runs `run` n times under strace -f -c; {syscall: calls per session}."""
    out = tempfile.mktemp(prefix="sy-strace-")
    tr = subprocess.Popen(["strace", "-f", "-c", "-o", out, "-p", str(pid)], stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached to every thread
    for i in range(n):
        run(i).close()
    time.sleep(1.0)  # the closes are handled
    tr.send_signal(signal.SIGINT)
    tr.wait(timeout=30)
    calls = {}
    for line in open(out):
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3]) / n
    os.unlink(out)
    return calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=500)
    a = ap.parse_args()
    procs, gw, addr = start_cluster()
    try:
        for i in range(100):  # warm-up
            session(addr, i, "jwt")[0].close()
        kinds = {
            "upgrade": counted(gw.pid, lambda i: upgrade(addr)[0], a.sessions),
            "session": counted(gw.pid, lambda i: session(addr, 1000 + i, "jwt")[0], a.sessions),
        }
        for kind, calls in kinds.items():
            top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v >= 0.05)
            print(f"| {kind} | **{sum(calls.values()):.1f} system calls** per session ({a.sessions} sessions, "
                  f"one at a time): {top} |")
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
