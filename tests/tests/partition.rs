//! A network partition between a gateway and its router, made for real: the
//! router runs in a network namespace this test creates, reached over two
//! veth pairs (one carries the QUIC link, one the HTTP API). Taking the
//! link's veth down partitions the two; publications go on through the API
//! meanwhile; after the link is restored the subscriber recovers exactly what
//! it missed. Outside CI, skipped with a message where the kernel refuses
//! namespaces; under `CI=true` that is a failure.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use e2e::{API_KEY, Proc, Published, SECRET, StreamCheck, Ws, bin_dir, token, wait_ready};
use serde_json::json;

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The namespace and its veth pairs; removed on drop.
struct Net {
    ns: String,
    link: String,
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth ends inside it and so the pairs.
        ip(&["netns", "del", &self.ns]);
    }
}

impl Net {
    /// Creates the namespace with a link network 10.201.X.0/24 and an API
    /// network 10.202.X.0/24 (router .1 inside, root side .2).
    fn create(x: u32) -> Option<Net> {
        let pid = std::process::id() % 100_000;
        let net = Net { ns: format!("sy-part-{pid}"), link: format!("syl{pid}a") };
        if !ip(&["netns", "add", &net.ns]) {
            return None;
        }
        for (name, subnet) in [("syl", 201), ("sya", 202)] {
            let (a, b) = (format!("{name}{pid}a"), format!("{name}{pid}b"));
            let ok = ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])
                && ip(&["link", "set", &b, "netns", &net.ns])
                && ip(&["addr", "add", &format!("10.{subnet}.{x}.2/24"), "dev", &a])
                && ip(&["link", "set", &a, "up"])
                && ip(&[
                    "netns",
                    "exec",
                    &net.ns,
                    "ip",
                    "addr",
                    "add",
                    &format!("10.{subnet}.{x}.1/24"),
                    "dev",
                    &b,
                ])
                && ip(&["netns", "exec", &net.ns, "ip", "link", "set", &b, "up"])
                && ip(&["netns", "exec", &net.ns, "ip", "link", "set", "lo", "up"]);
            if !ok {
                return None;
            }
        }
        Some(net)
    }
}

#[test]
fn a_partitioned_gateway_recovers_everything_once_the_link_is_back() {
    let x = std::process::id() % 250;
    let Some(net) = Net::create(x) else {
        let why = "this kernel (or user) refuses network namespaces or veth pairs (`ip netns add` or `ip link add` failed)";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true and the partition cannot be made: {why}");
        }
        eprintln!("SKIPPED (outside CI; under CI=true this fails): {why}");
        return;
    };
    let certs = std::env::temp_dir().join(format!("sy-part-{}", std::process::id()));
    let st = Command::new(bin_dir().join("router"))
        .args(["certs", "--out"])
        .arg(&certs)
        .stdout(Stdio::null())
        .status();
    assert!(st.unwrap().success());
    let cfg = certs.join("router.toml");
    std::fs::write(&cfg, "evict_secs = 5\n").unwrap();
    let quic: SocketAddr = format!("10.201.{x}.1:7100").parse().unwrap();
    let api: SocketAddr = format!("10.202.{x}.1:8000").parse().unwrap();
    let _router = Proc {
        child: Command::new("ip")
            .args(["netns", "exec", &net.ns])
            .arg(bin_dir().join("router"))
            .args(["run", "--quic-listen", &quic.to_string(), "--api-listen", &api.to_string()])
            .args(["--api-key", API_KEY, "--config"])
            .arg(&cfg)
            .arg("--certs")
            .arg(&certs)
            .env("RUST_LOG", std::env::var("E2E_LOG").unwrap_or_else(|_| "warn".into()))
            .spawn()
            .unwrap(),
    };
    e2e::wait_tcp(api);
    let ws: SocketAddr = format!("127.0.0.1:{}", e2e::free_tcp_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", e2e::free_tcp_port()).parse().unwrap();
    let _gateway = Proc {
        child: Command::new(bin_dir().join("gateway"))
            .args(["run", "--listen", &ws.to_string(), "--admin-listen", &admin.to_string()])
            .args([
                "--router",
                &quic.to_string(),
                "--hmac-secret",
                SECRET,
                "--cores",
                "2",
                "--no-pin",
                "--certs",
            ])
            .arg(&certs)
            .env("RUST_LOG", std::env::var("E2E_LOG").unwrap_or_else(|_| "warn".into()))
            .spawn()
            .unwrap(),
    };
    e2e::wait_tcp(ws);
    wait_ready(admin);

    let mut client = Ws::connect(ws, "/connection/websocket").expect("upgrade");
    let r = client.call(json!({"connect": {"token": token("pat")}}));
    assert!(r["connect"]["client"].is_string(), "{r}");
    let ch = "chat:partition";
    let mut published = Published::default();
    let mut seen = StreamCheck::subscribe(&mut client, ch);
    for i in 1..=3 {
        assert_eq!(published.publish(api, ch, json!({"i": i})), i);
    }
    seen.receive_through(&mut client, 3);

    // Partition: the link's veth goes down; the API stays reachable.
    assert!(ip(&["link", "set", &net.link, "down"]));
    for i in 4..=8 {
        assert_eq!(
            published.publish(api, ch, json!({"i": i})),
            i,
            "the router keeps ordering during the partition"
        );
    }
    // The gateway notices the silence and tells its subscriber to resync
    // (never leaves it silently behind); whatever arrived before is checked.
    assert_eq!(seen.receive_until_unsubscribed(&mut client), 2500, "told to resync");

    // Heal; resubscribe from the last position (retrying while no router
    // is linked): everything missed is recovered, then live again.
    assert!(ip(&["link", "set", &net.link, "up"]));
    assert!(seen.resubscribe(&mut client), "the router kept the ring: the position is recovered");
    assert_eq!(seen.offset, 8);
    for i in 9..=10 {
        assert_eq!(published.publish(api, ch, json!({"i": i})), i);
    }
    seen.receive_through(&mut client, 10);
    assert_eq!(seen.offsets(), (1..=10).collect::<Vec<_>>(), "nothing lost, duplicated or reordered");
    assert_eq!(seen.data(), (1..=10).map(|i| json!({"i": i})).collect::<Vec<_>>());
    seen.verify(&published);
    let _ = std::fs::remove_dir_all(&certs);
}
