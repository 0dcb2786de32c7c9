//! Channel names: `namespace:rest`, `#` user limits, and the size bound.

/// Longest channel name accepted (bytes).
pub const MAX_CHANNEL_LEN: usize = 255;

/// A channel name split into the parts that decide its options and permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelName<'a> {
    /// The whole name.
    pub full: &'a str,
    /// The namespace before the first `:`, if any (`chat` in `chat:general`).
    pub namespace: Option<&'a str>,
    /// The users after `#` of a user-limited channel (`#42` or `ns:x#42,43`).
    pub users: Option<&'a str>,
}

/// Why a channel name is refused (answered with error 102 or 107).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// Empty, too long, or with control characters.
    #[error("invalid channel name")]
    Invalid,
}

impl<'a> ChannelName<'a> {
    /// Parses and bounds-checks a channel name.
    pub fn parse(full: &'a str) -> Result<Self, ChannelError> {
        if full.is_empty() || full.len() > MAX_CHANNEL_LEN || full.chars().any(char::is_control) {
            return Err(ChannelError::Invalid);
        }
        let (head, users) = match full.find('#') {
            Some(i) => (&full[..i], Some(&full[i + 1..])),
            None => (full, None),
        };
        let namespace = head.split_once(':').map(|(ns, _)| ns);
        Ok(ChannelName { full, namespace, users })
    }

    /// Whether `user` is among the users a `#` channel is limited to
    /// (always true for channels without `#`).
    pub fn allows_user(&self, user: &str) -> bool {
        match self.users {
            None => true,
            Some(list) => !user.is_empty() && list.split(',').any(|u| u == user),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_namespaces_and_user_limits() {
        let c = ChannelName::parse("chat:general").unwrap();
        assert_eq!((c.namespace, c.users), (Some("chat"), None));
        let c = ChannelName::parse("#42").unwrap();
        assert_eq!((c.namespace, c.users), (None, Some("42")));
        assert!(c.allows_user("42") && !c.allows_user("43") && !c.allows_user(""));
        let c = ChannelName::parse("dm:x#42,43").unwrap();
        assert!(c.allows_user("43"));
        assert_eq!(c.namespace, Some("dm"));
        assert!(ChannelName::parse("").is_err());
        assert!(ChannelName::parse(&"a".repeat(256)).is_err());
        assert!(ChannelName::parse("a\nb").is_err());
    }
}
