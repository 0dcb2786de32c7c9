//! One client connection: upgrade, `connect`, commands, and its write queue.
//!
//! A connection is a [`Session`] record in its core's readiness set, not a
//! task: when its socket is readable the core's reactor reads it
//! synchronously (non-blocking `recv`) into the core's scratch buffer,
//! decodes, and answers, so one buffer per core serves all its connections
//! and nothing is pinned while idle. The upgrade request (and, for wss, the
//! TLS handshake) is read the same way, under the handshake deadline the
//! core's timer keeps. The record holds what must outlive a read: the fd,
//! identity, subscriptions, the bounded outbound queue.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use proto::client::reply::{self, ConnectResult, RefreshResult, SubRefreshResult};
use proto::client::{Disconnect, Method, ReplyError};
use proto::token_bucket::TokenBucket;
use proto::ws::deflate::DeflateParams;
use proto::ws::handshake;
use proto::ws::{Decoded, Decoder, DecoderConfig, Message, MessageRef, SharedFrame, WsError};

use crate::core::Core;
use crate::poller;
use crate::write::{self, Flushed};

/// Version string in connect replies.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// State of one subscription.
#[derive(Debug)]
pub enum Sub {
    /// Waiting for the router's position; deliveries are held (bounded by the
    /// queue limit) and merged after the subscribe reply.
    Pending {
        /// (first offset, last offset, frame) in arrival order.
        held: Vec<(u64, u64, Bytes)>,
        /// Bytes held.
        held_bytes: usize,
    },
    /// Receiving; `position` is the offset of the last publication sent
    /// (0 for unpositioned streams).
    Live {
        /// Last offset sent to this client.
        position: u64,
    },
}

/// What to do with a frame of offsets `first..=last` for a subscription at `position`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send it; the new position.
    Send(u64),
    /// Already covered (the subscribe reply, or a delivery that overtook it): drop.
    Skip,
    /// Something is missing in between: the client must resubscribe and recover.
    Gap,
}

impl Step {
    /// Decides for one frame. Unpositioned frames (`first == 0`) always go.
    pub fn of(position: u64, first: u64, last: u64) -> Step {
        if first == 0 {
            Step::Send(position)
        } else if last <= position {
            Step::Skip
        } else if first == position + 1 {
            Step::Send(last)
        } else {
            Step::Gap
        }
    }
}

/// Why a session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    /// WebSocket close code.
    pub code: u16,
    /// Close reason.
    pub reason: &'static str,
}

impl From<Disconnect> for CloseReason {
    fn from(d: Disconnect) -> Self {
        CloseReason { code: d.code, reason: d.reason }
    }
}

/// A session's subscriptions: a short list (most connections hold a few;
/// the limit is 128), one small allocation instead of a hash table.
#[derive(Debug, Default)]
pub struct Subs(Vec<(Arc<str>, Sub)>);

impl Subs {
    /// Where `channel` is; the core's shared channel name is found by
    /// pointer, any other string by its bytes.
    fn position(&self, channel: &str) -> Option<usize> {
        let same = |c: &Arc<str>| std::ptr::eq(c.as_ptr(), channel.as_ptr()) && c.len() == channel.len();
        self.0.iter().position(|(c, _)| same(c)).or_else(|| self.0.iter().position(|(c, _)| &**c == channel))
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `channel` is subscribed.
    pub fn contains_key(&self, channel: &str) -> bool {
        self.position(channel).is_some()
    }

    /// The subscription to `channel`.
    pub fn get(&self, channel: &str) -> Option<&Sub> {
        self.position(channel).map(|i| &self.0[i].1)
    }

    /// The subscription to `channel`, mutably.
    pub fn get_mut(&mut self, channel: &str) -> Option<&mut Sub> {
        self.position(channel).map(|i| &mut self.0[i].1)
    }

    /// Adds (or replaces) the subscription to `channel`.
    pub fn insert(&mut self, channel: Arc<str>, sub: Sub) {
        match self.position(&channel) {
            Some(i) => self.0[i].1 = sub,
            None => {
                self.0.reserve_exact(1);
                self.0.push((channel, sub));
            }
        }
    }

    /// Removes the subscription to `channel`, with its name.
    pub fn remove_entry(&mut self, channel: &str) -> Option<(Arc<str>, Sub)> {
        let i = self.position(channel)?;
        let e = self.0.swap_remove(i);
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(e)
    }

    /// Removes the subscription to `channel`.
    pub fn remove(&mut self, channel: &str) -> Option<Sub> {
        self.remove_entry(channel).map(|(_, s)| s)
    }

    /// The subscribed channels.
    pub fn keys(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter().map(|(c, _)| c)
    }

    /// Takes every subscription.
    pub fn drain(&mut self) -> impl Iterator<Item = (Arc<str>, Sub)> {
        std::mem::take(&mut self.0).into_iter()
    }
}

/// What permessage-deflate allows on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deflate {
    /// Not negotiated: RSV1 is a protocol error, nothing is compressed.
    Off,
    /// Compressed messages from the client; plain ones to it (it limited the
    /// server's window below the 15 bits the shared compressor uses).
    Inbound,
    /// Both ways: publications reach the session in the core's one
    /// compressed twin of each frame.
    Both,
}

impl Deflate {
    /// The mode for what the upgrade agreed.
    pub fn agreed(params: Option<&DeflateParams>) -> Deflate {
        match params {
            None => Deflate::Off,
            Some(p) if p.server_compresses() => Deflate::Both,
            Some(_) => Deflate::Inbound,
        }
    }
}

/// What outlives a read: the socket, identity, subscriptions, the outbound
/// queue. There is no task, future or buffer per connection: the core's
/// reactor reads a session when its socket is ready and its flusher writes
/// the sessions that queued something this turn.
pub struct Session {
    /// Core-local id (the session's token in the core's readiness set).
    pub id: u64,
    /// The socket's descriptor (reads and writes are non-blocking syscalls on it).
    fd: RawFd,
    /// The socket (closed when the session ends).
    sock: RefCell<Option<OwnedFd>>,
    /// What the readiness set watches for ([`poller::READ`], [`poller::WRITE`]).
    interest: Cell<u32>,
    /// Decoder state, only while a message is in progress across reads.
    decoder: RefCell<Option<Box<Decoder>>>,
    /// TLS state (wss listener only).
    tls: RefCell<Option<Box<rustls::ServerConnection>>>,
    /// Whether the HTTP upgrade is done (before: the request is being read).
    upgraded: Cell<bool>,
    /// What permessage-deflate allows on this connection.
    deflate: Cell<Deflate>,
    /// The echo endpoint (conformance), not the client protocol.
    echo: Cell<bool>,
    /// Whether `connect` succeeded.
    pub connected: Cell<bool>,
    /// Whether the session is on its user's core (adopted, or its first
    /// command was handled here): it never moves again.
    placed: Cell<bool>,
    /// Whether the session is over (unregistered, socket released).
    done: Cell<bool>,
    /// Whether the session waits in the core's flush list.
    dirty: Cell<bool>,
    /// Bytes of an incomplete frame between reads (empty, unallocated, when idle).
    partial: RefCell<BytesMut>,
    /// Connection id sent to the client.
    pub client: RefCell<String>,
    /// User id (`""` anonymous).
    pub user: RefCell<String>,
    /// `conn_info` from the connection token.
    pub conn_info: RefCell<Option<Bytes>>,
    /// Subscriptions.
    pub subs: RefCell<Subs>,
    out: RefCell<VecDeque<Bytes>>,
    out_bytes: Cell<usize>,
    /// Whether the queue's front frame is partly written.
    front_started: Cell<bool>,
    /// Since when the socket's buffer has been full with no progress.
    blocked_since: Cell<Option<Instant>>,
    close: Cell<Option<CloseReason>>,
    /// Publish rate.
    pub publish_bucket: RefCell<Option<TokenBucket>>,
    /// Refused requests (rate limits) so far.
    pub refusals: Cell<u32>,
    /// When the next server ping is due.
    pub next_ping: Cell<Instant>,
    /// When the outstanding pong is due.
    pub pong_due: Cell<Option<Instant>>,
    /// Connect deadline (before `connect`).
    pub connect_deadline: Cell<Option<Instant>>,
    /// When the connection expires (token `exp`), with its grace added.
    pub expires_at: Cell<Option<Instant>>,
    /// When a drain closes this session.
    pub drain_at: Cell<Option<Instant>>,
    /// The timer-wheel tick the session is scheduled at (0: none).
    pub timer: Cell<u64>,
}

/// A connection lost without a close handshake (never sent: it only ends the session).
const LOST: CloseReason = CloseReason { code: 1006, reason: "" };

impl Session {
    /// A session whose upgrade request is still to be read (its deadline is
    /// the handshake timeout until it is upgraded).
    fn new(core: &Core, sock: OwnedFd, tls: Option<Box<rustls::ServerConnection>>) -> Rc<Session> {
        let now = Instant::now();
        let handshake_timeout = Duration::from_secs(core.cfg.limits.handshake_timeout_secs);
        Rc::new(Session {
            id: core.next_session_id(),
            fd: sock.as_raw_fd(),
            sock: RefCell::new(Some(sock)),
            interest: Cell::new(0),
            decoder: RefCell::new(None),
            tls: RefCell::new(tls),
            upgraded: Cell::new(false),
            deflate: Cell::new(Deflate::Off),
            echo: Cell::new(false),
            connected: Cell::new(false),
            placed: Cell::new(false),
            done: Cell::new(false),
            dirty: Cell::new(false),
            partial: RefCell::new(BytesMut::new()),
            client: RefCell::new(String::new()),
            user: RefCell::new(String::new()),
            conn_info: RefCell::new(None),
            subs: RefCell::new(Subs::default()),
            out: RefCell::new(VecDeque::new()),
            out_bytes: Cell::new(0),
            front_started: Cell::new(false),
            blocked_since: Cell::new(None),
            close: Cell::new(None),
            publish_bucket: RefCell::new(None),
            refusals: Cell::new(0),
            next_ping: Cell::new(now),
            pong_due: Cell::new(None),
            connect_deadline: Cell::new(Some(now + handshake_timeout)),
            expires_at: Cell::new(None),
            drain_at: Cell::new(None),
            timer: Cell::new(0),
        })
    }

    /// Whether the HTTP upgrade is done.
    pub fn is_upgraded(&self) -> bool {
        self.upgraded.get()
    }

    /// The upgrade is over (done, refused or abandoned): the core counts one
    /// handshake fewer in progress.
    fn leave_handshake(&self, core: &Core) {
        if !self.upgraded.replace(true) {
            core.handshake_done();
        }
    }

    /// Whether the session is closing or closed.
    pub fn is_closing(&self) -> bool {
        self.close.get().is_some()
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.out_bytes.get()
    }

    /// Queues a frame; past the bound the session is closed with 3008 "slow".
    pub fn send(self: &Rc<Self>, core: &Rc<Core>, frame: Bytes) {
        if self.is_closing() {
            return;
        }
        let len = frame.len();
        if self.out_bytes.get() + len > core.cfg.limits.max_queue_bytes {
            core.metrics().slow_disconnects.fetch_add(1, Ordering::Relaxed);
            // Slow: drop what is queued (but the tail of a frame already
            // partly written), do not flush; the client recovers on reconnect.
            let kept = write::drop_unstarted(&mut self.out.borrow_mut(), self.front_started.get());
            let dropped = self.out_bytes.replace(kept) - kept;
            core.metrics().queued_bytes.fetch_sub(dropped as u64, Ordering::Relaxed);
            self.close(core, Disconnect::SLOW.into());
            return;
        }
        self.out_bytes.set(self.out_bytes.get() + len);
        core.metrics().queued_bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.out.borrow_mut().push_back(frame);
        self.wants_flush(core);
    }

    /// Queues a client-protocol line (a reply or a push) as its own frame.
    pub fn send_line(self: &Rc<Self>, core: &Rc<Core>, line: &[u8]) {
        self.send_own(core, SharedFrame::text(line));
    }

    /// Queues a data frame built for this session alone (replies, echoes):
    /// compressed when the session takes compressed frames and it pays.
    pub fn send_own(self: &Rc<Self>, core: &Rc<Core>, frame: SharedFrame) {
        let packed = match self.deflate.get() {
            Deflate::Both => core.deflate_twin(frame.bytes()),
            Deflate::Off | Deflate::Inbound => None,
        };
        self.send(core, packed.unwrap_or_else(|| frame.into_bytes()));
    }

    /// The frame a publication reaches this session in: the plain one, or
    /// its compressed twin, made at most once per delivery and core
    /// (`twin` caches it; `None` inside when compression does not pay).
    pub fn pick<'a>(&self, core: &Core, plain: &'a Bytes, twin: &'a mut Option<Option<Bytes>>) -> &'a Bytes {
        match self.deflate.get() {
            Deflate::Both => twin.get_or_insert_with(|| core.deflate_twin(plain)).as_ref().unwrap_or(plain),
            Deflate::Off | Deflate::Inbound => plain,
        }
    }

    /// Joins the core's flush list for this turn, unless already there or
    /// waiting for writability (the reactor flushes it then).
    fn wants_flush(self: &Rc<Self>, core: &Rc<Core>) {
        if !self.dirty.get() && self.blocked_since.get().is_none() && !self.done.get() {
            self.dirty.set(true);
            core.mark_dirty(self.clone());
        }
    }

    /// Starts closing: stops reading, queues the close frame after what is
    /// queued; the session ends when it is flushed (or when the socket makes
    /// no progress for the write timeout).
    pub fn close(self: &Rc<Self>, core: &Rc<Core>, reason: CloseReason) {
        if self.is_closing() {
            return;
        }
        self.close.set(Some(reason));
        let frame = SharedFrame::close(reason.code, reason.reason).into_bytes();
        self.out_bytes.set(self.out_bytes.get() + frame.len());
        core.metrics().queued_bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
        self.out.borrow_mut().push_back(frame);
        self.update_interest(core);
        self.wants_flush(core);
    }

    /// The connection is gone (end of stream, read or write error, write
    /// timeout): the session ends now, discarding what is queued.
    pub fn lost(self: &Rc<Self>, core: &Rc<Core>) {
        if self.close.get().is_none() {
            self.close.set(Some(LOST));
        }
        self.finish(core);
    }

    /// The earliest moment one of the session's deadlines may act.
    pub fn next_deadline(&self, write_timeout: Duration) -> Option<Instant> {
        if self.done.get() {
            return None;
        }
        let mut candidates =
            [self.blocked_since.get().map(|t| t + write_timeout), None, None, None, None, None];
        if !self.is_closing() {
            candidates[1] = self.connect_deadline.get();
            candidates[2] = self.drain_at.get();
            if self.connected.get() {
                candidates[3] = Some(self.next_ping.get());
                candidates[4] = self.pong_due.get();
                candidates[5] = self.expires_at.get();
            }
        }
        candidates.into_iter().flatten().min()
    }

    /// Whether the socket has been full, with no progress, for `timeout`.
    pub fn write_stalled(&self, now: Instant, timeout: Duration) -> bool {
        self.blocked_since.get().is_some_and(|t| now.duration_since(t) >= timeout)
    }

    /// Ends the session: out of the readiness set and the core's tables,
    /// queue dropped, socket closed.
    fn finish(self: &Rc<Self>, core: &Rc<Core>) {
        drop(self.detach(core));
        self.out_bytes.set(0);
        *self.out.borrow_mut() = VecDeque::new();
        *self.partial.borrow_mut() = BytesMut::new();
    }

    /// The one way out of a core (end, hand-over, refusal): out of the
    /// readiness set and the core's tables; returns the socket, once.
    fn detach(self: &Rc<Self>, core: &Rc<Core>) -> Option<OwnedFd> {
        if self.done.replace(true) {
            return None;
        }
        self.update_interest(core);
        self.leave_handshake(core);
        core.unregister(self);
        self.sock.borrow_mut().take()
    }

    /// Brings the readiness set in line with the session's state.
    fn update_interest(&self, core: &Core) {
        let want = if self.done.get() {
            0
        } else {
            let read = if self.is_closing() { 0 } else { poller::READ };
            let write = if self.blocked_since.get().is_some() { poller::WRITE } else { 0 };
            read | write
        };
        let have = self.interest.get();
        if want == have {
            return;
        }
        match core.poller.change(self.fd, self.id, have, want) {
            Ok(()) => self.interest.set(want),
            Err(e) => tracing::warn!(core = core.id, error = %e, "readiness set refused a change"),
        }
    }

    /// Writes what is queued without blocking (one `sendmsg` per up to 64
    /// frames); a full socket is watched for writability; a closing session
    /// ends once its close frame is out.
    pub fn flush(self: &Rc<Self>, core: &Rc<Core>) {
        self.dirty.set(false);
        if self.done.get() {
            return;
        }
        let (result, written) = match self.tls.borrow_mut().as_mut() {
            Some(conn) => crate::tls::flush(conn, self.fd, &mut self.out.borrow_mut()),
            None => write::flush_queue(self.fd, &mut self.out.borrow_mut()),
        };
        if written.bytes > 0 {
            self.front_started.set(written.front_started);
        }
        let written = written.bytes;
        self.out_bytes.set(self.out_bytes.get().saturating_sub(written));
        core.metrics().queued_bytes.fetch_sub(written as u64, Ordering::Relaxed);
        match result {
            Ok(Flushed::All) => {
                // An idle session keeps no queue storage.
                *self.out.borrow_mut() = VecDeque::new();
                self.blocked_since.set(None);
                if self.is_closing() {
                    if let Some(conn) = self.tls.borrow_mut().as_mut() {
                        crate::tls::close_notify(conn, self.fd);
                    }
                    // SAFETY: plain syscall on our open socket.
                    unsafe { libc::shutdown(self.fd, libc::SHUT_WR) };
                    self.finish(core);
                } else {
                    self.update_interest(core);
                }
            }
            Ok(Flushed::Blocked) => {
                if written > 0 || self.blocked_since.get().is_none() {
                    self.blocked_since.set(Some(Instant::now()));
                }
                core.rearm(self);
                self.update_interest(core);
            }
            Err(_) => {
                if self.close.get().is_none() {
                    self.close.set(Some(Disconnect::WRITE_ERROR.into()));
                }
                self.finish(core);
            }
        }
    }
}

/// Writes a final HTTP answer, then closes gracefully: shut down our side and
/// discard what the client is still sending (bounded: 64 KiB, 1 s), so the
/// answer is not destroyed by a reset from closing over unread data.
async fn write_raw(stream: &mut TcpStream, bytes: Vec<u8>) {
    let _ = monoio::time::timeout(Duration::from_secs(2), stream.write_all(bytes)).await;
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buf = vec![0u8; 8192];
        let mut total = 0;
        while total < 64 * 1024 {
            let (res, b) = stream.read(buf).await;
            buf = b;
            match res {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = monoio::time::timeout(Duration::from_secs(1), drain).await;
}

/// One non-blocking `recv` into the spare capacity of `buf`.
pub(crate) fn recv_into(fd: std::os::fd::RawFd, buf: &mut BytesMut) -> std::io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: `recv` writes at most `spare.len()` bytes into memory we own
    // (the buffer's spare capacity), and we mark exactly the bytes it wrote
    // as initialized below.
    let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), spare.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel initialized `n` bytes right after the current length.
    unsafe { buf.set_len(buf.len() + n as usize) };
    Ok(n as usize)
}

/// Answers a refused upgrade (or an admission 503) and closes.
pub async fn refuse(mut stream: TcpStream, response: Vec<u8>) {
    write_raw(&mut stream, response).await;
}

/// Takes an accepted connection: from here on it is a session record in
/// the core's readiness set; the upgrade request (and, with TLS, the TLS
/// handshake) is read by the core's reactor like any message, under the
/// handshake deadline kept by the core's timer. No task is made for it.
pub fn accept(core: &Rc<Core>, sock: OwnedFd) {
    let tls = match &core.tls {
        Some(cfg) => match rustls::ServerConnection::new(cfg.clone()) {
            Ok(c) => Some(Box::new(c)),
            Err(e) => {
                tracing::warn!(core = core.id, error = %e, "cannot start a TLS session");
                core.handshake_done();
                return;
            }
        },
        None => None,
    };
    let session = Session::new(core, sock, tls);
    core.register(&session);
    start(core, &session, BytesMut::new());
}

/// The upgrade request is complete in `b` (or refused): answer it, then
/// handle whatever followed it as WebSocket frames.
fn upgrade(core: &Rc<Core>, s: &Rc<Session>, mut b: BytesMut) {
    let limits = handshake::HandshakeLimits::default();
    let (req, consumed) = match handshake::parse_request(&b, &limits) {
        Ok(Some(r)) => r,
        Ok(None) => {
            *s.partial.borrow_mut() = BytesMut::from(&b[..]);
            core.give_scratch(b);
            return;
        }
        Err(e) => {
            core.give_scratch(b);
            return refuse_session(core, s, e.response());
        }
    };
    let path = req.path_only();
    let echo = !core.cfg.echo_path.is_empty() && path == core.cfg.echo_path;
    if !echo && !core.cfg.path.is_empty() && path != core.cfg.path {
        core.give_scratch(b);
        return refuse_session(core, s, handshake::error_response(404, &[], "no websocket endpoint here"));
    }
    let deflate = if core.cfg.deflate { req.negotiate_deflate() } else { None };
    let protocol = req.select_protocol(&["centrifuge-json"]);
    let response = handshake::switching_protocols(&req.key, protocol, deflate.as_ref());
    s.echo.set(echo);
    s.deflate.set(Deflate::agreed(deflate.as_ref()));
    s.leave_handshake(core);
    core.metrics().handshakes.fetch_add(1, Ordering::Relaxed);
    s.connect_deadline.set(Some(Instant::now() + Duration::from_secs(core.cfg.limits.connect_timeout_secs)));
    core.rearm(s);
    s.send(core, Bytes::from(response));
    // Out now, so a `connect` right behind the request finds the session
    // with nothing queued and free to move to its user's core.
    s.flush(core);
    bytes::Buf::advance(&mut b, consumed);
    if b.is_empty() {
        core.give_scratch(b);
    } else {
        feed(core, s, b);
    }
}

/// Refuses an upgrade with an HTTP answer: the socket leaves the session
/// for a short task that writes the answer and closes gracefully.
pub fn refuse_session(core: &Rc<Core>, s: &Rc<Session>, response: Vec<u8>) {
    core.metrics().rejections.fetch_add(1, Ordering::Relaxed);
    if s.close.get().is_none() {
        s.close.set(Some(LOST));
    }
    let Some(sock) = s.detach(core) else { return };
    let answer = match s.tls.borrow_mut().as_mut() {
        Some(conn) => crate::tls::seal_final(conn, &response),
        None => response,
    };
    if let Ok(stream) = TcpStream::from_std(std::net::TcpStream::from(sock)) {
        monoio::spawn(refuse(stream, answer));
    }
}

/// The core of the user named by a `connect` as the frame's first command.
fn peek_core(core: &Rc<Core>, frame: &[u8]) -> Option<usize> {
    let Some(Ok(cmd)) = proto::client::decode_frame(frame).next() else { return None };
    let Method::Connect(c) = &cmd.method else { return None };
    crate::auth::peek_user(&c.token).map(|u| core.core_of_user(&u))
}

/// Watches a registered session's socket and handles what was already read.
fn start(core: &Rc<Core>, s: &Rc<Session>, pending: BytesMut) {
    if s.is_closing() {
        return;
    }
    s.update_interest(core);
    if s.interest.get() == 0 {
        s.lost(core);
        return;
    }
    if !pending.is_empty() {
        let mut b = core.take_scratch();
        b.extend_from_slice(&pending);
        feed(core, s, b);
    }
}

/// The session's socket is readable: one non-blocking `recv` into the
/// core's scratch buffer, after the bytes of a partial frame if any, then
/// decode and handle. Nothing is pinned while idle and no read is ever in
/// flight, so one buffer per core serves every connection on it.
pub fn on_readable(core: &Rc<Core>, s: &Rc<Session>) {
    if s.is_closing() || s.done.get() {
        return;
    }
    let mut b = core.take_scratch();
    {
        let mut partial = s.partial.borrow_mut();
        if !partial.is_empty() {
            b.extend_from_slice(&partial);
            *partial = BytesMut::new();
        }
    }
    let got = {
        let mut tls = s.tls.borrow_mut();
        match tls.as_mut() {
            None => match recv_into(s.fd, &mut b) {
                Ok(0) => Got::Closed,
                Ok(_) => Got::Data,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Got::Nothing,
                Err(_) => Got::Failed,
            },
            Some(conn) => {
                let mut cipher = core.take_scratch();
                let r = crate::tls::read(conn, s.fd, &mut cipher, &mut b);
                core.give_scratch(cipher);
                let got = match r {
                    Ok(crate::tls::ReadTls::Data) => Got::Data,
                    Ok(crate::tls::ReadTls::Closed) => Got::Closed,
                    Ok(crate::tls::ReadTls::WouldBlock) => Got::Nothing,
                    Err(_) => Got::Failed,
                };
                if conn.wants_write() && got != Got::Failed {
                    // Handshake records, key updates: out with this turn's flush.
                    drop(tls);
                    s.wants_flush(core);
                } else if got == Got::Failed {
                    // Send rustls' alert, best effort.
                    let _ = crate::tls::flush(conn, s.fd, &mut VecDeque::new());
                }
                got
            }
        }
    };
    match got {
        Got::Data | Got::Closed => {
            if !s.upgraded.get() {
                upgrade(core, s, b);
            } else if !b.is_empty() {
                feed(core, s, b);
            } else {
                core.give_scratch(b);
            }
            if got == Got::Closed && !s.is_closing() {
                s.lost(core);
            }
        }
        Got::Nothing => {
            // Spurious readiness (or TLS records with no data yet): keep what
            // was partial and wait again.
            if !b.is_empty() {
                *s.partial.borrow_mut() = BytesMut::from(&b[..]);
            }
            core.give_scratch(b);
        }
        Got::Failed => {
            core.give_scratch(b);
            s.lost(core);
        }
    }
}

/// What a read of a session's socket gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    /// Bytes (plaintext) were appended.
    Data,
    /// The peer closed (after the bytes appended, if any).
    Closed,
    /// Nothing yet.
    Nothing,
    /// A socket or TLS error.
    Failed,
}

/// Decodes and handles the bytes in `b` (a scratch buffer), keeps the bytes
/// of a partial frame and the decoder only while a message is in progress,
/// and acts on how the session goes on.
fn feed(core: &Rc<Core>, s: &Rc<Session>, mut b: BytesMut) {
    let mut decoder = s.decoder.borrow_mut().take().unwrap_or_else(|| {
        Box::new(Decoder::new(DecoderConfig {
            max_frame: core.cfg.limits.max_message,
            max_message: core.cfg.limits.max_message,
            deflate: s.deflate.get() != Deflate::Off,
            ..DecoderConfig::server()
        }))
    });
    let result = process(core, s, &mut decoder, &mut b, s.echo.get());
    if !decoder.is_idle() {
        *s.decoder.borrow_mut() = Some(decoder);
    }
    if !b.is_empty() {
        // A partial frame header or control frame: keep just those bytes.
        *s.partial.borrow_mut() = BytesMut::from(&b[..]);
    }
    core.give_scratch(b);
    match result {
        Ok(()) => {}
        Err(End::Stop) => {
            if !s.is_closing() {
                s.lost(core);
            }
        }
        Err(End::Move(target, message)) => hand_over(core, s, target, message),
    }
}

/// Gives the connection to its user's core: the socket leaves this core's
/// readiness set without being shut down or closed. Nothing was written for
/// it since the upgrade.
fn hand_over(core: &Rc<Core>, s: &Rc<Session>, target: usize, message: Bytes) {
    let Some(sock) = s.detach(core) else { return };
    let pending = std::mem::take(&mut *s.partial.borrow_mut()).freeze();
    let fd = sock.into_raw_fd();
    let tls = crate::bridge::TlsSlot::new(s.tls.borrow_mut().take());
    core.hand_over(target, crate::bridge::Handover { fd, message, pending, deflate: s.deflate.get(), tls });
}

/// Serves a connection another core handed over (its user lives here).
pub fn adopt(core: &Rc<Core>, h: crate::bridge::Handover) {
    // SAFETY: the fd left its session on the other core for this hand-over;
    // this core is now its only owner.
    let sock = unsafe { OwnedFd::from_raw_fd(h.fd) };
    let session = Session::new(core, sock, h.tls.take());
    session.upgraded.set(true);
    session.deflate.set(h.deflate);
    session.placed.set(true);
    session
        .connect_deadline
        .set(Some(Instant::now() + Duration::from_secs(core.cfg.limits.connect_timeout_secs)));
    core.register(&session);
    if session.tls.borrow().as_ref().is_some_and(|c| c.wants_write()) {
        session.wants_flush(core);
    }
    // Its first message (`connect`, verified here) is handled now.
    if handle_commands(core, &session, &h.message) == Flow::Go {
        start(core, &session, BytesMut::from(&h.pending[..]));
    } else if !session.is_closing() {
        session.lost(core);
    }
}

/// Why [`process`] stopped before the end of the bytes.
enum End {
    /// The session ends.
    Stop,
    /// The connection moves to `core` with this message (unhandled); the
    /// bytes after it are still in the buffer.
    Move(usize, Bytes),
}

/// Decodes and handles every complete message in `buf` (in place: whole
/// frames are unmasked in the scratch buffer and parsed from there).
fn process(
    core: &Rc<Core>,
    s: &Rc<Session>,
    decoder: &mut Decoder,
    buf: &mut BytesMut,
    echo: bool,
) -> Result<(), End> {
    loop {
        let mut inflater = core.inflater.borrow_mut();
        let (flow, consumed, message) = match decoder.decode_in_place(buf, Some(&mut inflater)) {
            Ok(None) => return Ok(()),
            Ok(Some(Decoded::InPlace { message, consumed })) => {
                drop(inflater);
                let (flow, keep) = match message {
                    MessageRef::Text(t) if echo => {
                        s.send_own(core, SharedFrame::text(t));
                        (Flow::Go, None)
                    }
                    MessageRef::Binary(b) if echo => {
                        s.send_own(core, SharedFrame::binary(b));
                        (Flow::Go, None)
                    }
                    MessageRef::Binary(_) => {
                        s.close(core, CloseReason { code: 1003, reason: "text frames only" });
                        (Flow::Stop, None)
                    }
                    MessageRef::Text(t) => {
                        let f = handle_commands(core, s, t);
                        let keep = matches!(f, Flow::Move(_)).then(|| Bytes::copy_from_slice(t));
                        (f, keep)
                    }
                };
                (flow, consumed, keep)
            }
            Ok(Some(Decoded::Owned(m))) => {
                drop(inflater);
                let (flow, keep) = handle_message(core, s, m, echo);
                (flow, 0, keep)
            }
            Err(e) => {
                drop(inflater);
                close_ws(core, s, &e);
                return Err(End::Stop);
            }
        };
        bytes::Buf::advance(buf, consumed);
        match flow {
            Flow::Go => {}
            Flow::Stop => return Err(End::Stop),
            Flow::Move(target) => return Err(End::Move(target, message.unwrap_or_default())),
        }
    }
}

fn close_ws(core: &Rc<Core>, s: &Rc<Session>, e: &WsError) {
    s.close(core, CloseReason { code: e.close_code(), reason: e.close_reason() });
}

fn handle_message(core: &Rc<Core>, s: &Rc<Session>, m: Message, echo: bool) -> (Flow, Option<Bytes>) {
    let flow = |ok: bool| if ok { Flow::Go } else { Flow::Stop };
    let r = match m {
        Message::Ping(p) => {
            s.send(core, SharedFrame::pong(&p).into_bytes());
            true
        }
        Message::Pong(_) => true,
        Message::Close(c) => {
            let reason = match c {
                Some(c) => CloseReason { code: if c.code == 1005 { 1000 } else { c.code }, reason: "" },
                None => CloseReason { code: 1000, reason: "" },
            };
            s.close(core, reason);
            false
        }
        Message::Text(t) if echo => {
            s.send_own(core, SharedFrame::text(&t));
            true
        }
        Message::Binary(b) if echo => {
            s.send_own(core, SharedFrame::binary(&b));
            true
        }
        Message::Binary(_) => {
            s.close(core, CloseReason { code: 1003, reason: "text frames only" });
            false
        }
        Message::Text(t) => {
            let f = handle_commands(core, s, &t);
            let keep = matches!(f, Flow::Move(_)).then(|| t.clone());
            return (f, keep);
        }
    };
    (flow(r), None)
}

/// How a session goes on after a message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Flow {
    /// Keep serving.
    Go,
    /// The session ends (a close was queued).
    Stop,
    /// The connection belongs to the user's core: hand it over with this
    /// message, unhandled.
    Move(usize),
}

/// The core a not-yet-connected session should live on, if not this one:
/// `hash(user) mod cores`, the user read (unverified) from the connect
/// token; the token is verified on that core.
fn destination(core: &Rc<Core>, s: &Rc<Session>, frame: &[u8]) -> Option<usize> {
    if s.placed.replace(true) || s.connected.get() || !s.out.borrow().is_empty() || core.cores() < 2 {
        return None;
    }
    peek_core(core, frame).filter(|t| *t != core.id)
}

fn handle_commands(core: &Rc<Core>, s: &Rc<Session>, frame: &[u8]) -> Flow {
    if let Some(target) = destination(core, s, frame) {
        return Flow::Move(target);
    }
    let mut replies: Vec<Vec<u8>> = Vec::new();
    let mut ok = true;
    for cmd in proto::client::decode_frame(frame) {
        let cmd = match cmd {
            Ok(c) => c,
            Err(e) => {
                flush(core, s, &mut replies);
                s.close(core, e.disconnect().into());
                return Flow::Stop;
            }
        };
        if !s.connected.get() && !matches!(cmd.method, Method::Connect(_)) {
            flush(core, s, &mut replies);
            s.close(core, Disconnect::BAD_REQUEST.into());
            return Flow::Stop;
        }
        match core.command(s, cmd, &mut replies) {
            Ok(()) => {}
            Err(d) => {
                flush(core, s, &mut replies);
                s.close(core, d.into());
                ok = false;
                break;
            }
        }
    }
    flush(core, s, &mut replies);
    if ok { Flow::Go } else { Flow::Stop }
}

fn flush(core: &Rc<Core>, s: &Rc<Session>, replies: &mut Vec<Vec<u8>>) {
    if !replies.is_empty() {
        let frame = SharedFrame::text_lines(replies.iter().map(|r| r.as_slice()));
        replies.clear();
        s.send_own(core, frame);
    }
}

/// A random connection id in UUID form.
pub fn new_client_id() -> String {
    let v: u128 = rand::random();
    let h = format!("{v:032x}");
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Replies used by the core's command handlers.
pub fn connect_reply(id: u32, client: &str, ttl: Option<u32>, ping: u32) -> Vec<u8> {
    reply::reply(
        id,
        "connect",
        &ConnectResult {
            client: client.to_owned(),
            version: VERSION.to_owned(),
            expires: ttl.is_some(),
            ttl: ttl.unwrap_or(0),
            ping,
            pong: true,
            ..Default::default()
        },
    )
}

/// `refresh` reply.
pub fn refresh_reply(id: u32, client: &str, ttl: Option<u32>) -> Vec<u8> {
    reply::reply(
        id,
        "refresh",
        &RefreshResult {
            client: client.to_owned(),
            version: VERSION.to_owned(),
            expires: ttl.is_some(),
            ttl: ttl.unwrap_or(0),
        },
    )
}

/// `sub_refresh` reply.
pub fn sub_refresh_reply(id: u32, ttl: Option<u32>) -> Vec<u8> {
    reply::reply(id, "sub_refresh", &SubRefreshResult { expires: ttl.is_some(), ttl: ttl.unwrap_or(0) })
}

/// An error reply.
pub fn error(id: u32, e: ReplyError) -> Vec<u8> {
    reply::error_reply(id, e)
}

#[cfg(test)]
mod tests {
    use super::Step;

    #[test]
    fn each_recipient_is_checked_against_its_position() {
        assert_eq!(Step::of(5, 6, 6), Step::Send(6));
        assert_eq!(Step::of(5, 6, 9), Step::Send(9), "a packed frame continues the stream");
        assert_eq!(Step::of(5, 5, 5), Step::Skip, "overtook the subscribe reply");
        assert_eq!(Step::of(5, 3, 5), Step::Skip);
        assert_eq!(Step::of(5, 7, 7), Step::Gap);
        assert_eq!(Step::of(5, 4, 6), Step::Gap, "straddles: cannot split a shared frame");
        assert_eq!(Step::of(5, 0, 0), Step::Send(5), "unpositioned streams always flow");
    }
}
