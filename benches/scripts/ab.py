#!/usr/bin/env python3
"""Two builds of Switchyard, interleaved, in the set-up of `peers.py`: each
build's serve tree (one gateway core and its router) started fresh per run
on CPU 0, the same load generator on CPU 1, the order reversed every round.
For a change to the gateway or router, measured before it stays: save the
release `loadgen` binary before and after the change and give both.

Modes:
  latency CONNS RATE PUBS  `loadgen fanout` at RATE publications/s to CONNS
                           subscribers of one channel: the serve tree's CPU
                           (user + system, from /proc) over the run, and the
                           publish→deliver p50 / p99;
  storm ARGS...            `loadgen storm --connections 5000 --channels 1 ARGS`
                           (e.g. `--upgrade-only`, `--subs-per-conn 1`): the
                           serve tree's CPU per connection, closes included.

    cp target/release/loadgen /tmp/loadgen.before   # then change, rebuild
    python3 benches/scripts/ab.py /tmp/loadgen.before target/release/loadgen \\
        --rounds 4 latency 10000 10 100
    python3 benches/scripts/ab.py A B --rounds 6 storm --upgrade-only
"""
import argparse, os, statistics, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402


def once(binary, mode, args):
    peers.LOADGEN = os.path.abspath(binary)
    s = peers.Server("switchyard")
    try:
        u0, s0 = peers.cpu_split(s.p.pid)
        if mode == "latency":
            conns, rate, pubs = args
            v = s.loadgen("fanout", "--connections", conns, "--channels", "1", "--subs-per-conn", "1",
                          "--publications", pubs, "--rate", rate)
        else:
            v = s.loadgen("storm", "--connections", "5000", "--channels", "1", *args)
            time.sleep(1)  # closes handled
        u1, s1 = peers.cpu_split(s.p.pid)
    finally:
        s.stop()
    cpu = u1 - u0 + s1 - s0
    if mode == "latency":
        return {"cpu_s": cpu, "user_s": u1 - u0, "p50_ms": v["latency_ms"]["p50"], "p99_ms": v["latency_ms"]["p99"]}
    return {"cpu_us_per_conn": cpu / max(v["connected"], 1) * 1e6, "refused": v.get("rejected", 0)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("mode", choices=["latency", "storm"])
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.mode == "latency" and len(a.args) != 3:
        sys.exit("latency takes CONNS RATE PUBS")
    runs = {a.a: [], a.b: []}
    for r in range(a.rounds):
        for b in ([a.a, a.b] if r % 2 == 0 else [a.b, a.a]):
            v = once(b, a.mode, a.args)
            runs[b].append(v)
            print(f"round {r + 1} {b}: " + ", ".join(f"{k} {x:.2f}" for k, x in v.items()), flush=True)
    for b, vs in runs.items():
        keys = vs[0].keys()
        print(f"median of {len(vs)} {b}: " + ", ".join(f"{k} {statistics.median(v[k] for v in vs):.2f}" for k in keys)
              + "  (range " + ", ".join(f"{min(v[k] for v in vs):.2f}-{max(v[k] for v in vs):.2f}" for k in keys) + ")")


if __name__ == "__main__":
    main()
