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
    /// Publishes the HTTP API refused or could not take (a router wave).
    pub api_errors: u64,
    /// Messages clients published (chat), and how many were refused.
    pub client_publications: u64,
    /// Client publishes refused by the server.
    pub publish_errors: u64,
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
            self.frames += s.frames;
            self.reconnects += s.reconnects;
            self.client_publications += s.published;
            self.publish_errors += s.publish_errors;
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

    /// Whether anything was lost, duplicated or reordered silently.
    pub fn silent_loss(&self) -> bool {
        self.lost + self.duplicated + self.reordered > 0
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
            "correctness  lost {}  duplicated {}  reordered {}  explicit resyncs {}",
            self.lost, self.duplicated, self.reordered, self.unrecovered
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
        s
    }

    /// Writes the HTML report.
    pub fn write_html(&self, path: &Path) -> std::io::Result<()> {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=utf-8><title>Switchyard {}</title>",
            self.scenario
        );
        h.push_str("<style>body{font:14px system-ui;margin:2em;max-width:960px}table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child{text-align:left}svg{background:#fafafa;border:1px solid #eee}.bad{color:#b00}</style></head><body>");
        let _ = write!(h, "<h1>Switchyard — {}</h1>", self.scenario);
        let verdict = if self.silent_loss() {
            "<p class=bad><b>Silent loss detected.</b></p>"
        } else {
            "<p><b>Nothing lost, duplicated or reordered.</b></p>"
        };
        h.push_str(verdict);
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
            ("explicit resyncs", self.unrecovered.to_string()),
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
        std::fs::write(path, h)
    }
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
