//! A session's bounded outbound queue of shared frames.
//!
//! A publication reaches a session as a clone of one `Bytes` (a reference
//! count); the queue never copies it. The shell writes the queue with one
//! vectored non-blocking send per batch ([`crate::shell::socket`]) and tells
//! the machine what it wrote. The bound is in bytes: a frame that would pass
//! it closes the session with 3008 "slow" (see [`super::Session::queue`]).

use std::collections::VecDeque;

use bytes::Bytes;

/// What a flush wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Bytes written.
    pub bytes: usize,
    /// Whether the queue's front frame is now partly written (meaningful
    /// when `bytes > 0`; otherwise the front is as before).
    pub front_started: bool,
}

/// What a flush achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Everything queued was written.
    All,
    /// The socket's buffer is full: wait for writability.
    Blocked,
}

/// The queue.
#[derive(Debug, Default)]
pub struct Outbound {
    frames: VecDeque<Bytes>,
    /// Bytes queued (the queue's bound is far below 4 GiB).
    bytes: u32,
    /// Whether the front frame is partly written (its tail must go out
    /// before anything else, or the stream's framing breaks).
    front_started: bool,
    /// Since when (core milliseconds) the socket has been full with no
    /// progress; 0 when it is not.
    blocked_since: u64,
}

impl Outbound {
    /// Bytes queued and not yet written.
    pub fn bytes(&self) -> usize {
        self.bytes as usize
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether the socket was full at the last flush.
    pub fn blocked(&self) -> bool {
        self.blocked_since != 0
    }

    /// Since when the socket has been full with no progress (0: it is not).
    pub fn blocked_since(&self) -> u64 {
        self.blocked_since
    }

    /// Appends a frame.
    pub fn push(&mut self, frame: Bytes) {
        self.bytes = self.bytes.saturating_add(u32::try_from(frame.len()).unwrap_or(u32::MAX));
        self.frames.push_back(frame);
    }

    /// Drops every frame not yet started; returns the bytes dropped.
    pub fn drop_unstarted(&mut self) -> usize {
        let keep = if self.front_started { self.frames.pop_front() } else { None };
        self.frames.clear();
        let kept = keep.as_ref().map_or(0, Bytes::len);
        if let Some(f) = keep {
            self.frames.push_back(f);
        }
        let dropped = (self.bytes as usize).saturating_sub(kept);
        self.bytes = kept as u32;
        dropped
    }

    /// Drops everything; returns the bytes dropped.
    pub fn clear(&mut self) -> usize {
        self.frames = VecDeque::new();
        std::mem::take(&mut self.bytes) as usize
    }

    /// Takes the whole queue (a connection moving to another core).
    pub fn take(&mut self) -> VecDeque<Bytes> {
        self.bytes = 0;
        self.front_started = false;
        std::mem::take(&mut self.frames)
    }

    /// The frames, for the shell to write from (it pops what it wrote).
    pub fn frames_mut(&mut self) -> &mut VecDeque<Bytes> {
        &mut self.frames
    }

    /// Accounts for a flush at `now` (core milliseconds).
    pub fn wrote(&mut self, written: Written, result: Flushed, now: u64) {
        if written.bytes > 0 {
            self.front_started = written.front_started;
        }
        self.bytes = (self.bytes as usize).saturating_sub(written.bytes) as u32;
        match result {
            Flushed::All => {
                // An idle session keeps no queue storage.
                self.frames = VecDeque::new();
                self.bytes = 0;
                self.front_started = false;
                self.blocked_since = 0;
            }
            Flushed::Blocked => {
                if written.bytes > 0 || self.blocked_since == 0 {
                    self.blocked_since = now.max(1);
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
        q.wrote(Written { bytes: 4, front_started: true }, Flushed::Blocked, 7);
        assert_eq!(q.bytes(), 9);
        assert!(q.blocked());
        assert_eq!(q.drop_unstarted(), 3);
        assert_eq!(q.bytes(), 6);
        assert_eq!(&q.frames_mut()[0][..], b"456789");
        q.wrote(Written { bytes: 6, front_started: false }, Flushed::All, 8);
        assert!(q.is_empty() && !q.blocked() && q.bytes() == 0);
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
