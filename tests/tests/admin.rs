//! The admin port is not stalled by slow clients: with 100 connections that
//! send half a request head and then nothing, `/readyz` and `/metrics`
//! still answer (the blocking server this replaced served one connection at
//! a time, each up to its 2 s read timeout: the 101st waited minutes).

use std::io::Write;
use std::net::TcpStream;

use e2e::{Cluster, http_get};

#[test]
fn slow_admin_clients_do_not_stall_readyz() {
    let c = Cluster::start(1, 1, &[]);
    let admin = c.admin_addrs[0];
    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(admin).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap();
        slow.push(s);
    }
    // Each answer is read with the harness's read timeout: it must come
    // while all 100 slow clients still hold their connections.
    for _ in 0..5 {
        assert_eq!(http_get(admin, "/readyz"), "ready\n");
        let m = http_get(admin, "/metrics");
        assert!(m.contains("switchyard_gateway_connections"), "{m}");
    }
    drop(slow);
}
