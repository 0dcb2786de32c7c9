//! What a gateway link's messages mean for the router, without IO: which
//! shard each message is for, and which stream each message toward the
//! gateway travels on. The QUIC server ([`crate::server`]) and the
//! simulation both route with these.

use proto::cluster::ClusterMsg;
use proto::namespace::Namespaces;
use proto::rendezvous::stable_hash;

use crate::shard::{GatewayId, ShardCmd};

/// Where one message from a gateway goes.
#[derive(Debug)]
pub enum Dispatch<L> {
    /// Answer the heartbeat with this one.
    Heartbeat(ClusterMsg),
    /// Nothing to do (an answer to our heartbeat, a gateway's drain notice).
    Nothing,
    /// Commands for shards: (shard index, command), in order.
    Shards(Vec<(usize, ShardCmd<L>)>),
    /// For another gateway: relay it there (an emulated session's commands).
    Relay(ClusterMsg),
    /// A message a gateway never sends: the link is closed.
    Unexpected(&'static str),
}

/// The shard owning `key` among `shards`.
pub fn shard_of(key: &str, shards: usize) -> usize {
    (stable_hash(key.as_bytes()) % shards.max(1) as u64) as usize
}

/// Routes one message from gateway `gw` over `shards` shards.
pub fn dispatch<L>(gw: GatewayId, msg: ClusterMsg, shards: usize, namespaces: &Namespaces) -> Dispatch<L> {
    let interest = |add: Vec<String>, remove: Vec<String>, snapshot: bool| {
        let mut adds: Vec<Vec<String>> = vec![Vec::new(); shards];
        let mut removes: Vec<Vec<String>> = vec![Vec::new(); shards];
        for c in add {
            adds[shard_of(&c, shards)].push(c);
        }
        for c in remove {
            removes[shard_of(&c, shards)].push(c);
        }
        let cmds = adds
            .into_iter()
            .zip(removes)
            .enumerate()
            .filter(|(_, (a, r))| snapshot || !a.is_empty() || !r.is_empty())
            .map(|(i, (add, remove))| (i, ShardCmd::Interest { gw, add, remove, snapshot }))
            .collect();
        Dispatch::Shards(cmds)
    };
    match msg {
        ClusterMsg::Heartbeat { seq, reply: false } => {
            Dispatch::Heartbeat(ClusterMsg::Heartbeat { seq, reply: true })
        }
        ClusterMsg::Heartbeat { .. } | ClusterMsg::Drain => Dispatch::Nothing,
        ClusterMsg::Subscribe { channels } => interest(channels, Vec::new(), false),
        ClusterMsg::Unsubscribe { channels } => interest(Vec::new(), channels, false),
        ClusterMsg::Snapshot { channels } => interest(channels, Vec::new(), true),
        // A presence round spans every shard: each holds some of the facts.
        m @ (ClusterMsg::PresenceBegin { .. } | ClusterMsg::PresenceEnd { .. }) => {
            Dispatch::Shards((0..shards).map(|i| (i, ShardCmd::Request(gw, m.clone()))).collect())
        }
        m @ (ClusterMsg::Publish { .. }
        | ClusterMsg::Recover { .. }
        | ClusterMsg::History { .. }
        | ClusterMsg::Presence { .. }
        | ClusterMsg::PresenceStats { .. }
        | ClusterMsg::Join { .. }
        | ClusterMsg::Leave { .. }) => {
            let i = shard_of(m.channel().unwrap_or_default(), shards);
            Dispatch::Shards(vec![(i, ShardCmd::Request(gw, m))])
        }
        m @ (ClusterMsg::UserOnline { .. } | ClusterMsg::UserOffline { .. }) => {
            let (ClusterMsg::UserOnline { user, .. } | ClusterMsg::UserOffline { user, .. }) = &m else {
                return Dispatch::Nothing;
            };
            let i = shard_of(&namespaces.presence_channel(user), shards);
            Dispatch::Shards(vec![(i, ShardCmd::Request(gw, m))])
        }
        m @ ClusterMsg::Emulation { .. } => Dispatch::Relay(m),
        other => Dispatch::Unexpected(other.name()),
    }
}

/// The stream a message toward a gateway travels on: `Some(i)`, delivery
/// stream `i` of `k` (deliveries, pushes and positions of a channel always
/// share one, so they stay ordered); `None`, the control stream.
pub fn stream_of(msg: &ClusterMsg, k: usize) -> Option<usize> {
    match msg {
        ClusterMsg::Deliver { channel, .. }
        | ClusterMsg::Push { channel, .. }
        | ClusterMsg::Position { channel, .. } => {
            Some((stable_hash(channel.as_bytes()) % k.max(1) as u64) as usize)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_go_to_their_shard_and_rounds_to_all() {
        let ns = Namespaces::default();
        let d: Dispatch<()> =
            dispatch(1, ClusterMsg::Subscribe { channels: vec!["a".into(), "b".into(), "c".into()] }, 4, &ns);
        let Dispatch::Shards(cmds) = d else { panic!() };
        let total: usize = cmds
            .iter()
            .map(|(_, c)| match c {
                ShardCmd::Interest { add, .. } => add.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(total, 3);
        let Dispatch::Shards(cmds) = dispatch::<()>(1, ClusterMsg::Snapshot { channels: vec![] }, 4, &ns)
        else {
            panic!()
        };
        assert_eq!(cmds.len(), 4, "a snapshot clears every shard");
        let Dispatch::Shards(cmds) = dispatch::<()>(1, ClusterMsg::PresenceEnd { round: 3 }, 3, &ns) else {
            panic!()
        };
        assert_eq!(cmds.len(), 3);
        let online = ClusterMsg::UserOnline { user: "42".into(), client: "c".into() };
        let Dispatch::Shards(cmds) = dispatch::<()>(1, online, 8, &ns) else { panic!() };
        assert_eq!(cmds[0].0, shard_of("presence:42", 8));
        assert!(matches!(
            dispatch::<()>(
                1,
                ClusterMsg::Welcome { version: 3, router_id: String::new(), instance: 0 },
                2,
                &ns
            ),
            Dispatch::Unexpected("welcome")
        ));
        let deliver = ClusterMsg::Position { channel: "x".into(), epoch: "e".into(), top: 1 };
        assert_eq!(stream_of(&deliver, 4), Some(shard_of("x", 4)));
        assert_eq!(stream_of(&ClusterMsg::Drain, 4), None);
    }
}
