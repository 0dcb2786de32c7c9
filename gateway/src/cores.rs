//! The one module that owns the cores: spawning, pinning, building each
//! runtime (io_uring, or epoll where io_uring is unavailable, chosen at start
//! and logged), binding each core's `SO_REUSEPORT` listener and running its
//! accept loop, inbox and timer until it has drained.

use std::sync::Arc;
use std::time::Instant;

use crate::auth::Verifier;
use crate::bridge::{Inbox, UpMsg};
use crate::config::GatewayConfig;
use crate::core::{Core, CoreSpec};
use crate::metrics::Metrics;
use crate::shell::Shell;

pub use crate::shell::Lifecycle;

/// Which I/O driver the cores run on.
pub fn driver_name() -> &'static str {
    if monoio::utils::detect_uring() { "io_uring" } else { "epoll" }
}

/// Submission-queue entries of each core's ring.
const RING_ENTRIES: u32 = 4096;

/// Runs `fut` to completion on a new monoio runtime for this thread: io_uring
/// where the kernel has it (with cooperative task running, see below),
/// otherwise the epoll driver. The gateway's cores and the load generator's
/// threads are built here.
///
/// `IORING_SETUP_COOP_TASKRUN`: a completion for this ring no longer
/// interrupts the thread (an inter-processor interrupt when it runs on
/// another CPU) to post itself; it is posted when the thread next enters
/// the kernel, which a monoio runtime does every time it looks for work.
/// Measured with `loadgen storm --connections 15000 --gateway-cores 1`: the
/// gateway's CPU per session start went from ~34 to ~32 µs. Waking a thread
/// that sleeps waiting for completions still costs the waker, so CPU per
/// delivery to idle readers did not change.
pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    let base =
        || monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().with_entries(RING_ENTRIES);
    let mut urb = io_uring::IoUring::builder();
    urb.setup_coop_taskrun();
    let mut rt = match base().uring_builder(urb).build() {
        Ok(rt) => rt,
        // Kernels before 5.19 refuse the flag: a plain ring then.
        Err(_) => base().build().expect("building a runtime"),
    };
    rt.block_on(fut)
}

/// How the cores reach the uplink and each other.
pub struct Wiring {
    /// Toward the uplink.
    pub up: flume::Sender<Vec<UpMsg>>,
    /// Each core's inbox (taken by that core).
    pub inboxes: Vec<flume::Receiver<Inbox>>,
    /// Every core's inbox, for hand-overs.
    pub peers: Vec<flume::Sender<Inbox>>,
    /// Toward the proxy thread (when a proxy hook is on).
    pub proxy: Option<flume::Sender<crate::proxy::ProxyCall>>,
}

/// The CPUs this process may run on (its affinity mask, as `taskset` set
/// it), in order; empty when it cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the size and pointer are of `set`.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Vec::new();
    }
    // SAFETY: CPU_ISSET reads the set we own, with an index below CPU_SETSIZE.
    (0..libc::CPU_SETSIZE as usize).filter(|c| unsafe { libc::CPU_ISSET(*c, &set) }).collect()
}

/// Spawns `cfg.cores` worker threads; each returns when it has drained.
pub fn spawn(
    cfg: Arc<GatewayConfig>,
    verifier: Arc<Verifier>,
    wiring: Wiring,
    metrics: Arc<Metrics>,
    life: Arc<Lifecycle>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let Wiring { up, inboxes, peers, proxy } = wiring;
    tracing::info!(cores = cfg.cores, driver = driver_name(), listen = %cfg.listen, "starting cores");
    let mut handles = Vec::new();
    let cpus = allowed_cpus();
    for (id, inbox) in inboxes.into_iter().enumerate() {
        let (cfg, verifier, up, metrics, life, peers, tls, proxy) = (
            cfg.clone(),
            verifier.clone(),
            up.clone(),
            metrics.clone(),
            life.clone(),
            peers.clone(),
            tls.clone(),
            proxy.clone(),
        );
        let pin = (cfg.pin_cores && !cpus.is_empty()).then(|| cpus[(cfg.first_cpu + id) % cpus.len()]);
        let h = std::thread::Builder::new().name(format!("core-{id}")).spawn(move || {
            if let Some(cpu) = pin {
                let _ = monoio::utils::bind_to_cpu_set([cpu]);
            }
            block_on(async move {
                let listener = match crate::shell::listener::bind(cfg.listen, cfg.limits.send_buffer_bytes) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(core = id, error = %e, "bind failed");
                        std::process::exit(2);
                    }
                };
                let unix_now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let core = Core::new(CoreSpec {
                    id,
                    cores: peers.len(),
                    cfg: cfg.clone(),
                    verifier,
                    metrics,
                    seed: proto::seeded::random_seed(),
                    secret_seed: rand::random(),
                    now: Instant::now(),
                    unix_now,
                    up_backlog: crate::core::upstream::MAX_UP_BACKLOG,
                });
                let shell = match Shell::new(core, listener, tls, up, peers, proxy) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(core = id, error = %e, "cannot make the core's readiness set");
                        std::process::exit(2);
                    }
                };
                shell.run(inbox, life, cfg.drain_window()).await;
            });
        })?;
        handles.push(h);
    }
    Ok(handles)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_allowed_cpus_are_the_affinity_mask() {
        let cpus = super::allowed_cpus();
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]));
        // SAFETY: sched_getcpu has no arguments and no preconditions.
        let now = unsafe { libc::sched_getcpu() };
        assert!(now < 0 || cpus.contains(&(now as usize)), "running on CPU {now}, allowed {cpus:?}");
    }
}
