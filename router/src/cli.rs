//! The router's command line (`router run …`, `router certs …`), shared by
//! the `router` binary and the loadgen's embedded demo.

use std::path::PathBuf;

use crate::config::RouterConfig;
use clap::{Parser, Subcommand};

/// `router` command line.
#[derive(Parser)]
#[command(name = "router", version, about = "Switchyard channel server")]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Serve gateway links (QUIC, mutual TLS).
    Run(Box<RunArgs>),
    /// Write a development CA, a gateway certificate and router certificates.
    Certs {
        /// Output directory.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Router names to issue certificates for (`router-NAME.pem`), comma
        /// separated; `router.pem` (for `localhost`) is always written.
        #[arg(long, value_delimiter = ',')]
        names: Vec<String>,
    },
}

/// `router run` options.
#[derive(clap::Args)]
pub struct RunArgs {
    /// TOML config; without it, development defaults on loopback.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Overrides `quic_listen`.
    #[arg(long)]
    pub quic_listen: Option<std::net::SocketAddr>,
    /// Overrides `id`.
    #[arg(long)]
    pub id: Option<String>,
    /// Overrides `name` (the DNS name in this router's certificate).
    #[arg(long)]
    pub name: Option<String>,
    /// Overrides `presence_grace_secs`.
    #[arg(long)]
    pub presence_grace_secs: Option<u64>,
    /// Overrides `api_listen`.
    #[arg(long)]
    pub api_listen: Option<std::net::SocketAddr>,
    /// Overrides `admin_listen` (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long)]
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Overrides `api_key`.
    #[arg(long, env = "SWITCHYARD_API_KEY")]
    pub api_key: Option<String>,
    /// Directory holding ca.pem and this router's certificate and key
    /// (`router.pem`, or `router-NAME.pem` for a `name` other than
    /// `localhost`; overrides `tls`).
    #[arg(long)]
    pub certs: Option<PathBuf>,
    /// Another router of the cluster, `NAME@QUIC_ADDR` (or `QUIC_ADDR` for
    /// the development certificate; repeatable; replaces `peers`).
    #[arg(long = "peer")]
    pub peers: Vec<proto::peer::RouterAddr>,
    /// Overrides `drain_secs`.
    #[arg(long)]
    pub drain_secs: Option<u64>,
    /// An etcd endpoint (repeatable; overrides `etcd.endpoints`): membership
    /// and ownership from etcd instead of `peers`.
    #[arg(long = "etcd")]
    pub etcd: Vec<String>,
    /// Overrides `etcd.lease_ttl_secs`.
    #[arg(long)]
    pub etcd_lease_ttl_secs: Option<u64>,
    /// Overrides `advertise_quic`.
    #[arg(long)]
    pub advertise_quic: Option<std::net::SocketAddr>,
    /// Overrides `advertise_api`.
    #[arg(long)]
    pub advertise_api: Option<std::net::SocketAddr>,
    /// Prints the effective configuration (TOML, secrets redacted) and exits.
    #[arg(long)]
    pub print_config: bool,
}

/// Parses `args` (program name first) and runs the command.
pub fn main_with(args: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    match Cli::parse_from(args).cmd {
        Cmd::Certs { out, names } => {
            let p = crate::certs::generate(&out, &names)?;
            println!(
                "wrote {} (CA), {}, {} and {} more router certificates",
                p.ca_cert.display(),
                p.router_cert.display(),
                p.gateway_cert.display(),
                names.len()
            );
            Ok(())
        }
        Cmd::Run(args) => {
            let RunArgs {
                config,
                quic_listen,
                id,
                name,
                presence_grace_secs,
                api_listen,
                admin_listen,
                api_key,
                certs,
                peers,
                drain_secs,
                etcd,
                etcd_lease_ttl_secs,
                advertise_quic,
                advertise_api,
                print_config,
            } = *args;
            let nofile = raise_open_files();
            tracing::info!(open_files = nofile, "open-file limit raised to the hard limit (API connections)");
            let mut cfg = match config {
                Some(path) => RouterConfig::from_toml(&std::fs::read_to_string(&path)?)?,
                None => RouterConfig::default(),
            };
            if let Some(a) = quic_listen {
                cfg.quic_listen = a;
            }
            if let Some(i) = id {
                cfg.id = i;
            }
            if let Some(n) = name {
                cfg.name = n;
            }
            if let Some(g) = presence_grace_secs {
                cfg.presence_grace_secs = g;
            }
            if let Some(a) = api_listen {
                cfg.api_listen = a;
            }
            if let Some(k) = api_key {
                cfg.api_key = k;
            }
            if let Some(a) = admin_listen {
                cfg.admin_listen = a;
            }
            if !peers.is_empty() {
                cfg.peers = peers;
            }
            if let Some(d) = drain_secs {
                cfg.drain_secs = d;
            }
            if !etcd.is_empty() {
                cfg.etcd.endpoints = etcd;
            }
            if let Some(t) = etcd_lease_ttl_secs {
                cfg.etcd.lease_ttl_secs = t;
            }
            if let Some(a) = advertise_quic {
                cfg.advertise_quic = Some(a);
            }
            if let Some(a) = advertise_api {
                cfg.advertise_api = Some(a);
            }
            if let Some(dir) = certs {
                let (cert, key) = crate::certs::CertPaths::router_in_dir(&dir, &cfg.name);
                cfg.tls.ca_cert = crate::certs::CertPaths::in_dir(&dir).ca_cert;
                cfg.tls.cert = cert;
                cfg.tls.key = key;
            }
            if print_config {
                cfg.check()?;
                print!("{}", cfg.to_toml_redacted()?);
                return Ok(());
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                // A worker about to sleep gives the memory freed on its heap
                // back (mimalloc purges only when a thread allocates, and an
                // idle router thread does not): dropped channels do not stay
                // resident.
                // SAFETY: mi_collect only walks the calling thread's heap.
                .on_thread_park(|| unsafe { libmimalloc_sys::mi_collect(false) })
                .build()?;
            cfg.check()?;
            rt.block_on(async move {
                let api = cfg.api_listen;
                let admin = cfg.admin_listen;
                let router = crate::server::Router::start(cfg)?;
                #[cfg(feature = "etcd")]
                crate::membership::spawn(&router);
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                let draining = async {
                    term.recv().await;
                    router.drain().await;
                };
                tokio::select! {
                    r = router.clone().serve_links() => r,
                    r = router.clone().serve_api(api) => r,
                    r = router.clone().serve_admin(admin) => r,
                    _ = router.peers().probe_forever() => Ok(()),
                    _ = draining => Ok(()),
                    _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted"); Ok(()) }
                }
            })
        }
    }
}

/// Raises the soft open-file limit to the hard one (each HTTP API client is
/// a descriptor); the soft limit now in force.
fn raise_open_files() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills `lim`; setrlimit only reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, ..lim };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    lim.rlim_cur
}
