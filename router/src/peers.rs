//! The other routers of the cluster, as the HTTP API sees them.
//!
//! Gateways decide a channel's owner by the rendezvous hash of the channel
//! over the routers' QUIC addresses. The HTTP API must reach the same
//! owner, and forwards an API call for a channel it does not own to the
//! owner. Who the routers are comes from one of two sources:
//!
//! - a static list (`peers`, `NAME@QUIC_ADDR` each): the router asks each
//!   peer for its readiness twice a second, and the owner is the rendezvous
//!   hash over itself and the ready peers, as gateways compute it over the
//!   routers they are linked to;
//! - etcd (`[etcd]`): the owner is the rendezvous hash over the newest
//!   [`View`] of registered routers, the view gateways watch too, and this
//!   router answers for a channel only while its lease is certainly alive
//!   (the shards enforce that: `proto::membership`'s fencing rule).
//!
//! Calls between routers travel over QUIC with mutual TLS on the routers'
//! own endpoints (ALPN [`PEER_ALPN`], framing in [`proto::peer`]): the caller
//! presents its router certificate and checks the callee's against the
//! callee's name; the callee serves the call only when the caller's
//! certificate is valid for the name of one of its configured peers (see
//! [`Peers::is_peer`]). A call that arrives that way is answered locally,
//! never forwarded again, so views that disagree for a moment never loop;
//! nothing on the public HTTP API can ask for that.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use proto::membership::View;
use proto::peer::{PEER_ALPN, READYZ, RouterAddr, decode_reply, encode_request};
use proto::rendezvous::ranked;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::sync::watch;

use crate::shard::LeaseCell;

/// How often peers' readiness is asked.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Deadline of one readiness probe or one forwarded call (connecting
/// included); past it the call answers error 100 (internal, temporary).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest reply a peer may send (a `channels` listing can be large);
/// longer replies fail the call.
pub const MAX_REPLY: usize = 16 << 20;

/// Calls in flight from one router to another at most (QUIC bidirectional
/// streams per peer connection; more wait for a stream).
pub const MAX_CALLS_IN_FLIGHT: u32 = 256;

/// Where an API call for a channel goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This router.
    Local,
    /// Another router.
    Peer(RouterAddr),
}

/// Whether the certificate `cert` is valid for the DNS name `name` (its
/// chain is checked elsewhere: by the TLS handshake, or by the operator who
/// configured it).
pub fn cert_is_for(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = ServerName::try_from(name) else { return false };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&server_name).is_ok())
}

/// Who the other routers are.
enum Source {
    /// A static list, with each peer's readiness as last asked.
    Static {
        /// Rendezvous names: this router first, then the peers.
        names: Vec<String>,
        peers: Vec<RouterAddr>,
        ready: Vec<AtomicBool>,
    },
    /// The routers registered in etcd, this router's name among them, and
    /// its lease.
    Etcd { view: watch::Sender<Arc<View>>, me: String, lease: Arc<LeaseCell> },
}

/// This router and its peers.
pub struct Peers {
    /// This router's QUIC address as gateways list it.
    me: SocketAddr,
    source: Source,
    draining: AtomicBool,
    /// Client side of peer calls: `None` without TLS files (unit tests).
    client: Option<(quinn::Endpoint, quinn::ClientConfig)>,
    /// One cached connection per peer, opened on first use.
    conns: Mutex<HashMap<RouterAddr, quinn::Connection>>,
    /// Calls (probes included) that got no answer: unreachable, too slow,
    /// or refused in the TLS handshake.
    failures: AtomicU64,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").field("me", &self.me).finish_non_exhaustive()
    }
}

/// The TLS files a router calls its peers with.
#[derive(Debug, Clone, Copy)]
pub struct PeerTls<'a> {
    /// CA that signs router certificates.
    pub ca_cert: &'a Path,
    /// This router's certificate (server and client).
    pub cert: &'a Path,
    /// Its key.
    pub key: &'a Path,
}

fn client_config(tls: PeerTls<'_>) -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(tls.ca_cert)
        .with_context(|| format!("reading {}", tls.ca_cert.display()))?
    {
        roots.add(c?)?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(tls.cert)
        .with_context(|| format!("reading {}", tls.cert.display()))?
        .collect::<Result<_, _>>()?;
    let key =
        PrivateKeyDer::from_pem_file(tls.key).with_context(|| format!("reading {}", tls.key.display()))?;
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    c.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let mut q = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(c)?));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(2)));
    transport.max_idle_timeout(Some(Duration::from_secs(10).try_into()?));
    transport.max_concurrent_uni_streams(0u32.into());
    transport.max_concurrent_bidi_streams(0u32.into());
    q.transport_config(Arc::new(transport));
    Ok(q)
}

impl Peers {
    /// `me` is this router's QUIC address as the gateways list it; `peers`
    /// the static list (ignored with `etcd`: this router's name and lease,
    /// and the view instead). With `tls`, calls to peers are made with those
    /// files from a client endpoint bound on `bind`'s IP (its own listen
    /// address, which may differ from the advertised one; so this must run
    /// within a tokio runtime).
    pub fn new(
        me: SocketAddr,
        bind: SocketAddr,
        peers: Vec<RouterAddr>,
        tls: Option<PeerTls<'_>>,
        etcd: Option<(String, Arc<LeaseCell>)>,
    ) -> anyhow::Result<Self> {
        let is_etcd = etcd.is_some();
        let source = if let Some((name, lease)) = etcd {
            Source::Etcd { view: watch::Sender::new(Arc::new(View::default())), me: name, lease }
        } else {
            let mut names = vec![me.to_string()];
            names.extend(peers.iter().map(|p| p.addr.to_string()));
            let ready = peers.iter().map(|_| AtomicBool::new(false)).collect();
            Source::Static { names, peers, ready }
        };
        let client = match tls {
            Some(tls) if is_etcd || matches!(&source, Source::Static { peers, .. } if !peers.is_empty()) => {
                let endpoint = quinn::Endpoint::client(SocketAddr::new(bind.ip(), 0))
                    .context("binding the UDP socket peer calls leave from")?;
                Some((endpoint, client_config(tls)?))
            }
            _ => None,
        };
        Ok(Peers {
            me,
            source,
            draining: AtomicBool::new(false),
            client,
            conns: Mutex::new(HashMap::new()),
            failures: AtomicU64::new(0),
        })
    }

    /// Calls to peers that got no answer so far.
    pub fn call_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Whether other routers may own channels (a static list with peers, or etcd).
    pub fn clustered(&self) -> bool {
        match &self.source {
            Source::Static { peers, .. } => !peers.is_empty(),
            Source::Etcd { .. } => true,
        }
    }

    /// The newest membership view (etcd mode; empty otherwise).
    pub fn view(&self) -> Arc<View> {
        match &self.source {
            Source::Etcd { view, .. } => view.borrow().clone(),
            Source::Static { .. } => Arc::new(View::default()),
        }
    }

    /// Where the membership watch writes views (etcd mode).
    pub fn view_sender(&self) -> Option<&watch::Sender<Arc<View>>> {
        match &self.source {
            Source::Etcd { view, .. } => Some(view),
            Source::Static { .. } => None,
        }
    }

    /// Whether this router holds a lease that is certainly alive at `now`
    /// (always, without etcd).
    pub fn lease_live(&self, now: Instant) -> bool {
        match &self.source {
            Source::Etcd { lease, .. } => lease.live(now),
            Source::Static { .. } => true,
        }
    }

    /// Whether this router is ready to serve: not draining, and in etcd
    /// mode registered in its newest view under a live lease.
    pub fn ready(&self) -> bool {
        !self.draining()
            && match &self.source {
                Source::Etcd { me, .. } => self.lease_live(Instant::now()) && self.view().contains(me),
                Source::Static { .. } => true,
            }
    }

    /// Whether a client certificate belongs to one of the other routers:
    /// only those may call this router's API as a peer (the configured
    /// peers, or the routers registered in the view).
    pub fn is_peer(&self, cert: &CertificateDer<'_>) -> bool {
        match &self.source {
            Source::Static { peers, .. } => peers.iter().any(|p| cert_is_for(cert, &p.name)),
            Source::Etcd { view, me, .. } => {
                view.borrow().members().filter(|m| m.name != *me).any(|m| cert_is_for(cert, &m.name))
            }
        }
    }

    /// Marks this router as draining: it owns nothing from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether this router is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The owner of `key`. Static list: among the live routers, this router
    /// when nobody else is live (a call is answered rather than refused).
    /// etcd: the view's owner; this router when the view is empty (its
    /// shards then refuse what needs a live lease).
    pub fn owner(&self, key: &str) -> Owner {
        match &self.source {
            Source::Static { names, peers, ready } => {
                for i in ranked(key, names) {
                    if i == 0 && !self.draining() {
                        return Owner::Local;
                    }
                    if i > 0 && ready[i - 1].load(Ordering::Relaxed) {
                        return Owner::Peer(peers[i - 1].clone());
                    }
                }
                Owner::Local
            }
            Source::Etcd { view, me, .. } => match view.borrow().owner(key) {
                Some(m) if m.name != *me => Owner::Peer(m.router_addr()),
                _ => Owner::Local,
            },
        }
    }

    /// The other routers currently ready (static: answered their last
    /// readiness probe; etcd: registered in the view).
    pub fn ready_peers(&self) -> Vec<RouterAddr> {
        match &self.source {
            Source::Static { peers, ready, .. } => peers
                .iter()
                .zip(ready)
                .filter(|(_, r)| r.load(Ordering::Relaxed))
                .map(|(p, _)| p.clone())
                .collect(),
            Source::Etcd { view, me, .. } => {
                view.borrow().members().filter(|m| m.name != *me).map(|m| m.router_addr()).collect()
            }
        }
    }

    /// Asks every statically listed peer for its readiness forever (etcd
    /// mode: the view says who is there; nothing to ask).
    pub async fn probe_forever(&self) {
        let Source::Static { peers, ready, .. } = &self.source else {
            return std::future::pending().await;
        };
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let answers = futures_util::future::join_all(
                peers.iter().map(|p| async move { (p, self.call(p, READYZ, &[]).await) }),
            )
            .await;
            for ((peer, answer), ready) in answers.into_iter().zip(ready) {
                let ok = matches!(answer, Ok((200, _)));
                if ready.swap(ok, Ordering::Relaxed) != ok {
                    match answer {
                        Err(e) => {
                            tracing::info!(%peer, ready = ok, error = %e, "peer router readiness changed")
                        }
                        Ok(_) => tracing::info!(%peer, ready = ok, "peer router readiness changed"),
                    }
                }
            }
        }
    }

    async fn connection(&self, peer: &RouterAddr) -> anyhow::Result<quinn::Connection> {
        {
            let mut conns = self.conns.lock().expect("not poisoned");
            if let Some(c) = conns.get(peer)
                && c.close_reason().is_none()
            {
                return Ok(c.clone());
            }
            // Bounded by the routers there are: closed ones go.
            conns.retain(|_, c| c.close_reason().is_none());
        }
        let (endpoint, cfg) = self.client.as_ref().context("no peer TLS configured")?;
        let conn = endpoint.connect_with(cfg.clone(), peer.addr, &peer.name)?.await?;
        self.conns.lock().expect("not poisoned").insert(peer.clone(), conn.clone());
        Ok(conn)
    }

    /// Calls `method` with `body` on `peer`; the status and body it answered.
    pub async fn call(&self, peer: &RouterAddr, method: &str, body: &[u8]) -> anyhow::Result<(u16, Bytes)> {
        let answer = tokio::time::timeout(CALL_TIMEOUT, async {
            let conn = self.connection(peer).await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&encode_request(method, body)).await?;
            send.finish()?;
            let reply = recv.read_to_end(MAX_REPLY).await?;
            let (status, body) = decode_reply(&reply)?;
            anyhow::Ok((status, Bytes::copy_from_slice(body)))
        })
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {peer} within {CALL_TIMEOUT:?}"))
        .and_then(|r| r);
        if answer.is_err() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn owner_skips_peers_that_are_not_ready_and_self_when_draining() {
        let me: SocketAddr = "127.0.0.1:7100".parse().unwrap();
        let peers: Vec<RouterAddr> =
            vec!["r1@127.0.0.1:7101".parse().unwrap(), "r2@127.0.0.1:7102".parse().unwrap()];
        let p = Peers::new(me, me, peers.clone(), None, None).unwrap();
        // No peer ready: everything is local.
        assert!((0..100).all(|i| p.owner(&format!("chat:{i}")) == Owner::Local));
        let Source::Static { ready, .. } = &p.source else { unreachable!() };
        for r in ready {
            r.store(true, Ordering::Relaxed);
        }
        let local = (0..300).filter(|i| p.owner(&format!("chat:{i}")) == Owner::Local).count();
        assert!((50..150).contains(&local), "about a third is local: {local}");
        p.set_draining();
        assert!((0..100).all(|i| p.owner(&format!("chat:{i}")) != Owner::Local));
        assert!(p.call(&peers[0], READYZ, b"").await.is_err(), "no TLS, no call");
    }

    #[test]
    fn certificates_are_matched_to_names() {
        let dir = std::env::temp_dir().join(format!("switchyard-peer-names-{}", std::process::id()));
        crate::certs::generate(&dir, &["r1".into(), "r2".into()]).unwrap();
        let read = |name: &str| {
            let (cert, _) = crate::certs::CertPaths::router_in_dir(&dir, name);
            CertificateDer::pem_file_iter(&cert).unwrap().next().unwrap().unwrap()
        };
        let (r1, r2, dev) = (read("r1"), read("r2"), read(proto::peer::DEV_NAME));
        assert!(cert_is_for(&r1, "r1") && !cert_is_for(&r1, "r2") && !cert_is_for(&r1, "localhost"));
        assert!(cert_is_for(&r2, "r2") && !cert_is_for(&r2, "r1"));
        assert!(cert_is_for(&dev, "localhost") && !cert_is_for(&dev, "r1"));
        let gw = CertificateDer::pem_file_iter(&crate::certs::CertPaths::in_dir(&dir).gateway_cert)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let me: SocketAddr = "127.0.0.1:7100".parse().unwrap();
        let p = Peers::new(me, me, vec!["r2@127.0.0.1:7102".parse().unwrap()], None, None).unwrap();
        assert!(p.is_peer(&r2));
        assert!(!p.is_peer(&r1), "a router that is not a configured peer");
        assert!(!p.is_peer(&gw), "a gateway's certificate");
        assert!(!p.is_peer(&dev));
        // In etcd mode the view says who the peers are.
        let lease = Arc::new(LeaseCell::new(Instant::now()));
        let e = Peers::new(me, me, Vec::new(), None, Some(("me".into(), lease.clone()))).unwrap();
        assert!(!e.is_peer(&r2));
        let member = |name: &str, port: u16| {
            let m = proto::membership::Member {
                name: name.into(),
                quic: SocketAddr::from(([127, 0, 0, 1], port)),
                api: SocketAddr::from(([127, 0, 0, 1], port + 900)),
            };
            (format!("/r/{name}"), m)
        };
        e.view_sender()
            .unwrap()
            .send_replace(Arc::new(View::new(3, [member("r2", 7102), member("me", 7100)])));
        assert!(e.is_peer(&r2) && !e.is_peer(&r1) && !e.is_peer(&gw));
        assert!(!e.ready(), "no lease");
        lease.set(5, Some(Instant::now() + Duration::from_secs(5)));
        assert!(e.ready());
        assert_eq!(e.ready_peers(), vec!["r2@127.0.0.1:7102".parse::<RouterAddr>().unwrap()]);
        let owned = (0..200).filter(|i| e.owner(&format!("c{i}")) == Owner::Local).count();
        assert!((60..140).contains(&owned), "about half: {owned}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
