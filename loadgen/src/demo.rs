//! The one-command demo and the storm + fan-out scenario it runs.
//!
//! `loadgen demo` writes development certificates and secrets, starts a
//! router and as many gateway processes as the connection count needs (they
//! share one port with SO_REUSEPORT; each process stays under the open-file
//! limit), runs a storm of N clients subscribed to Zipf-sized channels, then
//! a capacity ramp ([`crate::ramp`]: short steps of rising publication
//! rates, each waited out and judged, until the box falls behind) and a
//! steady fan-out at 70 % of the capacity it found (or at `--rate`, which
//! skips the ramp). Every publication, the ramp's too, is timestamped,
//! numbered, tagged with its phase and sent through the HTTP API (recording
//! the offset each one got); the checker verifies that every subscriber got
//! every publication once, in order and with the payload published at that
//! offset ([`crate::checker`]). Then it prints the report (the ramp's steps,
//! the capacity, the steady rate and its latency), its verdict and the HTML
//! path, and drains everything.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;

use crate::checker::PublishedLog;
use crate::orchestrate::{self, ApiClient, ServerLog, ServerProc, Worker, per_process};
use crate::publisher::{ClientPublisher, Publisher};
use crate::ramp::{self, RampPlan, STEADY_FRACTION, Step, StepMeasure};

/// The highest first ramp rate taken (publications/s).
const MAX_FIRST_RAMP_RATE: f64 = 1_000.0;

/// The longest the steady fan-out after a ramp is planned to take.
const MAX_STEADY_SECS: f64 = 120.0;
use crate::report::{RunReport, Sample, Verdict};
use crate::worker::{ChatSpec, MAX_PHASES, WorkerSpec, latency_histogram, unix_micros};
use crate::zipf::Zipf;

/// Secrets of the development cluster.
pub const DEMO_SECRET: &str = "switchyard-demo-secret-long-enough-for-hs256";
/// The development API key.
pub const DEMO_API_KEY: &str = "switchyard-demo-key";

/// Demo options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Clients in the storm.
    #[arg(long, default_value_t = 50_000)]
    pub connections: usize,
    /// New connections per second (0: all at once).
    #[arg(long, default_value_t = 0.0)]
    pub storm_rate: f64,
    /// Channels (their sizes follow a Zipf distribution).
    #[arg(long, default_value_t = 20)]
    pub channels: usize,
    /// Zipf exponent of channel sizes.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Subscriptions per client.
    #[arg(long, default_value_t = 2)]
    pub subs_per_conn: usize,
    /// Publications in the fan-out.
    #[arg(long, default_value_t = 500)]
    pub publications: usize,
    /// Publications per second of the fan-out. Each reaches ~8,000 of the
    /// demo's 50,000 clients on average, so the rate sets the deliveries
    /// asked of the box. `demo` without it finds the rate with a capacity
    /// ramp (`--ramp-*`, [`crate::ramp`]: ~20 s of rising steps) and runs
    /// the steady fan-out at 70 % of the highest step the box kept up with;
    /// giving it skips the ramp. Other scenarios: 20 by default.
    #[arg(long)]
    pub rate: Option<f64>,
    /// `demo`: publications per second of the ramp's first step; each next
    /// step is 1.5× the one before.
    #[arg(long, default_value_t = 4.0)]
    pub ramp_first_rate: f64,
    /// `demo`: ramp steps at most (the first the box does not keep up with
    /// ends the ramp; at most 15).
    #[arg(long, default_value_t = 8)]
    pub ramp_steps: usize,
    /// `demo`: seconds of publishing per ramp step. Each step then waits
    /// for its deliveries (at most 2 s or a step's length) and half a
    /// second for the latency windows: shorter steps are quicker and
    /// noisier.
    #[arg(long, default_value_t = 2.0)]
    pub ramp_step_secs: f64,
    /// Keep the cluster running until Ctrl-C and print how to reach it.
    #[arg(long)]
    pub serve: bool,
    /// Turn the gateway's echo endpoint on (`/echo`).
    #[arg(long)]
    pub echo: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// HTML report path (default: reports/demo-<time>.html).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Threads per worker process.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Gateway WebSocket port (default: a free one).
    #[arg(long)]
    pub ws_port: Option<u16>,
    /// Router API port (default: a free one).
    #[arg(long)]
    pub api_port: Option<u16>,
    /// A gateway configuration file (TOML) for the local cluster's
    /// gateways, e.g. other `[admission]` settings; the report names it.
    /// Without it they run the gateway's defaults.
    #[arg(long)]
    pub gateway_config: Option<PathBuf>,
    /// A router config file (TOML) for the local cluster's router, e.g. a
    /// larger `max_channels` (every online user has a presence channel);
    /// without it the router runs its defaults.
    #[arg(long)]
    pub router_config: Option<PathBuf>,
    /// Keep the started router's and gateways' logs (at `info`) in this
    /// directory, one file each (`router.log`, `gateway-0.log`, ...);
    /// without it they log only with `--serve`, to the terminal.
    #[arg(long)]
    pub server_logs: Option<PathBuf>,
    /// Cores per gateway process.
    #[arg(long, default_value_t = 2)]
    pub gateway_cores: usize,
    /// Gateway processes at least (more when the connection count needs them;
    /// `reconnect-wave` runs at least two).
    #[arg(long, default_value_t = 1)]
    pub gateways: usize,
    /// Drive an existing gateway at this address instead of starting a local
    /// cluster (with `--api`; not for `reconnect-wave`, which signals the
    /// gateways it starts).
    #[arg(long, requires = "api")]
    pub ws: Option<SocketAddr>,
    /// The existing cluster's router HTTP API address (with `--ws`).
    #[arg(long, requires = "ws")]
    pub api: Option<SocketAddr>,
    /// API key of the existing cluster.
    #[arg(long, default_value = DEMO_API_KEY)]
    pub api_key: String,
    /// HMAC secret the existing cluster verifies connection tokens with.
    #[arg(long, default_value = DEMO_SECRET)]
    pub hmac_secret: String,
    /// Seconds of steady traffic (`soak`; publications = rate × duration).
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// `reconnect-wave`: crash (SIGKILL) instead of draining (SIGTERM).
    #[arg(long)]
    pub kill: bool,
    /// `reconnect-wave`: hit the router (then start it again) instead of a
    /// gateway: gateways reconnect, subscribers resync (new epoch).
    #[arg(long)]
    pub router: bool,
    /// Source addresses 127.0.0.2, 127.0.0.3, … the clients bind to, each good
    /// for ~28k ports (0: enough for the connection count).
    #[arg(long, default_value_t = 0)]
    pub source_ips: usize,
    /// `fanout`: while publishing, a storm of this many new connections (at
    /// `--storm-rate`, subscribed to a channel nobody publishes to), to see
    /// what a storm does to the established subscribers' latency.
    #[arg(long, default_value_t = 0)]
    pub storm_during: usize,
    /// Fan-out publications as a client through the gateway (the client
    /// `publish` command) instead of through the HTTP API.
    #[arg(long)]
    pub client_publish: bool,
    /// `storm`: clients only upgrade (no `connect`, no subscriptions) and
    /// count as online once they got the 101: the cost of the WebSocket
    /// upgrade alone, comparable with servers that measure just that.
    #[arg(long)]
    pub upgrade_only: bool,
    /// Clients offer permessage-deflate (and the local cluster's gateways
    /// accept it): publications reach them in the gateway's one compressed
    /// frame per publication and core.
    #[arg(long)]
    pub deflate: bool,
    /// Bytes of chat-like text added to each fan-out publication (0: just
    /// the timestamp and sequence number).
    #[arg(long, default_value_t = 0)]
    pub payload_bytes: usize,
    /// `chat`: workspaces.
    #[arg(long, default_value_t = 10)]
    pub workspaces: usize,
    /// `chat`: channels per workspace (sizes Zipf-distributed by `--zipf`).
    #[arg(long, default_value_t = 20)]
    pub channels_per_workspace: usize,
    /// `chat`: channels each user belongs to.
    #[arg(long, default_value_t = 5)]
    pub channels_per_user: usize,
    /// `chat`: fraction of the members online (the clients are the online ones).
    #[arg(long, default_value_t = 0.5)]
    pub online: f64,
    /// `chat`: users whose presence each client watches.
    #[arg(long, default_value_t = 10)]
    pub presence_view: usize,
    /// `chat`: one client in this many sends messages.
    #[arg(long, default_value_t = 10)]
    pub active_every: usize,
    /// `chat`: messages per minute per active user.
    #[arg(long, default_value_t = 6.0)]
    pub msgs_per_min: f64,
    /// `chat`: typing events before each message.
    #[arg(long, default_value_t = 2)]
    pub typing_per_msg: usize,
    /// `chat`: channel joins per second, done as the backend does them (the
    /// server API's `subscribe` for a user: every device of the user gets
    /// the channel at once); each is left (`unsubscribe`) `--join-secs`
    /// later. 0: none.
    #[arg(long, default_value_t = 2.0)]
    pub joins_per_sec: f64,
    /// `chat`: seconds a joined channel is kept before the leave.
    #[arg(long, default_value_t = 3.0)]
    pub join_secs: f64,
}

/// Publications per second of every scenario but `demo` when `--rate` is
/// not given.
pub const DEFAULT_RATE: f64 = 20.0;

/// The ramp stops starting new steps after this long (the steps' own
/// bounds keep each one short).
const RAMP_BUDGET: Duration = Duration::from_secs(30);

/// `chat`: channels per workspace that users join and leave during the run
/// (`chat:w<W>-join<J>`; nobody subscribes to them by themselves).
const JOIN_CHANNELS: usize = 4;

/// What a run does after the storm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Storm + fan-out on a local cluster (the README's main job).
    Demo,
    /// Connections only: connect, upgrade and connect-reply latency, rejections.
    Storm,
    /// Storm, then `publications` at `rate` through the HTTP API.
    Fanout,
    /// Fan-out while one gateway is drained (or killed): the reconnect curve,
    /// the survivors' peak handshake rate, and recovery.
    ReconnectWave,
    /// Fan-out at a steady rate for `duration` seconds.
    Soak,
    /// A Slack-like day for `duration` seconds: client messages with typing
    /// events, presence in view, read-state on personal channels (`rate`/s
    /// from the backend).
    Chat,
}

impl Scenario {
    fn title(self) -> &'static str {
        match self {
            Scenario::Demo => "demo (storm + fan-out)",
            Scenario::Storm => "storm",
            Scenario::Fanout => "fan-out",
            Scenario::ReconnectWave => "reconnect wave",
            Scenario::Soak => "soak",
            Scenario::Chat => "chat",
        }
    }
}

/// Where the clients go.
struct Target {
    ws_addr: SocketAddr,
    api_addr: SocketAddr,
    api_key: String,
    secret: String,
}

struct Cluster {
    _dir: TempDir,
    router: ServerProc,
    /// The router's command line (a router wave restarts it).
    router_args: Vec<String>,
    /// Where the servers log (a restarted router too).
    log: ServerLog,
    gateways: Vec<ServerProc>,
    ws_addr: SocketAddr,
    api_addr: SocketAddr,
    /// The router's admin port (`/metrics`).
    router_admin: SocketAddr,
    admin_addrs: Vec<SocketAddr>,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_cluster(a: &DemoArgs, log: &ServerLog, kind: Scenario) -> anyhow::Result<Cluster> {
    let dir = std::env::temp_dir().join(format!("switchyard-demo-{}", std::process::id()));
    router::certs::generate(&dir, &[])?;
    let dir = TempDir(dir);
    let quic = SocketAddr::from(([127, 0, 0, 1], orchestrate::free_port()));
    let api_addr = SocketAddr::from(([127, 0, 0, 1], a.api_port.unwrap_or_else(orchestrate::free_port)));
    let router_admin = SocketAddr::from(([127, 0, 0, 1], orchestrate::free_port()));
    let certs = dir.0.to_string_lossy().into_owned();
    let router_args: Vec<String> = [
        "router",
        "run",
        "--id",
        "router-1",
        "--quic-listen",
        &quic.to_string(),
        "--api-listen",
        &api_addr.to_string(),
        "--api-key",
        DEMO_API_KEY,
        "--admin-listen",
        &router_admin.to_string(),
        "--certs",
        &certs,
    ]
    .map(String::from)
    .to_vec();
    let mut router_args = router_args;
    if let Some(cfg) = &a.router_config {
        router_args.extend(["--config".to_owned(), cfg.to_string_lossy().into_owned()]);
    }
    let router = ServerProc::spawn("router", &router_args, log)?;
    let ws_addr = SocketAddr::from(([127, 0, 0, 1], a.ws_port.unwrap_or_else(orchestrate::free_port)));
    let least = if kind == Scenario::ReconnectWave { 2 } else { 1 };
    let n = a.connections.div_ceil(per_process()).max(a.gateways).max(least);
    let mut gateways = Vec::new();
    let mut admin_addrs = Vec::new();
    for i in 0..n {
        let admin = SocketAddr::from(([127, 0, 0, 1], orchestrate::free_port()));
        let mut args: Vec<String> = [
            "gateway",
            "run",
            "--id",
            &format!("gw-{i}"),
            "--listen",
            &ws_addr.to_string(),
            "--admin-listen",
            &admin.to_string(),
            "--router",
            &quic.to_string(),
            "--certs",
            &certs,
            "--hmac-secret",
            DEMO_SECRET,
            "--drain-secs",
            "2",
            // Every process pins its cores from the first CPU on: sixty
            // one-core gateways share CPU 0 and leave the others to the
            // load generator on this box. Spread over both CPUs
            // (`--first-cpu i`), they took the load generator's CPU at its
            // nice 10, its clients stalled mid-handshake and a million-
            // session storm fell apart at 726,000 (BENCHMARKS.md).
            "--cores",
            &a.gateway_cores.to_string(),
        ]
        .map(String::from)
        .to_vec();
        if let Some(cfg) = &a.gateway_config {
            args.extend(["--config".to_owned(), cfg.to_string_lossy().into_owned()]);
        }
        if a.echo {
            args.extend(["--echo-path".to_owned(), "/echo".to_owned()]);
        }
        if a.deflate {
            args.push("--deflate".to_owned());
        }
        gateways.push(ServerProc::spawn(&format!("gateway-{i}"), &args, log)?);
        admin_addrs.push(admin);
    }
    for admin in &admin_addrs {
        orchestrate::wait_ready(*admin, Duration::from_secs(60))?;
    }
    // Ready answers may come from another process on a reused port: every
    // server started must still be running.
    for p in std::iter::once(&router).chain(&gateways) {
        if p.exited() {
            anyhow::bail!("{} exited at start (its log says why: --server-logs)", p.name);
        }
    }
    Ok(Cluster {
        _dir: dir,
        router,
        router_args,
        log: log.clone(),
        gateways,
        ws_addr,
        api_addr,
        router_admin,
        admin_addrs,
    })
}

/// The admission the local cluster runs: the gateway's defaults, per core,
/// and their sum over the gateway cores started on this machine's CPUs.
fn admission_note(gateways: usize, cores: usize) -> String {
    let d = gateway::config::Admission::default();
    let n = gateways * cores.max(1);
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    format!(
        "gateway defaults: {:.0}/s, burst {}, {} pending handshakes per core, Retry-After {}–{} s; \
         {n} gateway cores on {cpus} CPUs admit up to {:.0}/s",
        d.accept_rate,
        d.accept_burst,
        d.max_pending_handshakes,
        d.retry_after_min_secs,
        d.retry_after_max_secs,
        d.accept_rate * n as f64
    )
}

/// `len` bytes of chat-like text (words from a small vocabulary, varied by
/// `seed`): compresses like a real message, not like a run of one byte.
/// A fan-out publication's data: its publish time and `seq`, chat text of
/// `payload_bytes` (0: none), and its phase's tag when phases are told apart.
fn publication_data(seq: u64, payload_bytes: usize, tag: Option<usize>) -> serde_json::Value {
    let mut data = serde_json::json!({"ts": unix_micros(), "seq": seq});
    if payload_bytes > 0 {
        data["text"] = chat_text(payload_bytes, seq as usize).into();
    }
    if let Some(tag) = tag {
        data["ph"] = tag.into();
    }
    data
}

fn chat_text(len: usize, seed: usize) -> String {
    const WORDS: [&str; 24] = [
        "the", "deploy", "is", "green", "again", "after", "we", "rolled", "back", "gateway", "config",
        "thanks", "for", "looking", "into", "it", "I", "will", "review", "your", "change", "tomorrow",
        "ship", "today",
    ];
    let mut out = String::with_capacity(len + 16);
    let mut k = seed.wrapping_mul(2_654_435_761);
    while out.len() < len {
        k = k.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        out.push_str(WORDS[(k >> 33) % WORDS.len()]);
        out.push(' ');
    }
    out.truncate(len);
    out
}

fn demo_token(user: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": user}),
        &jsonwebtoken::EncodingKey::from_secret(DEMO_SECRET.as_bytes()),
    )
    .expect("sign")
}

fn bar(len: u64, msg: &str, json: bool) -> ProgressBar {
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} {per_sec} {elapsed}")
            .expect("template")
            .progress_chars("=> "),
    );
    b.set_message(msg.to_owned());
    b
}

/// Runs the demo.
pub fn run(a: DemoArgs) -> anyhow::Result<Verdict> {
    run_scenario(Scenario::Demo, a)
}

/// Runs one scenario, on a local cluster or against `--ws`/`--api`; prints
/// the report and the HTML path, and answers its [`Verdict`] (see
/// [`RunReport::verdict`]).
pub fn run_scenario(kind: Scenario, a: DemoArgs) -> anyhow::Result<Verdict> {
    if a.ws.is_some() && (a.serve || kind == Scenario::ReconnectWave) {
        anyhow::bail!("--serve and reconnect-wave start (and signal) their own cluster: drop --ws/--api");
    }
    let log = match (&a.server_logs, a.serve) {
        (Some(dir), _) => {
            std::fs::create_dir_all(dir)?;
            ServerLog::Dir(dir.clone())
        }
        (None, true) => ServerLog::Inherit,
        (None, false) => ServerLog::Quiet,
    };
    let mut cluster = match a.ws {
        Some(_) => None,
        None => Some(start_cluster(&a, &log, kind)?),
    };
    let target = match (&cluster, a.ws, a.api) {
        (Some(c), _, _) => Target {
            ws_addr: c.ws_addr,
            api_addr: c.api_addr,
            api_key: DEMO_API_KEY.into(),
            secret: DEMO_SECRET.into(),
        },
        (None, Some(ws), Some(api)) => {
            Target { ws_addr: ws, api_addr: api, api_key: a.api_key.clone(), secret: a.hmac_secret.clone() }
        }
        _ => anyhow::bail!("--ws needs --api"),
    };
    if a.serve
        && let Some(cluster) = cluster.as_mut()
    {
        let mut line = serde_json::json!({
            "ws_url": format!("ws://{}/connection/websocket", cluster.ws_addr),
            "api_url": format!("http://{}/api", cluster.api_addr),
            "api_key": DEMO_API_KEY,
            "hmac_secret": DEMO_SECRET,
            "token": demo_token("demo-user"),
            "metrics_urls": cluster.admin_addrs.iter().map(|a| format!("http://{a}/metrics")).chain([format!("http://{}/metrics", cluster.router_admin)]).collect::<Vec<_>>(),
        });
        if a.echo {
            line["echo_url"] = format!("ws://{}/echo", cluster.ws_addr).into();
        }
        println!("{line}");
        wait_for_ctrl_c();
        eprintln!("draining…");
        for g in cluster.gateways.iter_mut() {
            g.terminate(Duration::from_secs(10));
        }
        cluster.router.terminate(Duration::from_secs(5));
        return Ok(Verdict { ok: true, reasons: Vec::new() });
    }
    let report = scenario(kind, &a, &target, cluster.as_mut())?;
    if let Some(cluster) = cluster.as_mut() {
        for g in cluster.gateways.iter_mut() {
            g.terminate(Duration::from_secs(15));
        }
        cluster.router.terminate(Duration::from_secs(5));
    }
    let path = a.report.clone().unwrap_or_else(|| {
        let _ = std::fs::create_dir_all("reports");
        let name = kind.title().split(' ').next().unwrap_or("run").replace('-', "");
        PathBuf::from(format!("reports/{name}-{}.html", unix_micros() / 1_000_000))
    });
    report.write_html(&path)?;
    let verdict = report.verdict();
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["verdict"] = serde_json::to_value(&verdict)?;
        println!("{v}");
    } else {
        print!("{}", report.table());
    }
    eprintln!("HTML report: {}", path.display());
    Ok(verdict)
}

fn wait_for_ctrl_c() {
    // SAFETY: a plain signal mask and sigwait on this thread; no handlers run.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}

/// After the last publication, how long the deliveries must stay unchanged
/// before the clients are told to stop, and the most that wait may take.
const SETTLE_QUIET: Duration = Duration::from_secs(1);
/// The quiet wanted while the deliveries are short of what the fan-out
/// owes (a publication's last subscribers of a million on this box got it
/// ~100 s after it went out).
const SETTLE_QUIET_SHORT_OF_OWED: Duration = Duration::from_secs(15);
const SETTLE_MAX: Duration = Duration::from_secs(180);

/// What the orchestrator samples of the workers.
struct Totals {
    /// Clients connected or given up.
    settled: u64,
    /// Clients that connected (once at least).
    connected: u64,
    deliveries: u64,
    online: u64,
    /// Every worker attempted every client.
    ready: bool,
}

fn totals(ws: &[Worker]) -> Totals {
    let mut t = Totals { settled: 0, connected: 0, deliveries: 0, online: 0, ready: true };
    for w in ws {
        let s = w.state.lock().expect("state");
        t.settled += s.connected + s.failed;
        t.connected += s.connected;
        t.deliveries += s.deliveries;
        t.online += s.online;
        t.ready &= s.ready;
    }
    t
}

/// Subscribers of each channel, all workers together (as they counted them
/// when ready): what a publication there owes.
fn subscribers_by_channel(ws: &[Worker]) -> HashMap<String, u64> {
    let mut subscribers: HashMap<String, u64> = HashMap::new();
    for w in ws {
        for (ch, n) in &w.state.lock().expect("state").subscribers {
            *subscribers.entry(ch.clone()).or_default() += n;
        }
    }
    subscribers
}

/// The publish→deliver latency (µs) of every delivery the workers reported
/// since the last call, all workers merged (`None`: no deliveries).
fn take_window(ws: &[Worker]) -> Option<Histogram<u64>> {
    let mut merged: Option<Histogram<u64>> = None;
    for w in ws {
        let Some(h) = w.state.lock().expect("state").pending_window.take() else { continue };
        match merged.as_mut() {
            Some(m) => {
                let _ = m.add(&h);
            }
            None => merged = Some(h),
        }
    }
    merged
}

/// Deliveries of phase `tag`'s publications so far, and when the latest
/// arrived (µs since the Unix epoch; 0: none yet).
fn phase_progress(ws: &[Worker], tag: usize) -> (u64, u64) {
    ws.iter().fold((0, 0), |(n, last), w| {
        let s = w.state.lock().expect("state");
        (
            n + s.phase_deliveries.get(tag).copied().unwrap_or(0),
            last.max(s.phase_last_us.get(tag).copied().unwrap_or(0)),
        )
    })
}

impl Totals {
    /// The timeline's sample at `t`, with the latency of `window`.
    fn sample(&self, t: f64, window: Option<&Histogram<u64>>) -> Sample {
        let ms = |q: f64| window.map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0);
        Sample { t, connected: self.online, deliveries: self.deliveries, p50_ms: ms(0.5), p99_ms: ms(0.99) }
    }
}

/// A plain progress line for logs (no terminal: no progress bars).
fn plain_progress(json: bool, what: &str, s: &Sample) {
    if !json && !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!(
            "[{:7.1} s] {what}: {} online, {} deliveries, window p50 {:.1} ms p99 {:.1} ms",
            s.t, s.connected, s.deliveries, s.p50_ms, s.p99_ms
        );
    }
}

/// The reconnect wave's bookkeeping.
struct Wave {
    online_before: u64,
    at: Instant,
    last_handshakes: Option<(Instant, u64)>,
}

impl Wave {
    /// Samples the survivors' handshake counters (peak rate) and whether the
    /// clients are all back.
    fn sample(&mut self, cluster: &Cluster, online: u64, report: &mut RunReport) {
        let handshakes: u64 = cluster.admin_addrs[1..]
            .iter()
            .filter_map(|a| orchestrate::http_get(*a, "/metrics"))
            .map(|m| orchestrate::metric_sum(&m, "switchyard_gateway_handshakes_total"))
            .sum();
        let now = Instant::now();
        if let Some((t, h)) = self.last_handshakes {
            let dt = now.duration_since(t).as_secs_f64();
            if dt > 0.05 {
                let rate = handshakes.saturating_sub(h) as f64 / dt;
                report.peak_handshakes_per_sec = report.peak_handshakes_per_sec.max(rate);
            }
        }
        self.last_handshakes = Some((now, handshakes));
        // Back: the hit gateway is gone (a drain ends when its last session
        // closed) and as many clients are online as before. Reconnections
        // can be faster than the sampling, so a dip need not be seen.
        let gone = cluster.gateways[0].exited();
        if report.reconnect_secs.is_none() && gone && online >= self.online_before {
            report.reconnect_secs = Some(self.at.elapsed().as_secs_f64());
        }
    }
}

/// Publishes `data` to `ch` through the HTTP API and records what the API
/// answered (offset, epoch) for the checker: in the publisher's log and as
/// the channel's latest position.
fn publish_recorded(
    api: &mut ApiClient,
    published: &mut PublishedLog,
    tops: &mut HashMap<String, (u64, String)>,
    ch: String,
    data: serde_json::Value,
    seq: u64,
) -> anyhow::Result<()> {
    let r = api.call("publish", &serde_json::json!({"channel": ch, "data": data}))?;
    if let Some(off) = r["result"]["offset"].as_u64() {
        let epoch = r["result"]["epoch"].as_str().unwrap_or("").to_owned();
        published.record(&ch, &epoch, off, seq);
        tops.insert(ch, (off, epoch));
    }
    Ok(())
}

/// A channel for the next fan-out publication: half Zipf (the big channels
/// get more), half uniform.
fn pick_channel<'c>(channels: &'c [String], zipf: &Zipf, rng: &mut impl Rng) -> &'c String {
    &channels[if rng.random_bool(0.5) { zipf.sample(rng) } else { rng.random_range(0..channels.len()) }]
}

/// Where the fan-out's publications go, and what the checker learns of
/// them: the position each got (the publisher's log) and each channel's
/// latest (the final positions the workers wait for).
struct Outbox<'a> {
    publisher: &'a mut Publisher,
    published: &'a mut PublishedLog,
    tops: &'a mut HashMap<String, (u64, String)>,
}

impl Outbox<'_> {
    /// Publishes `data` (whose `seq` is `seq`) to `ch`. A publish the API
    /// refuses or cannot take (a router wave) is counted in `api_errors`;
    /// it is not in the final positions the checker waits for. Returns
    /// whether the publication went out.
    fn send(&mut self, ch: &str, data: serde_json::Value, seq: u64, report: &mut RunReport) -> bool {
        match self.publisher.publish(ch, data) {
            Ok(Some((offset, epoch))) => {
                self.published.record(ch, &epoch, offset, seq);
                self.tops.insert(ch.to_owned(), (offset, epoch));
                true
            }
            Ok(None) => true,
            Err(_) => {
                report.api_errors += 1;
                false
            }
        }
    }
}

/// Samples the timeline (and a reconnect wave) once; answers the latency
/// window it took.
type Sampler<'a> = dyn FnMut(&[Worker], &mut RunReport) -> Option<Histogram<u64>> + 'a;

/// The capacity ramp ([`crate::ramp`]). Each step publishes at its rate for
/// `plan.step_secs` through the same `out` as the steady fan-out (so the
/// checker follows every one of its publications), tagged `"ph": k`; then
/// waits, bounded, until its deliveries (its channels' subscribers, as the
/// workers counted them) are in, and half a second more for the latency
/// windows. Steps are marked as phases; the first the box does not keep up
/// with ends the ramp. Fills `report.ramp` and `report.capacity`; answers
/// the publications sent (their `seq`s are `0..n`).
#[allow(clippy::too_many_arguments)]
fn run_ramp(
    plan: &RampPlan,
    workers: &[Worker],
    out: &mut Outbox<'_>,
    pick: &mut dyn FnMut() -> String,
    report: &mut RunReport,
    start: Instant,
    json: bool,
    sample: &mut Sampler<'_>,
) -> u64 {
    let subscribers = subscribers_by_channel(workers);
    let ramp_start = Instant::now();
    let mut seq = 0u64;
    let mut steps: Vec<Step> = Vec::new();
    let mut last_sample = Instant::now();
    // Samples the timeline every 250 ms; the step's latency histogram gets
    // every window.
    let mut tick = |hist: &mut Histogram<u64>, report: &mut RunReport| {
        if last_sample.elapsed() >= Duration::from_millis(250) {
            last_sample = Instant::now();
            if let Some(w) = sample(workers, report) {
                let _ = hist.add(&w);
            }
        }
    };
    let mut unfinished = None;
    for rate in ramp::rates(plan) {
        if ramp_start.elapsed() > RAMP_BUDGET {
            break;
        }
        let name = format!("ramp {rate:.1}/s");
        report.phases.push((name.clone(), start.elapsed().as_secs_f64()));
        let tag = report.phase_tags.len();
        report.phase_tags.push(name);
        let n = plan.publications(rate);
        let mut hist = latency_histogram();
        let mut asked = 0u64;
        // The lag is measured from the last publish, not from the end of
        // its slot: a slow step's longer slot is not a shorter drain.
        let mut last_publish_us = 0;
        let step_start = Instant::now();
        for i in 0..=n {
            let due = step_start + Duration::from_secs_f64(i as f64 / rate);
            while let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait.min(Duration::from_millis(50)));
                tick(&mut hist, report);
            }
            // The last round only waits out the step's last slot.
            if i == n {
                break;
            }
            let ch = pick();
            let data = publication_data(seq, plan.payload_bytes, Some(tag));
            last_publish_us = data["ts"].as_u64().unwrap_or_default();
            // Only a publication that went out is owed to its subscribers.
            if out.send(&ch, data, seq, report) {
                asked += subscribers.get(&ch).copied().unwrap_or(0);
            }
            seq += 1;
            tick(&mut hist, report);
        }
        let publish_secs = step_start.elapsed().as_secs_f64();
        let drain_by = Instant::now() + Duration::from_secs_f64(plan.max_drain_secs);
        while phase_progress(workers, tag).0 < asked && Instant::now() < drain_by {
            std::thread::sleep(Duration::from_millis(20));
            tick(&mut hist, report);
        }
        // Latency windows reach the orchestrator up to two reporting
        // periods after their deliveries.
        let windows_by = Instant::now() + Duration::from_millis(600);
        while Instant::now() < windows_by {
            std::thread::sleep(Duration::from_millis(50));
            tick(&mut hist, report);
        }
        let (delivered, last_us) = phase_progress(workers, tag);
        let drain_secs = if delivered < asked {
            plan.max_drain_secs
        } else {
            last_us.saturating_sub(last_publish_us) as f64 / 1e6
        };
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        let step = ramp::judge(
            &steps,
            StepMeasure {
                rate,
                publications: n as u64,
                publish_secs,
                asked,
                delivered,
                drain_secs,
                p50_ms: ms(0.5),
                p99_ms: ms(0.99),
            },
        );
        if !json {
            eprintln!(
                "ramp {rate:5.1} publications/s: {:.0} deliveries/s asked, {:.0} delivered, drain {drain_secs:.2} s, p50 {:.0} ms, p99 {:.0} ms: {}",
                step.asked_per_sec,
                step.delivered_per_sec,
                step.measure.p50_ms,
                step.measure.p99_ms,
                step.reason.as_deref().unwrap_or("kept up")
            );
        }
        let stop = !step.kept_up;
        if delivered < asked {
            unfinished = Some((tag, asked));
        }
        steps.push(step);
        if stop {
            break;
        }
    }
    // A step behind leaves a backlog: the steady fan-out starts without it
    // (bounded).
    if let Some((tag, asked)) = unfinished {
        let by = Instant::now() + Duration::from_secs(30);
        let mut hist = latency_histogram();
        while phase_progress(workers, tag).0 < asked && Instant::now() < by {
            std::thread::sleep(Duration::from_millis(50));
            tick(&mut hist, report);
        }
    }
    report.capacity = ramp::capacity(&steps);
    report.ramp = steps;
    seq
}

fn scenario(
    kind: Scenario,
    a: &DemoArgs,
    target: &Target,
    mut cluster: Option<&mut Cluster>,
) -> anyhow::Result<RunReport> {
    let channels: Vec<String> = (0..a.channels.max(1)).map(|i| format!("chat:demo-{i}")).collect();
    let fixed_rate = a.rate.unwrap_or(DEFAULT_RATE);
    let publications = match kind {
        Scenario::Storm | Scenario::Chat => 0,
        Scenario::Soak => (fixed_rate * a.duration as f64).round() as usize,
        _ => a.publications,
    };
    let mut report = RunReport {
        scenario: kind.title().into(),
        connections: a.connections as u64,
        publications: publications as u64,
        ..Default::default()
    };
    let gw_cpu =
        |c: &Option<&mut Cluster>| c.as_ref().map_or(0.0, |c| c.gateways.iter().map(|g| g.cpu_secs()).sum());
    let gw_rss = |c: &Option<&mut Cluster>| {
        c.as_ref().map_or(0, |c| c.gateways.iter().map(|g| g.rss_bytes()).sum::<u64>())
    };
    if let Some(c) = cluster.as_ref() {
        // The local cluster's gateways run the production admission
        // defaults; the report says what they add up to here.
        report.admission = match &a.gateway_config {
            Some(p) => format!("as configured in {} (not the gateway defaults)", p.display()),
            None => admission_note(c.gateways.len(), a.gateway_cores),
        };
    }
    let gw_cpu0 = gw_cpu(&cluster);
    let gw_rss0 = gw_rss(&cluster);
    let procs = a.connections.div_ceil(per_process()).max(1);
    let mut workers = Vec::new();
    let mut specs: Vec<WorkerSpec> = Vec::new();
    let start = Instant::now();
    for p in 0..procs {
        let first = p * a.connections / procs;
        let n = (p + 1) * a.connections / procs - first;
        let spec = WorkerSpec {
            ws_addr: target.ws_addr,
            path: "/connection/websocket".into(),
            connections: n,
            first_index: first,
            threads: a.threads,
            rate: a.storm_rate / procs as f64,
            hmac_secret: target.secret.clone(),
            channels: channels.clone(),
            zipf_s: a.zipf,
            subs_per_conn: a.subs_per_conn,
            source_ips: if a.source_ips > 0 { a.source_ips } else { (a.connections / 20_000 + 1) * 4 },
            max_attempts: 20,
            deadline_secs: 600 + a.duration,
            reconnect: true,
            upgrade_only: a.upgrade_only && kind == Scenario::Storm,
            deflate: a.deflate,
            chat: (kind == Scenario::Chat).then(|| ChatSpec {
                workspaces: a.workspaces.max(1),
                channels_per_workspace: a.channels_per_workspace.max(1),
                channels_per_user: a.channels_per_user.max(1),
                members: (a.connections as f64 / a.online.clamp(0.01, 1.0)) as usize,
                presence_view: a.presence_view,
                active_every: a.active_every,
                msgs_per_min: a.msgs_per_min,
                typing_per_msg: a.typing_per_msg,
            }),
        };
        workers.push(Worker::spawn(&spec)?);
        specs.push(spec);
    }
    report.phases.push(("storm".into(), 0.0));
    let pb = bar(a.connections as u64, "connecting", a.json);
    // 300 s, or what a paced storm asks for plus two minutes of slack.
    let paced_secs = if a.storm_rate > 0.0 { a.connections as f64 / a.storm_rate + 120.0 } else { 0.0 };
    let storm_deadline = Instant::now() + Duration::from_secs_f64(paced_secs.clamp(300.0, 3600.0));
    let mut last_line = Instant::now();
    loop {
        let t = totals(&workers);
        pb.set_position(t.settled);
        let sample = t.sample(start.elapsed().as_secs_f64(), take_window(&workers).as_ref());
        if last_line.elapsed() >= Duration::from_secs(2) {
            last_line = Instant::now();
            plain_progress(a.json, "storm", &sample);
        }
        report.timeline.push(sample);
        if t.ready || Instant::now() > storm_deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    pb.finish_and_clear();
    report.storm_secs = start.elapsed().as_secs_f64();
    let online = totals(&workers).online;
    report.accept_rate = online as f64 / report.storm_secs.max(1e-3);
    report.storm_gateway_cpu_secs = gw_cpu(&cluster) - gw_cpu0;
    report.storm_loadgen_cpu_secs = workers.iter().map(|w| w.cpu_secs()).sum();
    report.gateway_cpu_us_per_conn = report.storm_gateway_cpu_secs * 1e6 / online.max(1) as f64;
    report.gateway_rss_per_conn = gw_rss(&cluster).saturating_sub(gw_rss0) as f64 / online.max(1) as f64;

    // Fan-out through the HTTP API, paced, timestamped.
    let mut api = ApiClient::new(target.api_addr, &target.api_key);
    let mut publisher = if a.client_publish && publications > 0 {
        let token = crate::worker::token(&target.secret, "loadgen-publisher");
        Publisher::Client(ClientPublisher::connect(target.ws_addr, &token, &channels)?)
    } else {
        Publisher::Api(ApiClient::new(target.api_addr, &target.api_key))
    };
    let zipf = Zipf::new(channels.len(), a.zipf);
    let mut tops: HashMap<String, (u64, String)> = HashMap::new();
    // What each publication's `seq` got as `(offset, epoch)`: the workers
    // compare payloads against it.
    let mut published = PublishedLog::default();
    let mut fan_start = Instant::now();
    let gw_counter = |c: &Option<&mut Cluster>, name: &str| -> u64 {
        c.as_ref().map_or(0, |c| {
            c.admin_addrs
                .iter()
                .filter_map(|a| orchestrate::http_get(*a, "/metrics"))
                .map(|m| orchestrate::metric_sum(&m, name))
                .sum()
        })
    };
    let gw_cpu_fan0 = gw_cpu(&cluster);
    let encoded0 = gw_counter(&cluster, "switchyard_gateway_frames_encoded_total");
    let deflated0 = gw_counter(&cluster, "switchyard_gateway_frames_deflated_total");
    let mut rng = rand::rng();
    let mut wave: Option<Wave> = None;
    let mut last_sample = Instant::now();
    let mut last_line = Instant::now();
    let mut sample = |workers: &[Worker],
                      report: &mut RunReport,
                      wave: &mut Option<Wave>,
                      cluster: &Option<&mut Cluster>| {
        let t = totals(workers);
        let window = take_window(workers);
        let s = t.sample(start.elapsed().as_secs_f64(), window.as_ref());
        if last_line.elapsed() >= Duration::from_secs(2) {
            last_line = Instant::now();
            plain_progress(a.json, "traffic", &s);
        }
        report.timeline.push(s);
        if let (Some(w), Some(c)) = (wave.as_mut(), cluster.as_deref()) {
            w.sample(c, t.online, report);
        }
        window
    };
    // The capacity ramp, then the steady fan-out at a share of what it
    // found (the demo without `--rate`).
    let mut rate = fixed_rate;
    let mut first_seq = 0u64;
    let mut steady_tag = None;
    if kind == Scenario::Demo && publications > 0 {
        if a.rate.is_none() {
            // Finite and bounded whatever was asked (NaN passes a clamp).
            let finite = |v: f64, default: f64| if v.is_finite() { v } else { default };
            let step_secs = finite(a.ramp_step_secs, 2.0);
            let plan = RampPlan {
                first_rate: finite(a.ramp_first_rate, 4.0).clamp(0.1, MAX_FIRST_RAMP_RATE),
                factor: 1.5,
                steps: a.ramp_steps.clamp(1, MAX_PHASES - 1),
                step_secs: step_secs.clamp(0.1, 10.0),
                max_drain_secs: step_secs.clamp(2.0, 10.0),
                payload_bytes: a.payload_bytes,
            };
            let mut out = Outbox { publisher: &mut publisher, published: &mut published, tops: &mut tops };
            let mut pick = || pick_channel(&channels, &zipf, &mut rng).clone();
            let mut ramp_sample = |w: &[Worker], r: &mut RunReport| sample(w, r, &mut wave, &cluster);
            first_seq =
                run_ramp(&plan, &workers, &mut out, &mut pick, &mut report, start, a.json, &mut ramp_sample);
            match &report.capacity {
                Some(c) => {
                    rate = c.publications_per_sec * STEADY_FRACTION;
                    report.steady_rate_from =
                        format!("{:.0} % of the capacity the ramp found", STEADY_FRACTION * 100.0);
                    // A ramp that found (next to) nothing — a router down,
                    // deliveries that never came — must not make the steady
                    // part last for hours: it runs within MAX_STEADY_SECS.
                    let floor = publications as f64 / MAX_STEADY_SECS;
                    if rate < floor {
                        rate = floor;
                        report.steady_rate_from = format!(
                            "the ramp found {:.2} publications/s; raised to {floor:.2}/s so the {publications} \
                             publications take at most {MAX_STEADY_SECS:.0} s",
                            c.publications_per_sec
                        );
                    }
                }
                None => report.steady_rate_from = "no ramp step finished: the default".into(),
            }
        } else {
            report.steady_rate_from = "--rate: no ramp".into();
        }
        report.steady_rate = rate;
        steady_tag = Some(report.phase_tags.len());
        let name = if report.ramp.is_empty() { "fan-out" } else { "steady fan-out" };
        report.phase_tags.push(name.into());
        report.phases.push((name.into(), start.elapsed().as_secs_f64()));
        fan_start = Instant::now();
    } else if publications > 0 {
        report.phases.push(("fan-out".into(), start.elapsed().as_secs_f64()));
    }
    let deliveries_before_steady = totals(&workers).deliveries;
    // What the fan-out owes: each publication that went out, once to each
    // subscriber of its channel (as the workers counted them when ready).
    let subscribers = subscribers_by_channel(&workers);
    let mut owed = 0u64;
    report.publications += first_seq;
    let pb = bar(publications as u64, "publishing", a.json);
    // A storm of other clients during the fan-out, if asked for.
    let mut stormers = Vec::new();
    if a.storm_during > 0 && publications > 0 {
        report.phases.push(("storm during fan-out".into(), start.elapsed().as_secs_f64()));
        let procs = a.storm_during.div_ceil(per_process());
        for p in 0..procs {
            let first = p * a.storm_during / procs;
            let n = (p + 1) * a.storm_during / procs - first;
            let spec = WorkerSpec {
                connections: n,
                first_index: a.connections + first,
                rate: a.storm_rate / procs as f64,
                channels: vec!["chat:storm-bystanders".into()],
                subs_per_conn: 1,
                chat: None,
                upgrade_only: false,
                ..specs[0].clone()
            };
            stormers.push(Worker::spawn(&spec)?);
        }
    }
    if kind == Scenario::Chat {
        report.phases.push(("chat".into(), start.elapsed().as_secs_f64()));
        let mut personal = 0u64;
        let end = fan_start + Duration::from_secs(a.duration);
        // Joins in flight: (when to leave, user, channel).
        let mut joined: std::collections::VecDeque<(Instant, String, String)> = Default::default();
        let (mut join_seq, mut joins_paced) = (0u64, 0u64);
        while Instant::now() < end {
            // The Slack "join channel" path: the backend subscribes a user's
            // every connection to a channel, publishes there, and later takes
            // the user out again. The clients check each joined stream.
            let due_joins = (fan_start.elapsed().as_secs_f64() * a.joins_per_sec.max(0.0)) as u64;
            while joins_paced < due_joins {
                joins_paced += 1;
                let i = rng.random_range(0..a.connections.max(1));
                let w = i % a.workspaces.max(1);
                let ch = format!("chat:w{w}-join{}", rng.random_range(0..JOIN_CHANNELS));
                let user = format!("u{i}");
                if joined.iter().any(|(_, u, c)| *u == user && *c == ch) {
                    continue;
                }
                report.join_calls += 1;
                match api.call("subscribe", &serde_json::json!({"user": user, "channel": ch})) {
                    Ok(r) if r.get("result").is_some() => {
                        joined.push_back((Instant::now() + Duration::from_secs_f64(a.join_secs), user, ch))
                    }
                    _ => report.api_errors += 1,
                }
            }
            while joined.front().is_some_and(|(at, _, _)| *at <= Instant::now()) {
                let (_, user, ch) = joined.pop_front().expect("checked");
                report.leave_calls += 1;
                match api.call("unsubscribe", &serde_json::json!({"user": user, "channel": ch})) {
                    Ok(r) if r.get("result").is_some() => {}
                    _ => report.api_errors += 1,
                }
            }
            if a.joins_per_sec > 0.0 {
                let w = rng.random_range(0..a.workspaces.max(1));
                let ch = format!("chat:w{w}-join{}", rng.random_range(0..JOIN_CHANNELS));
                let data = serde_json::json!({"ts": unix_micros(), "seq": join_seq});
                publish_recorded(&mut api, &mut published, &mut tops, ch, data, join_seq)?;
                join_seq += 1;
            }
            // The backend syncs read-state to a random user's devices.
            let due = fan_start + Duration::from_secs_f64(personal as f64 / fixed_rate.max(1e-3));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait.min(end.saturating_duration_since(Instant::now())));
            }
            let ch = format!("#u{}", rng.random_range(0..a.connections.max(1)));
            let data = serde_json::json!({"ts": unix_micros(), "read": personal, "seq": personal});
            publish_recorded(&mut api, &mut published, &mut tops, ch, data, personal)?;
            personal += 1;
            if last_sample.elapsed() >= Duration::from_millis(250) {
                last_sample = Instant::now();
                sample(&workers, &mut report, &mut wave, &cluster);
            }
        }
        report.publications = personal;
        // Clients stop talking; then every chat channel's final position.
        for w in workers.iter_mut() {
            w.quiet();
        }
        std::thread::sleep(Duration::from_secs(2));
        let chat = ChatSpec::channel;
        for w in 0..a.workspaces.max(1) {
            for k in 0..a.channels_per_workspace.max(1) {
                let ch = chat(w, k);
                let r = api.call("history", &serde_json::json!({"channel": ch, "limit": 0}))?;
                if let Some(off) = r["result"]["offset"].as_u64().filter(|o| *o > 0) {
                    tops.insert(ch, (off, r["result"]["epoch"].as_str().unwrap_or("").to_owned()));
                }
            }
        }
    }
    for i in 0..publications {
        let due = fan_start + Duration::from_secs_f64(i as f64 / rate.max(1e-3));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if kind == Scenario::ReconnectWave
            && i == publications / 3
            && let Some(c) = cluster.as_deref_mut()
        {
            let online = totals(&workers).online;
            let at = Instant::now();
            let t = start.elapsed().as_secs_f64();
            report.wave_at_secs = Some(t);
            let sig = if a.kill { libc::SIGKILL } else { libc::SIGTERM };
            let verb = if a.kill { "killed" } else { "drained" };
            if a.router {
                // The router goes away and comes back on the same addresses:
                // gateways reconnect and resubscribe; subscribers resync.
                report.phases.push((format!("router {verb}"), t));
                c.router.signal(sig);
                c.router.wait(Duration::from_secs(30));
                c.router = ServerProc::spawn("router", &c.router_args, &c.log)?;
                report.phases.push(("router restarted".into(), start.elapsed().as_secs_f64()));
                // Back when every gateway is linked to the new router.
                let back_by = Instant::now() + Duration::from_secs(60);
                while Instant::now() < back_by {
                    let links = orchestrate::http_get(c.router_admin, "/metrics")
                        .map_or(0, |m| orchestrate::metric_sum(&m, "switchyard_router_gateway_links"));
                    if links >= c.gateways.len() as u64 {
                        report.reconnect_secs = Some(at.elapsed().as_secs_f64());
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            } else {
                report.phases.push((format!("gateway {verb}"), t));
                c.gateways[0].signal(sig);
                wave = Some(Wave { online_before: online, at, last_handshakes: None });
            }
            sample(&workers, &mut report, &mut wave, &cluster);
        }
        let ch = pick_channel(&channels, &zipf, &mut rng);
        let seq = first_seq + i as u64;
        let data = publication_data(seq, a.payload_bytes, steady_tag);
        // Only a publication that went out is owed to its subscribers.
        if (Outbox { publisher: &mut publisher, published: &mut published, tops: &mut tops }).send(
            ch,
            data,
            seq,
            &mut report,
        ) {
            owed += subscribers.get(ch).copied().unwrap_or(0);
        }
        pb.set_position(i as u64 + 1);
        if last_sample.elapsed() >= Duration::from_millis(250) {
            last_sample = Instant::now();
            sample(&workers, &mut report, &mut wave, &cluster);
        }
    }
    pb.finish_and_clear();
    if matches!(publisher, Publisher::Client(_)) {
        for ch in &channels {
            let r = api.call("history", &serde_json::json!({"channel": ch, "limit": 0}))?;
            if let Some(off) = r["result"]["offset"].as_u64().filter(|o| *o > 0) {
                tops.insert(ch.clone(), (off, r["result"]["epoch"].as_str().unwrap_or("").to_owned()));
            }
        }
    }
    // A wave's curve goes on until everyone is back (bounded).
    let back_by = Instant::now() + Duration::from_secs(120);
    while wave.is_some() && report.reconnect_secs.is_none() && Instant::now() < back_by {
        std::thread::sleep(Duration::from_millis(250));
        sample(&workers, &mut report, &mut wave, &cluster);
    }
    report.phases.push(("settle".into(), start.elapsed().as_secs_f64()));
    // The last publications reach their subscribers before the clients are
    // told to stop (a client told while one is still on its way has to wake
    // to be told, and every wake of a few hundred thousand clients competes
    // with the delivery): wait, bounded, until the deliveries stop growing.
    //
    // The fan-out ends with its last delivery: when the deliveries last grew
    // (as the workers report them, every 250 ms), not when the wait for
    // quiet or the workers' summaries end.
    let settle_by = Instant::now() + SETTLE_MAX;
    let (mut seen, mut since) = (totals(&workers).deliveries, Instant::now());
    let fan_end = loop {
        // Quiet, and nobody away: a client the server closed (a pong too
        // late on a loaded box) comes back and recovers what it missed,
        // after a backoff that can outlast a quiet second.
        // Quiet means a second when everything owed is in; while some is
        // not, a longer silence (a million deliveries on a loaded box take
        // their time, and reconnects recover theirs late).
        let t = totals(&workers);
        let all_in = t.deliveries.saturating_sub(deliveries_before_steady) >= owed;
        let quiet = if all_in { SETTLE_QUIET } else { SETTLE_QUIET_SHORT_OF_OWED };
        if since.elapsed() >= quiet && t.online >= t.connected {
            break since;
        }
        if Instant::now() >= settle_by {
            break Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
        let now = totals(&workers).deliveries;
        if now != seen {
            (seen, since) = (now, Instant::now());
        }
        if last_sample.elapsed() >= Duration::from_millis(250) {
            last_sample = Instant::now();
            sample(&workers, &mut report, &mut wave, &cluster);
        }
    };
    for w in workers.iter_mut().chain(stormers.iter_mut()) {
        w.stop(&tops, &published);
    }
    // One wait for all the summaries: a worker that does not report in
    // time is killed, and its clients are counted as unreported (red)
    // rather than losing what the others counted.
    let summaries_by = Instant::now() + orchestrate::SUMMARY_WAIT;
    for w in stormers {
        let n = w.connections as u64;
        match w.finish(summaries_by) {
            Some(s) => {
                report.storm_during_connected += s.connected;
                report.storm_during_rejected += s.rejected;
                report.storm_during_failed += s.failed + s.gave_up;
            }
            None => report.unreported += n,
        }
    }
    report.storm_during = a.storm_during as u64;
    let mut summaries = Vec::new();
    for w in workers {
        let n = w.connections as u64;
        match w.finish(summaries_by) {
            Some(s) => summaries.push(s),
            None => report.unreported += n,
        }
    }
    report.fanout_secs = fan_end.saturating_duration_since(fan_start).as_secs_f64();
    let loadgen_cpu: f64 = summaries.iter().map(|s| s.cpu_secs).sum();
    report.add_summaries(&summaries);
    report.timeline.push(Sample {
        t: start.elapsed().as_secs_f64(),
        connected: report.connected,
        deliveries: report.deliveries,
        ..Default::default()
    });
    // The steady fan-out's rate: its own deliveries (tagged with its
    // phase), not the ramp's backlog; without phases, those since it began.
    let mut fanout_deliveries = report.deliveries.saturating_sub(deliveries_before_steady);
    if let Some(p) = steady_tag.and_then(|t| report.phase_latency.get(t)) {
        report.steady_latency_ms = p.latency_ms.clone();
        fanout_deliveries = p.latency_ms.count;
    }
    report.deliveries_per_sec = fanout_deliveries as f64 / report.fanout_secs.max(1e-3);
    let per100k = |cpu: f64| cpu / (report.deliveries.max(1) as f64 / 100_000.0);
    report.loadgen_cpu_per_100k = per100k(loadgen_cpu);
    if cluster.is_some() {
        report.gateway_cpu_per_100k = per100k(gw_cpu(&cluster) - gw_cpu_fan0);
        report.gateway_frames_encoded =
            gw_counter(&cluster, "switchyard_gateway_frames_encoded_total").saturating_sub(encoded0);
        report.gateway_frames_deflated =
            gw_counter(&cluster, "switchyard_gateway_frames_deflated_total").saturating_sub(deflated0);
    }
    Ok(report)
}
