//! Decoder tests: identity under any split and fragmentation, and every RFC 6455 violation.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::deflate::{Deflater, Inflater};
use super::*;

const KEY: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

fn client_frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_frame(&mut v, fin, opcode, payload, Some(KEY));
    v
}

fn raw(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = client_frame(true, OpCode::Text, payload);
    v[0] = b0;
    v
}

/// Decodes `bytes` fed in the given chunks; returns messages and the first error.
fn run(cfg: DecoderConfig, bytes: &[u8], chunk: usize) -> (Vec<Message>, Option<WsError>) {
    let mut d = Decoder::new(cfg);
    let mut inflater = Inflater::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match d.decode_with(&mut buf, Some(&mut inflater)) {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

fn err_code(bytes: &[u8]) -> u16 {
    let (_, e) = run(DecoderConfig::server(), bytes, usize::MAX);
    e.expect("an error").close_code()
}

#[test]
fn single_frames_decode() {
    let mut bytes = client_frame(true, OpCode::Text, b"hello");
    bytes.extend(client_frame(true, OpCode::Binary, &[0, 1, 2]));
    bytes.extend(client_frame(true, OpCode::Ping, b"p"));
    bytes.extend(client_frame(true, OpCode::Close, &[0x03, 0xe8, b'o', b'k']));
    for chunk in [1, 2, 3, 7, usize::MAX] {
        let (msgs, err) = run(DecoderConfig::server(), &bytes, chunk);
        assert_eq!(err, None);
        assert_eq!(
            msgs,
            vec![
                Message::Text(Bytes::from_static(b"hello")),
                Message::Binary(Bytes::from_static(&[0, 1, 2])),
                Message::Ping(Bytes::from_static(b"p")),
                Message::Close(Some(CloseFrame { code: 1000, reason: "ok".into() })),
            ]
        );
    }
}

#[test]
fn control_frames_interleave_with_fragments() {
    let mut bytes = client_frame(false, OpCode::Text, b"he");
    bytes.extend(client_frame(true, OpCode::Ping, b""));
    bytes.extend(client_frame(false, OpCode::Continuation, b""));
    bytes.extend(client_frame(true, OpCode::Continuation, b"llo"));
    let (msgs, err) = run(DecoderConfig::server(), &bytes, 1);
    assert_eq!(err, None);
    assert_eq!(msgs, vec![Message::Ping(Bytes::new()), Message::Text(Bytes::from_static(b"hello"))]);
}

#[test]
fn violations_map_to_close_codes() {
    // Reserved bits and opcodes.
    assert_eq!(err_code(&raw(0x80 | 0x20 | 0x1, b"x")), 1002);
    assert_eq!(err_code(&raw(0x80 | 0x40 | 0x1, b"x")), 1002); // RSV1 without deflate
    assert_eq!(err_code(&raw(0x80 | 0x3, b"x")), 1002);
    assert_eq!(err_code(&raw(0x80 | 0xB, b"x")), 1002);
    // Control frames: too long, fragmented.
    assert_eq!(err_code(&client_frame(true, OpCode::Ping, &[0; 126])), 1002);
    assert_eq!(err_code(&client_frame(false, OpCode::Ping, b"")), 1002);
    // Masking.
    let mut unmasked = Vec::new();
    encode_frame(&mut unmasked, true, OpCode::Text, b"x", None);
    assert_eq!(err_code(&unmasked), 1002);
    let (_, e) = run(DecoderConfig::client(), &client_frame(true, OpCode::Text, b"x"), usize::MAX);
    assert_eq!(e.unwrap().close_code(), 1002);
    // Fragmentation.
    assert_eq!(err_code(&client_frame(true, OpCode::Continuation, b"x")), 1002);
    let mut two = client_frame(false, OpCode::Text, b"a");
    two.extend(client_frame(true, OpCode::Text, b"b"));
    assert_eq!(err_code(&two), 1002);
    // Lengths: top bit, non-minimal.
    let mut huge = vec![0x81, 0x80 | 127];
    huge.extend(u64::MAX.to_be_bytes());
    huge.extend(KEY);
    assert_eq!(err_code(&huge), 1002);
    let mut nonmin = vec![0x81, 0x80 | 126, 0, 5];
    nonmin.extend(KEY);
    nonmin.extend([0; 5]);
    assert_eq!(err_code(&nonmin), 1002);
    // Close payloads.
    assert_eq!(err_code(&client_frame(true, OpCode::Close, &[0x03])), 1002);
    assert_eq!(err_code(&client_frame(true, OpCode::Close, &1005u16.to_be_bytes())), 1002);
    assert_eq!(err_code(&client_frame(true, OpCode::Close, &[0x03, 0xe8, 0xff])), 1007);
    // UTF-8.
    assert_eq!(err_code(&client_frame(true, OpCode::Text, &[0xc3, 0x28])), 1007);
    // Sizes.
    assert_eq!(err_code(&client_frame(true, OpCode::Binary, &vec![0; 65537])), 1009);
    let mut frags = Vec::new();
    for _ in 0..4 {
        frags.extend(client_frame(
            false,
            if frags.is_empty() { OpCode::Binary } else { OpCode::Continuation },
            &[0; 20000],
        ));
    }
    assert_eq!(err_code(&frags), 1009);
}

#[test]
fn invalid_utf8_fails_before_the_message_ends() {
    // A fragmented text whose first fragment is already impossible UTF-8:
    // the error comes without waiting for the final fragment.
    let bytes = client_frame(false, OpCode::Text, &[b'a', 0xf8, b'b']);
    let (_, e) = run(DecoderConfig::server(), &bytes, usize::MAX);
    assert_eq!(e, Some(WsError::InvalidUtf8));
    // Within one frame arriving byte by byte, also before its end.
    let frame = client_frame(true, OpCode::Text, &[b'a', 0xf8, b'b', b'c', b'd']);
    let mut d = Decoder::new(DecoderConfig::server());
    let mut buf = BytesMut::new();
    let mut failed_at = None;
    for (i, b) in frame.iter().enumerate() {
        buf.extend_from_slice(&[*b]);
        if d.decode(&mut buf).is_err() {
            failed_at = Some(i);
            break;
        }
    }
    assert!(failed_at.unwrap() < frame.len() - 1, "failed at {failed_at:?}");
}

#[test]
fn compressed_messages_inflate_and_bombs_are_refused() {
    let mut deflater = Deflater::default();
    let text = "{\"id\":1,\"publish\":{\"channel\":\"chat:1\",\"data\":{}}}".repeat(4);
    let compressed = deflater.compress(text.as_bytes());
    let mut frame = client_frame(true, OpCode::Text, &compressed);
    frame[0] |= 0x40;
    let cfg = DecoderConfig { deflate: true, ..DecoderConfig::server() };
    for chunk in [1, usize::MAX] {
        let (msgs, err) = run(cfg, &frame, chunk);
        assert_eq!(err, None);
        assert_eq!(msgs, vec![Message::Text(Bytes::from(text.clone()))]);
    }
    let bomb = deflater.compress(&vec![b'a'; 4 << 20]);
    let mut frame = client_frame(true, OpCode::Text, &bomb);
    frame[0] |= 0x40;
    let (_, err) = run(cfg, &frame, usize::MAX);
    assert_eq!(err.unwrap().close_code(), 1009);
    // RSV1 on a continuation frame is a protocol error even with deflate.
    let mut bytes = client_frame(false, OpCode::Text, b"a");
    let mut cont = client_frame(true, OpCode::Continuation, b"b");
    cont[0] |= 0x40;
    bytes.extend(cont);
    let (_, err) = run(cfg, &bytes, usize::MAX);
    assert_eq!(err.unwrap().close_code(), 1002);
}

#[derive(Debug, Clone)]
enum TestMsg {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
}

fn msg_strategy() -> impl Strategy<Value = TestMsg> {
    prop_oneof![
        ".{0,300}".prop_map(TestMsg::Text),
        proptest::collection::vec(any::<u8>(), 0..600).prop_map(TestMsg::Binary),
        proptest::collection::vec(any::<u8>(), 0..125).prop_map(TestMsg::Ping),
    ]
}

/// Encodes a message split into `parts` fragments (control frames are never split).
fn encode_fragmented(m: &TestMsg, parts: usize, out: &mut Vec<u8>) -> Message {
    let (opcode, payload, expect) = match m {
        TestMsg::Text(s) => (OpCode::Text, s.as_bytes().to_vec(), Message::Text(Bytes::from(s.clone()))),
        TestMsg::Binary(b) => (OpCode::Binary, b.clone(), Message::Binary(Bytes::from(b.clone()))),
        TestMsg::Ping(p) => {
            out.extend(client_frame(true, OpCode::Ping, p));
            return Message::Ping(Bytes::from(p.clone()));
        }
    };
    let parts = parts.max(1);
    let step = payload.len().div_ceil(parts).max(1);
    let chunks: Vec<&[u8]> = if payload.is_empty() { vec![&[][..]] } else { payload.chunks(step).collect() };
    for (i, c) in chunks.iter().enumerate() {
        let op = if i == 0 { opcode } else { OpCode::Continuation };
        out.extend(client_frame(i + 1 == chunks.len(), op, c));
    }
    expect
}

/// The in-place path gives the same messages and errors as the owned one.
fn run_in_place(cfg: DecoderConfig, bytes: &[u8], chunk: usize) -> (Vec<Message>, Option<WsError>) {
    let mut d = Decoder::new(cfg);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match d.decode_in_place(&mut buf, None) {
                Ok(Some(Decoded::InPlace { message, consumed })) => {
                    out.push(match message {
                        MessageRef::Text(t) => Message::Text(Bytes::copy_from_slice(t)),
                        MessageRef::Binary(b) => Message::Binary(Bytes::copy_from_slice(b)),
                    });
                    bytes::Buf::advance(&mut buf, consumed);
                }
                Ok(Some(Decoded::Owned(m))) => out.push(m),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

proptest! {
    #[test]
    fn in_place_agrees_with_owned(
        msgs in proptest::collection::vec((msg_strategy(), 1usize..4), 1..6),
        chunk in 1usize..2000,
        garbage in proptest::option::of(proptest::collection::vec(any::<u8>(), 1..20)),
    ) {
        let mut bytes = Vec::new();
        for (m, p) in &msgs { encode_fragmented(m, *p, &mut bytes); }
        if let Some(g) = garbage { bytes.extend(g); }
        prop_assert_eq!(run_in_place(DecoderConfig::server(), &bytes, chunk), run(DecoderConfig::server(), &bytes, chunk));
    }

    #[test]
    fn identity_under_any_split_and_fragmentation(
        msgs in proptest::collection::vec((msg_strategy(), 1usize..5), 1..6),
        chunk in 1usize..64,
    ) {
        let mut bytes = Vec::new();
        let expected: Vec<Message> = msgs.iter().map(|(m, p)| encode_fragmented(m, *p, &mut bytes)).collect();
        let (got, err) = run(DecoderConfig::server(), &bytes, chunk);
        prop_assert_eq!(err, None);
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn every_split_point_of_a_stream(split in 0usize..200) {
        let mut bytes = client_frame(true, OpCode::Text, "naïve ✓ text".as_bytes());
        bytes.extend(client_frame(false, OpCode::Binary, &[9; 70]));
        bytes.extend(client_frame(true, OpCode::Continuation, &[8; 70]));
        let split = split.min(bytes.len());
        let mut d = Decoder::new(DecoderConfig::server());
        let mut buf = BytesMut::from(&bytes[..split]);
        let mut got = Vec::new();
        while let Some(m) = d.decode(&mut buf).unwrap() { got.push(m); }
        buf.extend_from_slice(&bytes[split..]);
        while let Some(m) = d.decode(&mut buf).unwrap() { got.push(m); }
        prop_assert_eq!(got.len(), 2);
    }

    #[test]
    fn server_frames_roundtrip_through_client_decoder(payload in proptest::collection::vec(any::<u8>(), 0..70000)) {
        let f = SharedFrame::binary(&payload);
        let (got, err) = run(DecoderConfig::client(), f.bytes(), 4096);
        prop_assert_eq!(err, None);
        prop_assert_eq!(got, vec![Message::Binary(Bytes::from(payload))]);
    }
}
