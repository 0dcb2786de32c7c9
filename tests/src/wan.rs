//! A WAN between a gateway and a router, in the test kit: this kernel has
//! no `netem` qdisc, and the gateway⇄router link is QUIC over UDP, so the
//! WAN is a UDP relay. Datagrams each way are held for a seeded delay
//! (base ± jitter, uniform), dropped with a seeded probability, and leave
//! in the order their delays give them (so datagrams sent within the jitter
//! of each other are reordered); a switch blackholes both directions.
//!
//! One relay carries one gateway's link to one router: the gateway lists
//! the router at [`Relay::addr`] (under the router's own name, so its
//! certificate still checks), and the relay forwards to the router from a
//! socket of its own.

use std::collections::BinaryHeap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// What the relay does to datagrams.
#[derive(Debug, Clone, Copy)]
pub struct WanSpec {
    /// One-way delay.
    pub delay: Duration,
    /// Uniform jitter around it (± this).
    pub jitter: Duration,
    /// Probability a datagram is dropped (each way).
    pub loss: f64,
    /// Seed of the delays and losses.
    pub seed: u64,
}

impl WanSpec {
    /// 40 ms ± 10 ms one way, 1 % loss.
    pub fn edge_pop(seed: u64) -> WanSpec {
        WanSpec { delay: Duration::from_millis(40), jitter: Duration::from_millis(10), loss: 0.01, seed }
    }
}

/// Counts of what the relay did.
#[derive(Debug, Default)]
pub struct WanCounts {
    /// Datagrams forwarded (both ways).
    pub forwarded: AtomicU64,
    /// Datagrams dropped by the loss draw.
    pub lost: AtomicU64,
    /// Datagrams dropped by the blackhole.
    pub blackholed: AtomicU64,
}

/// A datagram waiting for its time.
struct Held {
    at: Instant,
    seq: u64,
    /// Toward the router (else toward the gateway).
    up: bool,
    bytes: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    // Earliest first out of the max-heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

struct Shared {
    queue: Mutex<BinaryHeap<Held>>,
    ready: Condvar,
    blackhole: AtomicBool,
    stop: AtomicBool,
    counts: WanCounts,
    /// The gateway's address, learned from its first datagram.
    gateway: Mutex<Option<SocketAddr>>,
}

/// A running relay; stops on drop.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Datagrams held at most (past it new ones are dropped, as a full
/// router queue would): bounds the relay's memory.
const MAX_HELD: usize = 65_536;

impl Relay {
    /// Relays between a gateway and the router at `router`, listening on
    /// `listen` (port 0: any).
    pub fn start(listen: SocketAddr, router: SocketAddr, spec: WanSpec) -> Relay {
        let front = UdpSocket::bind(listen).expect("relay socket");
        let back = UdpSocket::bind(SocketAddr::new(router.ip(), 0)).expect("relay socket");
        back.connect(router).expect("relay connect");
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let addr = front.local_addr().unwrap();
        let shared = Arc::new(Shared {
            queue: Mutex::new(BinaryHeap::new()),
            ready: Condvar::new(),
            blackhole: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            counts: WanCounts::default(),
            gateway: Mutex::new(None),
        });
        let rng = Arc::new(Mutex::new(SmallRng::seed_from_u64(spec.seed)));
        let seq = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for up in [true, false] {
            let sock = if up { front.try_clone().unwrap() } else { back.try_clone().unwrap() };
            let (shared, rng, seq) = (shared.clone(), rng.clone(), seq.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !shared.stop.load(Ordering::Relaxed) {
                    let (n, from) = match sock.recv_from(&mut buf) {
                        Ok(r) => r,
                        Err(_) => continue, // the read timeout: look at `stop`
                    };
                    if up {
                        *shared.gateway.lock().unwrap() = Some(from);
                    }
                    if shared.blackhole.load(Ordering::Relaxed) {
                        shared.counts.blackholed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let (lost, delay) = {
                        let mut r = rng.lock().unwrap();
                        let lost = r.random_bool(spec.loss);
                        let j = spec.jitter.as_micros() as i64;
                        let d =
                            spec.delay.as_micros() as i64 + if j > 0 { r.random_range(-j..=j) } else { 0 };
                        (lost, Duration::from_micros(d.max(0) as u64))
                    };
                    if lost {
                        shared.counts.lost.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let mut q = shared.queue.lock().unwrap();
                    if q.len() >= MAX_HELD {
                        shared.counts.lost.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let held = Held {
                        at: Instant::now() + delay,
                        seq: seq.fetch_add(1, Ordering::Relaxed),
                        up,
                        bytes: buf[..n].to_vec(),
                    };
                    q.push(held);
                    shared.ready.notify_one();
                }
            }));
        }
        let (shared2, front2, back2) = (shared.clone(), front, back);
        threads.push(std::thread::spawn(move || {
            let mut q = shared2.queue.lock().unwrap();
            while !shared2.stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                match q.peek() {
                    Some(h) if h.at <= now => {
                        let h = q.pop().expect("peeked");
                        drop(q);
                        // A blackhole also swallows what was in flight.
                        if shared2.blackhole.load(Ordering::Relaxed) {
                            shared2.counts.blackholed.fetch_add(1, Ordering::Relaxed);
                        } else if h.up {
                            let _ = back2.send(&h.bytes);
                            shared2.counts.forwarded.fetch_add(1, Ordering::Relaxed);
                        } else if let Some(gw) = *shared2.gateway.lock().unwrap() {
                            let _ = front2.send_to(&h.bytes, gw);
                            shared2.counts.forwarded.fetch_add(1, Ordering::Relaxed);
                        }
                        q = shared2.queue.lock().unwrap();
                    }
                    Some(h) => {
                        let wait = h.at - now;
                        q = shared2.ready.wait_timeout(q, wait).unwrap().0;
                    }
                    None => q = shared2.ready.wait_timeout(q, Duration::from_millis(50)).unwrap().0,
                }
            }
        }));
        Relay { addr, shared, threads }
    }

    /// Where the gateway sends (the router as the gateway lists it).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every datagram both ways while `on`.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::Relaxed);
    }

    /// What it did so far.
    pub fn counts(&self) -> &WanCounts {
        &self.shared.counts
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay delays within its bounds, drops what its seed says, and
    /// reorders within the jitter — and the blackhole drops everything.
    #[test]
    fn the_relay_delays_drops_reorders_and_blackholes() {
        let router = UdpSocket::bind("127.0.0.1:0").unwrap();
        router.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        // Room for every datagram even if this thread is slow to read (the
        // relay releases them in a burst); as root past rmem_max.
        let size: libc::c_int = 4 << 20;
        for opt in [libc::SO_RCVBUF, libc::SO_RCVBUFFORCE] {
            // SAFETY: setsockopt reads one int from `size` for the socket's fd.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&router),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        let spec = WanSpec {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(10),
            loss: 0.05,
            seed: 9,
        };
        let relay = Relay::start("127.0.0.1:0".parse().unwrap(), router.local_addr().unwrap(), spec);
        let gw = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sent_at = Instant::now();
        for i in 0..200u32 {
            gw.send_to(&i.to_be_bytes(), relay.addr()).unwrap();
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        let mut relay_side = None;
        while let Ok((n, from)) = router.recv_from(&mut buf) {
            assert!(sent_at.elapsed() >= Duration::from_millis(10), "held at least delay - jitter");
            got.push(u32::from_be_bytes(buf[..n].try_into().unwrap()));
            relay_side = Some(from);
        }
        let lost = relay.counts().lost.load(Ordering::Relaxed) as usize;
        assert_eq!(got.len() + lost, 200, "every datagram forwarded or dropped by the loss draw");
        assert!((1..=25).contains(&lost), "about 5 %: {lost}");
        assert!(got.windows(2).any(|w| w[0] > w[1]), "reordered within the jitter");
        // Back toward the gateway (the loss draw may take it: try a few).
        gw.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let back = (0..5).any(|_| {
            router.send_to(b"pong", relay_side.unwrap()).unwrap();
            gw.recv_from(&mut buf).is_ok_and(|(n, _)| &buf[..n] == b"pong")
        });
        assert!(back, "the way back");
        // The blackhole.
        relay.blackhole(true);
        gw.send_to(b"x", relay.addr()).unwrap();
        assert!(router.recv_from(&mut buf).is_err(), "blackholed");
        assert!(relay.counts().blackholed.load(Ordering::Relaxed) >= 1);
    }
}
