//! Entry points shared by the fuzz targets in `proto/fuzz/` and the test that
//! replays their seed corpora under `cargo test`. Each feeds arbitrary bytes
//! to one parser and checks the invariants that must hold for any input.

use bytes::BytesMut;

use crate::client;
use crate::cluster::{ClusterDecoder, ClusterMsg};
use crate::ws::deflate::Inflater;
use crate::ws::handshake::{self, HandshakeLimits};
use crate::ws::{Decoder, DecoderConfig, Role};

/// The upgrade parser: never panics; a success consumed no more than it had
/// and the same request parses identically when fed in two pieces.
pub fn handshake(data: &[u8]) {
    let limits = HandshakeLimits::default();
    let whole = handshake::parse_request(data, &limits);
    if let Ok(Some((req, consumed))) = &whole {
        assert!(*consumed <= data.len());
        let again = handshake::parse_request(&data[..*consumed], &limits);
        assert_eq!(again.ok().flatten().map(|(r, _)| r), Some(req.clone()));
        let _ = handshake::switching_protocols(&req.key, None, req.negotiate_deflate().as_ref());
    }
    if let Err(e) = &whole {
        assert!(matches!(e.status(), 400 | 405 | 426 | 431));
    }
}

/// The frame decoder, as server and as client, in one piece and byte by
/// byte: never panics, and both feedings agree on every message and error.
pub fn frame_decoder(data: &[u8]) {
    for role in [Role::Server, Role::Client] {
        let cfg = DecoderConfig {
            role,
            max_frame: 4096,
            max_message: 8192,
            deflate: data.first().is_some_and(|b| b & 1 == 1),
        };
        let whole = run(cfg, data, data.len().max(1));
        let bytewise = run(cfg, data, 1);
        assert_eq!(whole, bytewise);
        assert_eq!(run_in_place(cfg, data), whole, "in-place decoding disagrees");
    }
}

fn run(cfg: DecoderConfig, data: &[u8], chunk: usize) -> (Vec<crate::ws::Message>, Option<u16>) {
    let mut d = Decoder::new(cfg);
    let mut inflater = Inflater::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match d.decode_with(&mut buf, Some(&mut inflater)) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => return (out, Some(e.close_code())),
            }
        }
    }
    (out, None)
}

fn run_in_place(cfg: DecoderConfig, data: &[u8]) -> (Vec<crate::ws::Message>, Option<u16>) {
    use crate::ws::{Decoded, Message, MessageRef};
    let mut d = Decoder::new(cfg);
    let mut inflater = Inflater::new();
    let mut buf = BytesMut::from(data);
    let mut out = Vec::new();
    loop {
        match d.decode_in_place(&mut buf, Some(&mut inflater)) {
            Ok(Some(Decoded::InPlace { message, consumed })) => {
                out.push(match message {
                    MessageRef::Text(t) => Message::Text(bytes::Bytes::copy_from_slice(t)),
                    MessageRef::Binary(b) => Message::Binary(bytes::Bytes::copy_from_slice(b)),
                });
                bytes::Buf::advance(&mut buf, consumed);
            }
            Ok(Some(Decoded::Owned(m))) => out.push(m),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e.close_code())),
        }
    }
}

/// The client-protocol decoder: never panics on any frame.
pub fn client_decoder(data: &[u8]) {
    for cmd in client::decode_frame(data) {
        let _ = cmd.map(|c| c.method.name());
    }
}

/// The cluster decoder: never panics; what decodes re-encodes to the same bytes.
pub fn cluster_decoder(data: &[u8]) {
    let mut d = ClusterDecoder::new(1 << 20);
    let mut buf = BytesMut::from(data);
    let mut consumed = 0;
    while let Ok(Some(msg)) = d.decode(&mut buf) {
        let mut again = BytesMut::new();
        msg.encode(&mut again);
        let len = again.len();
        assert_eq!(&again[..], &data[consumed..consumed + len], "{} did not round-trip", msg.name());
        consumed += len;
        let _ = ClusterMsg::decode_body(again.split_off(4).freeze());
    }
}

/// The HTTP fallback's request parser and framing: never panics; a head
/// that parses says a body length within its bound, and parses the same
/// again from its own bytes; any bytes re-framed for any transport come out
/// as one well-formed chunk; an emulation body decodes or is refused.
pub fn http_request(data: &[u8]) {
    use crate::fallback::{self, EmulationRequest, Transport};
    match fallback::parse_request(data, 8192, 1024) {
        Ok(Some(req)) => {
            assert!(req.content_length <= 1024 && req.head_len <= data.len().min(8192));
            let again = fallback::parse_request(&data[..req.head_len], 8192, 1024);
            assert_eq!(again, Ok(Some(req.clone())));
            let _ = req.query_param("cf_connect");
        }
        Ok(None) => assert!(data.len() < 8192),
        Err(e) => assert!(matches!(e.status(), 400 | 411 | 413 | 431)),
    }
    let _ = fallback::request_path(data);
    let _ = EmulationRequest::decode(data);
    let frame = crate::ws::SharedFrame::text(data);
    for t in [Transport::HttpStream, Transport::Sse, Transport::UniHttpStream, Transport::UniSse] {
        if let Some(chunk) = fallback::reframe(t, frame.bytes()) {
            let nl = chunk.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
            let n = usize::from_str_radix(std::str::from_utf8(&chunk[..nl]).unwrap(), 16).unwrap();
            assert_eq!(chunk.len(), nl + 2 + n + 2, "one whole chunk");
            assert!(chunk.ends_with(b"\r\n"));
        }
        let _ = fallback::reframe(t, data);
    }
}
