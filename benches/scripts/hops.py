#!/usr/bin/env python3
"""Where a publication's time goes, hop by hop (#16 item 2).

Runs Switchyard's serve tree (one gateway core and its router, pinned to
CPU 0, as `peers.py` does) and the same load generator on CPU 1 at the two
chat loads of `peers.py` (100 publications/s × 1,000 subscribers and
10/s × 10,000), scrapes the per-hop histograms of `/metrics` before and
after each run, and prints, per hop, the p50 and p99 of that run's
observations (bucket upper bounds: the histograms' buckets are 10 µs,
25, 50, 100, 250, 500 µs, 1, 2.5, 5, 10, 25, 50, 100 ms, …) beside the
load generator's end-to-end publish→deliver p50/p99.

Hops: router `api_to_shard` (the API handler → the channel's shard),
`shard_to_link_write` (a delivery queued → written to the gateway's QUIC
link, the oldest of each written batch), gateway `link` (the router's
writer → the uplink's reading, wall clocks of this box), `uplink_to_core`
(→ the core's fan-out), `core_to_first_write` and `core_to_last_write`
(the fan-out → the first and last socket write of its flush).

    cargo build --release -p loadgen
    python3 benches/scripts/hops.py [--json]
"""
import argparse, json, os, re, sys, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import Server  # noqa: E402

HOPS = [("router", "api_to_shard"), ("router", "shard_to_link_write"), ("gateway", "link"),
        ("gateway", "uplink_to_core"), ("gateway", "core_to_first_write"), ("gateway", "core_to_last_write")]


def buckets(urls):
    """{hop: [(le, cumulative count)]} summed over the given /metrics pages."""
    out = {}
    for url in urls:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        for m in re.finditer(r'switchyard_(?:gateway|router)_hop_seconds_bucket\{hop="(\w+)",le="([^"]+)"\} (\d+)', text):
            hop, le, n = m.group(1), m.group(2), int(m.group(3))
            le = float("inf") if le == "+Inf" else float(le)
            d = out.setdefault(hop, {})
            d[le] = d.get(le, 0) + n
    return {h: sorted(d.items()) for h, d in out.items()}


def quantiles(before, after, hop):
    a = dict(after.get(hop, []))
    b = dict(before.get(hop, []))
    cum = [(le, a[le] - b.get(le, 0)) for le in sorted(a)]
    total = cum[-1][1] if cum else 0
    res = {"count": total}
    for q in (0.5, 0.99):
        want = max(1, -(-int(total * q * 1000) // 1000))
        res[f"p{int(q * 100)}_ms"] = next((le * 1000 for le, n in cum if n >= want), None) if total else None
    return res


def run(label, conns, rate, pubs):
    s = Server("switchyard")
    try:
        line = s.serve_line
        urls = line["metrics_urls"]
        before = buckets(urls)
        v = s.loadgen("fanout", "--connections", str(conns), "--channels", "1", "--subs-per-conn", "1",
                      "--publications", str(pubs), "--rate", str(rate))
        after = buckets(urls)
        return {"load": label, "end_to_end_ms": {"p50": v["latency_ms"]["p50"], "p99": v["latency_ms"]["p99"]},
                "hops": {hop: quantiles(before, after, hop) for _, hop in HOPS}}
    finally:
        s.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    results = [run("100/s x 1,000", 1000, 100, 1000), run("10/s x 10,000", 10000, 10, 100)]
    if a.json:
        print(json.dumps(results))
        return
    for r in results:
        e = r["end_to_end_ms"]
        print(f"{r['load']}: end to end p50 {e['p50']} ms, p99 {e['p99']} ms")
        for side, hop in HOPS:
            h = r["hops"][hop]
            print(f"  {side:7} {hop:22} n={h['count']:>6}  p50 ≤ {h['p50_ms']} ms  p99 ≤ {h['p99_ms']} ms")


if __name__ == "__main__":
    main()
