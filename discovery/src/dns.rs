//! Routers from DNS: a `host:port` re-resolved on an interval (A and AAAA
//! records through the system resolver). A Kubernetes headless Service
//! answers with the addresses of its ready pods, so routers that come and
//! go appear and disappear here within one interval.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;

/// Resolves `target` (`host:port`) now and every `every`, and keeps `tx`
/// at the sorted, deduplicated addresses whenever they change. A lookup
/// that fails keeps the last answer (a resolver hiccup must not empty the
/// cluster). Runs until every receiver is gone.
pub async fn watch_addresses(target: String, every: Duration, tx: watch::Sender<Vec<SocketAddr>>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match resolve(&target).await {
            Ok(addrs) => {
                tx.send_if_modified(|cur| {
                    if *cur == addrs {
                        return false;
                    }
                    tracing::info!(%target, ?addrs, "routers resolved");
                    *cur = addrs;
                    true
                });
            }
            Err(e) => {
                tracing::warn!(%target, error = %e, "resolving the routers failed; keeping the last answer")
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// The addresses `target` resolves to now, sorted and deduplicated.
pub async fn resolve(target: &str) -> std::io::Result<Vec<SocketAddr>> {
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(target).await?.collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn localhost_resolves_and_changes_are_published() {
        let addrs = resolve("127.0.0.1:7100").await.unwrap();
        assert_eq!(addrs, vec!["127.0.0.1:7100".parse().unwrap()]);
        let (tx, mut rx) = watch::channel(Vec::new());
        let task = tokio::spawn(watch_addresses("localhost:7100".into(), Duration::from_millis(50), tx));
        rx.changed().await.unwrap();
        assert!(rx.borrow().iter().all(|a| a.port() == 7100 && a.ip().is_loopback()), "{:?}", rx.borrow());
        task.abort();
        assert!(resolve("no-such-host.invalid:1").await.is_err());
    }
}
