//! An edge POP across a WAN: the gateway's link to the router runs through
//! a UDP relay with 40 ms ± 10 ms one way, 1 % loss each way and
//! reordering within the jitter (`e2e::wan`). At 1,000 publications/s every
//! subscriber receives every publication once and in order; a 5-second
//! blackhole of the link ends with every subscriber holding every
//! publication, live or recovered (`recovered: true`), none forgiven. The
//! gateway asks for datagram copies of the deliveries, so both paths (copy
//! first, stream first) are exercised. (The
//! latency over the WAN is a benchmark: `benches/scripts/wan_bench.py`.)

use std::time::{Duration, Instant};

use e2e::wan::{Relay, WanSpec};
use e2e::{ApiConn, Cluster, Published, StreamCheck, Ws, router_name};
use serde_json::json;

const CHANNELS: usize = 10;

fn subscribers(c: &Cluster, n: usize) -> Vec<(Ws, Vec<StreamCheck>)> {
    (0..n)
        .map(|k| {
            let mut ws = c.client(0, &format!("pop-{k}"));
            let streams =
                (0..CHANNELS).map(|i| StreamCheck::subscribe(&mut ws, &format!("chat:wan-{i}"))).collect();
            (ws, streams)
        })
        .collect()
}

/// Every subscriber reads to the top of every channel (resubscribing with
/// recovery when told to), and holds exactly what was published.
fn drain(subs: &mut [(Ws, Vec<StreamCheck>)], log: &Published) -> (u32, u32) {
    let (mut resyncs, mut recoveries) = (0, 0);
    for (ws, streams) in subs.iter_mut() {
        for st in streams.iter_mut() {
            let top = log.top(&st.channel, &st.epoch);
            resyncs += st.receive_through_resyncing(ws, top);
            st.verify(log);
            assert_eq!(
                st.unrecovered, 0,
                "{}: a recovery was refused: nothing may be forgiven here",
                st.channel
            );
            recoveries = recoveries.max(st.recoveries);
        }
    }
    (resyncs, recoveries)
}

#[test]
fn an_edge_pop_over_a_lossy_wan_delivers_everything_in_order_and_rides_out_a_blackhole() {
    let mut c = Cluster::start(1, 0, &[]);
    let relay = Relay::start("127.0.0.1:0".parse().unwrap(), c.router_addrs[0], WanSpec::edge_pop(7));
    // With datagram copies of the deliveries (the WAN's fast path): order and
    // once-only must hold whichever copy comes first.
    c.add_gateway_routed(0, &[format!("{}@{}", router_name(0), relay.addr())], &["--datagram-copies"]);
    let mut subs = subscribers(&c, 3);
    let mut api = ApiConn::connect(c.api_addrs[0]);
    let mut log = Published::default();

    // 1,000 publications/s for 3 s, paced in 10 ms steps.
    let start = Instant::now();
    for step in 0..300u64 {
        for k in 0..10u64 {
            let i = step * 10 + k;
            api.publish(&mut log, &format!("chat:wan-{}", i as usize % CHANNELS), json!({"i": i}));
        }
        let due = start + Duration::from_millis(10 * (step + 1));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    let (resyncs, _) = drain(&mut subs, &log);
    let lost = relay.counts().lost.load(std::sync::atomic::Ordering::Relaxed);
    assert!(lost > 0, "the WAN lost datagrams ({lost}); QUIC retransmitted them");
    let m = c.metrics(0);
    let fast = e2e::metric(&m, "switchyard_gateway_datagram_deliveries_total");
    let dup = e2e::metric(&m, "switchyard_gateway_duplicate_copies_total");
    assert!(
        fast > 0 && dup > 0,
        "datagram copies came first ({fast}) and their stream copies were skipped ({dup})"
    );
    eprintln!("3,000 publications over the WAN: {lost} datagrams lost on the way, {resyncs} resyncs");

    // A 5-second blackhole while publications go on.
    relay.blackhole(true);
    let cut = Instant::now();
    let mut i = 3000u64;
    while cut.elapsed() < Duration::from_secs(5) {
        api.publish(&mut log, &format!("chat:wan-{}", i as usize % CHANNELS), json!({"i": i}));
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    relay.blackhole(false);
    for _ in 0..100 {
        api.publish(&mut log, &format!("chat:wan-{}", i as usize % CHANNELS), json!({"i": i}));
        i += 1;
    }
    let (resyncs, recoveries) = drain(&mut subs, &log);
    let blackholed = relay.counts().blackholed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(blackholed > 0);
    eprintln!(
        "after a 5 s blackhole ({blackholed} datagrams dropped): {} publications, {resyncs} resyncs, \
         {recoveries} recoveries (recovered: true) per stream at most, none forgiven",
        i
    );
}
