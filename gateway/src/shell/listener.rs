//! Each core's `SO_REUSEPORT` listener and how connections are taken from it.
//!
//! The listener sits in the core's readiness set beside the established
//! sockets ([`super::poller`]), under the token [`LISTENER`]: when the kernel
//! has connections queued, the reactor takes up to [`ACCEPTS_PER_TURN`] of
//! them with non-blocking `accept4` calls in that turn. A storm therefore
//! costs one system call per connection and one wake-up per batch (no
//! runtime operation, timer or task per accept), and the bound per turn
//! keeps established sessions served between batches (level-triggered: what
//! is left is reported again next turn).
//!
//! `TCP_NODELAY` is set on the listener; accepted sockets inherit it (Linux
//! clones the listening socket's options), so there is no `setsockopt` per
//! connection.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The readiness-set token of the core's listener (session ids start at 1).
pub const LISTENER: u64 = 0;

/// Connections one core accepts per reactor turn at most.
pub const ACCEPTS_PER_TURN: usize = 256;

/// Kernel backlog of each core's listener.
pub const BACKLOG: i32 = 4096;

/// Binds `addr` with `SO_REUSEPORT` (every core, and every gateway process
/// on the box, binds the same address; the kernel spreads connections over
/// them), non-blocking, with `TCP_NODELAY` and, unless 0, a `send_buffer`
/// of that many bytes for the sockets it accepts.
pub fn bind(addr: SocketAddr, send_buffer: usize) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    if send_buffer > 0 {
        socket.set_send_buffer_size(send_buffer)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// What one `accept4` gave.
#[derive(Debug)]
pub enum Accepted {
    /// A connection (blocking mode: the gateway reads and writes it with
    /// `MSG_DONTWAIT`, and the runtime may adopt it for a refusal).
    Socket(OwnedFd),
    /// Nothing queued now.
    Empty,
    /// A resource error (EMFILE, ENFILE, ENOBUFS, ENOMEM): the caller backs
    /// off instead of retrying at once.
    Exhausted(io::Error),
}

/// Takes one queued connection without blocking. Errors that concern only
/// the connection being accepted (it was reset before we took it) are
/// skipped over.
pub fn accept(listener: &std::net::TcpListener) -> Accepted {
    loop {
        // SAFETY: plain syscall on our listening socket; no address is asked for.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: `accept4` returned a new descriptor that nobody else owns.
            return Accepted::Socket(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => return Accepted::Empty,
            Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO | libc::EPERM) => continue,
            _ => return Accepted::Exhausted(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn accepted_sockets_inherit_nodelay_and_an_empty_queue_does_not_block() {
        let l = bind("127.0.0.1:0".parse().unwrap(), 65536).unwrap();
        assert!(matches!(accept(&l), Accepted::Empty));
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let fd = loop {
            match accept(&l) {
                Accepted::Socket(fd) => break fd,
                Accepted::Empty => std::thread::sleep(std::time::Duration::from_millis(1)),
                Accepted::Exhausted(e) => panic!("{e}"),
            }
        };
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one int into `v`.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!((r, v), (0, 1), "TCP_NODELAY comes from the listener");
        let buf = socket2::SockRef::from(&fd).send_buffer_size().unwrap();
        assert_eq!(buf, 2 * 65536, "so does the send buffer (doubled by the kernel)");
        assert!(matches!(accept(&l), Accepted::Empty));
    }

    #[test]
    fn two_listeners_share_one_port() {
        let a = bind("127.0.0.1:0".parse().unwrap(), 0).unwrap();
        let b = bind(a.local_addr().unwrap(), 0).unwrap();
        assert_eq!(a.local_addr().unwrap(), b.local_addr().unwrap());
    }
}
