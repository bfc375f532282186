//! The agent's own heap: handing back to the kernel what large, short-lived
//! work (a manifest load, a first sync or a relist) freed.

/// Hands the heap's free pages back to the kernel. glibc keeps what a
/// large piece of work freed in its arenas, where it counts as resident
/// for as long as the agent runs (at 10,000 Services the parse of the
/// manifests and the first sync left more free than live). Costs a walk
/// of the free lists: called after such work only.
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it
    // takes the allocator's own locks and touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}
