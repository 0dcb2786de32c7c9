//! Membership in etcd: a router's registration under a lease, and the view
//! of every registration that routers and gateways keep by watching the
//! prefix. What the view and the lease mean (ownership, fencing) is decided
//! in [`proto::membership`]; this module only talks to etcd.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use proto::backoff::Backoff;
use proto::membership::{LeaseClock, Member, View};
use tokio::sync::watch;

use crate::EtcdConfig;

/// A router's lease as it must assume it: `id` 0 means none (every channel
/// it held may have moved), and `deadline` is when it stops being certainly
/// alive ([`LeaseClock::live`]; the router's shards read it from their
/// `LeaseCell`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseStatus {
    /// Lease id (0: none held).
    pub id: i64,
    /// Until when the lease is certainly alive.
    pub deadline: Option<Instant>,
}

impl LeaseStatus {
    /// No lease.
    pub const NONE: LeaseStatus = LeaseStatus { id: 0, deadline: None };

    fn of(c: &LeaseClock) -> LeaseStatus {
        LeaseStatus { id: c.id(), deadline: c.deadline() }
    }
}

/// HTTP/2 keep-alive pings on the etcd connection: etcd refuses clients
/// that ping more often than its `--grpc-keepalive-min-time` (5 s by
/// default) with a GOAWAY, so not more often than that.
pub const PING_EVERY: Duration = Duration::from_secs(10);

async fn connect(cfg: &EtcdConfig) -> anyhow::Result<Client> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(cfg.request_timeout())
        .with_keep_alive(PING_EVERY, cfg.request_timeout());
    tokio::time::timeout(cfg.request_timeout(), Client::connect(&cfg.endpoints, Some(opts)))
        .await
        .context("connecting to etcd timed out")?
        .context("connecting to etcd")
}

async fn within<T, E: std::error::Error + Send + Sync + 'static>(
    cfg: &EtcdConfig,
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(cfg.request_timeout(), f)
        .await
        .with_context(|| format!("etcd {what} timed out"))?
        .with_context(|| format!("etcd {what}"))
}

/// Keeps `tx` at the newest view of the routers registered under the
/// prefix: a read of the whole prefix, then a watch from the revision after
/// it; a watch that fails or is cancelled (compaction) starts over with a
/// new read, after a backoff. With `confirm_every`, the prefix is also read
/// again on that interval (linearizably) and the view sent with
/// [`View::confirmed`] set to when that read was sent: the freshness a
/// router's fencing needs (a stuck watch cannot hide a newer registration
/// for longer than that). Runs until every receiver is gone.
pub async fn watch_views(cfg: EtcdConfig, tx: watch::Sender<Arc<View>>, confirm_every: Option<Duration>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    while !tx.is_closed() {
        if let Err(e) = watch_once(&cfg, &tx, &mut backoff, confirm_every).await {
            tracing::warn!(error = %format!("{e:#}"), "etcd watch failed; reading the view again");
        }
        let delay = backoff.next_delay(&mut rand::rng());
        tokio::time::sleep(delay).await;
    }
}

/// The view of the whole prefix now, confirmed as of when the read was sent.
async fn read_view(cfg: &EtcdConfig, client: &mut Client) -> anyhow::Result<View> {
    let sent = Instant::now();
    let resp =
        within(cfg, "get", client.get(cfg.prefix.as_str(), Some(GetOptions::new().with_prefix()))).await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut view = View::new(revision, []);
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        if let Err(e) = view.put(&key, kv.value(), revision) {
            tracing::warn!(%key, error = %e, "a malformed router registration is ignored");
        }
    }
    view.confirmed = Some(sent);
    Ok(view)
}

async fn watch_once(
    cfg: &EtcdConfig,
    tx: &watch::Sender<Arc<View>>,
    backoff: &mut Backoff,
    confirm_every: Option<Duration>,
) -> anyhow::Result<()> {
    let mut client = connect(cfg).await?;
    let mut view = read_view(cfg, &mut client).await?;
    tx.send_replace(Arc::new(view.clone()));
    backoff.reset();
    let opts = WatchOptions::new().with_prefix().with_start_revision(view.revision + 1);
    let mut stream = client.watch(cfg.prefix.as_str(), Some(opts)).await?;
    let mut confirm = tokio::time::interval(confirm_every.unwrap_or(Duration::from_secs(3600)));
    confirm.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    confirm.tick().await;
    loop {
        tokio::select! {
            resp = stream.message() => {
                let Some(resp) = resp? else { anyhow::bail!("the watch stream ended") };
                if resp.canceled() {
                    anyhow::bail!("watch cancelled: {}", resp.cancel_reason());
                }
                let before = view.revision;
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key());
                    match ev.event_type() {
                        EventType::Put => {
                            if let Err(e) = view.put(&key, kv.value(), kv.mod_revision()) {
                                tracing::warn!(%key, error = %e, "a malformed router registration is ignored");
                            }
                        }
                        EventType::Delete => view.delete(&key, kv.mod_revision()),
                    }
                }
                if view.revision != before {
                    view.confirmed = None;
                    tx.send_replace(Arc::new(view.clone()));
                }
            }
            _ = confirm.tick(), if confirm_every.is_some() => {
                // What etcd holds now replaces what the watch built: the
                // same routers (usually) with a fresh confirmation, or the
                // newer set a lagging watch had not told yet.
                let read = read_view(cfg, &mut client).await?;
                if read.revision >= view.revision {
                    view = read;
                    tx.send_replace(Arc::new(view.clone()));
                }
            }
        }
        if tx.is_closed() {
            return Ok(());
        }
    }
}

/// Registers `me` under `PREFIX + name` with a lease of `lease_ttl_secs`,
/// kept alive every TTL/3 ([`LeaseClock`] turns the answers into a
/// deadline), and reports every change of the lease through `on_lease`,
/// awaited before going on. When the lease is lost — etcd answers it is
/// gone, or it could not be kept alive until its deadline — `on_lease`
/// hears [`LeaseStatus::NONE`] **before** a new lease is granted and the
/// key put again: whoever acts on it (a router's shards drop the channels
/// they held) has done so before anyone can see this router in a view
/// again. When `stop` turns true the lease is revoked (the key goes at once)
/// and the function returns.
pub async fn register<F, Fut>(cfg: EtcdConfig, me: Member, mut on_lease: F, mut stop: watch::Receiver<bool>)
where
    F: FnMut(LeaseStatus) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut clock = LeaseClock::new(cfg.fence_margin());
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match session(&cfg, &me, &mut clock, &mut on_lease, &mut stop, &mut backoff).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), router = %me.name, "etcd registration interrupted")
            }
        }
        let delay = backoff.next_delay(&mut rand::rng());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut stop) => {
                if clock.id() != 0 {
                    clock.lost();
                    on_lease(LeaseStatus::NONE).await;
                }
                return;
            }
        }
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn session<F, Fut>(
    cfg: &EtcdConfig,
    me: &Member,
    clock: &mut LeaseClock,
    on_lease: &mut F,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Backoff,
) -> anyhow::Result<()>
where
    F: FnMut(LeaseStatus) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut client = connect(cfg).await?;
    let key = format!("{}{}", cfg.prefix, me.name);
    if clock.live(Instant::now()) {
        // Still certainly alive (a reconnect): put the key again under the
        // same lease (idempotent), in case an earlier put never landed.
        let value = serde_json::to_vec(me).expect("a member serializes");
        within(cfg, "put", client.put(key.as_str(), value, Some(PutOptions::new().with_lease(clock.id()))))
            .await?;
    } else {
        if clock.id() != 0 {
            // Not certainly alive any more: etcd may have expired it and
            // another router taken the channels over. Start again.
            tracing::warn!(router = %me.name, lease = clock.id(), "lease not kept alive in time; registering anew");
            clock.lost();
            on_lease(LeaseStatus::NONE).await;
        }
        let sent = Instant::now();
        let grant = within(cfg, "lease grant", client.lease_grant(cfg.ttl().as_secs() as i64, None)).await?;
        let value = serde_json::to_vec(me).expect("a member serializes");
        within(cfg, "put", client.put(key.as_str(), value, Some(PutOptions::new().with_lease(grant.id()))))
            .await?;
        // Only a lease whose key landed counts: after a failed put the clock
        // holds none, and the next session grants again.
        clock.answered(grant.id(), sent, grant.ttl());
        tracing::info!(router = %me.name, lease = grant.id(), ttl = grant.ttl(), %key, "registered in etcd");
        on_lease(LeaseStatus::of(clock)).await;
    }
    let id = clock.id();
    let (mut keeper, mut answers) = within(cfg, "lease keep-alive", client.lease_keep_alive(id)).await?;
    backoff.reset();
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut tick = tokio::time::interval(cfg.keep_alive_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if !clock.live(Instant::now()) {
                    anyhow::bail!("lease {id} not kept alive before its deadline");
                }
                // Answers come in order; more than a few outstanding means
                // etcd is not answering: reconnect.
                if sent.len() >= 3 {
                    anyhow::bail!("{} keep-alives of lease {id} unanswered", sent.len());
                }
                sent.push_back(Instant::now());
                keeper.keep_alive().await.context("sending a keep-alive")?;
            }
            answer = answers.message() => {
                let Some(answer) = answer.context("reading keep-alive answers")? else {
                    anyhow::bail!("the keep-alive stream ended");
                };
                let at = sent.pop_front().unwrap_or_else(Instant::now);
                if answer.ttl() <= 0 {
                    clock.lost();
                    on_lease(LeaseStatus::NONE).await;
                    anyhow::bail!("etcd says lease {id} is gone");
                }
                let before = clock.deadline();
                clock.answered(id, at, answer.ttl());
                if clock.deadline() != before {
                    on_lease(LeaseStatus::of(clock)).await;
                }
            }
            _ = stopped(stop) => {
                // Leaving: the key goes with the lease, so everyone moves
                // this router's channels at once instead of after the TTL.
                let revoked = within(cfg, "lease revoke", client.lease_revoke(id)).await;
                tracing::info!(router = %me.name, lease = id, ok = revoked.is_ok(), "left etcd");
                clock.lost();
                on_lease(LeaseStatus::NONE).await;
                return Ok(());
            }
        }
    }
}
