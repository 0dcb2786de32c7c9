#![no_main]
//! Fuzz target: see `proto::fuzzing::frame_decoder` for the invariants checked.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| proto::fuzzing::frame_decoder(data));
