//! `loadgen`: connection storms, workloads and the one-command demo.
//! `loadgen gateway …` and `loadgen router …` run the embedded servers.

use clap::{Parser, Subcommand};
use loadgen::demo::Scenario;

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
    /// Open N connections (at a rate or all at once); connect latency, rejections.
    Storm(loadgen::demo::DemoArgs),
    /// Storm, then publications to Zipf-sized channels; deliveries/s, latency, correctness.
    Fanout(loadgen::demo::DemoArgs),
    /// Fan-out while a gateway is drained (or killed with --kill): the reconnect curve.
    ReconnectWave(loadgen::demo::DemoArgs),
    /// Steady fan-out for --duration seconds.
    Soak(loadgen::demo::DemoArgs),
    /// A Slack-like day: workspaces, channels, messages with typing, presence, read-state.
    Chat(loadgen::demo::DemoArgs),
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
        // Colour only on a terminal: a log kept in a file stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn scenario(kind: Scenario, a: loadgen::demo::DemoArgs) -> anyhow::Result<()> {
    init_tracing();
    let verdict = loadgen::demo::run_scenario(kind, a)?;
    if !verdict.ok {
        eprintln!("{}", verdict.headline());
        std::process::exit(1);
    }
    Ok(())
}

// The allocator's options must be set before its first allocation, which
// happens before `main`: a constructor run by the loader does it.
#[used]
#[unsafe(link_section = ".init_array")]
static TUNE_ALLOCATOR: extern "C" fn() = gateway::alloc::tune;

fn main() -> anyhow::Result<()> {
    // Every client and every gateway connection is a descriptor: take what
    // the hard limit allows before sizing anything.
    let nofile = gateway::process::raise_open_files();
    if nofile < 4096 {
        eprintln!(
            "note: the open-file limit is {nofile} (hard limit too): each process holds at most {} connections, \
             and large runs are spread over more processes",
            gateway::process::connections_for(nofile)
        );
    }
    match Cli::parse().cmd {
        Cmd::Demo(a) => scenario(Scenario::Demo, a),
        Cmd::Storm(a) => scenario(Scenario::Storm, a),
        Cmd::Fanout(a) => scenario(Scenario::Fanout, a),
        Cmd::ReconnectWave(a) => scenario(Scenario::ReconnectWave, a),
        Cmd::Soak(a) => scenario(Scenario::Soak, a),
        Cmd::Chat(a) => scenario(Scenario::Chat, a),
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
