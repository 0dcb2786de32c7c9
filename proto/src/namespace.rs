//! Namespaces: per-deployment channel options, shared by gateway and router.
//!
//! A channel's namespace is the part before its first `:` (`chat:general` is
//! in `chat`); channels without one use the default namespace, and channels
//! starting with `#` are personal channels (`#42`: only user 42 may
//! subscribe). The shipped defaults follow the Slack-like conventions of the
//! architecture: `chat` (history + presence), `typing` (client publish,
//! ephemeral), `presence` (router publishes only) and personal channels.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::ReplyError;
use crate::client::channel::ChannelName;

/// Who may publish from a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PublishPolicy {
    /// Only the backend (HTTP API) and the router itself.
    #[default]
    Backend,
    /// Clients subscribed to the channel.
    Subscribers,
    /// Any authenticated (or, where allowed, anonymous) client.
    Clients,
}

/// Who may subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SubscribePolicy {
    /// Any connected client.
    #[default]
    Anyone,
    /// Only with a subscription token for the channel.
    Token,
    /// Only the user(s) named after `#` in the channel name.
    Personal,
}

/// Options of one namespace. Every field has a default, so a TOML table may
/// name only what it changes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceOptions {
    /// Publications kept per channel for recovery and history (0: none).
    /// Memory: about (payload + 100 B) × this, per active channel.
    pub history_size: usize,
    /// Seconds a publication stays in history (0: none).
    pub history_ttl_secs: u64,
    /// No offsets, no history, no recovery (typing indicators).
    pub ephemeral: bool,
    /// Track who is subscribed; answers `presence` and `presence_stats`.
    pub presence: bool,
    /// Send join/leave pushes to subscribers.
    pub join_leave: bool,
    /// Who may publish from a client.
    pub publish: PublishPolicy,
    /// Who may subscribe.
    pub subscribe: SubscribePolicy,
    /// Clients may call `history`.
    pub history_for_clients: bool,
}

impl Default for NamespaceOptions {
    fn default() -> Self {
        NamespaceOptions {
            history_size: 100,
            history_ttl_secs: 300,
            ephemeral: false,
            presence: true,
            join_leave: false,
            publish: PublishPolicy::Subscribers,
            subscribe: SubscribePolicy::Anyone,
            history_for_clients: true,
        }
    }
}

impl NamespaceOptions {
    /// History TTL.
    pub fn history_ttl(&self) -> Duration {
        Duration::from_secs(self.history_ttl_secs)
    }

    /// Whether publications get offsets and clients may recover.
    pub fn positioned(&self) -> bool {
        !self.ephemeral
    }

    /// Whether history is kept.
    pub fn has_history(&self) -> bool {
        !self.ephemeral && self.history_size > 0 && self.history_ttl_secs > 0
    }
}

/// All namespaces of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Namespaces {
    /// Channels without a namespace.
    pub default: NamespaceOptions,
    /// `#user` personal channels.
    pub personal: NamespaceOptions,
    /// Named namespaces.
    pub namespaces: HashMap<String, NamespaceOptions>,
    /// Prefix of the channel the router publishes a user's presence on
    /// (`presence:` → `presence:<user>`).
    pub presence_channel_prefix: String,
}

impl Default for Namespaces {
    fn default() -> Self {
        let mut namespaces = HashMap::new();
        namespaces.insert("chat".to_owned(), NamespaceOptions::default());
        namespaces.insert(
            "typing".to_owned(),
            NamespaceOptions {
                history_size: 0,
                history_ttl_secs: 0,
                ephemeral: true,
                presence: false,
                publish: PublishPolicy::Subscribers,
                history_for_clients: false,
                ..NamespaceOptions::default()
            },
        );
        namespaces.insert(
            "presence".to_owned(),
            NamespaceOptions {
                history_size: 1,
                history_ttl_secs: 3600,
                presence: false,
                publish: PublishPolicy::Backend,
                ..NamespaceOptions::default()
            },
        );
        Namespaces {
            default: NamespaceOptions::default(),
            personal: NamespaceOptions {
                presence: false,
                publish: PublishPolicy::Backend,
                subscribe: SubscribePolicy::Personal,
                ..NamespaceOptions::default()
            },
            namespaces,
            presence_channel_prefix: "presence:".to_owned(),
        }
    }
}

impl Namespaces {
    /// The options for a channel; unknown namespaces are error 102.
    pub fn resolve(&self, channel: &ChannelName<'_>) -> Result<&NamespaceOptions, ReplyError> {
        if channel.full.starts_with('#') {
            return Ok(&self.personal);
        }
        match channel.namespace {
            None => Ok(&self.default),
            Some(ns) => self.namespaces.get(ns).ok_or(ReplyError::UNKNOWN_CHANNEL),
        }
    }

    /// Parses and resolves a channel name in one step.
    pub fn resolve_str<'a>(&'a self, channel: &str) -> Result<&'a NamespaceOptions, ReplyError> {
        let name = ChannelName::parse(channel).map_err(|_| ReplyError::BAD_REQUEST)?;
        self.resolve(&name)
    }

    /// The presence channel of a user.
    pub fn presence_channel(&self, user: &str) -> String {
        format!("{}{}", self.presence_channel_prefix, user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_resolve() {
        let ns = Namespaces::default();
        assert!(ns.resolve_str("chat:general").unwrap().has_history());
        assert!(ns.resolve_str("typing:general").unwrap().ephemeral);
        assert_eq!(ns.resolve_str("#42").unwrap().subscribe, SubscribePolicy::Personal);
        assert_eq!(ns.resolve_str("presence:42").unwrap().publish, PublishPolicy::Backend);
        assert!(ns.resolve_str("test1").unwrap().presence);
        assert_eq!(ns.resolve_str("nope:x"), Err(ReplyError::UNKNOWN_CHANNEL));
        assert_eq!(ns.resolve_str(""), Err(ReplyError::BAD_REQUEST));
        assert_eq!(ns.presence_channel("42"), "presence:42");
    }

    #[test]
    fn toml_tables_override_only_what_they_name() {
        let ns: Namespaces = serde_json::from_str(
            r#"{"namespaces":{"smallhistory":{"history_size":2}},"default":{"presence":false}}"#,
        )
        .unwrap();
        let small = ns.resolve_str("smallhistory:x").unwrap();
        assert_eq!((small.history_size, small.history_ttl_secs), (2, 300));
        assert!(!ns.resolve_str("x").unwrap().presence);
        assert!(serde_json::from_str::<Namespaces>(r#"{"default":{"bogus":1}}"#).is_err());
    }
}
