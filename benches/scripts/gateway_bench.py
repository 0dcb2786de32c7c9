#!/usr/bin/env python3
"""Gateway numbers, one gateway process on ONE core (the loadgen, router and
this script share the machine's other core):

1. storm: new connections accepted per second and gateway CPU per accepted
   connection (accept, upgrade, JWT, subscribe), all clients at once;
2. fan-out capacity: one publication stream to 10,000 subscribers of one
   channel, publications offered faster than they can be delivered;
3. calm latency: publish→deliver p50/p99/p99.9 at half that delivery rate;
4. storm latency: the same while a storm of new connections runs, and the
   p99 ratio storm / calm (same run, same machine).

    cargo build --release -p loadgen
    python3 benches/scripts/gateway_bench.py [--subscribers 10000] [--storm 5000]
"""
import argparse, json, os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOADGEN = os.path.join(ROOT, "target", "release", "loadgen")


def run(*args):
    out = subprocess.run([LOADGEN, *args, "--json", "--gateway-cores", "1", "--report", "/dev/null"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if not lines:
        sys.exit(f"loadgen {' '.join(args)} failed (exit {out.returncode})")
    v = json.loads(lines[-1])
    if v["lost"] or v["duplicated"] or v["reordered"]:
        sys.exit(f"silent loss in {' '.join(args)}: {v['lost']} lost")
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--subscribers", type=int, default=10000)
    ap.add_argument("--storm", type=int, default=5000)
    ap.add_argument("--storm-connections", type=int, default=15000)
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--storm-load", type=float, default=0.1, help="share of capacity for the storm comparison")
    a = ap.parse_args()

    s = run("storm", "--connections", str(a.storm_connections))
    print(f"| storm: {a.storm_connections} clients at once, 1 gateway core | {s['accept_rate']:.0f} connections/s accepted, "
          f"{s['gateway_cpu_us_per_conn']:.0f} µs gateway CPU per connection, {s['rejected']} 503s, "
          f"upgrade p99 {s['upgrade_ms']['p99']:.1f} ms |")

    fan = ["fanout", "--connections", str(a.subscribers), "--channels", "1", "--subs-per-conn", "1"]
    cap = run(*fan, "--publications", "1000", "--rate", "200")
    capacity = cap["deliveries_per_sec"]
    print(f"| fan-out capacity: 1 stream → {a.subscribers} subscribers, 1 gateway core | "
          f"{capacity:.0f} deliveries/s (offered {200 * a.subscribers}/s), "
          f"{cap['frames']} frames for {cap['deliveries']} deliveries |")

    rate = max(1.0, capacity / 2 / a.subscribers)
    pubs = str(int(rate * a.secs))
    calm = run(*fan, "--publications", pubs, "--rate", f"{rate:.2f}")
    lc = calm["latency_ms"]
    print(f"| calm, {rate:.1f} publications/s ({rate * a.subscribers:.0f} deliveries/s) | "
          f"p50 {lc['p50']:.2f} ms, p99 {lc['p99']:.2f} ms, p99.9 {lc['p999']:.2f} ms |")

    # Storm vs calm at a load this shared box sustains with the storm's own
    # clients beside it (at half capacity the load generator already needs
    # both cores, and a storm from it would starve rather than arrive).
    storm_rate = str(a.storm // max(1, a.secs // 2))
    for share in (0.5, a.storm_load):
        rate = max(1.0, capacity * share / a.subscribers)
        pubs = str(int(rate * a.secs))
        base = calm if share == 0.5 else run(*fan, "--publications", pubs, "--rate", f"{rate:.2f}")
        st = run(*fan, "--publications", pubs, "--rate", f"{rate:.2f}", "--storm-during", str(a.storm),
                 "--storm-rate", storm_rate)
        lb, ls = base["latency_ms"], st["latency_ms"]
        print(f"| {rate:.1f} publications/s ({share:.0%} of capacity): calm vs a storm of {a.storm} new "
              f"connections at {storm_rate}/s ({st['storm_during_connected']} got in) | calm p99 {lb['p99']:.2f} ms, "
              f"storm p50 {ls['p50']:.2f} ms p99 {ls['p99']:.2f} ms p99.9 {ls['p999']:.2f} ms; "
              f"**p99 storm / calm = {ls['p99'] / max(lb['p99'], 1e-6):.2f}×** |")


if __name__ == "__main__":
    main()
