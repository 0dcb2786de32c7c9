//! A coarse hashed timer wheel: millions of deadlines (pings, pong and
//! handshake deadlines of a core's connections) for the price of one entry
//! each and work per tick proportional to what expires, not to what is
//! scheduled.
//!
//! Deadlines are rounded **up** to the wheel's tick, so a key never fires
//! early and fires at most one tick late (a deadline more than
//! [`MAX_AHEAD`] ticks away is scheduled at that distance: an entry is 12
//! bytes). A deadline beyond one turn of the
//! wheel waits in its slot for the turns in between. Cancelling is lazy: the
//! owner of a key remembers the tick [`TimerWheel::insert`] returned and
//! ignores a key that fires for another tick (it was rescheduled).
//!
//! Sans-IO: time comes in as arguments; the wheel never reads a clock.

use std::time::{Duration, Instant};

/// Keys with deadlines, in slots of one tick each.
#[derive(Debug)]
pub struct TimerWheel {
    origin: Instant,
    tick: Duration,
    /// `slots[t % slots.len()]` holds an [`Entry`] for every key due at tick `t`.
    slots: Vec<Vec<Entry>>,
    /// The last tick [`expire`](Self::expire) has handled.
    done: u64,
    len: usize,
}

/// A key and its tick in 12 bytes: the key's halves and the tick's low 32
/// bits. Every entry's tick is in `done + 1 ..= done + MAX_AHEAD`, so the
/// low bits name it.
type Entry = [u32; 3];

/// The furthest a deadline is scheduled ahead, in ticks (34 years of
/// 250 ms ticks); one beyond it fires then, early, and its owner, who
/// checks its own deadlines when its key fires, schedules it again.
pub const MAX_AHEAD: u64 = u32::MAX as u64;

impl TimerWheel {
    /// A wheel whose tick 0 is `origin`, with ticks of `tick` and `slots`
    /// slots (one turn is `tick × slots`; longer deadlines are fine).
    pub fn new(origin: Instant, tick: Duration, slots: usize) -> TimerWheel {
        assert!(!tick.is_zero() && slots > 0, "a wheel needs a tick and a slot");
        TimerWheel { origin, tick, slots: (0..slots).map(|_| Vec::new()).collect(), done: 0, len: 0 }
    }

    /// Keys scheduled (stale ones included until they fire).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The tick `at` falls in, rounded up.
    fn tick_of(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.origin);
        let t = self.tick.as_nanos();
        d.as_nanos().div_ceil(t).min(u64::MAX as u128) as u64
    }

    /// Schedules `key` at `at` (at the next tick if `at` has passed);
    /// returns the tick it will fire at.
    pub fn insert(&mut self, key: u64, at: Instant) -> u64 {
        let t = self.tick_for(at);
        let n = self.slots.len() as u64;
        let slot = &mut self.slots[(t % n) as usize];
        if slot.len() == slot.capacity() {
            // A quarter more, not double: a slot holding a storm's worth
            // of deadlines keeps little spare.
            slot.reserve_exact((slot.capacity() / 4).max(4));
        }
        slot.push([key as u32, (key >> 32) as u32, t as u32]);
        self.len += 1;
        t
    }

    /// The tick an [`insert`](Self::insert) at `at` would return, to compare
    /// with one already scheduled.
    pub fn tick_for(&self, at: Instant) -> u64 {
        self.tick_of(at).clamp(self.done + 1, self.done + MAX_AHEAD)
    }

    /// Appends to `out` every (key, tick) due by `now`, each once.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<(u64, u64)>) {
        let d = now.saturating_duration_since(self.origin);
        let target = (d.as_nanos() / self.tick.as_nanos()).min(u64::MAX as u128) as u64;
        if target <= self.done {
            return;
        }
        let n = self.slots.len() as u64;
        // Each slot once per call, even if many turns went by.
        let last = target.min(self.done + n);
        let done = self.done;
        for t in done + 1..=last {
            let slot = &mut self.slots[(t % n) as usize];
            let before = out.len();
            slot.retain(|&[lo, hi, low_tick]| {
                // The one tick after `done` with these low bits.
                let due = done + u64::from(low_tick.wrapping_sub(done as u32));
                if due <= target {
                    out.push((u64::from(lo) | u64::from(hi) << 32, due));
                    false
                } else {
                    true
                }
            });
            self.len -= out.len() - before;
            if slot.is_empty() && slot.capacity() > 64 {
                // A storm's burst of deadlines does not stay allocated.
                *slot = Vec::new();
            }
        }
        self.done = target;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TICK: Duration = Duration::from_millis(250);

    #[test]
    fn fires_once_never_early_at_most_a_tick_late() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, TICK, 8);
        let at = t0 + Duration::from_millis(600);
        let tick = w.insert(7, at);
        assert_eq!(tick, 3);
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_millis(599), &mut out);
        assert!(out.is_empty(), "not early");
        w.expire(t0 + Duration::from_millis(750), &mut out);
        assert_eq!(out, vec![(7, 3)]);
        out.clear();
        w.expire(t0 + Duration::from_secs(60), &mut out);
        assert!(out.is_empty(), "once");
        assert!(w.is_empty());
    }

    #[test]
    fn deadlines_beyond_a_turn_wait_their_turn() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, TICK, 4);
        w.insert(1, t0 + Duration::from_secs(10)); // tick 40, ten turns away
        w.insert(2, t0 + Duration::from_millis(500)); // tick 2, same slot (mod 4)
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_secs(1), &mut out);
        assert_eq!(out, vec![(2, 2)]);
        out.clear();
        w.expire(t0 + Duration::from_millis(9_999), &mut out);
        assert!(out.is_empty());
        w.expire(t0 + Duration::from_secs(10), &mut out);
        assert_eq!(out, vec![(1, 40)]);
    }

    #[test]
    fn a_past_deadline_fires_at_the_next_tick() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0, TICK, 16);
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_secs(2), &mut out);
        assert_eq!(w.insert(5, t0), 9, "after the ticks already handled");
        assert_eq!(w.tick_for(t0), 9);
        w.expire(t0 + Duration::from_millis(2_250), &mut out);
        assert_eq!(out, vec![(5, 9)]);
    }

    #[test]
    fn ticks_past_32_bits_and_full_64_bit_keys_come_back_exact() {
        // 1 ns ticks: 2^32 ticks go by in 4.3 s of wheel time.
        let t0 = Instant::now();
        let ns = Duration::from_nanos;
        let mut w = TimerWheel::new(t0, ns(1), 8);
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_secs(5), &mut out);
        let now = 5_000_000_000u64;
        let key = 0xdead_beef_0000_0007u64;
        assert_eq!(w.insert(key, t0 + ns(now + 3)), now + 3);
        w.expire(t0 + ns(now + 2), &mut out);
        assert!(out.is_empty(), "not early");
        w.expire(t0 + ns(now + 3), &mut out);
        assert_eq!(out, vec![(key, now + 3)]);
        // Further ahead than the entries can name: scheduled at the limit,
        // and the returned tick says so (the owner finds its deadline not
        // yet passed when the key fires, and schedules it again).
        let far = w.insert(1, t0 + Duration::from_secs(60));
        assert_eq!(far, now + 3 + MAX_AHEAD);
        assert_eq!(w.tick_for(t0 + Duration::from_secs(60)), far);
    }

    proptest! {
        #[test]
        fn every_key_fires_once_within_a_tick_after_its_deadline(
            deadlines in proptest::collection::vec(0u64..20_000, 1..200),
            steps in proptest::collection::vec(1u64..3_000, 1..40),
            slots in 1usize..64,
        ) {
            let t0 = Instant::now();
            let mut w = TimerWheel::new(t0, TICK, slots);
            for (k, ms) in deadlines.iter().enumerate() {
                w.insert(k as u64, t0 + Duration::from_millis(*ms));
            }
            let mut fired = vec![None; deadlines.len()];
            let mut now = 0u64;
            let mut out = Vec::new();
            for step in steps.iter().chain(std::iter::once(&25_000)) {
                now += step;
                out.clear();
                w.expire(t0 + Duration::from_millis(now), &mut out);
                for (k, _) in &out {
                    prop_assert!(fired[*k as usize].is_none(), "fired twice");
                    fired[*k as usize] = Some(now);
                }
            }
            prop_assert!(w.is_empty());
            for (k, ms) in deadlines.iter().enumerate() {
                let f = fired[k].expect("fired");
                prop_assert!(f >= *ms, "early: {ms} at {f}");
            }
        }
    }
}
