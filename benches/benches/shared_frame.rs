//! The cost of handing one `SharedFrame` to 1 vs 10,000 recipients.
//!
//! "Encode once" means each recipient's queue gets a clone of the same
//! `Bytes`: a reference-count increment, whatever the frame size. The
//! `copy_per_recipient` baseline is what a per-connection encoder (as in
//! tungstenite) pays. Run: `cargo bench -p benches --bench shared_frame`.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use proto::ws::SharedFrame;

fn fanout(c: &mut Criterion) {
    let payload = vec![b'x'; 1024];
    let frame = SharedFrame::text(&payload);
    let mut g = c.benchmark_group("shared_frame_fanout");
    for recipients in [1usize, 10_000] {
        g.throughput(Throughput::Elements(recipients as u64));
        let mut queues: Vec<Vec<Bytes>> = (0..recipients).map(|_| Vec::with_capacity(1)).collect();
        g.bench_with_input(BenchmarkId::new("shared_refcount", recipients), &recipients, |b, _| {
            b.iter(|| {
                for q in queues.iter_mut() {
                    q.push(frame.bytes().clone());
                }
                for q in queues.iter_mut() {
                    black_box(q.pop());
                }
            })
        });
        g.bench_with_input(BenchmarkId::new("copy_per_recipient", recipients), &recipients, |b, _| {
            b.iter(|| {
                for q in queues.iter_mut() {
                    q.push(Bytes::copy_from_slice(frame.bytes()));
                }
                for q in queues.iter_mut() {
                    black_box(q.pop());
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
