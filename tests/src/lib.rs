//! End-to-end harness: starts the real `router` and `gateway` binaries on
//! loopback (free ports, fresh development certificates) and speaks real
//! WebSocket to them with a small blocking client built on `proto`.
//!
//! Every wait is bounded; a test never loops without a deadline, and never
//! asserts elapsed time: it waits for an event or a count.
//!
//! - [`Cluster`]: the processes, their addresses, the HTTP API and metrics.
//! - [`Ws`]: a client; [`Ws::next_by`] tells an event, a passed deadline
//!   and an ended connection ([`Next`]) apart, [`Ws::event_by`] fails on
//!   the last. Server pings are answered unless a test asks for them.
//! - [`StreamCheck`] with [`Published`]: a client's whole view of one
//!   channel, live and recovered, checked offset by offset (each once, in
//!   order, recovery exact or explicitly refused) and payload by payload.
//! - [`wait_until`]: poll a metric or an answer until it reaches a value.
//! - [`Etcd`]: a real etcd server for the membership tests.
//! - [`wan::Relay`]: a WAN (delay, jitter, loss, reordering, blackhole)
//!   between a gateway and a router, as a UDP relay.

#![warn(missing_docs, unreachable_pub)]

pub mod backend;
pub mod fallback;
pub mod wan;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use proto::ws::deflate::{DeflateParams, Inflater};
use proto::ws::handshake::client::{self, ClientHandshakeError};
use proto::ws::{Decoder, DecoderConfig, Message, OpCode, encode_frame};
use serde_json::Value;

/// The HMAC secret the test gateways accept.
pub const SECRET: &str = "e2e-secret-that-is-long-enough-for-hs256";

/// The routers' HTTP API key.
pub const API_KEY: &str = "e2e-api-key";

/// How long a client's read waits by default.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Where the workspace's binaries are (`target/<profile>/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        p.display()
    );
    p
}

static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// A port that is free for both TCP and UDP on 127.0.0.1, from a block
/// reserved for this test process (nextest runs tests as parallel processes;
/// kernel-chosen ports could be handed to two of them, and gateways bind
/// with SO_REUSEPORT, so two tests could silently share a listener). The
/// blocks sit below the kernel's ephemeral range.
pub fn free_port() -> u16 {
    let base = 10_000 + (std::process::id() % 1_100) * 20;
    for _ in 0..200 {
        let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        // The process's own block first, then spread over the rest of the range.
        let port = if n < 20 { base + n } else { 10_000 + (base + n * 7919) % 22_000 } as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

/// A free TCP port on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    free_port()
}

/// A free UDP port on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    free_port()
}

/// A child process killed on drop.
pub struct Proc {
    /// The process.
    pub child: Child,
}

impl Proc {
    /// Sends a signal (e.g. `libc::SIGTERM` = 15).
    pub fn signal(&self, sig: i32) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status();
    }

    /// Stops the process (SIGSTOP) and waits until the kernel shows every
    /// thread stopped (bounded: 5 s), so nothing it does races what the
    /// caller does next.
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
        let pid = self.child.id();
        let end = Instant::now() + Duration::from_secs(5);
        let stopped = |t: &std::fs::DirEntry| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the command name's closing parenthesis.
            stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
        };
        while Instant::now() < end {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return };
            if tasks.flatten().all(|t| stopped(&t)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("process {pid} did not stop within 5 s of SIGSTOP");
    }

    /// Waits up to `timeout` for the process to exit; returns its code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Routers a cluster has certificates for (those it starts and those a
/// test adds).
pub const MAX_ROUTERS: usize = 8;

/// A real etcd server (Debian's `etcd-server`, which `scripts/test.sh`
/// installs) on loopback ports of this test process's block, its data in a
/// fresh directory; killed and removed on drop.
pub struct Etcd {
    proc: Proc,
    dir: PathBuf,
    /// Its client endpoint, `127.0.0.1:PORT`.
    pub endpoint: String,
}

impl Etcd {
    /// Starts it and waits until it takes connections.
    pub fn start() -> Etcd {
        let (client, peer) = (free_tcp_port(), free_tcp_port());
        let dir = std::env::temp_dir().join(format!(
            "sy-etcd-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let (c, p) = (format!("http://127.0.0.1:{client}"), format!("http://127.0.0.1:{peer}"));
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--name", "e2e", "--listen-client-urls", &c, "--advertise-client-urls", &c])
            .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
            .args(["--initial-cluster", &format!("e2e={p}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd ({e}): scripts/test.sh installs Debian's etcd-server"));
        let endpoint = format!("127.0.0.1:{client}");
        wait_tcp(endpoint.parse().unwrap());
        Etcd { proc: Proc { child }, dir, endpoint }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The name (and certificate name) of the cluster's router `i`.
pub fn router_name(i: usize) -> String {
    format!("router-{i}.switchyard.test")
}

/// A router and gateways on loopback.
pub struct Cluster {
    /// Certificates directory.
    pub certs: PathBuf,
    /// Router processes.
    pub routers: Vec<Proc>,
    /// Router QUIC addresses.
    pub router_addrs: Vec<SocketAddr>,
    /// Router HTTP API addresses.
    pub api_addrs: Vec<SocketAddr>,
    /// Router admin addresses (`/metrics`).
    pub router_admin_addrs: Vec<SocketAddr>,
    /// Gateway processes.
    pub gateways: Vec<Proc>,
    /// Gateway WebSocket addresses.
    pub ws_addrs: Vec<SocketAddr>,
    /// Gateway admin addresses.
    pub admin_addrs: Vec<SocketAddr>,
    /// Extra arguments of every router.
    router_extra: Vec<String>,
    /// The etcd endpoint membership comes from (`None`: static lists).
    etcd: Option<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.gateways.clear();
        self.routers.clear();
        let _ = std::fs::remove_dir_all(&self.certs);
    }
}

impl Cluster {
    /// Starts `routers` routers and `gateways` gateways; `extra` are added to
    /// every gateway's command line.
    pub fn start(routers: usize, gateways: usize, extra: &[&str]) -> Cluster {
        Self::start_with(routers, gateways, &[], extra)
    }

    /// Like [`start`](Self::start), with extra arguments for every router too.
    pub fn start_with(routers: usize, gateways: usize, router_extra: &[&str], extra: &[&str]) -> Cluster {
        Self::start_inner(routers, gateways, router_extra, extra, None)
    }

    /// Routers and gateways whose membership comes from `etcd`: routers
    /// register there (no peer lists), gateways watch it (no router lists).
    pub fn start_with_etcd(
        etcd: &Etcd,
        routers: usize,
        gateways: usize,
        router_extra: &[&str],
        extra: &[&str],
    ) -> Cluster {
        Self::start_inner(routers, gateways, router_extra, extra, Some(etcd.endpoint.clone()))
    }

    fn start_inner(
        routers: usize,
        gateways: usize,
        router_extra: &[&str],
        extra: &[&str],
        etcd: Option<String>,
    ) -> Cluster {
        let certs = std::env::temp_dir().join(format!(
            "sy-e2e-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        // Each router has a name of its own and a certificate for it only;
        // gateways and peers check it against that name.
        // Spare names for routers a test adds later.
        let names: Vec<String> = (0..routers.max(MAX_ROUTERS)).map(router_name).collect();
        let st = Command::new(bin("router"))
            .args(["certs", "--out"])
            .arg(&certs)
            .args(["--names", &names.join(",")])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        let mut c = Cluster {
            certs,
            routers: Vec::new(),
            router_addrs: Vec::new(),
            api_addrs: Vec::new(),
            router_admin_addrs: Vec::new(),
            gateways: Vec::new(),
            ws_addrs: Vec::new(),
            admin_addrs: Vec::new(),
            router_extra: Vec::new(),
            etcd,
        };
        for _ in 0..routers {
            c.router_addrs.push(format!("127.0.0.1:{}", free_udp_port()).parse().unwrap());
            c.api_addrs.push(format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap());
            c.router_admin_addrs.push(format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap());
        }
        c.router_extra = router_extra.iter().map(|s| s.to_string()).collect();
        for i in 0..routers {
            let p = c.spawn_router(i);
            c.routers.push(p);
        }
        for api in c.api_addrs.clone() {
            wait_tcp(api);
        }
        for i in 0..gateways {
            c.add_gateway(i, extra);
        }
        c
    }

    /// Starts router `i` on its addresses, with every other router as a peer.
    fn spawn_router(&self, i: usize) -> Proc {
        let (addr, api) = (self.router_addrs[i], self.api_addrs[i]);
        let mut cmd = Command::new(bin("router"));
        cmd.args(["run", "--id", &format!("router-{i}"), "--name", &router_name(i)])
            .args(["--quic-listen", &addr.to_string()])
            .args(["--api-listen", &api.to_string(), "--api-key", API_KEY])
            .args(["--admin-listen", &self.router_admin_addrs[i].to_string(), "--certs"])
            .arg(&self.certs)
            .args(&self.router_extra)
            .env("RUST_LOG", std::env::var("E2E_LOG").unwrap_or_else(|_| "warn".into()));
        match &self.etcd {
            Some(e) => {
                cmd.args(["--etcd", e]);
            }
            None => {
                for (j, q) in self.router_addrs.iter().enumerate() {
                    if j != i {
                        cmd.args(["--peer", &format!("{}@{q}", router_name(j))]);
                    }
                }
            }
        }
        Proc { child: cmd.spawn().unwrap() }
    }

    /// Starts one more router (the next name, fresh addresses); with etcd it
    /// registers and everyone sees it, without etcd nobody lists it.
    /// Returns its index.
    pub fn add_router(&mut self) -> usize {
        let i = self.router_addrs.len();
        assert!(i < MAX_ROUTERS, "the cluster's certificates cover {MAX_ROUTERS} routers");
        self.router_addrs.push(format!("127.0.0.1:{}", free_udp_port()).parse().unwrap());
        self.api_addrs.push(format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap());
        self.router_admin_addrs.push(format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap());
        let p = self.spawn_router(i);
        self.routers.push(p);
        wait_tcp(self.api_addrs[i]);
        i
    }

    /// Starts a router outside the cluster's list (nobody links to it): named
    /// `name` with that name's certificate from the cluster's directory
    /// (`localhost`: the development one), calling `peers` (`NAME@ADDR`).
    /// Returns the process and its admin address.
    pub fn spawn_stray_router(&self, name: &str, peers: &[String]) -> (Proc, SocketAddr) {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let mut cmd = Command::new(bin("router"));
        cmd.args(["run", "--id", &format!("stray-{name}"), "--name", name])
            .args(["--quic-listen", &format!("127.0.0.1:{}", free_udp_port())])
            .args(["--api-listen", &format!("127.0.0.1:{}", free_tcp_port()), "--api-key", API_KEY])
            .args(["--admin-listen", &admin.to_string(), "--certs"])
            .arg(&self.certs)
            .env("RUST_LOG", std::env::var("E2E_LOG").unwrap_or_else(|_| "warn".into()));
        for p in peers {
            cmd.args(["--peer", p]);
        }
        let p = Proc { child: cmd.spawn().unwrap() };
        wait_tcp(admin);
        (p, admin)
    }

    /// Kills router `i` (SIGKILL) and starts a fresh one on the same addresses.
    pub fn restart_router(&mut self, i: usize) {
        let _ = self.routers[i].child.kill();
        let _ = self.routers[i].child.wait();
        self.routers[i] = self.spawn_router(i);
        wait_tcp(self.api_addrs[i]);
    }

    /// Starts one more gateway.
    pub fn add_gateway(&mut self, i: usize, extra: &[&str]) {
        let ws: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        self.add_gateway_at(i, ws, extra);
    }

    /// Starts one more gateway listening on `ws`, which another gateway may
    /// share (`SO_REUSEPORT`): clients of a drained one reconnect to the other
    /// at the same address.
    pub fn add_gateway_at(&mut self, i: usize, ws: SocketAddr, extra: &[&str]) {
        self.spawn_gateway(i, ws, extra, None, None);
    }

    /// Starts one more gateway linked to exactly `routers` (`NAME@ADDR`
    /// each) instead of the cluster's routers.
    pub fn add_gateway_routed(&mut self, i: usize, routers: &[String], extra: &[&str]) {
        let ws: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        self.spawn_gateway(i, ws, extra, None, Some(routers));
    }

    /// Starts one more gateway whose open-file limit is `nofile` (soft and
    /// hard), to run it out of descriptors.
    pub fn add_gateway_with_fd_limit(&mut self, i: usize, nofile: u64, extra: &[&str]) {
        let ws: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        self.spawn_gateway(i, ws, extra, Some(nofile), None);
    }

    fn spawn_gateway(
        &mut self,
        i: usize,
        ws: SocketAddr,
        extra: &[&str],
        nofile: Option<u64>,
        routers: Option<&[String]>,
    ) {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let mut cmd = Command::new(bin("gateway"));
        cmd.args([
            "run",
            "--id",
            &format!("gw-{i}"),
            "--listen",
            &ws.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ])
        .args(["--cores", "2", "--no-pin", "--hmac-secret", SECRET, "--certs"])
        .arg(&self.certs)
        .args(extra)
        .env("RUST_LOG", std::env::var("E2E_LOG").unwrap_or_else(|_| "warn".into()));
        match (routers, &self.etcd) {
            (Some(r), _) => {
                for r in r {
                    cmd.args(["--router", r]);
                }
            }
            (None, Some(e)) => {
                cmd.args(["--etcd", e]);
            }
            (None, None) => {
                for (j, r) in self.router_addrs.iter().enumerate() {
                    cmd.args(["--router", &format!("{}@{r}", router_name(j))]);
                }
            }
        }
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit { rlim_cur: n, rlim_max: n };
            // SAFETY: between fork and exec the closure only calls
            // setrlimit, which is async-signal-safe, on a value it owns.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        self.gateways.push(Proc { child: cmd.spawn().unwrap() });
        self.ws_addrs.push(ws);
        self.admin_addrs.push(admin);
        wait_tcp(ws);
        wait_tcp(admin);
        wait_ready(admin);
    }

    /// Connects a client to gateway `i` and sends `connect` with a token for `user`.
    /// Retries while the gateway's uplink is not yet up (publishes need it).
    /// A 503 (admission control) is retried after its `Retry-After`, as the
    /// SDKs do, for at most 30 s.
    pub fn client(&self, i: usize, user: &str) -> Ws {
        self.client_with_id(i, user).0
    }

    /// [`client`](Self::client), and the client id its connect reply gave.
    pub fn client_with_id(&self, i: usize, user: &str) -> (Ws, String) {
        let end = Instant::now() + Duration::from_secs(30);
        let mut ws = loop {
            match Ws::connect(self.ws_addrs[i], "/connection/websocket") {
                Ok(ws) => break ws,
                Err(ClientHandshakeError::Rejected { status: 503, retry_after }) if Instant::now() < end => {
                    std::thread::sleep(Duration::from_secs(retry_after.unwrap_or(1).min(5) as u64));
                }
                Err(e) => panic!("upgrade: {e:?}"),
            }
        };
        let reply = ws.call(serde_json::json!({"connect": {"token": token(user), "name": "e2e"}}));
        let id = reply["connect"]["client"].as_str().unwrap_or_else(|| panic!("{reply}")).to_owned();
        (ws, id)
    }

    /// Calls router `r`'s HTTP API: `POST /api/<method>` with `X-API-Key`.
    /// Returns (status, body).
    pub fn api(&self, r: usize, method: &str, body: &Value) -> (u16, String) {
        http_request(
            self.api_addrs[r],
            "POST",
            &format!("/api/{method}"),
            &[("X-API-Key", API_KEY)],
            &body.to_string(),
        )
    }

    /// Waits until every router sees its peers ready and every gateway is
    /// linked to every router (both compute owners over what they see; a
    /// gateway is ready once one router is linked).
    pub fn settle(&self) {
        let n = self.routers.len() as u64;
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let routers = (0..self.routers.len())
                .all(|r| metric(&self.router_metrics(r), "switchyard_router_peers_ready") == n - 1);
            let gateways = (0..self.gateways.len())
                .all(|g| metric(&self.metrics(g), "switchyard_gateway_routers_up") == n);
            if routers && gateways {
                return;
            }
            assert!(Instant::now() < end, "the cluster did not settle");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fetches gateway `i`'s Prometheus metrics.
    /// Router `r`'s metrics (its admin port).
    pub fn router_metrics(&self, r: usize) -> String {
        http_get(self.router_admin_addrs[r], "/metrics")
    }

    /// Gateway `i`'s metrics (its admin port).
    pub fn metrics(&self, i: usize) -> String {
        // A gateway out of descriptors cannot accept the admin connection
        // either: try again (bounded) rather than read an empty page as zeros.
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let text = http_get(self.admin_addrs[i], "/metrics");
            if text.contains("# TYPE") || Instant::now() > end {
                return text;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A metric's value summed over its label sets.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l.as_bytes().get(name.len()) == Some(&b' ')
                    || l.as_bytes().get(name.len()) == Some(&b'{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Waits (bounded) until something listens on `addr`.
pub fn wait_tcp(addr: SocketAddr) {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {addr}");
}

/// Waits (bounded) until a gateway's `/readyz` answers 200 (a router link is up).
pub fn wait_ready(admin: SocketAddr) {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if http_get(admin, "/readyz").starts_with("ready") {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("gateway at {admin} never became ready");
}

/// A kept-alive HTTP/1.1 connection to a router's API (for publishing
/// thousands per second without a connection each).
pub struct ApiConn {
    s: std::io::BufReader<TcpStream>,
}

impl ApiConn {
    /// Connects to the API at `addr`.
    pub fn connect(addr: SocketAddr) -> ApiConn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        ApiConn { s: std::io::BufReader::new(s) }
    }

    /// `POST /api/<method>` with the key; (status, body).
    pub fn call(&mut self, method: &str, body: &Value) -> (u16, Value) {
        use std::io::BufRead;
        let body = body.to_string();
        let req = format!(
            "POST /api/{method} HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.s.get_mut().write_all(req.as_bytes()).unwrap();
        let mut line = String::new();
        self.s.read_line(&mut line).unwrap();
        let status = line.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        let mut len = 0usize;
        loop {
            line.clear();
            self.s.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap();
            }
        }
        let mut out = vec![0u8; len];
        self.s.read_exact(&mut out).unwrap();
        (status, serde_json::from_slice(&out).unwrap_or(Value::Null))
    }

    /// Publishes `data` and records it in `log`; its (epoch, offset).
    pub fn publish(&mut self, log: &mut Published, channel: &str, data: Value) -> (String, u64) {
        let (st, v) = self.call("publish", &serde_json::json!({"channel": channel, "data": data}));
        assert_eq!(st, 200, "{v}");
        let (epoch, offset) = acknowledged(&v).unwrap_or_else(|| panic!("{v}"));
        log.record(channel, &epoch, offset, data);
        (epoch, offset)
    }
}

/// One HTTP/1.1 request; returns (status, body).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// A plain HTTP GET; returns the body.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
}

/// An HS256 connection token for `user`.
pub fn token(user: &str) -> String {
    token_with(serde_json::json!({"sub": user}))
}

/// An HS256 token with these claims, signed with [`SECRET`].
pub fn token_with(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// What a client saw.
#[derive(Debug)]
pub enum Event {
    /// One JSON line of a text frame.
    Json(Value),
    /// A binary frame (never expected from the gateway).
    Binary,
    /// The server closed with this code.
    Closed(Option<u16>, String),
}

/// A TLS client stream to `addr`, trusting the CA in `ca_pem` for the
/// name `localhost` (10 s read timeout).
pub fn tls_stream(
    addr: SocketAddr,
    ca_pem: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    tcp.set_nodelay(true).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// A byte stream a client talks over: TCP, or TLS over TCP.
pub trait Duplex: Read + Write + Send {}
impl<T: Read + Write + Send> Duplex for T {}

/// A blocking WebSocket client (masked frames, text JSON lines).
pub struct Ws {
    stream: Box<dyn Duplex>,
    /// The same socket as `stream` (or under its TLS), to set read timeouts.
    tcp: TcpStream,
    /// Whether the connection ended (EOF or an error other than a timeout).
    eof: bool,
    /// Whether the server's pings (`{}`) are answered (with `{}`) as they
    /// are read, as every SDK does, instead of being handed to the test.
    answer_pings: bool,
    decoder: Decoder,
    buf: BytesMut,
    queue: std::collections::VecDeque<Event>,
    next_id: u32,
    /// Frames received so far.
    pub frames: usize,
    /// Of those, the compressed ones (RSV1, permessage-deflate).
    pub compressed: usize,
    /// What the server agreed to for permessage-deflate.
    pub deflate: Option<DeflateParams>,
    inflater: Inflater,
    next_compressed: bool,
}

impl Ws {
    /// Upgrades a connection; `Err` carries a refusal (status, Retry-After).
    pub fn connect(addr: SocketAddr, path: &str) -> Result<Ws, ClientHandshakeError> {
        Self::connect_with(addr, path, false)
    }

    /// Like [`connect`](Self::connect), offering permessage-deflate when
    /// `deflate` (the caller then sends compressed frames by hand).
    pub fn connect_with(addr: SocketAddr, path: &str, deflate: bool) -> Result<Ws, ClientHandshakeError> {
        Self::connect_with_headers(addr, path, deflate, &[])
    }

    /// Like [`connect_with`](Self::connect_with), with extra headers in the
    /// upgrade request (cookies, authorization, ...).
    pub fn connect_with_headers(
        addr: SocketAddr,
        path: &str,
        deflate: bool,
        headers: &[(&str, &str)],
    ) -> Result<Ws, ClientHandshakeError> {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let tcp = stream.try_clone().unwrap();
        Self::upgrade_over(Box::new(stream), tcp, addr, path, deflate, headers)
    }

    /// Connects over TLS (wss), trusting the CA in `ca_pem` for the name
    /// `localhost`.
    pub fn connect_tls(addr: SocketAddr, path: &str, ca_pem: &Path) -> Result<Ws, ClientHandshakeError> {
        let stream = tls_stream(addr, ca_pem);
        let tcp = stream.sock.try_clone().unwrap();
        Self::upgrade_over(Box::new(stream), tcp, addr, path, false, &[])
    }

    fn upgrade_over(
        mut stream: Box<dyn Duplex>,
        tcp: TcpStream,
        addr: SocketAddr,
        path: &str,
        deflate: bool,
        headers: &[(&str, &str)],
    ) -> Result<Ws, ClientHandshakeError> {
        let (mut req, hs) = client::request(&addr.to_string(), path, rand::random(), &[], deflate);
        // The request ends with its empty line: the extra headers go before it.
        req.truncate(req.len() - 2);
        for (name, value) in headers {
            req.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        stream.write_all(&req).unwrap();
        let mut buf = BytesMut::new();
        let mut chunk = [0u8; 4096];
        let accepted = loop {
            if let Some((accepted, n)) = hs.parse_response(&buf)? {
                let _ = buf.split_to(n);
                break accepted;
            }
            let n = stream.read(&mut chunk).unwrap_or(0);
            if n == 0 {
                return Err(ClientHandshakeError::Invalid("connection closed during upgrade"));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        Ok(Ws {
            stream,
            tcp,
            eof: false,
            answer_pings: true,
            decoder: Decoder::new(DecoderConfig {
                deflate: accepted.deflate.is_some(),
                ..DecoderConfig::client()
            }),
            buf,
            queue: Default::default(),
            next_id: 1,
            frames: 0,
            compressed: 0,
            deflate: accepted.deflate,
            inflater: Inflater::new(),
            next_compressed: false,
        })
    }

    /// Whether to answer the server's pings by itself (the default, as an
    /// SDK does; a long test would otherwise be closed with 3012 no pong) or
    /// hand them over as `Event::Json({})`, unanswered.
    pub fn set_answer_pings(&mut self, answer: bool) {
        self.answer_pings = answer;
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// Sends one masked frame.
    pub fn send_frame(&mut self, opcode: OpCode, payload: &[u8]) {
        let mut out = Vec::new();
        encode_frame(&mut out, true, opcode, payload, Some(rand::random()));
        self.send_raw(&out);
    }

    /// Sends a JSON text frame.
    pub fn send_json(&mut self, v: &Value) {
        self.send_frame(OpCode::Text, v.to_string().as_bytes());
    }

    /// Sends a command with the next id and waits for its reply (pushes that
    /// arrive meanwhile stay queued for [`next_event`](Self::next_event)).
    pub fn call(&mut self, mut cmd: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = id.into();
        self.send_json(&cmd);
        let end = Instant::now() + READ_TIMEOUT;
        let mut stash = Vec::new();
        let result = loop {
            match self.next_by(end) {
                Next::Event(Event::Json(v)) if v["id"] == id => break v,
                Next::Event(Event::Closed(code, reason)) => {
                    panic!("closed ({code:?} {reason:?}) before the reply to {cmd}")
                }
                Next::Event(e) => stash.push(e),
                Next::Deadline => panic!("no reply to {cmd} within {READ_TIMEOUT:?}"),
                Next::Eof => panic!("the connection ended before the reply to {cmd}"),
            }
        };
        for e in stash.into_iter().rev() {
            self.queue.push_front(e);
        }
        result
    }

    /// The next event (bounded by the 10 s read timeout); `None` on EOF or
    /// timeout (see [`ended`](Self::ended) to tell them apart, or use
    /// [`next_by`](Self::next_by)).
    pub fn next_event(&mut self) -> Option<Event> {
        match self.next_by(Instant::now() + READ_TIMEOUT) {
            Next::Event(e) => Some(e),
            Next::Deadline | Next::Eof => None,
        }
    }

    /// Reads for `wait`, answering the server's pings and keeping every
    /// other event queued for [`next_event`](Self::next_event): a test that
    /// waits on something else for longer than the ping interval keeps the
    /// session alive as an SDK would.
    pub fn serve_pings(&mut self, wait: Duration) {
        let end = Instant::now() + wait;
        let mut stash = Vec::new();
        while let Next::Event(e) = self.read_event(end) {
            stash.push(e);
        }
        self.queue.extend(stash);
    }

    /// The next event, or why none came before `end`: the deadline passed,
    /// or the connection ended without a close frame.
    pub fn next_by(&mut self, end: Instant) -> Next {
        if let Some(e) = self.queue.pop_front() {
            return Next::Event(e);
        }
        self.read_event(end)
    }

    /// The next event before `end`, `None` once `end` passes. An ended
    /// connection (EOF or reset, no close frame) is a failure: it panics,
    /// naming `watching`.
    pub fn event_by(&mut self, end: Instant, watching: &str) -> Option<Event> {
        match self.next_by(end) {
            Next::Event(e) => Some(e),
            Next::Deadline => None,
            Next::Eof => panic!("the connection ended (no close frame) while waiting for {watching}"),
        }
    }

    /// Puts events back at the front of what [`next_event`](Self::next_event)
    /// returns, in their order (a test that looked for one event hands the
    /// others on).
    pub fn put_back(&mut self, events: Vec<Event>) {
        for e in events.into_iter().rev() {
            self.queue.push_front(e);
        }
    }

    /// Whether the connection has ended (EOF or reset).
    pub fn ended(&self) -> bool {
        self.eof
    }

    /// The next push of a channel's publication, skipping pings.
    pub fn next_pub(&mut self) -> Option<Value> {
        loop {
            match self.next_event()? {
                Event::Json(v) if v.get("push").is_some() => return Some(v),
                Event::Json(_) => continue,
                other => panic!("expected a push, got {other:?}"),
            }
        }
    }

    /// Waits (15 s at most) for the close frame, skipping everything
    /// before it; returns its code (`None`: a close frame without one).
    /// Panics when the connection ends without a close frame or none comes.
    pub fn expect_close(&mut self) -> Option<u16> {
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            match self.event_by(end, "a close frame") {
                Some(Event::Closed(code, _)) => return code,
                Some(_) => continue,
                None => panic!("no close frame within 15 s"),
            }
        }
    }

    fn read_event(&mut self, end: Instant) -> Next {
        let mut chunk = [0u8; 65536];
        loop {
            if self.decoder.is_idle()
                && let Some(b0) = self.buf.first()
            {
                self.next_compressed = b0 & 0x40 != 0;
            }
            match self.decoder.decode_with(&mut self.buf, Some(&mut self.inflater)) {
                Ok(Some(Message::Text(t))) => {
                    self.frames += 1;
                    self.compressed += usize::from(self.next_compressed);
                    for line in t.split(|b| *b == b'\n') {
                        let v: Value = serde_json::from_slice(line).expect("server sent invalid JSON");
                        if self.answer_pings && v == Value::Object(Default::default()) {
                            self.send_frame(OpCode::Text, b"{}");
                            continue;
                        }
                        self.queue.push_back(Event::Json(v));
                    }
                    match self.queue.pop_front() {
                        Some(e) => return Next::Event(e),
                        None => continue, // only pings, answered
                    }
                }
                Ok(Some(Message::Binary(_))) => return Next::Event(Event::Binary),
                Ok(Some(Message::Close(c))) => {
                    let (code, reason) = c.map(|c| (Some(c.code), c.reason)).unwrap_or((None, String::new()));
                    return Next::Event(Event::Closed(code, reason));
                }
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => panic!("server broke the framing: {e}"),
            }
            if self.eof {
                return Next::Eof;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Deadline;
            }
            // The socket's read timeout is per socket: it holds for the TLS
            // stream over it too. A timed-out read leaves the decoder and
            // TLS state as they were, so the next read resumes.
            self.tcp.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.eof = true,
            }
        }
    }
}

/// How waiting for a client's next event ended ([`Ws::next_by`]).
#[derive(Debug)]
pub enum Next {
    /// An event arrived.
    Event(Event),
    /// The deadline passed first.
    Deadline,
    /// The connection ended (EOF or reset) without a close frame.
    Eof,
}

/// Polls `value` (every 50 ms) until `done` holds for it, for at most
/// `within`; returns the value that satisfied it. Panics with `what` and the
/// last value otherwise. For counts and states that some event moves (a
/// metric, a gauge, an HTTP answer), never for elapsed time.
pub fn wait_until<T: std::fmt::Debug>(
    within: Duration,
    what: &str,
    mut value: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let end = Instant::now() + within;
    loop {
        let v = value();
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < end, "{what}: still {v:?} after {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The (epoch, offset) an API publish answer acknowledges, if it does.
fn acknowledged(v: &Value) -> Option<(String, u64)> {
    Some((v["result"]["epoch"].as_str()?.to_owned(), v["result"]["offset"].as_u64()?))
}

/// What was published, per channel, epoch and offset, as the router
/// answered each publish: what every received publication is checked
/// against ([`StreamCheck::verify`]).
#[derive(Debug, Default)]
pub struct Published {
    log: std::collections::HashMap<(String, String, u64), Value>,
}

impl Published {
    /// Publishes `data` on `channel` through the HTTP API at `api` and
    /// records it; returns its offset.
    pub fn publish(&mut self, api: SocketAddr, channel: &str, data: Value) -> u64 {
        let body = serde_json::json!({"channel": channel, "data": data}).to_string();
        let (st, out) = http_request(api, "POST", "/api/publish", &[("X-API-Key", API_KEY)], &body);
        assert_eq!(st, 200, "{out}");
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let (epoch, offset) = acknowledged(&v).unwrap_or_else(|| panic!("{v}"));
        let earlier = self.log.insert((channel.to_owned(), epoch, offset), data);
        assert!(earlier.is_none(), "the router gave one offset twice: {v}");
        offset
    }

    /// Publishes `data` on `channel` through the HTTP API at `api` with an
    /// idempotency key; records it and returns `(epoch, offset)` when the
    /// router acknowledged it, or the answer when it refused (an error in the
    /// body). Fails on a second acknowledgement of one position.
    pub fn try_publish(
        &mut self,
        api: SocketAddr,
        channel: &str,
        data: Value,
        key: &str,
    ) -> Result<(String, u64), Value> {
        let body = serde_json::json!({"channel": channel, "data": data, "idempotency_key": key}).to_string();
        let (st, out) = http_request(api, "POST", "/api/publish", &[("X-API-Key", API_KEY)], &body);
        assert_eq!(st, 200, "{out}");
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let Some((epoch, offset)) = acknowledged(&v) else { return Err(v) };
        let earlier = self.log.insert((channel.to_owned(), epoch.clone(), offset), data.clone());
        assert!(earlier.is_none_or(|e| e == data), "the router gave one offset twice: {v}");
        Ok((epoch, offset))
    }

    /// Records a publication acknowledged elsewhere (another client of the
    /// API) at `epoch`/`offset`. Fails on a second one at that position.
    pub fn record(&mut self, channel: &str, epoch: &str, offset: u64, data: Value) {
        let earlier = self.log.insert((channel.to_owned(), epoch.to_owned(), offset), data);
        assert!(earlier.is_none(), "the router gave {channel} {epoch}/{offset} twice");
    }

    /// Every acknowledged position of `channel`: (epoch, offset).
    pub fn positions(&self, channel: &str) -> Vec<(String, u64)> {
        let mut p: Vec<_> =
            self.log.keys().filter(|(c, _, _)| c == channel).map(|(_, e, o)| (e.clone(), *o)).collect();
        p.sort();
        p
    }

    /// What was published at this position, if anything.
    pub fn get(&self, channel: &str, epoch: &str, offset: u64) -> Option<&Value> {
        self.log.get(&(channel.to_owned(), epoch.to_owned(), offset))
    }

    /// The highest offset published in this channel's epoch (0: none).
    pub fn top(&self, channel: &str, epoch: &str) -> u64 {
        self.log.keys().filter(|(c, e, _)| c == channel && e == epoch).map(|k| k.2).max().unwrap_or(0)
    }
}

/// One publication a client received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The epoch the client was positioned in when it came.
    pub epoch: String,
    /// Its offset.
    pub offset: u64,
    /// Its data.
    pub data: Value,
    /// Whether it came in a subscribe reply (recovered) rather than live.
    pub recovered: bool,
}

/// One client's whole view of one channel's stream, checked as it arrives
/// (invariant 3): from the position of the subscribe reply, each
/// publication's offset is the previous one plus one (each once, in order,
/// no gap); a reconnect either recovers every missed offset (the
/// publications in the subscribe reply, then live pushes go on from there)
/// or is told explicitly that the position is lost (`was_recovering` without
/// `recovered`), and then continuity is checked from the new position.
/// [`verify`](Self::verify) compares every payload with what was published
/// at its offset.
#[derive(Debug)]
pub struct StreamCheck {
    /// The channel.
    pub channel: String,
    /// The epoch the client is positioned in.
    pub epoch: String,
    /// The client's position: the last offset received, or where a
    /// subscribe reply put it.
    pub offset: u64,
    /// Everything received, live and recovered, in arrival order.
    pub received: Vec<Received>,
    /// Times a resubscribe was told `recovered: false` (an explicit gap).
    pub unrecovered: u32,
    /// Times a resubscribe recovered.
    pub recoveries: u32,
}

/// How long a [`StreamCheck`] waits for what it is told to wait for.
const STREAM_WAIT: Duration = Duration::from_secs(30);

/// What stopped a [`StreamCheck`] from reading.
enum Stop {
    /// Reached the wanted offset.
    Through,
    /// A close frame with this code.
    Closed(Option<u16>),
    /// An `unsubscribe` push for the channel with this code.
    Unsubscribed(u64),
    /// The connection ended without a close frame.
    Eof,
}

impl StreamCheck {
    /// Subscribes `ws` to `channel` (retrying temporary errors, 30 s) and
    /// starts checking from the position in the reply.
    pub fn subscribe(ws: &mut Ws, channel: &str) -> StreamCheck {
        let r = call_retrying(ws, serde_json::json!({"subscribe": {"channel": channel}}));
        Self::from_reply(channel, &r)
    }

    /// Starts checking from a successful subscribe reply (which must
    /// position the client: an epoch and an offset).
    pub fn from_reply(channel: &str, reply: &Value) -> StreamCheck {
        assert!(reply.get("error").is_none(), "{reply}");
        let sub = &reply["subscribe"];
        let epoch = sub["epoch"].as_str().unwrap_or_else(|| panic!("not positioned: {reply}"));
        let mut s = StreamCheck {
            channel: channel.to_owned(),
            epoch: epoch.to_owned(),
            offset: sub["offset"].as_u64().unwrap_or(0),
            received: Vec::new(),
            unrecovered: 0,
            recoveries: 0,
        };
        for p in sub["publications"].as_array().into_iter().flatten() {
            s.apply(p, true);
        }
        s
    }

    /// A subscribe command recovering from the client's position.
    pub fn recover_command(&self) -> Value {
        serde_json::json!({"subscribe": {
            "channel": self.channel, "recover": true, "epoch": self.epoch, "offset": self.offset,
        }})
    }

    /// Checks one live publication (a push's `pub`).
    pub fn publication(&mut self, p: &Value) {
        self.apply(p, false);
    }

    fn apply(&mut self, p: &Value, recovered: bool) {
        let offset = p["offset"].as_u64().unwrap_or_else(|| panic!("{}: no offset: {p}", self.channel));
        assert_eq!(
            offset,
            self.offset + 1,
            "{}: after offset {} came {offset} ({}): a gap, duplicate or reordering; so far {:?}",
            self.channel,
            self.offset,
            if recovered { "recovered" } else { "live" },
            self.offsets()
        );
        self.offset = offset;
        self.received.push(Received {
            epoch: self.epoch.clone(),
            offset,
            data: p["data"].clone(),
            recovered,
        });
    }

    /// Checks the reply to [`recover_command`](Self::recover_command):
    /// either recovered (same epoch; its publications continue the stream
    /// exactly) or explicitly not (`was_recovering` without `recovered`,
    /// no publications; the stream goes on from the reply's position).
    /// Returns whether it recovered.
    pub fn resubscribed(&mut self, reply: &Value) -> bool {
        assert!(reply.get("error").is_none(), "{}: {reply}", self.channel);
        let sub = &reply["subscribe"];
        assert_eq!(sub["was_recovering"], true, "{}: {reply}", self.channel);
        if sub["recovered"] == true {
            assert_eq!(
                sub["epoch"],
                self.epoch.as_str(),
                "{}: recovered across epochs: {reply}",
                self.channel
            );
            for p in sub["publications"].as_array().into_iter().flatten() {
                self.apply(p, true);
            }
            self.recoveries += 1;
            true
        } else {
            assert!(sub.get("recovered").is_none() || sub["recovered"] == false, "{}: {reply}", self.channel);
            let none = sub.get("publications").is_none_or(|p| p.as_array().is_some_and(Vec::is_empty));
            assert!(none, "{}: publications with recovered:false: {reply}", self.channel);
            self.epoch =
                sub["epoch"].as_str().unwrap_or_else(|| panic!("not positioned: {reply}")).to_owned();
            self.offset = sub["offset"].as_u64().unwrap_or(0);
            self.unrecovered += 1;
            false
        }
    }

    /// Sends [`recover_command`](Self::recover_command) on `ws` (retrying
    /// temporary errors, 30 s) and checks the reply; returns whether it
    /// recovered.
    pub fn resubscribe(&mut self, ws: &mut Ws) -> bool {
        let r = call_retrying(ws, self.recover_command());
        self.resubscribed(&r)
    }

    /// Reads `ws` until the stream reaches `offset` (30 s at most). Fails on
    /// a close, an ended connection, or an `unsubscribe` of the channel.
    pub fn receive_through(&mut self, ws: &mut Ws, offset: u64) {
        match self.pump(ws, Some(offset)) {
            Stop::Through => {}
            Stop::Closed(code) => panic!("{}: closed ({code:?}) at offset {}", self.channel, self.offset),
            Stop::Unsubscribed(code) => panic!("{}: unsubscribed ({code}) at {}", self.channel, self.offset),
            Stop::Eof => panic!("{}: the connection ended at offset {}", self.channel, self.offset),
        }
    }

    /// Like [`receive_through`](Self::receive_through), resubscribing with
    /// recovery (as an SDK does) whenever the server says `unsubscribe`
    /// 2500 (insufficient state: resubscribe) for the channel; each
    /// resubscribe is checked by [`resubscribed`](Self::resubscribed) and
    /// counted in `recoveries` or `unrecovered`. Returns the number of 2500s.
    pub fn receive_through_resyncing(&mut self, ws: &mut Ws, offset: u64) -> u32 {
        let mut told = 0;
        loop {
            match self.pump(ws, Some(offset)) {
                Stop::Through => return told,
                Stop::Unsubscribed(2500) => {
                    told += 1;
                    self.resubscribe(ws);
                }
                Stop::Unsubscribed(code) => {
                    panic!("{}: unsubscribed ({code}) at {}", self.channel, self.offset)
                }
                Stop::Closed(code) => panic!("{}: closed ({code:?}) at offset {}", self.channel, self.offset),
                Stop::Eof => panic!("{}: the connection ended at offset {}", self.channel, self.offset),
            }
        }
    }

    /// Reads `ws`, checking every publication, until its close frame;
    /// returns the code. Fails on an ended connection without a close
    /// frame, an `unsubscribe` of the channel, or no close in 30 s.
    pub fn receive_until_close(&mut self, ws: &mut Ws) -> Option<u16> {
        match self.pump(ws, None) {
            Stop::Closed(code) => code,
            Stop::Unsubscribed(code) => panic!("{}: unsubscribed ({code}), not closed", self.channel),
            Stop::Eof => panic!("{}: the connection ended without a close frame", self.channel),
            Stop::Through => unreachable!(),
        }
    }

    /// Reads `ws`, checking every publication, until an `unsubscribe` push
    /// of the channel; returns its code. Fails on a close or an ended
    /// connection.
    pub fn receive_until_unsubscribed(&mut self, ws: &mut Ws) -> u64 {
        match self.pump(ws, None) {
            Stop::Unsubscribed(code) => code,
            Stop::Closed(code) => panic!("{}: closed ({code:?}), not unsubscribed", self.channel),
            Stop::Eof => panic!("{}: the connection ended before an unsubscribe", self.channel),
            Stop::Through => unreachable!(),
        }
    }

    /// Reads `ws`, checking every publication, until the connection ends
    /// without a close frame (the server process died). Fails on a close
    /// frame or an `unsubscribe`.
    pub fn receive_until_ended(&mut self, ws: &mut Ws) {
        match self.pump(ws, None) {
            Stop::Eof => {}
            Stop::Closed(code) => panic!("{}: a close frame ({code:?}) from a dead server", self.channel),
            Stop::Unsubscribed(code) => panic!("{}: unsubscribed ({code})", self.channel),
            Stop::Through => unreachable!(),
        }
    }

    /// Reads `ws` until `through` (or a close, an `unsubscribe` of the
    /// channel, an ended connection). Other channels' pushes and pings stay
    /// queued on `ws`, in order, for whoever reads next.
    fn pump(&mut self, ws: &mut Ws, through: Option<u64>) -> Stop {
        let mut others = Vec::new();
        let stop = self.pump_into(ws, through, &mut others);
        ws.put_back(others);
        stop
    }

    fn pump_into(&mut self, ws: &mut Ws, through: Option<u64>, others: &mut Vec<Event>) -> Stop {
        let end = Instant::now() + STREAM_WAIT;
        loop {
            if through.is_some_and(|t| self.offset >= t) {
                return Stop::Through;
            }
            let ev = match ws.next_by(end) {
                Next::Event(e) => e,
                Next::Eof => return Stop::Eof,
                Next::Deadline => panic!(
                    "{}: nothing more within {STREAM_WAIT:?} (at offset {}, waiting for {through:?})",
                    self.channel, self.offset
                ),
            };
            let v = match ev {
                Event::Json(v) => v,
                Event::Closed(code, _) => return Stop::Closed(code),
                Event::Binary => panic!("{}: a binary frame", self.channel),
            };
            let push = &v["push"];
            if push["channel"] != self.channel.as_str() {
                others.push(Event::Json(v));
                continue;
            }
            if let Some(p) = push.get("pub") {
                self.publication(p);
            } else if let Some(code) = push["unsubscribe"]["code"].as_u64() {
                return Stop::Unsubscribed(code);
            }
        }
    }

    /// The offsets received, in order.
    pub fn offsets(&self) -> Vec<u64> {
        self.received.iter().map(|r| r.offset).collect()
    }

    /// The data received, in order.
    pub fn data(&self) -> Vec<Value> {
        self.received.iter().map(|r| r.data.clone()).collect()
    }

    /// Checks every received payload against what was published at its
    /// epoch and offset.
    pub fn verify_payloads(&self, published: &Published) {
        for r in &self.received {
            let sent = published.get(&self.channel, &r.epoch, r.offset);
            assert_eq!(sent, Some(&r.data), "{}: payload at {} offset {}", self.channel, r.epoch, r.offset);
        }
    }

    /// [`verify_payloads`](Self::verify_payloads), and the client holds
    /// everything published in its current epoch (its position is that
    /// epoch's top).
    pub fn verify(&self, published: &Published) {
        self.verify_payloads(published);
        assert_eq!(
            self.offset,
            published.top(&self.channel, &self.epoch),
            "{}: the client is not at the top of its epoch {}",
            self.channel,
            self.epoch
        );
    }
}

/// Sends `cmd` with [`Ws::call`], retrying (every 200 ms, 30 s at most)
/// while the answer is a temporary error (the gateway has no router link
/// yet, or the owner is moving); returns the first other answer.
pub fn call_retrying(ws: &mut Ws, cmd: Value) -> Value {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let r = ws.call(cmd.clone());
        if r["error"]["temporary"] != true {
            return r;
        }
        assert!(Instant::now() < end, "still a temporary error after 30 s: {cmd} → {r}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
