//! WebSocket (RFC 6455, RFC 7692), sans-IO.
//!
//! - [`handshake`]: the HTTP/1.1 upgrade, server and client side.
//! - [`Decoder`]: streaming, zero-copy when a frame arrives whole, strict.
//! - [`SharedFrame`]: a server frame encoded once for any number of sockets.
//! - [`deflate`]: permessage-deflate with no context takeover, bounded inflation.
//! - [`mask`]: word-at-a-time unmasking.

pub mod decoder;
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod shared;
pub mod utf8;

pub use decoder::{CloseFrame, Decoded, Decoder, DecoderConfig, Message, MessageRef, Role};
pub use frame::{OpCode, WsError, close_code};
pub use shared::SharedFrame;

use bytes::BufMut;

/// Encodes one frame. Clients must pass a fresh random `mask`; servers pass
/// `None` (and for data that many sockets share, use [`SharedFrame`]).
pub fn encode_frame(out: &mut impl BufMut, fin: bool, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) {
    frame::write_header(out, fin, false, opcode, payload.len(), mask);
    match mask {
        None => out.put_slice(payload),
        Some(key) => {
            let mut masked = payload.to_vec();
            mask::apply_mask(&mut masked, key, 0);
            out.put_slice(&masked);
        }
    }
}

#[cfg(test)]
mod tests;
