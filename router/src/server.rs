//! The QUIC endpoint and one task set per gateway link.
//!
//! A gateway opens one bidirectional control stream and sends `Hello`; the
//! router answers `Welcome` (or `Refuse` for an unknown version and closes),
//! then opens K unidirectional delivery streams. Deliveries of a channel
//! always travel on stream `hash(channel) mod K`, so they stay ordered per
//! channel while a burst on one channel never blocks the others. Every write
//! batches what is queued (quinn collapses with one message per write).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use proto::cluster::{ClusterDecoder, ClusterMsg, LinkCongestion, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use proto::peer::{HEADER_MAX, PEER_ALPN, decode_request, encode_reply};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;

use crate::config::RouterConfig;
use crate::link::Dispatch;
use crate::peers::{PeerTls, Peers};
use crate::shard::{GatewayId, Metrics, SHARD_TICK, Shard, ShardCmd, ShardSpec};

/// How long after its stream copy is queued a delivery's datagram copy
/// leaves.
pub const COPY_DELAY: Duration = Duration::from_millis(1);

/// Datagrams of copies queued toward one gateway at most (past it copies
/// are dropped; the stream carries everything).
pub const COPY_QUEUE: usize = 4096;

/// ALPN of the cluster protocol.
pub const ALPN: &[u8] = b"switchyard-cluster/1";

/// Commands one gateway link holds for the shards at most (~150 B each:
/// ~1.2 MB a link). The link's reader answers heartbeats as it reads, and
/// hands everything else to the shards through this queue, so a shard busy
/// for seconds (a table of half a million users growing, on a loaded box)
/// does not leave the gateways without answers: at a few hundred commands
/// a second a link, the queue lasts far longer than that. Full, the reader
/// waits (QUIC flow control holds the gateway back) and heartbeats wait
/// with it.
pub const LINK_INBOUND: usize = 8192;

/// QUIC application close code for a peer call from a certificate that is
/// not a configured peer's.
pub const NOT_A_PEER: u32 = 0x5045;

/// The ALPN a connection agreed on.
fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol
}

/// A linked gateway as its id names it: its link, protocol version and queue.
type NamedLink = (GatewayId, u16, mpsc::Sender<ClusterMsg>);

/// A running router: the shards and the endpoint.
pub struct Router {
    cfg: RouterConfig,
    shards: Vec<mpsc::Sender<ShardCmd>>,
    metrics: Arc<Metrics>,
    next_gateway: AtomicU32,
    instance: u64,
    started: std::time::Instant,
    peers: Peers,
    /// Control queues of the connected gateways (for the drain notice).
    links: std::sync::Mutex<HashMap<GatewayId, mpsc::Sender<ClusterMsg>>>,
    /// The connected gateways by their id (config), with their link and
    /// protocol version: where an emulated session's commands are relayed.
    named: std::sync::Mutex<HashMap<String, NamedLink>>,
    /// Turns true when the router leaves (drain): its etcd lease is revoked.
    leave: tokio::sync::watch::Sender<bool>,
    /// Its etcd lease, as the shards read it.
    lease: Arc<crate::shard::LeaseCell>,
}

/// The endpoint's TLS: router certificate (checked to be valid for the
/// router's `name`), client certificates required from the CA, ALPN of
/// gateway links and of peer calls.
fn load_tls(cfg: &RouterConfig) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&cfg.tls.ca_cert).with_context(|| path_ctx(&cfg.tls.ca_cert))? {
        roots.add(c?)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.tls.cert)
        .with_context(|| path_ctx(&cfg.tls.cert))?
        .collect::<Result<_, _>>()?;
    let Some(leaf) = certs.first() else { anyhow::bail!("{} holds no certificate", cfg.tls.cert.display()) };
    if !crate::peers::cert_is_for(leaf, &cfg.name) {
        anyhow::bail!(
            "the certificate {} is not valid for this router's name {:?} (config key `name`; \
             `router certs --names {}` issues one)",
            cfg.tls.cert.display(),
            cfg.name,
            cfg.name
        );
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.tls.key).with_context(|| path_ctx(&cfg.tls.key))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec(), PEER_ALPN.to_vec()];
    Ok(tls)
}

/// The endpoint's stateless-reset key and connection-id generator, both
/// derived from the router's private key so they survive restarts (and
/// differ between routers): a restarted router recognises its predecessor's
/// connection ids and answers them with a valid stateless reset.
fn endpoint_config(cfg: &RouterConfig) -> anyhow::Result<quinn::EndpointConfig> {
    let key = std::fs::read(&cfg.tls.key).with_context(|| path_ctx(&cfg.tls.key))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"switchyard stateless reset key\0");
    ctx.update(&key);
    let seed = ctx.finish();
    let seed = seed.as_ref();
    let mut ep = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, seed)));
    let cid_key = u64::from_le_bytes(seed[..8].try_into().expect("a SHA-256 digest has 32 bytes"));
    ep.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    Ok(ep)
}

fn path_ctx(p: &Path) -> String {
    format!("reading {} (create development files with `router certs`)", p.display())
}

impl Router {
    /// Builds the shards (spawned on the current tokio runtime) and the
    /// client side of peer calls.
    pub fn start(cfg: RouterConfig) -> anyhow::Result<Arc<Router>> {
        let metrics = Arc::new(Metrics::default());
        let namespaces = Arc::new(cfg.namespaces.clone());
        let lease = Arc::new(crate::shard::LeaseCell::new(std::time::Instant::now()));
        let fence = cfg.etcd.enabled().then(|| crate::shard::FenceSpec {
            me: cfg.name.clone(),
            lease: lease.clone(),
            freshness: cfg.etcd.ttl(),
            claim_delay: proto::membership::claim_delay(cfg.etcd.ttl(), cfg.etcd.fence_margin()),
        });
        let shards = (0..cfg.shards.max(1))
            .map(|i| {
                let (tx, rx) = mpsc::channel(16_384);
                let shard = Shard::new(ShardSpec {
                    namespaces: namespaces.clone(),
                    max_recover: cfg.max_recover,
                    grace: Duration::from_secs(cfg.presence_grace_secs),
                    metrics: metrics.clone(),
                    seed: proto::seeded::random_seed(),
                    max_channels: cfg.max_channels.div_ceil(cfg.shards.max(1)),
                    now: std::time::Instant::now(),
                    fence: fence.clone(),
                });
                // Each shard on a thread of its own: a long step (a table
                // of half a million users growing, a million members
                // leaving at once) must not take the links' runtime, whose
                // tasks answer the gateways' heartbeats (with LINK_INBOUND;
                // BENCHMARKS.md, one million sessions).
                std::thread::Builder::new().name(format!("shard-{i}")).spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_time()
                        // As the links' workers do: memory the shard freed
                        // goes back to the OS when it idles.
                        // SAFETY: mi_collect only walks the calling thread's heap.
                        .on_thread_park(|| unsafe { libmimalloc_sys::mi_collect(false) })
                        .build()
                        .expect("a shard's runtime");
                    rt.block_on(run_shard(shard, rx));
                })?;
                Ok(tx)
            })
            .collect::<anyhow::Result<_>>()?;
        let tls = PeerTls { ca_cert: &cfg.tls.ca_cert, cert: &cfg.tls.cert, key: &cfg.tls.key };
        let etcd = cfg.etcd.enabled().then(|| (cfg.name.clone(), lease.clone()));
        let peers = Peers::new(cfg.me_quic(), cfg.quic_listen, cfg.peers.clone(), Some(tls), etcd)?;
        Ok(Arc::new(Router {
            lease,
            cfg,
            shards,
            metrics,
            next_gateway: AtomicU32::new(1),
            instance: rand::random(),
            started: std::time::Instant::now(),
            peers,
            links: std::sync::Mutex::new(HashMap::new()),
            named: std::sync::Mutex::new(HashMap::new()),
            leave: tokio::sync::watch::Sender::new(false),
        }))
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// Its etcd lease (written by the registration, read by the shards).
    pub fn lease(&self) -> &Arc<crate::shard::LeaseCell> {
        &self.lease
    }

    /// Turns true when the router leaves the cluster.
    pub fn leave_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.leave.subscribe()
    }

    /// The cluster as the HTTP API sees it.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Drain (SIGTERM): `/readyz` turns 503 (peers stop forwarding here),
    /// every gateway is told, and moves its interest in this router's
    /// channels to their next owner (a new epoch there: subscribers resync
    /// with `recovered: false`, nothing is lost silently). Requests still in
    /// flight are answered for `drain_secs` (less once no gateway is linked),
    /// then the router exits.
    pub async fn drain(&self) {
        self.peers.set_draining();
        self.leave.send_replace(true);
        let links: Vec<_> = self.links.lock().expect("not poisoned").values().cloned().collect();
        tracing::info!(gateways = links.len(), window = ?self.cfg.drain(), "draining");
        for tx in links {
            let _ = tx.send(ClusterMsg::Drain).await;
        }
        // Done at the window's end, or as soon as no gateway is linked.
        let end = tokio::time::Instant::now() + self.cfg.drain();
        while tokio::time::Instant::now() < end && !self.links.lock().expect("not poisoned").is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::info!("drained");
    }

    /// The router's id.
    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    /// Random per process start.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// When the router started.
    pub fn started(&self) -> std::time::Instant {
        self.started
    }

    /// The HTTP API key.
    pub fn api_key(&self) -> &str {
        &self.cfg.api_key
    }

    /// Whether `/metrics` is served on the API port too.
    pub fn metrics_on_api(&self) -> bool {
        self.cfg.metrics_on_api
    }

    /// The shards' inboxes.
    pub fn shards(&self) -> &[mpsc::Sender<ShardCmd>] {
        &self.shards
    }

    /// Prometheus text.
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        let mut out = String::new();
        for (name, v) in [
            ("switchyard_router_publications_total", &m.publications),
            ("switchyard_router_gateway_sends_total", &m.gateway_sends),
            ("switchyard_router_join_leave_pushes_total", &m.pushes),
            ("switchyard_router_gateway_queue_full_total", &m.gateway_queue_full),
            ("switchyard_router_link_errors_total", &m.link_errors),
            ("switchyard_router_gateway_evictions_total", &m.evictions),
            ("switchyard_router_emulations_relayed_total", &m.emulations_relayed),
            ("switchyard_router_emulations_dropped_total", &m.emulations_dropped),
            ("switchyard_router_channels_evicted_total", &m.channels_evicted),
            ("switchyard_router_user_commands_total", &m.user_commands),
            ("switchyard_router_channel_limit_refusals_total", &m.channel_limit_refusals),
            ("switchyard_router_peer_refusals_total", &m.peer_refusals),
        ] {
            out.push_str(&format!("# TYPE {name} counter\n{name} {}\n", v.load(Ordering::Relaxed)));
        }
        out.push_str("# TYPE switchyard_router_hop_seconds histogram\n");
        m.hop_api_to_shard.render(&mut out, "switchyard_router_hop_seconds", "hop", "api_to_shard");
        m.hop_shard_to_link_write.render(
            &mut out,
            "switchyard_router_hop_seconds",
            "hop",
            "shard_to_link_write",
        );
        out.push_str(&format!(
            "# TYPE switchyard_router_channels gauge\nswitchyard_router_channels {}\n",
            m.channels.load(Ordering::Relaxed)
        ));
        if self.cfg.etcd.enabled() {
            let view = self.peers.view();
            let live = self.peers.lease_live(std::time::Instant::now());
            for (name, kind, v) in [
                ("switchyard_router_membership_revision", "gauge", view.revision.max(0) as u64),
                ("switchyard_router_membership_routers", "gauge", view.len() as u64),
                ("switchyard_router_lease_live", "gauge", u64::from(live)),
                (
                    "switchyard_router_ownership_moves_total",
                    "counter",
                    m.ownership_moves.load(Ordering::Relaxed),
                ),
                ("switchyard_router_fenced_publications_total", "counter", m.fenced.load(Ordering::Relaxed)),
            ] {
                out.push_str(&format!("# TYPE {name} {kind}\n{name} {v}\n"));
            }
        }
        let ready = self.peers.ready_peers().len();
        out.push_str(&format!(
            "# TYPE switchyard_router_peers_ready gauge\nswitchyard_router_peers_ready {ready}\n"
        ));
        out.push_str(&format!(
            "# TYPE switchyard_router_peer_call_failures_total counter\nswitchyard_router_peer_call_failures_total {}\n",
            self.peers.call_failures()
        ));
        let links = self.links.lock().expect("not poisoned").len();
        out.push_str(&format!(
            "# TYPE switchyard_router_gateway_links gauge\nswitchyard_router_gateway_links {links}\n"
        ));
        out
    }

    /// Counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The channel namespaces.
    pub(crate) fn namespaces(&self) -> &proto::namespace::Namespaces {
        &self.cfg.namespaces
    }

    pub(crate) fn shard_of(&self, channel: &str) -> &mpsc::Sender<ShardCmd> {
        &self.shards[crate::link::shard_of(channel, self.shards.len())]
    }

    /// Binds the QUIC endpoint and serves gateway links until the endpoint closes.
    pub async fn serve_links(self: Arc<Self>) -> anyhow::Result<()> {
        let tls = load_tls(&self.cfg)?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(self.cfg.evict_after().try_into()?));
        transport.keep_alive_interval(Some(self.cfg.heartbeat()));
        transport.max_concurrent_uni_streams(0u32.into());
        transport.max_concurrent_bidi_streams(crate::peers::MAX_CALLS_IN_FLIGHT.into());
        match self.cfg.link_congestion {
            LinkCongestion::Bbr => {
                transport.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
            LinkCongestion::Cubic => {
                transport.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
        };
        server.transport_config(Arc::new(transport));
        // Stateless resets from a stable key: a router restarted on the same
        // address answers packets of its predecessor's connections with a
        // valid reset, so gateways notice at once instead of after a timeout.
        let endpoint = quinn::Endpoint::new(
            endpoint_config(&self.cfg)?,
            Some(server),
            std::net::UdpSocket::bind(self.cfg.quic_listen)?,
            Arc::new(quinn::TokioRuntime),
        )?;
        tracing::info!(addr = %self.cfg.quic_listen, id = %self.cfg.id, "router listening for gateways");
        while let Some(incoming) = endpoint.accept().await {
            let router = self.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Ok(conn) if alpn(&conn).as_deref() == Some(PEER_ALPN) => router.serve_peer(conn).await,
                    Ok(conn) => {
                        let remote = conn.remote_address();
                        if let Err(e) = router.clone().link(conn).await {
                            tracing::info!(%remote, error = %e, "gateway link ended");
                        }
                    }
                    Err(e) => tracing::info!(error = %e, "link handshake failed"),
                }
            });
        }
        Ok(())
    }

    /// Serves calls from another router: only when its certificate is valid
    /// for the name of a configured peer (any other is closed with
    /// [`NOT_A_PEER`]). Each call is one bidirectional stream; at most
    /// `MAX_CALLS_IN_FLIGHT` at once per peer (QUIC stream credit).
    async fn serve_peer(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let cert = conn
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().cloned());
        if !cert.is_some_and(|c| self.peers.is_peer(&c)) {
            self.metrics.peer_refusals.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%remote, "refused a peer call: the certificate is not a configured peer's");
            conn.close(NOT_A_PEER.into(), b"not a configured peer");
            return;
        }
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let router = self.clone();
            tokio::spawn(async move {
                let (status, body) = match recv.read_to_end(crate::api::MAX_BODY + HEADER_MAX).await {
                    Ok(req) => match decode_request(&req) {
                        Ok((method, body)) => router.peer_call(method, body).await,
                        Err(e) => (400, e.to_string().into_bytes()),
                    },
                    Err(quinn::ReadToEndError::TooLong) => (413, Vec::new()),
                    Err(_) => return,
                };
                if send.write_all(&encode_reply(status, &body)).await.is_ok() {
                    let _ = send.finish();
                }
            });
        }
    }

    async fn link(self: Arc<Self>, conn: quinn::Connection) -> anyhow::Result<()> {
        let (mut ctl_send, mut ctl_recv) = conn.accept_bi().await?;
        let mut decoder = ClusterDecoder::default();
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let hello =
            tokio::time::timeout(Duration::from_secs(10), read_msg(&mut ctl_recv, &mut decoder, &mut buf))
                .await
                .context("no hello in time")??;
        let (gateway_id, version) = match hello {
            Some(ClusterMsg::Hello { version, gateway_id, .. })
                if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) =>
            {
                (gateway_id, version)
            }
            Some(ClusterMsg::Hello { version, .. }) => {
                let mut out = BytesMut::new();
                ClusterMsg::Refuse { reason: format!("unsupported protocol version {version}") }
                    .encode(&mut out);
                ctl_send.write_all(&out).await?;
                ctl_send.finish()?;
                conn.closed().await;
                anyhow::bail!("refused gateway with protocol version {version}");
            }
            _ => {
                conn.close(1u32.into(), b"expected hello");
                anyhow::bail!("first message was not hello");
            }
        };
        let gw: GatewayId = self.next_gateway.fetch_add(1, Ordering::Relaxed);
        tracing::info!(gateway = %gateway_id, link = gw, version, "gateway connected");

        let (tx, mut rx) = mpsc::channel::<ClusterMsg>(self.cfg.gateway_queue.max(16));
        self.links.lock().expect("not poisoned").insert(gw, tx.clone());
        // When the oldest delivery the shards queued here and the writer
        // has not written yet was queued (the writer takes it per batch).
        let oldest = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let replaced =
            self.named.lock().expect("not poisoned").insert(gateway_id.clone(), (gw, version, tx.clone()));
        if let Some((other, _, old)) = replaced
            && !old.is_closed()
        {
            // Two live gateways with one id: relays by id reach the newer
            // only (each gateway's `id` must be unique; the default is
            // `gw-<pid>`, which repeats across containers).
            tracing::warn!(gateway = %gateway_id, link = gw, other, "a linked gateway already has this id");
        }
        for s in &self.shards {
            let link = crate::shard::GatewayTx { tx: tx.clone(), oldest: oldest.clone() };
            s.send(ShardCmd::GatewayUp { gw, tx: link, version }).await?;
        }
        let mut welcome = BytesMut::new();
        ClusterMsg::Welcome { version, router_id: self.cfg.id.clone(), instance: self.instance }
            .encode(&mut welcome);
        ctl_send.write_all(&welcome).await?;

        // Writer: batches everything queued toward this gateway into as few
        // stream writes as possible; deliveries go to their channel's stream.
        let k = self.cfg.delivery_streams.max(1);
        let mut delivery = Vec::with_capacity(k);
        for _ in 0..k {
            delivery.push(conn.open_uni().await?);
        }
        // A gateway that accepts datagrams (its transport parameters) gets a
        // datagram copy of every positioned delivery besides the ordered
        // stream: across a lossy WAN it takes whichever copy comes first.
        let copies = conn.clone();
        // The copies leave a moment after the stream's bytes are handed to
        // quinn, so that the two copies of a publication rarely share a
        // packet (one loss would take both; measured: sent at once, the
        // copies did not lower the WAN's p99 at all): a task of their own
        // sends them COPY_DELAY after they are queued. A copy that does not
        // fit its bounded queue is dropped: the stream still carries it.
        let (copy_tx, mut copy_rx) = mpsc::channel::<bytes::Bytes>(COPY_QUEUE);
        let datagram_conn = conn.clone();
        let copier = tokio::spawn(async move {
            let mut held = Vec::new();
            while copy_rx.recv_many(&mut held, 256).await > 0 {
                tokio::time::sleep(COPY_DELAY).await;
                while let Ok(d) = copy_rx.try_recv() {
                    held.push(d);
                }
                for d in held.drain(..) {
                    let _ = datagram_conn.send_datagram(d);
                }
            }
        });
        let metrics = self.metrics.clone();
        // A gateway that reads stamps gets one ahead of each batch of
        // deliveries on a stream: its per-hop latency (the link's hop).
        let stamps = version >= proto::cluster::EMULATION_SINCE;
        let writer = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(1024);
            let mut ctl_buf = BytesMut::with_capacity(64 * 1024);
            let mut bufs: Vec<BytesMut> = (0..k).map(|_| BytesMut::with_capacity(64 * 1024)).collect();
            let mut datagram = BytesMut::new();
            while rx.recv_many(&mut batch, 1024).await > 0 {
                // The batch's stamp, taken as it is drained: deliveries
                // queued while it is written stamp the next one.
                let queued = oldest.swap(0, Ordering::Relaxed);
                let max = copies.max_datagram_size();
                let unix_micros = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64);
                for msg in batch.drain(..) {
                    match crate::link::stream_of(&msg, k) {
                        Some(i) => {
                            if stamps && bufs[i].is_empty() && matches!(msg, ClusterMsg::Deliver { .. }) {
                                ClusterMsg::Stamp { unix_micros }.encode(&mut bufs[i]);
                            }
                            let at = bufs[i].len();
                            msg.encode(&mut bufs[i]);
                            if let (Some(max), ClusterMsg::Deliver { publication, .. }) = (max, &msg)
                                && publication.offset != 0
                            {
                                let encoded = &bufs[i][at..];
                                if datagram.len() + encoded.len() > max && !datagram.is_empty() {
                                    let _ = copy_tx.try_send(datagram.split().freeze());
                                }
                                // Larger than a datagram: the stream alone carries it.
                                if encoded.len() <= max {
                                    datagram.extend_from_slice(encoded);
                                }
                            }
                        }
                        None => msg.encode(&mut ctl_buf),
                    }
                }
                if !datagram.is_empty() {
                    let _ = copy_tx.try_send(datagram.split().freeze());
                }
                if !ctl_buf.is_empty() {
                    ctl_send.write_all(&ctl_buf.split()).await?;
                }
                for (i, b) in bufs.iter_mut().enumerate() {
                    if !b.is_empty() {
                        delivery[i].write_all(&b.split()).await?;
                    }
                }
                if queued != 0 {
                    let took = crate::shard::clock_nanos().saturating_sub(queued);
                    metrics.hop_shard_to_link_write.record_us(took / 1000);
                }
            }
            anyhow::Ok(())
        });

        if self.peers.draining() {
            let _ = tx.send(ClusterMsg::Drain).await;
        }
        // The link's commands go to the shards in order from a task of
        // their own, behind a bounded queue (see LINK_INBOUND).
        let (inbound, mut queued) = mpsc::channel::<(usize, ShardCmd)>(LINK_INBOUND);
        let shards = self.shards.clone();
        let dispatcher = tokio::spawn(async move {
            while let Some((i, cmd)) = queued.recv().await {
                if shards[i].send(cmd).await.is_err() {
                    return;
                }
            }
        });
        let result = self.read_loop(gw, &tx, &inbound, &mut ctl_recv, &mut decoder, &mut buf).await;
        // Everything the link sent reaches its shard before the link's end.
        drop(inbound);
        let _ = dispatcher.await;
        self.links.lock().expect("not poisoned").remove(&gw);
        {
            let mut named = self.named.lock().expect("not poisoned");
            if named.get(&gateway_id).is_some_and(|(id, _, _)| *id == gw) {
                named.remove(&gateway_id);
            }
        }
        for s in &self.shards {
            let _ = s.send(ShardCmd::GatewayDown(gw)).await;
        }
        writer.abort();
        copier.abort();
        tracing::info!(gateway = %gateway_id, link = gw, "gateway disconnected");
        result
    }

    /// Relays an emulated session's commands to the gateway their node
    /// names, if it is linked here and speaks emulation; dropped otherwise,
    /// or when its queue is full (the client's command times out and it
    /// reconnects), and counted.
    fn relay(&self, msg: ClusterMsg) {
        let ClusterMsg::Emulation { node, .. } = &msg else { return };
        let gateway = node.rsplit_once('/').map_or(node.as_str(), |(g, _)| g);
        let target = self.named.lock().expect("not poisoned").get(gateway).cloned();
        let sent = match target {
            Some((_, version, tx)) if version >= proto::cluster::EMULATION_SINCE => tx.try_send(msg).is_ok(),
            _ => false,
        };
        let counter = if sent { &self.metrics.emulations_relayed } else { &self.metrics.emulations_dropped };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    async fn read_loop(
        &self,
        gw: GatewayId,
        tx: &mpsc::Sender<ClusterMsg>,
        inbound: &mpsc::Sender<(usize, ShardCmd)>,
        recv: &mut quinn::RecvStream,
        decoder: &mut ClusterDecoder,
        buf: &mut BytesMut,
    ) -> anyhow::Result<()> {
        let evict_after = self.cfg.evict_after();
        loop {
            // A gateway heartbeats every few seconds; one silent for the
            // eviction timeout is gone (its users enter the grace period),
            // even if QUIC still considers the path alive.
            let Ok(read) = tokio::time::timeout(evict_after, read_msg(recv, decoder, buf)).await else {
                self.metrics.evictions.fetch_add(1, Ordering::Relaxed);
                anyhow::bail!("no message for {evict_after:?}: gateway evicted");
            };
            let msg = match read {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.metrics.link_errors.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            };
            match crate::link::dispatch(gw, msg, self.shards.len(), &self.cfg.namespaces) {
                Dispatch::Heartbeat(answer) => {
                    let _ = tx.try_send(answer);
                }
                Dispatch::Nothing => {}
                Dispatch::Shards(cmds) => {
                    for (i, cmd) in cmds {
                        inbound.send((i, cmd)).await?;
                    }
                }
                Dispatch::Relay(msg) => self.relay(msg),
                Dispatch::Unexpected(name) => {
                    self.metrics.link_errors.fetch_add(1, Ordering::Relaxed);
                    anyhow::bail!("unexpected {name} from a gateway");
                }
            }
        }
    }
}

/// A shard's IO shell: commands in batches as they come, and the tick.
async fn run_shard(mut shard: Shard, mut rx: mpsc::Receiver<ShardCmd>) {
    let mut batch = Vec::with_capacity(256);
    let mut tick = tokio::time::interval(SHARD_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, 256) => {
                if n == 0 {
                    return;
                }
                let now = std::time::Instant::now();
                for cmd in batch.drain(..) {
                    shard.handle(cmd, now);
                }
                shard.flush_lagging();
            }
            _ = tick.tick() => shard.tick(std::time::Instant::now()),
        }
    }
}

async fn read_msg(
    recv: &mut quinn::RecvStream,
    decoder: &mut ClusterDecoder,
    buf: &mut BytesMut,
) -> anyhow::Result<Option<ClusterMsg>> {
    loop {
        if let Some(m) = decoder.decode(buf)? {
            return Ok(Some(m));
        }
        match recv.read_chunk(64 * 1024, true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None if buf.is_empty() => return Ok(None),
            None => anyhow::bail!("link closed mid-frame"),
        }
    }
}
