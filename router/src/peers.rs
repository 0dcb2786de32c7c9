//! The other routers of the cluster, as the HTTP API sees them.
//!
//! Gateways decide a channel's owner by the rendezvous hash of the channel
//! over the routers' QUIC addresses (those they are linked to and that are
//! not draining). The HTTP API must reach the same owner, so a router knows
//! its peers (their QUIC address, the rendezvous name, and their API
//! address), probes their `/readyz` twice a second, and forwards an API call
//! for a channel it does not own to the owner. A forwarded call carries
//! [`FORWARDED`] and is always answered locally, so views that disagree for
//! a moment never loop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use proto::rendezvous::ranked;
use serde::Deserialize;

/// Header marking a call one router forwarded to another.
pub const FORWARDED: &str = "x-switchyard-forwarded";

/// How often peers' readiness is probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Deadline of one probe or one forwarded call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// One other router of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its QUIC address exactly as the gateways list it (the rendezvous name).
    pub quic: SocketAddr,
    /// Its HTTP API address.
    pub api: SocketAddr,
}

impl std::str::FromStr for PeerConfig {
    type Err = String;

    /// `QUIC_ADDR,API_ADDR`, as the `--peer` flag takes it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (q, a) = s.split_once(',').ok_or("expected QUIC_ADDR,API_ADDR")?;
        Ok(PeerConfig {
            quic: q.trim().parse().map_err(|e| format!("{q}: {e}"))?,
            api: a.trim().parse().map_err(|e| format!("{a}: {e}"))?,
        })
    }
}

/// Where an API call for a channel goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// This router.
    Local,
    /// The peer at this API address.
    Peer(SocketAddr),
}

/// This router and its peers.
#[derive(Debug)]
pub struct Peers {
    /// Rendezvous names: this router first, then the peers.
    names: Vec<String>,
    peers: Vec<PeerConfig>,
    ready: Vec<AtomicBool>,
    draining: AtomicBool,
}

impl Peers {
    /// `me` is this router's QUIC address as the gateways list it.
    pub fn new(me: SocketAddr, peers: Vec<PeerConfig>) -> Self {
        let mut names = vec![me.to_string()];
        names.extend(peers.iter().map(|p| p.quic.to_string()));
        let ready = peers.iter().map(|_| AtomicBool::new(false)).collect();
        Peers { names, peers, ready, draining: AtomicBool::new(false) }
    }

    /// Whether any peer is configured.
    pub fn clustered(&self) -> bool {
        !self.peers.is_empty()
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
                return Owner::Peer(self.peers[i - 1].api);
            }
        }
        Owner::Local
    }

    /// API addresses of the peers currently ready.
    pub fn ready_peers(&self) -> Vec<SocketAddr> {
        self.peers
            .iter()
            .zip(&self.ready)
            .filter(|(_, r)| r.load(Ordering::Relaxed))
            .map(|(p, _)| p.api)
            .collect()
    }

    /// Probes every peer's `/readyz` forever.
    pub async fn probe_forever(&self) {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        loop {
            tick.tick().await;
            for (p, ready) in self.peers.iter().zip(&self.ready) {
                let ok = matches!(call(p.api, "GET", "/readyz", None, Bytes::new()).await, Ok((200, _)));
                if ready.swap(ok, Ordering::Relaxed) != ok {
                    tracing::info!(peer = %p.quic, ready = ok, "peer router readiness changed");
                }
            }
        }
    }
}

/// One HTTP/1.1 request to `addr`; the status and body of the answer.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    api_key: Option<&str>,
    body: Bytes,
) -> anyhow::Result<(u16, Bytes)> {
    tokio::time::timeout(CALL_TIMEOUT, async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(FORWARDED, "1");
        if let Some(k) = api_key {
            req = req.header("x-api-key", k);
        }
        let resp = sender.send_request(req.body(Full::new(body))?).await?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), 16 << 20)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
            .to_bytes();
        anyhow::Ok((status, body))
    })
    .await
    .map_err(|_| anyhow::anyhow!("no answer from {addr} within {CALL_TIMEOUT:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_skips_peers_that_are_not_ready_and_self_when_draining() {
        let me: SocketAddr = "127.0.0.1:7100".parse().unwrap();
        let peers: Vec<PeerConfig> = vec![
            "127.0.0.1:7101,127.0.0.1:8001".parse().unwrap(),
            "127.0.0.1:7102,127.0.0.1:8002".parse().unwrap(),
        ];
        let p = Peers::new(me, peers);
        // No peer ready: everything is local.
        assert!((0..100).all(|i| p.owner(&format!("chat:{i}")) == Owner::Local));
        for r in &p.ready {
            r.store(true, Ordering::Relaxed);
        }
        let local = (0..300).filter(|i| p.owner(&format!("chat:{i}")) == Owner::Local).count();
        assert!((50..150).contains(&local), "about a third is local: {local}");
        p.set_draining();
        assert!((0..100).all(|i| p.owner(&format!("chat:{i}")) != Owner::Local));
        assert!("nonsense".parse::<PeerConfig>().is_err());
    }
}
