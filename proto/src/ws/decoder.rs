//! The streaming frame decoder.
//!
//! [`Decoder::decode`] takes whatever bytes have arrived (any split of the
//! stream, down to one byte at a time) and returns at most one complete
//! message per call; the caller loops until it gets `Ok(None)`. It enforces
//! all of RFC 6455 §5: reserved bits and opcodes, control frames (≤ 125
//! bytes, never fragmented), masking (required from clients, forbidden from
//! servers), minimal and 63-bit lengths, fragmentation (no orphan
//! continuation, no interleaved data messages), close payloads (valid code,
//! UTF-8 reason), and incremental UTF-8 validation of text that fails on the
//! first impossible byte, plus the configured frame and message limits. Every
//! refusal is a [`WsError`] whose [`close_code`](WsError::close_code) is the
//! answer to send.
//!
//! The common case (a whole, unfragmented frame already in the buffer) is
//! zero-copy: the payload is unmasked in place and split off the read buffer.
//! Only fragmented messages, or frames that straddle reads, are assembled in a
//! per-decoder buffer, which is released as soon as the message is complete.

use bytes::{Buf, Bytes, BytesMut};

use super::deflate::Inflater;
use super::frame::{OpCode, WsError, is_valid_close_code};
use super::mask::apply_mask;
use super::utf8::Utf8Validator;

/// Which side of the connection this decoder reads for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A server decodes client frames: every frame must be masked.
    Server,
    /// A client decodes server frames: no frame may be masked.
    Client,
}

/// Limits and negotiated features for one connection's decoder.
#[derive(Debug, Clone, Copy)]
pub struct DecoderConfig {
    /// Whose frames are decoded.
    pub role: Role,
    /// Largest single frame payload accepted (default 64 KiB; above it: close 1009).
    pub max_frame: usize,
    /// Largest message accepted, after reassembly and decompression
    /// (default 64 KiB, Centrifugo's client limit; above it: close 1009).
    pub max_message: usize,
    /// permessage-deflate was negotiated, so RSV1 marks a compressed message.
    pub deflate: bool,
}

impl DecoderConfig {
    /// Server-side defaults: 64 KiB frames and messages, no compression.
    pub fn server() -> Self {
        DecoderConfig { role: Role::Server, max_frame: 65536, max_message: 65536, deflate: false }
    }

    /// Client-side defaults: servers may send up to 1 MiB batches.
    pub fn client() -> Self {
        DecoderConfig { role: Role::Client, max_frame: 1 << 20, max_message: 1 << 20, deflate: false }
    }
}

/// A close frame's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The status code (validated).
    pub code: u16,
    /// The UTF-8 reason (validated).
    pub reason: String,
}

/// One complete message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A complete, validated UTF-8 text message.
    Text(Bytes),
    /// A complete binary message.
    Binary(Bytes),
    /// A ping; answer with a pong carrying the same payload.
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// A close frame; `None` when it carried no status code.
    Close(Option<CloseFrame>),
}

/// A data message borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageRef<'a> {
    /// Validated UTF-8 text.
    Text(&'a [u8]),
    /// Binary.
    Binary(&'a [u8]),
}

/// What [`Decoder::decode_in_place`] returns.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A message in the read buffer; advance the buffer by `consumed` after use.
    InPlace {
        /// The message.
        message: MessageRef<'a>,
        /// Bytes of `buf` it occupies (header included).
        consumed: usize,
    },
    /// A message the decoder assembled (already consumed from the buffer).
    Owned(Message),
}

#[derive(Debug, Clone, Copy)]
struct FrameState {
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    remaining: usize,
    mask_offset: usize,
}

/// Streaming decoder for one connection. Small when idle: no buffer is held
/// between messages.
#[derive(Debug)]
pub struct Decoder {
    cfg: DecoderConfig,
    frame: Option<FrameState>,
    /// Opcode of the data message in progress (Text or Binary).
    message: Option<OpCode>,
    message_compressed: bool,
    assembled: BytesMut,
    utf8: Utf8Validator,
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new(cfg: DecoderConfig) -> Self {
        Decoder {
            cfg,
            frame: None,
            message: None,
            message_compressed: false,
            assembled: BytesMut::new(),
            utf8: Utf8Validator::new(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// Whether the decoder is between messages, holding no state a fresh
    /// decoder with the same configuration would not have (so a connection
    /// may drop it while idle and make a new one on its next read).
    pub fn is_idle(&self) -> bool {
        self.frame.is_none() && self.message.is_none() && self.assembled.is_empty()
    }

    /// Whether a frame or message is partially received.
    pub fn is_mid_message(&self) -> bool {
        self.frame.is_some() || self.message.is_some()
    }

    /// Decodes from `buf`, consuming what it uses. Returns `Ok(None)` when more
    /// bytes are needed. Without an inflater, a compressed message is refused.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, WsError> {
        self.decode_with(buf, None)
    }

    /// Like [`decode`](Self::decode), with the (typically per-core, pooled)
    /// inflater for permessage-deflate messages.
    pub fn decode_with(
        &mut self,
        buf: &mut BytesMut,
        mut inflater: Option<&mut Inflater>,
    ) -> Result<Option<Message>, WsError> {
        loop {
            let frame = match self.frame {
                Some(f) => f,
                None => match self.parse_header(buf)? {
                    Some(f) => {
                        self.frame = Some(f);
                        f
                    }
                    None => return Ok(None),
                },
            };
            if frame.opcode.is_control() {
                if buf.len() < frame.remaining {
                    return Ok(None);
                }
                self.frame = None;
                let mut payload = buf.split_to(frame.remaining);
                if let Some(key) = frame.mask {
                    apply_mask(&mut payload, key, 0);
                }
                return control_message(frame.opcode, payload.freeze()).map(Some);
            }
            // Zero-copy fast path: a whole unfragmented frame is already here.
            if self.message.is_none() && frame.fin && buf.len() >= frame.remaining {
                self.frame = None;
                let compressed = self.message_compressed;
                self.message_compressed = false;
                let mut payload = buf.split_to(frame.remaining);
                if let Some(key) = frame.mask {
                    apply_mask(&mut payload, key, 0);
                }
                return self
                    .finish_message(
                        frame.opcode,
                        compressed,
                        false,
                        payload.freeze(),
                        inflater.as_deref_mut(),
                    )
                    .map(Some);
            }
            // Slow path: stream the payload into the assembly buffer.
            if self.message.is_none() {
                self.message = Some(frame.opcode);
                self.assembled.reserve(frame.remaining.min(self.cfg.max_message));
            }
            let take = frame.remaining.min(buf.len());
            if take == 0 && frame.remaining > 0 {
                return Ok(None);
            }
            let mut chunk = buf.split_to(take);
            let mut next = frame;
            if let Some(key) = frame.mask {
                next.mask_offset = apply_mask(&mut chunk, key, frame.mask_offset);
            }
            if self.message == Some(OpCode::Text) && !self.message_compressed {
                self.utf8.feed(&chunk).map_err(|_| WsError::InvalidUtf8)?;
            }
            self.assembled.extend_from_slice(&chunk);
            next.remaining -= take;
            if next.remaining > 0 {
                self.frame = Some(next);
                return Ok(None);
            }
            self.frame = None;
            if frame.fin {
                let opcode = self.message.take().expect("message in progress");
                let compressed = std::mem::take(&mut self.message_compressed);
                let payload = std::mem::take(&mut self.assembled).freeze();
                return self
                    .finish_message(opcode, compressed, true, payload, inflater.as_deref_mut())
                    .map(Some);
            }
        }
    }

    /// Completes a data message. `streamed` says the payload went through the
    /// incremental UTF-8 validator piece by piece (slow path).
    fn finish_message(
        &mut self,
        opcode: OpCode,
        compressed: bool,
        streamed: bool,
        payload: Bytes,
        inflater: Option<&mut Inflater>,
    ) -> Result<Message, WsError> {
        let mut validator = std::mem::take(&mut self.utf8);
        let payload = if compressed {
            let inflater = inflater.ok_or(WsError::Protocol("compressed frame without inflater"))?;
            inflater.inflate(&payload, self.cfg.max_message)?
        } else {
            payload
        };
        if opcode != OpCode::Text {
            return Ok(Message::Binary(payload));
        }
        let valid = if streamed && !compressed {
            validator.finish().is_ok()
        } else {
            simdutf8::basic::from_utf8(&payload).is_ok()
        };
        if valid { Ok(Message::Text(payload)) } else { Err(WsError::InvalidUtf8) }
    }

    /// Parses and validates the header at the front of `buf` without
    /// consuming it: (frame, header length, RSV1).
    fn peek_header(&self, buf: &[u8]) -> Result<Option<(FrameState, usize, bool)>, WsError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let b0 = buf[0];
        let b1 = buf[1];
        let fin = b0 & 0x80 != 0;
        let rsv1 = b0 & 0x40 != 0;
        if b0 & 0x30 != 0 {
            return Err(WsError::Protocol("reserved bits set"));
        }
        let opcode = OpCode::from_u8(b0 & 0x0f).ok_or(WsError::Protocol("reserved opcode"))?;
        let masked = b1 & 0x80 != 0;
        match (self.cfg.role, masked) {
            (Role::Server, false) => return Err(WsError::Protocol("unmasked client frame")),
            (Role::Client, true) => return Err(WsError::Protocol("masked server frame")),
            _ => {}
        }
        let len7 = (b1 & 0x7f) as usize;
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header = 2 + ext + if masked { 4 } else { 0 };
        if opcode.is_control() {
            if !fin {
                return Err(WsError::Protocol("fragmented control frame"));
            }
            if len7 > 125 {
                return Err(WsError::Protocol("control frame too long"));
            }
        }
        if rsv1 {
            if !self.cfg.deflate {
                return Err(WsError::Protocol("reserved bits set"));
            }
            if !matches!(opcode, OpCode::Text | OpCode::Binary) {
                return Err(WsError::Protocol("RSV1 on a non-initial frame"));
            }
        }
        match opcode {
            OpCode::Continuation if self.message.is_none() => {
                return Err(WsError::Protocol("continuation without a message"));
            }
            OpCode::Text | OpCode::Binary if self.message.is_some() => {
                return Err(WsError::Protocol("new message inside a fragmented one"));
            }
            _ => {}
        }
        if buf.len() < header {
            return Ok(None);
        }
        let len = match ext {
            2 => {
                let l = u16::from_be_bytes([buf[2], buf[3]]) as u64;
                if l < 126 {
                    return Err(WsError::Protocol("non-minimal length"));
                }
                l
            }
            8 => {
                let l = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
                if l >> 63 != 0 {
                    return Err(WsError::Protocol("length with top bit set"));
                }
                if l <= u16::MAX as u64 {
                    return Err(WsError::Protocol("non-minimal length"));
                }
                l
            }
            _ => len7 as u64,
        };
        if len > self.cfg.max_frame as u64 {
            return Err(WsError::TooBig("frame too big"));
        }
        let len = len as usize;
        if !opcode.is_control() && self.assembled.len() + len > self.cfg.max_message {
            return Err(WsError::TooBig("message too big"));
        }
        let mask = masked.then(|| {
            let at = 2 + ext;
            [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]
        });
        Ok(Some((FrameState { fin, opcode, mask, remaining: len, mask_offset: 0 }, header, rsv1)))
    }

    fn parse_header(&mut self, buf: &mut BytesMut) -> Result<Option<FrameState>, WsError> {
        let Some((frame, header, rsv1)) = self.peek_header(buf)? else { return Ok(None) };
        // advance, not split_to: no reference-count traffic for the header.
        buf.advance(header);
        if matches!(frame.opcode, OpCode::Text | OpCode::Binary) {
            self.message_compressed = rsv1;
        }
        Ok(Some(frame))
    }

    /// Like [`decode_with`](Self::decode_with), but a whole, unfragmented,
    /// uncompressed data frame already in `buf` is unmasked and validated in
    /// place and handed out as a slice of `buf`, with no allocation and no
    /// reference counting; the caller advances `buf` by `consumed` once done
    /// with it. Everything else (fragments, control frames, compressed
    /// messages, frames split across reads) comes back [`Decoded::Owned`].
    /// This is the gateway's path: it reads synchronously into a per-core
    /// scratch buffer and handles each message before the next read.
    pub fn decode_in_place<'a>(
        &mut self,
        buf: &'a mut BytesMut,
        inflater: Option<&mut Inflater>,
    ) -> Result<Option<Decoded<'a>>, WsError> {
        if self.frame.is_none()
            && self.message.is_none()
            && let Some((f, header, rsv1)) = self.peek_header(buf)?
            && f.fin
            && !rsv1
            && matches!(f.opcode, OpCode::Text | OpCode::Binary)
            && buf.len() >= header + f.remaining
        {
            let consumed = header + f.remaining;
            let is_text = f.opcode == OpCode::Text;
            unmask_and_validate(&mut buf[header..consumed], f.mask, is_text)?;
            let buf: &'a BytesMut = buf;
            let payload = &buf[header..consumed];
            let message = if is_text { MessageRef::Text(payload) } else { MessageRef::Binary(payload) };
            return Ok(Some(Decoded::InPlace { message, consumed }));
        }
        Ok(self.decode_with(buf, inflater)?.map(Decoded::Owned))
    }
}

/// Block size for fused unmask + validation: small enough that the validator
/// reads what the unmask just wrote from L1.
const FUSE_BLOCK: usize = 8 * 1024;

/// Unmasks a whole payload in place and, for text, validates it as UTF-8,
/// block by block so each block is validated while it is still in L1.
fn unmask_and_validate(payload: &mut [u8], mask: Option<[u8; 4]>, text: bool) -> Result<(), WsError> {
    if payload.len() <= FUSE_BLOCK || !text {
        if let Some(key) = mask {
            apply_mask(payload, key, 0);
        }
        if text {
            simdutf8::basic::from_utf8(payload).map_err(|_| WsError::InvalidUtf8)?;
        }
        return Ok(());
    }
    let mut v = Utf8Validator::new();
    let mut offset = 0;
    for block in payload.chunks_mut(FUSE_BLOCK) {
        if let Some(key) = mask {
            offset = apply_mask(block, key, offset);
        }
        v.feed(block).map_err(|_| WsError::InvalidUtf8)?;
    }
    v.finish().map_err(|_| WsError::InvalidUtf8)
}

fn control_message(opcode: OpCode, payload: Bytes) -> Result<Message, WsError> {
    Ok(match opcode {
        OpCode::Ping => Message::Ping(payload),
        OpCode::Pong => Message::Pong(payload),
        OpCode::Close => Message::Close(parse_close(&payload)?),
        _ => unreachable!("control opcodes only"),
    })
}

/// Validates a close frame's payload (RFC 6455 §5.5.1, §7.4).
pub fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame>, WsError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(WsError::Protocol("close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !is_valid_close_code(code) {
                return Err(WsError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| WsError::InvalidUtf8)?;
            Ok(Some(CloseFrame { code, reason: reason.to_owned() }))
        }
    }
}
