//! The assignment function: which shard owns an object when there are `N` shards.
//!
//! It is jump consistent hash (Lamping & Veach, "A Fast, Minimal Memory, Consistent Hash
//! Algorithm", 2014) over the FNV-1a 64 hash of `namespace/name`. Jump hash is chosen
//! because it needs no ring state, balances to within a fraction of a percent, and when
//! `N` grows to `N+1` moves exactly the keys that land on the new shard (≈ 1/(N+1)),
//! while `N → N−1` moves only the keys of the removed last shard. That last property is
//! why shards are always added and removed at the highest index (StatefulSet ordinals).

use std::hash::Hasher;

use crate::shard_index::{ShardCount, ShardIndex};

/// The shard that owns `namespace/name` when there are `shards` shards.
pub fn shard_for(namespace: &str, name: &str, shards: ShardCount) -> ShardIndex {
    ShardIndex(jump_consistent_hash(
        object_key_hash(namespace, name),
        shards.get(),
    ))
}

/// FNV-1a 64 of `namespace/name`, the stable identity of an object across shard counts.
pub fn object_key_hash(namespace: &str, name: &str) -> u64 {
    let mut hasher = fnv::FnvHasher::default();
    // `write`, not `write_str`: the latter appends a terminator byte and would not be FNV-1a
    // of the key as documented.
    hasher.write(namespace.as_bytes());
    hasher.write(b"/");
    hasher.write(name.as_bytes());
    hasher.finish()
}

/// Jump consistent hash: maps `key` to a bucket in `0..buckets`.
pub fn jump_consistent_hash(mut key: u64, buckets: u32) -> u32 {
    let buckets = i64::from(buckets);
    let mut bucket: i64 = -1;
    let mut next: i64 = 0;
    while next < buckets {
        bucket = next;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        // The paper's arithmetic, in f64: the next jump is (b + 1) * 2^31 / ((key >> 33) + 1).
        let divisor = ((key >> 33) + 1) as f64;
        next = ((bucket + 1) as f64 * ((1_u64 << 31) as f64 / divisor)) as i64;
    }
    // `bucket` is in 0..buckets because buckets >= 1 enters the loop at least once.
    u32::try_from(bucket).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(n: u32) -> ShardCount {
        ShardCount::new(n).unwrap()
    }

    fn keys(total: usize) -> impl Iterator<Item = (String, String)> {
        (0..total).map(|i| (format!("tenant-{}", i % 97), format!("db-{i}")))
    }

    #[test]
    fn fnv1a_64_matches_reference_vectors() {
        let fnv = |bytes: &[u8]| {
            let mut h = fnv::FnvHasher::default();
            h.write(bytes);
            h.finish()
        };
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(object_key_hash("foo", "bar"), fnv(b"foo/bar"));
    }

    /// Computed by an independent implementation of the paper's algorithm; they pin the
    /// wire contract between assigner versions (a change would reshuffle every object).
    #[test]
    fn golden_vectors() {
        let cases: &[(&str, &str, u32, u32)] = &[
            ("default", "db-0", 1, 0),
            ("default", "db-0", 3, 0),
            ("default", "db-1", 3, 2),
            ("default", "db-2", 3, 1),
            ("prod", "orders", 4, 0),
            ("prod", "orders", 16, 0),
            ("team-a", "postgres-main", 7, 6),
            ("x", "y", 2, 1),
            (
                "kube-system",
                "a-very-long-database-cluster-name-0123456789",
                10,
                3,
            ),
            ("tenant-42", "db-99999", 1000, 324),
        ];
        for &(namespace, name, shards, expected) in cases {
            assert_eq!(
                shard_for(namespace, name, count(shards)),
                ShardIndex(expected),
                "{namespace}/{name} with {shards} shards"
            );
        }
        assert_eq!(jump_consistent_hash(0, 1000), 0, "key 0 never jumps");
    }

    #[test]
    fn one_shard_owns_everything() {
        for (ns, name) in keys(1000) {
            assert_eq!(shard_for(&ns, &name, count(1)), ShardIndex(0));
        }
    }

    #[test]
    fn balanced_for_every_shard_count_up_to_16() {
        const KEYS: usize = 100_000;
        let hashes: Vec<u64> = keys(KEYS).map(|(ns, n)| object_key_hash(&ns, &n)).collect();
        for n in 1..=16_u32 {
            let mut per_shard = vec![0_usize; n as usize];
            for &h in &hashes {
                per_shard[jump_consistent_hash(h, n) as usize] += 1;
            }
            let max = *per_shard.iter().max().unwrap() as f64;
            let mean = KEYS as f64 / f64::from(n);
            assert!(
                max / mean <= 1.02,
                "N={n}: max/mean = {:.4} ({per_shard:?})",
                max / mean
            );
        }
    }

    #[test]
    fn growing_moves_only_keys_that_land_on_the_new_shard() {
        const KEYS: usize = 100_000;
        let hashes: Vec<u64> = keys(KEYS).map(|(ns, n)| object_key_hash(&ns, &n)).collect();
        for n in 1..=16_u32 {
            let mut moved = 0_usize;
            for &h in &hashes {
                let before = jump_consistent_hash(h, n);
                let after = jump_consistent_hash(h, n + 1);
                if before != after {
                    assert_eq!(
                        after,
                        n,
                        "a key moved between two old shards ({n}->{})",
                        n + 1
                    );
                    moved += 1;
                }
            }
            let fraction = moved as f64 / KEYS as f64;
            let ideal = 1.0 / f64::from(n + 1);
            assert!(
                (fraction - ideal).abs() <= 0.1 * ideal,
                "{n}->{}: moved {fraction:.4}, ideal {ideal:.4}",
                n + 1
            );
        }
    }

    #[test]
    fn shrinking_moves_only_keys_of_the_removed_shard() {
        let hashes: Vec<u64> = keys(50_000)
            .map(|(ns, n)| object_key_hash(&ns, &n))
            .collect();
        for n in 2..=16_u32 {
            for &h in &hashes {
                let before = jump_consistent_hash(h, n);
                let after = jump_consistent_hash(h, n - 1);
                if before != after {
                    assert_eq!(before, n - 1, "only the removed shard's keys may move");
                }
            }
        }
    }

    #[test]
    fn result_is_always_in_range() {
        for (i, (ns, name)) in keys(10_000).enumerate() {
            let n = (i % 64) as u32 + 1;
            assert!(shard_for(&ns, &name, count(n)).0 < n);
        }
        assert!(jump_consistent_hash(u64::MAX, u32::MAX) < u32::MAX);
    }
}
