#!/usr/bin/env python3
"""Publish→deliver latency of an edge POP across a WAN.

A router, and one gateway whose QUIC link to it runs through the test kit's
WAN relay (`target/release/wan_relay`, from `tests/src/wan.rs`: 40 ms ± 10 ms
one way, 1 % loss each way, reordering within the jitter), then `loadgen
fanout` against that gateway: 1,000 publications/s over 10 channels to
`--subscribers` clients. Beside it, in the same run, the same load with the
gateway linked to the router directly: the WAN's cost is the difference; and
the WAN again with the gateway asking for datagram copies of the deliveries
(`uplink.datagram_copies`).
Prints p50/p99/p99.9 for both and the p99 over the one-way delay.

    cargo build --release -p loadgen -p router -p gateway -p e2e
    python3 benches/scripts/wan_bench.py [--subscribers 200] [--publications 20000] [--loss 0.01]
"""
import argparse, os, subprocess, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gateway_bench import ROOT, loadgen_json  # noqa: E402
from idle_memory import free_port, stop_all  # noqa: E402

REL = os.path.join(ROOT, "target", "release")
SECRET = "wan-bench-secret-long-enough-for-hs256"
API_KEY = "wan-bench-key"


def wait_ready(admin, what):
    end = time.time() + 30
    while time.time() < end:
        try:
            if urllib.request.urlopen(f"http://{admin}/readyz", timeout=2).status == 200:
                return
        except Exception:
            pass
        time.sleep(0.1)
    sys.exit(f"{what} never became ready")


def run(a, wan, copies=False):
    tmp = tempfile.mkdtemp()
    subprocess.run([f"{REL}/router", "certs", "--out", tmp, "--names", "wan-router"], check=True,
                   stdout=subprocess.DEVNULL)
    quic = f"127.0.0.1:{free_port()}"
    api, radmin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    ws, gadmin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([f"{REL}/router", "run", "--name", "wan-router", "--certs", tmp,
                               "--quic-listen", quic, "--api-listen", api, "--admin-listen", radmin,
                               "--api-key", API_KEY], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    target = quic
    if wan:
        relay = f"127.0.0.1:{free_port()}"
        procs.append(subprocess.Popen([f"{REL}/wan_relay", "--listen", relay, "--to", quic,
                                       "--delay-ms", str(a.delay_ms), "--jitter-ms", str(a.jitter_ms),
                                       "--loss", str(a.loss), "--seed", "1"], stdout=subprocess.DEVNULL))
        target = relay
    procs.append(subprocess.Popen([f"{REL}/gateway", "run", "--certs", tmp, "--router", f"wan-router@{target}",
                                   "--listen", ws, "--admin-listen", gadmin, "--hmac-secret", SECRET,
                                   "--cores", "1", "--no-pin"] + (["--datagram-copies"] if copies else []),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        wait_ready(gadmin, "the gateway")
        return loadgen_json("fanout", "--ws", ws, "--api", api, "--api-key", API_KEY, "--hmac-secret", SECRET,
                            "--connections", str(a.subscribers), "--channels", "10", "--subs-per-conn", "1",
                            "--publications", str(a.publications), "--rate", "1000")
    finally:
        stop_all(procs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--subscribers", type=int, default=200)
    ap.add_argument("--publications", type=int, default=20000)
    ap.add_argument("--delay-ms", type=int, default=40)
    ap.add_argument("--jitter-ms", type=int, default=10)
    ap.add_argument("--loss", type=float, default=0.01)
    a = ap.parse_args()
    for wan, copies in ((False, False), (True, False), (True, True)):
        v = run(a, wan, copies)
        l = v["latency_ms"]
        what = f"WAN {a.delay_ms} ± {a.jitter_ms} ms, {a.loss:.0%} loss" if wan else "direct (loopback)"
        what += ", datagram copies" if copies else ""
        print(f"{what:34} {v['deliveries']:>9,} deliveries, lost {v['lost']}: "
              f"p50 {l['p50']:.1f} ms, p99 {l['p99']:.1f} ms, p99.9 {l['p999']:.1f} ms"
              + (f"; p99 − one-way delay = {l['p99'] - a.delay_ms:.1f} ms (goal ≤ 15)" if wan else ""))


if __name__ == "__main__":
    main()
