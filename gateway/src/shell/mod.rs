//! The IO shell around a core's state machine ([`crate::core::Core`]): it
//! moves bytes and time in and carries the machine's effects out, and
//! decides nothing itself.
//!
//! Per core, on its pinned monoio runtime: a reactor waits for the core's
//! readiness set ([`poller`]: every established socket and the listener in
//! one epoll set, a single io_uring POLL_ADD), reads ready sockets with one
//! non-blocking `recv` each ([`socket`], through rustls for wss: [`tls`])
//! and accepts from the `SO_REUSEPORT` listener in bounded batches
//! ([`listener`]); a flusher writes the sessions that queued frames in the
//! turn and hands the turn's messages to the uplink; an inbox task feeds
//! the uplink's messages and other cores' hand-overs; a timer ticks the
//! machine every [`TIMER_TICK`].
//!
//! The shell's per-connection state is the socket, the TLS session if any
//! and what the readiness set watches: a slot of 24 bytes.

pub mod listener;
pub mod poller;
pub mod socket;
pub mod tls;

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::bridge::{Handover, Inbox, UpMsg};
use crate::core::{Core, Got, TIMER_TICK};
use crate::effects::{Action, Sid};
use crate::paged::Paged;
use listener::{ACCEPTS_PER_TURN, Accepted, LISTENER};
use poller::Poller;

/// Shared between the cores and the signal handler.
#[derive(Debug, Default)]
pub struct Lifecycle {
    /// SIGTERM: drain.
    pub drain: AtomicBool,
}

/// A socket the machine has a session for, in its session's slot (12
/// bytes; a wss session's TLS state is beside it, in `Shell::tls_conns`).
struct Sock {
    /// The session's generation (the slot is its index).
    generation: u32,
    fd: OwnedFd,
    /// What the readiness set watches it for.
    watched: u32,
}

/// The TLS state of a wss session, by its slot: a plain ws gateway never
/// touches these pages.
type TlsConns = Paged<Option<tls::Tls>>;

/// One core's shell.
pub struct Shell {
    core: RefCell<Core>,
    socks: RefCell<Paged<Option<Sock>>>,
    tls_conns: RefCell<TlsConns>,
    poller: Poller,
    listener: RefCell<Option<std::net::TcpListener>>,
    listening: Cell<bool>,
    accept_backoff: Cell<Duration>,
    tls: Option<Arc<rustls::ServerConfig>>,
    up: flume::Sender<Vec<UpMsg>>,
    /// Every core's inbox (this one's too), for hand-overs.
    peers: Vec<flume::Sender<Inbox>>,
    flush_waker: Cell<Option<std::task::Waker>>,
    /// The core's buffer for TLS records read (one per core, not per connection).
    cipher: RefCell<bytes::BytesMut>,
    /// The core's buffer for TLS records sealed in a flush.
    sealed: RefCell<Vec<u8>>,
    /// Toward the proxy thread, when a proxy hook is on.
    proxy: Option<flume::Sender<crate::proxy::ProxyCall>>,
}

/// How often a core looks whether to return freed allocator pages to the
/// OS (a collect took 107–149 µs with 9,500 idle sessions on the core,
/// release build).
const COLLECT_EVERY: Duration = Duration::from_secs(1);

/// The first pause after an accept error (EMFILE…); doubled per error in a row.
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);

/// The longest pause after accept errors.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

impl Shell {
    /// A shell around `core`, listening on `listener`.
    pub fn new(
        core: Core,
        listener: std::net::TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        up: flume::Sender<Vec<UpMsg>>,
        peers: Vec<flume::Sender<Inbox>>,
        proxy: Option<flume::Sender<crate::proxy::ProxyCall>>,
    ) -> std::io::Result<Rc<Shell>> {
        let poller = Poller::new()?;
        poller.change(listener.as_raw_fd(), LISTENER, 0, poller::READ)?;
        Ok(Rc::new(Shell {
            core: RefCell::new(core),
            socks: RefCell::new(Paged::default()),
            tls_conns: RefCell::new(Paged::default()),
            poller,
            listener: RefCell::new(Some(listener)),
            listening: Cell::new(true),
            accept_backoff: Cell::new(MIN_ACCEPT_BACKOFF),
            tls,
            up,
            peers,
            flush_waker: Cell::new(None),
            cipher: RefCell::new(bytes::BytesMut::with_capacity(32 * 1024)),
            sealed: RefCell::new(Vec::new()),
            proxy,
        }))
    }

    fn id(&self) -> usize {
        self.core.borrow().id()
    }

    /// Runs the core until it has drained (after `life.drain`).
    pub async fn run(self: Rc<Self>, inbox: flume::Receiver<Inbox>, life: Arc<Lifecycle>, window: Duration) {
        monoio::spawn(self.clone().reactor());
        monoio::spawn(self.clone().flusher());
        let shell = self.clone();
        monoio::spawn(async move {
            while let Ok(msg) = inbox.recv_async().await {
                shell.inbox(msg);
            }
        });
        self.timer(life, window).await;
    }

    /// Carries out the machine's actions and wakes the flusher if there is
    /// something to write.
    fn apply(&self) {
        loop {
            let action = self.core.borrow_mut().effects().actions.pop_front();
            let Some(action) = action else { break };
            match action {
                Action::Watch { sid, read, write } => {
                    let to = if read { poller::READ } else { 0 } | if write { poller::WRITE } else { 0 };
                    let mut socks = self.socks.borrow_mut();
                    let Some(sock) = slot(&mut socks, sid) else { continue };
                    match self.poller.change(sock.fd.as_raw_fd(), sid.0, sock.watched, to) {
                        Ok(()) => sock.watched = to,
                        Err(e) => {
                            tracing::warn!(core = self.id(), error = %e, "readiness set refused a change")
                        }
                    }
                }
                Action::Shutdown { sid } => {
                    let mut socks = self.socks.borrow_mut();
                    let Some(sock) = slot(&mut socks, sid) else { continue };
                    let now = match tls_of(&mut self.tls_conns.borrow_mut(), sid) {
                        Some(conn) => conn.close_notify(sock.fd.as_raw_fd()),
                        None => true,
                    };
                    if now {
                        // SAFETY: plain syscall on our open socket.
                        unsafe { libc::shutdown(sock.fd.as_raw_fd(), libc::SHUT_WR) };
                    }
                }
                Action::Release { sid, notify } => {
                    // Closing the socket takes it out of the readiness set
                    // (this descriptor is the only one of its open file): no
                    // EPOLL_CTL_DEL first, one system call less per session
                    // (`benches/scripts/syscalls.py`).
                    let taken = self.take(sid);
                    if notify && let Some((sock, Some(mut conn))) = taken {
                        conn.close_notify(sock.fd.as_raw_fd());
                    }
                }
                Action::HandOver { sid, core, moved } => {
                    let Some((sock, tls)) = self.take(sid) else { continue };
                    let _ = self.poller.change(sock.fd.as_raw_fd(), sid.0, sock.watched, 0);
                    let h = Handover { fd: sock.fd, tls, moved };
                    // A full inbox drops the hand-over, which closes the socket
                    // (the client reconnects).
                    if let Some(tx) = self.peers.get(core) {
                        let _ = tx.try_send(Inbox::Adopt(Box::new(h)));
                    }
                }
                Action::Emulate { core, emulation } => {
                    let from = emulation.from;
                    let sent =
                        self.peers.get(core).is_some_and(|tx| tx.try_send(Inbox::Emulate(emulation)).is_ok());
                    if !sent {
                        // A full inbox: the request is answered as not
                        // found rather than left waiting.
                        if let Some((_, sid)) = from {
                            self.core.borrow_mut().emulated(sid, false, Instant::now());
                        }
                    }
                }
                Action::Emulated { core, sid, found } => {
                    if let Some(tx) = self.peers.get(core) {
                        // A full inbox leaves the request to its timeout.
                        let _ = tx.try_send(Inbox::Emulated { sid, found });
                    }
                }
                Action::Proxy(call) => {
                    let (id, hook) = (call.id, call.hook);
                    let sent = self.proxy.as_ref().map(|tx| tx.try_send(call));
                    if !matches!(sent, Some(Ok(()))) {
                        // Cannot happen with the queue sized to every core's
                        // bound; answered as a failed call if it does.
                        let outcome = Err(crate::proxy::Failure::Transport);
                        self.core
                            .borrow_mut()
                            .effects()
                            .metrics_all()
                            .proxy
                            .failed(hook, crate::proxy::Failure::Transport);
                        let answer = crate::proxy::ProxyAnswer { id, outcome };
                        self.core.borrow_mut().proxy_answer(answer, Instant::now());
                    }
                }
            }
        }
        let core = self.core.borrow();
        if core.has_writes() || core.wants_up() {
            drop(core);
            if let Some(w) = self.flush_waker.take() {
                w.wake();
            }
        }
    }

    /// Takes a session's socket and TLS state out of its slot.
    #[allow(clippy::type_complexity, reason = "a pair, once")]
    fn take(&self, sid: Sid) -> Option<(Sock, Option<tls::Tls>)> {
        let mut socks = self.socks.borrow_mut();
        let s = socks.get_mut(sid.index())?;
        if s.as_ref().is_none_or(|s| s.generation != sid.generation()) {
            return None;
        }
        let tls = self.tls_conns.borrow_mut().get_mut(sid.index()).and_then(Option::take);
        Some((s.take()?, tls))
    }

    fn register(&self, sid: Sid, fd: OwnedFd, tls: Option<tls::Tls>) {
        *self.socks.borrow_mut().at(sid.index()) =
            Some(Sock { generation: sid.generation(), fd, watched: 0 });
        let mut conns = self.tls_conns.borrow_mut();
        match tls {
            Some(conn) => *conns.at(sid.index()) = Some(conn),
            None => {
                if let Some(old) = conns.get_mut(sid.index()) {
                    *old = None;
                }
            }
        }
    }

    /// Reads the established connections whose sockets are ready, and the
    /// listener: waits for the readiness set itself, then takes a bounded
    /// number of ready sockets per turn so deliveries get their turns too.
    async fn reactor(self: Rc<Self>) {
        let waiter = match self.poller.waiter() {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(core = self.id(), error = %e, "cannot poll the readiness set");
                std::process::exit(2);
            }
        };
        let mut events = poller::events();
        loop {
            if let Err(e) = waiter.readable(false).await {
                tracing::error!(core = self.id(), error = %e, "readiness wait failed");
                monoio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            for _ in 0..4 {
                let n = self.poller.ready(&mut events);
                for ev in &events[..n] {
                    let (token, bits) = (ev.u64, ev.events);
                    if token == LISTENER {
                        self.accept_ready();
                        continue;
                    }
                    let sid = Sid(token);
                    if bits & poller::WRITE != 0 {
                        self.flush(sid, Instant::now());
                    }
                    if bits & (poller::READ | poller::HANGUP) != 0 {
                        self.readable(sid);
                    }
                    if bits & poller::HANGUP != 0 {
                        self.core.borrow_mut().lost(sid, Instant::now());
                    }
                    self.apply();
                }
                if n < events.len() {
                    break;
                }
            }
        }
    }

    /// One non-blocking read of a ready socket, handed to the machine.
    fn readable(&self, sid: Sid) {
        let mut wants_flush = false;
        {
            let mut socks = self.socks.borrow_mut();
            let Some(sock) = slot(&mut socks, sid) else { return };
            let fd = sock.fd.as_raw_fd();
            let mut conns = self.tls_conns.borrow_mut();
            let tls = tls_of(&mut conns, sid);
            let mut core = self.core.borrow_mut();
            let mut cipher = self.cipher.borrow_mut();
            core.read(sid, Instant::now(), |b| match tls {
                None => match socket::recv_into(fd, b) {
                    Ok(0) => Got::Closed,
                    Ok(_) => Got::Data,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Got::Nothing,
                    Err(_) => Got::Failed,
                },
                Some(conn) => {
                    let got = match conn.read(fd, &mut cipher, b) {
                        Ok(tls::ReadTls::Data) => Got::Data,
                        Ok(tls::ReadTls::Closed) => Got::Closed,
                        Ok(tls::ReadTls::WouldBlock) => Got::Nothing,
                        Err(_) => {
                            // Send the alert, best effort.
                            conn.flush_alert(fd);
                            Got::Failed
                        }
                    };
                    wants_flush = got != Got::Failed && conn.wants_write();
                    got
                }
            });
            if wants_flush {
                // Handshake records, key updates: out with this turn's flush.
                core.wants_flush(sid);
            }
        }
        self.apply();
    }

    /// Writes one session's queue (and its TLS records).
    fn flush(&self, sid: Sid, now: Instant) {
        let mut held = false;
        {
            let mut socks = self.socks.borrow_mut();
            let Some(sock) = slot(&mut socks, sid) else { return };
            let fd = sock.fd.as_raw_fd();
            let mut conns = self.tls_conns.borrow_mut();
            let tls = tls_of(&mut conns, sid);
            let mut sealed = self.sealed.borrow_mut();
            self.core.borrow_mut().flush(sid, now, |frames, ends| match tls {
                Some(conn) => conn.flush(fd, frames, &mut sealed),
                None => {
                    held = ends;
                    socket::flush_queue(fd, frames, ends)
                }
            });
        }
        if held {
            // The close frame waits in the socket for the FIN: the machine's
            // close or shutdown goes now, not after the turn's other writes.
            self.apply();
        }
    }

    /// Writes the sessions that queued frames, once per turn: it runs after
    /// the tasks that were ready when the first frame was queued, so frames
    /// of one turn leave a socket in one syscall; then hands the turn's
    /// messages for the routers to the uplink.
    async fn flusher(self: Rc<Self>) {
        let mut batch: Vec<Sid> = Vec::new();
        loop {
            std::future::poll_fn(|cx| {
                let core = self.core.borrow();
                if !core.has_writes() && !core.wants_up() {
                    self.flush_waker.set(Some(cx.waker().clone()));
                    std::task::Poll::Pending
                } else {
                    std::task::Poll::Ready(())
                }
            })
            .await;
            std::mem::swap(&mut batch, &mut self.core.borrow_mut().effects().dirty);
            let probe = self.core.borrow_mut().take_write_probe();
            let metrics = probe.map(|_| self.core.borrow_mut().effects().shared_metrics());
            let now = Instant::now();
            let mut first = true;
            for sid in batch.drain(..) {
                self.flush(sid, now);
                if first && let (Some(t), Some(m)) = (probe, &metrics) {
                    first = false;
                    m.hop_core_to_first_write.record(t.elapsed());
                }
            }
            if let (Some(t), Some(m)) = (probe, &metrics) {
                m.hop_core_to_last_write.record(t.elapsed());
            }
            self.offer_up();
            self.apply();
            if batch.capacity() > 4096 {
                batch = Vec::new();
            }
        }
    }

    fn offer_up(&self) {
        let up = &self.up;
        self.core.borrow_mut().flush_up(|b| up.try_send(b).map_err(|e| e.into_inner()));
    }

    fn inbox(&self, msg: Inbox) {
        let now = Instant::now();
        match msg {
            Inbox::Down(m) => self.core.borrow_mut().down(m, now),
            Inbox::Proxy(a) => self.core.borrow_mut().proxy_answer(a, now),
            Inbox::Emulate(e) => self.core.borrow_mut().emulate(*e, now),
            Inbox::Emulated { sid, found } => self.core.borrow_mut().emulated(sid, found, now),
            Inbox::Adopt(h) => {
                let Handover { fd, tls, moved } = *h;
                // The socket is registered before the machine's actions for it run.
                let sid = self.core.borrow_mut().adopt(moved, now);
                self.register(sid, fd, tls);
            }
        }
        self.apply();
    }

    async fn timer(&self, life: Arc<Lifecycle>, window: Duration) {
        let mut deadline: Option<Instant> = None;
        let mut collected = Instant::now();
        // Sessions held at the last look, and whether they changed since
        // the last collect: a core collects once its count has settled (a
        // storm's end), not every second of steady churn, where allocations
        // purge as they go.
        let (mut held, mut churned) = (0usize, false);
        loop {
            monoio::time::sleep(TIMER_TICK).await;
            let now = Instant::now();
            if now.duration_since(collected) >= COLLECT_EVERY {
                collected = now;
                let count = self.core.borrow().session_count();
                if count != held {
                    (held, churned) = (count, true);
                } else if std::mem::take(&mut churned) {
                    crate::alloc::collect();
                }
            }
            if life.drain.load(Ordering::Relaxed) && !self.core.borrow().is_draining() {
                tracing::info!(core = self.id(), ?window, "draining");
                // Stop accepting: out of the readiness set, and closed so the
                // kernel sends new connections to the other listeners.
                self.set_listening(false);
                drop(self.listener.borrow_mut().take());
                self.core.borrow_mut().drain(now, window);
                deadline = Some(now + window + Duration::from_secs(2));
            }
            self.core.borrow_mut().tick(now);
            self.offer_up();
            self.apply();
            if self.core.borrow().drained() || deadline.is_some_and(|d| now >= d) {
                // Give the last close frames a moment to leave.
                monoio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
        }
    }

    /// The listener has connections queued: takes a bounded batch of them.
    fn accept_ready(self: &Rc<Self>) {
        for _ in 0..ACCEPTS_PER_TURN {
            let accepted = match self.listener.borrow().as_ref() {
                Some(l) => listener::accept(l),
                None => return,
            };
            match accepted {
                Accepted::Socket(fd) => {
                    let tls = match &self.tls {
                        Some(cfg) => match tls::Tls::new(cfg.clone()) {
                            Ok(c) => Some(c),
                            Err(e) => {
                                tracing::warn!(core = self.id(), error = %e, "cannot start a TLS session");
                                continue;
                            }
                        },
                        None => None,
                    };
                    let sid = self.core.borrow_mut().accept(Instant::now());
                    self.register(sid, fd, tls);
                    self.apply();
                }
                Accepted::Empty => {
                    // The queue drained: the descriptors came back. (One
                    // accept that succeeds between failures does not reset
                    // the pause: a descriptor freed now and then is not the
                    // end of the shortage.)
                    self.accept_backoff.set(MIN_ACCEPT_BACKOFF);
                    return;
                }
                Accepted::Exhausted(e) => {
                    // EMFILE/ENFILE and friends: count, stop listening for a
                    // while (no busy loop on a listener that stays ready),
                    // keep serving the connected.
                    self.core.borrow_mut().effects().metrics().accept_errors.fetch_add(1, Ordering::Relaxed);
                    let backoff = self.accept_backoff.get();
                    self.accept_backoff.set((backoff * 2).min(MAX_ACCEPT_BACKOFF));
                    tracing::warn!(core = self.id(), error = %e, ?backoff, "accept failed");
                    self.pause_listening(backoff);
                    return;
                }
            }
        }
    }

    /// Takes the listener out of the readiness set for `pause`.
    fn pause_listening(self: &Rc<Self>, pause: Duration) {
        self.set_listening(false);
        let shell = self.clone();
        monoio::spawn(async move {
            monoio::time::sleep(pause).await;
            if !shell.core.borrow().is_draining() {
                shell.set_listening(true);
            }
        });
    }

    fn set_listening(&self, on: bool) {
        let listener = self.listener.borrow();
        let Some(l) = listener.as_ref() else { return };
        if self.listening.get() == on {
            return;
        }
        let (from, to) = if on { (0, poller::READ) } else { (poller::READ, 0) };
        match self.poller.change(l.as_raw_fd(), LISTENER, from, to) {
            Ok(()) => self.listening.set(on),
            Err(e) => tracing::warn!(core = self.id(), error = %e, "readiness set refused the listener"),
        }
    }
}

fn slot(socks: &mut Paged<Option<Sock>>, sid: Sid) -> Option<&mut Sock> {
    socks.get_mut(sid.index())?.as_mut().filter(|s| s.generation == sid.generation())
}

/// The TLS state of a session whose socket is in its slot (callers found
/// it with [`slot`] first).
fn tls_of(conns: &mut TlsConns, sid: Sid) -> Option<&mut tls::Tls> {
    conns.get_mut(sid.index())?.as_mut()
}

#[cfg(test)]
mod tests {
    /// Every connection's socket slot: 12 bytes, the fd's niche marking a
    /// free slot.
    #[test]
    fn a_socket_slot_is_12_bytes() {
        assert_eq!(std::mem::size_of::<Option<super::Sock>>(), 12);
    }
}
