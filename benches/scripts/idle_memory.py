#!/usr/bin/env python3
"""Idle memory per connection: gateway RSS growth / N for authenticated,
subscribed, idle WebSocket connections.

Starts a router and P gateway processes (the release `loadgen` binary embeds
both; they share one port with SO_REUSEPORT), opens N idle clients per gateway
process from P client processes (one process's open-file limit is 20,000 here),
and prints RSS growth per connection per gateway process and for the box.

    cargo build --release -p loadgen
    python3 benches/scripts/idle_memory.py --per-process 18000 --processes 1
    python3 benches/scripts/idle_memory.py --per-process 17000 --processes 6   # 100k+
    python3 benches/scripts/idle_memory.py --per-process 18000 --transport http_stream   # the HTTP fallback
"""
import argparse, base64, hashlib, hmac, json, multiprocessing as mp, os, socket, struct, subprocess, sys, tempfile, time

SECRET = b"idle-memory-secret-long-enough-for-hs256"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOADGEN = os.path.join(ROOT, "target", "release", "loadgen")


def token(user):
    b = lambda x: base64.urlsafe_b64encode(x).rstrip(b"=")
    h = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    p = b(json.dumps({"sub": user}).encode())
    s = b(hmac.new(SECRET, h + b"." + p, hashlib.sha256).digest())
    return (h + b"." + p + b"." + s).decode()


def frame(payload):
    m = os.urandom(4)
    p = bytes(c ^ m[i % 4] for i, c in enumerate(payload))
    n = len(p)
    h = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + struct.pack(">H", n)
    return h + m + p


def client(port, i, src, channel=None, tls=None):
    """One authenticated WebSocket client subscribed to `channel` (default: one
    of 1,000 `typing:` rooms), left idle; returns its socket."""
    s = socket.socket()
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    if tls is not None:
        s = tls.wrap_socket(s, server_hostname="localhost")
    s.send(b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    d = b""
    while b"\r\n\r\n" not in d:
        d += s.recv(4096)
    cmds = [json.dumps({"id": 1, "connect": {"token": token(f"u{i}")}}),
            json.dumps({"id": 2, "subscribe": {"channel": channel or f"typing:room-{i % 1000}"}})]
    s.send(frame("\n".join(cmds).encode()))
    got = d.split(b"\r\n\r\n", 1)[1]
    deadline = time.time() + 30
    while b'"id":2' not in got and time.time() < deadline:
        got += s.recv(4096)
    return s


def stream_client(port, i, src):
    """One authenticated `http_stream` session (the HTTP fallback) subscribed
    to one of 1,000 `typing:` rooms, connect and subscribe in the request's
    body, left idle; returns its socket."""
    s = socket.socket()
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    body = "\n".join([json.dumps({"id": 1, "connect": {"token": token(f"u{i}")}}),
                      json.dumps({"id": 2, "subscribe": {"channel": f"typing:room-{i % 1000}"}})]).encode()
    s.send(b"POST /connection/http_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    deadline = time.time() + 30
    while b'"id":2' not in got and time.time() < deadline:
        got += s.recv(4096)
    return s


def client_proc(port, first, n, ready, done, cafile=None, transport="websocket"):
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    tls = None
    if cafile:
        import ssl
        tls = ssl.create_default_context(cafile=cafile)
    src = lambda i: f"127.0.{2 + (i // 250) % 200}.{2 + i % 250}"
    if transport == "http_stream":
        held = [stream_client(port, i, src(i)) for i in range(first, first + n)]
    else:
        held = [client(port, i, src(i), tls=tls) for i in range(first, first + n)]
    ready.set()
    done.wait()
    del held


def open_sessions(admin_port):
    """`switchyard_gateway_connections` summed over a gateway's cores."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
    return sum(int(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("switchyard_gateway_connections{"))


def kernel_bytes():
    """Kernel memory that grows with sockets: slab objects plus TCP buffer pages."""
    slab = 0
    for line in open("/proc/meminfo"):
        if line.startswith("Slab:"):
            slab = int(line.split()[1]) * 1024
    tcp_pages = 0
    for line in open("/proc/net/sockstat"):
        if line.startswith("TCP:"):
            f = line.split()
            tcp_pages = int(f[f.index("mem") + 1])
    return slab + tcp_pages * os.sysconf("SC_PAGE_SIZE")


def rss(pid, field="VmRSS"):
    """Resident bytes of `pid`: all (VmRSS), or anonymous memory (RssAnon: the
    heap and stacks) or file pages (RssFile: the binary's code and data as
    they are first run)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def stop_all(procs):
    """SIGTERM every server (they drain), then SIGKILL what is still up after 15 s."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-process", type=int, default=18000)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--tls", action="store_true", help="wss: the gateways serve TLS, the clients verify it")
    ap.add_argument("--transport", choices=["websocket", "http_stream"], default="websocket",
                    help="the sessions' transport (http_stream: the HTTP fallback, an emulated session)")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    subprocess.run([LOADGEN, "router", "certs", "--out", tmp], check=True, stdout=subprocess.DEVNULL)
    quic, api, ws = free_port(), free_port(), free_port()
    env = dict(os.environ, RUST_LOG="warn")
    procs = [subprocess.Popen([LOADGEN, "router", "run", "--quic-listen", f"127.0.0.1:{quic}", "--api-listen",
                               f"127.0.0.1:{api}", "--admin-listen", f"127.0.0.1:{free_port()}", "--certs", tmp],
                              env=env)]
    # The clients here never answer pings: with the default 25 s ping the
    # gateways would (rightly) close them during a long run, so this run
    # pings once an hour. Everything else is the default configuration.
    cfg = os.path.join(tmp, "gateway.toml")
    with open(cfg, "w") as f:
        f.write("[limits]\nping_secs = 3600\n")
    gws = []
    admins = []
    for g in range(a.processes):
        admin = free_port()
        admins.append(admin)
        gws.append(subprocess.Popen([LOADGEN, "gateway", "run", "--id", f"gw-{g}", "--listen", f"127.0.0.1:{ws}",
                                     "--admin-listen", f"127.0.0.1:{admin}", "--router", f"127.0.0.1:{quic}",
                                     "--certs", tmp, "--hmac-secret", SECRET.decode(), "--cores", str(a.cores),
                                     "--no-pin", "--config", cfg]
                                    + (["--tls-cert", os.path.join(tmp, "router.pem"), "--tls-key",
                                        os.path.join(tmp, "router.key")] if a.tls else []), env=env))
    procs += gws
    time.sleep(2)
    try:
        before = [rss(p.pid) for p in gws]
        anon_before = [rss(p.pid, "RssAnon") for p in gws]
        if os.environ.get("IDLE_SMAPS"):
            os.system(f"cat /proc/{gws[0].pid}/smaps > /tmp/smaps_before; grep -E 'Rss' /proc/{gws[0].pid}/status >&2")
        kernel_before = kernel_bytes()
        total = a.per_process * a.processes
        done = mp.Event()
        workers = []
        per_client_proc = 15000
        for k, first in enumerate(range(0, total, per_client_proc)):
            ready = mp.Event()
            w = mp.Process(target=client_proc, args=(ws, first, min(per_client_proc, total - first), ready, done,
                                                           os.path.join(tmp, "ca.pem") if a.tls else None,
                                                           a.transport))
            w.start()
            workers.append((w, ready))
        for w, ready in workers:
            ready.wait(timeout=600)
        time.sleep(1)
        after = [rss(p.pid) for p in gws]
        anon_after = [rss(p.pid, "RssAnon") for p in gws]
        if os.environ.get("IDLE_SMAPS"):
            os.system(f"cat /proc/{gws[0].pid}/smaps > /tmp/smaps_after; grep -E 'Rss' /proc/{gws[0].pid}/status >&2")
        kernel_after = kernel_bytes()
        growth = sum(after) - sum(before)
        # What the gateways hold: connected sessions as their metrics count them
        # (a refused or failed client must not dilute the figure).
        sessions = sum(open_sessions(port) for port in admins)
        print(json.dumps({
            "asked": total,
            "connections": sessions,
            "gateway_processes": a.processes,
            "tls": a.tls,
            "transport": a.transport,
            "rss_before_bytes": before,
            "rss_after_bytes": after,
            "bytes_per_connection": round(growth / max(sessions, 1), 1),
            # Of which anonymous memory (heap, stacks); the rest is the binary's
            # pages faulted in as code paths first run (shared, file-backed).
            "anon_bytes_per_connection": round((sum(anon_after) - sum(anon_before)) / max(sessions, 1), 1),
            # Both ends of every connection are on this box: the kernel figure
            # is (slab + TCP buffer growth) / connections, client socket included.
            "kernel_bytes_per_connection_both_ends": round((kernel_after - kernel_before) / max(sessions, 1), 1),
            "note": "SO_REUSEPORT spreads connections over processes unevenly; the box figure is total growth / total",
        }))
        done.set()
        for w, _ in workers:
            w.join(timeout=30)
    finally:
        stop_all(procs)


if __name__ == "__main__":
    main()
