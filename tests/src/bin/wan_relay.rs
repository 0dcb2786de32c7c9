//! The test kit's WAN as a process, for benchmarks:
//! `wan_relay --listen 127.0.0.1:7200 --to 127.0.0.1:7100 [--delay-ms 40]
//! [--jitter-ms 10] [--loss 0.01] [--seed 1]` relays one gateway's QUIC
//! link to one router until it is killed (see `e2e::wan`).

use std::net::SocketAddr;
use std::time::Duration;

use e2e::wan::{Relay, WanSpec};

fn main() {
    let mut listen: Option<SocketAddr> = None;
    let mut to: Option<SocketAddr> = None;
    let mut spec = WanSpec::edge_pop(1);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--listen" => listen = Some(v.parse().expect("--listen IP:PORT")),
            "--to" => to = Some(v.parse().expect("--to IP:PORT")),
            "--delay-ms" => spec.delay = Duration::from_millis(v.parse().expect("--delay-ms N")),
            "--jitter-ms" => spec.jitter = Duration::from_millis(v.parse().expect("--jitter-ms N")),
            "--loss" => spec.loss = v.parse().expect("--loss 0.0-1.0"),
            "--seed" => spec.seed = v.parse().expect("--seed N"),
            other => panic!("unknown argument {other}"),
        }
    }
    let relay = Relay::start(listen.expect("--listen"), to.expect("--to"), spec);
    println!("relaying {} -> {} ({spec:?})", relay.addr(), to.unwrap());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
