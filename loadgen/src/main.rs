//! `loadgen`: connection storms, workloads and the one-command demo.
//! `loadgen gateway …` and `loadgen router …` run the embedded servers.

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "loadgen", version, about = "Switchyard load generator and demo")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a local router and gateways, run a storm and a fan-out, report, drain.
    Demo(loadgen::demo::DemoArgs),
    /// (internal) A worker process: JSON spec as the argument.
    #[command(hide = true)]
    Worker { spec: String },
    /// The embedded gateway (`loadgen gateway run …`).
    #[command(disable_help_flag = true)]
    Gateway {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The embedded router (`loadgen router run …`, `loadgen router certs …`).
    #[command(disable_help_flag = true)]
    Router {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Demo(a) => {
            init_tracing();
            if !loadgen::demo::run(a)? {
                eprintln!("FAILED: publications were lost, duplicated or reordered silently");
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Worker { spec } => loadgen::worker::run(serde_json::from_str(&spec)?),
        Cmd::Gateway { args } => {
            init_tracing();
            gateway::cli::main_with(std::iter::once("gateway".to_owned()).chain(args))
        }
        Cmd::Router { args } => {
            init_tracing();
            router::cli::main_with(std::iter::once("router".to_owned()).chain(args))
        }
    }
}
