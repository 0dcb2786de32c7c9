//! Router benchmarks: the real (release) `router` binary on loopback, driven
//! over real QUIC with mutual TLS by in-process gateways speaking the cluster
//! protocol.
//!
//! - `fanout`: one publication stream (pipelined client publishes on one
//!   gateway link) to a channel with subscribers on 1, 4, 16 gateways:
//!   publications/s, deliveries/s, publish→deliver latency at the gateways
//!   (p50/p99/p99.9), router CPU per publication and router sends per
//!   publication.
//! - `memory`: router RSS growth per channel with gateway interest only, with
//!   publications kept in history, and ephemeral (no history).
//!
//! ```text
//! cargo build --release -p router -p benches
//! target/release/router_bench fanout --gateways 1,4,16 --secs 5
//! target/release/router_bench memory --channels 100000
//! ```

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use proto::cluster::{ClusterDecoder, ClusterMsg, PROTOCOL_VERSION};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::Semaphore;

#[derive(Parser)]
#[command(about = "Router benchmarks over real QUIC")]
struct Cli {
    /// The router binary (build it with `cargo build --release -p router`).
    #[arg(long, default_value = "target/release/router")]
    router: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Publications/s and latency to a channel with subscribers on N gateways.
    Fanout {
        /// Gateway counts to run, one row each.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        gateways: Vec<usize>,
        /// Measured seconds per row (after 1 s of warm-up).
        #[arg(long, default_value_t = 5)]
        secs: u64,
        /// Publications in flight (unanswered) at most.
        #[arg(long, default_value_t = 256)]
        window: usize,
        /// Payload bytes per publication.
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
    /// Router memory per channel.
    Memory {
        /// Channels per kind.
        #[arg(long, default_value_t = 100_000)]
        channels: usize,
        /// Publications per channel.
        #[arg(long, default_value_t = 10)]
        pubs: usize,
        /// Payload bytes per publication.
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
}

struct RouterProc {
    child: Child,
    quic: SocketAddr,
    certs: PathBuf,
}

impl Drop for RouterProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.certs);
    }
}

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).unwrap_or(17_100)
}

impl RouterProc {
    fn start(bin: &PathBuf) -> anyhow::Result<RouterProc> {
        let certs = std::env::temp_dir().join(format!("sy-router-bench-{}", std::process::id()));
        router::certs::generate(&certs, &[])?;
        let quic: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let api = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = Command::new(bin)
            .args(["run", "--quic-listen", &quic.to_string(), "--api-listen", &api.to_string()])
            .args(["--admin-listen", &admin.to_string(), "--certs"])
            .arg(&certs)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(RouterProc { child, quic, certs })
    }

    fn stat(&self) -> (f64, u64) {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
            + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        (ticks / 100.0, rss * 1024)
    }
}

fn client_config(certs: &std::path::Path) -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.join("ca.pem"))? {
        roots.add(c?)?;
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(certs.join("gateway.pem"))?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(certs.join("gateway.key"))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![router::server::ALPN.to_vec()];
    Ok(quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?)))
}

/// One in-process gateway's link.
struct Link {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

async fn connect(r: &RouterProc, id: usize) -> anyhow::Result<Link> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(client_config(&r.certs)?);
    let mut last = None;
    for _ in 0..100 {
        match endpoint.connect(r.quic, "localhost")?.await {
            Ok(conn) => {
                let (mut send, mut recv) = conn.open_bi().await?;
                let mut out = BytesMut::new();
                ClusterMsg::Hello {
                    version: PROTOCOL_VERSION,
                    gateway_id: format!("bench-{id}"),
                    instance: 1,
                }
                .encode(&mut out);
                send.write_all(&out).await?;
                let mut dec = ClusterDecoder::default();
                let mut buf = BytesMut::new();
                match read(&mut recv, &mut dec, &mut buf).await? {
                    Some(ClusterMsg::Welcome { .. }) => {}
                    other => anyhow::bail!("expected welcome, got {other:?}"),
                }
                return Ok(Link { _endpoint: endpoint, conn, send, recv });
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("router never accepted: {last:?}")
}

async fn read(
    recv: &mut quinn::RecvStream,
    dec: &mut ClusterDecoder,
    buf: &mut BytesMut,
) -> anyhow::Result<Option<ClusterMsg>> {
    loop {
        if let Some(m) = dec.decode(buf)? {
            return Ok(Some(m));
        }
        match recv.read_chunk(256 * 1024, true).await? {
            Some(c) => buf.extend_from_slice(&c.bytes),
            None => return Ok(None),
        }
    }
}

async fn send(s: &mut quinn::SendStream, msgs: impl IntoIterator<Item = ClusterMsg>) -> anyhow::Result<()> {
    let mut out = BytesMut::new();
    for m in msgs {
        m.encode(&mut out);
    }
    s.write_all(&out).await?;
    Ok(())
}

/// Reads every delivery stream of a link; records publish→deliver latency
/// (the publisher's clock is ours: the payload starts with `{"t":<ns>`).
fn collect(
    conn: quinn::Connection,
    epoch: Instant,
    measuring: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Histogram<u64>> {
    tokio::spawn(async move {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Histogram<u64>>();
        let mut tasks = Vec::new();
        while let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), conn.accept_uni()).await {
            let (tx, measuring, count) = (tx.clone(), measuring.clone(), count.clone());
            tasks.push(tokio::spawn(async move {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
                let mut dec = ClusterDecoder::default();
                let mut buf = BytesMut::new();
                while let Ok(Some(m)) = read(&mut s, &mut dec, &mut buf).await {
                    if let ClusterMsg::Deliver { publication, .. } = m
                        && measuring.load(Ordering::Relaxed)
                    {
                        count.fetch_add(1, Ordering::Relaxed);
                        if let Some(t) = stamp(&publication.data) {
                            let now = epoch.elapsed().as_nanos() as u64;
                            let _ = h.record((now.saturating_sub(t) / 1000).max(1));
                        }
                    }
                }
                let _ = tx.send(h);
            }));
        }
        drop(tx);
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        while let Some(h) = rx.recv().await {
            let _ = all.add(&h);
        }
        all
    })
}

fn stamp(data: &[u8]) -> Option<u64> {
    let rest = data.strip_prefix(b"{\"t\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

fn payload(t: u64, size: usize) -> Bytes {
    let mut s = format!("{{\"t\":{t},\"p\":\"");
    while s.len() + 2 < size {
        s.push('x');
    }
    s.push_str("\"}");
    Bytes::from(s)
}

/// What one publisher sends and where it counts.
struct Load {
    channels: Vec<String>,
    /// Publications in flight at most.
    window: usize,
    /// Payload bytes.
    size: usize,
    /// The clock the payload stamps are relative to.
    epoch: Instant,
    stop: Arc<AtomicBool>,
    measuring: Arc<AtomicBool>,
    /// Answers counted while measuring.
    answered: Arc<AtomicU64>,
    /// Stop after this many publications (`None`: at `stop`).
    total: Option<u64>,
}

/// Publishes on a link's control stream with at most `window` unanswered,
/// until `stop` (or `total`); counts answers while `measuring`.
async fn publisher(
    mut send_s: quinn::SendStream,
    mut recv_s: quinn::RecvStream,
    load: Load,
) -> anyhow::Result<u64> {
    let Load { channels, window, size, epoch, stop, measuring, answered, total } = load;
    let permits = Arc::new(Semaphore::new(window));
    let done = Arc::new(AtomicU64::new(0));
    let reader = {
        let (permits, answered, measuring, done) =
            (permits.clone(), answered.clone(), measuring.clone(), done.clone());
        tokio::spawn(async move {
            let mut dec = ClusterDecoder::default();
            let mut buf = BytesMut::new();
            while let Ok(Some(m)) = read(&mut recv_s, &mut dec, &mut buf).await {
                if matches!(m, ClusterMsg::PublishOk { .. } | ClusterMsg::RequestError { .. }) {
                    permits.add_permits(1);
                    done.fetch_add(1, Ordering::Relaxed);
                    if measuring.load(Ordering::Relaxed) {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let mut req = 0u64;
    let mut batch = Vec::with_capacity(64);
    while !stop.load(Ordering::Relaxed) && total.is_none_or(|t| req < t) {
        let p = permits.clone().acquire_owned().await?;
        p.forget();
        let mut n = 1;
        while n < 64 && permits.try_acquire().map(|p| p.forget()).is_ok() {
            n += 1;
        }
        for _ in 0..n {
            if total.is_some_and(|t| req >= t) {
                permits.add_permits(1);
                continue;
            }
            let channel = channels[(req % channels.len() as u64) as usize].clone();
            req += 1;
            let t = epoch.elapsed().as_nanos() as u64;
            batch.push(ClusterMsg::Publish {
                req,
                channel,
                data: payload(t, size),
                info: None,
                idempotency_key: String::new(),
            });
        }
        send(&mut send_s, batch.drain(..)).await?;
    }
    // Wait for the answers still in flight (bounded).
    let end = Instant::now() + Duration::from_secs(30);
    while done.load(Ordering::Relaxed) < req && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reader.abort();
    Ok(req)
}

async fn fanout(
    r: &RouterProc,
    gateways: &[usize],
    secs: u64,
    window: usize,
    size: usize,
) -> anyhow::Result<()> {
    println!(
        "| gateways | publications/s | deliveries/s | p50 µs | p99 µs | p99.9 µs | router CPU µs/publication | router sends/publication |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (run, &g) in gateways.iter().enumerate() {
        let channel = format!("chat:bench-{run}-{g}");
        let epoch = Instant::now();
        let measuring = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let delivered = Arc::new(AtomicU64::new(0));
        let answered = Arc::new(AtomicU64::new(0));
        let mut links = Vec::new();
        for i in 0..g {
            let mut l = connect(r, i).await?;
            send(&mut l.send, [ClusterMsg::Subscribe { channels: vec![channel.clone()] }]).await?;
            links.push(l);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let collectors: Vec<_> = links
            .iter()
            .map(|l| collect(l.conn.clone(), epoch, measuring.clone(), delivered.clone()))
            .collect();
        // The publisher is one more gateway link (a client publish path).
        let p = connect(r, 1000 + run).await?;
        let load = Load {
            channels: vec![channel.clone()],
            window,
            size,
            epoch,
            stop: stop.clone(),
            measuring: measuring.clone(),
            answered: answered.clone(),
            total: None,
        };
        let pub_task = tokio::spawn(publisher(p.send, p.recv, load));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (cpu0, _) = r.stat();
        measuring.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        measuring.store(false, Ordering::Relaxed);
        let elapsed = t0.elapsed().as_secs_f64();
        let (cpu1, _) = r.stat();
        stop.store(true, Ordering::Relaxed);
        pub_task.await??;
        for l in &links {
            l.conn.close(0u32.into(), b"done");
        }
        p.conn.close(0u32.into(), b"done");
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        for c in collectors {
            h.add(&c.await?)?;
        }
        let pubs = answered.load(Ordering::Relaxed) as f64;
        let dels = delivered.load(Ordering::Relaxed) as f64;
        println!(
            "| {g} | {:.0} | {:.0} | {} | {} | {} | {:.2} | {:.2} |",
            pubs / elapsed,
            dels / elapsed,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            (cpu1 - cpu0) * 1e6 / pubs.max(1.0),
            dels / pubs.max(1.0),
        );
    }
    Ok(())
}

async fn memory(r: &RouterProc, n: usize, pubs: usize, size: usize) -> anyhow::Result<()> {
    let mut l = connect(r, 0).await?;
    // Deliveries flow back to this link: read and drop them.
    let conn = l.conn.clone();
    tokio::spawn(async move {
        while let Ok(mut s) = conn.accept_uni().await {
            tokio::spawn(async move { while let Ok(Some(_)) = s.read_chunk(1 << 20, true).await {} });
        }
    });
    let settle = || tokio::time::sleep(Duration::from_secs(2));
    settle().await;
    let (_, base) = r.stat();
    let row = |what: &str, before: u64, after: u64| {
        println!("| {what} | {n} | {:.0} |", (after.saturating_sub(before)) as f64 / n as f64);
    };
    println!("| state per channel | channels | router RSS bytes per channel |");
    println!("|---|---|---|");
    let history: Vec<String> = (0..n).map(|i| format!("chat:mem-{i}")).collect();
    let ephemeral: Vec<String> = (0..n).map(|i| format!("typing:mem-{i}")).collect();
    for chunk in history.chunks(1000) {
        send(&mut l.send, [ClusterMsg::Subscribe { channels: chunk.to_vec() }]).await?;
    }
    settle().await;
    let (_, interest) = r.stat();
    row("gateway interest, no publication", base, interest);
    let (stop, measuring, answered) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(true)), Arc::new(AtomicU64::new(0)));
    let p = connect(r, 1).await?;
    let total = (n * pubs) as u64;
    let load = |channels| Load {
        channels,
        window: 512,
        size,
        epoch: Instant::now(),
        stop: stop.clone(),
        measuring: measuring.clone(),
        answered: answered.clone(),
        total: Some(total),
    };
    publisher(p.send, p.recv, load(history)).await?;
    settle().await;
    let (_, with_history) = r.stat();
    row(&format!("+ {pubs} publications of {size} B kept in history"), interest, with_history);
    for chunk in ephemeral.chunks(1000) {
        send(&mut l.send, [ClusterMsg::Subscribe { channels: chunk.to_vec() }]).await?;
    }
    let p = connect(r, 2).await?;
    publisher(p.send, p.recv, load(ephemeral)).await?;
    settle().await;
    let (_, eph) = r.stat();
    row(&format!("ephemeral (no history): interest + {pubs} publications"), with_history, eph);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let r = RouterProc::start(&cli.router)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Fanout { gateways, secs, window, size } => fanout(&r, &gateways, secs, window, size).await,
            Cmd::Memory { channels, pubs, size } => memory(&r, channels, pubs, size).await,
        }
    })
}
