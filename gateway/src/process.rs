//! Process set-up: the open-file limit.
//!
//! Every connection is a descriptor, and the usual soft limit (1,024) is
//! far below what a gateway or a load generator holds; the hard limit is
//! what the operator allowed. A process raises its soft limit to the hard
//! one at start and sizes itself from what it got.

/// Descriptors kept for everything but connections (listeners, the QUIC
/// socket, logs, the admin port, epoll sets, pipes), or a quarter of a
/// small limit.
pub const RESERVED_FDS: u64 = 256;

/// Raises the soft open-file limit to the hard limit; returns the soft
/// limit now in force.
pub fn raise_open_files() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads one rlimit from `raised`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    lim.rlim_cur
}

/// Connections a process can hold with `limit` descriptors.
pub fn connections_for(limit: u64) -> u64 {
    limit.saturating_sub(RESERVED_FDS.min(limit / 4)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_one() {
        let got = raise_open_files();
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes one rlimit into `lim`.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!((got, lim.rlim_cur), (lim.rlim_max, lim.rlim_max));
        assert_eq!(connections_for(20_000), 19_744);
        assert_eq!(connections_for(64), 48);
    }
}
