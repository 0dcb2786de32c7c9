//! The gateway's configuration: one TOML file, every key defaulted so a
//! gateway with no file starts on loopback with development settings.
//! Each field says its default and what it costs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use proto::namespace::Namespaces;
use proto::peer::RouterAddr;
use serde::{Deserialize, Serialize};

/// Connection-token verification.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HMAC secret for HS256/384/512 tokens (empty: HMAC tokens refused).
    /// At least [`MIN_HMAC_SECRET`] bytes: a shorter one is refused at
    /// start (it can be guessed offline from one token).
    pub hmac_secret: String,
    /// PEM file with an RSA public key for RS256/384/512 tokens.
    pub rsa_public_key: Option<PathBuf>,
    /// PEM file with an EC (P-256) public key for ES256 tokens.
    pub ec_public_key: Option<PathBuf>,
    /// Accept a `connect` without any token (user `""`); without it such a
    /// connection is closed with 3501. Tokens that are presented are still
    /// verified, and a signed token with an empty `sub` is an anonymous
    /// user either way (as in Centrifugo). Default false.
    #[serde(alias = "allow_anonymous")]
    pub allow_anonymous_connect_without_token: bool,
    /// When set, every token's `aud` must be this (else: invalid token, 3500).
    pub audience: Option<String>,
    /// When set, every token's `iss` must be this (else: invalid token, 3500).
    pub issuer: Option<String>,
}

/// The shortest HMAC secret a gateway accepts (bytes).
pub const MIN_HMAC_SECRET: usize = 32;

/// Per-connection limits; each has a documented answer when exceeded.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest incoming message (bytes, after reassembly and inflation;
    /// default 65,536; above: close 1009).
    pub max_message: usize,
    /// Outbound bytes queued per connection (default 1 MiB; above: close 3008
    /// "slow" without flushing; the client reconnects and recovers).
    pub max_queue_bytes: usize,
    /// Client-side subscriptions per connection (default 128; above: error 106).
    pub max_subscriptions: usize,
    /// Publishes per second per connection (default 50, burst 100; above: error 111).
    pub publish_rate: f64,
    /// Publish burst per connection.
    pub publish_burst: u32,
    /// Publishes per second per user on one core, over all of the user's
    /// connections there (default 100, burst 200; above: error 111).
    pub user_publish_rate: f64,
    /// Publish burst per user.
    pub user_publish_burst: u32,
    /// Router-bound commands other than publish (subscribe, history,
    /// presence, presence_stats) per second per connection (default 20,
    /// burst 50; above: error 111, counted as a refusal).
    pub request_rate: f64,
    /// Burst of router-bound commands per connection.
    pub request_burst: u32,
    /// Router requests one connection may have in flight (default 32;
    /// above: error 111, counted as a refusal).
    pub max_requests_in_flight: usize,
    /// Commands refused for a rate or the in-flight bound tolerated before
    /// the connection is closed with 3013 (default 50).
    pub max_refusals: u32,
    /// Seconds one write may block on a client that does not read (default 1,
    /// as Centrifugo; then the connection is dropped: close 3009 "write error").
    pub write_timeout_secs: u64,
    /// Seconds to complete the HTTP upgrade (default 10; slowloris → connection closed after 408).
    pub handshake_timeout_secs: u64,
    /// Seconds after the upgrade to send `connect` (default 15; else close 3502 "stale").
    pub connect_timeout_secs: u64,
    /// Server ping interval advertised in the connect reply (default 25 s).
    pub ping_secs: u32,
    /// Seconds a pong may take after a ping (default 10; else close 3012).
    pub pong_timeout_secs: u64,
    /// Kernel send buffer of each client socket (`SO_SNDBUF`, set on the
    /// listener and inherited; the kernel doubles it). Default 64 KiB: a
    /// client that falls behind fills this, then the bounded outbound queue
    /// (`max_queue_bytes`, then 3008), instead of letting the kernel's
    /// autotuning grow each socket toward `tcp_wmem`'s maximum (4 MiB on
    /// these machines) and a fan-out to slow clients push the box's TCP
    /// memory into pressure. An idle socket holds no buffer either way.
    /// 0 keeps the kernel's autotuning.
    pub send_buffer_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message: 65_536,
            max_queue_bytes: 1 << 20,
            max_subscriptions: 128,
            publish_rate: 50.0,
            publish_burst: 100,
            user_publish_rate: 100.0,
            user_publish_burst: 200,
            request_rate: 20.0,
            request_burst: 50,
            max_requests_in_flight: 32,
            max_refusals: 50,
            write_timeout_secs: 1,
            handshake_timeout_secs: 10,
            connect_timeout_secs: 15,
            ping_secs: 25,
            pong_timeout_secs: 10,
            send_buffer_bytes: 64 * 1024,
        }
    }
}

/// Storm protection.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admission {
    /// New connections accepted per second per core (default 20,000).
    pub accept_rate: f64,
    /// Burst of new connections per core (default 2,000).
    pub accept_burst: u32,
    /// Handshakes in progress per core (default 8,192); beyond: 503. A
    /// 200,000- and a 300,000-client storm on a 2-CPU box settle with no
    /// refusals at 8,192 and are a third refused at 4,096 (`BENCHMARKS.md`).
    pub max_pending_handshakes: usize,
    /// Sessions the gateway holds at most, over all cores (each core takes
    /// its share); beyond: 503. 0 (the default): what the open-file limit
    /// allows, less 256 descriptors kept for the rest (the gateway raises
    /// its soft limit to the hard one at start and logs the figure).
    pub max_connections: usize,
    /// The soonest `Retry-After` (seconds) sent with 503 (default 1).
    /// Each refused client is handed a slot of its own from then on, slots
    /// spaced at the rate this core drained its pending handshakes over the
    /// last second (`accept_rate` when none were queued), so a storm's
    /// refused clients come back at the pace the core takes them, each
    /// about once.
    pub retry_after_min_secs: u32,
    /// The latest `Retry-After` (default 10): once slots are handed out
    /// that far ahead, further refusals get a uniformly jittered one in
    /// `[min, max]`. At 20,000/s a core holds 180,000 slots; a core of a
    /// crowded box draining 500/s holds 4,500.
    pub retry_after_max_secs: u32,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            accept_rate: 20_000.0,
            accept_burst: 2_000,
            max_pending_handshakes: 8_192,
            max_connections: 0,
            retry_after_min_secs: 1,
            retry_after_max_secs: 10,
        }
    }
}

/// The link to the routers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UplinkConfig {
    /// The routers, `"NAME@QUIC_ADDR"` each (default one router,
    /// `127.0.0.1:7100`). The router's certificate must be valid for NAME, so
    /// one router cannot pass for another; a bare address expects the
    /// development certificate's name, `localhost`. The rendezvous hash that
    /// picks a channel's owner names a router by its QUIC address.
    pub routers: Vec<RouterAddr>,
    /// CA that signs router certificates.
    pub ca_cert: PathBuf,
    /// This gateway's client certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// Batches queued from the cores toward the uplink, one per core turn
    /// that had messages for the routers (default 65,536). A core that finds
    /// the queue full keeps its messages and retries on its timer, holding at
    /// most `core::MAX_UP_BACKLOG` (65,536); past that, requests get error 100
    /// and other messages are dropped and counted (`uplink_dropped`).
    pub queue: usize,
    /// Routers from DNS instead of `routers`: a `host:port` whose A/AAAA
    /// records are the routers (a Kubernetes headless Service), resolved
    /// every `dns_interval_secs`; a failed lookup keeps the last answer.
    /// Ignored when `[etcd]` is set.
    pub dns: Option<String>,
    /// The certificate name every router found through `dns` must present
    /// (default `localhost`, the development certificate's).
    pub dns_name: String,
    /// Seconds between DNS lookups (default 5): a router that joins or
    /// leaves is seen within this.
    pub dns_interval_secs: u64,
    /// Congestion controller of this side of the links (requests,
    /// interest, client publications; default `bbr`): see
    /// `proto::cluster::LinkCongestion`. The link's keep-alive is 2 s and
    /// its idle timeout 10 s (a router silent that long is lost: its
    /// channels move and their subscribers resync).
    pub congestion: proto::cluster::LinkCongestion,
    /// Ask the routers for a datagram copy of every positioned delivery
    /// (default off). Across a lossy WAN a publication then reaches the
    /// cores with the first copy that arrives in order, instead of waiting
    /// for the ordered stream's retransmission and the publications stuck
    /// behind it; costs the link's delivery bytes twice. Measured in
    /// BENCHMARKS.md ("An edge POP across a WAN").
    pub datagram_copies: bool,
}

impl UplinkConfig {
    /// The DNS re-resolution interval.
    pub fn dns_interval(&self) -> Duration {
        Duration::from_secs(self.dns_interval_secs.max(1))
    }
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            routers: vec![RouterAddr::dev("127.0.0.1:7100".parse().expect("static address"))],
            ca_cert: "certs/ca.pem".into(),
            cert: "certs/gateway.pem".into(),
            key: "certs/gateway.key".into(),
            queue: 65_536,
            dns: None,
            dns_name: proto::peer::DEV_NAME.into(),
            dns_interval_secs: 5,
            congestion: Default::default(),
            datagram_copies: false,
        }
    }
}

/// One proxy hook's endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyEndpoint {
    /// `http://host:port/path` the request is POSTed to.
    pub endpoint: String,
    /// Milliseconds the backend has to answer (default 1,000); then the
    /// call fails: error 100 (temporary) to the client.
    pub timeout_ms: u64,
}

impl Default for ProxyEndpoint {
    fn default() -> Self {
        ProxyEndpoint { endpoint: String::new(), timeout_ms: 1_000 }
    }
}

/// The channel hooks of one namespace.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceProxy {
    /// Subscribe hook of the namespace's channels.
    pub subscribe: Option<ProxyEndpoint>,
    /// Publish hook.
    pub publish: Option<ProxyEndpoint>,
    /// Sub-refresh hook.
    pub sub_refresh: Option<ProxyEndpoint>,
}

/// The proxy hooks: the app backend answers over HTTP (the Centrifugo
/// proxy protocol, `proto::proxy`). Every hook is off unless its endpoint
/// is set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// A `connect` without a token asks this hook who the client is (a
    /// connect with a token is verified as a JWT, as before).
    pub connect: Option<ProxyEndpoint>,
    /// A connection's `expire_at` passes: the gateway asks this hook (the
    /// client is not asked to refresh: its connect reply says it does not
    /// expire). Without it, the client refreshes with a new token.
    pub refresh: Option<ProxyEndpoint>,
    /// `rpc` commands (without it: error 108).
    pub rpc: Option<ProxyEndpoint>,
    /// Subscribes without a subscription token, in every namespace not
    /// listed in `namespaces` (instead of the namespace's subscribe policy).
    pub subscribe: Option<ProxyEndpoint>,
    /// Client publishes, in every namespace not listed in `namespaces`
    /// (instead of the namespace's publish policy; the answer may replace
    /// the data).
    pub publish: Option<ProxyEndpoint>,
    /// Subscriptions whose subscribe answer gave an `expire_at` are
    /// refreshed through this hook when it passes (without it they end then).
    pub sub_refresh: Option<ProxyEndpoint>,
    /// Per-namespace channel hooks (the key is the namespace, `""` the
    /// default one): a listed namespace uses its own three, none of the
    /// global ones.
    pub namespaces: std::collections::BTreeMap<String, NamespaceProxy>,
    /// Headers of the client's upgrade request forwarded with every call
    /// (`Cookie` forwards its cookies). Kept per session only when set.
    pub http_headers: Vec<String>,
    /// Calls one core may have in flight (default 1,024); past it a
    /// command that needs one gets error 100 (temporary).
    pub max_in_flight: usize,
    /// Calls to one endpoint failed in a row (transport error, timeout,
    /// 5xx) that open its circuit breaker (default 5): then every call
    /// fails at once (error 100, temporary) for `breaker_open_ms`, after
    /// which one call probes the backend.
    pub breaker_failures: u32,
    /// Milliseconds an open breaker stays open (default 2,000).
    pub breaker_open_ms: u64,
    /// Largest answer body read (default 1 MiB; larger: a failed call).
    pub max_answer_bytes: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect: None,
            refresh: None,
            rpc: None,
            subscribe: None,
            publish: None,
            sub_refresh: None,
            namespaces: Default::default(),
            http_headers: Vec::new(),
            max_in_flight: 1_024,
            breaker_failures: 5,
            breaker_open_ms: 2_000,
            max_answer_bytes: 1 << 20,
        }
    }
}

impl ProxyConfig {
    /// Every endpoint set, with its hook.
    pub fn endpoints(&self) -> Vec<(proto::proxy::Hook, &ProxyEndpoint)> {
        use proto::proxy::Hook;
        let mut out = Vec::new();
        let global = [
            (Hook::Connect, &self.connect),
            (Hook::Refresh, &self.refresh),
            (Hook::Rpc, &self.rpc),
            (Hook::Subscribe, &self.subscribe),
            (Hook::Publish, &self.publish),
            (Hook::SubRefresh, &self.sub_refresh),
        ];
        out.extend(global.into_iter().filter_map(|(h, e)| Some((h, e.as_ref()?))));
        for ns in self.namespaces.values() {
            let each = [
                (Hook::Subscribe, &ns.subscribe),
                (Hook::Publish, &ns.publish),
                (Hook::SubRefresh, &ns.sub_refresh),
            ];
            out.extend(each.into_iter().filter_map(|(h, e)| Some((h, e.as_ref()?))));
        }
        out
    }

    /// Whether any subscribe, publish or sub_refresh hook may apply.
    pub fn has_channel_hooks(&self) -> bool {
        self.subscribe.is_some()
            || self.publish.is_some()
            || self.sub_refresh.is_some()
            || !self.namespaces.is_empty()
    }

    /// Whether any hook is on.
    pub fn enabled(&self) -> bool {
        !self.endpoints().is_empty()
    }

    /// Refuses endpoints that are not `http://` URLs with a host.
    pub fn check(&self) -> Result<(), String> {
        for (hook, e) in self.endpoints() {
            let ok = e.endpoint.strip_prefix("http://").is_some_and(|rest| {
                let host = rest.split('/').next().unwrap_or("");
                !host.is_empty() && !rest.contains(char::is_whitespace)
            });
            if !ok {
                return Err(format!(
                    "proxy {} endpoint {:?} must be an http:// URL with a host",
                    hook.name(),
                    e.endpoint
                ));
            }
            if e.timeout_ms == 0 {
                return Err(format!("proxy {} timeout_ms must be above 0", hook.name()));
            }
        }
        Ok(())
    }

    /// The channel hook `hook` (subscribe, publish or sub_refresh) of a
    /// channel in namespace `ns`.
    pub fn channel_hook(&self, hook: proto::proxy::Hook, ns: &str) -> Option<&ProxyEndpoint> {
        use proto::proxy::Hook;
        let (subscribe, publish, sub_refresh) = match self.namespaces.get(ns) {
            Some(n) => (&n.subscribe, &n.publish, &n.sub_refresh),
            None => (&self.subscribe, &self.publish, &self.sub_refresh),
        };
        match hook {
            Hook::Subscribe => subscribe.as_ref(),
            Hook::Publish => publish.as_ref(),
            Hook::SubRefresh => sub_refresh.as_ref(),
            Hook::Connect | Hook::Refresh | Hook::Rpc => None,
        }
    }
}

/// TLS (wss) on the client listener.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain served to clients (unset: plain `ws://`).
    pub cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub key: Option<PathBuf>,
}

impl TlsConfig {
    /// Whether the client listener speaks TLS.
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }
}

/// The HTTP fallback transports (for clients whose WebSocket is blocked:
/// centrifuge-js falls back to `http_stream` and `sse`) and the
/// unidirectional ones (`uni_http_stream`, `uni_sse`: pushes of the
/// server-side subscriptions only, for `fetch`, `EventSource` or `curl`).
/// Their sessions live on the same cores with the same limits, drain and
/// shared-frame fan-out as WebSocket ones (see `proto::fallback`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackConfig {
    /// Serve them (default true). Off: their paths answer 404.
    pub enabled: bool,
    /// `POST` here starts an `http_stream` session (default `/connection/http_stream`).
    pub http_stream_path: String,
    /// `GET` (or `POST`) here starts an `sse` session (default `/connection/sse`).
    pub sse_path: String,
    /// `POST` here carries an emulated session's commands (default `/emulation`).
    pub emulation_path: String,
    /// `POST` here starts a `uni_http_stream` session (default `/connection/uni_http_stream`).
    pub uni_http_stream_path: String,
    /// `GET` (or `POST`) here starts a `uni_sse` session (default `/connection/uni_sse`).
    pub uni_sse_path: String,
    /// Largest request body (bytes, default 65,536, as Centrifugo): a
    /// stream's first commands or an emulation request; above: 413.
    pub max_request_bytes: usize,
    /// Pages (`Origin`) allowed to use the fallbacks; empty (the default,
    /// for development): any. A request from another origin: 403.
    pub allowed_origins: Vec<String>,
    /// Emulation requests per second per core passed to a router for a
    /// session of another gateway process (default 2,000, burst as much);
    /// beyond, or with the uplink's backlog half full: 503.
    pub relay_rate: f64,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        FallbackConfig {
            enabled: true,
            http_stream_path: "/connection/http_stream".into(),
            sse_path: "/connection/sse".into(),
            emulation_path: "/emulation".into(),
            uni_http_stream_path: "/connection/uni_http_stream".into(),
            uni_sse_path: "/connection/uni_sse".into(),
            max_request_bytes: 65_536,
            allowed_origins: Vec::new(),
            relay_rate: 2_000.0,
        }
    }
}

impl FallbackConfig {
    /// Whether a request from `origin` (its `Origin` header) may use the
    /// fallbacks: any when no origin is listed; a request without one (not
    /// a browser's cross-origin request) always.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        match origin {
            Some(o) if !self.allowed_origins.is_empty() => self.allowed_origins.iter().any(|a| a == o),
            _ => true,
        }
    }

    /// The transport a path starts, if any.
    pub fn transport_of(&self, path: &str) -> Option<proto::fallback::Transport> {
        use proto::fallback::Transport;
        if !self.enabled {
            return None;
        }
        [
            (&self.http_stream_path, Transport::HttpStream),
            (&self.sse_path, Transport::Sse),
            (&self.uni_http_stream_path, Transport::UniHttpStream),
            (&self.uni_sse_path, Transport::UniSse),
        ]
        .into_iter()
        .find(|(p, _)| !p.is_empty() && p.as_str() == path)
        .map(|(_, t)| t)
    }
}

/// Everything a gateway needs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Gateway id, unique per process (default `gw-<pid>`).
    pub id: String,
    /// WebSocket listener (default 127.0.0.1:8080); every core binds it with SO_REUSEPORT.
    pub listen: SocketAddr,
    /// Admin HTTP listener for /metrics, /healthz, /readyz (default 127.0.0.1:9090).
    pub admin_listen: SocketAddr,
    /// Worker cores (default: one per core).
    pub cores: usize,
    /// Pin each worker to its core.
    pub pin_cores: bool,
    /// With `pin_cores`: core `i` is pinned to the process's allowed CPU
    /// number `(first_cpu + i) mod allowed` (default 0). Several gateway
    /// processes on one machine give each its own `first_cpu`, so their
    /// cores spread over the CPUs rather than all landing on the first.
    pub first_cpu: usize,
    /// WebSocket path (default `/connection/websocket`; any path is accepted
    /// when empty).
    pub path: String,
    /// Echo endpoint path for conformance tests (empty: off).
    pub echo_path: String,
    /// Accept permessage-deflate offers (default off). Always without
    /// context takeover: each outbound publication frame is compressed at
    /// most once per core (metric `frames_deflated`) and that one compressed
    /// frame is shared by every compressing session on the core; replies and
    /// frames under 96 bytes, or that do not shrink, go out uncompressed. A
    /// client that limits the server window below 15 bits gets plain frames.
    pub deflate: bool,
    /// Drain window in seconds (default 30).
    pub drain_secs: u64,
    /// Token verification.
    pub auth: AuthConfig,
    /// Per-connection limits.
    pub limits: Limits,
    /// Storm protection.
    pub admission: Admission,
    /// Routers.
    pub uplink: UplinkConfig,
    /// TLS on the client listener (default off; TLS 1.3 only). A TLS
    /// session costs ~1 KB on top of the plain session while idle
    /// (measured in BENCHMARKS.md); what it holds sealed but unsent is
    /// bounded by one 64 KiB flush round.
    pub tls: TlsConfig,
    /// Routers from etcd (`[etcd]`, the routers' own section: endpoints and
    /// prefix; default off). The uplink watches the prefix, links to every
    /// registered router and computes ownership over that view as the
    /// routers do; a channel whose owner is not linked from here has no
    /// router until it is (`/readyz` names such routers).
    pub etcd: discovery::EtcdConfig,
    /// Channel namespaces (must match the routers').
    pub namespaces: Namespaces,
    /// Proxy hooks to the app backend (default: none).
    pub proxy: ProxyConfig,
    /// HTTP fallback transports (default on).
    pub fallback: FallbackConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            id: format!("gw-{}", std::process::id()),
            listen: "127.0.0.1:8080".parse().expect("static address"),
            admin_listen: "127.0.0.1:9090".parse().expect("static address"),
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            pin_cores: true,
            first_cpu: 0,
            path: "/connection/websocket".into(),
            echo_path: String::new(),
            deflate: false,
            drain_secs: 30,
            auth: AuthConfig::default(),
            limits: Limits::default(),
            admission: Admission::default(),
            uplink: UplinkConfig::default(),
            tls: TlsConfig::default(),
            etcd: discovery::EtcdConfig::default(),
            namespaces: Namespaces::default(),
            proxy: ProxyConfig::default(),
            fallback: FallbackConfig::default(),
        }
    }
}

impl GatewayConfig {
    /// Refuses settings the gateway cannot honour: the proxy's endpoints
    /// ([`ProxyConfig::check`]), a `Retry-After` range that is empty or
    /// starts at 0, an admission rate that is not a positive number, a
    /// session queue bound past what its counter holds (2 GiB).
    pub fn check(&self) -> Result<(), String> {
        self.proxy.check()?;
        let adm = &self.admission;
        if adm.retry_after_min_secs == 0 || adm.retry_after_min_secs > adm.retry_after_max_secs {
            return Err(format!(
                "admission.retry_after_min_secs ({}) must be at least 1 and at most retry_after_max_secs ({})",
                adm.retry_after_min_secs, adm.retry_after_max_secs
            ));
        }
        if !(adm.accept_rate.is_finite() && adm.accept_rate > 0.0) {
            return Err(format!("admission.accept_rate ({}) must be a positive number", adm.accept_rate));
        }
        if self.limits.max_queue_bytes > crate::session::outbound::MAX_QUEUE_BYTES {
            return Err(format!(
                "limits.max_queue_bytes ({}) must be below 2 GiB",
                self.limits.max_queue_bytes
            ));
        }
        Ok(())
    }

    /// Parses TOML; unknown keys are errors.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        Ok(toml::from_str(text)?)
    }

    /// Drain window.
    pub fn drain_window(&self) -> Duration {
        Duration::from_secs(self.drain_secs)
    }

    /// The configuration as TOML with the HMAC secret replaced by
    /// `<redacted>` (`gateway run --print-config`).
    pub fn to_toml_redacted(&self) -> anyhow::Result<String> {
        let mut c = self.clone();
        if !c.auth.hmac_secret.is_empty() {
            c.auth.hmac_secret = "<redacted>".into();
        }
        Ok(toml::to_string(&c)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_configuration_reads_back_without_its_secret() {
        let mut c =
            GatewayConfig::from_toml("[uplink]\nrouters = [\"r1@127.0.0.1:7100\"]\ndns_interval_secs = 9\n")
                .unwrap();
        c.auth.hmac_secret = "a-secret-of-at-least-thirty-two-bytes".into();
        let text = c.to_toml_redacted().unwrap();
        assert!(!text.contains("a-secret-of") && text.contains("<redacted>"), "{text}");
        let back = GatewayConfig::from_toml(&text).unwrap();
        assert_eq!(back.uplink.routers, c.uplink.routers);
        assert_eq!(back.uplink.dns_interval_secs, 9);
        assert_eq!(back.limits.max_subscriptions, c.limits.max_subscriptions);
    }

    #[test]
    fn proxy_endpoints_are_checked_and_namespaces_choose_their_hooks() {
        use proto::proxy::Hook;
        let c = GatewayConfig::from_toml(
            "[proxy.subscribe]\nendpoint = \"http://b:1/sub\"\n[proxy.namespaces.chat.publish]\nendpoint = \"http://b:1/pub\"\ntimeout_ms = 50\n",
        )
        .unwrap();
        assert!(c.proxy.check().is_ok() && c.proxy.enabled());
        assert_eq!(c.proxy.channel_hook(Hook::Subscribe, "").unwrap().endpoint, "http://b:1/sub");
        assert!(
            c.proxy.channel_hook(Hook::Subscribe, "chat").is_none(),
            "a listed namespace has only its own"
        );
        assert_eq!(c.proxy.channel_hook(Hook::Publish, "chat").unwrap().timeout_ms, 50);
        assert!(!GatewayConfig::default().proxy.enabled());
        for bad in ["https://b/x", "b:1/x", "http:///x", "http://b/ x"] {
            let c = GatewayConfig::from_toml(&format!("[proxy.connect]\nendpoint = \"{bad}\"\n")).unwrap();
            assert!(c.proxy.check().is_err(), "{bad}");
        }
        let c = GatewayConfig::from_toml("[proxy.rpc]\nendpoint = \"http://b/\"\ntimeout_ms = 0\n").unwrap();
        assert!(c.proxy.check().is_err(), "a zero timeout");
        assert!(c.check().is_err(), "the whole configuration's check includes the proxy's");
        assert!(GatewayConfig::from_toml("[proxy.connect]\nendpont = \"http://b/\"\n").is_err());
    }

    #[test]
    fn defaults_and_overrides() {
        let c = GatewayConfig::from_toml("").unwrap();
        assert_eq!(c.limits.max_subscriptions, 128);
        assert_eq!(c.limits.max_queue_bytes, 1 << 20);
        let c = GatewayConfig::from_toml("[limits]\nmax_subscriptions = 3\n[auth]\nallow_anonymous = true\n")
            .unwrap();
        assert_eq!(c.limits.max_subscriptions, 3);
        assert!(c.auth.allow_anonymous_connect_without_token);
        assert!(GatewayConfig::from_toml("[limits]\nnope = 1\n").is_err());
    }

    #[test]
    fn admission_and_queue_bounds_are_checked() {
        assert!(GatewayConfig::default().check().is_ok());
        for bad in [
            "[admission]\nretry_after_min_secs = 0\n",
            "[admission]\nretry_after_min_secs = 6\nretry_after_max_secs = 5\n",
            "[admission]\naccept_rate = 0.0\n",
            "[admission]\naccept_rate = -5.0\n",
            "[limits]\nmax_queue_bytes = 5000000000\n",
            "[limits]\nmax_queue_bytes = 2147483648\n",
        ] {
            let c = GatewayConfig::from_toml(bad).unwrap();
            assert!(c.check().is_err(), "{bad}");
        }
    }
}
