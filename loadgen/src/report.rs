//! The run report: a summary table on the terminal, `--json` for machines,
//! and an HTML page with charts (connections and deliveries over time,
//! latency percentiles) written to a file whose path is printed.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::chart::{Band, Chart, Series};
use crate::ramp::{Capacity, STEADY_FRACTION, Step};
use crate::worker::{Summary, decode_hist};

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        }
    }
}

/// Latency of the publications of one phase (a ramp step, the steady
/// fan-out), whenever they were delivered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseLatency {
    /// The phase.
    pub phase: String,
    /// Its publications' publish → deliver latency.
    pub latency_ms: Percentiles,
}

/// One sample of the run's timeline.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    /// Seconds since start.
    pub t: f64,
    /// Clients connected.
    pub connected: u64,
    /// Publications delivered so far.
    pub deliveries: u64,
    /// Publish → deliver p50 of the deliveries in the last window (ms).
    pub p50_ms: f64,
    /// Publish → deliver p99 of the deliveries in the last window (ms).
    pub p99_ms: f64,
}

/// Everything a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    /// Scenario name.
    pub scenario: String,
    /// Clients asked for.
    pub connections: u64,
    /// Clients connected.
    pub connected: u64,
    /// 503s answered (and retried).
    pub rejected: u64,
    /// Upgrade attempts that timed out (and were retried).
    pub timeouts: u64,
    /// Upgrade attempts after each client's first (503s, timeouts, failures).
    pub retries: u64,
    /// Clients that never connected.
    pub failed: u64,
    /// Seconds the storm took until every client was connected or given up.
    pub storm_secs: f64,
    /// Clients connected per second during the storm.
    pub accept_rate: f64,
    /// TCP connect + upgrade latency.
    pub upgrade_ms: Percentiles,
    /// Upgrade → connect reply latency.
    pub connect_ms: Percentiles,
    /// Publications sent.
    pub publications: u64,
    /// Publications delivered (all subscribers).
    pub deliveries: u64,
    /// Seconds from the first publish until every subscriber had everything.
    pub fanout_secs: f64,
    /// Deliveries per second over the fan-out.
    pub deliveries_per_sec: f64,
    /// Publish → deliver latency.
    pub latency_ms: Percentiles,
    /// Silent losses (the run fails when non-zero).
    pub lost: u64,
    /// Duplicates (the run fails when non-zero).
    pub duplicated: u64,
    /// Reordered (the run fails when non-zero).
    pub reordered: u64,
    /// Explicit resyncs (`recovered:false` / unsubscribe 2500): not silent.
    pub unrecovered: u64,
    /// Publications the server said it could not deliver (`recovered:false`,
    /// a new epoch): explicit, reported apart from `lost`, not a failure.
    pub forgiven: u64,
    /// Payloads (`seq`) that differ from what was published at their offset
    /// (the run fails when non-zero).
    pub payload_mismatch: u64,
    /// Publications whose payload was compared with the publisher's log.
    pub payload_verified: u64,
    /// Subscriptions the checker followed to the end (of clients that connected).
    pub streams: u64,
    /// Subscriptions never positioned, so never checked (the run fails when non-zero).
    pub unpositioned: u64,
    /// Subscriptions refused or ended by the server (the run fails when non-zero).
    pub failed_subscriptions: u64,
    /// Subscriptions without offsets (ephemeral namespaces): nothing to check.
    pub unchecked: u64,
    /// Clients that connected, then gave up before the end (the run fails
    /// when non-zero; their missing tail is in `lost`).
    pub gave_up: u64,
    /// Publications for a channel the client was not subscribed to (the run
    /// fails when non-zero).
    pub stray: u64,
    /// WebSocket frames received by all clients.
    pub frames: u64,
    /// Loadgen CPU seconds per 100,000 deliveries.
    pub loadgen_cpu_per_100k: f64,
    /// Gateway CPU seconds per 100,000 deliveries, over the fan-out (after
    /// the storm).
    pub gateway_cpu_per_100k: f64,
    /// WebSocket frames the gateways encoded for publications during the
    /// fan-out (one per publication per gateway, fewer when packed).
    pub gateway_frames_encoded: u64,
    /// Compressed twins the gateways made during the fan-out (at most one
    /// per encoded frame and core with compressing subscribers).
    pub gateway_frames_deflated: u64,
    /// Gateway CPU per connected client over the storm (µs): accept, upgrade,
    /// token check, subscriptions.
    pub gateway_cpu_us_per_conn: f64,
    /// The gateways' admission control, when the run started them.
    pub admission: String,
    /// CPU seconds the gateway processes used over the storm.
    pub storm_gateway_cpu_secs: f64,
    /// CPU seconds the load generator's worker processes used over the storm.
    pub storm_loadgen_cpu_secs: f64,
    /// Gateway resident memory per connected client (bytes, all gateway processes).
    pub gateway_rss_per_conn: f64,
    /// Reconnects after the server closed connections.
    pub reconnects: u64,
    /// Reconnect wave: when the gateway was drained or killed (seconds since start).
    pub wave_at_secs: Option<f64>,
    /// Reconnect wave: seconds until as many clients were online as before.
    pub reconnect_secs: Option<f64>,
    /// Reconnect wave: the surviving gateways' peak handshake rate.
    pub peak_handshakes_per_sec: f64,
    /// `--storm-during`: new connections asked for during the fan-out, how
    /// many got in, and how many 503s they were answered (and retried).
    pub storm_during: u64,
    /// Storm-during clients connected.
    pub storm_during_connected: u64,
    /// Storm-during 503s.
    pub storm_during_rejected: u64,
    /// Storm-during clients that never connected or gave up (the run fails
    /// when non-zero).
    pub storm_during_failed: u64,
    /// Clients of worker processes that sent no summary within
    /// [`crate::orchestrate::SUMMARY_WAIT`] of `stop` (killed then): nothing
    /// of theirs is counted (the run fails when non-zero).
    pub unreported: u64,
    /// Publishes the HTTP API refused or could not take (a router wave).
    pub api_errors: u64,
    /// Messages clients published (chat), and how many were refused.
    pub client_publications: u64,
    /// Client publishes refused by the server.
    pub publish_errors: u64,
    /// Channel joins the backend made through the server API (`subscribe`
    /// for a user: every connection of the user gets the channel), and
    /// leaves (`unsubscribe`); API calls that failed are in `api_errors`.
    pub join_calls: u64,
    /// Leave calls.
    pub leave_calls: u64,
    /// Joins the clients saw (a `subscribe` push each), and leaves (an
    /// unsubscribe push 2000 of a joined channel); each joined stream is
    /// checked like any other until its leave.
    pub joins: u64,
    /// Leaves seen.
    pub leaves: u64,
    /// The demo's capacity ramp, step by step ([`crate::ramp`]); empty when
    /// `--rate` was given.
    pub ramp: Vec<Step>,
    /// The highest fan-out rate the ramp saw the box keep up with.
    pub capacity: Option<Capacity>,
    /// Publications per second of the (steady) fan-out.
    pub steady_rate: f64,
    /// Where that rate came from: a share of the capacity, or `--rate`.
    pub steady_rate_from: String,
    /// Publish → deliver latency of the steady fan-out's publications alone
    /// (the ramp's are in `phase_latency`).
    pub steady_latency_ms: Percentiles,
    /// Publish → deliver latency of each tagged phase's publications.
    pub phase_latency: Vec<PhaseLatency>,
    /// Names of the phase tags publications carry (`"ph": k` is
    /// `phase_tags[k]`), for [`RunReport::add_summaries`].
    #[serde(skip)]
    pub phase_tags: Vec<String>,
    /// When each phase began (seconds since start).
    pub phases: Vec<(String, f64)>,
    /// Timeline.
    pub timeline: Vec<Sample>,
}

impl RunReport {
    /// Folds worker summaries in.
    pub fn add_summaries(&mut self, summaries: &[Summary]) {
        let mut up = Histogram::<u64>::new(3).expect("hist");
        let mut con = Histogram::<u64>::new(3).expect("hist");
        let mut lat = Histogram::<u64>::new(3).expect("hist");
        let mut phases: Vec<Histogram<u64>> =
            self.phase_tags.iter().map(|_| Histogram::new(3).expect("hist")).collect();
        for s in summaries {
            for (dst, src) in phases.iter_mut().zip(&s.phase_latency_us) {
                if let Some(h) = decode_hist(src) {
                    let _ = dst.add(&h);
                }
            }
            self.connected += s.connected;
            self.rejected += s.rejected;
            self.timeouts += s.timeouts;
            self.retries += s.retries;
            self.failed += s.failed;
            self.deliveries += s.deliveries;
            self.lost += s.lost;
            self.duplicated += s.duplicated;
            self.reordered += s.reordered;
            self.unrecovered += s.unrecovered;
            self.forgiven += s.forgiven;
            self.payload_mismatch += s.payload_mismatch;
            self.payload_verified += s.payload_verified;
            self.streams += s.streams;
            self.unpositioned += s.unpositioned;
            self.failed_subscriptions += s.failed_subscriptions;
            self.unchecked += s.unchecked;
            self.gave_up += s.gave_up;
            self.stray += s.stray;
            self.frames += s.frames;
            self.reconnects += s.reconnects;
            self.client_publications += s.published;
            self.publish_errors += s.publish_errors;
            self.joins += s.joins;
            self.leaves += s.leaves;
            for (dst, src) in [(&mut up, &s.upgrade_us), (&mut con, &s.connect_us), (&mut lat, &s.latency_us)]
            {
                if let Some(h) = decode_hist(src) {
                    let _ = dst.add(&h);
                }
            }
        }
        self.upgrade_ms = Percentiles::of(&up);
        self.connect_ms = Percentiles::of(&con);
        self.latency_ms = Percentiles::of(&lat);
        self.phase_latency = self
            .phase_tags
            .iter()
            .zip(&phases)
            .map(|(phase, h)| PhaseLatency { phase: phase.clone(), latency_ms: Percentiles::of(h) })
            .collect();
    }

    /// Whether the run passed, and if not, every reason why. Red: anything
    /// lost, duplicated, reordered, delivered with the wrong payload or on a
    /// channel not subscribed to; any client that never connected, never
    /// started or gave up; any subscription never positioned or refused; any
    /// publish the HTTP API or the gateway refused. Green ("Nothing lost")
    /// only when every client was checked to the end. Explicit resyncs and
    /// the publications they forgave are reported, not red.
    pub fn verdict(&self) -> Verdict {
        let mut reasons = Vec::new();
        let mut red = |n: u64, one: &str, many: &str| {
            if n > 0 {
                reasons.push(format!("{n} {}", if n == 1 { one } else { many }));
            }
        };
        red(self.lost, "publication lost", "publications lost");
        red(self.duplicated, "publication duplicated", "publications duplicated");
        red(self.reordered, "publication reordered", "publications reordered");
        red(self.payload_mismatch, "payload mismatch", "payload mismatches");
        red(
            self.stray,
            "publication on a channel not subscribed to",
            "publications on channels not subscribed to",
        );
        let of = self.connections;
        red(
            self.failed,
            &format!("of {of} clients never connected"),
            &format!("of {of} clients never connected"),
        );
        red(
            self.unreported,
            "client in a worker that did not report",
            "clients in workers that did not report",
        );
        red(
            of.saturating_sub(self.connected + self.failed + self.unreported),
            &format!("of {of} clients never started"),
            &format!("of {of} clients never started"),
        );
        red(self.gave_up, "client gave up before the end", "clients gave up before the end");
        red(self.unpositioned, "subscription never positioned", "subscriptions never positioned");
        red(self.failed_subscriptions, "subscription refused", "subscriptions refused");
        red(self.api_errors, "API publish failed", "API publishes failed");
        red(self.publish_errors, "client publish refused", "client publishes refused");
        red(
            self.storm_during_failed,
            "storm-during client failed or gave up",
            "storm-during clients failed or gave up",
        );
        Verdict { ok: reasons.is_empty(), reasons }
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let p = |x: &Percentiles| {
            if x.count == 0 {
                // Nothing was measured: no zeros that look like figures.
                return "— (no samples)".to_string();
            }
            format!(
                "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2} ms",
                x.p50, x.p90, x.p99, x.p999, x.max
            )
        };
        let _ = writeln!(s, "── Switchyard {} ──────────────────────────────", self.scenario);
        let _ = writeln!(
            s,
            "storm        {} of {} connected, {} rejected (503, retried), {} failed",
            self.connected, self.connections, self.rejected, self.failed
        );
        let _ = writeln!(s, "             {:.1} s, {:.0} connections/s", self.storm_secs, self.accept_rate);
        if !self.admission.is_empty() {
            let _ = writeln!(s, "admission    {}", self.admission);
        }
        if self.timeouts > 0 || self.retries > 0 {
            let _ = writeln!(
                s,
                "             {} retries ({:.2} per client), {} upgrade timeouts",
                self.retries,
                self.retries as f64 / self.connections.max(1) as f64,
                self.timeouts
            );
        }
        let _ = writeln!(s, "upgrade      {}", p(&self.upgrade_ms));
        let _ = writeln!(s, "connect      {}", p(&self.connect_ms));
        if self.client_publications > 0 {
            let _ = writeln!(
                s,
                "chat         {} messages from clients ({} refused)",
                self.client_publications, self.publish_errors
            );
        }
        if self.join_calls > 0 {
            let _ = writeln!(
                s,
                "joins        {} join and {} leave calls; clients saw {} joins, {} leaves",
                self.join_calls, self.leave_calls, self.joins, self.leaves
            );
        }
        if self.storm_during > 0 {
            let _ = writeln!(
                s,
                "storm during {} of {} new clients connected during the fan-out ({} 503s, retried)",
                self.storm_during_connected, self.storm_during, self.storm_during_rejected
            );
        }
        if !self.phases.is_empty() {
            let list: Vec<String> = self.phases.iter().map(|(n, t)| format!("{n} @ {t:.1} s")).collect();
            let _ = writeln!(s, "phases       {}", list.join(", "));
        }
        if self.publications > 0 {
            let ramp: u64 = self.ramp.iter().map(|s| s.measure.publications).sum();
            if ramp > 0 {
                let _ = writeln!(
                    s,
                    "fan-out      {} publications ({ramp} in the ramp) → {} deliveries, {} frames; the steady part {:.1} s at {:.0} deliveries/s",
                    self.publications,
                    self.deliveries,
                    self.frames,
                    self.fanout_secs,
                    self.deliveries_per_sec
                );
            } else {
                let _ = writeln!(
                    s,
                    "fan-out      {} publications → {} deliveries in {:.1} s ({:.0}/s, {} frames)",
                    self.publications,
                    self.deliveries,
                    self.fanout_secs,
                    self.deliveries_per_sec,
                    self.frames
                );
            }
            let _ = writeln!(s, "latency      {} (whole run)", p(&self.latency_ms));
        }
        if !self.ramp.is_empty() {
            let _ = writeln!(
                s,
                "ramp         {:>8} {:>5} {:>11} {:>11} {:>7} {:>9} {:>9}",
                "pubs/s", "pubs", "asked/s", "delivered/s", "drain", "p50", "p99"
            );
            for st in &self.ramp {
                let m = &st.measure;
                let _ = writeln!(
                    s,
                    "             {:>8.1} {:>5} {:>11.0} {:>11.0} {:>5.1} s {:>6.0} ms {:>6.0} ms  {}",
                    m.rate,
                    m.publications,
                    st.asked_per_sec,
                    st.delivered_per_sec,
                    m.drain_secs,
                    m.p50_ms,
                    m.p99_ms,
                    st.reason.as_deref().unwrap_or("kept up")
                );
            }
        }
        if let Some(c) = &self.capacity {
            let _ = writeln!(s, "capacity     {}", capacity_text(c));
        }
        if !self.steady_rate_from.is_empty() {
            let _ = writeln!(
                s,
                "steady       {:.1} publications/s ({})",
                self.steady_rate, self.steady_rate_from
            );
            let _ = writeln!(s, "steady lat.  {}", p(&self.steady_latency_ms));
        }
        let _ = writeln!(
            s,
            "correctness  lost {}  duplicated {}  reordered {}  payload mismatches {}  explicit resyncs {} ({} forgiven)",
            self.lost,
            self.duplicated,
            self.reordered,
            self.payload_mismatch,
            self.unrecovered,
            self.forgiven
        );
        let _ = writeln!(
            s,
            "checked      {} subscriptions ({} without offsets, {} never positioned, {} refused), {} payloads against the publisher's log; {} clients gave up; {} unreported",
            self.streams,
            self.unchecked,
            self.unpositioned,
            self.failed_subscriptions,
            self.payload_verified,
            self.gave_up,
            self.unreported
        );
        if self.publications > 0 {
            let _ = writeln!(
                s,
                "cpu          loadgen {:.2} s / 100k deliveries, gateway {:.2} s / 100k deliveries",
                self.loadgen_cpu_per_100k, self.gateway_cpu_per_100k
            );
            let _ = writeln!(
                s,
                "encoding     gateways framed {} frames ({} compressed twins) for {} publications",
                self.gateway_frames_encoded, self.gateway_frames_deflated, self.publications
            );
        }
        let _ = writeln!(
            s,
            "storm cpu    gateway {:.0} µs per connection; {:.1} s gateways, {:.1} s load generator",
            self.gateway_cpu_us_per_conn, self.storm_gateway_cpu_secs, self.storm_loadgen_cpu_secs
        );
        let _ = writeln!(s, "memory       gateway RSS {:.0} B per connection", self.gateway_rss_per_conn);
        if let Some(at) = self.wave_at_secs {
            let back =
                self.reconnect_secs.map_or("not all back".to_owned(), |s| format!("all back in {s:.1} s"));
            let _ = writeln!(
                s,
                "wave         stopped at {at:.1} s; {} reconnects, {back}; survivors' peak {:.0} handshakes/s",
                self.reconnects, self.peak_handshakes_per_sec
            );
        }
        let _ = writeln!(s, "verdict      {}", self.verdict().headline());
        s
    }

    /// Writes the HTML report.
    pub fn write_html(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.html())
    }

    /// The HTML report: the verdict's headline, the summary table, charts.
    pub fn html(&self) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=utf-8><title>Switchyard {}</title>",
            self.scenario
        );
        h.push_str("<style>body{font:14px system-ui;margin:2em;max-width:960px}table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child{text-align:left}svg{background:#fafafa;border:1px solid #eee}.bad{color:#b00}</style></head><body>");
        let _ = write!(h, "<h1>Switchyard — {}</h1>", self.scenario);
        let verdict = self.verdict();
        let _ = write!(
            h,
            "<p{}><b>{}</b></p>",
            if verdict.ok { "" } else { " class=bad" },
            html_escape(&verdict.headline())
        );
        h.push_str("<h2>Summary</h2><table>");
        let rows = [
            ("connections", format!("{} of {}", self.connected, self.connections)),
            ("rejected (503, retried)", self.rejected.to_string()),
            ("storm", format!("{:.1} s, {:.0} connections/s", self.storm_secs, self.accept_rate)),
            ("publications", self.publications.to_string()),
            ("capacity (ramp)", self.capacity.as_ref().map_or("not measured".to_owned(), capacity_text)),
            (
                "steady fan-out rate",
                if self.steady_rate_from.is_empty() {
                    "—".to_owned()
                } else {
                    format!("{:.1} publications/s ({})", self.steady_rate, self.steady_rate_from)
                },
            ),
            (
                "steady fan-out latency",
                if self.steady_rate_from.is_empty() {
                    "—".to_owned()
                } else {
                    let p = &self.steady_latency_ms;
                    format!(
                        "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                        p.p50, p.p90, p.p99, p.max
                    )
                },
            ),
            (
                "deliveries (per second over the steady fan-out)",
                format!("{} ({:.0}/s)", self.deliveries, self.deliveries_per_sec),
            ),
            (
                "lost / duplicated / reordered",
                format!("{} / {} / {}", self.lost, self.duplicated, self.reordered),
            ),
            (
                "payload mismatches (compared with the publisher's log)",
                format!("{} ({})", self.payload_mismatch, self.payload_verified),
            ),
            ("explicit resyncs (publications forgiven)", format!("{} ({})", self.unrecovered, self.forgiven)),
            (
                "subscriptions checked (without offsets / never positioned / refused)",
                format!(
                    "{} ({} / {} / {})",
                    self.streams, self.unchecked, self.unpositioned, self.failed_subscriptions
                ),
            ),
            (
                "clients failed / gave up / unreported",
                format!("{} / {} / {}", self.failed, self.gave_up, self.unreported),
            ),
            ("API publishes failed", self.api_errors.to_string()),
            ("loadgen CPU per 100k deliveries", format!("{:.2} s", self.loadgen_cpu_per_100k)),
            ("gateway CPU per 100k deliveries", format!("{:.2} s", self.gateway_cpu_per_100k)),
            (
                "frames encoded (compressed) by the gateways",
                format!("{} ({})", self.gateway_frames_encoded, self.gateway_frames_deflated),
            ),
            ("gateway RSS per connection", format!("{:.0} B", self.gateway_rss_per_conn)),
            ("gateway CPU per connection (storm)", format!("{:.0} µs", self.gateway_cpu_us_per_conn)),
            ("reconnects", self.reconnects.to_string()),
            ("client messages (refused)", format!("{} ({})", self.client_publications, self.publish_errors)),
            (
                "channel joins / leaves (calls; seen)",
                format!("{} / {}; {} / {}", self.join_calls, self.leave_calls, self.joins, self.leaves),
            ),
            (
                "phases",
                self.phases.iter().map(|(n, t)| format!("{n} @ {t:.1} s")).collect::<Vec<_>>().join(", "),
            ),
        ];
        let wave = self.wave_at_secs.map(|at| {
            (
                "reconnect wave",
                format!(
                    "stopped at {at:.1} s; {}; survivors' peak {:.0} handshakes/s; {} API publishes failed",
                    self.reconnect_secs
                        .map_or("not all back".to_owned(), |s| format!("all back in {s:.1} s")),
                    self.peak_handshakes_per_sec,
                    self.api_errors
                ),
            )
        });
        for (k, v) in rows.into_iter().chain(wave) {
            let _ = write!(h, "<tr><td>{k}</td><td>{v}</td></tr>");
        }
        h.push_str("</table>");
        h.push_str(&self.ramp_html());
        h.push_str("<h2>Latency percentiles (ms)</h2><table><tr><th></th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>");
        let phases =
            self.phase_latency.iter().map(|p| (format!("publish → deliver: {}", p.phase), &p.latency_ms));
        for (name, p) in [
            ("upgrade".to_owned(), &self.upgrade_ms),
            ("connect reply".to_owned(), &self.connect_ms),
            ("publish → deliver (whole run)".to_owned(), &self.latency_ms),
        ]
        .into_iter()
        .chain(phases)
        {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
                html_escape(&name),
                p.p50,
                p.p90,
                p.p99,
                p.p999,
                p.max
            );
        }
        h.push_str("</table>");
        h.push_str(&self.charts());
        h.push_str("</body></html>");
        h
    }
}

impl RunReport {
    /// The ramp's step table and its asked-vs-delivered chart (empty
    /// without a ramp).
    fn ramp_html(&self) -> String {
        if self.ramp.is_empty() {
            return String::new();
        }
        let mut h = format!(
            "<h2>Capacity ramp</h2><p>Each step publishes for a few seconds at its rate, then waits for its \
             deliveries; the first step the box does not keep up with (delivered below {:.0} % of asked, or a p99 \
             blow-up) ends the ramp. The steady fan-out runs at {:.0} % of the highest step kept up with.</p>\
             <table><tr><th>step (publications/s)</th><th>publications</th><th>asked deliveries/s</th>\
             <th>delivered deliveries/s</th><th>drain (s)</th><th>p50 (ms)</th><th>p99 (ms)</th><th></th></tr>",
            crate::ramp::KEEP_UP * 100.0,
            STEADY_FRACTION * 100.0
        );
        for st in &self.ramp {
            let m = &st.measure;
            let _ = write!(
                h,
                "<tr{}><td>{:.1}</td><td>{}</td><td>{:.0}</td><td>{:.0}</td><td>{:.2}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td></tr>",
                if st.kept_up { "" } else { " class=bad" },
                m.rate,
                m.publications,
                st.asked_per_sec,
                st.delivered_per_sec,
                m.drain_secs,
                m.p50_ms,
                m.p99_ms,
                html_escape(st.reason.as_deref().unwrap_or("kept up"))
            );
        }
        h.push_str("</table>");
        if let Some(c) = &self.capacity {
            let _ = write!(h, "<p><b>Capacity: {}</b></p>", html_escape(&capacity_text(c)));
        }
        h.push_str(
            &Chart {
                title: "ramp: deliveries asked and delivered per step",
                x_label: "ramp step (publications/s)",
                y_label: "deliveries/s",
                series: vec![
                    Series {
                        name: "asked".into(),
                        color: "#888",
                        points: self.ramp.iter().map(|s| (s.measure.rate, s.asked_per_sec)).collect(),
                    },
                    Series {
                        name: "delivered".into(),
                        color: "#36c",
                        points: self.ramp.iter().map(|s| (s.measure.rate, s.delivered_per_sec)).collect(),
                    },
                ],
                bands: &[],
            }
            .svg(),
        );
        h
    }

    /// Connections, deliveries/s and latency over time, the phases marked.
    fn charts(&self) -> String {
        let end = self.timeline.last().map_or(0.0, |s| s.t);
        let bands = bands(&self.phases, end);
        let x_label = "time since start (s)";
        let line = |name: &str, color, points| Series { name: name.into(), color, points };
        let mut h = Chart {
            title: "connections over time",
            x_label,
            y_label: "connections",
            series: vec![line(
                "online",
                "#2a6",
                self.timeline.iter().map(|s| (s.t, s.connected as f64)).collect(),
            )],
            bands: &bands,
        }
        .svg();
        let rates = self
            .timeline
            .windows(2)
            .map(|w| {
                (w[1].t, w[1].deliveries.saturating_sub(w[0].deliveries) as f64 / (w[1].t - w[0].t).max(1e-3))
            })
            .collect();
        h.push_str(
            &Chart {
                title: "deliveries per second",
                x_label,
                y_label: "deliveries/s",
                series: vec![line("delivered", "#36c", rates)],
                bands: &bands,
            }
            .svg(),
        );
        // Windows without deliveries have no latency: left out, not zero.
        let lat: Vec<&Sample> = self.timeline.iter().filter(|s| s.p99_ms > 0.0).collect();
        h.push_str(
            &Chart {
                title: "publish → deliver latency over time, per phase (each point: the deliveries of a 250 ms window)",
                x_label,
                y_label: "latency (ms)",
                series: vec![
                    line("p50", "#2a6", lat.iter().map(|s| (s.t, s.p50_ms)).collect()),
                    line("p99", "#c33", lat.iter().map(|s| (s.t, s.p99_ms)).collect()),
                ],
                bands: &bands,
            }
            .svg(),
        );
        h
    }
}

/// "20.3 publications/s = 162,000 deliveries/s (…why that is the limit)".
fn capacity_text(c: &Capacity) -> String {
    format!(
        "{:.1} publications/s = {:.0} deliveries/s ({})",
        c.publications_per_sec,
        c.deliveries_per_sec,
        if c.bounded {
            "the highest ramp step the box kept up with; the next fell behind"
        } else {
            "every ramp step kept up: at least this"
        }
    )
}

/// Whether a run passed, and why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Every client was checked to the end and nothing failed.
    pub ok: bool,
    /// What failed, one phrase each ("3 publications lost").
    pub reasons: Vec<String>,
}

impl Verdict {
    /// One line: "Nothing lost, …" or "FAILED: " and the reasons.
    pub fn headline(&self) -> String {
        if self.ok {
            "Nothing lost, duplicated or reordered; every client checked to the end.".to_owned()
        } else {
            format!("FAILED: {}.", self.reasons.join(", "))
        }
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The phases as bands: each from its start to the next one's (the last
/// to the timeline's end).
fn bands(phases: &[(String, f64)], end: f64) -> Vec<Band> {
    phases
        .iter()
        .enumerate()
        .map(|(i, (name, start))| Band {
            name: name.clone(),
            start: *start,
            end: phases.get(i + 1).map_or(end.max(*start), |next| next.1),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 300 clients, all connected, everything delivered.
    fn clean() -> RunReport {
        RunReport {
            scenario: "demo".into(),
            connections: 300,
            connected: 300,
            publications: 60,
            deliveries: 9_000,
            streams: 600,
            payload_verified: 9_000,
            ..Default::default()
        }
    }

    #[test]
    fn a_clean_run_is_green() {
        let v = clean().verdict();
        assert_eq!(v, Verdict { ok: true, reasons: Vec::new() });
        assert!(v.headline().starts_with("Nothing lost"));
        assert!(clean().html().contains("<p><b>Nothing lost"));
    }

    #[test]
    fn explicit_resyncs_and_what_they_forgave_are_not_red() {
        let r = RunReport { unrecovered: 40, forgiven: 900, unchecked: 10, reconnects: 150, ..clean() };
        assert!(r.verdict().ok);
    }

    #[test]
    fn most_clients_failed_is_red_even_with_nothing_lost() {
        // The usual 1,024 open-file limit: most clients never got a socket.
        let r = RunReport { connected: 1_000, failed: 49_000, connections: 50_000, ..clean() };
        let v = r.verdict();
        assert!(!v.ok);
        assert_eq!(v.reasons, ["49000 of 50000 clients never connected"]);
        let html = r.html();
        assert!(html.contains("class=bad><b>FAILED: 49000 of 50000 clients never connected."), "{html}");
        assert!(!html.contains("Nothing lost"));
        assert!(r.table().contains("verdict      FAILED: 49000 of 50000 clients never connected."));
    }

    #[test]
    fn every_failure_is_red_and_named() {
        type BreakIt = fn(&mut RunReport);
        let cases: [(BreakIt, &str); 15] = [
            (|r| r.lost = 3, "3 publications lost"),
            (|r| r.duplicated = 1, "1 publication duplicated"),
            (|r| r.reordered = 2, "2 publications reordered"),
            (|r| r.payload_mismatch = 1, "1 payload mismatch"),
            (|r| r.stray = 4, "4 publications on channels not subscribed to"),
            (|r| r.failed = 2, "2 of 302 clients never connected"),
            (|r| r.connected = 299, "1 of 300 clients never started"),
            (|r| r.gave_up = 5, "5 clients gave up before the end"),
            (|r| r.unpositioned = 7, "7 subscriptions never positioned"),
            (|r| r.failed_subscriptions = 1, "1 subscription refused"),
            (|r| r.api_errors = 2, "2 API publishes failed"),
            (|r| r.publish_errors = 1, "1 client publish refused"),
            (|r| r.storm_during_failed = 3, "3 storm-during clients failed or gave up"),
            (
                |r| {
                    r.connected -= 15;
                    r.unreported = 15;
                },
                "15 clients in workers that did not report",
            ),
            (
                |r| {
                    r.lost = 1;
                    r.gave_up = 1;
                },
                "1 publication lost",
            ),
        ];
        for (break_it, reason) in cases {
            let mut r = clean();
            if reason.contains("never connected") {
                r.connections = 302;
            }
            break_it(&mut r);
            let v = r.verdict();
            assert!(!v.ok, "{reason}");
            assert_eq!(v.reasons[0], reason);
            assert!(r.html().contains(&format!("FAILED: {reason}")), "{reason}");
        }
    }

    #[test]
    fn all_reasons_are_listed() {
        let r = RunReport { lost: 2, gave_up: 1, unpositioned: 3, ..clean() };
        assert_eq!(
            r.verdict().headline(),
            "FAILED: 2 publications lost, 1 client gave up before the end, 3 subscriptions never positioned."
        );
    }

    #[test]
    fn summaries_carry_the_checker_counts_into_the_report() {
        let s = Summary {
            connected: 10,
            lost: 1,
            forgiven: 4,
            payload_mismatch: 2,
            payload_verified: 30,
            streams: 20,
            unpositioned: 1,
            failed_subscriptions: 1,
            unchecked: 3,
            gave_up: 1,
            stray: 1,
            ..Default::default()
        };
        let mut r = RunReport { connections: 20, ..Default::default() };
        r.add_summaries(&[s.clone(), s]);
        assert_eq!(
            (r.connected, r.lost, r.forgiven, r.payload_mismatch, r.payload_verified, r.streams),
            (20, 2, 8, 4, 60, 40)
        );
        assert_eq!(
            (r.unpositioned, r.failed_subscriptions, r.unchecked, r.gave_up, r.stray),
            (2, 2, 6, 2, 2)
        );
        // An old worker's line without the new fields still reads.
        let old: Summary = serde_json::from_str(
            r#"{"connected":1,"rejected":0,"failed":0,"deliveries":5,"lost":0,"duplicated":0,
                "reordered":0,"unrecovered":0,"server_closes":0,"frames":5,"cpu_secs":0.1,
                "upgrade_us":"","connect_us":"","latency_us":""}"#,
        )
        .unwrap();
        assert_eq!((old.gave_up, old.payload_mismatch), (0, 0));
    }
}
