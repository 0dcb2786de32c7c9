//! The gateway's command line (`gateway run …`), shared by the `gateway`
//! binary and the loadgen's embedded demo. With no file it starts on
//! loopback with development defaults; every config key can be set here.
//!
//! Signals: SIGTERM drains (stop accepting, close sessions with 3001 spread
//! over the drain window, exit 0); the first SIGINT drains too, a second
//! SIGINT exits at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::config::GatewayConfig;
use crate::cores::Lifecycle;
use clap::{Parser, Subcommand};

/// `gateway` command line.
#[derive(Parser)]
#[command(name = "gateway", version, about = "Switchyard WebSocket gateway", args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Serve WebSocket clients.
    Run(RunArgs),
}

/// `gateway run` flags.
#[derive(clap::Args)]
pub struct RunArgs {
    /// TOML config; without it, development defaults on loopback.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Overrides `id`.
    #[arg(long)]
    pub id: Option<String>,
    /// Overrides `listen`.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Overrides `admin_listen`.
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// Overrides `cores`.
    #[arg(long)]
    pub cores: Option<usize>,
    /// Do not pin cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Overrides `first_cpu`.
    #[arg(long)]
    pub first_cpu: Option<usize>,
    /// Router as `NAME@QUIC_ADDR` (its certificate must be valid for NAME),
    /// or `QUIC_ADDR` for the development certificate (repeat for several;
    /// overrides `uplink.routers`).
    #[arg(long = "router")]
    pub routers: Vec<proto::peer::RouterAddr>,
    /// Directory with ca.pem, gateway.pem, gateway.key (overrides the uplink TLS paths).
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// Overrides `auth.hmac_secret`.
    #[arg(long, env = "SWITCHYARD_HMAC_SECRET")]
    pub hmac_secret: Option<String>,
    /// Sets `auth.allow_anonymous_connect_without_token`.
    #[arg(long)]
    pub allow_anonymous: bool,
    /// Overrides `echo_path` (turns the echo endpoint on).
    #[arg(long)]
    pub echo_path: Option<String>,
    /// Sets `deflate` (accept permessage-deflate).
    #[arg(long)]
    pub deflate: bool,
    /// Overrides `tls.cert`: serve wss with this PEM certificate chain.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Overrides `tls.key`: the certificate's PEM private key.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Overrides `drain_secs`.
    #[arg(long)]
    pub drain_secs: Option<u64>,
    /// An etcd endpoint (repeatable; overrides `etcd.endpoints`): the routers
    /// registered there, instead of `uplink.routers`.
    #[arg(long = "etcd")]
    pub etcd: Vec<String>,
    /// Overrides `uplink.dns`: the routers are what this `host:port` resolves to.
    #[arg(long)]
    pub dns: Option<String>,
    /// Overrides `uplink.dns_name`.
    #[arg(long)]
    pub dns_name: Option<String>,
    /// Sets `uplink.datagram_copies` (a datagram copy of every delivery, for
    /// a lossy WAN to the routers).
    #[arg(long)]
    pub datagram_copies: bool,
    /// Prints the effective configuration (TOML, secrets redacted) and exits.
    #[arg(long)]
    pub print_config: bool,
}

/// Builds the configuration from a file and flags.
pub fn load(a: RunArgs) -> anyhow::Result<GatewayConfig> {
    let mut cfg = match &a.config {
        Some(p) => GatewayConfig::from_toml(&std::fs::read_to_string(p)?)?,
        None => GatewayConfig::default(),
    };
    if let Some(v) = a.id {
        cfg.id = v;
    }
    if let Some(v) = a.listen {
        cfg.listen = v;
    }
    if let Some(v) = a.admin_listen {
        cfg.admin_listen = v;
    }
    if let Some(v) = a.cores {
        cfg.cores = v;
    }
    if a.no_pin {
        cfg.pin_cores = false;
    }
    if let Some(v) = a.first_cpu {
        cfg.first_cpu = v;
    }
    if !a.routers.is_empty() {
        cfg.uplink.routers = a.routers;
    }
    if let Some(dir) = a.certs {
        cfg.uplink.ca_cert = dir.join("ca.pem");
        cfg.uplink.cert = dir.join("gateway.pem");
        cfg.uplink.key = dir.join("gateway.key");
    }
    if let Some(v) = a.hmac_secret {
        cfg.auth.hmac_secret = v;
    }
    if a.allow_anonymous {
        cfg.auth.allow_anonymous_connect_without_token = true;
    }
    if let Some(v) = a.tls_cert {
        cfg.tls.cert = Some(v);
    }
    if let Some(v) = a.tls_key {
        cfg.tls.key = Some(v);
    }
    if let Some(v) = a.echo_path {
        cfg.echo_path = v;
    }
    if a.deflate {
        cfg.deflate = true;
    }
    if let Some(v) = a.drain_secs {
        cfg.drain_secs = v;
    }
    if !a.etcd.is_empty() {
        cfg.etcd.endpoints = a.etcd;
    }
    if let Some(v) = a.dns {
        cfg.uplink.dns = Some(v);
    }
    if let Some(v) = a.dns_name {
        cfg.uplink.dns_name = v;
    }
    if a.datagram_copies {
        cfg.uplink.datagram_copies = true;
    }
    cfg.cores = cfg.cores.clamp(1, crate::bridge::MAX_CORES);
    Ok(cfg)
}

/// Parses `args` (program name first) and runs the gateway until it has drained.
pub fn main_with(args: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    let Cmd::Run(args) = Cli::parse_from(args).cmd;
    let print = args.print_config;
    let cfg = load(args)?;
    if print {
        cfg.etcd.check(cfg!(feature = "etcd")).map_err(anyhow::Error::msg)?;
        cfg.check().map_err(anyhow::Error::msg)?;
        crate::auth::Verifier::new(&cfg.auth)?;
        print!("{}", cfg.to_toml_redacted()?);
        return Ok(());
    }
    run(cfg)
}

/// Runs a gateway until it has drained (SIGTERM, or SIGINT twice to exit at once).
pub fn run(mut cfg: GatewayConfig) -> anyhow::Result<()> {
    cfg.etcd.check(cfg!(feature = "etcd")).map_err(anyhow::Error::msg)?;
    cfg.check().map_err(anyhow::Error::msg)?;
    let nofile = crate::process::raise_open_files();
    if cfg.admission.max_connections == 0 {
        cfg.admission.max_connections = crate::process::connections_for(nofile) as usize;
    }
    tracing::info!(
        open_files = nofile,
        max_connections = cfg.admission.max_connections,
        "open-file limit raised to the hard limit; sessions beyond max_connections get 503"
    );
    let cfg = Arc::new(cfg);
    let metrics = Arc::new(crate::metrics::Metrics::new(cfg.cores));
    let verifier = Arc::new(crate::auth::Verifier::new(&cfg.auth)?);
    let tls = crate::shell::tls::server_config(&cfg.tls)?;
    let life = Arc::new(Lifecycle::default());

    // Batches: one per core turn that had something for the routers.
    let (up_tx, up_rx) = flume::bounded(cfg.uplink.queue.max(1024));
    let mut inbox_tx = Vec::new();
    let mut inbox_rx = Vec::new();
    for _ in 0..cfg.cores {
        let (tx, rx) = flume::bounded(65_536);
        inbox_tx.push(tx);
        inbox_rx.push(rx);
    }
    let peers = inbox_tx.clone();
    // The proxy thread takes every core's calls; each core bounds its own
    // in flight, so this queue never holds more than their sum.
    let proxy = if cfg.proxy.enabled() {
        let (tx, rx) = flume::bounded(cfg.cores * cfg.proxy.max_in_flight.max(1));
        crate::proxy::spawn(cfg.proxy.clone(), rx, inbox_tx.clone(), metrics.clone())?;
        Some(tx)
    } else {
        None
    };
    let uplink = crate::uplink::quic::spawn(
        cfg.id.clone(),
        cfg.uplink.clone(),
        cfg.etcd.clone(),
        up_rx,
        inbox_tx,
        metrics.clone(),
    )?;
    let admin = std::net::TcpListener::bind(cfg.admin_listen)?;
    crate::admin::spawn(admin, metrics.clone(), life.clone())?;
    let cores = crate::cores::spawn(
        cfg.clone(),
        verifier,
        crate::cores::Wiring { up: up_tx, inboxes: inbox_rx, peers, proxy },
        metrics,
        life.clone(),
        tls,
    )?;
    tracing::info!(
        id = %cfg.id, listen = %cfg.listen, admin = %cfg.admin_listen, tls = cfg.tls.enabled(),
        "gateway ready"
    );

    let sig_life = life.clone();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("signal runtime");
        rt.block_on(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            let mut interrupts = 0;
            loop {
                tokio::select! {
                    _ = term.recv() => {
                        tracing::info!("SIGTERM: draining");
                        sig_life.drain.store(true, Ordering::Relaxed);
                    }
                    _ = int.recv() => {
                        interrupts += 1;
                        if interrupts >= 2 {
                            tracing::warn!("second SIGINT: exiting now");
                            std::process::exit(130);
                        }
                        tracing::info!("SIGINT: draining (again to exit at once)");
                        sig_life.drain.store(true, Ordering::Relaxed);
                    }
                }
            }
        });
    })?;

    for c in cores {
        let _ = c.join();
    }
    tracing::info!("all cores drained");
    drop(uplink);
    Ok(())
}
