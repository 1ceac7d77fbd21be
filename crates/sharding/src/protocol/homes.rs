//! Which worker is home for each shard when the shard count is fixed and the worker count
//! is not (the assigner's `--shards` with `--worker-statefulset`).
//!
//! A rescale then moves whole shards between workers instead of objects between shards:
//! the assigner names a shard's new home worker on its Lease
//! ([`HOME_WORKER_ANNOTATION`](crate::constants::HOME_WORKER_ANNOTATION)), the new home
//! asks the holder to hand the shard back ([`super::failover`]), and the holder stops its
//! controller and releases the Lease. No object label and no child changes, so a move
//! costs a few Lease writes and the new holder's list of the shard, whatever the number of
//! objects in it. The spread is balanced (worker loads differ by at most one shard) and
//! moves as few shards as that allows.

use super::lease::LeaseSnapshot;
use super::plan::{LeaseStep, ShardPlan};
use crate::shard_index::{ShardCount, ShardIndex};

/// The home worker of every shard `0..shards` among `workers` workers (ordinals
/// `0..workers`), starting from `current` (each shard's home now, see
/// [`LeaseSnapshot::home_of`]).
///
/// Every worker gets `shards / workers` shards, and the `shards % workers` workers that
/// already hold the most get one more; a shard stays with its current home unless that
/// worker is gone or over its share (then its highest-indexed shards move first), and the
/// shards that move go to the workers under their share, lowest ordinal first. The result
/// depends only on the arguments, so every assigner replica plans the same spread.
pub fn spread_homes(
    shards: ShardCount,
    workers: ShardCount,
    current: impl Fn(ShardIndex) -> ShardIndex,
) -> Vec<ShardIndex> {
    let workers_n = workers.get();
    let Ok(worker_slots) = usize::try_from(workers_n) else {
        return Vec::new();
    };
    let mut kept: Vec<Vec<ShardIndex>> = vec![Vec::new(); worker_slots];
    let mut homeless = Vec::new();
    for shard in (0..shards.get()).map(ShardIndex) {
        let home = current(shard);
        match kept.get_mut(home.0 as usize) {
            Some(own) if home.0 < workers_n => own.push(shard),
            _ => homeless.push(shard),
        }
    }
    let quotas = quotas(shards.get(), &kept);
    for (own, quota) in kept.iter_mut().zip(&quotas) {
        // Shards are pushed in index order: the highest-indexed ones over the share move.
        while own.len() > *quota {
            homeless.extend(own.pop());
        }
    }
    homeless.sort_unstable();
    let mut homeless = homeless.into_iter();
    for (own, quota) in kept.iter_mut().zip(&quotas) {
        while own.len() < *quota {
            let Some(shard) = homeless.next() else { break };
            own.push(shard);
        }
    }
    let mut homes = vec![ShardIndex(0); shards.get() as usize];
    for (worker, own) in (0..workers_n).map(ShardIndex).zip(&kept) {
        for shard in own {
            if let Some(home) = homes.get_mut(shard.0 as usize) {
                *home = worker;
            }
        }
    }
    homes
}

/// Each worker's share: `shards / workers`, one more for the `shards % workers` workers
/// that keep the most shards already (lowest ordinal first among equals).
fn quotas(shards: u32, kept: &[Vec<ShardIndex>]) -> Vec<usize> {
    let workers = kept.len().max(1);
    let shards = shards as usize;
    let mut quotas = vec![shards / workers; kept.len()];
    let mut by_load: Vec<usize> = (0..kept.len()).collect();
    by_load.sort_by_key(|&w| (std::cmp::Reverse(kept[w].len()), w));
    for &worker in by_load.iter().take(shards % workers) {
        quotas[worker] += 1;
    }
    quotas
}

/// The Lease write that names `home` home for `shard`, if its Lease (`None` = absent) does
/// not already: annotate an existing Lease, or create a holderless one naming it. A shard
/// whose home is its own index needs no Lease from the assigner: its worker creates it.
pub fn home_step(
    shard: ShardIndex,
    lease: Option<&LeaseSnapshot>,
    home: ShardIndex,
) -> Option<LeaseStep> {
    match lease {
        None if home == shard => None,
        None => Some(LeaseStep::CreateHomed(home)),
        Some(lease) if lease.home_of(shard) == home => None,
        Some(_) => Some(LeaseStep::SetHome(home)),
    }
}

/// [`plan_shard`](super::plan_shard)'s `plan` for `shard` when the shard count is fixed
/// and spread over the workers, with `home` the spread's home worker for a shard in range
/// ([`spread_homes`]) and `None` for a shard out of range.
///
/// In range, the planned Lease step goes first, then [`home_step`]. Out of range, a shard
/// has no home worker: its workers are not going away with it, as the worker of a shard's
/// own ordinal does on a scale-in. So:
///
/// * before its holder is asked to release it, the Lease names the shard's index home
///   explicitly (if it names no one), which makes the worker of that ordinal let the
///   retired shard go like any worker named home (see
///   [`should_release`](super::should_release)) instead of keeping it as its own;
/// * the retired Lease is not deleted once released and empty (its Shard object is): it is
///   the tombstone that keeps the worker of that ordinal, which acquires its ordinal's
///   shard when it has no Lease, from creating it anew (a worker never acquires a retired
///   Lease).
pub fn spread_plan(
    shard: ShardIndex,
    lease: Option<&LeaseSnapshot>,
    plan: ShardPlan,
    home: Option<ShardIndex>,
) -> ShardPlan {
    let planned = plan.lease_step;
    if let Some(home) = home {
        return ShardPlan {
            lease_step: planned.or_else(|| home_step(shard, lease, home)),
            ..plan
        };
    }
    match planned {
        Some(LeaseStep::RequestRelease) if lease.is_some_and(|l| l.home_worker.is_none()) => {
            ShardPlan {
                lease_step: Some(LeaseStep::SetHome(shard)),
                ..plan
            }
        }
        // Planned only for a retired, released, empty Lease with no move off it in flight.
        Some(LeaseStep::Delete) => ShardPlan {
            lease_step: None,
            delete_shard_object: true,
            ..plan
        },
        _ => plan,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn n(count: u32) -> ShardCount {
        ShardCount::new(count).unwrap()
    }

    fn loads(homes: &[ShardIndex], workers: u32) -> Vec<usize> {
        (0..workers)
            .map(|w| homes.iter().filter(|h| h.0 == w).count())
            .collect()
    }

    fn moved(before: &[ShardIndex], after: &[ShardIndex]) -> usize {
        before.iter().zip(after).filter(|(b, a)| b != a).count()
    }

    #[test]
    fn the_first_spread_keeps_each_workers_own_shard_and_is_balanced() {
        let homes = spread_homes(n(12), n(3), |s| s);
        assert_eq!(&homes[..3], &[ShardIndex(0), ShardIndex(1), ShardIndex(2)]);
        assert_eq!(loads(&homes, 3), vec![4, 4, 4]);
    }

    #[test]
    fn every_spread_is_balanced_and_moves_the_fewest_shards_balance_allows() {
        for shards in 1..=24_u32 {
            for from in 1..=8_u32 {
                let before = spread_homes(n(shards), n(from), |s| s);
                for to in 1..=8_u32 {
                    let after = spread_homes(n(shards), n(to), |s| before[s.0 as usize]);
                    let load = loads(&after, to);
                    let (min, max) = (load.iter().min().unwrap(), load.iter().max().unwrap());
                    assert!(max - min <= 1, "{shards} shards {from} → {to}: {load:?}");
                    assert!(after.iter().all(|h| h.0 < to));
                    // The fewest moves: every worker that stays keeps min(its shards, its
                    // share), and only the rest move.
                    let before_load = loads(&before, from.max(to));
                    let mut shares = vec![shards / to; to as usize];
                    let mut order: Vec<usize> = (0..to as usize).collect();
                    order.sort_by_key(|&w| (std::cmp::Reverse(before_load[w]), w));
                    for &w in order.iter().take((shards % to) as usize) {
                        shares[w] += 1;
                    }
                    let kept: usize = (0..to as usize)
                        .map(|w| before_load[w].min(shares[w] as usize))
                        .sum();
                    assert_eq!(
                        moved(&before, &after),
                        shards as usize - kept,
                        "{shards} shards {from} → {to}"
                    );
                }
            }
        }
    }

    #[test]
    fn growing_by_one_worker_moves_a_share_and_shrinking_moves_the_gone_workers_shards() {
        let three = spread_homes(n(12), n(3), |s| s);
        let four = spread_homes(n(12), n(4), |s| three[s.0 as usize]);
        assert_eq!(moved(&three, &four), 3, "12 shards 3 → 4: a quarter");
        assert!(
            three.iter().zip(&four).all(|(b, a)| b == a || a.0 == 3),
            "only towards the new worker: {three:?} → {four:?}"
        );
        let two = spread_homes(n(12), n(2), |s| four[s.0 as usize]);
        assert_eq!(
            moved(&four, &two),
            6,
            "4 → 2: the shards of workers 2 and 3"
        );
        assert_eq!(loads(&two, 2), vec![6, 6]);
    }

    #[test]
    fn more_workers_than_shards_leaves_the_extra_workers_without_a_shard() {
        let homes = spread_homes(n(2), n(5), |s| s);
        assert_eq!(homes, vec![ShardIndex(0), ShardIndex(1)]);
    }

    #[test]
    fn a_spread_is_the_same_whoever_plans_it_and_stable_once_written() {
        let first = spread_homes(n(16), n(5), |s| s);
        assert_eq!(first, spread_homes(n(16), n(5), |s| s));
        assert_eq!(first, spread_homes(n(16), n(5), |s| first[s.0 as usize]));
    }

    fn lease(home: Option<u32>) -> LeaseSnapshot {
        LeaseSnapshot {
            home_worker: home.map(ShardIndex),
            ..Default::default()
        }
    }

    #[test]
    fn a_shard_beyond_a_fixed_count_is_let_go_by_the_worker_of_its_ordinal_and_stays_retired() {
        use crate::protocol::failover::{Acquisition, Me, acquisition, should_release};
        use crate::shard::ShardState;
        use std::time::Duration;
        let plan = |lease_step| ShardPlan {
            state: ShardState::Retired,
            lease_step,
            delete_shard_object: false,
        };
        let step = |lease: Option<&LeaseSnapshot>, planned, home| {
            spread_plan(ShardIndex(2), lease, plan(planned), home).lease_step
        };
        // Two shards spread over three workers: worker 2 created its ordinal's Lease before
        // the assigner retired it, and holds it.
        let shard = ShardIndex(2);
        let me = Me {
            identity: "shardop-worker-2",
            home: shard,
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        };
        let held = LeaseSnapshot {
            holder: Some(me.identity.into()),
            acquired_once: true,
            retired: true,
            ..Default::default()
        };
        // Asked to release as it is, the worker would keep it as its own shard.
        let planned = Some(LeaseStep::RequestRelease);
        assert_eq!(
            step(Some(&held), planned, None),
            Some(LeaseStep::SetHome(shard)),
            "named home first"
        );
        let named = LeaseSnapshot {
            home_worker: Some(shard),
            release_requested_by: Some("shardop-assigner".into()),
            ..held.clone()
        };
        assert_eq!(step(Some(&named), planned, None), planned);
        assert!(should_release(&me, shard, Some(&named)), "then let go");
        // Released, it stays as a retired tombstone the worker never acquires again; its
        // Shard object goes.
        let released = LeaseSnapshot {
            holder: None,
            release_requested_by: None,
            ..named
        };
        let delete = Some(LeaseStep::Delete);
        let kept = spread_plan(shard, Some(&released), plan(delete), None);
        assert_eq!(kept.lease_step, None);
        assert!(kept.delete_shard_object);
        let now = jiff::Timestamp::UNIX_EPOCH;
        assert_eq!(
            acquisition(&me, shard, Some(&released), 3, now),
            Acquisition::Wait
        );
        // In range, the plan goes first, then the spread's home.
        assert_eq!(
            step(None, None, Some(ShardIndex(1))),
            Some(LeaseStep::CreateHomed(ShardIndex(1)))
        );
        assert_eq!(step(None, delete, Some(ShardIndex(1))), delete);
    }

    #[test]
    fn home_steps_create_or_annotate_only_where_the_lease_says_otherwise() {
        let s = ShardIndex(5);
        assert_eq!(
            home_step(s, None, ShardIndex(1)),
            Some(LeaseStep::CreateHomed(ShardIndex(1)))
        );
        assert_eq!(home_step(s, None, s), None, "its own worker creates it");
        assert_eq!(home_step(s, Some(&lease(Some(1))), ShardIndex(1)), None);
        assert_eq!(
            home_step(s, Some(&lease(Some(1))), ShardIndex(2)),
            Some(LeaseStep::SetHome(ShardIndex(2)))
        );
        assert_eq!(
            home_step(s, Some(&lease(None)), ShardIndex(1)),
            Some(LeaseStep::SetHome(ShardIndex(1)))
        );
        assert_eq!(home_step(s, Some(&lease(None)), s), None);
        // Every shard of a spread ends with a Lease naming its home, or its own index.
        let homes = spread_homes(n(8), n(3), |s| s);
        let mut leases: BTreeMap<ShardIndex, LeaseSnapshot> = BTreeMap::new();
        for (i, home) in homes.iter().enumerate() {
            let shard = ShardIndex(i as u32);
            if let Some(LeaseStep::CreateHomed(h) | LeaseStep::SetHome(h)) =
                home_step(shard, leases.get(&shard), *home)
            {
                leases.insert(shard, lease(Some(h.0)));
            }
            let named = leases.get(&shard).map_or(shard, |l| l.home_of(shard));
            assert_eq!(named, *home);
        }
    }
}
