//! Replays every seed in `proto/fuzz/corpus/<target>/` (and any findings saved
//! in `proto/fuzz/artifacts/<target>/`) through the same entry point the
//! fuzz target uses, so `cargo test` guards what the fuzzers found.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in [root.join("corpus").join(target), root.join("artifacts").join(target)] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries {
            let path = e.unwrap().path();
            if path.is_file() {
                f(&std::fs::read(&path).unwrap());
                n += 1;
            }
        }
    }
    assert!(n > 0, "no seeds for {target}");
}

#[test]
fn handshake_corpus() {
    replay("handshake", proto::fuzzing::handshake);
}

#[test]
fn frame_decoder_corpus() {
    replay("frame_decoder", proto::fuzzing::frame_decoder);
}

#[test]
fn client_decoder_corpus() {
    replay("client_decoder", proto::fuzzing::client_decoder);
}

#[test]
fn cluster_decoder_corpus() {
    replay("cluster_decoder", proto::fuzzing::cluster_decoder);
}

#[test]
fn http_request_corpus() {
    replay("http_request", proto::fuzzing::http_request);
}
