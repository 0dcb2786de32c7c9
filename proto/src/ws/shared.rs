//! [`SharedFrame`]: a server frame encoded once and written to many sockets.
//!
//! Server-to-client frames are never masked (RFC 6455 §5.1), so their bytes do
//! not depend on the connection: the header and payload are laid out once,
//! contiguously, in one [`Bytes`], and every recipient's write queue holds a
//! clone of it. A clone is a reference-count increment, whatever the size of
//! the frame (see the `shared_frame` benchmark: 1 vs 10,000 recipients).

use bytes::{BufMut, Bytes, BytesMut};

use super::deflate::Deflater;
use super::frame::{OpCode, header_len, write_header};

/// One complete, unmasked server frame (header + payload), immutable and cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFrame(Bytes);

impl SharedFrame {
    fn build(opcode: OpCode, rsv1: bool, parts: &[&[u8]]) -> SharedFrame {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut out = BytesMut::with_capacity(header_len(len, false) + len);
        write_header(&mut out, true, rsv1, opcode, len, None);
        for p in parts {
            out.put_slice(p);
        }
        SharedFrame(out.freeze())
    }

    /// A text frame carrying `payload` (the caller guarantees UTF-8).
    pub fn text(payload: &[u8]) -> SharedFrame {
        Self::build(OpCode::Text, false, &[payload])
    }

    /// A text frame whose payload is `parts` joined by `\n`: how several
    /// client-protocol replies and pushes travel in one frame.
    pub fn text_lines<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> SharedFrame {
        let parts: Vec<&[u8]> = parts.into_iter().collect();
        let mut joined: Vec<&[u8]> = Vec::with_capacity(parts.len() * 2);
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                joined.push(b"\n");
            }
            joined.push(p);
        }
        Self::build(OpCode::Text, false, &joined)
    }

    /// A compressed text frame (permessage-deflate, RSV1 set), built once for
    /// every recipient that negotiated compression.
    pub fn text_deflated(payload: &[u8], deflater: &mut Deflater) -> SharedFrame {
        let compressed = deflater.compress(payload);
        Self::build(OpCode::Text, true, &[&compressed])
    }

    /// The compressed twin of an encoded, unfragmented, uncompressed text or
    /// binary server frame (`frame` as built by this type), for the
    /// recipients that negotiated permessage-deflate. `None` when `frame` is
    /// not such a frame or compression would not make it smaller.
    pub fn deflate_encoded(frame: &[u8], deflater: &mut Deflater) -> Option<SharedFrame> {
        let (opcode, rest) = Self::data_payload(frame)?;
        let len = rest.len();
        let compressed = deflater.compress(rest);
        (compressed.len() < len).then(|| Self::build(opcode, true, &[&compressed]))
    }

    /// The frame of the last `n` lines of an encoded, unfragmented,
    /// uncompressed text frame of newline-separated lines (as
    /// [`text_lines`](Self::text_lines) builds a packed run): what a
    /// subscriber whose position falls inside the run still needs. `None`
    /// when `frame` is not such a frame, `n` is 0 or it has fewer than `n`
    /// lines.
    pub fn last_lines(frame: &[u8], n: u64) -> Option<SharedFrame> {
        let (OpCode::Text, payload) = Self::data_payload(frame)? else { return None };
        if n == 0 {
            return None;
        }
        let mut seen = 0u64;
        let mut start = None;
        for (i, b) in payload.iter().enumerate().rev() {
            if *b == b'\n' {
                seen += 1;
                if seen == n {
                    start = Some(i + 1);
                    break;
                }
            }
        }
        let start = match start {
            Some(s) => s,
            // Exactly `n` lines: the whole payload.
            None if seen + 1 == n => 0,
            None => return None,
        };
        Some(Self::build(OpCode::Text, false, &[&payload[start..]]))
    }

    /// The opcode and payload of an encoded, unfragmented, uncompressed
    /// text or binary server frame (as built by this type); `None` for
    /// anything else.
    pub fn data_payload(frame: &[u8]) -> Option<(OpCode, &[u8])> {
        let (&b0, rest) = frame.split_first()?;
        let opcode = match b0 {
            0x81 => OpCode::Text,
            0x82 => OpCode::Binary,
            _ => return None,
        };
        let (&b1, rest) = rest.split_first()?;
        if b1 & 0x80 != 0 {
            return None;
        }
        let (len, rest) = match b1 & 0x7f {
            126 => (u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize, &rest[2..]),
            127 => (u64::from_be_bytes(rest.get(..8)?.try_into().ok()?) as usize, &rest[8..]),
            n => (n as usize, rest),
        };
        (rest.len() == len).then_some((opcode, rest))
    }

    /// A binary frame.
    pub fn binary(payload: &[u8]) -> SharedFrame {
        Self::build(OpCode::Binary, false, &[payload])
    }

    /// A ping (payload truncated to the 125-byte control limit).
    pub fn ping(payload: &[u8]) -> SharedFrame {
        Self::build(OpCode::Ping, false, &[&payload[..payload.len().min(125)]])
    }

    /// A pong answering a ping's payload.
    pub fn pong(payload: &[u8]) -> SharedFrame {
        Self::build(OpCode::Pong, false, &[&payload[..payload.len().min(125)]])
    }

    /// A close frame; the reason is cut (on a character boundary) to the
    /// 123 bytes a control frame leaves for it.
    pub fn close(code: u16, reason: &str) -> SharedFrame {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        Self::build(OpCode::Close, false, &[&code.to_be_bytes(), &reason.as_bytes()[..end]])
    }

    /// A close frame with no status code (the echo of an empty close).
    pub fn close_empty() -> SharedFrame {
        Self::build(OpCode::Close, false, &[])
    }

    /// The wire bytes (header and payload).
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }

    /// The wire bytes, owned (a refcount, not a copy).
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Wire length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true: every frame has a header.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::{Decoder, DecoderConfig, Message};

    fn decode_one(frame: &SharedFrame) -> Message {
        let mut d = Decoder::new(DecoderConfig::client());
        let mut buf = BytesMut::from(&frame.bytes()[..]);
        let m = d.decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        m
    }

    #[test]
    fn clones_share_storage() {
        let f = SharedFrame::text(&[b'x'; 4096]);
        let g = f.clone();
        assert_eq!(f.bytes().as_ptr(), g.bytes().as_ptr());
    }

    #[test]
    fn the_last_lines_of_a_packed_run_are_a_frame_of_their_own() {
        let lines: Vec<Vec<u8>> = (1..=4).map(|i| format!("{{\"offset\":{i}}}").into_bytes()).collect();
        let run = SharedFrame::text_lines(lines.iter().map(|l| l.as_slice()));
        let tail = |n| SharedFrame::last_lines(run.bytes(), n).map(|f| decode_one(&f));
        assert_eq!(tail(1), Some(Message::Text(Bytes::from_static(b"{\"offset\":4}"))));
        assert_eq!(
            tail(3),
            Some(Message::Text(Bytes::from_static(b"{\"offset\":2}\n{\"offset\":3}\n{\"offset\":4}")))
        );
        assert_eq!(tail(4), Some(decode_one(&run)), "all of it");
        assert_eq!(tail(5), None, "more lines than the run has");
        assert_eq!(tail(0), None);
        // Long enough for a 16-bit length: the header is read, not assumed.
        let big: Vec<Vec<u8>> = (0..3).map(|i| vec![b'a' + i; 300]).collect();
        let run = SharedFrame::text_lines(big.iter().map(|l| l.as_slice()));
        let f = SharedFrame::last_lines(run.bytes(), 2).unwrap();
        assert_eq!(decode_one(&f), Message::Text(Bytes::from([&big[1][..], b"\n", &big[2][..]].concat())));
        // Not a plain text frame: nothing to cut.
        assert!(SharedFrame::last_lines(SharedFrame::binary(b"a\nb").bytes(), 1).is_none());
        assert!(SharedFrame::last_lines(SharedFrame::ping(b"a\nb").bytes(), 1).is_none());
    }

    #[test]
    fn frames_decode_as_client_sees_them() {
        assert_eq!(decode_one(&SharedFrame::text(b"hi")), Message::Text(Bytes::from_static(b"hi")));
        assert_eq!(
            decode_one(&SharedFrame::text_lines([&b"{}"[..], &b"{\"id\":1}"[..]])),
            Message::Text(Bytes::from_static(b"{}\n{\"id\":1}"))
        );
        assert_eq!(decode_one(&SharedFrame::ping(b"p")), Message::Ping(Bytes::from_static(b"p")));
        let long = "é".repeat(100);
        match decode_one(&SharedFrame::close(3001, &long)) {
            Message::Close(Some(c)) => {
                assert_eq!(c.code, 3001);
                assert!(c.reason.len() <= 123);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deflated_twin_inflates_to_the_same_message() {
        let mut deflater = Deflater::default();
        let mut client = Decoder::new(DecoderConfig { deflate: true, ..DecoderConfig::client() });
        let mut inflater = crate::ws::deflate::Inflater::new();
        // One of each length encoding: 7-bit, 16-bit, 64-bit.
        for len in [100usize, 4_000, 70_000] {
            let text: String = (0..len).map(|i| (b'a' + (i % 7) as u8) as char).collect();
            let plain = SharedFrame::text(text.as_bytes());
            let packed = SharedFrame::deflate_encoded(plain.bytes(), &mut deflater).unwrap();
            assert!(packed.len() < plain.len());
            assert_eq!(packed.bytes()[0], 0xc1, "FIN, RSV1, text");
            let mut buf = BytesMut::from(&packed.bytes()[..]);
            let got = client.decode_with(&mut buf, Some(&mut inflater)).unwrap().unwrap();
            assert_eq!(got, Message::Text(Bytes::from(text)));
        }
        let bin = SharedFrame::binary(&[7u8; 300]);
        assert_eq!(bin.bytes()[0], 0x82);
        assert!(SharedFrame::deflate_encoded(bin.bytes(), &mut deflater).unwrap().bytes()[0] == 0xc2);
        // Incompressible, control, already compressed or truncated: no twin.
        assert!(SharedFrame::deflate_encoded(SharedFrame::text(b"{}").bytes(), &mut deflater).is_none());
        assert!(SharedFrame::deflate_encoded(SharedFrame::ping(b"p").bytes(), &mut deflater).is_none());
        let packed = SharedFrame::deflate_encoded(bin.bytes(), &mut deflater).unwrap();
        assert!(SharedFrame::deflate_encoded(packed.bytes(), &mut deflater).is_none());
        assert!(SharedFrame::deflate_encoded(&bin.bytes()[..100], &mut deflater).is_none());
        assert!(SharedFrame::deflate_encoded(&[], &mut deflater).is_none());
    }
}
