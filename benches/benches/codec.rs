//! Codec micro-benchmarks, each beside its baseline in the same group so the
//! ratio is read from one run:
//!
//! - `decode_unmask/{64,1024,65536}`: a masked client text frame arriving from
//!   a socket, through Switchyard's decoder (in place, as the gateway uses it,
//!   and owned) and through tungstenite's.
//! - `unmask/65536`: word-at-a-time unmask vs byte-at-a-time.
//! - `client_publish_decode`: a `publish` command through the typed decoder
//!   vs parsing it into a `serde_json::Value`.
//!
//! Run: `cargo bench -p benches --bench codec`.

use std::hint::black_box;
use std::io::{Read, Write};

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use proto::ws::{Decoded, Decoder, DecoderConfig, Message, MessageRef, OpCode, encode_frame, mask};

/// A socket that yields the same bytes forever and swallows writes.
struct Replay {
    data: Vec<u8>,
    pos: usize,
}

impl Read for Replay {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < out.len() {
            let take = (self.data.len() - self.pos).min(out.len() - n);
            out[n..n + take].copy_from_slice(&self.data[self.pos..self.pos + take]);
            n += take;
            self.pos = (self.pos + take) % self.data.len();
        }
        Ok(n)
    }
}

impl Write for Replay {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn text_payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789 "[i % 37]).collect()
}

fn decode_unmask(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_unmask");
    for size in [64usize, 1024, 65536] {
        let mut frame = Vec::new();
        encode_frame(&mut frame, true, OpCode::Text, &text_payload(size), Some([1, 2, 3, 4]));
        g.throughput(Throughput::Bytes(size as u64));

        let cfg = DecoderConfig { max_frame: 1 << 20, max_message: 1 << 20, ..DecoderConfig::server() };
        // The gateway's path: read into the scratch buffer, decode in place.
        g.bench_with_input(BenchmarkId::new("switchyard", size), &frame, |b, frame| {
            let mut d = Decoder::new(cfg);
            let mut buf = BytesMut::with_capacity(frame.len() * 2);
            b.iter(|| {
                buf.clear();
                buf.extend_from_slice(frame);
                match d.decode_in_place(&mut buf, None).unwrap() {
                    Some(Decoded::InPlace { message: MessageRef::Text(t), consumed }) => {
                        black_box(t);
                        consumed
                    }
                    other => panic!("{other:?}"),
                }
            })
        });
        // The owned path (a `Bytes` split off the read buffer).
        g.bench_with_input(BenchmarkId::new("switchyard_owned", size), &frame, |b, frame| {
            let mut d = Decoder::new(cfg);
            let mut buf = BytesMut::with_capacity(frame.len() * 2);
            b.iter(|| {
                // What a socket read does: bytes land in the read buffer.
                buf.extend_from_slice(frame);
                match d.decode(&mut buf).unwrap() {
                    Some(Message::Text(t)) => black_box(t),
                    other => panic!("{other:?}"),
                }
            })
        });

        g.bench_with_input(BenchmarkId::new("tungstenite", size), &frame, |b, frame| {
            let cfg = tungstenite::protocol::WebSocketConfig::default()
                .max_message_size(Some(1 << 20))
                .max_frame_size(Some(1 << 20));
            let stream = Replay { data: frame.clone(), pos: 0 };
            let mut ws = tungstenite::WebSocket::from_raw_socket(
                stream,
                tungstenite::protocol::Role::Server,
                Some(cfg),
            );
            b.iter(|| match ws.read().unwrap() {
                tungstenite::Message::Text(t) => black_box(t),
                other => panic!("{other:?}"),
            })
        });
    }
    g.finish();
}

fn unmask(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmask");
    let size = 65536;
    g.throughput(Throughput::Bytes(size as u64));
    let mut data = text_payload(size);
    g.bench_function("word_at_a_time", |b| {
        b.iter(|| mask::apply_mask(black_box(&mut data), [1, 2, 3, 4], 0))
    });
    g.bench_function("bytewise", |b| {
        b.iter(|| mask::apply_mask_bytewise(black_box(&mut data), [1, 2, 3, 4], 0))
    });
    g.finish();
}

fn client_publish_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("client_publish_decode");
    let cmd = br#"{"id":42,"publish":{"channel":"chat:general","data":{"text":"hello everyone, the build is green","ts":1732300000000,"thread":null}}}"#;
    g.throughput(Throughput::Elements(1));
    g.bench_function("switchyard_typed", |b| {
        b.iter(|| black_box(proto::client::decode_command(black_box(cmd)).unwrap()))
    });
    g.bench_function("serde_json_value", |b| {
        b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(black_box(cmd)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, decode_unmask, unmask, client_publish_decode);
criterion_main!(benches);
