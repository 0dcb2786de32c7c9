//! A simulated client that behaves like the Centrifugo SDKs: it upgrades,
//! sends `connect` and its subscribes in one frame, answers pings, follows
//! each channel's position from the replies and pushes, resubscribes with
//! recovery when asked (unsubscribe ≥ 2500) and after every reconnect, and
//! retries temporary errors with backoff. It speaks real WebSocket frames
//! and the client protocol's JSON; everything it sees is recorded for the
//! oracle.

use bytes::BytesMut;
use proto::ws::handshake::client::{self as hs, ClientHandshake};
use proto::ws::{Decoder, DecoderConfig, Message, OpCode, encode_frame};
use rand::Rng;
use rand::rngs::SmallRng;
use serde_json::{Value, json};

use crate::oracle::{Final, Obs};

/// A subscription as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubState {
    /// Not subscribed (before connecting, or after unsubscribing).
    Idle,
    /// A subscribe is out (command id).
    Subscribing(u32),
    /// Waiting to send a subscribe again (after a resync or a temporary error).
    Retry,
    /// Receiving.
    Live,
    /// An unsubscribe is out; resubscribe after its reply.
    Unsubscribing(u32),
}

/// One channel of the client.
#[derive(Debug, Clone)]
pub struct Sub {
    /// The channel.
    pub channel: String,
    /// Its state.
    pub state: SubState,
    /// (epoch, offset) once positioned.
    pub pos: Option<(String, u64)>,
    /// Everything seen, for the oracle.
    pub obs: Vec<Obs>,
}

/// Where the client's connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// No connection; the world reconnects it at `retry_at` (µs).
    Offline,
    /// The upgrade request is out.
    Upgrading,
    /// Upgraded; `connect` is out.
    Connecting,
    /// Connected.
    Connected,
    /// A close frame was sent; waiting for the server's.
    Closing,
}

/// The client.
#[derive(Debug)]
pub struct Client {
    /// Index in the world.
    pub id: usize,
    /// User id.
    pub user: String,
    token: String,
    /// Its channels.
    pub subs: Vec<Sub>,
    /// Where the connection is.
    pub phase: Phase,
    next_id: u32,
    connect_id: u32,
    hs: Option<ClientHandshake>,
    decoder: Decoder,
    buf: BytesMut,
    /// Bytes for the server, taken by the world after each call.
    pub outbox: Vec<u8>,
    /// Consecutive failed connections (backoff).
    pub failures: u32,
    /// Last close code seen.
    pub last_close: u16,
    /// The connection id the server gave, while connected.
    pub client_id: Option<String>,
    /// The client left for good (it does not reconnect).
    pub quit: bool,
}

impl Client {
    /// A client of `user` holding `token`, for `channels`.
    pub fn new(id: usize, user: String, token: String, channels: Vec<String>) -> Client {
        Client {
            id,
            user,
            token,
            subs: channels
                .into_iter()
                .map(|channel| Sub { channel, state: SubState::Idle, pos: None, obs: Vec::new() })
                .collect(),
            phase: Phase::Offline,
            next_id: 1,
            connect_id: 0,
            hs: None,
            decoder: Decoder::new(DecoderConfig::client()),
            buf: BytesMut::new(),
            outbox: Vec::new(),
            failures: 0,
            last_close: 0,
            client_id: None,
            quit: false,
        }
    }

    fn id(&mut self) -> u32 {
        self.next_id += 1;
        self.next_id
    }

    fn frame(&mut self, text: &str, rng: &mut SmallRng) {
        encode_frame(&mut self.outbox, true, OpCode::Text, text.as_bytes(), Some(rng.random()));
    }

    /// A new connection is open: send the upgrade request.
    pub fn start(&mut self, rng: &mut SmallRng) {
        let (req, h) = hs::request("sim", "/connection/websocket", rng.random(), &[], false);
        self.outbox.extend_from_slice(&req);
        self.hs = Some(h);
        self.decoder = Decoder::new(DecoderConfig::client());
        self.buf.clear();
        self.phase = Phase::Upgrading;
    }

    fn subscribe_line(&mut self, k: usize) -> String {
        let id = self.id();
        let s = &mut self.subs[k];
        s.state = SubState::Subscribing(id);
        match &s.pos {
            Some((epoch, offset)) => json!({"id": id, "subscribe": {"channel": s.channel, "recover": true, "epoch": epoch, "offset": offset, "flag": 1}}),
            None => json!({"id": id, "subscribe": {"channel": s.channel, "flag": 1}}),
        }
        .to_string()
    }

    /// Sends the subscribes that wait for a retry (the world's timer).
    pub fn retry(&mut self, rng: &mut SmallRng) {
        if self.phase != Phase::Connected {
            return;
        }
        let waiting: Vec<usize> =
            (0..self.subs.len()).filter(|k| self.subs[*k].state == SubState::Retry).collect();
        if waiting.is_empty() {
            return;
        }
        let lines: Vec<String> = waiting.into_iter().map(|k| self.subscribe_line(k)).collect();
        self.frame(&lines.join("\n"), rng);
    }

    /// Whether a subscribe waits for a retry.
    pub fn wants_retry(&self) -> bool {
        self.phase == Phase::Connected && self.subs.iter().any(|s| s.state == SubState::Retry)
    }

    /// Unsubscribes from channel `k` (it resubscribes after the reply).
    pub fn churn(&mut self, k: usize, rng: &mut SmallRng) {
        if self.phase != Phase::Connected || self.subs[k].state != SubState::Live {
            return;
        }
        let id = self.id();
        self.subs[k].state = SubState::Unsubscribing(id);
        let line = json!({"id": id, "unsubscribe": {"channel": self.subs[k].channel}}).to_string();
        self.frame(&line, rng);
    }

    /// Closes the connection (close frame 1000).
    pub fn leave(&mut self, rng: &mut SmallRng) {
        if matches!(self.phase, Phase::Connected | Phase::Connecting) {
            let mut payload = 1000u16.to_be_bytes().to_vec();
            payload.extend_from_slice(b"bye");
            encode_frame(&mut self.outbox, true, OpCode::Close, &payload, Some(rng.random()));
            self.phase = Phase::Closing;
        }
    }

    /// The connection is gone (the server closed it, or it broke).
    pub fn closed(&mut self) {
        if self.phase == Phase::Offline {
            return;
        }
        let code = if self.last_close == 0 { 1006 } else { self.last_close };
        let was = std::mem::replace(&mut self.phase, Phase::Offline);
        for s in &mut self.subs {
            if s.state != SubState::Idle || was == Phase::Connected {
                s.obs.push(Obs::Disconnected(code));
            }
            s.state = SubState::Idle;
        }
        if was != Phase::Connected {
            self.failures += 1;
        }
        self.last_close = 0;
        self.hs = None;
        self.client_id = None;
    }

    /// Bytes from the server; returns false when the connection must be
    /// dropped (a protocol error on the server's side, seen by the client).
    pub fn on_bytes(&mut self, bytes: &[u8], rng: &mut SmallRng) -> bool {
        self.buf.extend_from_slice(bytes);
        if self.phase == Phase::Upgrading {
            let Some(h) = &self.hs else { return false };
            match h.parse_response(&self.buf) {
                Ok(None) => return true,
                Ok(Some((_, n))) => {
                    let _ = self.buf.split_to(n);
                    self.phase = Phase::Connecting;
                    self.connect_id = self.id();
                    let mut lines = vec![
                        json!({"id": self.connect_id, "connect": {"token": self.token, "name": "sim"}})
                            .to_string(),
                    ];
                    for k in 0..self.subs.len() {
                        lines.push(self.subscribe_line(k));
                    }
                    self.frame(&lines.join("\n"), rng);
                }
                Err(_) => return false,
            }
        }
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(None) => return true,
                Ok(Some(Message::Text(t))) => {
                    for line in t.split(|b| *b == b'\n') {
                        self.line(line, rng);
                    }
                }
                Ok(Some(Message::Close(c))) => {
                    self.last_close = c.map_or(1005, |c| c.code);
                    if self.phase != Phase::Closing {
                        let payload = 1000u16.to_be_bytes();
                        encode_frame(&mut self.outbox, true, OpCode::Close, &payload, Some(rng.random()));
                    }
                    self.phase = Phase::Closing;
                }
                Ok(Some(_)) => {}
                Err(_) => return false,
            }
        }
    }

    fn line(&mut self, line: &[u8], rng: &mut SmallRng) {
        if line == b"{}" {
            self.frame("{}", rng);
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(line) else { return };
        if let Some(push) = v.get("push") {
            return self.push(push);
        }
        let id = v["id"].as_u64().unwrap_or(0) as u32;
        if id == self.connect_id && self.phase == Phase::Connecting {
            if v.get("error").is_some() {
                // Temporary (100) or not, the SDKs reconnect with backoff.
                self.leave(rng);
            } else {
                self.phase = Phase::Connected;
                self.failures = 0;
                self.client_id = v["connect"]["client"].as_str().map(str::to_owned);
            }
            return;
        }
        let Some(k) = self.subs.iter().position(
            |s| matches!(s.state, SubState::Subscribing(i) | SubState::Unsubscribing(i) if i == id),
        ) else {
            return;
        };
        let s = &mut self.subs[k];
        match s.state {
            SubState::Unsubscribing(_) => {
                s.state = SubState::Retry;
            }
            SubState::Subscribing(_) => {
                if let Some(e) = v.get("error") {
                    let code = e["code"].as_u64().unwrap_or(0);
                    let temporary = e["temporary"] == true || code == 100 || code == 111;
                    s.obs.push(Obs::Refused { code, temporary });
                    s.state = if temporary { SubState::Retry } else { SubState::Idle };
                    return;
                }
                let r = &v["subscribe"];
                let recovering = r["was_recovering"] == true;
                let recovered = r["recovered"] == true;
                let epoch = r["epoch"].as_str().unwrap_or("").to_owned();
                let offset = r["offset"].as_u64().unwrap_or(0);
                let publications: Vec<(u64, Option<u64>)> = r["publications"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|p| (p["offset"].as_u64().unwrap_or(0), p["data"]["seq"].as_u64()))
                            .collect()
                    })
                    .unwrap_or_default();
                let last = publications.last().map(|p| p.0).unwrap_or(offset);
                s.obs.push(Obs::Subscribed {
                    recovering,
                    recovered,
                    epoch: epoch.clone(),
                    offset,
                    publications,
                });
                s.pos = Some((epoch, if recovering && recovered { last } else { offset }));
                s.state = SubState::Live;
            }
            _ => {}
        }
    }

    fn push(&mut self, push: &Value) {
        let channel = push["channel"].as_str().unwrap_or("");
        let Some(s) = self.subs.iter_mut().find(|s| s.channel == channel) else { return };
        if let Some(p) = push.get("pub") {
            let offset = p["offset"].as_u64().unwrap_or(0);
            s.obs.push(Obs::Pub(offset, p["data"]["seq"].as_u64()));
            if let Some((_, at)) = &mut s.pos {
                *at = offset.max(*at);
            }
        } else if let Some(u) = push.get("unsubscribe") {
            if u["code"].as_u64().unwrap_or(0) >= 2500 {
                s.obs.push(Obs::Resync);
                s.state = SubState::Retry;
            } else {
                s.obs.push(Obs::Refused { code: u["code"].as_u64().unwrap_or(0), temporary: false });
                s.state = SubState::Idle;
            }
        }
    }

    /// Where channel `k` stands for the oracle at the end.
    pub fn final_state(&self, k: usize) -> Final {
        let s = &self.subs[k];
        if self.quit {
            return Final::Gone;
        }
        match (&self.phase, &s.state, &s.pos) {
            (Phase::Connected, SubState::Live, Some((e, at))) => Final::Live(e.clone(), *at),
            (phase, state, _) => Final::NotLive(format!("{phase:?}, {state:?}")),
        }
    }
}
