//! A core's sessions: a slab of boxed records addressed by [`Sid`].
//!
//! Slots are reused; each session carries the generation it took its slot
//! with, and a free slot's last generation waits with it in the free list,
//! so an id held by a stale request, timer or client (an emulation
//! session's signed name) never reaches the session that took the slot
//! later, until that one slot has been reused 2^32 times. Records are boxed so
//! the slab's spare capacity costs a slot (8 bytes), not a record, per
//! connection, and the slots are [`Paged`]: at most one page of them spare.

use crate::effects::Sid;
use crate::paged::Paged;
use crate::session::Session;

/// The slab.
#[derive(Debug, Default)]
pub struct Sessions {
    slots: Paged<Option<Box<Session>>>,
    /// Free slots, each with the generation its last session had.
    free: Vec<(u32, u32)>,
    len: usize,
}

impl Sessions {
    /// Sessions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores a session; its id.
    pub fn insert(&mut self, session: Session) -> Sid {
        let (index, generation) = match self.free.pop() {
            // 0 is never given.
            Some((i, last)) => (i as usize, last.wrapping_add(1).max(1)),
            None => (self.slots.push(None), 1),
        };
        let mut session = Box::new(session);
        session.generation = generation;
        *self.slots.at(index) = Some(session);
        self.len += 1;
        Sid((u64::from(generation) << 32) | index as u64)
    }

    /// The session `sid`, if it still exists.
    pub fn get(&self, sid: Sid) -> Option<&Session> {
        self.slots.get(sid.index())?.as_deref().filter(|s| s.generation == sid.generation())
    }

    /// The session `sid`, mutably.
    pub fn get_mut(&mut self, sid: Sid) -> Option<&mut Session> {
        self.slots.get_mut(sid.index())?.as_deref_mut().filter(|s| s.generation == sid.generation())
    }

    /// Takes the session out; its slot is free again.
    pub fn remove(&mut self, sid: Sid) -> Option<Box<Session>> {
        let slot = self.slots.get_mut(sid.index())?;
        if slot.as_ref().is_none_or(|s| s.generation != sid.generation()) {
            return None;
        }
        let s = slot.take()?;
        self.free.push((sid.index() as u32, s.generation));
        self.len -= 1;
        Some(s)
    }

    /// Every session's id, in slot order (a snapshot: the caller may change
    /// the slab while it goes through them).
    pub fn ids(&self) -> Vec<Sid> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some(Sid((u64::from(s.as_ref()?.generation) << 32) | i as u64)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_slot_does_not_answer_to_the_old_id() {
        let mut s = Sessions::default();
        let a = s.insert(Session::new(1));
        assert!(s.get(a).is_some());
        assert!(s.remove(a).is_some());
        let b = s.insert(Session::new(1));
        assert_eq!(a.index(), b.index());
        assert!(s.get(a).is_none() && s.get_mut(a).is_none() && s.remove(a).is_none());
        assert!(s.get(b).is_some());
        assert_eq!((s.len(), s.ids()), (1, vec![b]));
    }
}
