#!/usr/bin/env python3
"""Router memory under channel churn: 1,000,000 distinct channel names
subscribed and unsubscribed through a gateway, then the router's RSS after
their history TTL — idle channels must be dropped, so RSS returns close to
where it started.

Starts a router (with a `churn` namespace whose history lives 5 s) and one
gateway (the release `loadgen` binary embeds both), opens a few clients,
each subscribing to fresh names in batches (every subscribe creates the
channel's state at the router: epoch, offsets, history ring) and
unsubscribing right after, and samples the router's RSS throughout.

A first, smaller churn (`--warmup`, 100,000 names) brings the process to
its working set (allocator caches, queue blocks, table capacity); the start
figure is taken after it and its TTL, so the comparison is of the same
process before and after a million more names. The cold RSS (right after
start-up) is printed too.

    cargo build --release -p loadgen
    python3 benches/scripts/channel_churn.py [--channels 1000000] [--clients 4]
"""
import argparse, json, os, socket, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from idle_memory import LOADGEN, SECRET, frame, free_port, rss, stop_all, token  # noqa: E402


def read_frames(s, buf):
    """Reads what the socket has; returns (text payloads, rest)."""
    got = s.recv(1 << 20)
    if not got:
        raise SystemExit("the gateway closed a churn client")
    buf += got
    out = []
    while len(buf) >= 2:
        n = buf[1] & 0x7F
        off = 2
        if n == 126:
            if len(buf) < 4:
                break
            n = int.from_bytes(buf[2:4], "big")
            off = 4
        elif n == 127:
            if len(buf) < 10:
                break
            n = int.from_bytes(buf[2:10], "big")
            off = 10
        if len(buf) < off + n:
            break
        out.append(buf[off:off + n])
        buf = buf[off + n:]
    return out, buf


def churn(port, worker, first, count, batch, done):
    """Client `worker` subscribes to `count` fresh names from `first` on,
    `batch` per frame, and unsubscribes each batch after its replies."""
    s = socket.create_connection(("127.0.0.1", port))
    s.send(b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    d = b""
    while b"\r\n\r\n" not in d:
        d += s.recv(4096)
    buf = d.split(b"\r\n\r\n", 1)[1]
    s.send(frame(json.dumps({"id": 1, "connect": {"token": token(f"churn{worker}-{first}")}}).encode()))
    next_id = 2

    def wait_for(n):
        nonlocal buf
        seen = 0
        while seen < n:
            frames, buf = read_frames(s, buf)
            for f in frames:
                seen += f.count(b'"id":')
    wait_for(1)
    for start in range(first, first + count, batch):
        names = [f"churn:c{i}" for i in range(start, min(start + batch, first + count))]
        subs = []
        for n in names:
            subs.append(json.dumps({"id": next_id, "subscribe": {"channel": n}}))
            next_id += 1
        s.send(frame("\n".join(subs).encode()))
        wait_for(len(names))
        uns = []
        for n in names:
            uns.append(json.dumps({"id": next_id, "unsubscribe": {"channel": n}}))
            next_id += 1
        s.send(frame("\n".join(uns).encode()))
        wait_for(len(names))
        done[worker] += len(names)
    s.close()


# A `namespaces` table replaces the default one whole: the presence
# namespace the router publishes users' presence on is named again.
NAMESPACES = """
[namespaces.namespaces.churn]
history_size = 10
history_ttl_secs = {ttl}
[namespaces.namespaces.presence]
history_size = 1
history_ttl_secs = 3600
presence = false
publish = "backend"
"""


def run_churn(ws, clients, first, total, batch):
    done = [0] * clients
    per = total // clients
    threads = [threading.Thread(target=churn, args=(ws, k, first + k * per, per, batch, done))
               for k in range(clients)]
    for t in threads:
        t.start()
    return threads, done


def metric(port, name):
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(line.rsplit(" ", 1)[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--ttl", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=100_000)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    subprocess.run([LOADGEN, "router", "certs", "--out", tmp], check=True, stdout=subprocess.DEVNULL)
    quic, api, ws, admin, radmin = free_port(), free_port(), free_port(), free_port(), free_port()
    env = dict(os.environ, RUST_LOG="warn")
    rcfg = os.path.join(tmp, "router.toml")
    with open(rcfg, "w") as f:
        f.write(NAMESPACES.format(ttl=a.ttl))
    gcfg = os.path.join(tmp, "gateway.toml")
    with open(gcfg, "w") as f:
        # The churn clients answer no pings: ping once an hour.
        f.write("[limits]\nping_secs = 3600\nmax_subscriptions = 100000\nrequest_rate = 1000000.0\nrequest_burst = 1000000\n"
                "max_requests_in_flight = 100000\n" + NAMESPACES.format(ttl=a.ttl))
    router = subprocess.Popen([LOADGEN, "router", "run", "--quic-listen", f"127.0.0.1:{quic}", "--api-listen",
                               f"127.0.0.1:{api}", "--admin-listen", f"127.0.0.1:{radmin}", "--certs", tmp,
                               "--config", rcfg], env=env)
    gw = subprocess.Popen([LOADGEN, "gateway", "run", "--listen", f"127.0.0.1:{ws}", "--admin-listen",
                           f"127.0.0.1:{admin}", "--router", f"127.0.0.1:{quic}", "--certs", tmp,
                           "--hmac-secret", SECRET.decode(), "--cores", "1", "--no-pin", "--config", gcfg], env=env)
    procs = [router, gw]
    try:
        time.sleep(2)
        cold_rss = rss(router.pid)
        if a.warmup:
            warm, _ = run_churn(ws, a.clients, 10_000_000, a.warmup, a.batch)
            for t in warm:
                t.join()
            time.sleep(a.ttl + 3)
        start_rss = rss(router.pid)
        t0 = time.time()
        threads, done = run_churn(ws, a.clients, 0, a.channels, a.batch)
        peak = start_rss
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss(router.pid))
            time.sleep(0.2)
        secs = time.time() - t0
        peak = max(peak, rss(router.pid))
        held_at_end = metric(radmin, "switchyard_router_channels")
        time.sleep(a.ttl + 3)
        after = rss(router.pid)
        print(json.dumps({
            "channels": sum(done),
            "seconds": round(secs, 1),
            "channels_per_sec": round(sum(done) / secs),
            "router_rss_cold_bytes": cold_rss,
            "router_rss_start_bytes": start_rss,
            "router_rss_peak_bytes": peak,
            "router_rss_after_ttl_bytes": after,
            "after_over_start": round(after / start_rss, 3),
            "channels_held_when_churn_ended": held_at_end,
            "channels_held_after_ttl": metric(radmin, "switchyard_router_channels"),
            "channels_evicted": metric(radmin, "switchyard_router_channels_evicted_total"),
        }))
    finally:
        stop_all(procs)


if __name__ == "__main__":
    main()
