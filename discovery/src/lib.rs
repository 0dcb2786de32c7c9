//! # Switchyard `discovery`: where the routers are
//!
//! The embedded default needs none of this: one router, or a static list
//! in each config. A cluster that grows and shrinks finds its routers here:
//!
//! - [`etcd`] (cargo feature `etcd`): a router registers itself under a key
//!   prefix with a lease it keeps alive ([`etcd::register`]), and routers
//!   and gateways watch the prefix ([`etcd::watch_views`]) into
//!   [`proto::membership::View`]s stamped with etcd's revision; ownership
//!   and the fencing rule live with the view in `proto::membership`.
//! - [`dns`]: a name re-resolved on an interval (A/AAAA records; a
//!   Kubernetes headless Service lists its ready pods that way).
//!
//! [`EtcdConfig`] is the `[etcd]` section both binaries read.

#![warn(missing_docs, unreachable_pub)]

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod dns;
#[cfg(feature = "etcd")]
pub mod etcd;

/// Where the cluster's membership lives in etcd (the `[etcd]` section of
/// the router's and the gateway's config). Unset (no endpoints): no etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// etcd endpoints, `host:port` or `http://host:port` (default none:
    /// membership comes from the static lists).
    pub endpoints: Vec<String>,
    /// Key prefix routers register under, `PREFIX + name` (default
    /// `/switchyard/routers/`).
    pub prefix: String,
    /// Lease TTL in seconds (default 5). A router that stops keeping its
    /// lease alive (crashed, stopped, cut off from etcd) loses its channels
    /// this long after its last keep-alive; shorter moves them sooner and
    /// sends more keep-alives (one every TTL/3). At least 2.
    pub lease_ttl_secs: u64,
    /// Seconds one etcd request may take before it counts as failed and
    /// the client reconnects (default 2).
    pub request_timeout_secs: u64,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: Vec::new(),
            prefix: "/switchyard/routers/".into(),
            lease_ttl_secs: 5,
            request_timeout_secs: 2,
        }
    }
}

impl EtcdConfig {
    /// Whether etcd is configured.
    pub fn enabled(&self) -> bool {
        !self.endpoints.is_empty()
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_secs.max(2))
    }

    /// How often the lease is kept alive (a third of the TTL).
    pub fn keep_alive_every(&self) -> Duration {
        self.ttl() / 3
    }

    /// How far short of etcd's answer a router assumes its lease ends
    /// (a fifth of the TTL, at least 500 ms): room for clock-rate
    /// differences and for the time between a check and the offset it
    /// guards.
    pub fn fence_margin(&self) -> Duration {
        (self.ttl() / 5).max(Duration::from_millis(500))
    }

    /// One request's deadline.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }

    /// Refuses settings that cannot work, naming the key. `built_with_etcd`
    /// is the calling binary's own `cfg!(feature = "etcd")` (cargo unifies
    /// this crate's features across a workspace build, so its own flag does
    /// not say whether the binary runs the etcd code).
    pub fn check(&self, built_with_etcd: bool) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        if !self.prefix.ends_with('/') {
            return Err(format!("etcd.prefix {:?} must end with '/'", self.prefix));
        }
        if self.lease_ttl_secs < 2 {
            return Err(format!("etcd.lease_ttl_secs is {}; at least 2", self.lease_ttl_secs));
        }
        if !built_with_etcd {
            return Err("etcd.endpoints is set but this binary was built without etcd support \
                        (build with `--features etcd`; etcd-client needs protoc)"
                .into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_off_and_timings_follow_the_ttl() {
        let c = EtcdConfig::default();
        assert!(!c.enabled() && c.check(false).is_ok());
        assert_eq!(c.keep_alive_every(), Duration::from_secs(5) / 3);
        assert_eq!(c.fence_margin(), Duration::from_secs(1));
        let short = EtcdConfig { endpoints: vec!["127.0.0.1:2379".into()], lease_ttl_secs: 1, ..c.clone() };
        assert!(short.check(true).is_err());
        let on = EtcdConfig { endpoints: vec!["127.0.0.1:2379".into()], ..c.clone() };
        assert!(on.check(true).is_ok() && on.check(false).unwrap_err().contains("--features etcd"));
        let bad = EtcdConfig { endpoints: vec!["127.0.0.1:2379".into()], prefix: "/x".into(), ..c };
        assert!(bad.check(true).unwrap_err().contains("prefix"));
    }
}
