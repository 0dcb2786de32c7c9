//! The run report: a summary table on the terminal, `--json` for machines,
//! and an HTML page with charts (connections and deliveries over time,
//! latency percentiles) written to a file whose path is printed.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::Serialize;

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
    /// Publish → deliver p99 (the worst worker's) in the last window (ms).
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
        for s in summaries {
            self.connected += s.connected;
            self.rejected += s.rejected;
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
            of.saturating_sub(self.connected + self.failed),
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
            let _ = writeln!(
                s,
                "fan-out      {} publications → {} deliveries in {:.1} s ({:.0}/s, {} frames)",
                self.publications, self.deliveries, self.fanout_secs, self.deliveries_per_sec, self.frames
            );
            let _ = writeln!(s, "latency      {}", p(&self.latency_ms));
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
            "checked      {} subscriptions ({} without offsets, {} never positioned, {} refused), {} payloads against the publisher's log; {} clients gave up",
            self.streams,
            self.unchecked,
            self.unpositioned,
            self.failed_subscriptions,
            self.payload_verified,
            self.gave_up
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
        let _ = writeln!(s, "storm cpu    gateway {:.0} µs per connection", self.gateway_cpu_us_per_conn);
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
            ("deliveries", format!("{} ({:.0}/s)", self.deliveries, self.deliveries_per_sec)),
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
            ("clients failed / gave up", format!("{} / {}", self.failed, self.gave_up)),
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
        h.push_str("</table><h2>Latency percentiles (ms)</h2><table><tr><th></th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>");
        for (name, p) in [
            ("upgrade", &self.upgrade_ms),
            ("connect reply", &self.connect_ms),
            ("publish → deliver", &self.latency_ms),
        ] {
            let _ = write!(
                h,
                "<tr><td>{name}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
                p.p50, p.p90, p.p99, p.p999, p.max
            );
        }
        h.push_str("</table>");
        h.push_str(&bars(
            "publish → deliver latency (ms)",
            &[
                ("p50", self.latency_ms.p50),
                ("p90", self.latency_ms.p90),
                ("p99", self.latency_ms.p99),
                ("p99.9", self.latency_ms.p999),
                ("max", self.latency_ms.max),
            ],
        ));
        h.push_str(&line_chart("connections over time", &self.timeline, |s| s.connected as f64));
        let rates: Vec<Sample> = self
            .timeline
            .windows(2)
            .map(|w| Sample {
                t: w[1].t,
                deliveries: ((w[1].deliveries.saturating_sub(w[0].deliveries)) as f64
                    / (w[1].t - w[0].t).max(1e-3)) as u64,
                ..w[1].clone()
            })
            .collect();
        h.push_str(&line_chart("deliveries per second", &rates, |s| s.deliveries as f64));
        let lat: Vec<Sample> = self.timeline.iter().filter(|s| s.p99_ms > 0.0).cloned().collect();
        h.push_str(&line_chart("publish → deliver p50 over time (ms)", &lat, |s| s.p50_ms));
        h.push_str(&line_chart("publish → deliver p99 over time (ms)", &lat, |s| s.p99_ms));
        h.push_str("</body></html>");
        h
    }
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

fn line_chart(title: &str, data: &[Sample], y: impl Fn(&Sample) -> f64) -> String {
    let (w, hgt) = (900.0, 220.0);
    let tmax = data.last().map(|s| s.t).unwrap_or(1.0).max(1e-3);
    let ymax = data.iter().map(&y).fold(1.0_f64, f64::max);
    let pts: Vec<String> = data
        .iter()
        .map(|s| {
            format!("{:.1},{:.1}", 40.0 + s.t / tmax * (w - 60.0), hgt - 20.0 - y(s) / ymax * (hgt - 40.0))
        })
        .collect();
    format!(
        "<h2>{title}</h2><svg width={w} height={hgt}><text x=5 y=15>{ymax:.0}</text><text x=5 y={}>0</text><text x={} y={}>{tmax:.1} s</text><polyline fill=none stroke=#2a6 stroke-width=2 points='{}'/></svg>",
        hgt - 20.0,
        w - 60.0,
        hgt - 5.0,
        pts.join(" ")
    )
}

fn bars(title: &str, data: &[(&str, f64)]) -> String {
    let (w, hgt) = (600.0, 200.0);
    let max = data.iter().map(|d| d.1).fold(1e-3_f64, f64::max);
    let bw = (w - 40.0) / data.len().max(1) as f64;
    let mut s = format!("<h2>{title}</h2><svg width={w} height={hgt}>");
    for (i, (name, v)) in data.iter().enumerate() {
        let bh = v / max * (hgt - 50.0);
        let x = 20.0 + i as f64 * bw;
        let _ = write!(
            s,
            "<rect x={x:.0} y={:.0} width={:.0} height={bh:.0} fill=#36c /><text x={x:.0} y={:.0}>{name}</text><text x={x:.0} y={:.0}>{v:.2}</text>",
            hgt - 25.0 - bh,
            bw - 10.0,
            hgt - 8.0,
            hgt - 30.0 - bh
        );
    }
    s.push_str("</svg>");
    s
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
        let cases: [(BreakIt, &str); 14] = [
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
