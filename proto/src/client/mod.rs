//! The client protocol: Centrifugo client protocol v2, JSON, as
//! `client-protocol.md` gives it, so unmodified `centrifuge-js` and
//! `centrifuge-python` work.
//!
//! - [`command`]: decoding client commands (several per frame, in order).
//! - [`reply`]: replies and pushes written straight to bytes; a publication
//!   push is built once per (channel, publication) with [`reply::pub_push`].
//! - [`codes`]: reply error codes and disconnect (close) codes.
//! - [`claims`]: JWT claims of connection and subscription tokens.
//! - [`channel`]: channel names, namespaces and user limits.

pub mod channel;
pub mod claims;
pub mod codes;
pub mod command;
pub mod reply;

pub use codes::{Disconnect, ReplyError};
pub use command::{Command, DecodeError, Method, decode_command, decode_frame};
pub use reply::{Publication, SubscribeResult};
