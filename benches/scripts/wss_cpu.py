#!/usr/bin/env python3
"""Gateway CPU per wss session start and per wss delivery, for one or two
builds side by side in the same run (and plain ws as the reference).

For each build (the release `loadgen` binary embeds the router and the
gateway) and transport: a router and one gateway with one core, S clients
(Python `ssl` over TLS 1.3 for wss) that upgrade, connect with a JWT and
subscribe to one channel; then P publications through the HTTP API, paced,
each counted at every client (all must arrive). The gateway's CPU time
(utime + stime from /proc) over the connect phase ÷ S, and over the
publication phase ÷ (S × P), is what it prints. Builds alternate per round,
so a noisy box disturbs both; medians over the rounds.

    cargo build --release -p loadgen
    python3 benches/scripts/wss_cpu.py [--baseline /path/to/other/loadgen] [--rounds 3]
"""
import argparse, json, os, selectors, ssl, statistics, struct, subprocess, sys, tempfile, time
import http.client

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import idle_memory as im  # noqa: E402  (client, free_port, stop_all)

API_KEY = "wss-cpu-key"
CHANNEL = "typing:wss-cpu"


def cpu_secs(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


class Reader:
    """Counts publications in the server's (unmasked) frames."""

    def __init__(self, sock):
        self.sock, self.buf, self.pubs = sock, b"", 0
        sock.setblocking(False)

    def feed(self):
        while True:
            try:
                d = self.sock.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                break
            if not d:
                raise RuntimeError("closed")
            self.buf += d
        while len(self.buf) >= 2:
            n = self.buf[1] & 0x7F
            at = 2
            if n == 126:
                if len(self.buf) < 4:
                    break
                n, at = struct.unpack(">H", self.buf[2:4])[0], 4
            elif n == 127:
                if len(self.buf) < 10:
                    break
                n, at = struct.unpack(">Q", self.buf[2:10])[0], 10
            if len(self.buf) < at + n:
                break
            self.pubs += self.buf[at:at + n].count(b'"pub"')
            self.buf = self.buf[at + n:]


def run(loadgen, tls_on, subscribers, publications, rate):
    tmp = tempfile.mkdtemp()
    subprocess.run([loadgen, "router", "certs", "--out", tmp], check=True, stdout=subprocess.DEVNULL)
    quic, api, ws = im.free_port(), im.free_port(), im.free_port()
    env = dict(os.environ, RUST_LOG="warn")
    procs = [subprocess.Popen([loadgen, "router", "run", "--quic-listen", f"127.0.0.1:{quic}", "--api-listen",
                               f"127.0.0.1:{api}", "--admin-listen", f"127.0.0.1:{im.free_port()}", "--certs", tmp,
                               "--api-key", API_KEY], env=env)]
    gw = subprocess.Popen([loadgen, "gateway", "run", "--id", "gw-0", "--listen", f"127.0.0.1:{ws}",
                           "--admin-listen", f"127.0.0.1:{im.free_port()}", "--router", f"127.0.0.1:{quic}",
                           "--certs", tmp, "--hmac-secret", im.SECRET.decode(), "--cores", "1", "--no-pin"]
                          + (["--tls-cert", os.path.join(tmp, "router.pem"), "--tls-key",
                              os.path.join(tmp, "router.key")] if tls_on else []), env=env)
    procs.append(gw)
    time.sleep(2)
    try:
        tls = ssl.create_default_context(cafile=os.path.join(tmp, "ca.pem")) if tls_on else None
        c0 = cpu_secs(gw.pid)
        socks = [im.client(ws, i, "127.0.0.1", channel=CHANNEL, tls=tls) for i in range(subscribers)]
        c1 = cpu_secs(gw.pid)
        readers = [Reader(s) for s in socks]
        sel = selectors.DefaultSelector()
        for r in readers:
            sel.register(r.sock, selectors.EVENT_READ, r)
        conn = http.client.HTTPConnection("127.0.0.1", api, timeout=10)
        c2 = cpu_secs(gw.pid)
        start = time.time()
        sent = 0
        want = subscribers * publications
        end = start + publications / rate + 60
        while time.time() < end:
            due = min(publications, int((time.time() - start) * rate) + 1)
            while sent < due:
                body = json.dumps({"channel": CHANNEL, "data": {"n": sent, "pad": "x" * 100}})
                conn.request("POST", "/api/publish", body=body, headers={"X-API-Key": API_KEY})
                r = conn.getresponse()
                r.read()
                assert r.status == 200, r.status
                sent += 1
            for key, _ in sel.select(timeout=0.01):
                key.data.feed()
            if sent == publications and sum(r.pubs for r in readers) >= want:
                break
        c3 = cpu_secs(gw.pid)
        got = sum(r.pubs for r in readers)
        for s in socks:
            s.close()
        return {"start_us": (c1 - c0) / subscribers * 1e6, "delivery_us": (c3 - c2) / max(got, 1) * 1e6,
                "delivered": got, "wanted": want}
    finally:
        im.stop_all(procs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loadgen", default=im.LOADGEN)
    ap.add_argument("--baseline", help="another build's loadgen binary, run beside it")
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--publications", type=int, default=200)
    ap.add_argument("--rate", type=float, default=50.0, help="publications per second")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    builds = [("build", a.loadgen)] + ([("baseline", a.baseline)] if a.baseline else [])
    results = {}
    for rnd in range(a.rounds):
        for name, path in builds:
            for tls_on in (True, False):
                key = f"{name} {'wss' if tls_on else 'ws'}"
                r = run(path, tls_on, a.subscribers, a.publications, a.rate)
                print(f"round {rnd + 1} {key}: {json.dumps(r)}", flush=True)
                results.setdefault(key, []).append(r)
    print("medians (gateway CPU, one core; µs):")
    for key, rs in results.items():
        lost = sum(r["wanted"] - r["delivered"] for r in rs)
        print(f"  {key:16} per session start {statistics.median(r['start_us'] for r in rs):7.1f}   "
              f"per delivery {statistics.median(r['delivery_us'] for r in rs):6.2f}   not delivered {lost}")


if __name__ == "__main__":
    main()
