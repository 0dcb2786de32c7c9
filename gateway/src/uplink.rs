//! The uplink: one thread running tokio + quinn, holding a QUIC connection
//! (mutual TLS) to every configured router.
//!
//! It keeps `channel → bitmask of cores` and tells a channel's owning router
//! only about the gateway's 0→1 and 1→0 transitions. Each publication that
//! arrives is framed **once** (one `pub` push, or several of one channel that
//! arrived together packed into one text frame) and handed, as the same
//! `Bytes`, to exactly the cores whose bit is set.
//!
//! Ownership is the rendezvous hash of the channel over the routers that are
//! connected; when a router comes or goes, the channels whose owner changed
//! are re-subscribed at their new owner and their local subscribers are told
//! to resync (resubscribe with recovery), so nothing is lost silently.
//! Reconnects use exponential backoff with full jitter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use proto::backoff::Backoff;
use proto::client::reply::pub_push;
use proto::cluster::{ClusterDecoder, ClusterMsg, PROTOCOL_VERSION};
use proto::rendezvous::ranked;
use proto::ws::SharedFrame;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;

use crate::bridge::{CoreId, DownMsg, UpMsg, core_of};
use crate::config::UplinkConfig;
use crate::metrics::Metrics;

/// ALPN of the cluster protocol (must match the router's).
pub const ALPN: &[u8] = b"switchyard-cluster/1";

/// How often the uplink heartbeats each router (the router answers).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

/// Silence after which a router is treated as lost.
pub const ROUTER_SILENCE: Duration = Duration::from_secs(10);

/// Largest frame the uplink packs publications into (well under the 1 MiB
/// centrifuge-python accepts).
pub const MAX_PACKED_FRAME: usize = 256 * 1024;

/// What the uplink knows of one channel with local subscribers.
#[derive(Debug, Default)]
struct Route {
    /// Cores with subscribers.
    cores: u64,
    /// The router it is subscribed at.
    owner: Option<usize>,
    /// The stream's epoch; empty while the position is unknown.
    epoch: String,
    /// The last offset handed to the cores (or the position the router
    /// told, when nothing followed yet).
    last: u64,
}

impl Route {
    /// Whether the cores can answer subscribes from the stream position.
    fn positioned(&self) -> bool {
        !self.epoch.is_empty()
    }

    /// Forgets the position (the stream starts over).
    fn unposition(&mut self) {
        self.last = 0;
        self.epoch.clear();
    }
}

enum Event {
    Up(usize, mpsc::Sender<ClusterMsg>),
    Down(usize),
    Control(usize, ClusterMsg),
    /// Messages of a router's delivery stream (deliveries, pushes, positions).
    Deliveries(usize, Vec<ClusterMsg>),
}

struct Uplink {
    gateway_id: String,
    routers: Vec<String>,
    links: Vec<Option<mpsc::Sender<ClusterMsg>>>,
    /// Routers that announced a drain: connected, but owning nothing new.
    draining: Vec<bool>,
    /// Which routers were live before the last change of the live set: a
    /// replayed presence fact goes to its key's new owner only if the owner
    /// changed (and is withdrawn from the old one if that one is still up).
    live_before: Option<Vec<bool>>,
    channels: HashMap<String, Route>,
    cores: Vec<flume::Sender<DownMsg>>,
    metrics: Arc<Metrics>,
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
    c.transport_config(Arc::new(transport));
    Ok(c)
}

/// Starts the uplink thread. `cores` are the per-core inboxes; the returned
/// join handle ends when every core has dropped its sender.
pub fn spawn(
    gateway_id: String,
    cfg: UplinkConfig,
    up_rx: flume::Receiver<Vec<UpMsg>>,
    cores: Vec<flume::Sender<DownMsg>>,
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
            for (i, addr) in cfg.routers.iter().enumerate() {
                tokio::spawn(router_link(i, *addr, gateway_id.clone(), endpoint.clone(), ev_tx.clone()));
            }
            let mut up = Uplink {
                gateway_id,
                routers: cfg.routers.iter().map(|a| a.to_string()).collect(),
                links: vec![None; cfg.routers.len()],
                draining: vec![false; cfg.routers.len()],
                live_before: None,
                channels: HashMap::new(),
                cores,
                metrics,
            };
            loop {
                tokio::select! {
                    batch = up_rx.recv_async() => match batch {
                        Ok(batch) => {
                            for m in batch {
                                up.core_message(m);
                            }
                        }
                        Err(_) => break,
                    },
                    Some(ev) = ev_rx.recv() => up.event(ev),
                }
            }
            tracing::info!(gateway = %up.gateway_id, "uplink stopping");
            for l in up.links.iter().flatten() {
                let _ = l.try_send(ClusterMsg::Drain);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
    })?)
}

impl Uplink {
    fn live(&self, i: usize) -> bool {
        self.links[i].is_some() && !self.draining[i]
    }

    fn owner(&self, key: &str) -> Option<usize> {
        ranked(key, &self.routers).into_iter().find(|i| self.live(*i))
    }

    fn send_to(&self, router: usize, msg: ClusterMsg) -> bool {
        match &self.links[router] {
            Some(tx) => tx.try_send(msg).is_ok(),
            None => false,
        }
    }

    fn to_cores(&self, mask: u64, msg: &DownMsg) {
        for core in 0..self.cores.len() {
            if mask & (1 << core) != 0 {
                self.to_core(core, msg.clone());
            }
        }
    }

    /// Hands `msg` to one core; a full inbox drops it and counts it (the
    /// core's request deadline and per-recipient position checks turn a
    /// lost answer or delivery into an error or a resync, never a hang).
    fn to_core(&self, core: CoreId, msg: DownMsg) {
        if let Some(tx) = self.cores.get(core)
            && tx.try_send(msg).is_err()
        {
            self.metrics.core_queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn reply_error(&self, req: u64, code: u32, message: &str) {
        self.to_core(
            core_of(req),
            DownMsg::Response(ClusterMsg::RequestError { req, code, message: message.into() }),
        );
    }

    fn core_message(&mut self, m: UpMsg) {
        match m {
            UpMsg::Interest { core, channel, on } => {
                let owner = self.owner(&channel);
                let route = self.channels.entry(channel.clone()).or_default();
                let before = route.cores;
                if on {
                    route.cores |= 1 << core;
                } else {
                    route.cores &= !(1 << core);
                }
                let (after, route_owner) = (route.cores, route.owner);
                if before == 0 && after != 0 {
                    route.owner = owner;
                    route.unposition();
                    if let Some(o) = owner {
                        self.send_to(o, ClusterMsg::Subscribe { channels: vec![channel] });
                    }
                } else if on && before != after && route.positioned() {
                    // Another core already receives the channel: this one
                    // starts from where the stream stands, ahead of the next
                    // delivery in its inbox.
                    let msg = DownMsg::Position {
                        channel: Arc::from(channel.as_str()),
                        epoch: Arc::from(route.epoch.as_str()),
                        top: route.last,
                    };
                    self.to_core(core, msg);
                } else if before != 0 && after == 0 {
                    self.channels.remove(&channel);
                    if let Some(o) = route_owner {
                        self.send_to(o, ClusterMsg::Unsubscribe { channels: vec![channel] });
                    }
                }
            }
            UpMsg::Request(msg) => {
                let (Some(req), Some(key)) = (msg.request_id(), msg.channel().map(str::to_owned)) else {
                    return;
                };
                tracing::debug!(req, channel = %key, "request to router");
                match self.owner(&key) {
                    Some(o) if self.send_to(o, msg) => {}
                    _ => self.reply_error(req, 100, "no router available"),
                }
            }
            UpMsg::Forward { key, msg } => {
                if let Some(o) = self.owner(&key) {
                    self.send_to(o, msg);
                }
            }
            UpMsg::Replay { key, msg } => {
                let Some(before) = &self.live_before else { return };
                let old = ranked(&key, &self.routers).into_iter().find(|i| before[*i]);
                let new = self.owner(&key);
                if old == new {
                    return;
                }
                if let Some(o) = old.filter(|o| self.live(*o)) {
                    let withdraw = match &msg {
                        ClusterMsg::UserOnline { user, client } => {
                            ClusterMsg::UserOffline { user: user.clone(), client: client.clone() }
                        }
                        ClusterMsg::Join { channel, client, .. } => {
                            ClusterMsg::Leave { channel: channel.clone(), client: client.clone() }
                        }
                        _ => return,
                    };
                    self.send_to(o, withdraw);
                }
                if let Some(n) = new {
                    self.send_to(n, msg);
                }
            }
        }
    }

    /// Re-evaluates every channel's owner after a router came or went.
    fn rebalance(&mut self) {
        let mut moves: Vec<(String, Option<usize>, Option<usize>, u64)> = Vec::new();
        for (name, route) in &self.channels {
            let owner = self.owner(name);
            if owner != route.owner {
                moves.push((name.clone(), route.owner, owner, route.cores));
            }
        }
        let mut subscribe: HashMap<usize, Vec<String>> = HashMap::new();
        let mut unsubscribe: HashMap<usize, Vec<String>> = HashMap::new();
        for (name, old, new, mask) in moves {
            if let Some(o) = old.filter(|o| self.links[*o].is_some()) {
                unsubscribe.entry(o).or_default().push(name.clone());
            }
            if let Some(n) = new {
                subscribe.entry(n).or_default().push(name.clone());
            }
            let route = self.channels.get_mut(&name).expect("listed above");
            route.owner = new;
            route.unposition();
            self.metrics.resyncs.fetch_add(1, Ordering::Relaxed);
            self.to_cores(mask, &DownMsg::Resync { channel: Arc::from(name.as_str()) });
        }
        for (o, channels) in unsubscribe {
            self.send_to(o, ClusterMsg::Unsubscribe { channels });
        }
        for (n, channels) in subscribe {
            self.send_to(n, ClusterMsg::Subscribe { channels });
        }
    }

    /// Remembers the live set before a change; after it, the cores replay
    /// their presence facts (see [`UpMsg::Replay`]).
    fn live_set(&self) -> Vec<bool> {
        (0..self.routers.len()).map(|i| self.live(i)).collect()
    }

    fn reannounce(&mut self, before: Vec<bool>) {
        if before != self.live_set() {
            self.live_before = Some(before);
            self.to_cores(u64::MAX, &DownMsg::Reannounce);
        }
    }

    fn event(&mut self, ev: Event) {
        let before = self.live_set();
        self.handle_event(ev);
        self.reannounce(before);
    }

    fn handle_event(&mut self, ev: Event) {
        match ev {
            Event::Up(i, tx) => {
                tracing::info!(router = %self.routers[i], "router link up");
                self.draining[i] = false;
                if self.links[i].replace(tx).is_none() {
                    self.metrics.routers_up.fetch_add(1, Ordering::Relaxed);
                }
                // Channels this router already owned (a reconnect) start over too.
                let owned: Vec<String> = self
                    .channels
                    .iter()
                    .filter(|(_, r)| r.owner == Some(i))
                    .map(|(n, _)| n.clone())
                    .collect();
                for n in &owned {
                    if let Some(r) = self.channels.get_mut(n) {
                        r.owner = None;
                    }
                }
                self.send_to(i, ClusterMsg::Snapshot { channels: Vec::new() });
                self.rebalance();
            }
            Event::Down(i) => {
                if self.links[i].take().is_none() {
                    return; // a failed attempt, not a lost link
                }
                self.metrics.routers_up.fetch_sub(1, Ordering::Relaxed);
                self.draining[i] = false;
                tracing::warn!(router = %self.routers[i], "router link down");
                for r in self.channels.values_mut() {
                    if r.owner == Some(i) {
                        r.owner = None;
                    }
                }
                // Subscribers of its channels may miss publications: resync them
                // (rebalance also moves the channels to their next owner).
                let masks: Vec<(String, u64)> = self
                    .channels
                    .iter()
                    .filter(|(_, r)| r.owner.is_none())
                    .map(|(n, r)| (n.clone(), r.cores))
                    .collect();
                for (n, mask) in masks {
                    self.to_cores(mask, &DownMsg::Resync { channel: Arc::from(n.as_str()) });
                }
                self.rebalance();
            }
            Event::Control(i, ClusterMsg::Drain) => {
                // The router is going away: its channels move to their next
                // owner now (new epoch there: subscribers resync with
                // `recovered: false` rather than miss anything silently).
                tracing::info!(router = %self.routers[i], "router draining: moving its channels");
                self.draining[i] = true;
                self.rebalance();
            }
            Event::Control(_, msg) => match msg {
                ClusterMsg::Resync { channels } => {
                    for c in channels {
                        if let Some(r) = self.channels.get_mut(&c) {
                            r.unposition();
                            let mask = r.cores;
                            self.metrics.resyncs.fetch_add(1, Ordering::Relaxed);
                            self.to_cores(mask, &DownMsg::Resync { channel: Arc::from(c.as_str()) });
                        }
                    }
                }
                ClusterMsg::Heartbeat { .. } | ClusterMsg::Welcome { .. } | ClusterMsg::Drain => {}
                ClusterMsg::DisconnectUser { .. } | ClusterMsg::UnsubscribeUser { .. } => {}
                other => {
                    let Some(req) = other.request_id().filter(|_| other.is_answer()) else { return };
                    tracing::debug!(req, core = core_of(req), "response from router");
                    self.to_core(core_of(req), DownMsg::Response(other));
                }
            },
            Event::Deliveries(router, msgs) => self.deliver(router, msgs),
        }
    }

    /// A router told where a channel's stream stands as this gateway's
    /// interest was registered: the cores learn it (and answer subscribes
    /// from it); a position that does not continue what the cores were
    /// given means they missed something, so they resync.
    fn position(&mut self, channel: &str, epoch: &str, top: u64) {
        let Some(route) = self.channels.get_mut(channel) else { return };
        if route.positioned() && route.epoch == epoch && route.last == top {
            return;
        }
        let gap = route.positioned();
        route.epoch = epoch.to_owned();
        route.last = top;
        let (mask, name) = (route.cores, Arc::<str>::from(channel));
        if gap {
            self.metrics.resyncs.fetch_add(1, Ordering::Relaxed);
            self.to_cores(mask, &DownMsg::Resync { channel: name.clone() });
        }
        self.to_cores(mask, &DownMsg::Position { channel: name, epoch: Arc::from(epoch), top });
    }

    /// Frames each run of publications of one channel once and hands the
    /// frame to the cores with subscribers. Only the channel's owner is
    /// listened to: a router the channel moved away from may still have
    /// deliveries in flight, and the new owner's stream is the one the
    /// cores follow.
    fn deliver(&mut self, router: usize, msgs: Vec<ClusterMsg>) {
        let owned =
            |up: &Self, channel: &str| up.channels.get(channel).is_some_and(|r| r.owner == Some(router));
        let mut i = 0;
        while i < msgs.len() {
            if !msgs[i].channel().is_some_and(|c| owned(self, c)) {
                i += 1;
                continue;
            }
            if let ClusterMsg::Position { channel, epoch, top } = &msgs[i] {
                self.position(channel, epoch, *top);
                i += 1;
                continue;
            }
            if let ClusterMsg::Push { channel, push } = &msgs[i] {
                if let Some(route) = self.channels.get(channel.as_str()) {
                    let frame = SharedFrame::text_lines([push.as_ref()]);
                    let name: Arc<str> = Arc::from(channel.as_str());
                    self.to_cores(route.cores, &DownMsg::Push { channel: name, frame: frame.into_bytes() });
                }
                i += 1;
                continue;
            }
            let ClusterMsg::Deliver { channel, .. } = &msgs[i] else {
                i += 1;
                continue;
            };
            let mut j = i;
            let mut pushes: Vec<Vec<u8>> = Vec::new();
            let mut size = 0;
            let (mut first, mut last) = (0u64, 0u64);
            let mut resync = false;
            let Some(route) = self.channels.get_mut(channel.as_str()) else {
                i += 1;
                continue;
            };
            while j < msgs.len() {
                let ClusterMsg::Deliver { channel: c, epoch, publication } = &msgs[j] else { break };
                if c != channel || size > MAX_PACKED_FRAME {
                    break;
                }
                j += 1;
                self.metrics.publications_in.fetch_add(1, Ordering::Relaxed);
                let offset = publication.offset;
                if offset > 0 {
                    if !route.positioned() {
                        route.epoch = epoch.clone();
                    } else if *epoch != route.epoch || offset > route.last + 1 {
                        // A gap or a new stream: subscribers must recover.
                        route.epoch = epoch.clone();
                        route.last = offset;
                        resync = true;
                        continue;
                    } else if offset <= route.last {
                        continue; // duplicate
                    }
                    route.last = offset;
                }
                if first == 0 {
                    first = offset;
                }
                last = offset;
                let push = pub_push(channel, publication);
                size += push.len() + 1;
                pushes.push(push);
            }
            let mask = route.cores;
            let name: Arc<str> = Arc::from(channel.as_str());
            if resync {
                self.metrics.resyncs.fetch_add(1, Ordering::Relaxed);
                self.to_cores(mask, &DownMsg::Resync { channel: name.clone() });
            } else if !pushes.is_empty() {
                let frame = SharedFrame::text_lines(pushes.iter().map(|p| p.as_slice()));
                self.metrics.frames_encoded.fetch_add(1, Ordering::Relaxed);
                self.to_cores(
                    mask,
                    &DownMsg::Deliver { channel: name, first, last, frame: frame.into_bytes() },
                );
            }
            i = j.max(i + 1);
        }
    }
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
    addr: SocketAddr,
    gateway_id: String,
    endpoint: quinn::Endpoint,
    events: mpsc::Sender<Event>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let instance: u64 = rand::random();
    loop {
        match connect_once(idx, addr, &gateway_id, instance, &endpoint, &events, &mut backoff).await {
            Ok(()) => tracing::info!(%addr, "router link closed"),
            Err(e) => tracing::debug!(%addr, error = %e, "router link failed"),
        }
        if events.send(Event::Down(idx)).await.is_err() {
            return;
        }
        let delay = backoff.next_delay(&mut rand::rng());
        tokio::time::sleep(delay).await;
    }
}

async fn connect_once(
    idx: usize,
    addr: SocketAddr,
    gateway_id: &str,
    instance: u64,
    endpoint: &quinn::Endpoint,
    events: &mpsc::Sender<Event>,
    backoff: &mut Backoff,
) -> anyhow::Result<()> {
    let conn = endpoint.connect(addr, "localhost")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut out = BytesMut::new();
    ClusterMsg::Hello { version: PROTOCOL_VERSION, gateway_id: gateway_id.to_owned(), instance }
        .encode(&mut out);
    send.write_all(&out).await?;
    let mut dec = ClusterDecoder::default();
    let mut buf = BytesMut::new();
    let first =
        tokio::time::timeout(Duration::from_secs(10), read_msgs(&mut recv, &mut dec, &mut buf)).await??;
    let mut pending = match first {
        Some(mut msgs) if matches!(msgs.first(), Some(ClusterMsg::Welcome { .. })) => msgs.split_off(1),
        Some(msgs) => anyhow::bail!("router refused the link: {:?}", msgs.first()),
        None => anyhow::bail!("router closed before welcome"),
    };
    backoff.reset();
    let (tx, mut rx) = mpsc::channel::<ClusterMsg>(65_536);
    let hb_tx = tx.clone();
    events.send(Event::Up(idx, tx)).await.ok();
    for m in pending.drain(..) {
        events.send(Event::Control(idx, m)).await.ok();
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
    // Delivery streams.
    let conn2 = conn.clone();
    let ev2 = events.clone();
    let deliveries = tokio::spawn(async move {
        while let Ok(mut s) = conn2.accept_uni().await {
            let ev = ev2.clone();
            tokio::spawn(async move {
                let mut dec = ClusterDecoder::default();
                let mut buf = BytesMut::new();
                while let Ok(Some(msgs)) = read_msgs(&mut s, &mut dec, &mut buf).await {
                    if ev.send(Event::Deliveries(idx, msgs)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    // Heartbeats: the router answers each; a router silent for
    // `ROUTER_SILENCE` is treated as lost (channels move, subscribers resync).
    let heartbeat = {
        let tx = hb_tx;
        tokio::spawn(async move {
            let mut seq = 0u64;
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            loop {
                tick.tick().await;
                seq += 1;
                if tx.send(ClusterMsg::Heartbeat { seq, reply: false }).await.is_err() {
                    return;
                }
            }
        })
    };
    let result = async {
        loop {
            let Ok(read) =
                tokio::time::timeout(ROUTER_SILENCE, read_msgs(&mut recv, &mut dec, &mut buf)).await
            else {
                anyhow::bail!("router silent for {ROUTER_SILENCE:?}");
            };
            let Some(msgs) = read? else { return anyhow::Ok(()) };
            for m in msgs {
                events.send(Event::Control(idx, m)).await.ok();
            }
        }
    }
    .await;
    heartbeat.abort();
    writer.abort();
    deliveries.abort();
    conn.close(0u32.into(), b"bye");
    result
}
