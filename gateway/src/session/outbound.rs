//! A session's bounded outbound queue of shared frames.
//!
//! A publication reaches a session as a clone of one `Bytes` (a reference
//! count); the queue never copies it. The shell writes the queue with one
//! vectored non-blocking send per batch ([`crate::shell::socket`]) and tells
//! the machine what it wrote. The bound is in bytes: a frame that would pass
//! it closes the session with 3008 "slow" (see [`super::Session::queue`]).

use std::collections::VecDeque;

use bytes::Bytes;

use super::Due;

/// What a flush wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Bytes written.
    pub bytes: usize,
    /// Whether the queue's front frame is now partly written (meaningful
    /// when `bytes > 0`; otherwise the front is as before).
    pub front_started: bool,
    /// Whether the socket took bytes that are not counted in `bytes`
    /// (TLS records sealed in an earlier flush): progress all the same.
    pub sent: bool,
}

/// What a flush achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Everything queued was written.
    All,
    /// The socket's buffer is full: wait for writability.
    Blocked,
}

/// The queue, in 40 bytes.
#[derive(Debug, Default)]
pub struct Outbound {
    frames: VecDeque<Bytes>,
    /// Bytes queued, below [`MAX_QUEUE_BYTES`], and in [`FRONT_STARTED`]
    /// whether the front frame is partly written (its tail must go out
    /// before anything else, or the stream's framing breaks).
    bytes: u32,
    /// Since when the socket has been full with no progress (none when
    /// it is not).
    blocked_since: Due,
}

/// The bit of `Outbound::bytes` that says the front frame is started.
const FRONT_STARTED: u32 = 1 << 31;

/// The most a queue counts (the configuration's bound is below it).
pub const MAX_QUEUE_BYTES: usize = FRONT_STARTED as usize - 1;

impl Outbound {
    /// Bytes queued and not yet written.
    pub fn bytes(&self) -> usize {
        (self.bytes & !FRONT_STARTED) as usize
    }

    fn set_bytes(&mut self, n: usize) {
        self.bytes = (self.bytes & FRONT_STARTED) | n.min(MAX_QUEUE_BYTES) as u32;
    }

    fn front_started(&self) -> bool {
        self.bytes & FRONT_STARTED != 0
    }

    fn set_front_started(&mut self, started: bool) {
        self.bytes = (self.bytes & !FRONT_STARTED) | if started { FRONT_STARTED } else { 0 };
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether the socket was full at the last flush.
    pub fn blocked(&self) -> bool {
        self.blocked_since.is_set()
    }

    /// Since when the socket has been full with no progress (core
    /// milliseconds, rounded up to the core's tick; 0: it is not).
    pub fn blocked_since(&self) -> u64 {
        self.blocked_since.ms()
    }

    /// Appends a frame.
    pub fn push(&mut self, frame: Bytes) {
        self.set_bytes(self.bytes().saturating_add(frame.len()));
        self.frames.push_back(frame);
    }

    /// Drops every frame not yet started; returns the bytes dropped.
    pub fn drop_unstarted(&mut self) -> usize {
        let keep = if self.front_started() { self.frames.pop_front() } else { None };
        self.frames.clear();
        let kept = keep.as_ref().map_or(0, Bytes::len);
        if let Some(f) = keep {
            self.frames.push_back(f);
        }
        let dropped = self.bytes().saturating_sub(kept);
        self.set_bytes(kept);
        dropped
    }

    /// Drops everything; returns the bytes dropped.
    pub fn clear(&mut self) -> usize {
        self.frames = VecDeque::new();
        let dropped = self.bytes();
        self.bytes = 0; // nothing queued, nothing started
        dropped
    }

    /// Takes the whole queue (a connection moving to another core).
    pub fn take(&mut self) -> VecDeque<Bytes> {
        self.bytes = 0;
        std::mem::take(&mut self.frames)
    }

    /// The frames, for the shell to write from (it pops what it wrote).
    pub fn frames_mut(&mut self) -> &mut VecDeque<Bytes> {
        &mut self.frames
    }

    /// Accounts for a flush at `now` (core milliseconds).
    pub fn wrote(&mut self, written: Written, result: Flushed, now: u64) {
        if written.bytes > 0 {
            self.set_front_started(written.front_started);
        }
        self.set_bytes(self.bytes().saturating_sub(written.bytes));
        match result {
            Flushed::All => {
                // An idle session keeps no queue storage.
                self.frames = VecDeque::new();
                self.bytes = 0;
                self.blocked_since = Due::NONE;
            }
            Flushed::Blocked => {
                if written.bytes > 0 || written.sent || !self.blocked() {
                    self.blocked_since = Due::at(now.max(1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partly_written_front_survives_dropping_the_rest() {
        let mut q = Outbound::default();
        q.push(Bytes::from_static(b"0123456789"));
        q.push(Bytes::from_static(b"abc"));
        bytes::Buf::advance(q.frames_mut().front_mut().unwrap(), 4);
        q.wrote(Written { bytes: 4, front_started: true, sent: false }, Flushed::Blocked, 7);
        assert_eq!(q.bytes(), 9);
        assert!(q.blocked());
        assert_eq!(q.drop_unstarted(), 3);
        assert_eq!(q.bytes(), 6);
        assert_eq!(&q.frames_mut()[0][..], b"456789");
        q.wrote(Written { bytes: 6, front_started: false, sent: false }, Flushed::All, 8);
        assert!(q.is_empty() && !q.blocked() && q.bytes() == 0 && !q.front_started());
    }

    #[test]
    fn the_started_bit_and_the_byte_count_stay_apart() {
        let mut q = Outbound::default();
        q.push(Bytes::from(vec![0u8; 100]));
        q.push(Bytes::from(vec![0u8; 50]));
        bytes::Buf::advance(q.frames_mut().front_mut().unwrap(), 30);
        q.wrote(Written { bytes: 30, front_started: true, sent: false }, Flushed::Blocked, 1);
        assert_eq!((q.bytes(), q.front_started()), (120, true));
        q.push(Bytes::from(vec![0u8; 5]));
        assert_eq!((q.bytes(), q.front_started()), (125, true));
        assert_eq!(q.drop_unstarted(), 55);
        assert_eq!((q.bytes(), q.front_started()), (70, true));
        assert_eq!(q.clear(), 70);
        assert_eq!(q.bytes(), 0);
        // The count saturates below the bit.
        q.set_bytes(MAX_QUEUE_BYTES);
        q.push(Bytes::from_static(b"x"));
        assert_eq!(q.bytes(), MAX_QUEUE_BYTES);
        assert!(!q.front_started());
        assert_eq!(std::mem::size_of::<Outbound>(), 40);
    }

    #[test]
    fn an_unstarted_queue_drops_whole() {
        let mut q = Outbound::default();
        q.push(Bytes::from_static(b"abc"));
        q.push(Bytes::from_static(b"de"));
        assert_eq!(q.drop_unstarted(), 5);
        assert!(q.is_empty());
    }
}
