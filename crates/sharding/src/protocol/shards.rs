//! The assigner's view of all shards at one instant: the desired count `N`, the shard
//! Leases, and what follows from them — the effective count `E`, each object's desired
//! shard, which shards are live and which are fenced ("Expansion gating" and "Transitions"
//! in `docs/shard-protocol.md`).

use std::collections::BTreeMap;

use jiff::Timestamp;

use super::lease::{LeaseSnapshot, LeaseState};
use crate::assignment::jump_consistent_hash;
use crate::shard_index::{ShardCount, ShardIndex};

/// The shard Leases and the desired shard count, judged at one wall-clock instant.
#[derive(Clone, Debug)]
pub struct ShardTable {
    desired: ShardCount,
    leases: BTreeMap<ShardIndex, LeaseSnapshot>,
    now: Timestamp,
    effective: Option<ShardCount>,
}

impl ShardTable {
    /// Builds the table for `desired` shards (`N`) from every shard Lease that exists.
    pub fn new(
        desired: ShardCount,
        leases: impl IntoIterator<Item = (ShardIndex, LeaseSnapshot)>,
        now: Timestamp,
    ) -> Self {
        let leases: BTreeMap<_, _> = leases.into_iter().collect();
        let effective = effective_count(desired, &leases);
        Self {
            desired,
            leases,
            now,
            effective,
        }
    }

    /// `N`, the desired shard count.
    pub fn desired_count(&self) -> ShardCount {
        self.desired
    }

    /// `E`, the count objects are hashed with; `None` while shard 0 was never acquired, in
    /// which case nothing can be assigned yet.
    pub fn effective_count(&self) -> Option<ShardCount> {
        self.effective
    }

    /// The shard an object with key hash `key_hash` (see
    /// [`object_key_hash`](crate::assignment::object_key_hash)) belongs on now.
    pub fn desired_shard(&self, key_hash: u64) -> Option<ShardIndex> {
        self.effective
            .map(|e| ShardIndex(jump_consistent_hash(key_hash, e.get())))
    }

    /// Whether `shard` is part of the desired shard count.
    pub fn in_range(&self, shard: ShardIndex) -> bool {
        shard.0 < self.desired.get()
    }

    /// The Lease of `shard`, if it exists.
    pub fn lease(&self, shard: ShardIndex) -> Option<&LeaseSnapshot> {
        self.leases.get(&shard)
    }

    /// Every shard that has a Lease, in index order.
    pub fn leased_shards(&self) -> impl Iterator<Item = ShardIndex> + '_ {
        self.leases.keys().copied()
    }

    /// The state of `shard`'s Lease now.
    pub fn lease_state(&self, shard: ShardIndex) -> LeaseState {
        LeaseState::of(self.leases.get(&shard), self.now)
    }

    /// Whether some worker serves `shard` right now.
    pub fn is_live(&self, shard: ShardIndex) -> bool {
        self.leases
            .get(&shard)
            .is_some_and(|lease| lease.is_live_at(self.now))
    }

    /// Whether `shard` is fenced: out of range, its Lease retired and not live. Nobody
    /// reconciles its objects and nobody can start to until the assigner lifts the fence,
    /// so they may be relabelled directly (A5, A7).
    pub fn is_fenced(&self, shard: ShardIndex) -> bool {
        !self.in_range(shard)
            && self
                .leases
                .get(&shard)
                .is_some_and(|l| l.retired && !l.is_live_at(self.now))
    }
}

/// `E = max n ≤ N` such that every shard `0..n` has a Lease acquired at least once and not
/// retired.
fn effective_count(
    desired: ShardCount,
    leases: &BTreeMap<ShardIndex, LeaseSnapshot>,
) -> Option<ShardCount> {
    let served = (0..desired.get())
        .take_while(|&i| {
            leases
                .get(&ShardIndex(i))
                .is_some_and(|l| l.acquired_once && !l.retired)
        })
        .count();
    u32::try_from(served).ok().and_then(ShardCount::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ts(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    fn n(count: u32) -> ShardCount {
        ShardCount::new(count).unwrap()
    }

    fn held(holder: &str) -> LeaseSnapshot {
        LeaseSnapshot {
            holder: Some(holder.to_owned()),
            acquired_once: true,
            renew_time: Some(ts(100)),
            duration: Some(Duration::from_secs(15)),
            ..Default::default()
        }
    }

    fn released() -> LeaseSnapshot {
        LeaseSnapshot {
            acquired_once: true,
            ..Default::default()
        }
    }

    fn table(desired: u32, leases: Vec<(u32, LeaseSnapshot)>) -> ShardTable {
        ShardTable::new(
            n(desired),
            leases.into_iter().map(|(i, l)| (ShardIndex(i), l)),
            ts(105),
        )
    }

    #[test]
    fn effective_count_waits_for_first_acquisition() {
        assert_eq!(table(3, vec![]).effective_count(), None);
        let leases = vec![(0, held("w-0")), (1, held("w-1")), (2, held("w-2"))];
        assert_eq!(table(3, leases.clone()).effective_count(), Some(n(3)));
        assert_eq!(
            table(4, leases.clone()).effective_count(),
            Some(n(3)),
            "shard 3 not acquired yet"
        );
        let mut with_new = leases.clone();
        with_new.push((3, held("w-3")));
        assert_eq!(table(4, with_new).effective_count(), Some(n(4)));
        // Never-acquired Lease (created but not held) does not count.
        let mut created = leases.clone();
        created.push((3, LeaseSnapshot::default()));
        assert_eq!(table(4, created).effective_count(), Some(n(3)));
    }

    #[test]
    fn effective_count_survives_crashes_and_follows_shrinking() {
        let mut expired = held("w-1");
        expired.renew_time = Some(ts(0));
        let leases = vec![(0, held("w-0")), (1, expired), (2, released())];
        assert_eq!(
            table(3, leases.clone()).effective_count(),
            Some(n(3)),
            "a crash never lowers E"
        );
        assert_eq!(table(2, leases).effective_count(), Some(n(2)));
        let gap = vec![(0, held("w-0")), (2, held("w-2"))];
        assert_eq!(
            table(3, gap).effective_count(),
            Some(n(1)),
            "0..n contiguous"
        );
    }

    #[test]
    fn retired_leases_do_not_count_until_reacquired() {
        let mut retired = held("w-2");
        retired.retired = true;
        let leases = vec![(0, held("w-0")), (1, held("w-1")), (2, retired)];
        assert_eq!(table(3, leases).effective_count(), Some(n(2)));
    }

    #[test]
    fn fenced_means_out_of_range_retired_and_not_live() {
        let mut retired_released = released();
        retired_released.retired = true;
        let mut retired_held = held("w-3");
        retired_held.retired = true;
        let t = table(
            3,
            vec![
                (0, released()),
                (3, retired_released.clone()),
                (4, retired_held),
                (5, released()),
            ],
        );
        assert!(!t.is_fenced(ShardIndex(0)), "in range: will be taken over");
        assert!(t.is_fenced(ShardIndex(3)));
        assert!(!t.is_fenced(ShardIndex(4)), "still held: drain instead");
        assert!(!t.is_fenced(ShardIndex(5)), "not retired: may be acquired");
        assert!(!t.is_fenced(ShardIndex(6)), "no Lease: may be created");
        let back_in_range = table(4, vec![(3, retired_released)]);
        assert!(!back_in_range.is_fenced(ShardIndex(3)));
    }

    #[test]
    fn desired_shard_uses_the_effective_count() {
        let t = table(4, vec![(0, held("w-0")), (1, held("w-1"))]);
        for key in 0..1000_u64 {
            let shard = t
                .desired_shard(key.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .unwrap();
            assert!(shard.0 < 2);
        }
        assert_eq!(table(2, vec![]).desired_shard(42), None);
    }
}
