//! JWT claims of connection and subscription tokens (section 6 of
//! `client-protocol.md`). Pure data: signature checks live where the keys are.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::value::RawValue;

/// A boolean override in a token (`{"value": true}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct BoolOverride {
    /// The value.
    pub value: bool,
}

/// Per-channel option overrides carried by tokens.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Overrides {
    /// Presence on/off.
    pub presence: Option<BoolOverride>,
    /// Join/leave pushes on/off.
    pub join_leave: Option<BoolOverride>,
    /// Force join/leave pushes.
    pub force_push_join_leave: Option<BoolOverride>,
    /// Force recovery.
    pub force_recovery: Option<BoolOverride>,
    /// Force positioning.
    pub force_positioning: Option<BoolOverride>,
}

/// `subs` entry of a connection token: a server-side subscription.
#[derive(Debug, Default, Deserialize)]
pub struct TokenSub {
    /// Becomes `chan_info`.
    #[serde(default)]
    pub info: Option<Box<RawValue>>,
    /// Overrides for this channel.
    #[serde(default, rename = "override")]
    pub overrides: Option<Overrides>,
}

/// Claims of a connection token.
#[derive(Debug, Default, Deserialize)]
pub struct ConnectionClaims {
    /// User id; missing or empty means anonymous.
    #[serde(default)]
    pub sub: String,
    /// Expiry (seconds since the epoch); also sets the connection's expiry.
    #[serde(default)]
    pub exp: Option<u64>,
    /// Not valid before (seconds since the epoch).
    #[serde(default)]
    pub nbf: Option<u64>,
    /// Issued at.
    #[serde(default)]
    pub iat: Option<u64>,
    /// Becomes `conn_info` in every `ClientInfo` of this connection.
    #[serde(default)]
    pub info: Option<Box<RawValue>>,
    /// Server-side subscriptions (not permissions).
    #[serde(default)]
    pub channels: Vec<String>,
    /// Server-side subscriptions with options.
    #[serde(default)]
    pub subs: HashMap<String, TokenSub>,
    /// Connection expiry decoupled from `exp`; 0 = never.
    #[serde(default)]
    pub expire_at: Option<u64>,
}

impl ConnectionClaims {
    /// When the connection expires (seconds since the epoch), if it does.
    pub fn expires_at(&self) -> Option<u64> {
        match self.expire_at {
            Some(0) => None,
            Some(t) => Some(t),
            None => self.exp,
        }
    }
}

/// Claims of a subscription token.
#[derive(Debug, Default, Deserialize)]
pub struct SubscriptionClaims {
    /// Must equal the requested channel.
    #[serde(default)]
    pub channel: String,
    /// Must equal the connection's user.
    #[serde(default)]
    pub sub: String,
    /// Becomes `chan_info`.
    #[serde(default)]
    pub info: Option<Box<RawValue>>,
    /// Expiry.
    #[serde(default)]
    pub exp: Option<u64>,
    /// Not valid before (seconds since the epoch).
    #[serde(default)]
    pub nbf: Option<u64>,
    /// Subscription expiry decoupled from `exp`; 0 = never.
    #[serde(default)]
    pub expire_at: Option<u64>,
    /// Binds the token to one client id.
    #[serde(default)]
    pub client: Option<String>,
    /// Option overrides.
    #[serde(default, rename = "override")]
    pub overrides: Option<Overrides>,
}

impl SubscriptionClaims {
    /// When the subscription expires, if it does.
    pub fn expires_at(&self) -> Option<u64> {
        match self.expire_at {
            Some(0) => None,
            Some(t) => Some(t),
            None => self.exp,
        }
    }
}

/// The time claims every token kind carries, checked by the verifier
/// against the time it is given (never the clock it runs on).
pub trait TimeClaims {
    /// `exp`.
    fn exp(&self) -> Option<u64>;
    /// `nbf`.
    fn nbf(&self) -> Option<u64>;
}

impl TimeClaims for ConnectionClaims {
    fn exp(&self) -> Option<u64> {
        self.exp
    }
    fn nbf(&self) -> Option<u64> {
        self.nbf
    }
}

impl TimeClaims for SubscriptionClaims {
    fn exp(&self) -> Option<u64> {
        self.exp
    }
    fn nbf(&self) -> Option<u64> {
        self.nbf
    }
}
