//! Allocator settings for the gateway's processes.
//!
//! mimalloc eagerly commits whole arenas on systems that overcommit (its
//! default `arena_eager_commit = 2`); for a process that holds many small,
//! long-lived session records that shows up as resident memory far above
//! what is allocated (measured with `benches/scripts/idle_memory.py`: 3,000
//! idle connections on one core grew the gateway's RSS by 14.8 MB with the
//! default and by 3.3 MB with eager commit off). Committing on demand costs
//! nothing measurable on the hot paths.

/// mimalloc's `arena_eager_commit` option (numbered 4 in mimalloc v2 and v3).
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Sets the allocator's options. It must run before the first allocation
/// (mimalloc reserves its first arena then), so binaries put it in
/// `.init_array` (see `gateway`'s `main.rs`).
pub extern "C" fn tune() {
    // SAFETY: `mi_option_set` stores one option value in mimalloc's option
    // table; it is thread-safe and takes no pointers.
    unsafe { libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0) };
}

/// Returns the calling thread's freed allocator pages to the OS once they
/// are past mimalloc's purge delay. mimalloc purges as a side effect of
/// later allocations, so a core that went quiet after a storm would keep
/// the pages its handshakes used; the shell calls this once a second.
pub fn collect() {
    // SAFETY: `mi_collect` works on the calling thread's heap only; it
    // takes no pointers and is safe to call at any time.
    unsafe { libmimalloc_sys::mi_collect(false) };
}
