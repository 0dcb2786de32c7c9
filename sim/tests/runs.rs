//! A packed run of publications whose offsets straddle a subscriber's
//! answer: the real gateway core, a client that speaks real WebSocket
//! frames and the client protocol (the simulation's), the router's part
//! played by hand so the run lands exactly across the answer.
//!
//! The subscriber gets the publications after its answer, once each, in
//! order, from a frame cut for it; it is not sent back to resubscribe.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use gateway::auth::Verifier;
use gateway::bridge::{DownMsg, UpMsg};
use gateway::config::{AuthConfig, GatewayConfig};
use gateway::core::{Core, CoreSpec, Got};
use gateway::metrics::Metrics;
use gateway::session::outbound::{Flushed, Written};
use proto::client::reply::{Publication, pub_push};
use proto::cluster::ClusterMsg;
use proto::ws::SharedFrame;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use sim::client::Client;
use sim::oracle::Obs;

const SECRET: &str = "runs-test-secret-0123456789abcdef";
const CHANNEL: &str = "chat:runs";

/// One core, one client, the pipes between them.
struct Bench {
    core: Core,
    metrics: Arc<Metrics>,
    client: Client,
    sid: gateway::effects::Sid,
    rng: SmallRng,
    up: Vec<UpMsg>,
    /// Per flush, whether the core said the write side ends after it.
    ends: Vec<bool>,
}

impl Bench {
    fn new() -> Bench {
        Bench::with(|_| {})
    }

    /// A bench whose gateway config `tune` changed.
    fn with(tune: impl FnOnce(&mut GatewayConfig)) -> Bench {
        Bench::build(tune, 4096)
    }

    /// A bench whose core's uplink backlog holds `up_backlog` messages.
    fn build(tune: impl FnOnce(&mut GatewayConfig), up_backlog: usize) -> Bench {
        let mut cfg = GatewayConfig { cores: 1, ..GatewayConfig::default() };
        tune(&mut cfg);
        cfg.auth = AuthConfig { hmac_secret: SECRET.into(), ..AuthConfig::default() };
        let metrics = Arc::new(Metrics::new(1));
        let mut core = Core::new(CoreSpec {
            id: 0,
            cores: 1,
            verifier: Arc::new(Verifier::new(&cfg.auth).unwrap()),
            cfg: Arc::new(cfg),
            metrics: metrics.clone(),
            seed: 7,
            now: Instant::now(),
            unix_now: 1_800_000_000,
            up_backlog,
            secret_seed: [7; 32],
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({"sub": "u1"}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        let mut rng = SmallRng::seed_from_u64(7);
        let mut client = Client::new(0, "u1".into(), token, vec![CHANNEL.into()]);
        let sid = core.accept(Instant::now());
        client.start(&mut rng);
        let mut b = Bench { core, metrics, client, sid, rng, up: Vec::new(), ends: Vec::new() };
        b.pump();
        b
    }

    /// Moves bytes both ways until neither side has more to say.
    fn pump(&mut self) {
        for _ in 0..32 {
            let out = std::mem::take(&mut self.client.outbox);
            if !out.is_empty() {
                self.core.read(self.sid, Instant::now(), |b| {
                    b.extend_from_slice(&out);
                    Got::Data
                });
            }
            self.core.effects().actions.clear();
            let dirty = std::mem::take(&mut self.core.effects().dirty);
            let mut wire = Vec::new();
            for sid in dirty {
                let log = &mut self.ends;
                self.core.flush(sid, Instant::now(), |frames, ends| {
                    log.push(ends);
                    let mut written = Written::default();
                    while let Some(f) = frames.pop_front() {
                        wire.extend_from_slice(&f);
                        written.bytes += f.len();
                    }
                    (Ok(Flushed::All), written)
                });
            }
            let up = &mut self.up;
            self.core.flush_up(|batch| {
                up.extend(batch);
                Ok(())
            });
            if !wire.is_empty() {
                self.client.on_bytes(&wire, &mut self.rng);
            }
            if wire.is_empty() && self.client.outbox.is_empty() {
                return;
            }
        }
        panic!("the core and the client kept talking");
    }

    fn down(&mut self, msg: DownMsg) {
        self.core.down(msg, Instant::now());
        self.pump();
    }

    /// The subscription's request to a router, once the core made it; and
    /// whether the core registered its interest in the channel before it.
    fn request(&mut self) -> (u64, bool) {
        let mut interest_first = false;
        for m in &self.up {
            match m {
                UpMsg::Interest { channel, on: true, .. } if &**channel == CHANNEL => interest_first = true,
                UpMsg::Request(ClusterMsg::Recover { req, channel, .. }) if channel == CHANNEL => {
                    return (*req, interest_first);
                }
                _ => {}
            }
        }
        panic!("no subscription request among {:?}", self.up);
    }

    fn answer(&mut self, req: u64, top: u64) {
        let msg = ClusterMsg::Replay {
            req,
            epoch: "e1".into(),
            top,
            recovered: false,
            positioned: true,
            publications: Vec::new(),
        };
        self.down(DownMsg::Response(msg));
    }

    /// Publications `first..=last` in one packed frame, as the uplink makes it.
    fn run(&mut self, first: u64, last: u64) {
        let lines: Vec<Vec<u8>> = (first..=last)
            .map(|offset| {
                let data = Bytes::from(format!("{{\"seq\":{}}}", 1000 + offset));
                pub_push(CHANNEL, &Publication { offset, data, info: None, tags: None })
            })
            .collect();
        let frame = SharedFrame::text_lines(lines.iter().map(|l| l.as_slice())).into_bytes();
        self.down(DownMsg::Deliver {
            channel: Arc::from(CHANNEL),
            epoch: Arc::from("e1"),
            first,
            last,
            frame,
            at: Instant::now(),
        });
    }

    /// What the client saw on the channel after its subscribe reply.
    fn seen(&self) -> (Option<u64>, Vec<Obs>) {
        let obs = &self.client.subs[0].obs;
        let answered = obs.iter().position(|o| matches!(o, Obs::Subscribed { .. }));
        let offset = answered.and_then(|i| match &obs[i] {
            Obs::Subscribed { offset, .. } => Some(*offset),
            _ => None,
        });
        (offset, answered.map_or_else(Vec::new, |i| obs[i + 1..].to_vec()))
    }

    fn cut(&self) -> u64 {
        self.metrics.frames_cut.load(Ordering::Relaxed)
    }

    fn resynced(&self) -> u64 {
        self.metrics.subscriptions_resynced.load(Ordering::Relaxed)
    }
}

fn pubs(first: u64, last: u64) -> Vec<Obs> {
    (first..=last).map(|o| Obs::Pub(o, Some(1000 + o))).collect()
}

#[test]
fn a_run_across_the_answer_continues_a_subscriber_that_follows_the_channel() {
    let mut b = Bench::new();
    let (req, interest_first) = b.request();
    assert!(interest_first, "the interest goes to the router ahead of the request: {:?}", b.up);
    // Answered at 5; then 4..=7 arrive packed (they were on their way).
    b.answer(req, 5);
    b.run(4, 7);
    b.run(8, 8);
    assert_eq!(b.seen(), (Some(5), pubs(6, 8)));
    assert_eq!((b.cut(), b.resynced()), (1, 0));
}

#[test]
fn a_held_run_across_the_answer_is_cut_when_the_answer_comes() {
    let mut b = Bench::new();
    let (req, _) = b.request();
    // 4..=7 arrive while the subscription waits for its answer (held), then
    // the answer at 5.
    b.run(4, 7);
    b.answer(req, 5);
    b.run(8, 9);
    assert_eq!(b.seen(), (Some(5), pubs(6, 9)));
    assert_eq!((b.cut(), b.resynced()), (1, 0));
}

#[test]
fn a_hole_still_sends_the_subscriber_back() {
    // The power to fail: a run that leaves out 6 is a hole, and the
    // subscriber is told to resubscribe.
    let mut b = Bench::new();
    let (req, _) = b.request();
    b.answer(req, 5);
    b.run(7, 8);
    assert_eq!(b.seen(), (Some(5), vec![Obs::Resync]));
    assert_eq!((b.cut(), b.resynced()), (0, 1));
}

#[test]
fn a_subscriber_ahead_of_its_core_takes_the_cut_run_and_then_follows() {
    let mut b = Bench::new();
    let (req, _) = b.request();
    // The core's stream is at 3 when the answer says 5 (4 and 5 are on
    // their way): the subscriber keeps its own position until they come.
    b.run(1, 3);
    b.answer(req, 5);
    b.run(4, 7);
    b.run(8, 8);
    assert_eq!(b.seen(), (Some(5), pubs(6, 8)));
    assert_eq!((b.cut(), b.resynced()), (1, 0));
    let followers = b.core.channels().get(CHANNEL).map(|c| c.followers.len());
    assert_eq!(followers, Some(1), "caught up: it follows the channel's stream");
}

#[test]
fn a_subscribe_that_cannot_be_asked_registers_no_interest() {
    // No request may be in flight: the subscribe is refused (111), and the
    // router hears nothing of the channel either.
    let b = Bench::with(|cfg| cfg.limits.max_requests_in_flight = 0);
    let asked = |m: &UpMsg| match m {
        UpMsg::Interest { channel, .. } => &**channel == CHANNEL,
        UpMsg::Request(ClusterMsg::Recover { channel, .. }) => channel == CHANNEL,
        _ => false,
    };
    assert!(!b.up.iter().any(asked), "{:?}", b.up);
    assert!(b.core.channels().get(CHANNEL).is_none());
    assert!(
        b.client.subs[0].obs.iter().any(|o| matches!(o, Obs::Refused { code: 111, .. })),
        "{:?}",
        b.client.subs[0].obs
    );
}

#[test]
fn the_interest_may_take_the_backlogs_last_slot_and_the_request_still_goes() {
    // A backlog of 2: the connect's presence message takes one slot, the
    // subscribe's interest the other; the request found room before the
    // interest took it, and goes behind it.
    let mut b = Bench::build(|_| {}, 2);
    let (req, interest_first) = b.request();
    assert!(interest_first, "{:?}", b.up);
    b.answer(req, 5);
    b.run(6, 6);
    assert_eq!(b.seen(), (Some(5), pubs(6, 6)));
}

#[test]
fn only_the_flush_that_ends_the_write_side_may_hold_its_bytes_for_the_fin() {
    let mut b = Bench::new();
    let (req, _) = b.request();
    b.answer(req, 0);
    b.run(1, 2);
    assert_eq!(b.seen().1, pubs(1, 2));
    assert!(
        !b.ends.is_empty() && b.ends.iter().all(|e| !e),
        "a live session's bytes leave at once: {:?}",
        b.ends
    );
    b.ends.clear();
    b.client.leave(&mut b.rng);
    b.pump();
    // The close reply is the last thing the session writes, and the socket
    // is closed right after: its bytes may wait for the FIN.
    assert_eq!(b.ends, [true], "the close reply's flush ends the write side");
    assert_eq!(b.client.last_close, 1000);
}
