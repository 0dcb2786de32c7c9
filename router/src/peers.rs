//! The other routers of the cluster, as the HTTP API sees them.
//!
//! Gateways decide a channel's owner by the rendezvous hash of the channel
//! over the routers' QUIC addresses (those they are linked to and that are
//! not draining). The HTTP API must reach the same owner, so a router knows
//! its peers (`NAME@QUIC_ADDR`), asks each for its readiness twice a second,
//! and forwards an API call for a channel it does not own to the owner.
//!
//! Calls between routers travel over QUIC with mutual TLS on the routers'
//! own endpoints (ALPN [`PEER_ALPN`], framing in [`proto::peer`]): the caller
//! presents its router certificate and checks the callee's against the
//! callee's name; the callee serves the call only when the caller's
//! certificate is valid for the name of one of its configured peers (see
//! [`Peers::is_peer`]). A call that arrives that way is answered locally,
//! never forwarded again, so views that disagree for a moment never loop;
//! nothing on the public HTTP API can ask for that.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use proto::peer::{PEER_ALPN, READYZ, RouterAddr, decode_reply, encode_request};
use proto::rendezvous::ranked;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// This router.
    Local,
    /// The peer with this index in [`Peers::peers`].
    Peer(usize),
}

/// Whether the certificate `cert` is valid for the DNS name `name` (its
/// chain is checked elsewhere: by the TLS handshake, or by the operator who
/// configured it).
pub fn cert_is_for(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = ServerName::try_from(name) else { return false };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&server_name).is_ok())
}

/// This router and its peers.
pub struct Peers {
    /// Rendezvous names: this router first, then the peers.
    names: Vec<String>,
    peers: Vec<RouterAddr>,
    ready: Vec<AtomicBool>,
    draining: AtomicBool,
    /// Client side of peer calls: `None` without peers.
    client: Option<(quinn::Endpoint, quinn::ClientConfig)>,
    /// One cached connection per peer, opened on first use.
    conns: Vec<Mutex<Option<quinn::Connection>>>,
    /// Calls (probes included) that got no answer: unreachable, too slow,
    /// or refused in the TLS handshake.
    failures: AtomicU64,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("names", &self.names)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
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
    /// `me` is this router's QUIC address as the gateways list it. With
    /// peers, `tls` gives the files calls to them are made with, and a
    /// client endpoint is bound on `me`'s IP (so must be called within a
    /// tokio runtime).
    pub fn new(me: SocketAddr, peers: Vec<RouterAddr>, tls: Option<PeerTls<'_>>) -> anyhow::Result<Self> {
        let mut names = vec![me.to_string()];
        names.extend(peers.iter().map(|p| p.addr.to_string()));
        let ready = peers.iter().map(|_| AtomicBool::new(false)).collect();
        let conns = peers.iter().map(|_| Mutex::new(None)).collect();
        let client = match tls {
            Some(tls) if !peers.is_empty() => {
                let endpoint = quinn::Endpoint::client(SocketAddr::new(me.ip(), 0))
                    .context("binding the UDP socket peer calls leave from")?;
                Some((endpoint, client_config(tls)?))
            }
            _ => None,
        };
        Ok(Peers {
            names,
            peers,
            ready,
            draining: AtomicBool::new(false),
            client,
            conns,
            failures: AtomicU64::new(0),
        })
    }

    /// Calls to peers that got no answer so far.
    pub fn call_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Whether any peer is configured.
    pub fn clustered(&self) -> bool {
        !self.peers.is_empty()
    }

    /// The configured peers.
    pub fn peers(&self) -> &[RouterAddr] {
        &self.peers
    }

    /// Whether a client certificate belongs to one of the configured peers:
    /// only those may call this router's API as a peer.
    pub fn is_peer(&self, cert: &CertificateDer<'_>) -> bool {
        self.peers.iter().any(|p| cert_is_for(cert, &p.name))
    }

    /// Marks this router as draining: it owns nothing from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether this router is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The owner of `key` among the live routers; this router when nobody
    /// else is live (a call is answered rather than refused).
    pub fn owner(&self, key: &str) -> Owner {
        for i in ranked(key, &self.names) {
            if i == 0 && !self.draining() {
                return Owner::Local;
            }
            if i > 0 && self.ready[i - 1].load(Ordering::Relaxed) {
                return Owner::Peer(i - 1);
            }
        }
        Owner::Local
    }

    /// Indices of the peers currently ready.
    pub fn ready_peers(&self) -> Vec<usize> {
        (0..self.peers.len()).filter(|&i| self.ready[i].load(Ordering::Relaxed)).collect()
    }

    /// Asks every peer for its readiness forever.
    pub async fn probe_forever(&self) {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let answers = futures_util::future::join_all(
                (0..self.peers.len()).map(|i| async move { (i, self.call(i, READYZ, &[]).await) }),
            )
            .await;
            for (i, answer) in answers {
                let ok = matches!(answer, Ok((200, _)));
                if self.ready[i].swap(ok, Ordering::Relaxed) != ok {
                    match answer {
                        Err(e) => {
                            tracing::info!(peer = %self.peers[i], ready = ok, error = %e, "peer router readiness changed")
                        }
                        Ok(_) => {
                            tracing::info!(peer = %self.peers[i], ready = ok, "peer router readiness changed")
                        }
                    }
                }
            }
        }
    }

    async fn connection(&self, i: usize) -> anyhow::Result<quinn::Connection> {
        if let Some(c) = self.conns[i].lock().expect("not poisoned").as_ref()
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let (endpoint, cfg) = self.client.as_ref().context("no peer TLS configured")?;
        let peer = &self.peers[i];
        let conn = endpoint.connect_with(cfg.clone(), peer.addr, &peer.name)?.await?;
        *self.conns[i].lock().expect("not poisoned") = Some(conn.clone());
        Ok(conn)
    }

    /// Calls `method` with `body` on peer `i`; the status and body it answered.
    pub async fn call(&self, i: usize, method: &str, body: &[u8]) -> anyhow::Result<(u16, Bytes)> {
        let peer = &self.peers[i];
        let answer = tokio::time::timeout(CALL_TIMEOUT, async {
            let conn = self.connection(i).await?;
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
        let p = Peers::new(me, peers, None).unwrap();
        // No peer ready: everything is local.
        assert!((0..100).all(|i| p.owner(&format!("chat:{i}")) == Owner::Local));
        for r in &p.ready {
            r.store(true, Ordering::Relaxed);
        }
        let local = (0..300).filter(|i| p.owner(&format!("chat:{i}")) == Owner::Local).count();
        assert!((50..150).contains(&local), "about a third is local: {local}");
        p.set_draining();
        assert!((0..100).all(|i| p.owner(&format!("chat:{i}")) != Owner::Local));
        assert!(p.call(0, READYZ, b"").await.is_err(), "no TLS, no call");
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
        let p = Peers::new(me, vec!["r2@127.0.0.1:7102".parse().unwrap()], None).unwrap();
        assert!(p.is_peer(&r2));
        assert!(!p.is_peer(&r1), "a router that is not a configured peer");
        assert!(!p.is_peer(&gw), "a gateway's certificate");
        assert!(!p.is_peer(&dev));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
