//! The uplink's QUIC shell against a fake router on loopback: a delivery
//! stream that dies while the link is otherwise healthy (the control stream
//! answers every heartbeat) resets the whole link, so the channels hashed
//! to that stream do not stop silently; the gateway links again.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use gateway::bridge::{Inbox, UpMsg};
use gateway::config::UplinkConfig;
use gateway::metrics::Metrics;
use proto::cluster::{ClusterDecoder, ClusterMsg, PROTOCOL_VERSION};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A CA, a router certificate for `localhost` and a gateway client
/// certificate, written into `dir`.
fn certs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let leaf = |sans: Vec<String>, usage| {
        let mut p = CertificateParams::new(sans).unwrap();
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        (p.signed_by(&key, &ca).unwrap().pem(), key.serialize_pem())
    };
    let (router, router_key) = leaf(vec!["localhost".into()], ExtendedKeyUsagePurpose::ServerAuth);
    let (gw, gw_key) = leaf(vec!["gateway.test".into()], ExtendedKeyUsagePurpose::ClientAuth);
    for (name, pem) in [
        ("ca.pem", ca.pem()),
        ("router.pem", router),
        ("router.key", router_key),
        ("gateway.pem", gw),
        ("gateway.key", gw_key),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
}

fn router_endpoint(dir: &Path) -> quinn::Endpoint {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join("router.pem")).unwrap().map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("router.key")).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![gateway::uplink::quic::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap()
}

async fn read_msg(
    recv: &mut quinn::RecvStream,
    dec: &mut ClusterDecoder,
    buf: &mut BytesMut,
) -> Option<ClusterMsg> {
    loop {
        if let Some(m) = dec.decode(buf).unwrap() {
            return Some(m);
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
            _ => return None,
        }
    }
}

fn encode(m: &ClusterMsg) -> Vec<u8> {
    let mut out = BytesMut::new();
    m.encode(&mut out);
    out.to_vec()
}

#[test]
fn a_delivery_stream_that_dies_resets_the_link() {
    let dir = std::env::temp_dir().join(format!("sy-uplink-streams-{}", std::process::id()));
    certs(&dir);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let endpoint = router_endpoint(&dir);
        let addr = endpoint.local_addr().unwrap();
        let cfg = UplinkConfig {
            routers: vec![proto::peer::RouterAddr::dev(addr)],
            ca_cert: dir.join("ca.pem"),
            cert: dir.join("gateway.pem"),
            key: dir.join("gateway.key"),
            queue: 1024,
            ..UplinkConfig::default()
        };
        let (_up_tx, up_rx) = flume::bounded::<Vec<UpMsg>>(16);
        let (inbox_tx, _inbox_rx) = flume::bounded::<Inbox>(1024);
        let metrics = Arc::new(Metrics::new(1));
        let _uplink = gateway::uplink::quic::spawn(
            "gw-test".into(),
            cfg,
            Default::default(),
            up_rx,
            vec![inbox_tx],
            metrics.clone(),
        )
        .unwrap();

        // First link: welcome, open the delivery streams, answer every
        // heartbeat, then reset one delivery stream.
        let conn = tokio::time::timeout(Duration::from_secs(20), endpoint.accept()).await.unwrap().unwrap();
        let conn = conn.await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let (mut dec, mut buf) = (ClusterDecoder::default(), BytesMut::new());
        let hello = read_msg(&mut recv, &mut dec, &mut buf).await.unwrap();
        assert!(matches!(hello, ClusterMsg::Hello { .. }), "{hello:?}");
        let welcome =
            ClusterMsg::Welcome { version: PROTOCOL_VERSION, router_id: "fake".into(), instance: 1 };
        send.write_all(&encode(&welcome)).await.unwrap();
        let mut streams = Vec::new();
        for _ in 0..2 {
            let mut s = conn.open_uni().await.unwrap();
            // A stream exists for the peer once something is sent on it.
            s.write_all(&encode(&ClusterMsg::Position { channel: "x".into(), epoch: "e".into(), top: 0 }))
                .await
                .unwrap();
            streams.push(s);
        }
        let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let a2 = answered.clone();
        let heartbeats = tokio::spawn(async move {
            while let Some(m) = read_msg(&mut recv, &mut dec, &mut buf).await {
                if let ClusterMsg::Heartbeat { seq, reply: false } = m {
                    let _ = send.write_all(&encode(&ClusterMsg::Heartbeat { seq, reply: true })).await;
                    a2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        // Let a heartbeat or two be answered: the link is healthy.
        while answered.load(std::sync::atomic::Ordering::Relaxed) < 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        streams[1].reset(7u32.into()).unwrap();
        // The gateway closes the link itself (its control stream was fine) …
        let why = tokio::time::timeout(Duration::from_secs(30), conn.closed())
            .await
            .expect("the gateway resets the link");
        assert!(
            matches!(why, quinn::ConnectionError::ApplicationClosed(_)),
            "closed by the gateway, not timed out: {why:?}"
        );
        heartbeats.abort();
        // … and links again.
        let again =
            tokio::time::timeout(Duration::from_secs(30), endpoint.accept()).await.expect("a new link");
        let conn2 = again.unwrap().await.unwrap();
        let (_s, mut r) = conn2.accept_bi().await.unwrap();
        let (mut dec, mut buf) = (ClusterDecoder::default(), BytesMut::new());
        assert!(matches!(read_msg(&mut r, &mut dec, &mut buf).await, Some(ClusterMsg::Hello { .. })));
    });
    let _ = std::fs::remove_dir_all(&dir);
}
