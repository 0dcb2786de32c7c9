//! The simulated world: gateways (cores and an uplink each), routers
//! (shards), clients, the network between them, and the faults, in one
//! thread under a seeded scheduler with a fake clock.
//!
//! It runs the production state machines — [`gateway::core::Core`],
//! [`gateway::uplink::Uplink`], [`router::shard::Shard`], the router's link
//! dispatch — and replaces only the IO shells: sockets are byte queues with
//! a bounded receive buffer, QUIC links are FIFO streams (one control
//! stream each way and K delivery streams; order holds within a stream,
//! never across), every bounded queue of production is a bounded queue
//! here (core inboxes, the core → uplink channel, both ends' link queues,
//! sessions' outbound queues), and time only moves when the scheduler says.
//!
//! Faults: routers and gateways are killed, restarted and drained; links
//! drop (each side notices at its own time, what was in flight is lost) and
//! come back; cores, uplinks and link writers stall, so queues fill; clients
//! read slowly, churn subscriptions and leave. Then the faults stop,
//! everything comes back, and the world settles before the oracle looks.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway::auth::Verifier;
use gateway::bridge::{CoreId, DownMsg, Moved, UpMsg};
use gateway::config::{AuthConfig, GatewayConfig};
use gateway::core::{Core, CoreSpec, Got};
use gateway::effects::{Action, Sid};
use gateway::metrics::Metrics as GatewayMetrics;
use gateway::session::outbound::{Flushed, Written};
use gateway::uplink::{Uplink, UplinkIo};
use proto::cluster::{ClusterMsg, PROTOCOL_VERSION};
use proto::namespace::{NamespaceOptions, Namespaces};
use proto::rendezvous::score;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use router::link::{Dispatch, dispatch, shard_of, stream_of};
use router::shard::{ApiOp, GatewayId, LinkTx, Metrics as RouterMetrics, Shard, ShardCmd, ShardSpec};

use crate::client::{Client, Phase};
use crate::oracle::{self, Log, Verdict};

const HMAC_SECRET: &str = "simulation-secret-0123456789abcdef";

/// The shape of one run, drawn from its seed.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Routers.
    pub routers: usize,
    /// Shards per router.
    pub shards: usize,
    /// Gateways.
    pub gateways: usize,
    /// Cores per gateway.
    pub cores: usize,
    /// Clients.
    pub clients: usize,
    /// Distinct users (several clients may share one).
    pub users: usize,
    /// Channels (`chat:i`, and `small:i` with a history of 2).
    pub channels: usize,
    /// Core inbox capacity (messages).
    pub core_inbox: usize,
    /// Core → uplink channel capacity (batches).
    pub up_queue: usize,
    /// Router → gateway link queue (messages).
    pub router_queue: usize,
    /// Gateway → router link queue (messages).
    pub gateway_queue: usize,
    /// A session's outbound bound (bytes).
    pub max_queue_bytes: usize,
    /// A client socket's receive buffer (bytes).
    pub sock_buf: usize,
    /// Delivery streams per link.
    pub streams: usize,
    /// Messages a core holds for its uplink before it refuses new work.
    pub up_backlog: usize,
    /// Messages the uplink holds for full link queues before it stops
    /// taking the cores' batches.
    pub uplink_held: usize,
    /// Faults injected.
    pub faults: usize,
    /// Seconds of traffic and faults.
    pub active_secs: u64,
    /// Seconds to settle after.
    pub settle_secs: u64,
    /// Mean milliseconds between publications.
    pub publish_every_ms: u64,
    /// Mean seconds between a client's own reconnects and subscription
    /// churn (0: clients only do what the faults make them do).
    pub churn_secs: u64,
}

impl Spec {
    /// The spec for `seed`.
    pub fn from_seed(seed: u64) -> Spec {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_5eed);
        let clients = rng.random_range(3..=16);
        Spec {
            routers: rng.random_range(1..=3),
            shards: rng.random_range(1..=2),
            gateways: rng.random_range(1..=3),
            cores: rng.random_range(1..=3),
            clients,
            users: rng.random_range(1..=clients),
            channels: rng.random_range(1..=4),
            core_inbox: *pick(&mut rng, &[2, 4, 16, 256]),
            up_queue: *pick(&mut rng, &[1, 2, 64]),
            router_queue: *pick(&mut rng, &[4, 16, 1024]),
            gateway_queue: *pick(&mut rng, &[2, 8, 1024]),
            max_queue_bytes: *pick(&mut rng, &[2_048, 8_192, 1 << 20]),
            sock_buf: *pick(&mut rng, &[512, 4_096, 65_536]),
            streams: rng.random_range(1..=3),
            up_backlog: *pick(&mut rng, &[8, 64, 65_536]),
            uplink_held: *pick(&mut rng, &[4, 64, 65_536]),
            faults: rng.random_range(0..=10),
            active_secs: rng.random_range(10..=25),
            settle_secs: 45,
            publish_every_ms: *pick(&mut rng, &[20, 100, 400]),
            churn_secs: *pick(&mut rng, &[0, 0, 3, 8]),
        }
    }
}

fn pick<'a, T>(rng: &mut SmallRng, xs: &'a [T]) -> &'a T {
    &xs[rng.random_range(0..xs.len())]
}

/// A bounded FIFO, as production's bounded channels.
#[derive(Debug)]
struct Bounded<T> {
    q: VecDeque<T>,
    cap: usize,
}

impl<T> Bounded<T> {
    fn new(cap: usize) -> Self {
        Bounded { q: VecDeque::new(), cap: cap.max(1) }
    }

    fn push(&mut self, x: T) -> Result<(), T> {
        if self.q.len() >= self.cap {
            return Err(x);
        }
        self.q.push_back(x);
        Ok(())
    }
}

/// A router link's outbound queue as the shards see it.
struct RouterTx(Rc<RefCell<Bounded<ClusterMsg>>>);

impl LinkTx for RouterTx {
    fn try_send(&self, msg: ClusterMsg) -> bool {
        self.0.borrow_mut().push(msg).is_ok()
    }
}

struct RouterNode {
    name: String,
    alive: bool,
    draining: bool,
    inc: u64,
    shards: Vec<Shard<RouterTx>>,
    next_gw: GatewayId,
}

/// What a simulated core's inbox carries.
enum SimInbox {
    Down(DownMsg),
    Adopt(Moved, u64),
}

struct CoreNode {
    core: Core,
    inbox: Bounded<SimInbox>,
    turn: bool,
    stalled_until: u64,
    /// The connection of each session.
    conns: BTreeMap<Sid, u64>,
}

struct GatewayNode {
    alive: bool,
    draining: bool,
    inc: u64,
    cores: Vec<CoreNode>,
    uplink: Uplink,
    up_chan: Bounded<Vec<UpMsg>>,
    uplink_turn: bool,
    uplink_stalled_until: u64,
    /// The link to each router, once attempted.
    links: Vec<Option<u64>>,
    attempts: Vec<u32>,
}

struct Link {
    g: usize,
    r: usize,
    gw: GatewayId,
    router_q: Rc<RefCell<Bounded<ClusterMsg>>>,
    gw_q: Bounded<ClusterMsg>,
    router_open: bool,
    gateway_open: bool,
    /// In-flight messages are lost from here on.
    broken: bool,
    welcomed: bool,
    /// When the last message on each router → gateway stream arrives
    /// (0: control, then the delivery streams), and on gateway → router.
    down_at: Vec<u64>,
    up_at: u64,
    latency: u64,
    router_writer: bool,
    gateway_writer: bool,
    router_stalled_until: u64,
    gateway_stalled_until: u64,
}

struct Conn {
    client: usize,
    g: usize,
    g_inc: u64,
    core: usize,
    sid: Sid,
    /// Bytes the gateway wrote that the client has not read.
    to_client: Vec<u8>,
    /// The gateway found the buffer full at its last write.
    blocked: bool,
    /// The gateway shut its side down (or the socket is gone): the client
    /// sees the end once it read what is buffered.
    server_closed: bool,
    /// When the last client → gateway bytes arrive.
    up_at: u64,
    /// The client closed its side.
    client_closed: bool,
    /// The connection is moving between cores: what the client sends
    /// waits in the socket (here) until the new core reads it.
    in_transit: bool,
    held_in: Vec<u8>,
    held_eof: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillRouter,
    DrainRouter,
    KillGateway,
    DrainGateway,
    DropLink,
    StallCore,
    StallUplink,
    StallRouterWriter,
    StallGatewayWriter,
    SlowClient,
    ClientLeaves,
    ClientChurns,
    ClientQuits,
}

const FAULTS: [Fault; 13] = [
    Fault::KillRouter,
    Fault::DrainRouter,
    Fault::KillGateway,
    Fault::DrainGateway,
    Fault::DropLink,
    Fault::StallCore,
    Fault::StallUplink,
    Fault::StallRouterWriter,
    Fault::StallGatewayWriter,
    Fault::SlowClient,
    Fault::ClientLeaves,
    Fault::ClientChurns,
    Fault::ClientQuits,
];

#[derive(Debug)]
enum Ev {
    CoreTurn { g: usize, inc: u64, c: usize },
    CoreTick { g: usize, inc: u64, c: usize },
    UplinkTurn { g: usize, inc: u64 },
    UplinkTick { g: usize, inc: u64 },
    ShardTick { r: usize, inc: u64 },
    LinkAttempt { g: usize, inc: u64, r: usize },
    RouterWriter { link: u64 },
    GatewayWriter { link: u64 },
    ToRouter { link: u64, msgs: Vec<ClusterMsg> },
    ToGateway { link: u64, stream: usize, msgs: Vec<ClusterMsg> },
    LinkDownRouter { link: u64 },
    LinkDownGateway { link: u64 },
    ClientConnect { client: usize },
    ClientBytes { conn: u64, bytes: Vec<u8> },
    ClientEof { conn: u64 },
    ClientRead { client: usize },
    ClientRetry { client: usize },
    ClientChurn { client: usize },
    Publish,
    Fault(Fault),
    KillRouter { r: usize, inc: u64 },
    RestartRouter { r: usize },
    KillGateway { g: usize, inc: u64 },
    RestartGateway { g: usize },
    Settle,
}

/// The world.
pub struct World {
    /// The run's shape.
    pub spec: Spec,
    seed: u64,
    now: u64,
    base: Instant,
    rng: SmallRng,
    seq: u64,
    events: BTreeMap<(u64, u64), Ev>,
    routers: Vec<RouterNode>,
    gateways: Vec<GatewayNode>,
    links: BTreeMap<u64, Link>,
    next_link: u64,
    clients: Vec<Client>,
    client_conn: Vec<Option<u64>>,
    client_read: Vec<bool>,
    client_retry: Vec<bool>,
    read_every: Vec<u64>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    gateway_cfg: Arc<GatewayConfig>,
    verifier: Arc<Verifier>,
    namespaces: Arc<Namespaces>,
    router_metrics: Arc<RouterMetrics>,
    /// Every gateway incarnation's counters.
    gateway_metrics: Vec<Arc<GatewayMetrics>>,
    /// What was published.
    pub log: Log,
    next_seq: u64,
    settling: bool,
    /// Events run.
    pub steps: u64,
    /// Print what happens (`SIM_TRACE=1`).
    trace: bool,
}

impl World {
    /// Packed runs the gateways cut for subscribers answered inside them
    /// (every incarnation's `frames_cut`): the oracle checked what those
    /// subscribers got from the cut frames.
    pub fn runs_cut(&self) -> u64 {
        self.gateway_metrics.iter().map(|m| m.frames_cut.load(std::sync::atomic::Ordering::Relaxed)).sum()
    }
}

const MS: u64 = 1_000;
const SEC: u64 = 1_000_000;

/// Presence grace period of the simulated routers.
const GRACE: Duration = Duration::from_secs(2);

impl World {
    /// A world for `seed`, everything started.
    pub fn new(seed: u64) -> World {
        let spec = Spec::from_seed(seed);
        let mut namespaces = Namespaces::default();
        namespaces
            .namespaces
            .insert("small".to_owned(), NamespaceOptions { history_size: 2, ..NamespaceOptions::default() });
        let mut cfg =
            GatewayConfig { cores: spec.cores, namespaces: namespaces.clone(), ..GatewayConfig::default() };
        cfg.id = "sim".into();
        cfg.auth = AuthConfig { hmac_secret: HMAC_SECRET.into(), ..AuthConfig::default() };
        cfg.limits.max_queue_bytes = spec.max_queue_bytes;
        cfg.limits.ping_secs = 5;
        cfg.limits.pong_timeout_secs = 5;
        cfg.limits.connect_timeout_secs = 5;
        cfg.limits.handshake_timeout_secs = 5;
        cfg.limits.write_timeout_secs = 3;
        cfg.drain_secs = 2;
        let verifier = Arc::new(Verifier::new(&cfg.auth).expect("an HMAC secret"));
        let mut rng = SmallRng::seed_from_u64(seed);
        let channels: Vec<String> = (0..spec.channels)
            .map(|i| if i % 2 == 1 { format!("small:{i}") } else { format!("chat:{i}") })
            .collect();
        let clients = (0..spec.clients)
            .map(|i| {
                let user = format!("u{}", i % spec.users);
                let token = token(&user);
                let n = rng.random_range(1..=channels.len());
                let mut mine: Vec<String> = Vec::new();
                while mine.len() < n {
                    let c = pick(&mut rng, &channels).clone();
                    if !mine.contains(&c) {
                        mine.push(c);
                    }
                }
                Client::new(i, user, token, mine)
            })
            .collect();
        let mut w = World {
            seed,
            now: 0,
            base: Instant::now(),
            rng,
            seq: 0,
            events: BTreeMap::new(),
            routers: Vec::new(),
            gateways: Vec::new(),
            links: BTreeMap::new(),
            next_link: 1,
            clients,
            client_conn: vec![None; spec.clients],
            client_read: vec![false; spec.clients],
            client_retry: vec![false; spec.clients],
            read_every: vec![MS; spec.clients],
            conns: BTreeMap::new(),
            next_conn: 1,
            gateway_cfg: Arc::new(cfg),
            verifier,
            namespaces: Arc::new(namespaces),
            router_metrics: Arc::new(RouterMetrics::default()),
            gateway_metrics: Vec::new(),
            log: Log::default(),
            next_seq: 1,
            settling: false,
            steps: 0,
            trace: std::env::var_os("SIM_TRACE").is_some(),
            spec,
        };
        for r in 0..w.spec.routers {
            w.routers.push(RouterNode {
                name: format!("router-{r}"),
                alive: false,
                draining: false,
                inc: 0,
                shards: Vec::new(),
                next_gw: 1,
            });
            w.start_router(r);
        }
        for g in 0..w.spec.gateways {
            let node = w.new_gateway(0);
            w.gateways.push(node);
            w.start_gateway(g);
        }
        for c in 0..w.spec.clients {
            let at = w.rng.random_range(0..500 * MS);
            w.at(at, Ev::ClientConnect { client: c });
        }
        w.at(SEC, Ev::Publish);
        if w.spec.churn_secs > 0 {
            for c in 0..w.spec.clients {
                let at = w.rng.random_range(SEC..(w.spec.churn_secs + 1) * SEC);
                w.at(at, Ev::ClientChurn { client: c });
            }
        }
        for _ in 0..w.spec.faults {
            let at = w.rng.random_range(SEC..w.spec.active_secs * SEC);
            let f = *pick(&mut w.rng, &FAULTS);
            w.at(at, Ev::Fault(f));
        }
        let settle = w.spec.active_secs * SEC;
        w.at(settle, Ev::Settle);
        w
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_micros(self.now)
    }

    fn at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert((at.max(self.now), self.seq), ev);
    }

    fn after(&mut self, delay: u64, ev: Ev) {
        self.at(self.now + delay, ev);
    }

    /// Runs until the settling time ran out; the oracle's verdict.
    pub fn run(mut self) -> (Verdict, World) {
        let end = (self.spec.active_secs + self.spec.settle_secs) * SEC;
        while let Some(((t, _), ev)) = self.events.pop_first() {
            if t > end {
                break;
            }
            self.now = t;
            self.steps += 1;
            self.step(ev);
            self.pump();
        }
        let v = self.check();
        (v, self)
    }

    // ---- nodes ----

    fn start_router(&mut self, r: usize) {
        let seed: u64 = self.rng.random();
        let shards = self.spec.shards;
        let node = &mut self.routers[r];
        node.alive = true;
        node.draining = false;
        node.inc += 1;
        node.shards = (0..shards)
            .map(|i| {
                Shard::new(ShardSpec {
                    namespaces: self.namespaces.clone(),
                    max_recover: 300,
                    grace: GRACE,
                    metrics: self.router_metrics.clone(),
                    seed: seed ^ i as u64,
                    max_channels: 1_000_000,
                    now: self.base + Duration::from_micros(self.now),
                    fence: None,
                })
            })
            .collect();
        let inc = node.inc;
        self.after(250 * MS, Ev::ShardTick { r, inc });
    }

    fn new_gateway(&mut self, inc: u64) -> GatewayNode {
        let cores = self.spec.cores;
        let metrics = Arc::new(GatewayMetrics::new(cores));
        self.gateway_metrics.push(metrics.clone());
        let names = (0..self.spec.routers).map(|r| format!("router-{r}")).collect();
        let uplink =
            Uplink::with_bound(cores, names, metrics.clone(), self.rng.random(), self.spec.uplink_held);
        let cores = (0..cores)
            .map(|id| CoreNode {
                core: Core::new(CoreSpec {
                    id,
                    cores,
                    cfg: self.gateway_cfg.clone(),
                    verifier: self.verifier.clone(),
                    metrics: metrics.clone(),
                    seed: self.rng.random(),
                    now: self.instant(),
                    unix_now: 1_800_000_000 + self.now / SEC,
                    up_backlog: self.spec.up_backlog,
                    secret_seed: self.rng.random(),
                }),
                inbox: Bounded::new(self.spec.core_inbox),
                turn: false,
                stalled_until: 0,
                conns: BTreeMap::new(),
            })
            .collect();
        GatewayNode {
            alive: false,
            draining: false,
            inc,
            cores,
            uplink,
            up_chan: Bounded::new(self.spec.up_queue),
            uplink_turn: false,
            uplink_stalled_until: 0,
            links: vec![None; self.spec.routers],
            attempts: vec![0; self.spec.routers],
        }
    }

    fn start_gateway(&mut self, g: usize) {
        let inc = self.gateways[g].inc + 1;
        let mut node = self.new_gateway(inc);
        node.alive = true;
        self.gateways[g] = node;
        for c in 0..self.spec.cores {
            self.after(250 * MS, Ev::CoreTick { g, inc, c });
        }
        self.after(50 * MS, Ev::UplinkTick { g, inc });
        for r in 0..self.spec.routers {
            let d = self.rng.random_range(0..50 * MS);
            self.after(d, Ev::LinkAttempt { g, inc, r });
        }
    }

    fn owner_router(&self, key: &str) -> Option<usize> {
        (0..self.routers.len())
            .filter(|r| self.routers[*r].alive && !self.routers[*r].draining)
            .max_by_key(|r| score(&self.routers[*r].name, key))
    }

    // ---- events ----

    fn step(&mut self, ev: Ev) {
        if self.trace {
            match &ev {
                Ev::CoreTick { .. } | Ev::UplinkTick { .. } | Ev::ShardTick { .. } => {}
                Ev::ClientBytes { conn, bytes } => eprintln!(
                    "{:>10.3} conn {conn} client→gateway {}",
                    self.now as f64 / 1e6,
                    String::from_utf8_lossy(&unmask(bytes))
                ),
                other => eprintln!("{:>10.3} {other:?}", self.now as f64 / 1e6),
            }
        }
        match ev {
            Ev::CoreTurn { g, inc, c } => self.core_turn(g, inc, c),
            Ev::CoreTick { g, inc, c } => {
                if !self.gateway_is(g, inc) {
                    return;
                }
                let now = self.instant();
                self.gateways[g].cores[c].core.tick(now);
                self.after_core(g, c);
                self.after(250 * MS, Ev::CoreTick { g, inc, c });
            }
            Ev::UplinkTurn { g, inc } => self.uplink_turn(g, inc),
            Ev::UplinkTick { g, inc } => {
                if !self.gateway_is(g, inc) {
                    return;
                }
                self.with_uplink(g, |up, io| up.tick(io));
                self.after(50 * MS, Ev::UplinkTick { g, inc });
            }
            Ev::ShardTick { r, inc } => {
                if !self.router_is(r, inc) {
                    return;
                }
                let now = self.instant();
                for s in &mut self.routers[r].shards {
                    s.tick(now);
                }
                self.after(250 * MS, Ev::ShardTick { r, inc });
            }
            Ev::LinkAttempt { g, inc, r } => self.link_attempt(g, inc, r),
            Ev::RouterWriter { link } => self.router_writer(link),
            Ev::GatewayWriter { link } => self.gateway_writer(link),
            Ev::ToRouter { link, msgs } => self.arrive_at_router(link, msgs),
            Ev::ToGateway { link, stream, msgs } => self.arrive_at_gateway(link, stream, msgs),
            Ev::LinkDownRouter { link } => self.link_down_router(link),
            Ev::LinkDownGateway { link } => self.link_down_gateway(link),
            Ev::ClientConnect { client } => self.client_connect(client),
            Ev::ClientBytes { conn, bytes } => self.client_bytes(conn, bytes),
            Ev::ClientEof { conn } => self.client_eof(conn),
            Ev::ClientRead { client } => self.client_read(client),
            Ev::ClientRetry { client } => {
                self.client_retry[client] = false;
                let mut rng = SmallRng::seed_from_u64(self.rng.random());
                self.clients[client].retry(&mut rng);
                self.client_send(client);
            }
            Ev::ClientChurn { client } => {
                if self.settling {
                    return;
                }
                let mut rng = SmallRng::seed_from_u64(self.rng.random());
                match self.rng.random_range(0..3) {
                    0 => self.clients[client].leave(&mut rng),
                    1 => {
                        let k = self.rng.random_range(0..self.clients[client].subs.len());
                        self.clients[client].churn(k, &mut rng);
                    }
                    _ => {
                        // A burst of reconnects from this client's user: the
                        // others of its user leave too.
                        let user = self.clients[client].user.clone();
                        for c in 0..self.clients.len() {
                            if self.clients[c].user == user {
                                self.clients[c].leave(&mut rng);
                                self.client_send(c);
                            }
                        }
                    }
                }
                self.client_send(client);
                let d = self.rng.random_range(SEC..2 * self.spec.churn_secs * SEC);
                self.after(d, Ev::ClientChurn { client });
            }
            Ev::Publish => self.publish(),
            Ev::Fault(f) => self.fault(f),
            Ev::KillRouter { r, inc } => {
                if self.router_is(r, inc) {
                    self.kill_router(r);
                }
            }
            Ev::RestartRouter { r } => {
                if !self.routers[r].alive {
                    self.start_router(r);
                }
            }
            Ev::KillGateway { g, inc } => {
                if self.gateway_is(g, inc) {
                    self.kill_gateway(g);
                }
            }
            Ev::RestartGateway { g } => {
                if !self.gateways[g].alive {
                    self.start_gateway(g);
                }
            }
            Ev::Settle => self.settle(),
        }
    }

    fn gateway_is(&self, g: usize, inc: u64) -> bool {
        self.gateways[g].alive && self.gateways[g].inc == inc
    }

    fn router_is(&self, r: usize, inc: u64) -> bool {
        self.routers[r].alive && self.routers[r].inc == inc
    }

    /// Schedules what became runnable: core and uplink turns, link writers.
    fn pump(&mut self) {
        let mut evs = Vec::new();
        for (g, node) in self.gateways.iter_mut().enumerate() {
            if !node.alive {
                continue;
            }
            for (c, core) in node.cores.iter_mut().enumerate() {
                if !core.inbox.q.is_empty() && !core.turn {
                    core.turn = true;
                    let at = (self.now + self.rng.random_range(0..300)).max(core.stalled_until);
                    evs.push((at, Ev::CoreTurn { g, inc: node.inc, c }));
                }
            }
            if !node.up_chan.q.is_empty() && !node.uplink_turn {
                node.uplink_turn = true;
                let at = (self.now + self.rng.random_range(0..300)).max(node.uplink_stalled_until);
                evs.push((at, Ev::UplinkTurn { g, inc: node.inc }));
            }
        }
        for (id, l) in self.links.iter_mut() {
            if l.router_open && !l.router_writer && !l.router_q.borrow().q.is_empty() {
                l.router_writer = true;
                let at = (self.now + self.rng.random_range(0..500)).max(l.router_stalled_until);
                evs.push((at, Ev::RouterWriter { link: *id }));
            }
            if l.gateway_open && !l.gateway_writer && !l.gw_q.q.is_empty() {
                l.gateway_writer = true;
                let at = (self.now + self.rng.random_range(0..500)).max(l.gateway_stalled_until);
                evs.push((at, Ev::GatewayWriter { link: *id }));
            }
        }
        for (at, ev) in evs {
            self.at(at, ev);
        }
    }

    fn core_turn(&mut self, g: usize, inc: u64, c: usize) {
        if !self.gateway_is(g, inc) {
            return;
        }
        let now = self.instant();
        let node = &mut self.gateways[g].cores[c];
        node.turn = false;
        if node.stalled_until > self.now {
            return; // pump reschedules it after the stall
        }
        for _ in 0..64 {
            let Some(msg) = self.gateways[g].cores[c].inbox.q.pop_front() else { break };
            if self.trace {
                match &msg {
                    SimInbox::Down(m) => {
                        eprintln!("{:>10.3} gateway {g} core {c} ← {m:?}", self.now as f64 / 1e6)
                    }
                    SimInbox::Adopt(..) => {
                        eprintln!("{:>10.3} gateway {g} core {c} ← adopt", self.now as f64 / 1e6)
                    }
                }
            }
            match msg {
                SimInbox::Down(m) => self.gateways[g].cores[c].core.down(m, now),
                SimInbox::Adopt(moved, conn) => {
                    let sid = self.gateways[g].cores[c].core.adopt(moved, now);
                    let mut held = None;
                    if let Some(k) = self.conns.get_mut(&conn) {
                        k.core = c;
                        k.sid = sid;
                        k.in_transit = false;
                        held = Some((std::mem::take(&mut k.held_in), std::mem::take(&mut k.held_eof)));
                        self.gateways[g].cores[c].conns.insert(sid, conn);
                    } else {
                        // The client went away meanwhile.
                        self.gateways[g].cores[c].core.lost(sid, now);
                    }
                    if let Some((bytes, eof)) = held {
                        let core = &mut self.gateways[g].cores[c].core;
                        if !bytes.is_empty() {
                            core.read(sid, now, |b| {
                                b.extend_from_slice(&bytes);
                                Got::Data
                            });
                        }
                        if eof {
                            core.read(sid, now, |_| Got::Closed);
                        }
                    }
                }
            }
            self.after_core(g, c);
        }
    }

    /// The shell's work after an event on core `c` of gateway `g`: the
    /// machine's actions, the dirty sessions' writes, the uplink backlog.
    fn after_core(&mut self, g: usize, c: usize) {
        for _ in 0..16 {
            let actions: Vec<Action> = self.gateways[g].cores[c].core.effects().actions.drain(..).collect();
            for a in actions {
                self.action(g, c, a);
            }
            let dirty = std::mem::take(&mut self.gateways[g].cores[c].core.effects().dirty);
            for sid in &dirty {
                self.flush_session(g, c, *sid);
            }
            let node = &mut self.gateways[g];
            let up = &mut node.up_chan;
            node.cores[c].core.flush_up(|b| up.push(b));
            let fx = node.cores[c].core.effects();
            if fx.actions.is_empty() && fx.dirty.is_empty() {
                break;
            }
        }
    }

    fn action(&mut self, g: usize, c: usize, a: Action) {
        match a {
            // The simulated gateways have no proxy hooks configured, and
            // their clients speak WebSocket only (no emulation requests).
            Action::Watch { .. } | Action::Proxy(_) | Action::Emulate { .. } | Action::Emulated { .. } => {}
            Action::Shutdown { sid } | Action::Release { sid, .. } => {
                let release = matches!(a, Action::Release { .. });
                let conn = if release {
                    self.gateways[g].cores[c].conns.remove(&sid)
                } else {
                    self.gateways[g].cores[c].conns.get(&sid).copied()
                };
                if let Some(id) = conn
                    && let Some(k) = self.conns.get_mut(&id)
                {
                    k.server_closed = true;
                    let client = k.client;
                    self.wake_reader(client);
                }
            }
            Action::HandOver { sid, core, moved } => {
                let Some(conn) = self.gateways[g].cores[c].conns.remove(&sid) else { return };
                if let Some(k) = self.conns.get_mut(&conn) {
                    k.in_transit = true;
                }
                if self.gateways[g].cores[core].inbox.push(SimInbox::Adopt(moved, conn)).is_err()
                    && let Some(k) = self.conns.get_mut(&conn)
                {
                    // A full inbox drops the hand-over: the socket closes.
                    k.server_closed = true;
                    k.to_client.clear();
                    let client = k.client;
                    self.wake_reader(client);
                }
            }
        }
    }

    fn flush_session(&mut self, g: usize, c: usize, sid: Sid) {
        let now = self.instant();
        let conn = self.gateways[g].cores[c].conns.get(&sid).copied();
        let k = conn.and_then(|id| self.conns.get_mut(&id));
        let mut woke = None;
        let core = &mut self.gateways[g].cores[c].core;
        match k {
            None => {
                core.flush(sid, now, |_, _| (Err(std::io::ErrorKind::BrokenPipe.into()), Written::default()))
            }
            Some(k) => {
                let cap = self.spec.sock_buf;
                let before = k.to_client.len();
                core.flush(sid, now, |frames, _| {
                    let mut written = Written::default();
                    while let Some(f) = frames.front_mut() {
                        let room = cap.saturating_sub(k.to_client.len());
                        if room == 0 {
                            return (Ok(Flushed::Blocked), written);
                        }
                        let n = room.min(f.len());
                        k.to_client.extend_from_slice(&f[..n]);
                        written.bytes += n;
                        if n == f.len() {
                            frames.pop_front();
                            written.front_started = false;
                        } else {
                            bytes::Buf::advance(f, n);
                            written.front_started = true;
                        }
                    }
                    (Ok(Flushed::All), written)
                });
                k.blocked = core.session(sid).is_some_and(|s| s.blocked_since() != 0);
                if k.to_client.len() > before {
                    woke = Some(k.client);
                }
            }
        }
        if let Some(client) = woke {
            self.wake_reader(client);
        }
    }

    fn uplink_turn(&mut self, g: usize, inc: u64) {
        if !self.gateway_is(g, inc) {
            return;
        }
        self.gateways[g].uplink_turn = false;
        if self.gateways[g].uplink_stalled_until > self.now {
            return;
        }
        while self.gateways[g].uplink.takes_core_batches() {
            let Some(batch) = self.gateways[g].up_chan.q.pop_front() else { break };
            self.with_uplink(g, |up, io| up.core_batch(batch, io));
        }
    }

    fn with_uplink(&mut self, g: usize, f: impl FnOnce(&mut Uplink, &mut SimUplinkIo<'_>)) {
        let node = &mut self.gateways[g];
        let mut io = SimUplinkIo { cores: &mut node.cores, links: &mut self.links, ids: &node.links };
        f(&mut node.uplink, &mut io);
    }

    // ---- links ----

    fn link_attempt(&mut self, g: usize, inc: u64, r: usize) {
        if !self.gateway_is(g, inc) || self.gateways[g].links[r].is_some() {
            return;
        }
        if !self.routers[r].alive {
            let n = self.gateways[g].attempts[r];
            self.gateways[g].attempts[r] = n + 1;
            let ceiling = (100 * MS) << n.min(6);
            let d = self.rng.random_range(0..ceiling.min(5 * SEC));
            self.after(d + MS, Ev::LinkAttempt { g, inc, r });
            return;
        }
        self.gateways[g].attempts[r] = 0;
        let id = self.next_link;
        self.next_link += 1;
        let node = &mut self.routers[r];
        let gw = node.next_gw;
        node.next_gw += 1;
        let router_q = Rc::new(RefCell::new(Bounded::new(self.spec.router_queue)));
        let now = self.base + Duration::from_micros(self.now);
        for s in &mut node.shards {
            s.handle(
                ShardCmd::GatewayUp { gw, tx: RouterTx(router_q.clone()), version: PROTOCOL_VERSION },
                now,
            );
        }
        // The welcome goes first on the control stream, ahead of anything queued.
        router_q.borrow_mut().q.push_front(ClusterMsg::Welcome {
            version: PROTOCOL_VERSION,
            router_id: node.name.clone(),
            instance: node.inc,
        });
        if node.draining {
            router_q.borrow_mut().q.push_back(ClusterMsg::Drain);
        }
        let latency = self.rng.random_range(100..3 * MS);
        self.links.insert(
            id,
            Link {
                g,
                r,
                gw,
                router_q,
                gw_q: Bounded::new(self.spec.gateway_queue),
                router_open: true,
                gateway_open: true,
                broken: false,
                welcomed: false,
                down_at: vec![0; self.spec.streams + 1],
                up_at: 0,
                latency,
                router_writer: false,
                gateway_writer: false,
                router_stalled_until: 0,
                gateway_stalled_until: 0,
            },
        );
        self.gateways[g].links[r] = Some(id);
    }

    fn router_writer(&mut self, id: u64) {
        let now = self.now;
        let streams = self.spec.streams;
        let jitter = self.rng.random_range(0..2 * MS);
        let Some(l) = self.links.get_mut(&id) else { return };
        l.router_writer = false;
        if !l.router_open || l.router_stalled_until > now {
            return;
        }
        let msgs: Vec<ClusterMsg> = l.router_q.borrow_mut().q.drain(..).collect();
        let mut per: Vec<Vec<ClusterMsg>> = vec![Vec::new(); streams + 1];
        for m in msgs {
            let s = stream_of(&m, streams).map_or(0, |i| i + 1);
            per[s].push(m);
        }
        let mut evs = Vec::new();
        for (stream, msgs) in per.into_iter().enumerate() {
            if msgs.is_empty() {
                continue;
            }
            let at = l.down_at[stream].max(now + l.latency + jitter);
            l.down_at[stream] = at;
            evs.push((at, Ev::ToGateway { link: id, stream, msgs }));
        }
        for (at, ev) in evs {
            self.at(at, ev);
        }
    }

    fn gateway_writer(&mut self, id: u64) {
        let now = self.now;
        let jitter = self.rng.random_range(0..2 * MS);
        let Some(l) = self.links.get_mut(&id) else { return };
        l.gateway_writer = false;
        if !l.gateway_open || l.gateway_stalled_until > now {
            return;
        }
        let msgs: Vec<ClusterMsg> = l.gw_q.q.drain(..).collect();
        let at = l.up_at.max(now + l.latency + jitter);
        l.up_at = at;
        self.at(at, Ev::ToRouter { link: id, msgs });
    }

    fn arrive_at_router(&mut self, id: u64, msgs: Vec<ClusterMsg>) {
        let Some(l) = self.links.get(&id) else { return };
        if l.broken || !l.router_open {
            return;
        }
        let (r, gw) = (l.r, l.gw);
        let now = self.instant();
        let shards = self.routers[r].shards.len();
        for m in msgs {
            match dispatch::<RouterTx>(gw, m, shards, &self.namespaces) {
                Dispatch::Shards(cmds) => {
                    for (i, cmd) in cmds {
                        self.routers[r].shards[i].handle(cmd, now);
                    }
                }
                Dispatch::Heartbeat(_) | Dispatch::Nothing => {}
                Dispatch::Relay(m) => panic!("seed {}: a simulated gateway sent {}", self.seed, m.name()),
                Dispatch::Unexpected(name) => panic!("seed {}: a gateway sent {name}", self.seed),
            }
        }
        for s in &mut self.routers[r].shards {
            s.flush_lagging();
        }
    }

    fn arrive_at_gateway(&mut self, id: u64, stream: usize, msgs: Vec<ClusterMsg>) {
        let Some(l) = self.links.get_mut(&id) else { return };
        if l.broken || !l.gateway_open {
            return;
        }
        let (g, r) = (l.g, l.r);
        if stream == 0 {
            for m in msgs {
                if let ClusterMsg::Welcome { version, .. } = m {
                    if let Some(l) = self.links.get_mut(&id) {
                        l.welcomed = true;
                    }
                    self.with_uplink(g, |up, io| up.link_up(r, version, io));
                } else if self.links.get(&id).is_some_and(|l| l.welcomed) {
                    self.with_uplink(g, |up, io| up.control(r, m, io));
                }
            }
        } else if l.welcomed {
            self.with_uplink(g, |up, io| up.deliveries(r, msgs, io));
        }
    }

    /// A link breaks: each side notices at its own moment; what was in
    /// flight is lost.
    fn drop_link(&mut self, id: u64, router_after: u64, gateway_after: u64) {
        let Some(l) = self.links.get_mut(&id) else { return };
        l.broken = true;
        self.after(router_after, Ev::LinkDownRouter { link: id });
        self.after(gateway_after, Ev::LinkDownGateway { link: id });
    }

    fn link_down_router(&mut self, id: u64) {
        let Some(l) = self.links.get_mut(&id) else { return };
        if !l.router_open {
            return;
        }
        l.router_open = false;
        l.router_q.borrow_mut().q.clear();
        let (r, gw) = (l.r, l.gw);
        let now = self.instant();
        for s in &mut self.routers[r].shards {
            s.handle(ShardCmd::GatewayDown(gw), now);
        }
    }

    fn link_down_gateway(&mut self, id: u64) {
        let Some(l) = self.links.get_mut(&id) else { return };
        if !l.gateway_open {
            return;
        }
        l.gateway_open = false;
        l.gw_q.q.clear();
        let (g, r, welcomed) = (l.g, l.r, l.welcomed);
        if self.gateways[g].links[r] == Some(id) {
            self.gateways[g].links[r] = None;
            if welcomed {
                self.with_uplink(g, |up, io| up.link_down(r, io));
            }
            let inc = self.gateways[g].inc;
            let d = self.rng.random_range(100 * MS..2 * SEC);
            self.after(d, Ev::LinkAttempt { g, inc, r });
        }
        if !l_open_any(self.links.get(&id)) {
            self.links.remove(&id);
        }
    }

    // ---- clients ----

    fn client_connect(&mut self, client: usize) {
        if self.client_conn[client].is_some() || self.clients[client].quit {
            return;
        }
        let alive: Vec<usize> = (0..self.gateways.len())
            .filter(|g| self.gateways[*g].alive && !self.gateways[*g].draining)
            .collect();
        if alive.is_empty() {
            let d = self.rng.random_range(200 * MS..SEC);
            self.after(d, Ev::ClientConnect { client });
            return;
        }
        let g = *pick(&mut self.rng, &alive);
        let c = self.rng.random_range(0..self.spec.cores);
        let now = self.instant();
        let sid = self.gateways[g].cores[c].core.accept(now);
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                client,
                g,
                g_inc: self.gateways[g].inc,
                core: c,
                sid,
                to_client: Vec::new(),
                blocked: false,
                server_closed: false,
                up_at: 0,
                client_closed: false,
                in_transit: false,
                held_in: Vec::new(),
                held_eof: false,
            },
        );
        self.gateways[g].cores[c].conns.insert(sid, id);
        self.client_conn[client] = Some(id);
        let mut rng = SmallRng::seed_from_u64(self.rng.random());
        self.clients[client].start(&mut rng);
        self.after_core(g, c);
        self.client_send(client);
    }

    /// Sends what the client wrote, after the network's latency.
    fn client_send(&mut self, client: usize) {
        let bytes = std::mem::take(&mut self.clients[client].outbox);
        let closing = self.clients[client].phase == Phase::Closing;
        let Some(id) = self.client_conn[client] else { return };
        let now = self.now;
        let lat = self.rng.random_range(50..1_500);
        let Some(k) = self.conns.get_mut(&id) else { return };
        if k.client_closed {
            return;
        }
        let at = k.up_at.max(now + lat);
        k.up_at = at;
        let eof = closing && !k.client_closed;
        if eof {
            k.client_closed = true;
        }
        if !bytes.is_empty() {
            self.at(at, Ev::ClientBytes { conn: id, bytes });
        }
        if eof {
            self.at(at + 1, Ev::ClientEof { conn: id });
        }
        if self.clients[client].wants_retry() && !self.client_retry[client] {
            self.client_retry[client] = true;
            let d = self.rng.random_range(50 * MS..800 * MS);
            self.after(d, Ev::ClientRetry { client });
        }
    }

    fn conn_core(&self, id: u64) -> Option<(usize, usize, Sid)> {
        let k = self.conns.get(&id)?;
        (self.gateway_is(k.g, k.g_inc)).then_some((k.g, k.core, k.sid))
    }

    fn client_bytes(&mut self, id: u64, bytes: Vec<u8>) {
        if let Some(k) = self.conns.get_mut(&id)
            && k.in_transit
        {
            k.held_in.extend_from_slice(&bytes);
            return;
        }
        let Some((g, c, sid)) = self.conn_core(id) else { return };
        let now = self.instant();
        self.gateways[g].cores[c].core.read(sid, now, |b| {
            b.extend_from_slice(&bytes);
            Got::Data
        });
        self.after_core(g, c);
    }

    fn client_eof(&mut self, id: u64) {
        if let Some(k) = self.conns.get_mut(&id)
            && k.in_transit
        {
            k.held_eof = true;
            return;
        }
        let Some((g, c, sid)) = self.conn_core(id) else { return };
        let now = self.instant();
        self.gateways[g].cores[c].core.read(sid, now, |_| Got::Closed);
        self.after_core(g, c);
    }

    fn wake_reader(&mut self, client: usize) {
        if !self.client_read[client] {
            self.client_read[client] = true;
            let d = self.read_every[client];
            self.after(d, Ev::ClientRead { client });
        }
    }

    fn client_read(&mut self, client: usize) {
        self.client_read[client] = false;
        let Some(id) = self.client_conn[client] else { return };
        let Some(k) = self.conns.get_mut(&id) else { return };
        let chunk = if self.read_every[client] > MS { 256 } else { 1 << 20 };
        let n = chunk.min(k.to_client.len());
        let bytes: Vec<u8> = k.to_client.drain(..n).collect();
        let more = !k.to_client.is_empty();
        let ended = !more && k.server_closed;
        let blocked = k.blocked && n > 0;
        let (g, c, sid, g_inc) = (k.g, k.core, k.sid, k.g_inc);
        let mut rng = SmallRng::seed_from_u64(self.rng.random());
        if self.trace && !bytes.is_empty() {
            eprintln!(
                "{:>10.3} client {client} reads {}",
                self.now as f64 / 1e6,
                String::from_utf8_lossy(&bytes)
            );
        }
        let ok = bytes.is_empty() || self.clients[client].on_bytes(&bytes, &mut rng);
        self.client_send(client);
        if !ok || ended {
            self.close_client(client);
            return;
        }
        if blocked && self.gateway_is(g, g_inc) {
            // The socket has room again: the shell flushes it (EPOLLOUT).
            if let Some(k) = self.conns.get_mut(&id) {
                k.blocked = false;
            }
            self.flush_session(g, c, sid);
            self.after_core(g, c);
        }
        if more || self.conns.get(&id).is_some_and(|k| !k.to_client.is_empty()) {
            self.wake_reader(client);
        }
    }

    /// The client's connection is over: it reconnects after a backoff.
    fn close_client(&mut self, client: usize) {
        if let Some(id) = self.client_conn[client].take()
            && let Some(k) = self.conns.remove(&id)
            && self.gateway_is(k.g, k.g_inc)
            && !k.client_closed
            && !k.in_transit
        {
            // Its end of the socket closes too.
            let now = self.instant();
            self.gateways[k.g].cores[k.core].core.read(k.sid, now, |_| Got::Closed);
            self.after_core(k.g, k.core);
        }
        self.clients[client].closed();
        if self.clients[client].quit {
            return;
        }
        let f = self.clients[client].failures.min(5);
        let d = self.rng.random_range(100 * MS..(200 * MS) << f);
        self.after(d, Ev::ClientConnect { client });
    }

    // ---- the app backend ----

    fn publish(&mut self) {
        if !self.settling {
            let gap = self.rng.random_range(1..=2 * self.spec.publish_every_ms) * MS;
            self.after(gap, Ev::Publish);
        }
        let channels: Vec<String> = (0..self.spec.channels)
            .map(|i| if i % 2 == 1 { format!("small:{i}") } else { format!("chat:{i}") })
            .collect();
        let channel = pick(&mut self.rng, &channels).clone();
        let Some(r) = self.owner_router(&channel) else { return };
        let seq = self.next_seq;
        self.next_seq += 1;
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let shard = shard_of(&channel, self.routers[r].shards.len());
        let now = self.instant();
        let op = ApiOp::Publish {
            channel: channel.clone(),
            data: Bytes::from(format!("{{\"seq\":{seq}}}")),
            tags: None,
            idempotency_key: String::new(),
            reply: tx,
            at: now,
        };
        self.routers[r].shards[shard].handle(ShardCmd::Api(op), now);
        self.routers[r].shards[shard].flush_lagging();
        if let Ok(Ok((offset, epoch))) = rx.try_recv()
            && offset > 0
        {
            self.log.published(&channel, &epoch, offset, seq);
        }
    }

    // ---- faults ----

    fn fault(&mut self, f: Fault) {
        if self.settling {
            return;
        }
        let now = self.now;
        match f {
            Fault::KillRouter => {
                let r = self.rng.random_range(0..self.routers.len());
                if self.routers[r].alive {
                    self.kill_router(r);
                    let d = self.rng.random_range(SEC..6 * SEC);
                    self.after(d, Ev::RestartRouter { r });
                }
            }
            Fault::DrainRouter => {
                let r = self.rng.random_range(0..self.routers.len());
                if self.routers[r].alive && !self.routers[r].draining {
                    self.routers[r].draining = true;
                    for l in self.links.values() {
                        if l.r == r && l.router_open {
                            l.router_q.borrow_mut().q.push_back(ClusterMsg::Drain);
                        }
                    }
                    let inc = self.routers[r].inc;
                    let d = self.rng.random_range(SEC..3 * SEC);
                    self.after(d, Ev::KillRouter { r, inc });
                    let back = self.rng.random_range(4 * SEC..8 * SEC);
                    self.after(back, Ev::RestartRouter { r });
                }
            }
            Fault::KillGateway => {
                let g = self.rng.random_range(0..self.gateways.len());
                if self.gateways[g].alive {
                    self.kill_gateway(g);
                    let d = self.rng.random_range(SEC..5 * SEC);
                    self.after(d, Ev::RestartGateway { g });
                }
            }
            Fault::DrainGateway => {
                let g = self.rng.random_range(0..self.gateways.len());
                if self.gateways[g].alive && !self.gateways[g].draining {
                    self.gateways[g].draining = true;
                    let at = self.instant();
                    for c in 0..self.spec.cores {
                        self.gateways[g].cores[c].core.drain(at, Duration::from_secs(2));
                        self.after_core(g, c);
                    }
                    let inc = self.gateways[g].inc;
                    self.after(4 * SEC + 500 * MS, Ev::KillGateway { g, inc });
                    self.after(6 * SEC, Ev::RestartGateway { g });
                }
            }
            Fault::DropLink => {
                let ids: Vec<u64> = self.links.iter().filter(|(_, l)| !l.broken).map(|(id, _)| *id).collect();
                if !ids.is_empty() {
                    let id = *pick(&mut self.rng, &ids);
                    let (a, b) = (self.rng.random_range(0..3 * SEC), self.rng.random_range(0..3 * SEC));
                    self.drop_link(id, a, b);
                }
            }
            Fault::StallCore => {
                let g = self.rng.random_range(0..self.gateways.len());
                let c = self.rng.random_range(0..self.spec.cores);
                self.gateways[g].cores[c].stalled_until = now + self.rng.random_range(100 * MS..1_500 * MS);
            }
            Fault::StallUplink => {
                let g = self.rng.random_range(0..self.gateways.len());
                self.gateways[g].uplink_stalled_until = now + self.rng.random_range(100 * MS..1_500 * MS);
            }
            Fault::StallRouterWriter | Fault::StallGatewayWriter => {
                let ids: Vec<u64> = self.links.keys().copied().collect();
                if !ids.is_empty() {
                    let id = *pick(&mut self.rng, &ids);
                    let until = now + self.rng.random_range(100 * MS..1_500 * MS);
                    let l = self.links.get_mut(&id).expect("listed");
                    if f == Fault::StallRouterWriter {
                        l.router_stalled_until = until;
                    } else {
                        l.gateway_stalled_until = until;
                    }
                }
            }
            Fault::SlowClient => {
                let c = self.rng.random_range(0..self.clients.len());
                self.read_every[c] = self.rng.random_range(20 * MS..300 * MS);
            }
            Fault::ClientLeaves | Fault::ClientQuits => {
                let c = self.rng.random_range(0..self.clients.len());
                if f == Fault::ClientQuits {
                    self.clients[c].quit = true;
                }
                let mut rng = SmallRng::seed_from_u64(self.rng.random());
                self.clients[c].leave(&mut rng);
                self.client_send(c);
            }
            Fault::ClientChurns => {
                let c = self.rng.random_range(0..self.clients.len());
                let k = self.rng.random_range(0..self.clients[c].subs.len());
                let mut rng = SmallRng::seed_from_u64(self.rng.random());
                self.clients[c].churn(k, &mut rng);
                self.client_send(c);
            }
        }
    }

    fn kill_router(&mut self, r: usize) {
        let node = &mut self.routers[r];
        node.alive = false;
        node.draining = false;
        node.shards.clear();
        let ids: Vec<u64> = self.links.iter().filter(|(_, l)| l.r == r).map(|(id, _)| *id).collect();
        for id in ids {
            let l = self.links.get_mut(&id).expect("listed");
            l.router_open = false;
            l.broken = true;
            l.router_q.borrow_mut().q.clear();
            // A restarted router answers with a stateless reset, a dead one
            // with silence: the gateway notices soon or late.
            let d = self.rng.random_range(50 * MS..3 * SEC);
            self.after(d, Ev::LinkDownGateway { link: id });
        }
    }

    fn kill_gateway(&mut self, g: usize) {
        self.gateways[g].alive = false;
        let ids: Vec<u64> = self.conns.iter().filter(|(_, k)| k.g == g).map(|(id, _)| *id).collect();
        for id in ids {
            let k = self.conns.get_mut(&id).expect("listed");
            // A crash resets the sockets: unread bytes are gone too.
            k.to_client.clear();
            k.server_closed = true;
            let client = k.client;
            self.wake_reader(client);
        }
        let ids: Vec<u64> = self.links.iter().filter(|(_, l)| l.g == g).map(|(id, _)| *id).collect();
        for id in ids {
            let l = self.links.get_mut(&id).expect("listed");
            l.gateway_open = false;
            l.broken = true;
            // The router evicts a silent gateway after a while.
            let d = self.rng.random_range(100 * MS..5 * SEC);
            self.after(d, Ev::LinkDownRouter { link: id });
        }
    }

    /// The faults stop: everything comes back, clients behave.
    fn settle(&mut self) {
        self.settling = true;
        for r in 0..self.routers.len() {
            if !self.routers[r].alive {
                self.after(SEC, Ev::RestartRouter { r });
            }
        }
        for g in 0..self.gateways.len() {
            if !self.gateways[g].alive {
                self.after(SEC, Ev::RestartGateway { g });
            }
            for c in &mut self.gateways[g].cores {
                c.stalled_until = 0;
            }
            self.gateways[g].uplink_stalled_until = 0;
        }
        for l in self.links.values_mut() {
            l.router_stalled_until = 0;
            l.gateway_stalled_until = 0;
        }
        for c in 0..self.clients.len() {
            self.read_every[c] = MS;
        }
    }

    // ---- the end ----

    fn check(&self) -> Verdict {
        let mut v = Verdict::default();
        for (i, client) in self.clients.iter().enumerate() {
            for (k, sub) in client.subs.iter().enumerate() {
                let current = self.owner_router(&sub.channel).and_then(|r| {
                    let node = &self.routers[r];
                    node.shards[shard_of(&sub.channel, node.shards.len())].stream(&sub.channel)
                });
                oracle::check_stream(
                    &mut v,
                    i,
                    &sub.channel,
                    &sub.obs,
                    &client.final_state(k),
                    current,
                    &self.log,
                );
            }
        }
        let mut users: Vec<&str> = self.clients.iter().map(|c| c.user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        for user in users {
            let mut connected: Vec<String> = self
                .clients
                .iter()
                .filter(|c| c.user == user && c.phase == Phase::Connected)
                .filter_map(|c| c.client_id.clone())
                .collect();
            connected.sort();
            let key = self.namespaces.presence_channel(user);
            let (online, known) = match self.owner_router(&key) {
                Some(r) => {
                    let node = &self.routers[r];
                    let shard = &node.shards[shard_of(&key, node.shards.len())];
                    (shard.is_online(user), shard.user_clients(user))
                }
                None => (false, Vec::new()),
            };
            oracle::check_presence(&mut v, user, &connected, online, &known);
        }
        v
    }
}

fn l_open_any(l: Option<&Link>) -> bool {
    l.is_some_and(|l| l.router_open || l.gateway_open)
}

/// The uplink's IO in the world: core inboxes and the gateway ends of its
/// links.
struct SimUplinkIo<'a> {
    cores: &'a mut Vec<CoreNode>,
    links: &'a mut BTreeMap<u64, Link>,
    ids: &'a [Option<u64>],
}

impl UplinkIo for SimUplinkIo<'_> {
    fn to_router(&mut self, router: usize, msg: ClusterMsg) -> Result<(), ClusterMsg> {
        let Some(id) = self.ids.get(router).copied().flatten() else { return Err(msg) };
        match self.links.get_mut(&id) {
            Some(l) if l.gateway_open && l.welcomed => l.gw_q.push(msg),
            _ => Err(msg),
        }
    }

    fn to_core(&mut self, core: CoreId, msg: DownMsg) -> Result<(), DownMsg> {
        let Some(c) = self.cores.get_mut(core) else { return Err(msg) };
        c.inbox.push(SimInbox::Down(msg)).map_err(|m| match m {
            SimInbox::Down(m) => m,
            SimInbox::Adopt(..) => unreachable!("pushed a delivery"),
        })
    }
}

/// Client frames with their masks undone, for the trace.
fn unmask(bytes: &[u8]) -> Vec<u8> {
    let mut d = proto::ws::Decoder::new(proto::ws::DecoderConfig::server());
    let mut b = bytes::BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Ok(Some(m)) = d.decode(&mut b) {
        match m {
            proto::ws::Message::Text(t) => out.extend_from_slice(&t),
            other => out.extend_from_slice(format!("{other:?}").as_bytes()),
        }
        out.push(b' ');
    }
    if out.is_empty() { bytes.to_vec() } else { out }
}

fn token(user: &str) -> String {
    let claims = serde_json::json!({ "sub": user });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(HMAC_SECRET.as_bytes()),
    )
    .expect("HS256 signs")
}
