//! One readiness set per core: every established connection's socket is in
//! the core's epoll set, keyed by session id, so an idle connection costs a
//! small record and a kernel epoll item, and no task, future, in-flight
//! operation or buffer. The core's reactor task waits for the epoll fd itself
//! to become readable (a single io_uring POLL_ADD, or the fallback driver's
//! readiness), then collects the ready sessions with a non-blocking
//! `epoll_wait` and reads each synchronously into the core's scratch buffer.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Interest in input and hang-up.
pub const READ: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
/// Interest in writability (a socket whose buffer was full).
pub const WRITE: u32 = libc::EPOLLOUT as u32;
/// Events that mean the connection is over or in error (always reported).
pub const HANGUP: u32 = (libc::EPOLLHUP | libc::EPOLLERR) as u32;

/// Events one `epoll_wait` collects at most.
pub const EVENTS_PER_WAIT: usize = 512;

/// A core's epoll set (level-triggered, so a session that left bytes unread
/// is reported again on the next turn: fairness without bookkeeping).
pub struct Poller {
    epoll: OwnedFd,
}

impl Poller {
    /// A new, empty set.
    pub fn new() -> io::Result<Poller> {
        // SAFETY: plain syscall; a non-negative result is a new fd we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(Poller { epoll: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Changes what `fd` is watched for, from the events `from` (0: not in
    /// the set) to `to` (0: out of the set).
    pub fn change(&self, fd: RawFd, token: u64, from: u32, to: u32) -> io::Result<()> {
        if from == to {
            return Ok(());
        }
        let op = match (from, to) {
            (0, _) => libc::EPOLL_CTL_ADD,
            (_, 0) => libc::EPOLL_CTL_DEL,
            _ => libc::EPOLL_CTL_MOD,
        };
        let mut ev = libc::epoll_event { events: to, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        let r = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Collects ready tokens without blocking; returns how many were written.
    pub fn ready(&self, events: &mut [libc::epoll_event]) -> usize {
        let max = events.len().min(i32::MAX as usize) as i32;
        // SAFETY: the kernel writes at most `max` events into `events`.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), max, 0) };
        n.max(0) as usize
    }

    /// A pollable handle on the set for the runtime: it becomes readable
    /// when any watched socket is ready. Only its readiness is used; nothing
    /// is ever read from or written to it.
    pub fn waiter(&self) -> io::Result<monoio::net::UnixStream> {
        let dup = self.epoll.try_clone()?;
        // The runtime only polls the descriptor (POLL_ADD under io_uring,
        // registration under the fallback driver); it never treats it as a
        // socket, and closes it on drop.
        let std = std::os::unix::net::UnixStream::from(dup);
        monoio::net::UnixStream::from_std(std)
    }
}

/// An empty event array for [`Poller::ready`].
pub fn events() -> Vec<libc::epoll_event> {
    vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reports_the_token_of_a_readable_socket_until_it_is_removed() {
        let p = Poller::new().unwrap();
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        p.change(b.as_raw_fd(), 42, 0, READ).unwrap();
        let mut ev = events();
        assert_eq!(p.ready(&mut ev), 0, "nothing to read yet");
        a.write_all(b"x").unwrap();
        assert_eq!(p.ready(&mut ev), 1);
        assert_eq!({ ev[0].u64 }, 42);
        assert_eq!(p.ready(&mut ev), 1, "level-triggered: still unread");
        p.change(b.as_raw_fd(), 42, READ, 0).unwrap();
        assert_eq!(p.ready(&mut ev), 0);
    }
}
