#!/usr/bin/env python3
"""Does a big storm converge? Two runs of `loadgen storm` on the local
cluster, production admission defaults (the demo's gateways run them):

1. capacity: a storm small enough to queue without refusals
   (`--capacity-connections`, all at once, admission out of the way: a
   gateway config with limits no storm of that size reaches): the box's
   sustained session starts per second (accept, upgrade, JWT `connect`, two
   subscribes);
2. the big storm (`--connections`, all at once): time to settle against
   1.5 × connections ÷ capacity, retries per client (503s, upgrade timeouts
   and failures, each a new attempt), clients failed, upgrade p50/p99, and
   CPU seconds of the gateway processes beside the load generator's worker
   processes (from /proc), which says which side limits the figure.

    cargo build --release -p loadgen
    python3 benches/scripts/storm.py [--connections 200000] [--capacity-connections 40000]

Before each run it waits (at most 10 minutes) until no `rustc` runs on the
box, so a compile elsewhere does not take the CPU the storm measures.
"""
import argparse, json, os, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOADGEN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "loadgen")


def quiet_box(limit_secs=600):
    end = time.time() + limit_secs
    while time.time() < end:
        if subprocess.run(["pgrep", "-x", "rustc"], stdout=subprocess.DEVNULL).returncode != 0:
            return
        time.sleep(5)
    print("warning: rustc still running after 10 minutes; numbers may be disturbed", file=sys.stderr)


NO_ADMISSION = "[admission]\naccept_rate = 1000000.0\naccept_burst = 1000000\nmax_pending_handshakes = 1000000\n"


def storm(connections, args, gateway_config=None):
    quiet_box()
    cmd = [LOADGEN, "storm", "--connections", str(connections), "--storm-rate", "0",
           "--gateway-cores", str(args.gateway_cores), "--threads", str(args.threads),
           "--json", "--report", "/dev/null"]
    if gateway_config:
        cmd += ["--gateway-config", gateway_config]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    # Watch for compiles that start meanwhile: they take CPU the storm measures.
    disturbed = threading.Event()

    def watch():
        while proc.poll() is None:
            if subprocess.run(["pgrep", "-x", "rustc"], stdout=subprocess.DEVNULL).returncode == 0:
                disturbed.set()
            time.sleep(1)

    threading.Thread(target=watch, daemon=True).start()
    try:
        stdout, _ = proc.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        proc.kill()
        sys.exit(f"loadgen storm --connections {connections} did not end in 20 minutes")
    lines = [l for l in stdout.splitlines() if l.startswith("{")]
    if not lines:
        sys.exit(f"loadgen storm --connections {connections} failed (exit {proc.returncode})")
    if disturbed.is_set():
        print("warning: rustc ran during this storm; its numbers are disturbed", flush=True)
    return json.loads(lines[-1])


def describe(v):
    n = max(v["connections"], 1)
    up, co = v["upgrade_ms"], v["connect_ms"]
    return (f"{v['connected']} of {v['connections']} up in {v['storm_secs']:.1f} s ({v['accept_rate']:.0f}/s); "
            f"{v['retries']} retries ({v['retries'] / n:.3f} per client): {v['rejected']} 503s, "
            f"{v['timeouts']} upgrade timeouts; {v['failed']} failed; "
            f"upgrade p50 {up['p50']:.0f} ms, p99 {up['p99']:.0f} ms; "
            f"connect reply p50 {co['p50']:.0f} ms, p99 {co['p99']:.0f} ms; "
            f"CPU gateways {v['storm_gateway_cpu_secs']:.1f} s, load generator {v['storm_loadgen_cpu_secs']:.1f} s "
            f"({v['gateway_cpu_us_per_conn']:.0f} µs gateway CPU per session)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=200000)
    ap.add_argument("--capacity-connections", type=int, default=40000)
    ap.add_argument("--gateway-cores", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--capacity", type=float, help="sessions/s measured before (skips the capacity run)")
    ap.add_argument("--gateway-config", help="a gateway TOML for the big storm (default: the gateway's defaults)")
    ap.add_argument("--save", help="write both runs' JSON reports here")
    args = ap.parse_args()
    if not os.path.exists(LOADGEN):
        sys.exit(f"{LOADGEN} missing: cargo build --release -p loadgen")

    cap = None
    if args.capacity:
        capacity = args.capacity
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
            f.write(NO_ADMISSION)
            f.flush()
            cap = storm(args.capacity_connections, args, f.name)
        print("capacity   ", describe(cap), flush=True)
        capacity = cap["accept_rate"]
    big = storm(args.connections, args, args.gateway_config)
    print("storm      ", describe(big), flush=True)
    print("admission  ", big.get("admission", ""), flush=True)
    if args.save:
        with open(args.save, "w") as f:
            json.dump({"capacity": cap, "storm": big}, f)
    budget = 1.5 * args.connections / max(capacity, 1e-9)
    n = max(big["connections"], 1)
    verdict = {
        "settled within 1.5x capacity time": big["storm_secs"] <= budget,
        "retries per client <= 0.2": big["retries"] / n <= 0.2,
        "none failed": big["failed"] == 0 and big["connected"] == big["connections"],
        "no upgrade timeouts": big["timeouts"] == 0,
    }
    print(f"budget      1.5 × {args.connections} ÷ {capacity:.0f}/s = {budget:.1f} s; "
          f"took {big['storm_secs']:.1f} s ({big['storm_secs'] / max(budget / 1.5, 1e-9):.2f}× the capacity time)")
    cpu_g, cpu_l = big["storm_gateway_cpu_secs"], big["storm_loadgen_cpu_secs"]
    side = "gateways" if cpu_g > cpu_l else "load generator"
    print(f"cpu         gateways {cpu_g:.1f} s, load generator {cpu_l:.1f} s over {big['storm_secs']:.1f} s "
          f"(the {side} take more)")
    for k, ok in verdict.items():
        print(f"{'ok  ' if ok else 'MISS'}        {k}")


if __name__ == "__main__":
    main()
