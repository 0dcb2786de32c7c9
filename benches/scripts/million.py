#!/usr/bin/env python3
"""One million authenticated, subscribed WebSocket sessions on this box, and
one publication that reaches every one of them.

Runs `loadgen fanout` with every client subscribed to one channel: P gateway
processes (one core each) share the port with SO_REUSEPORT, since a process
holds at most ~19,700 descriptors here; the load generator spreads its
clients over worker processes of 15,000 and over 127.0.x.y source addresses.
While it runs, this script samples the load generator's own memory (the sum
of its workers' RSS) and the kernel's memory that grows with sockets (slab
plus TCP buffer pages), and prints, with the report's own figures:

- the time to open every session, and how many connected;
- the time the one publication took to reach the last subscriber (the
  slowest delivery's publish-to-deliver latency), deliveries, lost;
- gateway user bytes per connection, kernel bytes per connection pair (both
  ends are on this box), load generator bytes per connection.

The kernel's TCP memory limit (`net.ipv4.tcp_mem`, in pages, for the whole
box) is sized for far fewer sockets than a million pairs: a storm's
sockets pass its hard limit before half of them are up, and then stall.
Run as root, the script raises it for the run (`--tcp-mem-pages`; 0 leaves
it alone) and puts the old values back afterwards.

Heartbeats: every session is pinged every `ping_secs` and answers with a
pong, each a write and a read on both ends; at the gateway default (25 s) a
million sessions are 40,000 pings and 40,000 pongs a second. The run sets
the gateways' `[limits] ping_secs` to 120 (`--ping-secs`; 0 keeps the
default) and says so in its output (BENCHMARKS.md: 708,401 sessions up at
25 s against 953,832 at 120 s, same storm).

Scheduling: all of it shares two CPUs, and the kernel shares them out
thread by thread, so the load generator's ~330 worker threads and 67
gateway processes left the one router a sliver: with ~400,000 sessions up
its QUIC links to the gateways missed their keep-alives, went down one
after another (`switchyard_gateway_routers_up` 67 → 0 within 45 s) and the
sessions collapsed with them. In a deployment the clients are on other
machines and the router on its own; here the script renices the router's
threads to -10 and the load generator's workers to +10 (`--router-nice`,
`--worker-nice`; 0 leaves them) and prints both.

Socket lookup: every TCP segment looks its socket up in the established
hash, sized at boot for this box's memory (262,144 buckets here). Two
million sockets make its chains ~8 long, and a whole-box profile near the
storm's end of a million-session run put `__inet_lookup_established` first
of all symbols, at 11 % of both CPUs.
The script runs the load generator, router and gateways in a network
namespace of their own (`unshare --net`, loopback up) whose established
hash has `--ehash` buckets (`net.ipv4.tcp_child_ehash_entries`, set for
the run and put back; 0 runs in this namespace instead). The namespace's
TIME_WAIT limit and SYN backlog scale with it.

    cargo build --release -p loadgen
    python3 benches/scripts/million.py                       # 1,000,000 over 67 gateway processes, 4,000/s
    python3 benches/scripts/million.py --connections 200000 --gateways 12
"""
import argparse, json, os, resource, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from idle_memory import kernel_bytes  # noqa: E402  (slab + TCP buffer pages)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOADGEN = os.path.join(ROOT, "target", "release", "loadgen")


def loadgen_procs():
    """(pid, role) of every process of the load generator's binary
    (role: `worker`, `gateway`, `router`, ...)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if len(cmd) > 1 and cmd[0].endswith(b"loadgen"):
            yield pid, cmd[1].decode(errors="replace")


def worker_rss():
    """Summed RSS of the load generator's worker processes, and how many
    gateway processes run (the demo starts one per 15,000 connections at
    least, whatever `--gateways` asked)."""
    total = gateways = 0
    for pid, role in loadgen_procs():
        if role == "gateway":
            gateways += 1
        elif role == "worker":
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
    return total, gateways


def prioritise(a, done):
    """Renices, thread by thread (a nice value is per thread on Linux), the
    router to `--router-nice` and the load generator's workers to
    `--worker-nice`, as they come, until the run is over."""
    seen = set()
    while not done.wait(0.5):
        for pid, role in loadgen_procs():
            nice = {"router": a.router_nice, "worker": a.worker_nice}.get(role)
            if not nice:
                continue
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    if int(tid) not in seen:
                        os.setpriority(os.PRIO_PROCESS, int(tid), nice)
                        seen.add(int(tid))
            except OSError:
                pass


def raise_for_run(path, raised):
    """Writes `raised(old)` into the kernel setting at `path` for the run;
    returns the old text to put back, or None when nothing was changed."""
    try:
        old = open(path).read().strip()
        new = raised(old)
        if new == old:
            return None
        with open(path, "w") as f:
            f.write(new)
    except OSError as e:
        print(f"cannot raise {path} ({e}); running with it as it is", file=sys.stderr)
        return None
    print(f"{path} {old} -> {new} for the run", file=sys.stderr)
    return old


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=1_000_000)
    ap.add_argument("--gateways", type=int, default=60,
                    help="at least this many gateway processes (the demo starts one per 15,000 connections: 67 for a million)")
    ap.add_argument("--storm-rate", type=float, default=4000.0,
                    help="new sessions per second (0: all at once, which collapses here at this size)")
    ap.add_argument("--report", default=os.path.join(tempfile.gettempdir(), "million.html"))
    ap.add_argument("--ping-secs", type=int, default=120,
                    help="the gateways' ping interval for the run (0: the gateway default, 25 s)")
    ap.add_argument("--router-nice", type=int, default=-10,
                    help="nice value of the router's threads (0: unchanged)")
    ap.add_argument("--worker-nice", type=int, default=10,
                    help="nice value of the load generator's worker threads (0: unchanged)")
    ap.add_argument("--file-max", type=int, default=4_000_000,
                    help="fs.file-max for the run when it is lower (0: unchanged)")
    ap.add_argument("--tcp-mem-pages", type=int, default=4_000_000,
                    help="net.ipv4.tcp_mem's hard limit for the run (pages; 0: unchanged)")
    ap.add_argument("--ehash", type=int, default=1 << 21,
                    help="established-hash buckets of the run's own network namespace (0: run in this one)")
    ap.add_argument("--server-logs", help="keep the router's and gateways' logs in this directory")
    a = ap.parse_args()
    restore = {}

    def tcp_mem(old):
        low, pressure, high = (int(x) for x in old.split())
        return f"{low} {max(pressure, a.tcp_mem_pages * 3 // 4)} {max(high, a.tcp_mem_pages)}"

    if a.tcp_mem_pages:
        restore["/proc/sys/net/ipv4/tcp_mem"] = raise_for_run("/proc/sys/net/ipv4/tcp_mem", tcp_mem)
    # Both ends of a million sessions are two million open files on this
    # box, near the system-wide limit (fs.file-max, ~2.47 M here): a storm's
    # retries would pass it. Raised for the run like tcp_mem.
    if a.file_max:
        restore["/proc/sys/fs/file-max"] = raise_for_run(
            "/proc/sys/fs/file-max", lambda old: str(max(int(old), a.file_max)))
    if a.ehash:
        restore["/proc/sys/net/ipv4/tcp_child_ehash_entries"] = raise_for_run(
            "/proc/sys/net/ipv4/tcp_child_ehash_entries", lambda old: str(a.ehash))
    try:
        run(a)
    finally:
        for path, old in restore.items():
            if old is not None:
                with open(path, "w") as f:
                    f.write(old)


def tcp_sockets():
    """TCP sockets on the box now, open and in TIME_WAIT (this namespace)."""
    for line in open("/proc/net/sockstat"):
        if line.startswith("TCP:"):
            f = line.split()
            return int(f[f.index("alloc") + 1]) + int(f[f.index("tw") + 1])
    return 0


def run(a):
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    # The kernel's memory is measured from here: a run just before (its
    # sockets still closing, its TIME_WAIT still held) would be freed
    # during this one and make it look lighter. Wait, bounded, for quiet.
    quiet_by = time.time() + 180
    while tcp_sockets() > 20_000 and time.time() < quiet_by:
        time.sleep(2)
    if tcp_sockets() > 20_000:
        print(f"{tcp_sockets()} TCP sockets still on the box: the kernel figure is understated",
              file=sys.stderr)
    kernel0 = kernel_bytes()
    peak = {"kernel": kernel0, "workers": 0, "gateways": 0}
    done = threading.Event()

    def sample():
        while not done.wait(1.0):
            peak["kernel"] = max(peak["kernel"], kernel_bytes())
            rss, gateways = worker_rss()
            peak["workers"] = max(peak["workers"], rss)
            peak["gateways"] = max(peak["gateways"], gateways)

    threading.Thread(target=sample, daemon=True).start()
    if a.router_nice or a.worker_nice:
        threading.Thread(target=prioritise, args=(a, done), daemon=True).start()
    cmd = [LOADGEN, "fanout", "--connections", str(a.connections), "--gateways", str(a.gateways),
           "--gateway-cores", "1", "--storm-rate", str(a.storm_rate), "--channels", "1", "--subs-per-conn", "1", "--publications", "1",
           "--json", "--report", a.report]
    if a.server_logs:
        cmd += ["--server-logs", a.server_logs]
    # Every online user has a presence channel at the router (`presence:u…`):
    # a million users and the one channel pass the router's default bound of
    # 1,000,000 channels, past which presence publications are refused.
    rcfg = os.path.join(tempfile.gettempdir(), f"million-router-{os.getpid()}.toml")
    with open(rcfg, "w") as f:
        f.write(f"max_channels = {a.connections * 5 // 4 + 1000}\n")
    cmd += ["--router-config", rcfg]
    if a.ping_secs:
        cfg = os.path.join(tempfile.gettempdir(), f"million-gateway-{os.getpid()}.toml")
        with open(cfg, "w") as f:
            f.write(f"[limits]\nping_secs = {a.ping_secs}\n")
        cmd += ["--gateway-config", cfg]
    print(" ".join(cmd[1:]), file=sys.stderr)
    if a.ehash:
        # Its own network namespace: loopback only, its own socket hash.
        cmd = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "million", *cmd]
    t0 = time.time()
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, RUST_LOG="error"))
    done.set()
    lines = out.stdout.strip().splitlines()
    if not lines:
        sys.exit(f"the load generator printed no report (exit {out.returncode})")
    r = json.loads(lines[-1])
    n = max(r["connected"], 1)
    print(json.dumps({
        "connections": a.connections,
        "gateway_processes": peak["gateways"],
        "storm_rate": a.storm_rate,
        "ping_secs": a.ping_secs or 25,
        "router_nice": a.router_nice,
        "worker_nice": a.worker_nice,
        "ehash_buckets": a.ehash or "the host's",
        "connected": r["connected"],
        "failed": r["failed"],
        "rejected": r["rejected"],
        "unreported": r.get("unreported", 0),
        "open_secs": round(r["storm_secs"], 1),
        "deliveries": r["deliveries"],
        "lost": r["lost"],
        "publication_to_last_subscriber_ms": r["latency_ms"]["max"],
        "publication_p50_ms": r["latency_ms"]["p50"],
        "gateway_user_bytes_per_connection": round(r["gateway_rss_per_conn"], 1),
        "kernel_bytes_per_connection_pair": round((peak["kernel"] - kernel0) / n, 1),
        "loadgen_bytes_per_connection": round(peak["workers"] / n, 1),
        "gateway_cpu_us_per_conn": r["gateway_cpu_us_per_conn"],
        "wall_secs": round(time.time() - t0, 1),
        "verdict": r["verdict"],
        "report": a.report,
    }, indent=1))
    if out.returncode:
        sys.exit(out.returncode)


if __name__ == "__main__":
    main()
