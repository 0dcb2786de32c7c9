//! The orchestrator side: worker processes, the HTTP publisher, and the
//! processes the demo starts (router, gateways), all from this one binary.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::checker::PublishedLog;
use crate::worker::{Summary, WorkerSpec, decode_hist};

/// Most clients one worker process (or gateway process) holds, whatever
/// the open-file limit allows.
pub const MAX_PER_PROCESS: usize = 15_000;

/// Clients one process holds here: [`MAX_PER_PROCESS`], or less when the
/// open-file limit (raised to the hard limit at start: see `main`) does not
/// allow that many.
pub fn per_process() -> usize {
    let limit = gateway::process::raise_open_files();
    (gateway::process::connections_for(limit) as usize).min(MAX_PER_PROCESS)
}

/// What the orchestrator knows of one worker.
#[derive(Debug, Default, Clone)]
pub struct WorkerState {
    /// Clients connected.
    pub connected: u64,
    /// 503s seen.
    pub rejected: u64,
    /// Clients given up.
    pub failed: u64,
    /// Publications received.
    pub deliveries: u64,
    /// Clients connected right now.
    pub online: u64,
    /// Reconnects so far.
    pub reconnects: u64,
    /// Latency of the deliveries in the last progress window: (p50 µs, p99 µs, count).
    pub window: (u64, u64, u64),
    /// Latency (µs) of the deliveries since the orchestrator last took it:
    /// every progress window added up, so none is missed between samples.
    pub pending_window: Option<Histogram<u64>>,
    /// Deliveries of each phase tag's publications so far, and when the
    /// latest arrived (µs since the Unix epoch).
    pub phase_deliveries: Vec<u64>,
    /// See `phase_deliveries`.
    pub phase_last_us: Vec<u64>,
    /// Clients subscribing to each channel (told once every client was
    /// attempted; not for chat's channels).
    pub subscribers: HashMap<String, u64>,
    /// Every client attempted.
    pub ready: bool,
    /// The final report.
    pub summary: Option<Summary>,
}

/// How long the orchestrator waits, after `stop`, for the workers'
/// summaries (all of them together); a worker that has not reported by then
/// is killed and its clients are counted as unreported.
pub const SUMMARY_WAIT: Duration = Duration::from_secs(90);

/// A running worker process.
pub struct Worker {
    /// Clients it runs.
    pub connections: usize,
    child: Child,
    stdin: Option<ChildStdin>,
    /// Its live state.
    pub state: Arc<Mutex<WorkerState>>,
}

impl Worker {
    /// Starts `loadgen worker` with this spec.
    pub fn spawn(spec: &WorkerSpec) -> anyhow::Result<Worker> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("worker")
            .arg(serde_json::to_string(spec)?)
            // The load generator's own memory: freed pages go back to the
            // OS at once (a storm's handshake buffers would otherwise stay
            // resident: 7.8 vs 5.4 KB per idle client at peak).
            .env("MIMALLOC_PURGE_DELAY", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let state = Arc::new(Mutex::new(WorkerState::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                let mut s = st.lock().expect("worker state");
                if let Some(p) = v.get("progress") {
                    s.connected = p["connected"].as_u64().unwrap_or(0);
                    s.rejected = p["rejected"].as_u64().unwrap_or(0);
                    s.failed = p["failed"].as_u64().unwrap_or(0);
                    s.deliveries = p["deliveries"].as_u64().unwrap_or(0);
                    s.online = p["online"].as_u64().unwrap_or(0);
                    s.reconnects = p["reconnects"].as_u64().unwrap_or(0);
                    let w = &p["window"];
                    s.window = (
                        w["p50_us"].as_u64().unwrap_or(0),
                        w["p99_us"].as_u64().unwrap_or(0),
                        w["count"].as_u64().unwrap_or(0),
                    );
                    let numbers = |k: &str| -> Vec<u64> {
                        p[k].as_array()
                            .map_or(Vec::new(), |a| a.iter().map(|n| n.as_u64().unwrap_or(0)).collect())
                    };
                    s.phase_deliveries = numbers("phase_deliveries");
                    s.phase_last_us = numbers("phase_last_us");
                    if let Some(h) = w["hist"].as_str().filter(|h| !h.is_empty()).and_then(decode_hist) {
                        match s.pending_window.as_mut() {
                            Some(acc) => {
                                let _ = acc.add(&h);
                            }
                            None => s.pending_window = Some(h),
                        }
                    }
                } else if v.get("ready").is_some() {
                    s.ready = true;
                    if let Ok(subs) = serde_json::from_value(v["subscribers"].clone()) {
                        s.subscribers = subs;
                    }
                } else if let Some(sum) = v.get("summary") {
                    s.summary = serde_json::from_value(sum.clone()).ok();
                }
            }
        });
        Ok(Worker { connections: spec.connections, child, stdin, state })
    }

    /// CPU seconds (user + system) the worker process used so far, from /proc.
    pub fn cpu_secs(&self) -> f64 {
        proc_cpu_secs(self.child.id())
    }

    /// Tells the worker's clients to stop publishing (chat); they keep reading.
    pub fn quiet(&mut self) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = writeln!(stdin, "{}", serde_json::json!({ "quiet": true }));
            let _ = stdin.flush();
        }
    }

    /// Tells the worker to finish once its subscriptions reach `tops`
    /// (channel → final offset and its epoch); `published` is what was
    /// published at each offset, for the payload check (empty when the
    /// publisher could not tell offsets).
    pub fn stop(&mut self, tops: &HashMap<String, (u64, String)>, published: &PublishedLog) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = writeln!(stdin, "{}", serde_json::json!({ "stop": tops, "published": published }));
            let _ = stdin.flush();
        }
    }

    /// Waits until `by` at most for the worker's summary.
    pub fn finish(mut self, by: Instant) -> Option<Summary> {
        while Instant::now() < by {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(50));
        self.state.lock().expect("worker state").summary.clone()
    }
}

/// Where a started server's log goes.
#[derive(Debug, Clone)]
pub enum ServerLog {
    /// Nowhere (warnings and errors included): the report is the output.
    Quiet,
    /// This process's stderr, at `info`.
    Inherit,
    /// `<dir>/<name>.log`, at `info` (appended: a restarted router's
    /// lines follow its first life's).
    Dir(std::path::PathBuf),
}

/// A server process started by the demo, terminated on drop.
pub struct ServerProc {
    /// The process.
    pub child: Child,
    /// What it is ("router", "gateway-0", …).
    pub name: String,
}

impl ServerProc {
    /// Starts `loadgen <args>` (the embedded router or gateway), its log
    /// going where `log` says.
    pub fn spawn(name: &str, args: &[String], log: &ServerLog) -> anyhow::Result<ServerProc> {
        let (level, stderr) = match log {
            ServerLog::Quiet => ("warn", Stdio::null()),
            ServerLog::Inherit => ("info", Stdio::inherit()),
            ServerLog::Dir(dir) => {
                let path = dir.join(format!("{name}.log"));
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
                ("info", Stdio::from(file))
            }
        };
        let child = Command::new(std::env::current_exe()?)
            .args(args)
            .env("RUST_LOG", level)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()?;
        Ok(ServerProc { child, name: name.to_owned() })
    }

    /// Sends `sig` (SIGTERM: drain, SIGKILL: crash) without waiting.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// Waits (bounded) for the process to exit; its exit code if it did.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Sends SIGTERM and waits (bounded) for the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        None
    }

    /// Whether the process has exited (a zombie not yet waited for counts).
    pub fn exited(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())) {
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))),
            Err(_) => true,
        }
    }

    /// CPU seconds used so far (user + system), from /proc.
    pub fn cpu_secs(&self) -> f64 {
        proc_cpu_secs(self.child.id())
    }

    /// Resident memory in bytes, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds of a process from /proc/<pid>/stat.
pub fn proc_cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is [0]; utime [11], stime [12].
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

/// A keep-alive HTTP/1.1 client for the router's server API.
pub struct ApiClient {
    addr: SocketAddr,
    key: String,
    conn: Option<TcpStream>,
}

impl ApiClient {
    /// A client for `addr` using `key`.
    pub fn new(addr: SocketAddr, key: &str) -> Self {
        ApiClient { addr, key: key.to_owned(), conn: None }
    }

    /// `POST /api/<method>`; returns the parsed JSON body.
    pub fn call(&mut self, method: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        for _ in 0..2 {
            if self.conn.is_none() {
                let s = TcpStream::connect(self.addr)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                self.conn = Some(s);
            }
            match self.try_call(method, body) {
                Ok(v) => return Ok(v),
                Err(_) => self.conn = None,
            }
        }
        anyhow::bail!("API call {method} failed")
    }

    fn try_call(&mut self, method: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let s = self.conn.as_mut().expect("connected");
        let body = body.to_string();
        let req = format!(
            "POST /api/{method} HTTP/1.1\r\nHost: switchyard\r\nX-API-Key: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.key,
            body.len()
        );
        s.write_all(req.as_bytes())?;
        // Read the head, then exactly Content-Length bytes.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte)? == 0 {
                anyhow::bail!("closed");
            }
            head.push(byte[0]);
            if head.len() > 16 * 1024 {
                anyhow::bail!("response head too large");
            }
        }
        let head = String::from_utf8_lossy(&head);
        let status: u16 = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        s.read_exact(&mut body)?;
        if status != 200 {
            anyhow::bail!("HTTP {status}");
        }
        Ok(serde_json::from_slice(&body)?)
    }
}

/// `GET path` on `addr` (an admin endpoint); the whole answer, if any.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// A Prometheus counter summed over its label sets.
pub fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Waits (bounded) until `GET /readyz` on `addr` answers 200.
pub fn wait_ready(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("{addr} never became ready")
}

/// A port that is free now on 127.0.0.1 (TCP and UDP), and not handed out
/// before by this process: the kernel may give a released port again at the
/// next bind to port 0, and two gateways told the same admin port leave one
/// of them dead at start while the other answers both readiness checks.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = l.local_addr().expect("addr").port();
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
            && GIVEN.lock().expect("ports given").get_or_insert_with(HashSet::new).insert(p)
        {
            return p;
        }
    }
}
