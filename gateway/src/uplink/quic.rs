//! The uplink's IO shell: one thread running tokio + quinn, holding a QUIC
//! connection (mutual TLS) to every configured router, feeding the
//! [`Uplink`] machine what the links and the cores send and carrying out
//! what it decides.
//!
//! Per link: a control stream (hello/welcome, requests, answers,
//! heartbeats) and the router's K delivery streams. A link is reset as a
//! whole when any of its streams fails, or when the router is silent for
//! [`ROUTER_SILENCE`]: a delivery stream that died alone would otherwise
//! stop every channel hashed to it while the link looked healthy.
//! Reconnects use exponential backoff with full jitter.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use proto::backoff::Backoff;
use proto::cluster::{ClusterDecoder, ClusterMsg, LinkCongestion, PROTOCOL_VERSION};
use proto::peer::RouterAddr;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;

use super::{Uplink, UplinkIo};
use crate::bridge::{CoreId, DownMsg, Inbox, UpMsg};
use crate::config::UplinkConfig;
use crate::metrics::Metrics;

/// ALPN of the cluster protocol (must match the router's).
pub const ALPN: &[u8] = b"switchyard-cluster/1";

/// How often the uplink heartbeats each router (the router answers).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// Silence after which a router is treated as lost.
pub const ROUTER_SILENCE: Duration = Duration::from_secs(10);

/// How often owed messages are retried (a full queue gives no signal when
/// it drains).
pub const RETRY_EVERY: Duration = Duration::from_millis(20);

/// Bytes of datagram copies a link holds unread at most (past it quinn
/// drops the oldest: the stream still brings them).
pub const DATAGRAM_BUFFER: usize = 1 << 20;

/// Messages queued toward one router at most (its writer batches them into
/// stream writes); past it the machine reconciles instead.
pub const LINK_QUEUE: usize = 65_536;

/// What a link task reports: its router's slot and the slot's generation.
enum Event {
    Up(usize, u64, mpsc::Sender<ClusterMsg>, u16),
    Down(usize, u64),
    Control(usize, u64, ClusterMsg),
    /// Messages of a router's delivery stream (deliveries, pushes, positions).
    Deliveries(usize, u64, Vec<ClusterMsg>),
    /// Datagram copies of a router's deliveries.
    Datagrams(usize, u64, Vec<ClusterMsg>),
}

/// The shell's side of [`UplinkIo`]: link queues and core inboxes.
struct Io {
    links: Vec<Option<mpsc::Sender<ClusterMsg>>>,
    cores: Vec<flume::Sender<Inbox>>,
}

impl UplinkIo for Io {
    fn to_router(&mut self, router: usize, msg: ClusterMsg) -> Result<(), ClusterMsg> {
        match &self.links[router] {
            Some(tx) => tx.try_send(msg).map_err(|e| e.into_inner()),
            None => Err(msg),
        }
    }

    fn to_core(&mut self, core: CoreId, msg: DownMsg) -> Result<(), DownMsg> {
        let Some(tx) = self.cores.get(core) else { return Err(msg) };
        tx.try_send(Inbox::Down(msg)).map_err(|e| match e.into_inner() {
            Inbox::Down(m) => m,
            _ => unreachable!("the uplink sends only its own messages"),
        })
    }
}

fn client_config(cfg: &UplinkConfig) -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&cfg.ca_cert)
        .with_context(|| format!("reading {}", cfg.ca_cert.display()))?
    {
        roots.add(c?)?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .with_context(|| format!("reading {}", cfg.cert.display()))?
        .collect::<Result<_, _>>()?;
    let key =
        PrivateKeyDer::from_pem_file(&cfg.key).with_context(|| format!("reading {}", cfg.key.display()))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut c = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(2)));
    transport.max_idle_timeout(Some(Duration::from_secs(10).try_into()?));
    // Datagrams are how a router offers its copies: accepting them (the
    // transport parameter) asks for them.
    transport.datagram_receive_buffer_size(cfg.datagram_copies.then_some(DATAGRAM_BUFFER));
    match cfg.congestion {
        LinkCongestion::Bbr => {
            transport.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        LinkCongestion::Cubic => {
            transport.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
    };
    c.transport_config(Arc::new(transport));
    Ok(c)
}

/// Who the routers are, as this gateway learns it.
enum Source {
    /// The configured list (`uplink.routers`).
    Static(Vec<RouterAddr>),
    /// A name re-resolved on an interval; every address gets the
    /// configured certificate name.
    Dns { name: String, addrs: tokio::sync::watch::Receiver<Vec<std::net::SocketAddr>> },
    /// The view of the routers registered in etcd.
    #[cfg(feature = "etcd")]
    Etcd(tokio::sync::watch::Receiver<Arc<proto::membership::View>>),
}

impl Source {
    /// The routers wanted now, and the membership revision (etcd).
    fn wanted(&mut self) -> (Vec<RouterAddr>, Option<i64>) {
        match self {
            Source::Static(r) => (r.clone(), None),
            Source::Dns { name, addrs } => {
                let a = addrs.borrow_and_update();
                (a.iter().map(|addr| RouterAddr { name: name.clone(), addr: *addr }).collect(), None)
            }
            #[cfg(feature = "etcd")]
            Source::Etcd(view) => {
                let v = view.borrow_and_update();
                (v.members().map(|m| m.router_addr()).collect(), Some(v.revision))
            }
        }
    }

    /// Resolves when the wanted set may have changed (never, for a static list).
    async fn changed(&mut self) {
        let ok = match self {
            Source::Static(_) => return std::future::pending().await,
            Source::Dns { addrs, .. } => addrs.changed().await.is_ok(),
            #[cfg(feature = "etcd")]
            Source::Etcd(view) => view.changed().await.is_ok(),
        };
        if !ok {
            std::future::pending::<()>().await;
        }
    }
}

/// One router's slot: its address, and the task keeping its link (with a
/// generation, so events of an aborted task are recognised and ignored).
struct Slot {
    router: RouterAddr,
    task: Option<tokio::task::AbortHandle>,
    generation: u64,
}

/// Starts the uplink thread. `cores` are the per-core inboxes; the returned
/// join handle ends when every core has dropped its sender. The routers are
/// `cfg.routers`, or those `cfg.dns` resolves to, or (with `etcd`) the
/// routers registered in etcd, with ownership over that view.
pub fn spawn(
    gateway_id: String,
    cfg: UplinkConfig,
    etcd: discovery::EtcdConfig,
    up_rx: flume::Receiver<Vec<UpMsg>>,
    cores: Vec<flume::Sender<Inbox>>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let client = client_config(&cfg)?;
    Ok(std::thread::Builder::new().name("uplink".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        rt.block_on(async move {
            let mut endpoint =
                quinn::Endpoint::client("0.0.0.0:0".parse().expect("static")).expect("udp socket");
            endpoint.set_default_client_config(client);
            let (ev_tx, mut ev_rx) = mpsc::channel::<Event>(4096);
            let mut source = source(&cfg, &etcd);
            let mut up = Uplink::new(cores.len(), Vec::new(), metrics.clone(), proto::seeded::random_seed());
            // A membership view: ownership over it, by name.
            let by_name = !matches!(source, Source::Static(_) | Source::Dns { .. });
            if by_name {
                up = up.strict();
            }
            let mut io = Io { links: Vec::new(), cores };
            let mut slots: Vec<Slot> = Vec::new();
            let spawn_link = |slot: &mut Slot, idx: usize| {
                slot.generation += 1;
                let (id, ep, ev, m) = (gateway_id.clone(), endpoint.clone(), ev_tx.clone(), metrics.clone());
                let task = tokio::spawn(router_link(idx, slot.generation, slot.router.clone(), id, ep, ev, m));
                slot.task = Some(task.abort_handle());
            };
            let apply = |source: &mut Source, up: &mut Uplink, io: &mut Io, slots: &mut Vec<Slot>| {
                let (wanted, revision) = source.wanted();
                for r in &wanted {
                    if !slots.iter().any(|s| s.router == *r) {
                        // With etcd the routers hash by name, as they do among
                        // themselves; otherwise by the address listed.
                        let hash = if by_name { r.name.clone() } else { r.addr.to_string() };
                        // A slot of a router gone for good is taken over.
                        let free = (0..slots.len())
                            .find(|&i| slots[i].task.is_none() && !wanted.contains(&slots[i].router) && up.slot_free(i));
                        match free {
                            Some(i) => {
                                up.reuse_router(i, hash, io);
                                slots[i].router = r.clone();
                                slots[i].generation += 1;
                            }
                            None => {
                                io.links.push(None);
                                let i = up.add_router(hash, io);
                                debug_assert_eq!(i, slots.len());
                                slots.push(Slot { router: r.clone(), task: None, generation: 0 });
                            }
                        }
                    }
                }
                for (i, slot) in slots.iter_mut().enumerate() {
                    let in_view = wanted.contains(&slot.router);
                    up.set_in_view(i, in_view, io);
                    match (in_view, slot.task.is_some()) {
                        (true, false) => spawn_link(slot, i),
                        (false, true) => {
                            tracing::info!(router = %slot.router, "router left the membership: unlinking");
                            slot.task.take().expect("checked").abort();
                            slot.generation += 1;
                            io.links[i] = None;
                            up.link_down(i, io);
                        }
                        _ => {}
                    }
                }
                metrics.routers_known.store(wanted.len() as u64, Ordering::Relaxed);
                if let Some(rev) = revision {
                    metrics.membership_revision.store(rev.max(0) as u64, Ordering::Relaxed);
                }
            };
            apply(&mut source, &mut up, &mut io, &mut slots);
            publish_unlinked(&up, &metrics);
            let mut retry = tokio::time::interval(RETRY_EVERY);
            retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let current = |slots: &[Slot], i: usize, g: u64| slots.get(i).is_some_and(|s| s.generation == g);
            loop {
                tokio::select! {
                    batch = up_rx.recv_async(), if up.takes_core_batches() => match batch {
                        Ok(batch) => up.core_batch(batch, &mut io),
                        Err(_) => break,
                    },
                    Some(ev) = ev_rx.recv() => match ev {
                        Event::Up(i, g, tx, version) if current(&slots, i, g) => {
                            tracing::info!(router = %slots[i].router, version, "router link up");
                            io.links[i] = Some(tx);
                            up.link_up(i, version, &mut io);
                            publish_unlinked(&up, &metrics);
                        }
                        Event::Down(i, g) if current(&slots, i, g) => {
                            if io.links[i].take().is_some() {
                                tracing::warn!(router = %slots[i].router, "router link down");
                            }
                            up.link_down(i, &mut io);
                            publish_unlinked(&up, &metrics);
                        }
                        Event::Control(i, g, msg) if current(&slots, i, g) => up.control(i, msg, &mut io),
                        Event::Deliveries(i, g, msgs) if current(&slots, i, g) => up.deliveries(i, msgs, &mut io),
                        Event::Datagrams(i, g, msgs) if current(&slots, i, g) => {
                            up.datagram_deliveries(i, msgs, &mut io)
                        }
                        _ => {} // from a link this uplink has since dropped
                    },
                    _ = source.changed() => {
                        apply(&mut source, &mut up, &mut io, &mut slots);
                        publish_unlinked(&up, &metrics);
                    }
                    _ = retry.tick() => up.tick(&mut io),
                }
            }
            tracing::info!(gateway = %gateway_id, "uplink stopping");
            for l in io.links.iter().flatten() {
                let _ = l.try_send(ClusterMsg::Drain);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
    })?)
}

/// Where the routers come from: etcd when configured, else DNS, else the list.
fn source(cfg: &UplinkConfig, etcd: &discovery::EtcdConfig) -> Source {
    #[cfg(feature = "etcd")]
    if etcd.enabled() {
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(proto::membership::View::default()));
        tokio::spawn(discovery::etcd::watch_views(etcd.clone(), tx, None));
        return Source::Etcd(rx);
    }
    #[cfg(not(feature = "etcd"))]
    let _ = etcd;
    if let Some(target) = &cfg.dns {
        let (tx, rx) = tokio::sync::watch::channel(Vec::new());
        tokio::spawn(discovery::dns::watch_addresses(target.clone(), cfg.dns_interval(), tx));
        return Source::Dns { name: cfg.dns_name.clone(), addrs: rx };
    }
    Source::Static(cfg.routers.clone())
}

/// Tells the admin port which routers of the membership are not linked.
fn publish_unlinked(up: &Uplink, metrics: &Metrics) {
    let names: Vec<String> = up.unlinked_in_view().into_iter().map(str::to_owned).collect();
    *metrics.unlinked_routers.lock().expect("not poisoned") = names;
}

async fn read_msgs(
    recv: &mut quinn::RecvStream,
    dec: &mut ClusterDecoder,
    buf: &mut BytesMut,
) -> anyhow::Result<Option<Vec<ClusterMsg>>> {
    loop {
        let mut out = Vec::new();
        while let Some(m) = dec.decode(buf)? {
            out.push(m);
        }
        if !out.is_empty() {
            return Ok(Some(out));
        }
        match recv.read_chunk(256 * 1024, true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None => return Ok(None),
        }
    }
}

async fn router_link(
    idx: usize,
    generation: u64,
    router: RouterAddr,
    gateway_id: String,
    endpoint: quinn::Endpoint,
    events: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let instance: u64 = rand::random();
    loop {
        let at = (idx, generation);
        match connect_once(at, &router, &gateway_id, instance, &endpoint, &events, &mut backoff).await {
            Ok(()) => tracing::info!(%router, "router link closed"),
            // A certificate that is not the named router's is refused at
            // every attempt: say so where it is seen.
            Err(e) if is_bad_certificate(&e) => {
                metrics.router_link_refusals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(%router, error = %e, "router link refused in the TLS handshake");
            }
            Err(e) => tracing::info!(%router, error = %e, "router link failed"),
        }
        if events.send(Event::Down(idx, generation)).await.is_err() {
            return;
        }
        let delay = backoff.next_delay(&mut rand::rng());
        tokio::time::sleep(delay).await;
    }
}

/// Whether a link failed in the TLS handshake (a certificate refused on
/// either side): QUIC carries TLS alerts as transport errors 0x100–0x1ff.
fn is_bad_certificate(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let code = match c.downcast_ref::<quinn::ConnectionError>() {
            Some(quinn::ConnectionError::TransportError(t)) => t.code,
            Some(quinn::ConnectionError::ConnectionClosed(close)) => close.error_code,
            _ => return false,
        };
        (0x100..0x200).contains(&u64::from(code))
    })
}

async fn connect_once(
    (idx, generation): (usize, u64),
    router: &RouterAddr,
    gateway_id: &str,
    instance: u64,
    endpoint: &quinn::Endpoint,
    events: &mpsc::Sender<Event>,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    // The router's certificate must be valid for the name it is listed by.
    let conn = endpoint.connect(router.addr, &router.name)?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut out = BytesMut::new();
    ClusterMsg::Hello { version: PROTOCOL_VERSION, gateway_id: gateway_id.to_owned(), instance }
        .encode(&mut out);
    send.write_all(&out).await?;
    let mut dec = ClusterDecoder::default();
    let mut buf = BytesMut::new();
    let first =
        tokio::time::timeout(Duration::from_secs(10), read_msgs(&mut recv, &mut dec, &mut buf)).await??;
    let (version, mut pending) = match first {
        Some(mut msgs) => match msgs.first() {
            Some(ClusterMsg::Welcome { version, .. }) => (*version, msgs.split_off(1)),
            other => anyhow::bail!("router refused the link: {other:?}"),
        },
        None => anyhow::bail!("router closed before welcome"),
    };
    backoff.reset();
    let (tx, mut rx) = mpsc::channel::<ClusterMsg>(LINK_QUEUE);
    let hb_tx = tx.clone();
    events.send(Event::Up(idx, generation, tx, version)).await.ok();
    for m in pending.drain(..) {
        events.send(Event::Control(idx, generation, m)).await.ok();
    }
    // Writer: batch everything queued into one write.
    let writer = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(1024);
        let mut out = BytesMut::with_capacity(64 * 1024);
        while rx.recv_many(&mut batch, 1024).await > 0 {
            for m in batch.drain(..) {
                m.encode(&mut out);
            }
            send.write_all(&out.split()).await?;
        }
        anyhow::Ok(())
    });
    // Delivery streams: a reader that ends, for any reason, ends the link.
    let (broken_tx, mut broken) = mpsc::channel::<anyhow::Error>(1);
    let conn2 = conn.clone();
    let ev2 = events.clone();
    let deliveries = tokio::spawn(async move {
        while let Ok(mut s) = conn2.accept_uni().await {
            let (ev, broken_tx) = (ev2.clone(), broken_tx.clone());
            tokio::spawn(async move {
                let mut dec = ClusterDecoder::default();
                let mut buf = BytesMut::new();
                let why = loop {
                    match read_msgs(&mut s, &mut dec, &mut buf).await {
                        Ok(Some(msgs)) => {
                            if ev.send(Event::Deliveries(idx, generation, msgs)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break anyhow::anyhow!("a delivery stream ended"),
                        Err(e) => break e.context("a delivery stream failed"),
                    }
                };
                let _ = broken_tx.try_send(why);
            });
        }
    });
    // Datagram copies (when this gateway asked for them): each datagram is
    // whole messages; one that does not decode is dropped (the stream
    // brings what it held).
    let (conn3, ev3) = (conn.clone(), events.clone());
    let datagrams = tokio::spawn(async move {
        while let Ok(d) = conn3.read_datagram().await {
            let mut dec = ClusterDecoder::default();
            let mut buf = BytesMut::from(&d[..]);
            let mut msgs = Vec::new();
            while let Ok(Some(m)) = dec.decode(&mut buf) {
                msgs.push(m);
            }
            if !msgs.is_empty() && ev3.send(Event::Datagrams(idx, generation, msgs)).await.is_err() {
                return;
            }
        }
    });
    // Heartbeats: the router answers each; a router silent for
    // `ROUTER_SILENCE` is treated as lost (channels move, subscribers resync).
    let heartbeat = tokio::spawn(async move {
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        loop {
            tick.tick().await;
            seq += 1;
            if hb_tx.send(ClusterMsg::Heartbeat { seq, reply: false }).await.is_err() {
                return;
            }
        }
    });
    let result = async {
        loop {
            let read = tokio::select! {
                r = tokio::time::timeout(ROUTER_SILENCE, read_msgs(&mut recv, &mut dec, &mut buf)) => r,
                Some(why) = broken.recv() => return Err(why),
            };
            let Ok(read) = read else {
                anyhow::bail!("router silent for {ROUTER_SILENCE:?}");
            };
            let Some(msgs) = read? else { return anyhow::Ok(()) };
            for m in msgs {
                events.send(Event::Control(idx, generation, m)).await.ok();
            }
        }
    }
    .await;
    heartbeat.abort();
    writer.abort();
    deliveries.abort();
    datagrams.abort();
    conn.close(0u32.into(), b"bye");
    result
}
