//! The real `router` binary on loopback, driven over real QUIC (mutual TLS)
//! by test gateways speaking the cluster protocol.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proto::cluster::{ClusterDecoder, ClusterMsg, PROTOCOL_VERSION};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

struct RouterProc {
    child: Child,
    addr: SocketAddr,
    certs: PathBuf,
}

impl Drop for RouterProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.certs);
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_router(tag: &str) -> RouterProc {
    start_router_with(tag, "")
}

/// A router with `config` (TOML) as its configuration file.
fn start_router_with(tag: &str, config: &str) -> RouterProc {
    let certs = std::env::temp_dir().join(format!("sy-router-{tag}-{}", std::process::id()));
    let bin = env!("CARGO_BIN_EXE_router");
    let st = Command::new(bin).args(["certs", "--out"]).arg(&certs).stdout(Stdio::null()).status().unwrap();
    assert!(st.success());
    let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    std::fs::create_dir_all(&certs).unwrap();
    let cfg = certs.join("router.toml");
    std::fs::write(&cfg, config).unwrap();
    let child = Command::new(bin)
        .args(["run", "--quic-listen", &addr.to_string(), "--api-listen", &api.to_string()])
        .args(["--admin-listen", &admin.to_string(), "--certs"])
        .arg(&certs)
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    RouterProc { child, addr, certs }
}

struct Gw {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dec: ClusterDecoder,
    buf: BytesMut,
}

fn client_config(certs: &Path) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(certs.join("gateway.pem")).unwrap().map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_file(certs.join("gateway.key")).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![router::server::ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap()))
}

async fn connect(r: &RouterProc, version: u16) -> Gw {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(&r.certs));
    // The router process may still be starting: retry for a bounded time.
    let mut last = None;
    for _ in 0..100 {
        match endpoint.connect(r.addr, "localhost").unwrap().await {
            Ok(conn) => {
                let (mut send, recv) = conn.open_bi().await.unwrap();
                let mut out = BytesMut::new();
                ClusterMsg::Hello { version, gateway_id: "gw-test".into(), instance: 1 }.encode(&mut out);
                send.write_all(&out).await.unwrap();
                return Gw {
                    _endpoint: endpoint,
                    conn,
                    send,
                    recv,
                    dec: ClusterDecoder::default(),
                    buf: BytesMut::new(),
                };
            }
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("router never accepted: {last:?}");
}

impl Gw {
    async fn send(&mut self, m: ClusterMsg) {
        let mut out = BytesMut::new();
        m.encode(&mut out);
        self.send.write_all(&out).await.unwrap();
    }

    async fn next_ctl(&mut self) -> Option<ClusterMsg> {
        read(&mut self.recv, &mut self.dec, &mut self.buf).await
    }
}

async fn read(
    recv: &mut quinn::RecvStream,
    dec: &mut ClusterDecoder,
    buf: &mut BytesMut,
) -> Option<ClusterMsg> {
    loop {
        if let Some(m) = dec.decode(buf).unwrap() {
            return Some(m);
        }
        match tokio::time::timeout(Duration::from_secs(10), recv.read_chunk(65536, true)).await {
            Ok(Ok(Some(c))) => buf.extend_from_slice(&c.bytes),
            _ => return None,
        }
    }
}

/// Collects the first `n` messages that `keep` maps to `Some`, from
/// whichever delivery streams carry them (bounded: 10 s without one ends it).
async fn collect<T: Send + 'static>(
    conn: &quinn::Connection,
    n: usize,
    keep: impl Fn(ClusterMsg) -> Option<T> + Send + Sync + 'static,
) -> Vec<T> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..8 {
        let conn = conn.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(mut s) = conn.accept_uni().await else { return };
            let mut dec = ClusterDecoder::default();
            let mut buf = BytesMut::new();
            while let Some(m) = read(&mut s, &mut dec, &mut buf).await {
                let _ = tx.send(m);
            }
        });
    }
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(m)) => got.extend(keep(m)),
            _ => break,
        }
    }
    got
}

/// Collects `n` deliveries (channel, offset).
async fn deliveries(conn: &quinn::Connection, n: usize) -> Vec<(String, u64)> {
    collect(conn, n, |m| match m {
        ClusterMsg::Deliver { channel, publication, .. } => Some((channel, publication.offset)),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_send_per_gateway_in_order_and_recovery() {
    let r = start_router("fanout");
    let mut gws = Vec::new();
    for _ in 0..3 {
        let mut g = connect(&r, PROTOCOL_VERSION).await;
        assert!(matches!(g.next_ctl().await, Some(ClusterMsg::Welcome { version: PROTOCOL_VERSION, .. })));
        g.send(ClusterMsg::Subscribe { channels: vec!["chat:general".into()] }).await;
        gws.push(g);
    }
    // Interest is registered once the router has answered a later request on the same link.
    for g in gws.iter_mut() {
        g.send(ClusterMsg::Recover {
            req: 1,
            channel: "chat:general".into(),
            recover: false,
            epoch: String::new(),
            offset: 0,
        })
        .await;
        assert!(matches!(g.next_ctl().await, Some(ClusterMsg::Replay { req: 1, recovered: true, .. })));
    }
    let collectors: Vec<_> = gws
        .iter()
        .map(|g| {
            let conn = g.conn.clone();
            tokio::spawn(async move { deliveries(&conn, 5).await })
        })
        .collect();
    let mut epoch = String::new();
    for i in 0..5u64 {
        gws[0]
            .send(ClusterMsg::Publish {
                req: 10 + i,
                channel: "chat:general".into(),
                data: Bytes::from(format!("{{\"n\":{i}}}")),
                info: None,
                idempotency_key: String::new(),
            })
            .await;
        match gws[0].next_ctl().await {
            Some(ClusterMsg::PublishOk { req, offset, epoch: e }) => {
                assert_eq!((req, offset), (10 + i, i + 1));
                epoch = e;
            }
            other => panic!("{other:?}"),
        }
    }
    // Each gateway got each publication exactly once, in order.
    for c in collectors {
        let got = c.await.unwrap();
        assert_eq!(got, (1..=5).map(|o| ("chat:general".to_string(), o)).collect::<Vec<_>>());
    }
    // A subscriber that saw offset 2 recovers 3..=5; a stale epoch does not recover.
    gws[1]
        .send(ClusterMsg::Recover {
            req: 20,
            channel: "chat:general".into(),
            recover: true,
            epoch: epoch.clone(),
            offset: 2,
        })
        .await;
    match gws[1].next_ctl().await {
        Some(ClusterMsg::Replay { req: 20, recovered: true, top: 5, publications, .. }) => {
            assert_eq!(publications.iter().map(|p| p.offset).collect::<Vec<_>>(), vec![3, 4, 5]);
        }
        other => panic!("{other:?}"),
    }
    gws[1]
        .send(ClusterMsg::Recover {
            req: 21,
            channel: "chat:general".into(),
            recover: true,
            epoch: "stale".into(),
            offset: 2,
        })
        .await;
    assert!(
        matches!(gws[1].next_ctl().await, Some(ClusterMsg::Replay { req: 21, recovered: false, top: 5, ref publications, .. }) if publications.is_empty())
    );
    // Unknown namespace: error 102, the link stays up.
    gws[2].send(ClusterMsg::Presence { req: 30, channel: "nope:x".into() }).await;
    assert!(matches!(gws[2].next_ctl().await, Some(ClusterMsg::RequestError { req: 30, code: 102, .. })));
    gws[2].send(ClusterMsg::Heartbeat { seq: 9, reply: false }).await;
    assert!(matches!(gws[2].next_ctl().await, Some(ClusterMsg::Heartbeat { seq: 9, reply: true })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_version_is_refused_and_garbage_closes_only_that_link() {
    let r = start_router("refuse");
    let mut old = connect(&r, PROTOCOL_VERSION + 7).await;
    match old.next_ctl().await {
        Some(ClusterMsg::Refuse { reason }) => assert!(reason.contains("version")),
        other => panic!("{other:?}"),
    }
    let mut good = connect(&r, PROTOCOL_VERSION).await;
    assert!(matches!(good.next_ctl().await, Some(ClusterMsg::Welcome { .. })));
    let mut bad = connect(&r, PROTOCOL_VERSION).await;
    assert!(matches!(bad.next_ctl().await, Some(ClusterMsg::Welcome { .. })));
    bad.send.write_all(&[0, 0, 0, 3, 250, 1, 2]).await.unwrap();
    assert_eq!(bad.next_ctl().await, None, "the router closes a link that sends garbage");
    good.send(ClusterMsg::Heartbeat { seq: 1, reply: false }).await;
    assert!(matches!(good.next_ctl().await, Some(ClusterMsg::Heartbeat { seq: 1, reply: true })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_gateway_is_evicted_and_its_users_go_away_after_the_grace() {
    let r = start_router_with("evict", "evict_secs = 5\nheartbeat_secs = 1\npresence_grace_secs = 1\n");
    let mut watcher = connect(&r, PROTOCOL_VERSION).await;
    assert!(matches!(watcher.next_ctl().await, Some(ClusterMsg::Welcome { .. })));
    watcher.send(ClusterMsg::Subscribe { channels: vec!["presence:ann".into()] }).await;
    let mut silent = connect(&r, PROTOCOL_VERSION).await;
    assert!(matches!(silent.next_ctl().await, Some(ClusterMsg::Welcome { .. })));
    tokio::time::sleep(Duration::from_millis(200)).await;
    silent.send(ClusterMsg::UserOnline { user: "ann".into(), client: "c1".into() }).await;
    // The watcher keeps heartbeating; the other link says nothing more (QUIC
    // itself stays alive: the router's keep-alives are answered).
    let Gw { conn, mut send, .. } = watcher;
    let beats = tokio::spawn(async move {
        for seq in 0.. {
            let mut out = BytesMut::new();
            ClusterMsg::Heartbeat { seq, reply: false }.encode(&mut out);
            if send.write_all(&out).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    // ann online, then (eviction after 5 s of silence + 1 s of grace) away.
    let got = deliveries(&conn, 2).await;
    assert_eq!(got, vec![("presence:ann".to_string(), 1), ("presence:ann".to_string(), 2)]);
    assert_eq!(silent.next_ctl().await, None, "the silent link was closed");
    assert!(conn.close_reason().is_none(), "the heartbeating link is still up");
    beats.abort();
}

/// Collects `n` messages about `channel`.
async fn stream_msgs(conn: &quinn::Connection, channel: &'static str, n: usize) -> Vec<ClusterMsg> {
    collect(conn, n, move |m| (m.channel() == Some(channel)).then_some(m)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribing_gateway_is_told_the_position_ahead_of_what_follows() {
    let r = start_router("position");
    let mut publisher = connect(&r, PROTOCOL_VERSION).await;
    assert!(matches!(publisher.next_ctl().await, Some(ClusterMsg::Welcome { .. })));
    let publish = |req: u64| ClusterMsg::Publish {
        req,
        channel: "chat:pos".into(),
        data: Bytes::from_static(b"{}"),
        info: None,
        idempotency_key: String::new(),
    };
    let mut epoch = String::new();
    for req in 1..=2 {
        publisher.send(publish(req)).await;
        match publisher.next_ctl().await {
            Some(ClusterMsg::PublishOk { offset, epoch: e, .. }) => {
                assert_eq!(offset, req);
                epoch = e;
            }
            other => panic!("{other:?}"),
        }
    }
    // A current gateway and one of protocol version 1 (a rolling upgrade).
    let mut current = connect(&r, PROTOCOL_VERSION).await;
    assert!(matches!(current.next_ctl().await, Some(ClusterMsg::Welcome { version: PROTOCOL_VERSION, .. })));
    let mut old = connect(&r, 1).await;
    assert!(matches!(old.next_ctl().await, Some(ClusterMsg::Welcome { version: 1, .. })));
    for g in [&mut current, &mut old] {
        g.send(ClusterMsg::Subscribe { channels: vec!["chat:pos".into()] }).await;
        // Ephemeral channels have no position to tell.
        g.send(ClusterMsg::Subscribe { channels: vec!["typing:pos".into()] }).await;
        g.send(ClusterMsg::Heartbeat { seq: 1, reply: false }).await;
        assert!(matches!(g.next_ctl().await, Some(ClusterMsg::Heartbeat { seq: 1, reply: true })));
    }
    let (c1, c2) = (current.conn.clone(), old.conn.clone());
    let current_msgs = tokio::spawn(async move { stream_msgs(&c1, "chat:pos", 2).await });
    let old_msgs = tokio::spawn(async move { stream_msgs(&c2, "chat:pos", 1).await });
    publisher.send(publish(3)).await;
    assert!(matches!(publisher.next_ctl().await, Some(ClusterMsg::PublishOk { offset: 3, .. })));
    let got = current_msgs.await.unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0], ClusterMsg::Position { channel: "chat:pos".into(), epoch: epoch.clone(), top: 2 });
    assert!(
        matches!(&got[1], ClusterMsg::Deliver { publication, epoch: e, .. } if publication.offset == 3 && *e == epoch)
    );
    let got = old_msgs.await.unwrap();
    assert!(
        matches!(&got[..], [ClusterMsg::Deliver { publication, .. }] if publication.offset == 3),
        "a version-1 gateway gets deliveries and no position: {got:?}"
    );
}
