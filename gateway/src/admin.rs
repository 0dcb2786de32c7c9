//! The admin port: `/metrics` (Prometheus text), `/healthz` (alive), `/readyz`
//! (200 once a router link is up and while not draining, else 503).
//! A plain blocking thread: it is off the hot path and serves operators.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::cores::Lifecycle;
use crate::metrics::Metrics;

/// Serves the admin endpoints on `listener` until the process exits.
pub fn spawn(listener: TcpListener, metrics: Arc<Metrics>, life: Arc<Lifecycle>) -> std::io::Result<()> {
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            // Read the request head (bounded: 4 KiB, 2 s).
            let mut buf = Vec::with_capacity(512);
            let mut chunk = [0u8; 1024];
            while buf.len() < 4096 && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let req = String::from_utf8_lossy(&buf);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => ("200 OK", metrics.render()),
                "/healthz" => ("200 OK", "ok\n".to_owned()),
                "/readyz" if life.drain.load(Ordering::Relaxed) => ("503 Service Unavailable", "draining\n".to_owned()),
                "/readyz" if metrics.routers_up.load(Ordering::Relaxed) == 0 => {
                    ("503 Service Unavailable", "no router link\n".to_owned())
                }
                "/readyz" => ("200 OK", "ready\n".to_owned()),
                _ => ("404 Not Found", "not found\n".to_owned()),
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(())
}
