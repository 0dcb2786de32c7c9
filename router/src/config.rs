//! The router's configuration: one TOML file, every key defaulted so that a
//! router with no file at all starts on loopback with development settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use proto::namespace::Namespaces;

use proto::peer::RouterAddr;
use serde::{Deserialize, Serialize};

/// Paths of the link's mutual-TLS material (see [`crate::certs`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsFiles {
    /// CA whose gateway certificates are accepted.
    pub ca_cert: PathBuf,
    /// This router's certificate chain.
    pub cert: PathBuf,
    /// This router's private key.
    pub key: PathBuf,
}

impl Default for TlsFiles {
    fn default() -> Self {
        TlsFiles {
            ca_cert: "certs/ca.pem".into(),
            cert: "certs/router.pem".into(),
            key: "certs/router.key".into(),
        }
    }
}

/// The development API key, accepted only on a loopback API address.
pub const DEV_API_KEY: &str = "dev-api-key";

/// Everything a router needs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Stable id, told to gateways and in logs (default `router-1`). The
    /// rendezvous hash names a router by its QUIC address.
    pub id: String,
    /// The DNS name this router's link certificate is issued for (default
    /// `localhost`, the development certificate's). Gateways list the router
    /// as `NAME@ADDR` and verify its certificate against the name; peers do
    /// the same, and accept forwarded calls only from certificates of their
    /// configured peers' names. Checked against `tls.cert` at start.
    pub name: String,
    /// UDP address of the QUIC endpoint gateways connect to (default 127.0.0.1:7100).
    pub quic_listen: SocketAddr,
    /// Link TLS files.
    pub tls: TlsFiles,
    /// HTTP server API listener (default 127.0.0.1:8000).
    pub api_listen: SocketAddr,
    /// Admin listener: `/metrics`, `/healthz`, `/readyz` (default
    /// 127.0.0.1:9100). Operators' port: keep it off the public network.
    pub admin_listen: SocketAddr,
    /// Also serve `/metrics` on the API port (default false: the API port
    /// faces the app backend, metrics are for operators).
    pub metrics_on_api: bool,
    /// Key the HTTP API requires, in `X-API-Key: <key>` or
    /// `Authorization: apikey <key>` (never in the URL, where access logs
    /// keep it: a `?api_key=` gets 401); compared in constant time; empty
    /// refuses every call. The default, [`DEV_API_KEY`], is refused at start
    /// when `api_listen` is not a loopback address.
    pub api_key: String,
    /// Channel-state shards (worker tasks, each owning the channels that hash
    /// to it). Default: the number of cores.
    pub shards: usize,
    /// Ordered delivery streams per gateway (channel hash mod K), so a burst
    /// on one channel never blocks the others (default 8).
    pub delivery_streams: usize,
    /// Messages queued toward one gateway before it is told to resync
    /// (default 65,536; at ~200 B each about 13 MiB per gateway at most).
    pub gateway_queue: usize,
    /// Seconds between heartbeats on each link (default 5).
    pub heartbeat_secs: u64,
    /// Seconds of silence after which a gateway is evicted and its users
    /// enter the presence grace period (default 15; at least 5, as gateways
    /// heartbeat every 2 s).
    pub evict_secs: u64,
    /// Presence grace period in seconds (default 15).
    pub presence_grace_secs: u64,
    /// Most publications one recovery returns (default 300, as Centrifugo).
    pub max_recover: usize,
    /// Channels the router holds at most (default 1,000,000, split evenly
    /// over its shards; ~650 B each). A subscribe, publish or history call
    /// for a new channel beyond gets error 100 "channel limit reached"
    /// (temporary), counted in `switchyard_router_channel_limit_refusals_total`
    /// and logged at most once per 10 s per shard. Idle channels (no
    /// subscribers, history past its TTL, no idempotency key) are dropped,
    /// which makes room.
    pub max_channels: usize,
    /// Seconds a draining router (SIGTERM) keeps answering after telling the
    /// gateways, before it exits (default 5).
    pub drain_secs: u64,
    /// The other routers of the cluster, `"NAME@QUIC_ADDR"` each (a bare
    /// address for the development certificate); empty for a single router.
    /// The HTTP API forwards a call for a channel to its owner among the
    /// ready routers over QUIC with mutual TLS (see `proto::peer`).
    pub peers: Vec<RouterAddr>,
    /// The QUIC address gateways and peers reach this router at when it is
    /// not `quic_listen` (a wildcard bind, a pod behind a Service): its name
    /// in the rendezvous hash and what it registers in etcd (default
    /// `quic_listen`).
    pub advertise_quic: Option<SocketAddr>,
    /// The API address it registers in etcd (default `api_listen`).
    pub advertise_api: Option<SocketAddr>,
    /// Membership and ownership from etcd (`[etcd]`; default off: one
    /// router, or the static `peers`). With it, `peers` must be empty; the
    /// router registers `{name, quic, api}` under a lease and acknowledges a
    /// publication only for channels it owns in its newest view while the
    /// lease is certainly alive (see `proto::membership`).
    pub etcd: discovery::EtcdConfig,
    /// Congestion controller of the gateway links' deliveries (default
    /// `bbr`; `cubic`). Matters across a lossy WAN: see
    /// `proto::cluster::LinkCongestion` for the measured difference. The
    /// other QUIC settings of the link: keep-alive every `heartbeat_secs`,
    /// idle timeout `evict_secs`, quinn's default windows (1.25 MB per
    /// stream: 100 ms at 100 Mbit/s, far above a delivery stream's rate).
    pub link_congestion: proto::cluster::LinkCongestion,
    /// Channel namespaces.
    pub namespaces: Namespaces,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            id: "router-1".into(),
            name: proto::peer::DEV_NAME.into(),
            quic_listen: "127.0.0.1:7100".parse().expect("static address"),
            tls: TlsFiles::default(),
            api_listen: "127.0.0.1:8000".parse().expect("static address"),
            admin_listen: "127.0.0.1:9100".parse().expect("static address"),
            metrics_on_api: false,
            api_key: DEV_API_KEY.into(),
            shards: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            delivery_streams: 8,
            gateway_queue: 65_536,
            heartbeat_secs: 5,
            evict_secs: 15,
            presence_grace_secs: 15,
            max_recover: 300,
            max_channels: 1_000_000,
            drain_secs: 5,
            peers: Vec::new(),
            advertise_quic: None,
            advertise_api: None,
            etcd: discovery::EtcdConfig::default(),
            link_congestion: Default::default(),
            namespaces: Namespaces::default(),
        }
    }
}

impl RouterConfig {
    /// Refuses settings that are unsafe where the router listens: the
    /// well-known development API key on an API address others can reach.
    pub fn check(&self) -> anyhow::Result<()> {
        proto::peer::valid_name(&self.name).map_err(|e| anyhow::anyhow!("config key `name`: {e}"))?;
        self.etcd.check(cfg!(feature = "etcd")).map_err(anyhow::Error::msg)?;
        if self.etcd.enabled() && !self.peers.is_empty() {
            anyhow::bail!("`peers` and `[etcd]` are both set: with etcd, the view says who the peers are");
        }
        if self.api_key == DEV_API_KEY && !self.api_listen.ip().is_loopback() {
            anyhow::bail!(
                "api_key is the development default ({DEV_API_KEY:?}) and api_listen ({}) is not a loopback \
                 address: set api_key (config key `api_key`, or --api-key) to a secret",
                self.api_listen
            );
        }
        Ok(())
    }

    /// The configuration as TOML, with the API key replaced by `<redacted>`
    /// (`router run --print-config`).
    pub fn to_toml_redacted(&self) -> anyhow::Result<String> {
        let mut c = self.clone();
        c.api_key = "<redacted>".into();
        Ok(toml::to_string(&c)?)
    }

    /// Parses a TOML document; unknown keys are errors.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }

    /// This router's QUIC address as others reach it (`advertise_quic`, or
    /// `quic_listen`).
    pub fn me_quic(&self) -> SocketAddr {
        self.advertise_quic.unwrap_or(self.quic_listen)
    }

    /// What this router registers in etcd.
    pub fn member(&self) -> proto::membership::Member {
        proto::membership::Member {
            name: self.name.clone(),
            quic: self.me_quic(),
            api: self.advertise_api.unwrap_or(self.api_listen),
        }
    }

    /// Heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs.max(1))
    }

    /// Drain window.
    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_secs)
    }

    /// Eviction timeout.
    pub fn evict_after(&self) -> Duration {
        Duration::from_secs(self.evict_secs.max(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_development_default() {
        let c = RouterConfig::from_toml("").unwrap();
        assert_eq!(c.quic_listen.to_string(), "127.0.0.1:7100");
        assert_eq!(c.presence_grace_secs, 15);
        let c =
            RouterConfig::from_toml("id = \"r2\"\n[namespaces.namespaces.chat]\nhistory_size = 7\n").unwrap();
        assert_eq!(c.id, "r2");
        assert_eq!(c.namespaces.resolve_str("chat:x").unwrap().history_size, 7);
        assert!(RouterConfig::from_toml("bogus = 1").is_err());
    }

    #[test]
    fn the_printed_configuration_reads_back_without_its_secret() {
        let mut c =
            RouterConfig::from_toml("peers = [\"r2@127.0.0.1:7101\"]\n[etcd]\nlease_ttl_secs = 7\n").unwrap();
        c.api_key = "s3cret-key".into();
        let text = c.to_toml_redacted().unwrap();
        assert!(!text.contains("s3cret-key") && text.contains("<redacted>"), "{text}");
        let back = RouterConfig::from_toml(&text).unwrap();
        assert_eq!(back.peers, c.peers);
        assert_eq!(back.etcd, c.etcd);
        assert_eq!(back.quic_listen, c.quic_listen);
    }
}
