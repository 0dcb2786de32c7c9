//! The admin port: `/metrics` (Prometheus text), `/healthz` (alive), `/readyz`
//! (200 once a router link is up and while not draining, else 503).
//!
//! Off the hot path, on its own thread (a tokio runtime), and non-blocking:
//! each connection is its own task with a deadline to send its request
//! head ([`READ_DEADLINE`], at most [`MAX_HEAD`] bytes) and one to take the
//! answer ([`WRITE_DEADLINE`]); at most [`MAX_CONNECTIONS`] are served at
//! once, and one more is closed at once. So a slow or silent client (or a
//! hundred) never stalls a load balancer's `/readyz`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::metrics::Metrics;
use crate::shell::Lifecycle;

/// Time a client has to send its request head.
pub const READ_DEADLINE: Duration = Duration::from_secs(2);

/// Time a client has to take the answer.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(2);

/// Largest request head read.
pub const MAX_HEAD: usize = 4096;

/// Connections served at once; more are closed on arrival.
pub const MAX_CONNECTIONS: usize = 1024;

/// Serves the admin endpoints on `listener` until the process exits.
pub fn spawn(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    life: Arc<Lifecycle>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("admin runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("admin listener");
            let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(_) => {
                        // Out of descriptors (EMFILE) and friends: no busy loop.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
                let (metrics, life) = (metrics.clone(), life.clone());
                tokio::spawn(async move {
                    serve(stream, &metrics, &life).await;
                    drop(permit);
                });
            }
        });
    })?;
    Ok(())
}

async fn serve(mut s: tokio::net::TcpStream, metrics: &Metrics, life: &Lifecycle) {
    let mut buf = Vec::with_capacity(512);
    let head = async {
        let mut chunk = [0u8; 1024];
        while buf.len() < MAX_HEAD && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    };
    if !matches!(tokio::time::timeout(READ_DEADLINE, head).await, Ok(true)) {
        return;
    }
    let req = String::from_utf8_lossy(&buf);
    let path = req.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = answer(path, metrics, life);
    let out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(WRITE_DEADLINE, async {
        let _ = s.write_all(out.as_bytes()).await;
        let _ = s.shutdown().await;
    })
    .await;
}

fn answer(path: &str, metrics: &Metrics, life: &Lifecycle) -> (&'static str, String) {
    match path {
        "/metrics" => ("200 OK", metrics.render()),
        "/healthz" => ("200 OK", "ok\n".to_owned()),
        "/readyz" if life.drain.load(Ordering::Relaxed) => {
            ("503 Service Unavailable", "draining\n".to_owned())
        }
        "/readyz" if metrics.routers_up.load(Ordering::Relaxed) == 0 => {
            ("503 Service Unavailable", "no router link\n".to_owned())
        }
        "/readyz" => {
            // Routers of the membership this gateway is not linked to: with
            // etcd their channels have no router here.
            let unlinked = metrics.unlinked_routers.lock().expect("not poisoned").join(", ");
            if unlinked.is_empty() {
                ("200 OK", "ready\n".to_owned())
            } else {
                (
                    "503 Service Unavailable",
                    format!("no link to routers {unlinked}: their channels have no router here\n"),
                )
            }
        }
        _ => ("404 Not Found", "not found\n".to_owned()),
    }
}
