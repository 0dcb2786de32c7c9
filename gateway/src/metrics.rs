//! Counters, rendered as Prometheus text on the admin port.
//!
//! Every counter is a relaxed atomic written by exactly one thread (a core or
//! the uplink), so there is no contention on the hot path; the admin thread
//! only reads.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one core.
#[derive(Debug, Default)]
pub struct CoreMetrics {
    /// Open WebSocket sessions.
    pub connections: AtomicU64,
    /// Completed upgrades.
    pub handshakes: AtomicU64,
    /// Refused upgrades (503 admission, 4xx bad requests).
    pub rejections: AtomicU64,
    /// Upgrades refused by admission control (503).
    pub admission_rejections: AtomicU64,
    /// Accept errors (EMFILE/ENFILE and others), after which the core backs off.
    pub accept_errors: AtomicU64,
    /// Frames queued to sessions for publications (one per recipient).
    pub deliveries: AtomicU64,
    /// Bytes queued and not yet written.
    pub queued_bytes: AtomicU64,
    /// Sessions closed with 3008 "slow".
    pub slow_disconnects: AtomicU64,
    /// Connections this core handed to their user's core.
    pub handovers: AtomicU64,
    /// Subscribes answered from the channel position the core knows,
    /// without a router round trip.
    pub local_subscribes: AtomicU64,
    /// Messages for the routers dropped because the uplink's queue stayed
    /// full past the core's backlog bound (requests among them got error 100).
    pub uplink_dropped: AtomicU64,
    /// Router requests unanswered within `core::REQUEST_TIMEOUT` (the
    /// client got error 100, temporary).
    pub router_timeouts: AtomicU64,
    /// Server API commands for a user (subscribe, unsubscribe, disconnect,
    /// refresh) applied to one of this core's sessions.
    pub user_commands: AtomicU64,
    /// Server-side subscriptions not made: the session was at its
    /// subscription limit or the channel's namespace is unknown.
    pub server_subscribes_refused: AtomicU64,
    /// HTTP fallback streams started (http_stream, sse, uni_http_stream, uni_sse).
    pub fallback_streams: AtomicU64,
    /// HTTP fallback streams open.
    pub fallback_open: AtomicU64,
    /// Connections whose handshake (or first fallback request) is in
    /// progress: what `admission.max_pending_handshakes` bounds.
    pub pending_handshakes: AtomicU64,
    /// `POST /emulation` requests handed to their session.
    pub emulation_requests: AtomicU64,
    /// `POST /emulation` requests whose session was not found (404).
    pub emulation_unknown: AtomicU64,
    /// `POST /emulation` requests for another gateway process, passed to a
    /// router to relay (202).
    pub emulation_relayed: AtomicU64,
    /// Sessions this core closed, by close code ([`CLOSE_CODES`]; the last
    /// slot counts any other code): why clients went away (3012 no pong,
    /// 3008 slow, 3001 shutdown, ...).
    pub closes: [AtomicU64; CLOSE_CODES.len() + 1],
}

/// The close codes counted one by one in `switchyard_gateway_closes_total`:
/// the WebSocket protocol's and the client protocol's (Centrifugo's).
pub const CLOSE_CODES: [u16; 31] = [
    1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 3000, 3001, 3002, 3003, 3004, 3005, 3006, 3008, 3009,
    3010, 3011, 3012, 3013, 3500, 3501, 3502, 3503, 3504, 3505, 3506, 3507, 3508, 3509,
];

impl CoreMetrics {
    /// Counts a session closed with `code`.
    pub fn closed(&self, code: u16) {
        let i = CLOSE_CODES.iter().position(|c| *c == code).unwrap_or(CLOSE_CODES.len());
        self.closes[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Gateway-wide counters.
#[derive(Debug)]
pub struct Metrics {
    /// One entry per core.
    pub cores: Vec<CoreMetrics>,
    /// Publications received from routers.
    pub publications_in: AtomicU64,
    /// WebSocket frames encoded for publications (1 per publication, or fewer when packed).
    pub frames_encoded: AtomicU64,
    /// Compressed twins of frames (permessage-deflate): at most one per
    /// publication frame and core that has a compressing recipient.
    pub frames_deflated: AtomicU64,
    /// HTTP fallback framings of publication frames: at most one per
    /// publication frame, core and fallback transport with a recipient.
    pub frames_reframed: AtomicU64,
    /// Frames of a packed run's tail: made for subscribers whose position
    /// falls inside the run (answered between two of its publications).
    pub frames_cut: AtomicU64,
    /// Per-hop latency of deliveries (`switchyard_gateway_hop_seconds`):
    /// the router's link writer → the uplink's reading (clocks of one box).
    pub hop_link: proto::hist::Histogram,
    /// The uplink → a core (the core's inbox, and any wait for a resync).
    pub hop_uplink_to_core: proto::hist::Histogram,
    /// A core's fan-out of a delivery → its first socket write.
    pub hop_core_to_first_write: proto::hist::Histogram,
    /// A core's fan-out of a delivery → the last socket write of that flush.
    pub hop_core_to_last_write: proto::hist::Histogram,
    /// Channel resyncs (gaps, link loss, router back-pressure).
    pub resyncs: AtomicU64,
    /// Subscriptions sent back to resubscribe (unsubscribe push 2500), for
    /// any reason: a channel resync, or a position one subscriber alone
    /// could not continue. A server-side one closes its session with 3010
    /// instead: counted once per session closed.
    pub subscriptions_resynced: AtomicU64,
    /// Messages dropped because a core's inbox was full (its sessions resync).
    pub core_queue_full: AtomicU64,
    /// Server API user commands dropped: the user's core was owed
    /// [`crate::uplink::MAX_OWED_USER_COMMANDS`] already.
    pub user_commands_dropped: AtomicU64,
    /// Router links up now.
    pub routers_up: AtomicU64,
    /// Router link attempts that failed in the TLS handshake: a router
    /// whose certificate is not valid for the name it is listed by, or one
    /// that refused this gateway's certificate.
    pub router_link_refusals: AtomicU64,
    /// Publications handed over from a router's datagram copy before the
    /// ordered stream brought them (`uplink.datagram_copies`).
    pub datagram_deliveries: AtomicU64,
    /// Stream copies skipped because their datagram copy came first.
    pub duplicate_copies: AtomicU64,
    /// Routers the gateway knows of (the list, the DNS answer, or the view).
    pub routers_known: AtomicU64,
    /// The etcd revision of the membership view the uplink follows.
    pub membership_revision: AtomicU64,
    /// Routers of the membership whose link is down (with etcd their
    /// channels have no router here: `/readyz` names them).
    pub unlinked_routers: std::sync::Mutex<Vec<String>>,
    /// The proxy hooks' calls, failures and latency.
    pub proxy: crate::proxy::ProxyMetrics,
}

impl Metrics {
    /// Counters for `cores` cores.
    pub fn new(cores: usize) -> Self {
        Metrics {
            cores: (0..cores).map(|_| CoreMetrics::default()).collect(),
            publications_in: AtomicU64::new(0),
            frames_encoded: AtomicU64::new(0),
            frames_deflated: AtomicU64::new(0),
            frames_reframed: AtomicU64::new(0),
            frames_cut: AtomicU64::new(0),
            hop_link: Default::default(),
            hop_uplink_to_core: Default::default(),
            hop_core_to_first_write: Default::default(),
            hop_core_to_last_write: Default::default(),
            resyncs: AtomicU64::new(0),
            subscriptions_resynced: AtomicU64::new(0),
            core_queue_full: AtomicU64::new(0),
            user_commands_dropped: AtomicU64::new(0),
            routers_up: AtomicU64::new(0),
            router_link_refusals: AtomicU64::new(0),
            datagram_deliveries: AtomicU64::new(0),
            duplicate_copies: AtomicU64::new(0),
            routers_known: AtomicU64::new(0),
            membership_revision: AtomicU64::new(0),
            unlinked_routers: std::sync::Mutex::new(Vec::new()),
            proxy: Default::default(),
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        type Field = fn(&CoreMetrics) -> &AtomicU64;
        let per_core: [(&str, &str, Field); 20] = [
            ("switchyard_gateway_connections", "gauge", |c| &c.connections),
            ("switchyard_gateway_handshakes_total", "counter", |c| &c.handshakes),
            ("switchyard_gateway_rejections_total", "counter", |c| &c.rejections),
            ("switchyard_gateway_admission_rejections_total", "counter", |c| &c.admission_rejections),
            ("switchyard_gateway_accept_errors_total", "counter", |c| &c.accept_errors),
            ("switchyard_gateway_deliveries_total", "counter", |c| &c.deliveries),
            ("switchyard_gateway_queued_bytes", "gauge", |c| &c.queued_bytes),
            ("switchyard_gateway_slow_disconnects_total", "counter", |c| &c.slow_disconnects),
            ("switchyard_gateway_handovers_total", "counter", |c| &c.handovers),
            ("switchyard_gateway_local_subscribes_total", "counter", |c| &c.local_subscribes),
            ("switchyard_gateway_uplink_dropped_total", "counter", |c| &c.uplink_dropped),
            ("switchyard_gateway_router_timeouts_total", "counter", |c| &c.router_timeouts),
            ("switchyard_gateway_user_commands_total", "counter", |c| &c.user_commands),
            ("switchyard_gateway_server_subscribes_refused_total", "counter", |c| {
                &c.server_subscribes_refused
            }),
            ("switchyard_gateway_fallback_streams_total", "counter", |c| &c.fallback_streams),
            ("switchyard_gateway_fallback_streams", "gauge", |c| &c.fallback_open),
            ("switchyard_gateway_pending_handshakes", "gauge", |c| &c.pending_handshakes),
            ("switchyard_gateway_emulation_requests_total", "counter", |c| &c.emulation_requests),
            ("switchyard_gateway_emulation_unknown_total", "counter", |c| &c.emulation_unknown),
            ("switchyard_gateway_emulation_relayed_total", "counter", |c| &c.emulation_relayed),
        ];
        for (name, kind, get) in per_core {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (i, c) in self.cores.iter().enumerate() {
                let _ = writeln!(out, "{name}{{core=\"{i}\"}} {}", get(c).load(Ordering::Relaxed));
            }
        }
        let closes = "switchyard_gateway_closes_total";
        let _ = writeln!(out, "# TYPE {closes} counter");
        for (i, c) in self.cores.iter().enumerate() {
            for (k, n) in c.closes.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let code = CLOSE_CODES.get(k).map_or_else(|| "other".to_owned(), u16::to_string);
                    let _ = writeln!(out, "{closes}{{core=\"{i}\",code=\"{code}\"}} {n}");
                }
            }
        }
        for (name, v) in [
            ("switchyard_gateway_publications_in_total", &self.publications_in),
            ("switchyard_gateway_frames_encoded_total", &self.frames_encoded),
            ("switchyard_gateway_frames_deflated_total", &self.frames_deflated),
            ("switchyard_gateway_frames_reframed_total", &self.frames_reframed),
            ("switchyard_gateway_frames_cut_total", &self.frames_cut),
            ("switchyard_gateway_resyncs_total", &self.resyncs),
            ("switchyard_gateway_subscriptions_resynced_total", &self.subscriptions_resynced),
            ("switchyard_gateway_core_queue_full_total", &self.core_queue_full),
            ("switchyard_gateway_user_commands_dropped_total", &self.user_commands_dropped),
            ("switchyard_gateway_routers_up", &self.routers_up),
            ("switchyard_gateway_router_link_refusals_total", &self.router_link_refusals),
            ("switchyard_gateway_datagram_deliveries_total", &self.datagram_deliveries),
            ("switchyard_gateway_duplicate_copies_total", &self.duplicate_copies),
            ("switchyard_gateway_routers_known", &self.routers_known),
            ("switchyard_gateway_membership_revision", &self.membership_revision),
        ] {
            let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
            let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {}", v.load(Ordering::Relaxed));
        }
        self.proxy.render(&mut out);
        let hop = "switchyard_gateway_hop_seconds";
        let _ = writeln!(out, "# TYPE {hop} histogram");
        self.hop_link.render(&mut out, hop, "hop", "link");
        self.hop_uplink_to_core.render(&mut out, hop, "hop", "uplink_to_core");
        self.hop_core_to_first_write.render(&mut out, hop, "hop", "core_to_first_write");
        self.hop_core_to_last_write.render(&mut out, hop, "hop", "core_to_last_write");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_are_counted_by_code_and_other_codes_together() {
        let m = Metrics::new(2);
        m.cores[1].closed(3012);
        m.cores[1].closed(3012);
        m.cores[0].closed(1000);
        m.cores[0].closed(4242);
        let text = m.render();
        assert!(text.contains("switchyard_gateway_closes_total{core=\"1\",code=\"3012\"} 2"), "{text}");
        assert!(text.contains("switchyard_gateway_closes_total{core=\"0\",code=\"1000\"} 1"));
        assert!(text.contains("switchyard_gateway_closes_total{core=\"0\",code=\"other\"} 1"));
        assert!(!text.contains("code=\"3008\""), "codes never used are not rendered");
    }
}
