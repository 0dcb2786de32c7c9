//! The proxy hooks' IO: one thread with a tokio runtime and a pooled
//! HTTP/1.1 client (hyper) that POSTs the cores' proxy calls to the app
//! backend and hands every answer back to the core that asked, as an
//! [`Inbox::Proxy`] message.
//!
//! Every call the thread takes gets exactly one answer: the backend's body
//! (2xx), or a [`Failure`] — the timeout passed, the endpoint's circuit
//! breaker is open, the connection failed, a non-2xx status, a body above
//! `max_answer_bytes`. What the cores make of an answer is in
//! [`crate::core::proxied`]; the number of calls in flight is bounded
//! there, per core (`proxy.max_in_flight`), so this thread holds at most
//! cores × that many.
//!
//! The circuit breaker ([`Breaker`]), one per endpoint: after
//! `breaker_failures` failed calls in a row (transport errors, timeouts,
//! 5xx) it opens, and for `breaker_open_ms` every call to that endpoint
//! fails at once, without a connection attempt; then one call probes, and
//! its outcome closes the breaker or opens it again. With the backend
//! down, connects thus fail in microseconds with error 100 (temporary) and
//! the SDKs back off, instead of each waiting out its timeout while the
//! storm of reconnects piles up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use proto::proxy::Hook;

use crate::bridge::{CoreId, Inbox};
use crate::config::ProxyConfig;

/// One call a core asks for.
#[derive(Debug, Clone)]
pub struct ProxyCall {
    /// The core the answer goes to.
    pub core: CoreId,
    /// The core's id of the call.
    pub id: u64,
    /// Which hook.
    pub hook: Hook,
    /// Where to POST it.
    pub endpoint: Arc<str>,
    /// How long the backend has.
    pub timeout: Duration,
    /// The JSON body.
    pub body: Vec<u8>,
    /// Forwarded headers of the client's upgrade request.
    pub headers: Arc<[(String, String)]>,
}

/// Why a call has no usable answer. A 5xx is `Status` (it counts against
/// the breaker); another non-2xx status is `BadAnswer` (the backend is up
/// and answered, wrongly), as is a body that is no proxy answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The backend did not answer within the hook's timeout.
    Timeout,
    /// The endpoint's circuit breaker is open.
    BreakerOpen,
    /// Connecting or talking to the backend failed.
    Transport,
    /// The backend answered with a 5xx status.
    Status,
    /// The answer was not a proxy answer (or too large).
    BadAnswer,
    /// The core had `max_in_flight` calls already.
    InFlight,
}

impl Failure {
    /// Every kind, in the metrics' order.
    pub const ALL: [Failure; 6] = [
        Failure::Timeout,
        Failure::BreakerOpen,
        Failure::Transport,
        Failure::Status,
        Failure::BadAnswer,
        Failure::InFlight,
    ];

    /// The metrics label.
    pub fn name(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::BreakerOpen => "breaker_open",
            Failure::Transport => "transport",
            Failure::Status => "status",
            Failure::BadAnswer => "bad_answer",
            Failure::InFlight => "in_flight",
        }
    }

    /// Whether it counts against the endpoint's breaker.
    fn trips(self) -> bool {
        matches!(self, Failure::Timeout | Failure::Transport | Failure::Status)
    }
}

/// The answer to one [`ProxyCall`].
#[derive(Debug)]
pub struct ProxyAnswer {
    /// The call's id.
    pub id: u64,
    /// The body of a 2xx answer, or why there is none.
    pub outcome: Result<Bytes, Failure>,
}

/// Latency buckets of the per-hook histogram (seconds).
pub const BUCKETS: [f64; 11] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Counters of one hook.
#[derive(Debug, Default)]
pub struct HookMetrics {
    /// Calls handed to the proxy thread (each answered, one way or
    /// another); those refused before, at an in-flight bound, are only in
    /// `failures` (`in_flight`).
    pub calls: AtomicU64,
    /// Failed calls, by [`Failure::ALL`] kind.
    pub failures: [AtomicU64; 6],
    /// Calls whose backend answered, by latency bucket ([`BUCKETS`], then +Inf).
    pub buckets: [AtomicU64; 12],
    /// Sum of those latencies, microseconds.
    pub sum_us: AtomicU64,
}

/// The proxy's counters, one set per hook ([`Hook::ALL`] order).
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    /// Per hook.
    pub hooks: [HookMetrics; 6],
}

impl ProxyMetrics {
    /// Counts a failure of `hook`.
    pub fn failed(&self, hook: Hook, f: Failure) {
        let i = Failure::ALL.iter().position(|k| *k == f).expect("listed");
        self.hooks[hook.index()].failures[i].fetch_add(1, Ordering::Relaxed);
    }

    fn answered(&self, hook: Hook, took: Duration) {
        let h = &self.hooks[hook.index()];
        let secs = took.as_secs_f64();
        let b = BUCKETS.iter().position(|le| secs <= *le).unwrap_or(BUCKETS.len());
        h.buckets[b].fetch_add(1, Ordering::Relaxed);
        h.sum_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Prometheus text: calls and failures per hook and kind, and the
    /// latency of answered calls per hook.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# TYPE switchyard_gateway_proxy_calls_total counter");
        for hook in Hook::ALL {
            let n = self.hooks[hook.index()].calls.load(Ordering::Relaxed);
            let _ = writeln!(out, "switchyard_gateway_proxy_calls_total{{hook=\"{}\"}} {n}", hook.name());
        }
        let _ = writeln!(out, "# TYPE switchyard_gateway_proxy_errors_total counter");
        for hook in Hook::ALL {
            for (i, f) in Failure::ALL.iter().enumerate() {
                let n = self.hooks[hook.index()].failures[i].load(Ordering::Relaxed);
                let (h, k) = (hook.name(), f.name());
                let _ =
                    writeln!(out, "switchyard_gateway_proxy_errors_total{{hook=\"{h}\",kind=\"{k}\"}} {n}");
            }
        }
        let name = "switchyard_gateway_proxy_duration_seconds";
        let _ = writeln!(out, "# TYPE {name} histogram");
        for hook in Hook::ALL {
            let h = &self.hooks[hook.index()];
            let mut cumulative = 0;
            for (i, b) in h.buckets.iter().enumerate() {
                cumulative += b.load(Ordering::Relaxed);
                let le = BUCKETS.get(i).map_or("+Inf".to_string(), |v| v.to_string());
                let _ = writeln!(out, "{name}_bucket{{hook=\"{}\",le=\"{le}\"}} {cumulative}", hook.name());
            }
            let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "{name}_sum{{hook=\"{}\"}} {sum}", hook.name());
            let _ = writeln!(out, "{name}_count{{hook=\"{}\"}} {cumulative}", hook.name());
        }
    }
}

/// One endpoint's circuit breaker. Each state (closed, open, the probe)
/// has a generation: a call's outcome counts only in the generation it
/// was let through in, so the late answers of calls sent before the
/// breaker opened neither extend the open time nor close it unprobed.
#[derive(Debug, Clone, Default)]
pub struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
    generation: u64,
}

impl Breaker {
    /// Whether a call may go out now, and in which generation (an open
    /// breaker lets one probe through once its time is up).
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.open_until {
            None => Some(self.generation),
            Some(t) if now < t => None,
            Some(_) if self.probing => None,
            Some(_) => {
                self.probing = true;
                self.generation += 1;
                Some(self.generation)
            }
        }
    }

    /// The outcome of a call let through in `generation`: `ok`, or a
    /// failure that counts against the endpoint. Opens after `threshold`
    /// failures in a row (or a failed probe) for `open`.
    pub fn record(&mut self, generation: u64, ok: bool, now: Instant, threshold: u32, open: Duration) {
        if generation != self.generation {
            return;
        }
        if ok {
            if self.open_until.is_some() || self.failures > 0 {
                *self = Breaker { generation: self.generation + 1, ..Breaker::default() };
            }
            return;
        }
        self.failures = self.failures.saturating_add(1);
        if self.probing || self.failures >= threshold.max(1) {
            self.open_until = Some(now + open);
            self.probing = false;
            self.generation += 1;
        }
    }

    /// Whether it refuses calls at `now`.
    pub fn is_open(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|t| now < t || self.probing)
    }
}

/// Starts the proxy thread: it serves `calls` until every sender is gone.
pub fn spawn(
    cfg: ProxyConfig,
    calls: flume::Receiver<ProxyCall>,
    cores: Vec<flume::Sender<Inbox>>,
    metrics: Arc<crate::metrics::Metrics>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("proxy".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("proxy runtime");
        rt.block_on(serve(cfg, calls, cores, metrics));
    })
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn serve(
    cfg: ProxyConfig,
    calls: flume::Receiver<ProxyCall>,
    cores: Vec<flume::Sender<Inbox>>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(cfg.max_in_flight.max(1))
        .build(connector);
    let breakers: Arc<Mutex<HashMap<Arc<str>, Breaker>>> = Arc::default();
    let cfg = Arc::new(cfg);
    while let Ok(call) = calls.recv_async().await {
        let (client, breakers, cfg, metrics) =
            (client.clone(), breakers.clone(), cfg.clone(), metrics.clone());
        let Some(core) = cores.get(call.core).cloned() else { continue };
        tokio::spawn(async move {
            let (id, hook) = (call.id, call.hook);
            metrics.proxy.hooks[hook.index()].calls.fetch_add(1, Ordering::Relaxed);
            let outcome = call_once(&client, &breakers, &cfg, &metrics, call).await;
            if let Err(f) = outcome {
                metrics.proxy.failed(hook, f);
            }
            // Waits for room: the core bounds its calls in flight, so this
            // is bounded too, and no answer is lost.
            let _ = core.send_async(Inbox::Proxy(ProxyAnswer { id, outcome })).await;
        });
    }
}

async fn call_once(
    client: &HttpClient,
    breakers: &Mutex<HashMap<Arc<str>, Breaker>>,
    cfg: &ProxyConfig,
    metrics: &crate::metrics::Metrics,
    call: ProxyCall,
) -> Result<Bytes, Failure> {
    let lock = || breakers.lock().unwrap_or_else(|e| e.into_inner());
    let Some(generation) = lock().entry(call.endpoint.clone()).or_default().allow(Instant::now()) else {
        return Err(Failure::BreakerOpen);
    };
    let start = Instant::now();
    let outcome =
        tokio::time::timeout(call.timeout, post(client, cfg, &call)).await.unwrap_or(Err(Failure::Timeout));
    let now = Instant::now();
    if outcome.as_ref().is_ok() || outcome.as_ref().is_err_and(|f| !f.trips()) {
        metrics.proxy.answered(call.hook, now - start);
    }
    let ok = !outcome.as_ref().is_err_and(|f| f.trips());
    let open = Duration::from_millis(cfg.breaker_open_ms);
    lock().entry(call.endpoint.clone()).or_default().record(generation, ok, now, cfg.breaker_failures, open);
    outcome
}

async fn post(client: &HttpClient, cfg: &ProxyConfig, call: &ProxyCall) -> Result<Bytes, Failure> {
    let mut req = hyper::Request::post(&*call.endpoint).header("content-type", "application/json");
    for (name, value) in call.headers.iter() {
        // A header that is not valid HTTP is left out, not the call.
        if let (Ok(n), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(name.as_bytes()),
            hyper::header::HeaderValue::from_str(value),
        ) {
            req = req.header(n, v);
        }
    }
    let req = req.body(Full::new(Bytes::from(call.body.clone()))).map_err(|_| Failure::Transport)?;
    let resp = client.request(req).await.map_err(|_| Failure::Transport)?;
    let status = resp.status();
    if !status.is_success() {
        return Err(if status.is_server_error() { Failure::Status } else { Failure::BadAnswer });
    }
    let body = Limited::new(resp.into_body(), cfg.max_answer_bytes)
        .collect()
        .await
        .map_err(|_| Failure::BadAnswer)?;
    Ok(body.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_failures_in_a_row_and_probes_once() {
        let t0 = Instant::now();
        let open = Duration::from_millis(100);
        let mut b = Breaker::default();
        let g = b.allow(t0).expect("closed");
        for _ in 0..4 {
            b.record(g, false, t0, 5, open);
        }
        b.record(g, true, t0, 5, open);
        let g = b.allow(t0).expect("a success reset the count");
        for _ in 0..4 {
            b.record(g, false, t0, 5, open);
        }
        assert!(b.allow(t0).is_some(), "four in a row do not open it");
        let late = g; // a call sent now whose answer comes after the breaker opened
        b.record(g, false, t0, 5, open);
        assert!(b.allow(t0).is_none() && b.is_open(t0), "five in a row open it");
        assert!(b.allow(t0 + Duration::from_millis(99)).is_none());
        b.record(late, true, t0, 5, open);
        assert!(b.is_open(t0), "a late success of an earlier call does not close it");
        b.record(late, false, t0 + Duration::from_millis(90), 5, open);
        let later = t0 + open;
        let probe = b.allow(later).expect("a late failure did not extend it: one probe once the time is up");
        assert!(b.allow(later).is_none(), "only one");
        b.record(probe, false, later, 5, open);
        assert!(b.allow(later + Duration::from_millis(50)).is_none(), "a failed probe opens it again");
        let again = later + open;
        let probe = b.allow(again).expect("the next probe");
        b.record(probe, true, again, 5, open);
        assert!(
            b.allow(again).is_some() && b.allow(again).is_some() && !b.is_open(again),
            "a good probe closes it"
        );
    }

    #[test]
    fn the_histogram_renders_cumulative_buckets() {
        let m = ProxyMetrics::default();
        m.answered(Hook::Connect, Duration::from_micros(700));
        m.answered(Hook::Connect, Duration::from_secs(3));
        m.failed(Hook::Connect, Failure::Timeout);
        m.hooks[0].calls.fetch_add(3, Ordering::Relaxed);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("switchyard_gateway_proxy_calls_total{hook=\"connect\"} 3"), "{out}");
        assert!(out.contains("proxy_errors_total{hook=\"connect\",kind=\"timeout\"} 1"), "{out}");
        assert!(out.contains("duration_seconds_bucket{hook=\"connect\",le=\"0.0005\"} 0"), "{out}");
        assert!(out.contains("duration_seconds_bucket{hook=\"connect\",le=\"0.001\"} 1"), "{out}");
        assert!(out.contains("duration_seconds_bucket{hook=\"connect\",le=\"+Inf\"} 2"), "{out}");
        assert!(out.contains("duration_seconds_count{hook=\"rpc\"} 0"), "{out}");
    }
}
