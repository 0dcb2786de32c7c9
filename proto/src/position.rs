//! Where a subscriber stands in a channel's stream.
//!
//! A channel's publications carry consecutive offsets within an epoch (the
//! name of one incarnation of the stream; a new owner or lost history gives
//! a new epoch, so an old position is never mistaken for a new one). The
//! gateway, the simulation's oracle and the load generator's checker all
//! reason with this one type.

use std::sync::Arc;

use serde::Deserialize;

/// A position in a channel's stream: the offset of the last publication
/// seen (0: before the first) within `epoch`. On the client protocol it is
/// `{offset, epoch}` (history's `since`), both optional.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
pub struct StreamPosition {
    /// The stream's incarnation (empty: any, in a request).
    #[serde(default = "no_epoch")]
    pub epoch: Arc<str>,
    /// Offset of the last publication at or before this position.
    #[serde(default)]
    pub offset: u64,
}

fn no_epoch() -> Arc<str> {
    Arc::from("")
}

impl Default for StreamPosition {
    fn default() -> Self {
        StreamPosition { epoch: no_epoch(), offset: 0 }
    }
}

/// What a run of publications `first..=last` of `epoch` is to a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// It continues the position exactly: take it, the position becomes `last`.
    Next,
    /// Everything in it is at or before the position: already had.
    Behind,
    /// It straddles the position: its publications after the position (the
    /// last `last - offset` of the run) continue it, the others were had.
    /// A packed frame of the run is re-framed with those alone.
    Overlaps,
    /// Something between the position and `first` is missing, or it is
    /// another epoch: the position cannot go on.
    Broken,
}

impl StreamPosition {
    /// A position.
    pub fn new(epoch: impl Into<Arc<str>>, offset: u64) -> Self {
        StreamPosition { epoch: epoch.into(), offset }
    }

    /// How publications `first..=last` of `epoch` relate to this position.
    pub fn follow(&self, epoch: &str, first: u64, last: u64) -> Follow {
        if *self.epoch != *epoch {
            Follow::Broken
        } else if last <= self.offset {
            Follow::Behind
        } else if first == self.offset + 1 {
            Follow::Next
        } else if first <= self.offset {
            Follow::Overlaps
        } else {
            Follow::Broken
        }
    }

    /// Whether a recovery request from (`epoch`, `offset`) asks for exactly
    /// this position (an empty epoch matches any, as in Centrifugo).
    pub fn is(&self, epoch: &str, offset: u64) -> bool {
        (epoch.is_empty() || *epoch == *self.epoch) && offset == self.offset
    }
}

impl std::fmt::Display for StreamPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.offset, self.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_continues_is_behind_or_breaks() {
        let p = StreamPosition::new("e", 5);
        assert_eq!(p.follow("e", 6, 6), Follow::Next);
        assert_eq!(p.follow("e", 6, 9), Follow::Next, "a packed run continues the stream");
        assert_eq!(p.follow("e", 5, 5), Follow::Behind);
        assert_eq!(p.follow("e", 3, 5), Follow::Behind);
        assert_eq!(p.follow("e", 7, 7), Follow::Broken, "a hole");
        assert_eq!(p.follow("e", 4, 6), Follow::Overlaps, "straddles: 6 continues, 4 and 5 were had");
        assert_eq!(p.follow("e", 1, 9), Follow::Overlaps);
        assert_eq!(p.follow("f", 6, 6), Follow::Broken, "another stream");
        assert!(p.is("e", 5) && p.is("", 5) && !p.is("e", 4) && !p.is("f", 5));
    }
}
