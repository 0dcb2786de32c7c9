//! A worker process: a share of the simulated clients, thread-per-core on
//! monoio, reporting JSON lines on stdout to the orchestrator.
//!
//! Each client connects (from one of many `127.0.0.x` source addresses, so
//! more than one address's ephemeral ports can be used), upgrades (retrying
//! a 503 after its `Retry-After` plus up to a second of jitter, other
//! failures with full-jitter backoff), sends `connect`
//! and its subscriptions in one frame (as centrifuge-js does), then reads:
//! every reply and `pub` goes to the subscription's [`StreamChecker`], and
//! each publication's publish→deliver latency (the publisher's timestamp is
//! in the payload) is recorded. Pings are answered. On `stop` (stdin: the final positions and
//! what the publisher published) the worker waits, bounded, until every
//! subscription reached the final offsets it was given; then every client's
//! streams are finished, including those of clients that gave up earlier
//! (they wait for `stop`, so their missing tail is counted), and the worker
//! reports counters and histograms.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::BufRead;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::BytesMut;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use proto::backoff::Backoff;
use proto::ws::deflate::Inflater;
use proto::ws::handshake::client::{self, ClientHandshakeError};
use proto::ws::{Decoder, DecoderConfig, Message, OpCode, encode_frame};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::checker::{Delivery, PublishedIndex, PublishedLog, StreamChecker, SubscribeReply, Tally};
use crate::zipf::Zipf;

/// What one worker runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Gateway WebSocket address.
    pub ws_addr: SocketAddr,
    /// WebSocket path.
    pub path: String,
    /// Clients in this worker.
    pub connections: usize,
    /// Global index of the first client (user ids, source addresses).
    pub first_index: usize,
    /// Threads (monoio runtimes).
    pub threads: usize,
    /// New connections per second for this worker (0: all at once).
    pub rate: f64,
    /// HMAC secret to sign connection tokens with.
    pub hmac_secret: String,
    /// Channels to subscribe to (Zipf over this list).
    pub channels: Vec<String>,
    /// Zipf exponent for channel choice.
    pub zipf_s: f64,
    /// Subscriptions per client.
    pub subs_per_conn: usize,
    /// Source addresses 127.0.0.2 … to rotate over.
    pub source_ips: usize,
    /// Upgrade attempts per client before giving up.
    pub max_attempts: u32,
    /// Hard stop for the whole worker (seconds).
    pub deadline_secs: u64,
    /// Reconnect (with full-jitter backoff) and resubscribe with recovery
    /// when the server closes a connection, as the SDKs do.
    #[serde(default)]
    pub reconnect: bool,
    /// Upgrade only: no `connect`; a client is online once it has the 101
    /// and holds its connection until stopped.
    #[serde(default)]
    pub upgrade_only: bool,
    /// Offer permessage-deflate and inflate what comes compressed.
    #[serde(default)]
    pub deflate: bool,
    /// A Slack-like workload instead of Zipf subscriptions (`loadgen chat`).
    #[serde(default)]
    pub chat: Option<ChatSpec>,
}

/// A Slack-like day: workspaces → channels → members. Client `i` is user
/// `u<i>` in workspace `i mod workspaces`; it subscribes to some of its
/// workspace's channels (Zipf: a few big ones, many small), the typing
/// channel of the first, its personal channel `#u<i>` (read-state sync and
/// mentions, published by the backend) and the presence of the users in
/// view. Active users send messages (client publishes, each preceded by
/// typing events on the ephemeral channel).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatSpec {
    /// Workspaces.
    pub workspaces: usize,
    /// Channels per workspace.
    pub channels_per_workspace: usize,
    /// Channels each user is a member of (and subscribed to while online).
    pub channels_per_user: usize,
    /// Members of the whole simulation (online ones are the clients).
    pub members: usize,
    /// Users whose presence each client watches.
    pub presence_view: usize,
    /// One client in this many sends messages.
    pub active_every: usize,
    /// Messages per minute per active user.
    pub msgs_per_min: f64,
    /// Typing events sent before each message.
    pub typing_per_msg: usize,
}

impl ChatSpec {
    /// Channel `k` of workspace `w`.
    pub fn channel(w: usize, k: usize) -> String {
        format!("chat:w{w}-c{k}")
    }

    /// Every `chat:` channel of the simulation.
    pub fn all_channels(&self) -> Vec<String> {
        (0..self.workspaces)
            .flat_map(|w| (0..self.channels_per_workspace).map(move |k| Self::channel(w, k)))
            .collect()
    }

    /// The channels client `index` subscribes to; the first is where it talks.
    fn subscriptions(&self, index: usize, zipf: &Zipf, rng: &mut impl Rng) -> Vec<String> {
        let w = index % self.workspaces.max(1);
        let mut mine: Vec<usize> = Vec::new();
        while mine.len() < self.channels_per_user.min(self.channels_per_workspace) {
            let k = zipf.sample(rng);
            if !mine.contains(&k) {
                mine.push(k);
            }
        }
        let mut out: Vec<String> = mine.iter().map(|k| Self::channel(w, *k)).collect();
        out.push(format!("typing:w{w}-c{}", mine.first().copied().unwrap_or(0)));
        out.push(format!("#u{index}"));
        for _ in 0..self.presence_view {
            // Someone of the same workspace, online or not.
            let j = rng.random_range(0..self.members.max(1) / self.workspaces.max(1)) * self.workspaces + w;
            if j != index {
                out.push(format!("presence:u{j}"));
            }
        }
        out.sort();
        out.dedup();
        // Keep the talking channel first.
        let talk = Self::channel(w, mine.first().copied().unwrap_or(0));
        out.retain(|c| *c != talk);
        out.insert(0, talk);
        out
    }

    fn active(&self, index: usize) -> bool {
        self.active_every > 0 && index.is_multiple_of(self.active_every)
    }
}

/// Counters and histograms a worker reports.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Clients that completed `connect`.
    pub connected: u64,
    /// 503 answers received (each retried).
    pub rejected: u64,
    /// Upgrade attempts that timed out (no answer in time; each retried).
    #[serde(default)]
    pub timeouts: u64,
    /// Upgrade attempts after a client's first, whatever ended the one
    /// before (503, timeout, failure).
    #[serde(default)]
    pub retries: u64,
    /// Clients that never connected.
    pub failed: u64,
    /// Publications received.
    pub deliveries: u64,
    /// Publications missing (gaps, and final offsets never reached, also by
    /// clients that gave up) with no `recovered:false` to explain them.
    pub lost: u64,
    /// Publications received twice.
    pub duplicated: u64,
    /// Publications received out of order.
    pub reordered: u64,
    /// Subscriptions told `recovered:false` (explicit, not silent).
    pub unrecovered: u64,
    /// Publications the server said it could not deliver (`recovered:false`,
    /// a new epoch): explicit, reported apart from `lost`.
    #[serde(default)]
    pub forgiven: u64,
    /// Publications whose payload (`seq`) differs from what was published
    /// at that offset (see [`crate::checker`]).
    #[serde(default)]
    pub payload_mismatch: u64,
    /// Publications whose payload was compared with the publisher's log.
    #[serde(default)]
    pub payload_verified: u64,
    /// Subscriptions finished by the checker (of clients that connected).
    #[serde(default)]
    pub streams: u64,
    /// Subscriptions never positioned (never answered, or only temporary
    /// errors), so never checked.
    #[serde(default)]
    pub unpositioned: u64,
    /// Subscriptions refused, or ended by the server without a resync.
    #[serde(default)]
    pub failed_subscriptions: u64,
    /// Subscriptions without offsets (ephemeral namespaces): nothing to check.
    #[serde(default)]
    pub unchecked: u64,
    /// Clients that connected, then gave up (reconnect attempts exhausted,
    /// the deadline, or stuck at the end) before being checked to the end.
    #[serde(default)]
    pub gave_up: u64,
    /// Publications for a channel the client was not subscribed to.
    #[serde(default)]
    pub stray: u64,
    /// Unsubscribe pushes asking to resubscribe (2500) or disconnects (codes).
    pub server_closes: u64,
    /// WebSocket frames received.
    pub frames: u64,
    /// Reconnects after the server closed a connection.
    #[serde(default)]
    pub reconnects: u64,
    /// Messages published by clients (chat).
    #[serde(default)]
    pub published: u64,
    /// Client publishes the server refused.
    #[serde(default)]
    pub publish_errors: u64,
    /// Channels the backend joined clients to (subscribe pushes seen).
    #[serde(default)]
    pub joins: u64,
    /// Joined channels the backend took them out of again.
    #[serde(default)]
    pub leaves: u64,
    /// CPU seconds (user + system) this worker used.
    pub cpu_secs: f64,
    /// TCP connect + upgrade latency (µs), hdrhistogram V2, base64.
    pub upgrade_us: String,
    /// Upgrade to connect-reply latency (µs).
    pub connect_us: String,
    /// Publish → deliver latency (µs).
    pub latency_us: String,
    /// Publish→deliver latency (µs) per phase tag: publications whose
    /// payload carries `"ph": k` (k below [`MAX_PHASES`]) are recorded in
    /// entry k as well; empty strings for tags never seen.
    #[serde(default)]
    pub phase_latency_us: Vec<String>,
}

/// Phase tags (`"ph"` in a publication's payload) a worker keeps a latency
/// histogram for; a higher tag is recorded in the run's histogram only.
pub const MAX_PHASES: usize = 16;

/// Live counters shared by a worker's threads.
#[derive(Debug, Default)]
struct Shared {
    connected: AtomicU64,
    rejected: AtomicU64,
    timeouts: AtomicU64,
    retries: AtomicU64,
    failed: AtomicU64,
    attempted: AtomicU64,
    deliveries: AtomicU64,
    /// Clients that connected and then gave up.
    gave_up: AtomicU64,
    stray: AtomicU64,
    server_closes: AtomicU64,
    frames: AtomicU64,
    reconnects: AtomicU64,
    /// Client publishes sent (chat) and refused.
    published: AtomicU64,
    publish_errors: AtomicU64,
    /// Channels joined (subscribe pushes) and left (unsubscribe 2000 of a join).
    joins: AtomicU64,
    leaves: AtomicU64,
    quiet: AtomicBool,
    /// Publish→deliver latency since the last progress line (µs), merged
    /// from the threads' own windows every 250 ms.
    window: Mutex<Option<Histogram<u64>>>,
    /// Clients connected right now (falls during a reconnect wave).
    online: AtomicU64,
    /// Per phase tag: deliveries, and when the latest arrived (µs since
    /// the Unix epoch): when a ramp step's last delivery came in.
    phase_deliveries: [AtomicU64; MAX_PHASES],
    phase_last_us: [AtomicU64; MAX_PHASES],
    /// Clients subscribing to each of the spec's `channels` (not chat's):
    /// what a publication there asks of this worker.
    subscribers: Mutex<HashMap<String, u64>>,
    stop: AtomicBool,
    /// When `stop` came (set once, with `stop`).
    stopped_at: OnceLock<Instant>,
    /// Final position of each channel the orchestrator published to.
    tops: Mutex<HashMap<String, (u64, String)>>,
    /// What the orchestrator published (with `stop`), when it kept a log.
    published_log: Mutex<Option<Arc<PublishedIndex>>>,
}

struct Hists {
    upgrade: Histogram<u64>,
    connect: Histogram<u64>,
    latency: Histogram<u64>,
    /// Latency since the thread last handed its window over.
    window: Histogram<u64>,
    /// Latency per phase tag (grown on demand, at most [`MAX_PHASES`]).
    phases: Vec<Histogram<u64>>,
}

/// A latency histogram in µs (1 µs to an hour, 3 significant digits).
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

impl Hists {
    fn new() -> Self {
        let h = latency_histogram;
        Hists { upgrade: h(), connect: h(), latency: h(), window: h(), phases: Vec::new() }
    }

    fn add(&mut self, other: &Hists) {
        self.upgrade.add(&other.upgrade).ok();
        self.connect.add(&other.connect).ok();
        self.latency.add(&other.latency).ok();
        if self.phases.len() < other.phases.len() {
            self.phases.resize_with(other.phases.len(), latency_histogram);
        }
        for (dst, src) in self.phases.iter_mut().zip(&other.phases) {
            dst.add(src).ok();
        }
    }
}

/// Serializes a histogram for the report line.
pub fn encode_hist(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new().serialize(h, &mut buf).expect("serialize histogram");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// Reads a histogram from a report line.
pub fn decode_hist(s: &str) -> Option<Histogram<u64>> {
    let raw = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    Deserializer::new().deserialize(&mut &raw[..]).ok()
}

/// Microseconds since the Unix epoch (the clock publishers stamp payloads with).
pub fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF is valid and `u` is a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// An HS256 connection token for `user`.
pub fn token(secret: &str, user: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": user}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign token")
}

/// Runs a worker: reads its spec, runs its clients, prints progress and the summary.
pub fn run(spec: WorkerSpec) -> anyhow::Result<()> {
    let shared = Arc::new(Shared::default());
    // stdin: {"stop": {"chat:a": top, ...}} ends the run.
    let stdin_shared = shared.clone();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(tops) = v.get("stop").and_then(|t| t.as_object())
            {
                let mut m = stdin_shared.tops.lock().expect("tops lock");
                for (k, v) in tops {
                    let top = v[0].as_u64().unwrap_or(0);
                    m.insert(k.clone(), (top, v[1].as_str().unwrap_or("").to_owned()));
                }
                drop(m);
                if let Some(log) = v.get("published")
                    && let Ok(log) = PublishedLog::deserialize(log)
                    && !log.is_empty()
                {
                    *stdin_shared.published_log.lock().expect("published lock") = Some(Arc::new(log.index()));
                }
                stdin_shared.stopped_at.get_or_init(Instant::now);
                stdin_shared.stop.store(true, Ordering::SeqCst);
            } else if line.contains("\"quiet\"") {
                // Stop publishing (chat), keep receiving.
                stdin_shared.quiet.store(true, Ordering::SeqCst);
            }
        }
        // The orchestrator went away: stop too.
        stdin_shared.stopped_at.get_or_init(Instant::now);
        stdin_shared.stop.store(true, Ordering::SeqCst);
    });
    let threads = spec.threads.max(1);
    let mut handles = Vec::new();
    for t in 0..threads {
        let spec = spec.clone();
        let shared = shared.clone();
        handles.push(std::thread::spawn(move || {
            gateway::cores::block_on(thread_main(spec, t, threads, shared))
        }));
    }
    let reporter_shared = shared.clone();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let connections = spec.connections as u64;
    let reporter = std::thread::spawn(move || {
        let mut announced = false;
        while !done2.load(Ordering::Relaxed) {
            let s = &reporter_shared;
            let attempted = s.attempted.load(Ordering::Relaxed);
            let window = s.window.lock().expect("window").take();
            let (p50, p99, n) = window
                .as_ref()
                .map_or((0, 0, 0), |h| (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.len()));
            // The window itself, so the orchestrator can merge workers'
            // windows into true percentiles (a few hundred bytes).
            let hist = window.as_ref().map_or(String::new(), encode_hist);
            println!(
                "{}",
                serde_json::json!({"progress": {
                    "connected": s.connected.load(Ordering::Relaxed),
                    "rejected": s.rejected.load(Ordering::Relaxed),
                    "timeouts": s.timeouts.load(Ordering::Relaxed),
                    "retries": s.retries.load(Ordering::Relaxed),
                    "failed": s.failed.load(Ordering::Relaxed),
                    "deliveries": s.deliveries.load(Ordering::Relaxed),
                    "reconnects": s.reconnects.load(Ordering::Relaxed),
                    "online": s.online.load(Ordering::Relaxed),
                    "window": {"p50_us": p50, "p99_us": p99, "count": n, "hist": hist},
                    "phase_deliveries": s.phase_deliveries.iter().map(|c| c.load(Ordering::Relaxed)).collect::<Vec<_>>(),
                    "phase_last_us": s.phase_last_us.iter().map(|c| c.load(Ordering::Relaxed)).collect::<Vec<_>>(),
                }})
            );
            // Ready once every client has its connect answered (or gave up).
            let settled = s.connected.load(Ordering::Relaxed) + s.failed.load(Ordering::Relaxed);
            if !announced && attempted >= connections && settled >= connections {
                let subscribers = s.subscribers.lock().expect("subscribers").clone();
                println!("{}", serde_json::json!({"ready": true, "subscribers": subscribers}));
                announced = true;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    let mut hists = Hists::new();
    let mut tally = Tally::default();
    for h in handles {
        let (hs, t) = h.join().map_err(|_| anyhow::anyhow!("worker thread panicked"))?;
        hists.add(&hs);
        tally += t;
    }
    done.store(true, Ordering::Relaxed);
    let _ = reporter.join();
    let s = &shared;
    let summary = Summary {
        connected: s.connected.load(Ordering::Relaxed),
        rejected: s.rejected.load(Ordering::Relaxed),
        timeouts: s.timeouts.load(Ordering::Relaxed),
        retries: s.retries.load(Ordering::Relaxed),
        failed: s.failed.load(Ordering::Relaxed),
        deliveries: s.deliveries.load(Ordering::Relaxed),
        lost: tally.lost,
        duplicated: tally.duplicated,
        reordered: tally.reordered,
        unrecovered: tally.unrecovered,
        forgiven: tally.forgiven,
        payload_mismatch: tally.payload_mismatch,
        payload_verified: tally.payload_verified,
        streams: tally.streams,
        unpositioned: tally.unpositioned,
        failed_subscriptions: tally.failed_subscriptions,
        unchecked: tally.unchecked,
        gave_up: s.gave_up.load(Ordering::Relaxed),
        stray: s.stray.load(Ordering::Relaxed),
        server_closes: s.server_closes.load(Ordering::Relaxed),
        frames: s.frames.load(Ordering::Relaxed),
        reconnects: s.reconnects.load(Ordering::Relaxed),
        published: s.published.load(Ordering::Relaxed),
        publish_errors: s.publish_errors.load(Ordering::Relaxed),
        joins: s.joins.load(Ordering::Relaxed),
        leaves: s.leaves.load(Ordering::Relaxed),
        cpu_secs: cpu_secs(),
        upgrade_us: encode_hist(&hists.upgrade),
        connect_us: encode_hist(&hists.connect),
        latency_us: encode_hist(&hists.latency),
        phase_latency_us: hists
            .phases
            .iter()
            .map(|h| if h.is_empty() { String::new() } else { encode_hist(h) })
            .collect(),
    };
    println!("{}", serde_json::json!({ "summary": summary }));
    Ok(())
}

struct ThreadCtx {
    spec: WorkerSpec,
    shared: Arc<Shared>,
    hists: RefCell<Hists>,
    zipf: Zipf,
    live: Cell<usize>,
    /// The thread's inflater (no context takeover: shared by its clients).
    inflater: RefCell<Inflater>,
    /// The finished streams of this thread's clients, added up.
    tally: RefCell<Tally>,
    /// Wakes every waiting client of the thread once `shared.stop` is set
    /// (a `Notified` made before the flag is read cannot miss it).
    stopping: tokio::sync::Notify,
}

async fn thread_main(spec: WorkerSpec, t: usize, threads: usize, shared: Arc<Shared>) -> (Hists, Tally) {
    let choices = spec.chat.as_ref().map_or(spec.channels.len(), |c| c.channels_per_workspace);
    let zipf = Zipf::new(choices, spec.zipf_s);
    let mine: Vec<usize> = (0..spec.connections).filter(|i| i % threads == t).collect();
    let per_thread_rate = if spec.rate > 0.0 { spec.rate / threads as f64 } else { 0.0 };
    let ctx = Rc::new(ThreadCtx {
        spec,
        shared,
        hists: RefCell::new(Hists::new()),
        zipf,
        live: Cell::new(0),
        inflater: RefCell::new(Inflater::new()),
        tally: RefCell::new(Tally::default()),
        stopping: tokio::sync::Notify::new(),
    });
    let start = Instant::now();
    let deadline = start + Duration::from_secs(ctx.spec.deadline_secs.max(1));
    {
        // Hands this thread's latency window to the reporter every 250 ms;
        // returns the thread's freed allocator pages to the OS every second
        // (the handshakes' buffers: 8.2 -> 5.4 KB per idle client); wakes
        // the thread's clients once `stop` came.
        let ctx = ctx.clone();
        monoio::spawn(async move {
            let mut ticks = 0u32;
            let mut told_stop = false;
            while Instant::now() < deadline + Duration::from_secs(2) {
                monoio::time::sleep(Duration::from_millis(250)).await;
                if !told_stop && ctx.shared.stop.load(Ordering::Relaxed) {
                    told_stop = true;
                    ctx.stopping.notify_waiters();
                }
                ticks = ticks.wrapping_add(1);
                if ticks.is_multiple_of(4) {
                    gateway::alloc::collect();
                }
                let mut h = ctx.hists.borrow_mut();
                if !h.window.is_empty() {
                    let mut w = ctx.shared.window.lock().expect("window");
                    match w.as_mut() {
                        Some(acc) => {
                            let _ = acc.add(&h.window);
                        }
                        None => *w = Some(h.window.clone()),
                    }
                    h.window.reset();
                }
            }
        });
    }
    for (n, i) in mine.into_iter().enumerate() {
        if per_thread_rate > 0.0 {
            let due = start + Duration::from_secs_f64(n as f64 / per_thread_rate);
            let now = Instant::now();
            if due > now {
                monoio::time::sleep(due - now).await;
            }
        }
        if ctx.shared.stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            break;
        }
        ctx.live.set(ctx.live.get() + 1);
        monoio::spawn(client(ctx.clone(), ctx.spec.first_index + i, Instant::now(), deadline));
    }
    while ctx.live.get() > 0 && Instant::now() < deadline + Duration::from_secs(2) {
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
    // A client still running now never got to its final accounting: it was
    // not checked to the end.
    ctx.shared.gave_up.fetch_add(ctx.live.get() as u64, Ordering::Relaxed);
    (ctx.hists.replace(Hists::new()), ctx.tally.replace(Tally::default()))
}

enum ConnectError {
    Rejected(Option<u32>),
    Failed,
}

async fn read_append(s: &mut TcpStream, buf: BytesMut) -> (std::io::Result<usize>, BytesMut) {
    let (len, cap) = (buf.len(), buf.capacity());
    let (res, slice) = s.read(buf.slice_mut(len..cap)).await;
    (res, slice.into_inner())
}

/// Receive buffer of each simulated client's socket (the kernel doubles it).
const CLIENT_RCVBUF: usize = 64 * 1024;

async fn connect_tcp(ctx: &ThreadCtx, index: usize) -> std::io::Result<TcpStream> {
    let ips = ctx.spec.source_ips.max(1);
    let n = index % ips;
    let src = IpAddr::V4(Ipv4Addr::new(127, 0, (2 + n / 250) as u8, (2 + n % 250) as u8));
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    // Bounded like a real client's: with the kernel's autotuning (up to
    // tcp_rmem's maximum per socket), thousands of simulated clients that
    // fall behind would hold gigabytes on this one box and push loopback
    // TCP into memory pressure (stalls, aborts) that no real deployment
    // sees; capped, a client that cannot keep up fills the gateway's
    // bounded queue instead and is told so (3008, then recovers).
    sock.set_recv_buffer_size(CLIENT_RCVBUF)?;
    if ips > 1 {
        // The port is chosen at connect, by the whole 4-tuple: a bind to
        // port 0 would search the address's ports for one bound by nobody,
        // which costs more with every socket bound (a 200,000-client storm
        // spent most of its load-generator CPU there).
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads one int from `on` for this open socket.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        sock.bind(&SocketAddr::new(src, 0).into())?;
    }
    sock.set_nonblocking(true)?;
    match sock.connect(&ctx.spec.ws_addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let std_stream: std::net::TcpStream = sock.into();
    let stream = TcpStream::from_std(std_stream)?;
    stream.writable(false).await?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd is this stream's open socket; err/len are valid out-pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || err != 0 {
        return Err(std::io::Error::from_raw_os_error(if rc != 0 { libc::EIO } else { err }));
    }
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// An upgraded connection: the stream, bytes read past the 101, and
/// whether permessage-deflate was agreed.
type Upgraded = (TcpStream, BytesMut, bool);

async fn upgrade(ctx: &ThreadCtx, index: usize) -> Result<Upgraded, ConnectError> {
    let mut stream = connect_tcp(ctx, index).await.map_err(|e| {
        if std::env::var_os("LOADGEN_DEBUG").is_some() {
            eprintln!("connect {index}: {e}");
        }
        ConnectError::Failed
    })?;
    let host = ctx.spec.ws_addr.to_string();
    let (req, hs) = client::request(&host, &ctx.spec.path, rand::random(), &[], ctx.spec.deflate);
    let (res, _) = stream.write_all(req).await;
    res.map_err(|_| ConnectError::Failed)?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let (res, b) = read_append(&mut stream, buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => {
                if std::env::var_os("LOADGEN_DEBUG").is_some() {
                    eprintln!("upgrade {index}: {res:?}");
                }
                return Err(ConnectError::Failed);
            }
            Ok(_) => {}
        }
        match hs.parse_response(&buf) {
            Ok(Some((accept, n))) => {
                let _ = buf.split_to(n);
                return Ok((stream, buf, accept.deflate.is_some()));
            }
            Ok(None) if buf.len() < 16384 => {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(4096);
                }
            }
            Ok(None) => return Err(ConnectError::Failed),
            Err(ClientHandshakeError::Rejected { status: 503, retry_after }) => {
                return Err(ConnectError::Rejected(retry_after));
            }
            Err(e) => {
                if std::env::var_os("LOADGEN_DEBUG").is_some() {
                    eprintln!("upgrade {index}: {e}");
                }
                return Err(ConnectError::Failed);
            }
        }
    }
}

/// One subscription of a client: its channel and its checker.
struct Subscription {
    channel: String,
    check: StreamChecker,
    /// Subscribed server-side (the backend's `subscribe` for this user: a
    /// channel join), not by the client.
    joined: bool,
    /// The backend ended the join (unsubscribe push 2000): not
    /// resubscribed on a reconnect.
    left: bool,
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    encode_frame(&mut out, true, OpCode::Text, payload, Some(rand::random()));
    out
}

/// Command ids above this are client publishes (chat).
const PUBLISH_IDS: usize = 1_000_000;

/// How one connection of a client ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    /// Stopped by the orchestrator (or its deadline) after converging.
    Done,
    /// The server closed it (with this WebSocket close code; 1006 when the
    /// socket just failed): reconnect when asked to.
    Closed(u16),
}

/// How long a client that is behind after `stop` waits in silence before
/// it gives up (what it misses is then counted as lost).
const CATCH_UP_SILENCE: Duration = Duration::from_secs(15);

/// How long after `stop` a client behind may go on catching up, reading
/// and reconnecting to recover, however much input it still gets: then it
/// ends and what it has not read is counted as lost. The worker's summary
/// comes within this (plus an attempt's end) of `stop`, well inside the
/// orchestrator's wait for it ([`crate::orchestrate::SUMMARY_WAIT`]).
pub const CATCH_UP_MAX: Duration = Duration::from_secs(60);

/// When the client must be done: the worker's deadline, or [`CATCH_UP_MAX`]
/// after `stop`.
fn end_by(sh: &Shared, deadline: Instant) -> Instant {
    sh.stopped_at.get().map_or(deadline, |s| deadline.min(*s + CATCH_UP_MAX))
}

/// The close code of a connection that ended without a close frame.
const ABNORMAL_CLOSE: u16 = 1006;

/// How long one attempt (TCP connect + upgrade) may take before the client
/// gives it up and retries.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects (TCP + upgrade), retrying a 503 after its `Retry-After` (plus
/// jitter) and other failures with full-jitter backoff; records the
/// upgrade latency.
async fn establish(ctx: &ThreadCtx, index: usize, since: Instant, deadline: Instant) -> Option<Upgraded> {
    let sh = &ctx.shared;
    let t0 = since;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    let mut attempts = 0;
    loop {
        attempts += 1;
        if attempts > 1 {
            sh.retries.fetch_add(1, Ordering::Relaxed);
        }
        let limit = UPGRADE_TIMEOUT.min(end_by(sh, deadline).saturating_duration_since(Instant::now()));
        let attempt = monoio::time::timeout(limit, upgrade(ctx, index)).await;
        if attempt.is_err() {
            sh.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        match attempt.unwrap_or(Err(ConnectError::Failed)) {
            Ok(s) => {
                ctx.hists.borrow_mut().upgrade.saturating_record(t0.elapsed().as_micros() as u64);
                return Some(s);
            }
            Err(e) => {
                if let ConnectError::Rejected(_) = e {
                    sh.rejected.fetch_add(1, Ordering::Relaxed);
                }
                if attempts >= ctx.spec.max_attempts
                    || Instant::now() > end_by(sh, deadline)
                    || sh.stop.load(Ordering::Relaxed)
                {
                    return None;
                }
                // A 503 names when to come back: then, plus up to a second
                // of jitter (Retry-After is whole seconds), as an SDK does.
                let wait = match e {
                    ConnectError::Rejected(Some(secs)) => {
                        Duration::from_secs(secs.into()) + Duration::from_millis(rand::random_range(0..1000))
                    }
                    _ => backoff.next_delay(&mut rand::rng()),
                };
                monoio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now()))).await;
            }
        }
    }
}

/// Whether any of the subscriptions is short of the final positions the
/// orchestrator gave with `stop`.
fn behind(sh: &Shared, subs: &[Subscription]) -> bool {
    let tops = sh.tops.lock().expect("tops");
    subs.iter().any(|s| tops.get(&s.channel).is_some_and(|(top, epoch)| s.check.behind((*top, epoch))))
}

/// The subscribe command for `s`: with recovery from its position once it
/// has one (a reconnect or a resync), as the SDKs do.
fn subscribe_cmd(id: usize, s: &Subscription) -> String {
    match s.check.recovery_position() {
        Some((epoch, offset)) => serde_json::json!({"id": id, "subscribe": {"channel": s.channel, "recover": true, "epoch": epoch, "offset": offset}})
            .to_string(),
        None => serde_json::json!({"id": id, "subscribe": {"channel": s.channel}}).to_string(),
    }
}

/// A client, due since `due` (its first upgrade's latency counts from
/// then, so a load generator slow to start it does not hide the wait).
async fn client(ctx: Rc<ThreadCtx>, index: usize, due: Instant, deadline: Instant) {
    let sh = ctx.shared.clone();
    let mut rng = rand::rng();
    let names: Vec<String> = match &ctx.spec.chat {
        // Upgrade only: no `connect`, so no subscriptions to check.
        _ if ctx.spec.upgrade_only => Vec::new(),
        Some(chat) => chat.subscriptions(index, &ctx.zipf, &mut rng),
        None => {
            let mut chosen: Vec<usize> = Vec::new();
            while chosen.len() < ctx.spec.subs_per_conn.min(ctx.spec.channels.len()) {
                let c = ctx.zipf.sample(&mut rng);
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
            }
            let names: Vec<String> = chosen.iter().map(|c| ctx.spec.channels[*c].clone()).collect();
            let mut counts = sh.subscribers.lock().expect("subscribers");
            for n in &names {
                *counts.entry(n.clone()).or_default() += 1;
            }
            names
        }
    };
    let mut subs: Vec<Subscription> = names
        .into_iter()
        .map(|channel| Subscription { channel, check: StreamChecker::new(), joined: false, left: false })
        .collect();
    let mut ever_connected = false;
    let mut first = true;
    let mut last_end = None;
    let mut reconnect_backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let since = if first { due } else { Instant::now() };
        let upgraded = establish(&ctx, index, since, deadline).await;
        if first {
            sh.attempted.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        let Some(upgraded) = upgraded else { break };
        let (end, connected) = session(&ctx, index, upgraded, &mut subs, deadline, !ever_connected).await;
        ever_connected |= connected;
        last_end = Some(end);
        if connected {
            reconnect_backoff.reset();
        }
        let SessionEnd::Closed(code) = end else { break };
        for s in subs.iter_mut() {
            s.check.disconnected(code);
        }
        // After `stop` too, a client the server closed while it was still
        // catching up comes back and recovers, so what it had not read yet
        // is checked rather than counted as lost.
        let again = ctx.spec.reconnect
            && (!sh.stop.load(Ordering::Relaxed) || behind(&sh, &subs))
            && Instant::now() < end_by(&sh, deadline);
        if !again {
            break;
        }
        sh.reconnects.fetch_add(1, Ordering::Relaxed);
        monoio::time::sleep(reconnect_backoff.next_delay(&mut rand::rng())).await;
    }
    if !ever_connected {
        // Counted once, as failed (its subscriptions were never sent).
        sh.failed.fetch_add(1, Ordering::Relaxed);
        ctx.live.set(ctx.live.get() - 1);
        return;
    }
    // Gave up: the last connection did not end with `stop`, and the client
    // was not already complete when it ended (closed after `stop` with
    // nothing left to read is complete).
    let complete = sh.stop.load(Ordering::Relaxed) && !behind(&sh, &subs);
    if last_end != Some(SessionEnd::Done) && !complete {
        sh.gave_up.fetch_add(1, Ordering::Relaxed);
        for s in subs.iter_mut() {
            s.check.gave_up();
        }
    }
    // A client that ended early waits for the final positions, so its
    // missing tail is counted rather than forgotten.
    while !sh.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(100)).await;
    }
    let tops = sh.tops.lock().expect("tops").clone();
    let published = sh.published_log.lock().expect("published").clone();
    let mut tally = ctx.tally.borrow_mut();
    for s in &subs {
        let fin = tops.get(&s.channel).map(|(top, epoch)| (*top, epoch.as_str()));
        *tally += s.check.finish(fin, published.as_ref().and_then(|p| p.channel(&s.channel)));
    }
    drop(tally);
    ctx.live.set(ctx.live.get() - 1);
}

/// One connection: `connect` and the subscriptions in the first frame (as
/// centrifuge-js does), then reads until stopped or closed. Returns how it
/// ended and whether `connect` succeeded.
async fn session(
    ctx: &ThreadCtx,
    index: usize,
    upgraded: Upgraded,
    subs: &mut Vec<Subscription>,
    deadline: Instant,
    first: bool,
) -> (SessionEnd, bool) {
    let (mut stream, mut buf, deflate) = upgraded;
    let sh = &ctx.shared;
    if ctx.spec.upgrade_only {
        return hold_upgraded(ctx, stream, deadline, first).await;
    }
    let upgraded_at = Instant::now();
    let user = format!("u{index}");
    let mut lines = vec![serde_json::json!({"id": 1, "connect": {"token": token(&ctx.spec.hmac_secret, &user), "name": "loadgen"}}).to_string()];
    // A channel the user joined (server-side) and has not left is
    // resubscribed by the client after a reconnect (a server API
    // subscription lasts as long as the connection), with recovery.
    for (k, s) in subs.iter().enumerate().filter(|(_, s)| !s.left) {
        lines.push(subscribe_cmd(2 + k, s));
    }
    let (res, _) = stream.write_all(frame(lines.join("\n").as_bytes())).await;
    if res.is_err() {
        return (SessionEnd::Closed(ABNORMAL_CLOSE), false);
    }
    let mut decoder = Decoder::new(DecoderConfig { deflate, ..DecoderConfig::client() });
    let mut connected = false;
    // When the socket last had something to read (a client starved of CPU
    // is not idle: its data waits in the socket, and its next wait ends at
    // once). After `stop`, a client still catching up keeps reading; one
    // whose socket stays silent for CATCH_UP_SILENCE since the later of its
    // last input and the stop is behind for good, and what it misses is
    // counted as lost.
    let mut last_input = Instant::now();
    let mut stopped_at: Option<Instant> = None;
    let mut resubscribe: Vec<usize> = Vec::new();
    let mut retry: Vec<usize> = Vec::new();
    let mut retry_at = Instant::now();
    // Chat: client publishes use ids above the subscriptions'; the first
    // message goes out after a random part of the interval.
    let mut next_id = PUBLISH_IDS;
    let mut next_msg = Instant::now()
        + ctx.spec.chat.as_ref().map_or(Duration::ZERO, |c| {
            Duration::from_secs_f64(60.0 / c.msgs_per_min.max(0.01))
                .mul_f64(rand::rng().random_range(0.0..1.0))
        });
    let end = 'outer: loop {
        // Decode what we have.
        loop {
            let msg = match decoder.decode_with(&mut buf, Some(&mut ctx.inflater.borrow_mut())) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    if std::env::var_os("LOADGEN_DEBUG").is_some() {
                        eprintln!("client {index}: {e}");
                    }
                    break 'outer SessionEnd::Closed(ABNORMAL_CLOSE);
                }
            };
            match msg {
                Message::Text(t) => {
                    sh.frames.fetch_add(1, Ordering::Relaxed);
                    for line in t.split(|b| *b == b'\n') {
                        if line == b"{}" {
                            let (r, _) = stream.write_all(frame(b"{}")).await;
                            if r.is_err() {
                                break 'outer SessionEnd::Closed(ABNORMAL_CLOSE);
                            }
                            continue;
                        }
                        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else { continue };
                        if let Some(push) = v.get("push") {
                            if let Some(k) = handle_push(ctx, subs, push) {
                                resubscribe.push(k);
                            }
                            continue;
                        }
                        let id = v["id"].as_u64().unwrap_or(0) as usize;
                        if id == 1 {
                            if v.get("error").is_some() {
                                break 'outer SessionEnd::Closed(ABNORMAL_CLOSE);
                            }
                            connected = true;
                            if first {
                                sh.connected.fetch_add(1, Ordering::Relaxed);
                            }
                            sh.online.fetch_add(1, Ordering::Relaxed);
                            ctx.hists
                                .borrow_mut()
                                .connect
                                .saturating_record(upgraded_at.elapsed().as_micros() as u64);
                        } else if id > PUBLISH_IDS {
                            if v.get("error").is_some() {
                                sh.publish_errors.fetch_add(1, Ordering::Relaxed);
                            }
                        } else if id >= 2 && id - 2 < subs.len() {
                            if let Some(r) = v.get("subscribe") {
                                subscribed(ctx, &mut subs[id - 2], r);
                            } else {
                                let e = &v["error"];
                                let code = e["code"].as_u64().unwrap_or(0) as u32;
                                let temporary = e["temporary"] == true;
                                subs[id - 2].check.subscribe_failed(code, temporary);
                                if temporary {
                                    // No router right now: try again shortly (jittered).
                                    retry.push(id - 2);
                                    retry_at = Instant::now()
                                        + Duration::from_millis(rand::rng().random_range(250..750));
                                } else if std::env::var_os("LOADGEN_DEBUG").is_some() {
                                    eprintln!("client {index}: subscribe refused: {v}");
                                }
                            }
                        }
                    }
                }
                Message::Close(c) => {
                    sh.server_closes.fetch_add(1, Ordering::Relaxed);
                    break 'outer SessionEnd::Closed(c.map_or(ABNORMAL_CLOSE, |c| c.code));
                }
                _ => {}
            }
        }
        if connected
            && let Some(chat) = ctx.spec.chat.as_ref().filter(|c| c.active(index))
            && !sh.quiet.load(Ordering::Relaxed)
            && Instant::now() >= next_msg
        {
            // Typing events on the ephemeral channel, then the message.
            let mut lines = Vec::with_capacity(chat.typing_per_msg + 1);
            let talk = &subs[0].channel;
            let typing = format!("typing:{}", talk.trim_start_matches("chat:"));
            for _ in 0..chat.typing_per_msg {
                next_id += 1;
                lines.push(serde_json::json!({"id": next_id, "publish": {"channel": typing, "data": {"typing": true}}}).to_string());
            }
            next_id += 1;
            lines.push(serde_json::json!({"id": next_id, "publish": {"channel": talk, "data": {"ts": unix_micros(), "text": "hello from a simulated user"}}}).to_string());
            let (r, _) = stream.write_all(frame(lines.join("\n").as_bytes())).await;
            if r.is_err() {
                break SessionEnd::Closed(ABNORMAL_CLOSE);
            }
            sh.published.fetch_add(1, Ordering::Relaxed);
            let every = Duration::from_secs_f64(60.0 / chat.msgs_per_min.max(0.01));
            next_msg = Instant::now() + every.mul_f64(rand::rng().random_range(0.5..1.5));
        }
        if !retry.is_empty() && Instant::now() >= retry_at {
            resubscribe.append(&mut retry);
        }
        if !resubscribe.is_empty() {
            let lines: Vec<String> = resubscribe.drain(..).map(|k| subscribe_cmd(2 + k, &subs[k])).collect();
            let (r, _) = stream.write_all(frame(lines.join("\n").as_bytes())).await;
            if r.is_err() {
                break SessionEnd::Closed(ABNORMAL_CLOSE);
            }
        }
        if sh.stop.load(Ordering::Relaxed) {
            let stopped = *stopped_at.get_or_insert_with(Instant::now);
            if !behind(sh, subs) || Instant::now() > end_by(sh, deadline) {
                break SessionEnd::Done;
            }
            if last_input.max(stopped).elapsed() > CATCH_UP_SILENCE {
                break SessionEnd::Done;
            }
        }
        if Instant::now() > deadline {
            break SessionEnd::Done;
        }
        if buf.is_empty() {
            // An idle client pins no receive buffer (a million of them on
            // one box: 16 KiB each would be 16 GiB).
            buf = BytesMut::new();
        }
        // Wait for input or for what is due next: a chat message, a
        // subscription retry, the deadline, the thread's stop signal; once
        // stopping and behind, the end of the catch-up silence (being behind
        // changes only with input). An idle client does not wake otherwise:
        // each wake cancels and re-arms its readiness poll, which for
        // hundreds of thousands of idle clients on two CPUs was most of the
        // box.
        let stop_signal = ctx.stopping.notified();
        let now = Instant::now();
        let mut due = deadline;
        if sh.stop.load(Ordering::Relaxed) {
            due = match stopped_at {
                Some(stopped) => {
                    due.min(last_input.max(stopped) + CATCH_UP_SILENCE).min(end_by(sh, deadline))
                }
                // `stop` came after the check above, maybe before the
                // signal was made (then it will not fire): go round now.
                None => now,
            };
        }
        if connected
            && !sh.quiet.load(Ordering::Relaxed)
            && ctx.spec.chat.as_ref().is_some_and(|c| c.active(index))
        {
            due = due.min(next_msg);
        }
        if !retry.is_empty() {
            due = due.min(retry_at);
        }
        let readable = monoio::select! {
            r = stream.readable(false) => Some(r.is_ok()),
            _ = monoio::time::sleep(due.saturating_duration_since(now)) => None,
            _ = stop_signal => None,
        };
        if readable == Some(false) {
            break SessionEnd::Closed(ABNORMAL_CLOSE); // reset (a crashed server)
        }
        if readable == Some(true) {
            last_input = Instant::now();
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16384);
            }
            let (res, b) = read_append(&mut stream, buf).await;
            buf = b;
            match res {
                Ok(0) | Err(_) => break SessionEnd::Closed(ABNORMAL_CLOSE),
                Ok(_) => {}
            }
        }
    };
    if end == SessionEnd::Done {
        let _ = stream.write_all(frame_close()).await;
    }
    if connected {
        sh.online.fetch_sub(1, Ordering::Relaxed);
    }
    (end, connected)
}

/// An upgraded connection that sends nothing (`--upgrade-only`): online
/// until stopped, the deadline, or the server closes it.
async fn hold_upgraded(
    ctx: &ThreadCtx,
    stream: TcpStream,
    deadline: Instant,
    first: bool,
) -> (SessionEnd, bool) {
    let sh = &ctx.shared;
    if first {
        sh.connected.fetch_add(1, Ordering::Relaxed);
    }
    sh.online.fetch_add(1, Ordering::Relaxed);
    let end = loop {
        let stop_signal = ctx.stopping.notified();
        if sh.stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            break SessionEnd::Done;
        }
        let readable = monoio::select! {
            r = stream.readable(false) => Some(r.is_ok()),
            _ = monoio::time::sleep(deadline.saturating_duration_since(Instant::now())) => None,
            _ = stop_signal => None,
        };
        if readable.is_some() {
            // Anything from the server now is its close (the connect deadline).
            break SessionEnd::Done;
        }
    };
    sh.online.fetch_sub(1, Ordering::Relaxed);
    (end, true)
}

/// A subscribe reply: a fresh position, a recovery with the missed
/// publications (counted and timed like pushes), or an explicit "not
/// recovered"; the checker judges it.
fn subscribed(ctx: &ThreadCtx, s: &mut Subscription, r: &serde_json::Value) {
    let recovered: Vec<Delivery> = r["publications"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|p| received(ctx, p))
        .collect();
    s.check.subscribed(&SubscribeReply {
        was_recovering: r["was_recovering"] == true,
        recovered: r["recovered"] == true,
        epoch: r["epoch"].as_str().unwrap_or(""),
        offset: r["offset"].as_u64().unwrap_or(0),
        positioned: r["positioned"] == true || r["recoverable"] == true,
        publications: &recovered,
    });
}

fn frame_close() -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&mut out, true, OpCode::Close, &1000u16.to_be_bytes(), Some(rand::random()));
    out
}

/// Counts one publication and records its publish→deliver latency; what
/// the checker needs of it.
fn received(ctx: &ThreadCtx, p: &serde_json::Value) -> Delivery {
    ctx.shared.deliveries.fetch_add(1, Ordering::Relaxed);
    if let Some(ts) = p["data"]["ts"].as_u64() {
        let us = unix_micros().saturating_sub(ts);
        let mut h = ctx.hists.borrow_mut();
        h.latency.saturating_record(us);
        h.window.saturating_record(us);
        if let Some(k) = p["data"]["ph"].as_u64().map(|k| k as usize).filter(|k| *k < MAX_PHASES) {
            ctx.shared.phase_deliveries[k].fetch_add(1, Ordering::Relaxed);
            ctx.shared.phase_last_us[k].fetch_max(unix_micros(), Ordering::Relaxed);
            if h.phases.len() <= k {
                h.phases.resize_with(k + 1, latency_histogram);
            }
            h.phases[k].saturating_record(us);
        }
    }
    Delivery { offset: p["offset"].as_u64().unwrap_or(0), seq: p["data"]["seq"].as_u64() }
}

/// Handles a push; returns the index of a subscription the server asked to
/// resubscribe (unsubscribe ≥ 2500), which is resubscribed with recovery.
fn handle_push(ctx: &ThreadCtx, subs: &mut Vec<Subscription>, push: &serde_json::Value) -> Option<usize> {
    let sh = &ctx.shared;
    let channel = push["channel"].as_str().unwrap_or("");
    let k = subs.iter().position(|s| s.channel == channel && !s.left);
    if let Some(r) = push.get("subscribe") {
        // The user joined the channel (the backend's server API call): a
        // new stream, positioned by the push, checked like any other.
        if k.is_none() {
            sh.joins.fetch_add(1, Ordering::Relaxed);
            let mut sub = Subscription {
                channel: channel.to_owned(),
                check: StreamChecker::new(),
                joined: true,
                left: false,
            };
            subscribed(ctx, &mut sub, r);
            subs.push(sub);
        }
        None
    } else if let Some(p) = push.get("pub") {
        let d = received(ctx, p);
        match k {
            Some(k) => subs[k].check.publication(d),
            None => {
                sh.stray.fetch_add(1, Ordering::Relaxed);
            }
        }
        None
    } else if let Some(u) = push.get("unsubscribe") {
        sh.server_closes.fetch_add(1, Ordering::Relaxed);
        let k = k?;
        let code = u["code"].as_u64().unwrap_or(0);
        if code >= 2500 {
            subs[k].check.resync_asked();
            Some(k)
        } else if subs[k].joined {
            // The user left the channel: checked up to here.
            sh.leaves.fetch_add(1, Ordering::Relaxed);
            subs[k].check.left();
            subs[k].left = true;
            None
        } else {
            subs[k].check.unsubscribed(code as u32);
            None
        }
    } else {
        None
    }
}
