//! `shardop::memory::release_freed_memory` gives back what a shrunken cache freed, though a
//! few live allocations pin the heap. Its own test binary: RSS is per process, and no other
//! test may allocate beside it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn freed_memory_pinned_by_live_objects_goes_back_to_the_system() {
    const MIB: usize = 1024 * 1024;
    // 256 MiB in blocks of the size of a cached object, on this test's thread (its own
    // arena, like a worker's runtime threads).
    let mut blocks: Vec<Vec<u8>> = (0..256 * 1024)
        .map(|i| vec![(i % 251) as u8; 1024])
        .collect();
    let full = resident_bytes();
    // The slice shrinks to one object in 64: the survivors sit on every few pages and at
    // the top of the heap, so the allocator cannot shrink it from the top.
    let survivors: Vec<Vec<u8>> = blocks
        .drain(..)
        .enumerate()
        .filter_map(|(i, block)| (i % 64 == 0).then_some(block))
        .collect();
    let shrunk = resident_bytes();
    assert!(
        full.saturating_sub(shrunk) < 64 * MIB,
        "the allocator gave memory back on its own ({} MiB → {} MiB): this test shows nothing",
        full / MIB,
        shrunk / MIB
    );

    shardop::memory::release_freed_memory();
    let released = resident_bytes();
    assert!(
        shrunk.saturating_sub(released) > 128 * MIB,
        "resident {} MiB with 256 MiB allocated, {} MiB after the slice shrank to 1/64, {} MiB \
         after release_freed_memory",
        full / MIB,
        shrunk / MIB,
        released / MIB
    );
    assert_eq!(survivors.len(), 4096);
}

/// Resident set size of this process, from `/proc/self/statm` (counted in pages, 4 KiB on
/// x86-64).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}
