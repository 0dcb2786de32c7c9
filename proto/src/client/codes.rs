//! Reply error codes and disconnect codes of the client protocol (section 4 of
//! `client-protocol.md`). The numbers are what unmodified SDKs act on: codes
//! 3000–3499 reconnect, 3500–3999 stop for good.

/// An error in a reply: `{"id":N,"error":{"code":C,"message":"…"}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyError {
    /// Protocol error code (100–113).
    pub code: u32,
    /// Always present (centrifuge-python indexes it).
    pub message: &'static str,
    /// Tells the SDK to retry with backoff.
    pub temporary: bool,
}

impl ReplyError {
    /// An error with its own message (for a known code).
    pub const fn new(code: u32, message: &'static str, temporary: bool) -> Self {
        ReplyError { code, message, temporary }
    }
    /// 100, temporary.
    pub const INTERNAL: ReplyError = ReplyError::new(100, "internal server error", true);
    /// 101.
    pub const UNAUTHORIZED: ReplyError = ReplyError::new(101, "unauthorized", false);
    /// 102.
    pub const UNKNOWN_CHANNEL: ReplyError = ReplyError::new(102, "unknown channel", false);
    /// 103.
    pub const PERMISSION_DENIED: ReplyError = ReplyError::new(103, "permission denied", false);
    /// 104.
    pub const METHOD_NOT_FOUND: ReplyError = ReplyError::new(104, "method not found", false);
    /// 105.
    pub const ALREADY_SUBSCRIBED: ReplyError = ReplyError::new(105, "already subscribed", false);
    /// 106.
    pub const LIMIT_EXCEEDED: ReplyError = ReplyError::new(106, "limit exceeded", false);
    /// 107.
    pub const BAD_REQUEST: ReplyError = ReplyError::new(107, "bad request", false);
    /// 108.
    pub const NOT_AVAILABLE: ReplyError = ReplyError::new(108, "not available", false);
    /// 109.
    pub const TOKEN_EXPIRED: ReplyError = ReplyError::new(109, "token expired", false);
    /// 110.
    pub const EXPIRED: ReplyError = ReplyError::new(110, "expired", false);
    /// 111, temporary.
    pub const TOO_MANY_REQUESTS: ReplyError = ReplyError::new(111, "too many requests", true);
    /// 112.
    pub const UNRECOVERABLE_POSITION: ReplyError = ReplyError::new(112, "unrecoverable position", false);

    /// 100, temporary: the router holds its `max_channels` and refuses a
    /// new channel until idle ones are evicted.
    pub const CHANNEL_LIMIT: ReplyError = ReplyError::new(100, "channel limit reached", true);

    /// 100, temporary: the router asked does not own the channel under a
    /// live lease (its ownership is moving); a retry finds the new owner.
    pub const NOT_OWNER: ReplyError = ReplyError::new(100, "channel owner moving", true);

    /// Looks up an error received from the router, keeping its semantics and,
    /// for the errors with a message of their own, that message.
    pub fn from_router(code: u32, message: &str) -> ReplyError {
        match (code, message) {
            (100, m) if m == Self::CHANNEL_LIMIT.message => Self::CHANNEL_LIMIT,
            (100, m) if m == Self::NOT_OWNER.message => Self::NOT_OWNER,
            _ => Self::from_code(code),
        }
    }

    /// Looks up a code received from elsewhere (the router), keeping its semantics.
    pub fn from_code(code: u32) -> ReplyError {
        match code {
            101 => Self::UNAUTHORIZED,
            102 => Self::UNKNOWN_CHANNEL,
            103 => Self::PERMISSION_DENIED,
            104 => Self::METHOD_NOT_FOUND,
            105 => Self::ALREADY_SUBSCRIBED,
            106 => Self::LIMIT_EXCEEDED,
            107 => Self::BAD_REQUEST,
            108 => Self::NOT_AVAILABLE,
            109 => Self::TOKEN_EXPIRED,
            110 => Self::EXPIRED,
            111 => Self::TOO_MANY_REQUESTS,
            112 => Self::UNRECOVERABLE_POSITION,
            _ => Self::INTERNAL,
        }
    }
}

/// A disconnect: the WebSocket close code and a short plain-words reason
/// (never valid JSON: centrifuge-js tries `JSON.parse` on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnect {
    /// Close code (3000–4999).
    pub code: u16,
    /// Reason, plain words, well under the 123-byte limit.
    pub reason: &'static str,
}

impl Disconnect {
    const fn new(code: u16, reason: &'static str) -> Self {
        Disconnect { code, reason }
    }
    /// 3001: server shutdown or drain; reconnect.
    pub const SHUTDOWN: Disconnect = Disconnect::new(3001, "shutdown");
    /// 3004: internal error; reconnect.
    pub const INTERNAL: Disconnect = Disconnect::new(3004, "internal server error");
    /// 3005: connection token expired and not refreshed; reconnect with a new token.
    pub const EXPIRED: Disconnect = Disconnect::new(3005, "connection expired");
    /// 3006: subscription expired; reconnect.
    pub const SUBSCRIPTION_EXPIRED: Disconnect = Disconnect::new(3006, "subscription expired");
    /// 3008: outbound queue over its bound; reconnect and recover.
    pub const SLOW: Disconnect = Disconnect::new(3008, "slow");
    /// 3009: a write failed or timed out; reconnect.
    pub const WRITE_ERROR: Disconnect = Disconnect::new(3009, "write error");
    /// 3010: the server lost publications toward this client; reconnect and recover.
    pub const INSUFFICIENT_STATE: Disconnect = Disconnect::new(3010, "insufficient state");
    /// 3011: rebalance; reconnect.
    pub const FORCE_RECONNECT: Disconnect = Disconnect::new(3011, "force reconnect");
    /// 3012: no pong within the deadline; reconnect.
    pub const NO_PONG: Disconnect = Disconnect::new(3012, "no pong");
    /// 3013: too many requests; reconnect later.
    pub const TOO_MANY_REQUESTS: Disconnect = Disconnect::new(3013, "too many requests");
    /// 3500: invalid token; final.
    pub const INVALID_TOKEN: Disconnect = Disconnect::new(3500, "invalid token");
    /// 3501: bad request; final.
    pub const BAD_REQUEST: Disconnect = Disconnect::new(3501, "bad request");
    /// 3502: no connect command in time; final.
    pub const STALE: Disconnect = Disconnect::new(3502, "stale");
    /// 3503: disconnected by the server API; final.
    pub const FORCE_DISCONNECT: Disconnect = Disconnect::new(3503, "force disconnect");
    /// 3504: too many connections; final.
    pub const CONNECTION_LIMIT: Disconnect = Disconnect::new(3504, "connection limit");
    /// 3505: too many channels; final.
    pub const CHANNEL_LIMIT: Disconnect = Disconnect::new(3505, "channel limit");
    /// 3506: wrong protocol; final.
    pub const INAPPROPRIATE_PROTOCOL: Disconnect = Disconnect::new(3506, "inappropriate protocol");
    /// 3507: permission denied; final.
    pub const PERMISSION_DENIED: Disconnect = Disconnect::new(3507, "permission denied");
    /// 3508: not available; final.
    pub const NOT_AVAILABLE: Disconnect = Disconnect::new(3508, "not available");
    /// 3509: too many errors; final.
    pub const TOO_MANY_ERRORS: Disconnect = Disconnect::new(3509, "too many errors");

    /// Whether SDKs reconnect after this code (both SDKs' rule).
    pub fn reconnect(code: u16) -> bool {
        !matches!(code, 3500..=3999 | 4500..=4999)
    }
}

/// Unsubscribe push codes.
pub mod unsubscribe_code {
    /// Server unsubscribed the client; final.
    pub const SERVER: u32 = 2000;
    /// Insufficient state: resubscribe with recovery.
    pub const INSUFFICIENT_STATE: u32 = 2500;
    /// Subscription expired: resubscribe.
    pub const EXPIRED: u32 = 2501;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_rule() {
        for c in [1000, 1006, 1009, 3001, 3008, 3499, 4000, 4499, 5000] {
            assert!(Disconnect::reconnect(c), "{c}");
        }
        for c in [3500, 3501, 3999, 4500, 4999] {
            assert!(!Disconnect::reconnect(c), "{c}");
        }
    }

    #[test]
    fn reasons_are_not_json() {
        for d in [Disconnect::SHUTDOWN, Disconnect::SLOW, Disconnect::BAD_REQUEST, Disconnect::NO_PONG] {
            assert!(serde_json::from_str::<serde_json::Value>(d.reason).is_err());
            assert!(d.reason.len() < 123);
        }
    }

    #[test]
    fn router_errors_keep_their_own_messages() {
        assert_eq!(ReplyError::from_router(100, "channel limit reached"), ReplyError::CHANNEL_LIMIT);
        assert_eq!(ReplyError::from_router(100, "whatever"), ReplyError::INTERNAL);
        assert_eq!(ReplyError::from_router(103, "permission denied"), ReplyError::PERMISSION_DENIED);
        assert_eq!(ReplyError::from_router(999, ""), ReplyError::INTERNAL);
    }
}
