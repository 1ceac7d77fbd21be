//! Giving the memory a shrunken slice freed back to the system.
//!
//! A shard's caches grow with its slice and shrink when objects leave it (a rebalance
//! drains them away, a taken-over shard is handed back, a worker started on a stale label
//! lists more than it keeps). glibc's allocator keeps what was freed in its arenas: it
//! returns memory only from the top of a heap, and a few live objects scattered over the
//! freed pages pin the rest. The process then stays at its peak for good, which is what a
//! pod's memory limit, the kubelet's eviction and a memory-driven autoscaler see.
//! `malloc_trim(0)` walks every arena and returns each wholly free page inside it.
//!
//! [`return_freed_memory`] does that on a period while shards are served. A trim of a heap
//! with nothing to give back costs a walk of its free lists (microseconds to a few
//! milliseconds); a page given back and used again costs one page fault. Off glibc
//! (musl, other systems, or a Rust global allocator other than the system one) there is
//! nothing to trim and it does nothing.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Asks the allocator to return its wholly free pages to the system. Returns whether it
/// gave any back (glibc's answer); `false` where there is no such call.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_freed_memory() -> bool {
    // SAFETY: malloc_trim takes no pointers and has no precondition; glibc locks each
    // arena while it walks it, like any other allocator call.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Asks the allocator to return its wholly free pages to the system. Returns whether it
/// gave any back (glibc's answer); `false` where there is no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_freed_memory() -> bool {
    false
}

/// Calls [`release_freed_memory`] every `every` until `shutdown` is cancelled.
pub(crate) async fn return_freed_memory(every: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; nothing has been freed yet.
    ticks.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // A walk of a large heap takes milliseconds: off the async threads, the tasks
        // polled on them are not held up for its length.
        let released = tokio::task::spawn_blocking(release_freed_memory)
            .await
            .unwrap_or(false);
        tracing::trace!(released, "returned freed memory to the system");
    }
}
