//! Frame-level vocabulary of RFC 6455: opcodes, close codes, header encoding.

use bytes::BufMut;

/// The opcodes RFC 6455 defines; the others are reserved and rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    /// Continues a fragmented data message.
    Continuation = 0x0,
    /// A UTF-8 text message (the client protocol's JSON travels in these).
    Text = 0x1,
    /// A binary message.
    Binary = 0x2,
    /// Closes the connection.
    Close = 0x8,
    /// Liveness probe; must be answered with a pong carrying the same payload.
    Ping = 0x9,
    /// Answer to a ping (or unsolicited heartbeat).
    Pong = 0xA,
}

impl OpCode {
    /// Parses the low nibble of the first header byte.
    pub fn from_u8(v: u8) -> Option<OpCode> {
        Some(match v {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// Close, ping and pong.
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// WebSocket close status codes used by the codec (RFC 6455 §7.4.1).
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Endpoint going away.
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Unsupported data (e.g. binary where only text is accepted).
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// No status code was present (never sent on the wire).
    pub const NO_STATUS: u16 = 1005;
    /// Invalid payload data, e.g. text that is not UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation.
    pub const POLICY: u16 = 1008;
    /// Message too big.
    pub const TOO_BIG: u16 = 1009;
    /// Unexpected server condition.
    pub const INTERNAL: u16 = 1011;
}

/// Whether a peer may send `code` in a close frame (RFC 6455 §7.4, IANA registry).
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Largest frame header: 2 bytes + 8 bytes of length + 4 bytes of mask.
pub const MAX_HEADER_LEN: usize = 14;

/// Length of the header for a payload of `len` bytes (without a mask).
pub fn header_len(len: usize, masked: bool) -> usize {
    let base = if len < 126 {
        2
    } else if len <= u16::MAX as usize {
        4
    } else {
        10
    };
    if masked { base + 4 } else { base }
}

/// Writes a frame header. `rsv1` marks a permessage-deflate compressed first frame.
pub fn write_header(
    out: &mut impl BufMut,
    fin: bool,
    rsv1: bool,
    opcode: OpCode,
    len: usize,
    mask: Option<[u8; 4]>,
) {
    let b0 = (if fin { 0x80 } else { 0 }) | (if rsv1 { 0x40 } else { 0 }) | opcode as u8;
    out.put_u8(b0);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.put_u8(mask_bit | len as u8);
    } else if len <= u16::MAX as usize {
        out.put_u8(mask_bit | 126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(mask_bit | 127);
        out.put_u64(len as u64);
    }
    if let Some(key) = mask {
        out.put_slice(&key);
    }
}

/// Why a peer's bytes were refused; each maps to the close code sent back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// A violation of RFC 6455 framing (close 1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// Text that is not UTF-8, or a bad close reason (close 1007).
    #[error("invalid UTF-8 in text message")]
    InvalidUtf8,
    /// A frame or message above the configured size (close 1009).
    #[error("message too big: {0}")]
    TooBig(&'static str),
    /// Compressed data that does not inflate (close 1007).
    #[error("bad compressed data")]
    BadCompression,
}

impl WsError {
    /// The close code that answers this error.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::Protocol(_) => close_code::PROTOCOL_ERROR,
            WsError::InvalidUtf8 | WsError::BadCompression => close_code::INVALID_PAYLOAD,
            WsError::TooBig(_) => close_code::TOO_BIG,
        }
    }

    /// A short reason for the close frame (fits the 123-byte limit).
    pub fn close_reason(&self) -> &'static str {
        match self {
            WsError::Protocol(r) | WsError::TooBig(r) => r,
            WsError::InvalidUtf8 => "invalid utf-8",
            WsError::BadCompression => "bad compressed data",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lengths() {
        for (len, expect) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
            let mut v = Vec::new();
            write_header(&mut v, true, false, OpCode::Text, len, None);
            assert_eq!(v.len(), expect);
            assert_eq!(header_len(len, false), expect);
        }
    }

    #[test]
    fn close_codes() {
        for ok in [1000, 1001, 1002, 1003, 1007, 1011, 3000, 3008, 4999] {
            assert!(is_valid_close_code(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535] {
            assert!(!is_valid_close_code(bad), "{bad}");
        }
    }
}
