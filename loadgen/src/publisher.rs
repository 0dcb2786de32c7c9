//! Where the fan-out's publications come from: the router's HTTP API (the
//! app backend's path) or a client connection publishing through a gateway
//! (the client `publish` command, the path of a user sending a message).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use proto::ws::handshake::client;
use proto::ws::{Decoder, DecoderConfig, Message, OpCode, encode_frame};

use crate::orchestrate::ApiClient;

/// A publisher. The HTTP API answers a publication's `(offset, epoch)`; a
/// client publish is answered with an empty result (as in Centrifugo), so
/// the final positions then come from `history` with `limit: 0`.
pub enum Publisher {
    /// Through the HTTP API.
    Api(ApiClient),
    /// Through a gateway, as a connected client.
    Client(ClientPublisher),
}

impl Publisher {
    /// Publishes `data` to `channel`; its position when the path tells it.
    pub fn publish(
        &mut self,
        channel: &str,
        data: serde_json::Value,
    ) -> anyhow::Result<Option<(u64, String)>> {
        let result = match self {
            Publisher::Api(api) => {
                let r = api.call("publish", &serde_json::json!({"channel": channel, "data": data}))?;
                r.get("result").cloned().ok_or_else(|| anyhow::anyhow!("refused: {r}"))?
            }
            Publisher::Client(c) => {
                c.call(serde_json::json!({"publish": {"channel": channel, "data": data}}))?
            }
        };
        Ok(result["offset"]
            .as_u64()
            .map(|offset| (offset, result["epoch"].as_str().unwrap_or("").to_owned())))
    }
}

/// One client connection that publishes (it must be subscribed to the
/// channels it publishes to where the namespace says so; it ignores the
/// pushes it receives).
pub struct ClientPublisher {
    stream: TcpStream,
    decoder: Decoder,
    buf: BytesMut,
    next_id: u64,
}

impl ClientPublisher {
    /// Connects, sends `connect` with `token`, and subscribes to `channels`.
    pub fn connect(addr: SocketAddr, token: &str, channels: &[String]) -> anyhow::Result<ClientPublisher> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let (req, hs) =
            client::request(&addr.to_string(), "/connection/websocket", rand::random(), &[], false);
        stream.write_all(&req)?;
        let mut buf = BytesMut::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((_, n)) =
                hs.parse_response(&buf).map_err(|e| anyhow::anyhow!("upgrade refused: {e:?}"))?
            {
                let _ = buf.split_to(n);
                break;
            }
            let n = stream.read(&mut chunk)?;
            anyhow::ensure!(n > 0, "closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        }
        let mut p =
            ClientPublisher { stream, decoder: Decoder::new(DecoderConfig::client()), buf, next_id: 1 };
        let r = p.call(serde_json::json!({"connect": {"token": token, "name": "loadgen-publisher"}}))?;
        anyhow::ensure!(r.get("client").is_some(), "connect refused: {r}");
        for ch in channels {
            p.call(serde_json::json!({"subscribe": {"channel": ch}}))?;
        }
        Ok(p)
    }

    /// Sends a command and waits for its reply's result.
    fn call(&mut self, mut cmd: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = id.into();
        let mut out = Vec::new();
        encode_frame(&mut out, true, OpCode::Text, cmd.to_string().as_bytes(), Some(rand::random()));
        self.stream.write_all(&out)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut chunk = [0u8; 65536];
        loop {
            anyhow::ensure!(Instant::now() < deadline, "no reply to {cmd}");
            while let Some(msg) = self.decoder.decode(&mut self.buf)? {
                match msg {
                    Message::Text(t) => {
                        for line in t.split(|b| *b == b'\n') {
                            if line == b"{}" {
                                let mut pong = Vec::new();
                                encode_frame(&mut pong, true, OpCode::Text, b"{}", Some(rand::random()));
                                self.stream.write_all(&pong)?;
                                continue;
                            }
                            let v: serde_json::Value = serde_json::from_slice(line)?;
                            if v["id"] == id {
                                if let Some(e) = v.get("error") {
                                    anyhow::bail!("refused: {e}");
                                }
                                // The reply's one other key holds the result.
                                return Ok(v
                                    .as_object()
                                    .and_then(|o| o.iter().find(|(k, _)| *k != "id").map(|(_, r)| r.clone()))
                                    .unwrap_or_default());
                            }
                        }
                    }
                    Message::Close(c) => anyhow::bail!("closed by the server: {c:?}"),
                    _ => {}
                }
            }
            let n = self.stream.read(&mut chunk)?;
            anyhow::ensure!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
