//! The write path: a bounded per-session queue of shared frames, flushed with
//! one vectored write per batch.
//!
//! A publication reaches a session as a clone of the uplink's `Bytes` (a
//! reference count); the queue never copies it. When the queue goes from empty
//! to non-empty a writer task starts, writes everything queued with `writev`
//! (many frames, one syscall), repeats while more arrived, then exits: an idle
//! session has no writer task and no buffer. A session whose queued bytes
//! would pass the bound is closed with 3008 "slow" without flushing; the core
//! never waits for it.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};
use monoio::buf::IoVecBuf;

/// Frames to write in one `writev`.
pub struct FrameBatch {
    frames: Vec<Bytes>,
    iovecs: Vec<libc::iovec>,
}

impl FrameBatch {
    /// Takes up to `max_bytes` (at least one frame) from the front of `queue`.
    pub fn take(queue: &mut VecDeque<Bytes>, max_bytes: usize, max_frames: usize) -> (FrameBatch, usize) {
        let mut frames = Vec::new();
        let mut bytes = 0;
        while let Some(f) = queue.front() {
            if !frames.is_empty() && (bytes + f.len() > max_bytes || frames.len() >= max_frames) {
                break;
            }
            bytes += f.len();
            frames.push(queue.pop_front().expect("front exists"));
        }
        let mut batch = FrameBatch { frames, iovecs: Vec::new() };
        batch.rebuild();
        (batch, bytes)
    }

    fn rebuild(&mut self) {
        self.iovecs.clear();
        self.iovecs.extend(
            self.frames
                .iter()
                .map(|f| libc::iovec { iov_base: f.as_ptr() as *mut libc::c_void, iov_len: f.len() }),
        );
    }

    /// Bytes left to write.
    pub fn remaining(&self) -> usize {
        self.frames.iter().map(Bytes::len).sum()
    }

    /// Drops the first `n` written bytes.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(f) = self.frames.first_mut() else { break };
            if n >= f.len() {
                n -= f.len();
                self.frames.remove(0);
            } else {
                f.advance(n);
                n = 0;
            }
        }
        self.rebuild();
    }

    /// Whether everything was written.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

// SAFETY: every iovec points into a `Bytes` owned by `self.frames`; `Bytes`
// storage never moves while a handle to it exists, and neither `frames` nor
// `iovecs` is touched while the runtime owns the batch (between submitting
// the writev and getting the batch back). `rebuild` keeps the two in step,
// and the test below checks them against the frames after partial writes.
unsafe impl IoVecBuf for FrameBatch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iovecs.as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iovecs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iovec_bytes(b: &FrameBatch) -> Vec<u8> {
        let mut out = Vec::new();
        for v in &b.iovecs {
            // SAFETY: the iovecs point into frames owned by `b`, alive here.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
        }
        out
    }

    #[test]
    fn batches_share_and_advance() {
        let shared = Bytes::from_static(b"hello");
        let mut q: VecDeque<Bytes> =
            [shared.clone(), Bytes::from_static(b" "), Bytes::from_static(b"world")].into_iter().collect();
        let (mut b, n) = FrameBatch::take(&mut q, 1 << 20, 64);
        assert_eq!(n, 11);
        assert!(q.is_empty());
        assert_eq!(b.frames[0].as_ptr(), shared.as_ptr(), "a queued frame is the shared bytes, not a copy");
        assert_eq!(iovec_bytes(&b), b"hello world");
        b.advance(3);
        assert_eq!(iovec_bytes(&b), b"lo world");
        b.advance(3);
        assert_eq!(iovec_bytes(&b), b"world");
        assert_eq!(b.remaining(), 5);
        b.advance(5);
        assert!(b.is_empty());
    }

    #[test]
    fn batches_respect_the_byte_bound_but_take_one() {
        let mut q: VecDeque<Bytes> = (0..4).map(|_| Bytes::from(vec![0u8; 100])).collect();
        let (b, n) = FrameBatch::take(&mut q, 250, 64);
        assert_eq!((b.frames.len(), n, q.len()), (2, 200, 2));
        let mut q: VecDeque<Bytes> = [Bytes::from(vec![0u8; 1000])].into_iter().collect();
        let (b, _) = FrameBatch::take(&mut q, 10, 64);
        assert_eq!(b.frames.len(), 1);
    }
}
