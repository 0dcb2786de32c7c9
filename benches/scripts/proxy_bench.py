#!/usr/bin/env python3
"""What the connect hook costs the gateway: CPU per session start with the
connect proxy beside the same session start with a JWT, in the same run,
against the same gateway process.

One router and one gateway (one core, the whole process pinned to CPU 0;
this script, the router and the app backend on CPU 1). The gateway has a
connect hook (`[proxy.connect]`) pointing at a keep-alive HTTP/1.1 backend
in this script; a connect with a token is verified as a JWT and never asks
the hook, so the two kinds of session start run against the same process,
in alternating batches:

- jwt:   upgrade, `connect` with an HS256 token, two `subscribe`s (one frame);
- proxy: upgrade, `connect` without a token (the hook answers the user),
         the same two `subscribe`s in the same frame.

Each client waits for its three replies, and the batch's sockets are closed
at its end (closing is in both figures). The gateway's CPU is the sum of its
threads' run time from /proc/PID/task/*/schedstat (nanoseconds; the proxy
thread's HTTP work included). Also printed: the connect reply's latency as
the client saw it (upgrade sent → connect reply read).

    cargo build --release -p gateway -p router
    python3 benches/scripts/proxy_bench.py [--sessions 3000] [--rounds 3]
"""
import argparse, base64, hashlib, hmac, json, os, socket, struct, subprocess, sys, tempfile, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "release")
SECRET = "proxy-bench-secret-long-enough-for-hs256"


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(user):
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps({"sub": user}).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


class Hook(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        n = int(self.headers.get("content-length", 0))
        body = json.loads(self.rfile.read(n))
        out = json.dumps({"result": {"user": body.get("data", {}).get("user", "")}}).encode()
        # One write, no Nagle: a head and a body in two segments would wait
        # for the gateway's delayed acknowledgement (40 ms).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(out)}\r\n\r\n"
        self.wfile.write(head.encode() + out)
        self.wfile.flush()

    def log_message(self, *a):
        pass


def frame(payload):
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def texts(buf):
    """Complete server frames in buf: (their payloads, bytes left)."""
    out = []
    while len(buf) >= 2:
        n, at = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, at = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, at = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < at + n:
            break
        out.append(buf[at:at + n])
        buf = buf[at + n:]
    return out, buf


def upgrade(addr):
    """A WebSocket upgrade; returns (socket, bytes read after the 101)."""
    s = socket.create_connection(addr)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /connection/websocket HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = s.recv(4096)
        if not got:
            sys.exit("upgrade refused (connection closed)")
        buf += got
    head, buf = buf.split(b"\r\n\r\n", 1)
    if b" 101 " not in head.split(b"\r\n")[0]:
        sys.exit(f"upgrade refused: {head[:80]!r}")
    return s, buf


def session(addr, i, kind):
    """One session start; returns (socket, ms from upgrade to connect reply)."""
    t0 = time.perf_counter()
    s, buf = upgrade(addr)
    user = f"u{kind}{i}"
    connect = {"token": jwt(user)} if kind == "jwt" else {"data": {"user": user}}
    cmds = [{"id": 1, "connect": connect},
            {"id": 2, "subscribe": {"channel": f"chat:a{i % 50}"}},
            {"id": 3, "subscribe": {"channel": f"chat:b{i % 50}"}}]
    s.sendall(frame("\n".join(json.dumps(c) for c in cmds).encode()))
    seen, took = set(), None
    while len(seen) < 3:
        got = s.recv(65536)
        if not got:
            sys.exit(f"{kind} session {i}: closed before its replies")
        buf += got
        payloads, buf = texts(buf)
        for p in payloads:
            for line in p.split(b"\n"):
                v = json.loads(line)
                if "error" in v:
                    sys.exit(f"{kind} session {i}: {v}")
                if v.get("id") == 1:
                    took = (time.perf_counter() - t0) * 1000
                if v.get("id") in (1, 2, 3):
                    seen.add(v["id"])
    return s, took


def start_cluster(gateway_args=(), gateway_prefix=(), router_prefix=()):
    """A router and a one-core gateway on loopback with fresh development
    certificates, behind the given command prefixes (`taskset`); returns
    (processes, the gateway's process, its WebSocket address)."""
    certs = os.path.join(tempfile.mkdtemp(prefix="sy-bench-"), "certs")
    subprocess.run([os.path.join(BIN, "router"), "certs", "--out", certs], check=True, stdout=subprocess.DEVNULL)
    quic, api, radmin, ws, gadmin = free_port(socket.SOCK_DGRAM), free_port(), free_port(), free_port(), free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([*router_prefix, os.path.join(BIN, "router"), "run", "--quic-listen",
                               f"127.0.0.1:{quic}", "--api-listen", f"127.0.0.1:{api}", "--admin-listen",
                               f"127.0.0.1:{radmin}", "--certs", certs, "--api-key", "k"], **quiet)]
    time.sleep(0.5)
    gw = subprocess.Popen([*gateway_prefix, os.path.join(BIN, "gateway"), "run", *gateway_args, "--cores", "1",
                           "--no-pin", "--listen", f"127.0.0.1:{ws}", "--admin-listen", f"127.0.0.1:{gadmin}",
                           "--certs", certs, "--hmac-secret", SECRET, "--router", f"127.0.0.1:{quic}"], **quiet)
    procs.append(gw)
    time.sleep(1.5)
    return procs, gw, ("127.0.0.1", ws)


def stop(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=35)
        except subprocess.TimeoutExpired:
            p.kill()


def cpu_ns(pid):
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=3000, help="sessions per batch")
    ap.add_argument("--rounds", type=int, default=3, help="batches of each kind, alternating")
    a = ap.parse_args()
    os.sched_setaffinity(0, {1})
    backend = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    cfg = os.path.join(tempfile.mkdtemp(prefix="sy-proxy-bench-"), "gateway.toml")
    with open(cfg, "w") as f:
        f.write(f"[proxy.connect]\nendpoint = \"http://127.0.0.1:{backend.server_address[1]}/connect\"\n"
                "timeout_ms = 5000\n")
    procs, gw, addr = start_cluster(["--config", cfg], ["taskset", "-c", "0"], ["taskset", "-c", "1"])
    try:
        for kind in ("jwt", "proxy"):  # warm-up: pools, caches, the hook's keep-alive connection
            for s, _ in [session(addr, i, kind) for i in range(200)]:
                s.close()
        cost = {"jwt": [], "proxy": []}
        lat = {"jwt": [], "proxy": []}
        for r in range(a.rounds):
            for kind in (("jwt", "proxy") if r % 2 == 0 else ("proxy", "jwt")):
                time.sleep(0.5)
                before = cpu_ns(gw.pid)
                socks = []
                for i in range(a.sessions):
                    s, took = session(addr, r * a.sessions + i, kind)
                    socks.append(s)
                    lat[kind].append(took)
                for s in socks:
                    s.close()
                time.sleep(0.5)  # the closes are handled
                cost[kind].append((cpu_ns(gw.pid) - before) / a.sessions / 1000)
        for kind in ("jwt", "proxy"):
            c = sorted(cost[kind])
            print(f"| session start with {kind:5} | gateway CPU per session {c[len(c) // 2]:.1f} µs (median of "
                  f"{len(c)} batches of {a.sessions}: {', '.join(f'{x:.1f}' for x in cost[kind])}) | connect reply "
                  f"p50 {pct(lat[kind], 0.5):.2f} ms, p99 {pct(lat[kind], 0.99):.2f} ms |")
        j, p = sorted(cost["jwt"])[len(cost["jwt"]) // 2], sorted(cost["proxy"])[len(cost["proxy"]) // 2]
        print(f"| connect hook / JWT | **{p / j:.2f}×** gateway CPU per session start (+{p - j:.1f} µs) |")
    finally:
        stop(procs)
        backend.shutdown()


if __name__ == "__main__":
    main()
