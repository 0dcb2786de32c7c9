//! Close codes survive the close. When the gateway ends a session by policy
//! while the client is still sending, it must not destroy its own close
//! frame with a reset: it writes the close, shuts its side down, and reads
//! and discards what the client still sends before it closes the socket
//! (the lingering close). Each case runs 100 times: a client floods the
//! gateway, only then reads, and must find the close code every time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use e2e::{Cluster, metric, token};
use proto::ws::handshake::client;
use proto::ws::{Decoder, DecoderConfig, Message, OpCode, encode_frame};
use serde_json::json;

const RUNS: usize = 100;

/// A bare client: a socket with a small receive buffer (so a reader that
/// does not read fills it quickly), masked frames out, the server's frames in.
struct Raw {
    sock: TcpStream,
    dec: Decoder,
    buf: BytesMut,
}

impl Raw {
    fn connect(c: &Cluster, rcvbuf: Option<i32>) -> Raw {
        let mut sock = TcpStream::connect(c.ws_addrs[0]).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        if let Some(size) = rcvbuf {
            // SAFETY: setsockopt reads one int from `size`.
            let r = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    (&size as *const i32).cast(),
                    std::mem::size_of::<i32>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0);
        }
        let (req, hs) = client::request("gw", "/connection/websocket", rand::random(), &[], false);
        sock.write_all(&req).unwrap();
        let mut buf = BytesMut::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((_, n)) = hs.parse_response(&buf).unwrap() {
                let _ = buf.split_to(n);
                break;
            }
            let n = sock.read(&mut chunk).unwrap();
            assert!(n > 0, "closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        }
        Raw { sock, dec: Decoder::new(DecoderConfig::client()), buf }
    }

    fn frame(out: &mut Vec<u8>, text: &str) {
        encode_frame(out, true, OpCode::Text, text.as_bytes(), Some(rand::random()));
    }

    fn send(&mut self, bytes: &[u8]) {
        // The gateway may stop reading (and close) while we still write:
        // that is the case under test, so a failed write is not a failure.
        let _ = self.sock.write_all(bytes);
    }

    /// Reads until the close frame; its code (`None`: the stream ended
    /// without one — a reset, or an end before the close). It reads only
    /// after a pause, as a busy client would: by then the gateway has
    /// decided the close and, without a lingering close, would already have
    /// reset the socket under the unread close frame.
    fn close_code(&mut self) -> Option<u16> {
        std::thread::sleep(Duration::from_millis(150));
        let mut chunk = vec![0u8; 65536];
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            loop {
                match self.dec.decode(&mut self.buf) {
                    Ok(Some(Message::Close(c))) => return c.map(|c| c.code),
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                    Err(e) => panic!("the gateway broke the framing: {e}"),
                }
            }
            match self.sock.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        None
    }

    /// The text lines the gateway sent that are still unread (reading for
    /// at most 500 ms).
    fn read_lines(&mut self) -> Vec<String> {
        self.sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut chunk = vec![0u8; 65536];
        let end = Instant::now() + Duration::from_millis(500);
        while Instant::now() < end {
            match self.sock.read(&mut chunk) {
                Ok(n) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        self.sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut lines = Vec::new();
        while let Ok(Some(m)) = self.dec.decode(&mut self.buf) {
            if let Message::Text(t) = m {
                lines.extend(t.split(|b| *b == b'\n').map(|l| String::from_utf8_lossy(l).into_owned()));
            }
        }
        // What the client read is out of the way; big publications are
        // shown by their size only.
        lines.into_iter().map(|l| if l.len() > 300 { format!("<{} bytes>", l.len()) } else { l }).collect()
    }

    /// `connect` and a subscribe, as one frame, and their replies.
    fn start(&mut self, user: &str, channel: &str) {
        let mut out = Vec::new();
        let lines = format!(
            "{}\n{}",
            json!({"id": 1, "connect": {"token": token(user)}}),
            json!({"id": 2, "subscribe": {"channel": channel}})
        );
        Raw::frame(&mut out, &lines);
        self.send(&out);
        let mut replies = 0;
        let mut chunk = vec![0u8; 65536];
        while replies < 2 {
            match self.dec.decode(&mut self.buf).unwrap() {
                Some(Message::Text(t)) => {
                    for line in t.split(|b| *b == b'\n') {
                        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
                        assert!(v.get("error").is_none(), "{v}");
                        replies += 1;
                    }
                }
                Some(other) => panic!("{other:?}"),
                None => {
                    let n = self.sock.read(&mut chunk).unwrap();
                    assert!(n > 0);
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }
}

fn flood(n: usize, line: impl Fn(usize) -> String) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        Raw::frame(&mut out, &line(i));
    }
    out
}

#[test]
fn a_publish_flood_sees_3013_every_time() {
    let c = Cluster::start(1, 1, &[]);
    for run in 0..RUNS {
        // A small receive buffer: the refusals the flood earns back up into
        // the gateway's queue, so the close frame waits behind them.
        let mut raw = Raw::connect(&c, Some(2048));
        let channel = format!("chat:flood{run}");
        raw.start(&format!("flooder{run}"), &channel);
        // 200 pings whose answers back up, then 2,000 publishes as fast as
        // the socket takes them: past the burst
        // and the refusals allowed, the gateway closes with 3013 while the
        // rest is still arriving.
        let mut bytes = flood(200, |i| json!({"id": 10 + i, "ping": {}}).to_string());
        bytes.extend(flood(2000, |i| {
            json!({"id": 1000 + i, "publish": {"channel": channel, "data": {"i": i}}}).to_string()
        }));
        raw.send(&bytes);
        assert_eq!(raw.close_code(), Some(3013), "run {run}");
    }
    // Every flooder's session ends (its socket closed after the lingering
    // close saw the client go).
    no_sessions_left(&c);
}

/// Waits (at most 10 s) until the gateway holds no session.
fn no_sessions_left(c: &Cluster) {
    let end = Instant::now() + Duration::from_secs(10);
    while metric(&c.metrics(0), "switchyard_gateway_connections") > 0 {
        assert!(Instant::now() < end, "sessions left: {}", c.metrics(0));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_protocol_error_under_a_flood_sees_1002_every_time() {
    let c = Cluster::start(1, 1, &[]);
    for run in 0..RUNS {
        let mut raw = Raw::connect(&c, Some(2048));
        raw.start(&format!("breaker{run}"), &format!("chat:p{run}"));
        // 200 pings whose answers back up behind the small receive buffer,
        // a frame with RSV1 set on a connection without permessage-deflate
        // (1002), then 2,000 more frames behind it.
        let mut bytes = flood(200, |i| json!({"id": 10 + i, "ping": {}}).to_string());
        bytes.extend([0xC1, 0x80 | 2, 1, 2, 3, 4, b'{' ^ 1, b'}' ^ 2]);
        bytes.extend(flood(2000, |_| json!({"send": {"data": {"x": 1}}}).to_string()));
        raw.send(&bytes);
        assert_eq!(raw.close_code(), Some(1002), "run {run}");
    }
}

#[test]
fn a_slow_reader_that_keeps_sending_sees_3008_every_time() {
    let cfg = std::env::temp_dir().join(format!("sy-closes-{}.toml", std::process::id()));
    std::fs::write(
        &cfg,
        "[limits]\nmax_queue_bytes = 65536\nsend_buffer_bytes = 4096\nwrite_timeout_secs = 20\n",
    )
    .unwrap();
    let c = Cluster::start(1, 1, &["--config", cfg.to_str().unwrap()]);
    let blob = "x".repeat(16 * 1024);
    for run in 0..RUNS {
        let mut raw = Raw::connect(&c, Some(4096));
        let channel = format!("chat:slow{run}");
        raw.start(&format!("slow{run}"), &channel);
        let m = c.metrics(0);
        let before = metric(&m, "switchyard_gateway_slow_disconnects_total");
        let delivered = metric(&m, "switchyard_gateway_deliveries_total");
        let resyncs = metric(&m, "switchyard_gateway_resyncs_total");
        // Publications the client does not read, until the gateway cuts it
        // off. Each batch waits until the core has taken the last one (its
        // delivery counted, or the cut-off): a publisher far ahead of a
        // loaded gateway would overflow the uplink's queue to the core, and
        // the resync that makes up for it (correctly) unsubscribes the
        // session with "insufficient state", so it would never fill.
        let end = Instant::now() + Duration::from_secs(60);
        let (mut sent, mut delivered, mut batch_at, mut resubscribed) = (0, delivered, Instant::now(), 0);
        loop {
            let m = c.metrics(0);
            if metric(&m, "switchyard_gateway_slow_disconnects_total") != before {
                break;
            }
            assert_eq!(metric(&m, "switchyard_gateway_resyncs_total"), resyncs, "run {run}: resynced\n{m}");
            assert!(Instant::now() < end, "run {run}: never cut off after {sent} publications\n{m}");
            if metric(&m, "switchyard_gateway_deliveries_total") - delivered < sent {
                if batch_at.elapsed() < Duration::from_secs(3) {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                // Fewer deliveries counted than publications, and no
                // cut-off: the client reads what came. Publications packed
                // into fewer frames (the uplink packs a run of them) are
                // there; otherwise the client must have been told why (an
                // unsubscribe push, a refused subscription), and it
                // resubscribes as a client does. Nothing said is a loss.
                let lines = raw.read_lines();
                let told = lines.iter().any(|l| l.contains("\"unsubscribe\"") || l.contains("\"error\""));
                let packed = lines.iter().any(|l| l.contains("\"pub\"") || l.starts_with('<'));
                assert!(told || packed, "run {run}: {sent} publications lost without a word: {lines:?}\n{m}");
                eprintln!("run {run}: {sent} publications, deliveries behind; the client read {lines:?}");
                if told {
                    assert!(resubscribed < 3, "run {run}: resubscribed {resubscribed} times: {lines:?}\n{m}");
                    resubscribed += 1;
                    let mut out = Vec::new();
                    let sub = json!({"id": 100 + resubscribed, "subscribe": {"channel": channel}});
                    Raw::frame(&mut out, &sub.to_string());
                    raw.send(&out);
                    std::thread::sleep(Duration::from_millis(200));
                }
                (delivered, sent) = (metric(&c.metrics(0), "switchyard_gateway_deliveries_total"), 0);
            }
            for _ in 0..8 {
                let (st, body) = c.api(0, "publish", &json!({"channel": channel, "data": {"blob": blob}}));
                assert_eq!(st, 200, "{body}");
                sent += 1;
            }
            batch_at = Instant::now();
        }
        // Now closing, the gateway does not read: the client keeps sending …
        raw.send(&flood(2000, |_| json!({"send": {"data": {"x": 1}}}).to_string()));
        // … then reads everything, and the close code is there at the end.
        assert_eq!(raw.close_code(), Some(3008), "run {run}");
    }
    let _ = std::fs::remove_file(&cfg);
}

/// A close frame from the client, masked.
fn close_frame(out: &mut Vec<u8>, code: u16) {
    encode_frame(out, true, OpCode::Close, &code.to_be_bytes(), Some(rand::random()));
}

#[test]
fn a_client_that_closes_first_gets_the_answer_and_then_the_socket_is_gone() {
    let c = Cluster::start(1, 1, &[]);
    for run in 0..10 {
        let mut raw = Raw::connect(&c, None);
        raw.start(&format!("closer{run}"), &format!("chat:closer{run}"));
        let mut out = Vec::new();
        close_frame(&mut out, 1000);
        raw.send(&out);
        // The answer, then the end of the stream …
        assert_eq!(raw.close_code(), Some(1000), "run {run}");
        let mut chunk = [0u8; 64];
        assert_eq!(raw.sock.read(&mut chunk).unwrap(), 0, "run {run}: the stream ends after the close");
        // … and the gateway's socket is closed, not lingering: what the
        // client sends now (nothing a conforming client does after its
        // close frame) is answered with a reset, and the next write fails
        // (on loopback the reset is back within the write that earned it).
        // A lingering socket would read and drop it for LINGER (2 s).
        let mut failed = None;
        for _ in 0..50 {
            if let Err(e) = raw.sock.write_all(b"x") {
                failed = Some(e.kind());
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            matches!(failed, Some(std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)),
            "run {run}: {failed:?}"
        );
    }
    no_sessions_left(&c);
}

#[test]
fn bytes_after_a_clients_close_frame_take_the_lingering_close_and_the_answer_arrives() {
    let c = Cluster::start(1, 1, &[]);
    for run in 0..20 {
        // A small receive buffer and answers backed up in front of the
        // close answer: it is still in the gateway's send queue when the
        // gateway has handed it to the kernel.
        let mut raw = Raw::connect(&c, Some(2048));
        raw.start(&format!("late{run}"), &format!("chat:late{run}"));
        let mut bytes = flood(200, |i| json!({"id": 10 + i, "ping": {}}).to_string());
        close_frame(&mut bytes, 1000);
        // Against the protocol: ~200 KB of frames after the close frame,
        // more than one read takes. The gateway sees bytes behind the close
        // and lingers, reading them; closing at once would leave the rest
        // unread, and the reset that earns would take the queued answer.
        bytes.extend(flood(6000, |i| json!({"send": {"data": {"x": i}}}).to_string()));
        assert!(bytes.len() > 150_000 && bytes.len() < 250_000, "{}", bytes.len());
        // Written beside the reading (the gateway stops reading while its
        // answers wait for room).
        let mut w = raw.sock.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&bytes);
        });
        assert_eq!(raw.close_code(), Some(1000), "run {run}");
        writer.join().unwrap();
    }
}
