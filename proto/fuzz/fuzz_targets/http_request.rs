#![no_main]
//! Fuzz target: see `proto::fuzzing::http_request` for the invariants checked.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| proto::fuzzing::http_request(data));
