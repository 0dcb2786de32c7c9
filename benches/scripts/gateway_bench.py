#!/usr/bin/env python3
"""Gateway numbers, one gateway process on ONE core (the loadgen, router and
this script share the machine's other core):

1. storm: new connections accepted per second and gateway CPU (user +
   kernel, from /proc) per connection, all clients at once: the whole
   session start (accept, upgrade, JWT `connect`, two subscribes, replies),
   and the WebSocket upgrade alone (`--upgrade-only`: accept, parse, 101);
2. fan-out capacity: one publication stream to 10,000 subscribers of one
   channel, publications offered faster than they can be delivered;
3. latency: publish→deliver p50/p99/p99.9 at half that delivery rate, and at
   a quarter, a tenth and a hundredth of it. On loopback every write to a
   sleeping client also pays for waking that client's thread on the other
   CPU, so the time one publication takes to reach all 10,000 sockets (and
   the p50 with it) is set by that, not by the gateway's own work; the
   hundredth shows the fan-out time of a lone publication;
4. storm latency: the same while a storm of new connections runs, and the
   p99 ratio storm / calm (same run, same machine);
5. permessage-deflate: 400-byte chat messages to 10,000 subscribers, plain
   and compressing clients at the same rate: gateway CPU per delivery and
   frames encoded and compressed per publication.

    cargo build --release -p loadgen
    python3 benches/scripts/gateway_bench.py [--subscribers 10000] [--storm 5000]
"""
import argparse, json, os, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOADGEN = os.path.join(ROOT, "target", "release", "loadgen")


def loadgen_json(*args, prefix=()):
    """Runs `loadgen ARGS --json` (behind `prefix`, e.g. a `taskset`); its
    report, after checking nothing was lost."""
    out = subprocess.run([*prefix, LOADGEN, *args, "--json", "--report", "/dev/null"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if not lines:
        sys.exit(f"loadgen {' '.join(args)} failed (exit {out.returncode})")
    v = json.loads(lines[-1])
    if v["lost"] or v["duplicated"] or v["reordered"]:
        sys.exit(f"silent loss in {' '.join(args)}: {v['lost']} lost")
    return v


def run(*args):
    return loadgen_json(*args, "--gateway-cores", "1")


def lat(v):
    l = v["latency_ms"]
    return f"p50 {l['p50']:.1f} ms, p99 {l['p99']:.1f} ms, p99.9 {l['p999']:.1f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--subscribers", type=int, default=10000)
    ap.add_argument("--storm", type=int, default=5000)
    ap.add_argument("--storm-connections", type=int, default=15000)
    ap.add_argument("--secs", type=int, default=10)
    ap.add_argument("--storm-load", type=float, default=0.1, help="share of capacity for the second storm comparison")
    ap.add_argument("--payload-bytes", type=int, default=400, help="chat text per publication in the deflate rows")
    a = ap.parse_args()

    for what, extra in (("session start (upgrade, JWT connect, 2 subscribes)", []),
                        ("upgrade only (accept, parse, 101)", ["--upgrade-only"])):
        s = run("storm", "--connections", str(a.storm_connections), *extra)
        print(f"| storm, {what}: {a.storm_connections} clients at once | {s['accept_rate']:.0f} connections/s, "
              f"**{s['gateway_cpu_us_per_conn']:.1f} µs** gateway CPU per connection, {s['rejected']} 503s, "
              f"upgrade p99 {s['upgrade_ms']['p99']:.1f} ms |")

    fan = ["fanout", "--connections", str(a.subscribers), "--channels", "1", "--subs-per-conn", "1"]
    cap = run(*fan, "--publications", "1000", "--rate", "200")
    capacity = cap["deliveries_per_sec"]
    print(f"| fan-out capacity: 1 stream → {a.subscribers} subscribers | **{capacity:.0f} deliveries/s** "
          f"(offered {200 * a.subscribers}/s), {cap['deliveries']} deliveries in {cap['frames']} frames, "
          f"{cap['gateway_frames_encoded']} encodings for {cap['publications']} publications, "
          f"{cap['gateway_cpu_per_100k'] * 10:.2f} µs gateway CPU per delivery, 0 lost |")

    calm = {}
    for share in (0.5, 0.25, 0.1, 0.01):
        rate = max(1.0, capacity * share / a.subscribers)
        pubs = str(int(rate * a.secs))
        v = run(*fan, "--publications", pubs, "--rate", f"{rate:.2f}")
        calm[share] = (rate, pubs, v)
        print(f"| latency at {share:.0%} of capacity: {rate:.1f} publications/s ({rate * a.subscribers:.0f} "
              f"deliveries/s) | {lat(v)}; gateway {v['gateway_cpu_per_100k'] * 10:.2f} µs, loadgen "
              f"{v['loadgen_cpu_per_100k'] * 10:.2f} µs CPU per delivery |")

    # Storm vs calm, in the same run of this script.
    storm_rate = str(a.storm // max(1, a.secs // 2))
    for share in (0.5, a.storm_load):
        rate, pubs, base = calm.get(share) or (None, None, None)
        if base is None:
            rate = max(1.0, capacity * share / a.subscribers)
            pubs = str(int(rate * a.secs))
            base = run(*fan, "--publications", pubs, "--rate", f"{rate:.2f}")
        st = run(*fan, "--publications", pubs, "--rate", f"{rate:.2f}", "--storm-during", str(a.storm),
                 "--storm-rate", storm_rate)
        lb, ls = base["latency_ms"], st["latency_ms"]
        print(f"| {rate:.1f} publications/s ({share:.0%} of capacity): calm vs a storm of {a.storm} new "
              f"connections at {storm_rate}/s ({st['storm_during_connected']} got in) | calm p99 {lb['p99']:.1f} ms; "
              f"storm {lat(st)}; **p99 storm / calm = {ls['p99'] / max(lb['p99'], 1e-6):.2f}×** |")

    # permessage-deflate: the same stream of chat-sized messages to plain and
    # to compressing clients, at a rate the load generator keeps up with
    # while inflating every message of every client.
    rate = max(1.0, capacity * 0.1 / a.subscribers)
    pubs = str(int(rate * a.secs))
    for mode in ([], ["--deflate"]):
        v = run(*fan, "--publications", pubs, "--rate", f"{rate:.2f}", "--payload-bytes", str(a.payload_bytes), *mode)
        per_pub_enc = v["gateway_frames_encoded"] / max(1, v["publications"])
        per_pub_def = v["gateway_frames_deflated"] / max(1, v["publications"])
        print(f"| {a.payload_bytes}-byte messages, {rate:.1f}/s to {a.subscribers} {'compressing' if mode else 'plain'} "
              f"subscribers | {v['deliveries_per_sec']:.0f} deliveries/s, {lat(v)}; gateway "
              f"**{v['gateway_cpu_per_100k'] * 10:.2f} µs CPU per delivery**; {per_pub_enc:.2f} frames encoded and "
              f"{per_pub_def:.2f} compressed per publication; {v['lost']} lost |")


if __name__ == "__main__":
    main()
