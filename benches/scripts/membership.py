#!/usr/bin/env python3
"""Router cost per publication vs channel membership.

Starts a router and three gateways (the release `loadgen` binary embeds
both), then for each membership size M: opens M authenticated WebSocket
clients spread evenly over the three gateways, all subscribed to one channel,
publishes P publications through the HTTP API, and reads from the router's
/metrics and /proc: router→gateway sends per publication and router CPU per
publication. The subscribers do not read (P small publications fit in the
kernel's socket buffers), so the client side costs nothing while measuring.

    cargo build --release -p loadgen
    python3 benches/scripts/membership.py --members 30,300,3000,15000 --pubs 2000
"""
import argparse, http.client, json, multiprocessing as mp, os, subprocess, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from idle_memory import LOADGEN, SECRET, client, free_port, stop_all  # noqa: E402

API_KEY = "membership-bench-key"


def holder(ports, channel, first, n, ready, done):
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    held = [client(ports[i % len(ports)], i, f"127.0.{3 + (i // 250) % 200}.{2 + i % 250}", channel)
            for i in range(first, first + n)]
    ready.set()
    done.wait()
    del held


def router_stats(admin, pid):
    text = urllib.request.urlopen(f"http://{api}/metrics", timeout=10).read().decode()
    sends = pubs = 0
    for line in text.splitlines():
        if line.startswith("switchyard_router_gateway_sends_total "):
            sends = int(line.split()[1])
        if line.startswith("switchyard_router_publications_total "):
            pubs = int(line.split()[1])
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return sends, pubs, cpu


def publish(conn, channel, i):
    """One publish on a kept-alive HTTP connection (as a backend would)."""
    body = json.dumps({"channel": channel, "data": {"i": i, "pad": "x" * 64}})
    conn.request("POST", "/api/publish", body=body, headers={"X-API-Key": API_KEY})
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", default="30,300,3000,15000")
    ap.add_argument("--pubs", type=int, default=2000)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    subprocess.run([LOADGEN, "router", "certs", "--out", tmp], check=True, stdout=subprocess.DEVNULL)
    quic, api_port = free_port(), free_port()
    api = f"127.0.0.1:{api_port}"
    admin = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, RUST_LOG="warn")
    router = subprocess.Popen([LOADGEN, "router", "run", "--quic-listen", f"127.0.0.1:{quic}", "--api-listen", api,
                               "--api-key", API_KEY, "--admin-listen", admin, "--certs", tmp], env=env)
    procs = [router]
    ports = [free_port() for _ in range(3)]
    for g, port in enumerate(ports):
        procs.append(subprocess.Popen([LOADGEN, "gateway", "run", "--id", f"gw-{g}", "--listen", f"127.0.0.1:{port}",
                                       "--admin-listen", f"127.0.0.1:{free_port()}", "--router", f"127.0.0.1:{quic}",
                                       "--certs", tmp, "--hmac-secret", SECRET.decode(), "--cores", "1", "--no-pin"],
                                      env=env))
    time.sleep(2)
    print("| members (3 gateways) | publications | router sends/publication | router CPU µs/publication |")
    print("|---|---|---|---|")
    try:
        for m in [int(x) for x in a.members.split(",")]:
            channel = f"chat:members-{m}"
            done = mp.Event()
            workers = []
            for first in range(0, m, 15000):
                ready = mp.Event()
                w = mp.Process(target=holder, args=(ports, channel, first, min(15000, m - first), ready, done))
                w.start()
                workers.append((w, ready))
            for w, ready in workers:
                ready.wait(timeout=600)
            time.sleep(3)  # joins and presence of the new members settle first
            conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=10)
            s0, p0, c0 = router_stats(admin, router.pid)
            for i in range(a.pubs):
                publish(conn, channel, i)
            conn.close()
            time.sleep(1)
            s1, p1, c1 = router_stats(admin, router.pid)
            pubs = p1 - p0
            print(f"| {m} | {pubs} | {(s1 - s0) / max(pubs, 1):.2f} | {(c1 - c0) * 1e6 / max(pubs, 1):.0f} |",
                  flush=True)
            done.set()
            for w, _ in workers:
                w.join(timeout=60)
            time.sleep(1)
    finally:
        stop_all(procs)


if __name__ == "__main__":
    main()
