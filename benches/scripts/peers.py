#!/usr/bin/env python3
"""Switchyard beside uWebSockets.js and node `ws`, in the same run, with the
same client: each server (Switchyard's whole serve tree — one gateway core
and its router — or the peer's node process, `benches/peers/server.mjs`) is
pinned to CPU 0, the load generator to CPU 1, and the servers take turns
(the order alternates between rounds). The peers are installed by this
script (`npm ci` in benches/peers: `@trufflesuite/uws-js-unofficial`, `ws`).

Measured per server, each on a freshly started one:

1. fan-out capacity: one channel, 10,000 subscribers, publications offered
   faster than they can be delivered: deliveries/s (0 lost is checked);
2. publish→deliver latency, p50/p99, at 100 publications/s × 1,000
   subscribers and at 10/s × 10,000;
3. server CPU (user + system of the server's processes, from /proc, and
   the system share of it) per connection of a storm, for the bare WebSocket upgrade
   (`--upgrade-only`) and for the whole session start (upgrade, JWT
   `connect`, one subscribe), the connection's close included. The peers
   have no admission control; Switchyard's production defaults refuse part
   of a 5,000-at-once storm on one core (503 + Retry-After, ~900 of 5,000),
   which would charge those refusals and the retries to the connections
   that stayed. So Switchyard's serve tree runs with a gateway config whose
   admission limits no storm here reaches (`NO_ADMISSION`), and each storm's
   refusals are printed (0 expected for every server);
4. the system calls each server makes per connection of the same storms,
   counted by perf's syscall tracepoints in storms of their own (tracing
   costs CPU, so the CPU storms run untraced; `--no-syscalls` skips them).

Ratios are Switchyard / peer (for latency and CPU, lower is better).

    cargo build --release -p loadgen
    python3 benches/scripts/peers.py [--rounds 2] [--json]
"""
import argparse, json, os, signal, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gateway_bench import loadgen_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOADGEN = os.path.join(ROOT, "target", "release", "loadgen")
PEERS = os.path.join(ROOT, "benches", "peers")
SECRET = "peers-bench-secret-0123456789abcdef"
KEY = "peers-bench-key"
SERVER_CPU, CLIENT_CPU = "0", "1"
# The CPU-per-connection storms compare the cost of a connection, not an
# admission policy: limits no storm here reaches (see the docstring).
NO_ADMISSION = "[admission]\naccept_rate = 1000000.0\naccept_burst = 1000000\nmax_pending_handshakes = 1000000\n"


def install():
    if not os.path.isdir(os.path.join(PEERS, "node_modules", "@trufflesuite", "uws-js-unofficial")):
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PEERS, check=True)


def tree(pid):
    """pid and its descendants."""
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_split(pid):
    """(user, system) CPU seconds of pid and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return user / tick, system / tick


# The system calls counted per connection (perf's syscall tracepoints).
SYSCALLS = ("accept4", "recvfrom", "read", "sendmsg", "sendto", "write", "writev", "close", "shutdown",
            "epoll_ctl", "epoll_wait", "epoll_pwait", "io_uring_enter", "setsockopt", "futex",
            "recvmmsg", "sendmmsg")


def syscalls_per_conn(s, extra, n):
    """System calls of the server's processes per connection of a storm of n
    (a storm of its own: tracing is not free, so the CPU storms run untraced).
    {"all": total, name: count} per connection, or None without perf."""
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"peers-perf-{os.getpid()}.csv")
    events = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{c}" for c in SYSCALLS]
    pids = ",".join(str(p) for p in tree(s.p.pid))
    try:
        perf = subprocess.Popen(["perf", "stat", "-x", ",", "-o", out, "-e", ",".join(events), "-p", pids],
                                stderr=subprocess.DEVNULL)
    except OSError:
        return None
    time.sleep(0.5)
    v = s.loadgen("storm", "--connections", str(n), "--channels", "1", *extra)
    time.sleep(1)  # closes handled
    perf.send_signal(signal.SIGINT)
    perf.wait()
    counts = {}
    with open(out) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) > 2 and parts[0].isdigit() and int(parts[0]) > 0:
                name = parts[2].split(":")[-1].replace("sys_enter_", "").replace("sys_enter", "all")
                counts[name] = round(int(parts[0]) / max(v["connected"], 1), 2)
    os.unlink(out)
    return counts


class Server:
    def __init__(self, name):
        self.name = name
        if name == "switchyard":
            # One gateway process on one core (the set-up: room for
            # 15,000 connections is one process; the default 50,000 would
            # start four, all on the server's CPU).
            cfg = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"peers-gateway-{os.getpid()}.toml")
            with open(cfg, "w") as f:
                f.write(NO_ADMISSION)
            cmd = [LOADGEN, "demo", "--serve", "--gateway-cores", "1", "--connections", "15000",
                   "--gateway-config", cfg]
        else:
            port = 20000 + os.getpid() % 10000
            cmd = ["node", os.path.join(PEERS, "server.mjs"), name, str(port), SECRET, KEY]
        self.p = subprocess.Popen(["taskset", "-c", SERVER_CPU, *cmd], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, cwd=ROOT, start_new_session=True)
        line = json.loads(self.p.stdout.readline())
        self.serve_line = line
        if name == "switchyard":
            self.ws = line["ws_url"].split("//")[1].split("/")[0]
            self.api = line["api_url"].split("//")[1].split("/")[0]
            self.key, self.secret = line["api_key"], line["hmac_secret"]
        else:
            self.ws = self.api = f"127.0.0.1:{line['port']}"
            self.key, self.secret = KEY, SECRET
        time.sleep(0.5)

    def loadgen(self, *args):
        """The same client against this server, on the client's CPU."""
        return loadgen_json(*args, "--ws", self.ws, "--api", self.api, "--api-key", self.key,
                            "--hmac-secret", self.secret, prefix=("taskset", "-c", CLIENT_CPU))

    def stop(self):
        os.killpg(self.p.pid, signal.SIGTERM)
        try:
            self.p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()


def fresh(name, f):
    s = Server(name)
    try:
        return f(s)
    finally:
        s.stop()


def measure(name, a):
    r = {}
    v = fresh(name, lambda s: s.loadgen("fanout", "--connections", str(a.subscribers), "--channels", "1",
                                       "--subs-per-conn", "1", "--publications", str(a.saturate_pubs),
                                       "--rate", "100000"))
    r["fanout_deliveries_per_sec"] = v["deliveries_per_sec"]
    for label, conns, rate, pubs in (("100x1000", 1000, 100, 1000), ("10x10000", a.subscribers, 10, 100)):
        v = fresh(name, lambda s: s.loadgen("fanout", "--connections", str(conns), "--channels", "1",
                                           "--subs-per-conn", "1", "--publications", str(pubs),
                                           "--rate", str(rate)))
        r[f"latency_{label}"] = {"p50": v["latency_ms"]["p50"], "p99": v["latency_ms"]["p99"]}
    for label, extra in (("upgrade", ["--upgrade-only"]), ("session", ["--subs-per-conn", "1"])):
        def storm(s):
            u0, s0 = cpu_split(s.p.pid)
            v = s.loadgen("storm", "--connections", str(a.storm), "--channels", "1", *extra)
            time.sleep(1)  # closes handled
            r[f"refused_{label}"] = v.get("rejected", 0)
            u1, s1 = cpu_split(s.p.pid)
            n = max(v["connected"], 1)
            r[f"system_share_{label}"] = round((s1 - s0) / max(u1 - u0 + s1 - s0, 1e-9), 3)
            return (u1 - u0 + s1 - s0) / n * 1e6
        r[f"cpu_us_per_{label}"] = fresh(name, storm)
        if a.syscalls:
            r[f"syscalls_per_{label}"] = fresh(name, lambda s: syscalls_per_conn(s, extra, a.storm))
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--subscribers", type=int, default=10000)
    ap.add_argument("--saturate-pubs", type=int, default=400)
    ap.add_argument("--storm", type=int, default=5000)
    ap.add_argument("--peers", default="uws,ws")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-syscalls", dest="syscalls", action="store_false",
                    help="skip the traced storms that count system calls per connection")
    a = ap.parse_args()
    install()
    names = ["switchyard", *a.peers.split(",")]
    runs = {n: [] for n in names}
    for i in range(a.rounds):
        for n in (names if i % 2 == 0 else list(reversed(names))):
            runs[n].append(measure(n, a))
            print(f"round {i + 1} {n}: {json.dumps(runs[n][-1])}", file=sys.stderr)

    def med(n, key, sub=None):
        xs = sorted(r[key][sub] if sub else r[key] for r in runs[n])
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    rows = [("fan-out deliveries/s (10,000 subscribers, saturated)", "fanout_deliveries_per_sec", None),
            ("latency p50 ms, 100/s x 1,000", "latency_100x1000", "p50"),
            ("latency p99 ms, 100/s x 1,000", "latency_100x1000", "p99"),
            ("latency p50 ms, 10/s x 10,000", "latency_10x10000", "p50"),
            ("latency p99 ms, 10/s x 10,000", "latency_10x10000", "p99"),
            ("server CPU us per bare upgrade", "cpu_us_per_upgrade", None),
            ("server CPU us per session start", "cpu_us_per_session", None)]
    out = {"rounds": a.rounds, "runs": runs, "medians": {}}
    for label, key, sub in rows:
        out["medians"][label] = {n: med(n, key, sub) for n in names}
    if a.json:
        print(json.dumps(out))
        return
    print(f"medians over {a.rounds} rounds (servers on CPU {SERVER_CPU}, loadgen on CPU {CLIENT_CPU}):")
    for label, _, _ in rows:
        m = out["medians"][label]
        cells = "  ".join(f"{n} {m[n]:,.1f}" for n in names)
        ratios = "  ".join(f"/{n} {m['switchyard'] / m[n]:.2f}" for n in names[1:] if m[n])
        print(f"  {label:55} {cells}   ratio {ratios}")
    for label in ("upgrade", "session"):
        shares = "  ".join(f"{n} {med(n, f'system_share_{label}'):.0%}" for n in names)
        print(f"  kernel share of the CPU per {label:8}                         {shares}")
        if a.syscalls:
            for n in names:
                last = runs[n][-1].get(f"syscalls_per_{label}")
                if last:
                    rest = ", ".join(f"{k} {v}" for k, v in sorted(last.items(), key=lambda kv: -kv[1]) if k != "all")
                    print(f"    {n} system calls per {label}: {last.get('all', 0)} ({rest})")


if __name__ == "__main__":
    main()
