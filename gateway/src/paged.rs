//! A vector kept in fixed pages, for the per-connection slots a core
//! indexes by [`Sid`](crate::effects::Sid) index (the session slab, the
//! shell's sockets).
//!
//! A `Vec` that grows by doubling holds on average a third more slots than
//! it uses, and up to twice as many: at 9,500 connections per core, 16,384
//! slots. Pages of [`PAGE`] slots leave at most one page spare, and growing
//! never copies nor briefly holds the old and the new allocation together
//! (a storm's growth is not a spike).

/// Slots per page.
pub const PAGE: usize = 1024;

/// Slots `0..len()`, in pages of [`PAGE`].
#[derive(Debug)]
pub struct Paged<T> {
    pages: Vec<Box<[T]>>,
    len: usize,
}

impl<T> Default for Paged<T> {
    fn default() -> Self {
        Paged { pages: Vec::new(), len: 0 }
    }
}

impl<T: Default> Paged<T> {
    /// Slots held (every index below it is valid).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no slot is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slot `i`, if held.
    pub fn get(&self, i: usize) -> Option<&T> {
        if i >= self.len {
            return None;
        }
        Some(&self.pages[i / PAGE][i % PAGE])
    }

    /// Slot `i`, mutably, if held.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        if i >= self.len {
            return None;
        }
        Some(&mut self.pages[i / PAGE][i % PAGE])
    }

    /// Slot `i`, holding every slot up to it first (new ones are `T::default()`).
    pub fn at(&mut self, i: usize) -> &mut T {
        while self.pages.len() * PAGE <= i {
            self.pages.push((0..PAGE).map(|_| T::default()).collect());
        }
        self.len = self.len.max(i + 1);
        &mut self.pages[i / PAGE][i % PAGE]
    }

    /// A new slot at the end; its index.
    pub fn push(&mut self, v: T) -> usize {
        let i = self.len;
        *self.at(i) = v;
        i
    }

    /// Every held slot, in index order.
    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.pages.iter().flat_map(|p| p.iter()).take(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_keep_their_index_across_pages_and_only_held_ones_answer() {
        let mut p: Paged<Option<u32>> = Paged::default();
        assert!(p.is_empty() && p.get(0).is_none());
        for i in 0..(PAGE as u32 * 2 + 3) {
            assert_eq!(p.push(Some(i)), i as usize);
        }
        assert_eq!(p.len(), 2 * PAGE + 3);
        assert_eq!(p.pages.len(), 3, "one page spare at most");
        assert_eq!(p.get(PAGE + 5), Some(&Some(PAGE as u32 + 5)));
        assert!(p.get(2 * PAGE + 3).is_none() && p.get_mut(2 * PAGE + 3).is_none(), "past len: not held");
        *p.get_mut(7).unwrap() = None;
        assert_eq!(p.iter().filter(|s| s.is_none()).count(), 1);
        assert_eq!(p.iter().count(), p.len());
        // Holding a far index holds every one before it, default-valued.
        let far = 5 * PAGE + 1;
        *p.at(far) = Some(9);
        assert_eq!((p.len(), p.get(far), p.get(far - 1)), (far + 1, Some(&Some(9)), Some(&None)));
        assert_eq!(p.pages.len(), 6);
    }
}
