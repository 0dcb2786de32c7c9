//! The router's side of etcd membership (`[etcd]` in the config, cargo
//! feature `etcd`): it registers this router under a lease it keeps alive,
//! watches the view of every registered router, and tells the shards and
//! the peers. The rule it all serves is in `proto::membership`: a router
//! acknowledges a publication only for a channel it owns in its newest view
//! while its lease is certainly alive, so two routers never both assign
//! offsets to one channel, and a channel that comes back starts a new epoch.
//!
//! Timing (defaults): lease TTL 5 s, a keep-alive every TTL/3 (1.67 s), and
//! a router assumes its lease ends TTL − max(TTL/5, 0.5 s) after the
//! keep-alive that etcd last answered was **sent** (4 s). A router that
//! stops (crash, SIGSTOP, cut off from etcd) loses its key 5–6.7 s after
//! its last keep-alive, and its channels move to their next owner then,
//! with a new epoch there; it refused publications from 4 s on. When it
//! comes back it drops every channel it held before it registers again.

use std::sync::Arc;

use crate::server::Router;
use crate::shard::ShardCmd;

/// Starts registering this router and watching the membership view; both
/// run until the router drains, when its lease is revoked (its key goes at
/// once and everyone moves its channels without waiting for the TTL).
pub fn spawn(router: &Arc<Router>) {
    let cfg = router.config().etcd.clone();
    let Some(views) = router.peers().view_sender().cloned() else { return };
    let mut rx = views.subscribe();
    let r = router.clone();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let view = rx.borrow_and_update().clone();
            tracing::info!(
                revision = view.revision,
                routers = view.len(),
                registered = view.contains(&r.config().name),
                "membership view"
            );
            for s in r.shards() {
                let _ = s.send(ShardCmd::View(view.clone())).await;
            }
        }
    });
    // Confirmed by a linearizable read three times per freshness window.
    tokio::spawn(discovery::etcd::watch_views(cfg.clone(), views, Some(cfg.ttl() / 3)));
    let r = router.clone();
    let on_lease = move |status: discovery::etcd::LeaseStatus| {
        let r = r.clone();
        async move {
            // The shards read the lease where it is written: a keep-alive
            // never waits on a busy shard's queue.
            r.lease().set(status.id, status.deadline);
            if status.id == 0 {
                // Into every shard's queue before `register` goes on: the
                // reset of a lost lease comes before anything that follows
                // a new one.
                for s in r.shards() {
                    let _ = s.send(ShardCmd::LeaseLost).await;
                }
            }
        }
    };
    tokio::spawn(discovery::etcd::register(cfg, router.config().member(), on_lease, router.leave_signal()));
}
