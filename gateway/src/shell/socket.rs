//! The syscalls of a session's socket: one non-blocking `recv` into the
//! core's scratch buffer, and the write path — a session's queue of shared
//! frames flushed with one non-blocking `send` (one frame) or vectored
//! `sendmsg` (several) per batch.
//!
//! A publication reaches a session as a clone of the uplink's `Bytes` (a
//! reference count); the queue never copies it. Queueing only marks the
//! session dirty; the core's flusher writes every dirty session once per
//! event-loop turn, so frames that arrive in the same turn leave in one
//! syscall, and no task or future exists per connection. A socket whose
//! buffer is full is watched for writability in the core's readiness set
//! and flushed again when it drains.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use bytes::{Buf, Bytes, BytesMut};

pub use crate::session::outbound::{Flushed, Written};

/// One non-blocking `recv` into the spare capacity of `buf`.
pub fn recv_into(fd: RawFd, buf: &mut BytesMut) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: `recv` writes at most `spare.len()` bytes into memory we own
    // (the buffer's spare capacity), and we mark exactly the bytes it wrote
    // as initialized below.
    let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), spare.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel initialized `n` bytes right after the current length.
    unsafe { buf.set_len(buf.len() + n as usize) };
    Ok(n as usize)
}

/// Frames gathered into one `sendmsg` at most.
pub const MAX_IOVECS: usize = 64;

/// Writes as much of `queue` as the socket takes without blocking, dropping
/// what was written (a partly written frame keeps its tail, and must be
/// finished before anything else goes out).
/// Returns what happened and the bytes written.
///
/// `ends`: the socket is closed or shut down right after the queue is
/// written, so the bytes go with `MSG_MORE`: the kernel holds the last
/// segment for the FIN, which joins it (one segment instead of two, and on
/// loopback one receive and one wake-up of the peer less, paid by this
/// core). Whatever the FIN does not take leaves as acknowledgements free
/// the socket, as without the flag.
pub fn flush_queue(fd: RawFd, queue: &mut VecDeque<Bytes>, ends: bool) -> (io::Result<Flushed>, Written) {
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | if ends { libc::MSG_MORE } else { 0 };
    let mut written = Written::default();
    loop {
        // An empty frame carries nothing (a send of nothing is no progress).
        while queue.front().is_some_and(|f| f.is_empty()) {
            queue.pop_front();
        }
        if queue.is_empty() {
            return (Ok(Flushed::All), written);
        }
        let (r, want) = if queue.len() == 1 {
            // The common case of a delivery: one frame, one plain `send`
            // (no message header or vector for the kernel to copy in).
            let f = &queue[0];
            // SAFETY: `f` is a `Bytes` held by `queue`, not touched until the
            // call returns; the kernel only reads its `f.len()` bytes.
            let r = unsafe { libc::send(fd, f.as_ptr().cast(), f.len(), flags) };
            (r, f.len())
        } else {
            send_vectored(fd, queue, flags)
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => (Ok(Flushed::Blocked), written),
                io::ErrorKind::Interrupted => continue,
                _ => (Err(e), written),
            };
        }
        let mut done = r as usize;
        written.bytes += done;
        while done > 0 {
            let front = queue.front_mut().expect("written bytes come from queued frames");
            if done >= front.len() {
                done -= front.len();
                queue.pop_front();
                written.front_started = false;
            } else {
                front.advance(done);
                done = 0;
                written.front_started = true;
            }
        }
        if (r as usize) < want {
            return (Ok(Flushed::Blocked), written);
        }
    }
}

/// One `sendmsg` of the first [`MAX_IOVECS`] frames of `queue`: what it
/// returned, and the bytes it was given.
fn send_vectored(fd: RawFd, queue: &VecDeque<Bytes>, flags: i32) -> (isize, usize) {
    let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOVECS];
    let mut n = 0;
    let mut want = 0;
    for f in queue.iter().take(MAX_IOVECS) {
        iov[n] = libc::iovec { iov_base: f.as_ptr() as *mut libc::c_void, iov_len: f.len() };
        want += f.len();
        n += 1;
    }
    // SAFETY: a zeroed msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = n as _;
    // SAFETY: every iovec points into a `Bytes` held by `queue`, which is
    // not touched until the call returns; the kernel only reads them.
    let r = unsafe { libc::sendmsg(fd, &msg, flags) };
    (r, want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn writes_shared_frames_in_order_and_keeps_the_tail_when_the_socket_is_full() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let shared = Bytes::from(vec![7u8; 1000]);
        let mut q: VecDeque<Bytes> = (0..4).map(|_| shared.clone()).collect();
        q.push_back(Bytes::from_static(b"end"));
        let (r, n) = flush_queue(a.as_raw_fd(), &mut q, false);
        assert_eq!((r.unwrap(), n.bytes), (Flushed::All, 4003));
        assert!(q.is_empty());
        let mut got = vec![0u8; 4003];
        b.read_exact(&mut got).unwrap();
        assert!(got[..4000].iter().all(|&x| x == 7) && &got[4000..] == b"end");

        // Fill the socket: the flush stops, keeps what is left, and resumes.
        let big = Bytes::from(vec![1u8; 1 << 20]);
        let mut q: VecDeque<Bytes> = [big.clone(), big].into_iter().collect();
        let (r, w) = flush_queue(a.as_raw_fd(), &mut q, false);
        assert_eq!(r.unwrap(), Flushed::Blocked);
        let left: usize = q.iter().map(Bytes::len).sum();
        assert_eq!(w.bytes + left, 2 << 20, "nothing lost or doubled");
        assert_eq!(w.front_started, q.front().unwrap().len() < 1 << 20);
        let n = w.bytes;
        b.set_nonblocking(true).unwrap();
        let mut sink = vec![0u8; 1 << 16];
        let mut drained = 0;
        let mut total = n;
        while !q.is_empty() {
            while let Ok(k) = b.read(&mut sink) {
                drained += k;
            }
            let (r, w) = flush_queue(a.as_raw_fd(), &mut q, false);
            r.unwrap();
            total += w.bytes;
        }
        while drained < total {
            if let Ok(k) = b.read(&mut sink) {
                drained += k;
            }
        }
        assert_eq!(drained, 2 << 20);
    }

    #[test]
    fn a_lone_frame_larger_than_the_socket_takes_keeps_its_tail() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut q: VecDeque<Bytes> = [Bytes::from(vec![3u8; 1 << 20])].into_iter().collect();
        let (r, w) = flush_queue(a.as_raw_fd(), &mut q, false);
        assert_eq!(r.unwrap(), Flushed::Blocked);
        assert!(w.front_started && w.bytes > 0);
        assert_eq!(w.bytes + q[0].len(), 1 << 20, "nothing lost or doubled");
        b.set_nonblocking(true).unwrap();
        let (mut drained, mut total, mut sink) = (0, w.bytes, vec![0u8; 1 << 16]);
        while !q.is_empty() || drained < total {
            while let Ok(k) = b.read(&mut sink) {
                assert!(sink[..k].iter().all(|&x| x == 3));
                drained += k;
            }
            total += flush_queue(a.as_raw_fd(), &mut q, false).1.bytes;
        }
        assert_eq!(drained, 1 << 20);
    }

    #[test]
    fn empty_frames_are_dropped_and_never_spin() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut q: VecDeque<Bytes> = [Bytes::new(), Bytes::from_static(b"x"), Bytes::new()].into();
        let (r, w) = flush_queue(a.as_raw_fd(), &mut q, false);
        assert_eq!((r.unwrap(), w.bytes), (Flushed::All, 1));
        assert!(q.is_empty());
        let mut got = [0u8; 1];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut q: VecDeque<Bytes> = [Bytes::from_static(b"x")].into_iter().collect();
        let (r, _) = flush_queue(a.as_raw_fd(), &mut q, false);
        assert!(r.is_err());
    }
}
