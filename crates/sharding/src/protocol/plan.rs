//! The assigner's plan: the next step for each object and for each shard, given a
//! [`ShardTable`]. The assigner binary only observes, calls these, and carries the steps
//! out with `resourceVersion` preconditions.

use super::lease::home_shard_of;
use super::object::{AssignerAction, ObjectPlacement, assigner_decision};
use super::shards::ShardTable;
use crate::shard::ShardState;
use crate::shard_index::ShardIndex;

/// What the assigner knows about one object.
#[derive(Clone, Copy, Debug)]
pub struct ObjectFacts<'a> {
    /// Where its labels place it.
    pub placement: &'a ObjectPlacement,
    /// It has a deletion timestamp.
    pub deleting: bool,
    /// [`object_key_hash`](crate::assignment::object_key_hash) of `namespace/name`.
    pub key_hash: u64,
    /// The last valid shard label seen on it without a drain label, if remembered: the
    /// worker that may still be reconciling it if a user removed or garbled the label.
    pub last_owner: Option<ShardIndex>,
}

/// The assigner's next step for one object.
pub fn plan_object(facts: ObjectFacts<'_>, table: &ShardTable) -> AssignerAction {
    let desired = table.desired_shard(facts.key_hash);
    // A label removed, garbled or hand-edited behind the owner's back: give the object
    // back to the owner that may still be reconciling it, so that it moves through a drain.
    if let (
        ObjectPlacement::Unassigned { .. }
        | ObjectPlacement::Invalid { .. }
        | ObjectPlacement::Untrusted { .. },
        Some(last),
    ) = (facts.placement, facts.last_owner)
        && Some(last) != desired
        && table.is_live(last)
    {
        return AssignerAction::Assign { to: last };
    }
    assigner_decision(
        facts.placement,
        facts.deleting,
        desired,
        |i| table.is_fenced(i),
        |i| table.is_live(i),
    )
}

/// A write the assigner makes to a shard Lease (always with a `resourceVersion`
/// precondition, or as a create).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeaseStep {
    /// Create a holderless Lease annotated retired: objects carry an out-of-range label
    /// that has no Lease, and no worker must ever acquire it.
    CreateRetired,
    /// Annotate the Lease `retired=true`: the shard left the desired count.
    MarkRetired,
    /// Ask the holder to release it (`release-requested-by=shardop-assigner`).
    RequestRelease,
    /// The shard is back in range and still held: remove the `retired` annotation.
    LiftRetirement,
    /// Delete the Lease: a retired shard is empty and nobody holds it, or a shard back in
    /// range must be acquired afresh before it counts towards `E` again.
    Delete,
    /// Create a holderless Lease naming this worker ordinal home for the shard (see
    /// [`super::homes`]).
    CreateHomed(ShardIndex),
    /// Name this worker ordinal home for the shard on its Lease; the worker then asks the
    /// holder to hand the shard back.
    SetHome(ShardIndex),
}

/// The assigner's plan for one shard index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    /// The state reported in the Shard object's status.
    pub state: ShardState,
    /// The Lease write to make now, if any.
    pub lease_step: Option<LeaseStep>,
    /// The Shard object of a retired shard can go: its Lease is gone and it is empty.
    pub delete_shard_object: bool,
}

/// The assigner's plan for `shard`, which `labelled_objects` objects carry in their shard
/// label (drained or not). `direct_moves_in_flight` says whether some of the assigner's own
/// direct relabels off this shard have not completed: the fence must stay until they have.
pub fn plan_shard(
    shard: ShardIndex,
    table: &ShardTable,
    labelled_objects: usize,
    direct_moves_in_flight: bool,
) -> ShardPlan {
    let lease = table.lease(shard);
    let live_holder = table.lease_state(shard).live_holder().map(str::to_owned);
    let home = lease.map_or(shard, |l| l.home_of(shard));
    let home_held = live_holder
        .as_deref()
        .is_some_and(|h| home_shard_of(h) == Some(home));
    let empty = labelled_objects == 0;
    let release_pending = lease.is_some_and(|l| l.release_requested_by.is_some());

    if table.in_range(shard) {
        let state = match &live_holder {
            Some(_) if home_held => ShardState::Active,
            Some(_) => ShardState::TakenOver,
            None => ShardState::Orphaned,
        };
        let lease_step = match lease {
            Some(l) if l.retired && live_holder.is_some() => Some(LeaseStep::LiftRetirement),
            Some(l) if l.retired && !direct_moves_in_flight => Some(LeaseStep::Delete),
            _ => None,
        };
        return ShardPlan {
            state,
            lease_step,
            delete_shard_object: false,
        };
    }

    let state = if empty {
        ShardState::Retired
    } else {
        ShardState::Draining
    };
    let lease_step = match lease {
        None if !empty => Some(LeaseStep::CreateRetired),
        None => None,
        Some(l) if !l.retired => Some(LeaseStep::MarkRetired),
        // A taker lets go at once (its objects then move directly); the home worker is
        // asked only when it has acknowledged every drain, so it is not stopped mid-move.
        Some(_) if live_holder.is_some() => {
            (!release_pending && (!home_held || empty)).then_some(LeaseStep::RequestRelease)
        }
        Some(_) => (empty && !direct_moves_in_flight).then_some(LeaseStep::Delete),
    };
    ShardPlan {
        state,
        lease_step,
        delete_shard_object: lease.is_none() && empty,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assignment::object_key_hash;
    use crate::protocol::lease::LeaseSnapshot;
    use crate::shard_index::ShardCount;
    use jiff::Timestamp;
    use std::time::Duration;

    const NOW: i64 = 1_000;

    fn ts(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    fn held(holder: &str) -> LeaseSnapshot {
        LeaseSnapshot {
            holder: Some(holder.to_owned()),
            acquired_once: true,
            renew_time: Some(ts(NOW - 1)),
            duration: Some(Duration::from_secs(15)),
            ..Default::default()
        }
    }

    fn expired(holder: &str) -> LeaseSnapshot {
        LeaseSnapshot {
            renew_time: Some(ts(NOW - 60)),
            ..held(holder)
        }
    }

    fn released() -> LeaseSnapshot {
        LeaseSnapshot {
            acquired_once: true,
            ..Default::default()
        }
    }

    fn retired(mut lease: LeaseSnapshot) -> LeaseSnapshot {
        lease.retired = true;
        lease
    }

    fn table(desired: u32, leases: Vec<(u32, LeaseSnapshot)>) -> ShardTable {
        ShardTable::new(
            ShardCount::new(desired).unwrap(),
            leases.into_iter().map(|(i, l)| (ShardIndex(i), l)),
            ts(NOW),
        )
    }

    fn home(n: u32) -> Vec<(u32, LeaseSnapshot)> {
        (0..n)
            .map(|i| (i, held(&format!("shardop-worker-{i}"))))
            .collect()
    }

    /// A key whose desired shard is `want` with `e` effective shards.
    fn key_on(want: u32, e: u32) -> u64 {
        (0..)
            .map(|i| object_key_hash("ns", &format!("db-{i}")))
            .find(|&h| crate::assignment::jump_consistent_hash(h, e) == want)
            .unwrap()
    }

    fn plan(placement: &ObjectPlacement, key_hash: u64, t: &ShardTable) -> AssignerAction {
        plan_object(
            ObjectFacts {
                placement,
                deleting: false,
                key_hash,
                last_owner: None,
            },
            t,
        )
    }

    #[test]
    fn unassigned_objects_get_their_desired_live_shard() {
        let t = table(3, home(3));
        let key = key_on(2, 3);
        let unassigned = ObjectPlacement::Unassigned { stray_drain: false };
        assert_eq!(
            plan(&unassigned, key, &t),
            AssignerAction::Assign { to: ShardIndex(2) }
        );
        let nobody = table(3, vec![]);
        assert_eq!(plan(&unassigned, key, &nobody), AssignerAction::Wait);
        let stray = ObjectPlacement::Unassigned { stray_drain: true };
        assert_eq!(plan(&stray, key, &nobody), AssignerAction::ClearStrayDrain);
    }

    #[test]
    fn a_crashed_in_range_owner_is_waited_for_not_bypassed() {
        // Expansion 3 -> 4 while shard 1 is down: its object bound for shard 3 must wait
        // for a takeover, then drain.
        let mut leases = home(4);
        leases[1].1 = expired("shardop-worker-1");
        let t = table(4, leases);
        let key = key_on(3, 4);
        // The drain label is harmless on an object nobody reconciles: the taker will
        // acknowledge it. What must not happen is a direct relabel.
        let owned = ObjectPlacement::Owned(ShardIndex(1));
        assert_eq!(
            plan(&owned, key, &t),
            AssignerAction::RequestDrain {
                from: ShardIndex(1),
                to: ShardIndex(3)
            }
        );
        let draining = ObjectPlacement::Draining {
            from: ShardIndex(1),
        };
        assert_eq!(plan(&draining, key, &t), AssignerAction::Wait);
    }

    #[test]
    fn a_fenced_retired_shard_is_relabelled_directly() {
        let mut leases = home(2);
        leases.push((2, retired(released())));
        let t = table(2, leases);
        let key = key_on(0, 2);
        for placement in [
            ObjectPlacement::Owned(ShardIndex(2)),
            ObjectPlacement::Draining {
                from: ShardIndex(2),
            },
        ] {
            assert_eq!(
                plan(&placement, key, &t),
                AssignerAction::Assign { to: ShardIndex(0) }
            );
        }
        // Not yet retired (the annotation write has not landed): a worker may still
        // acquire the Lease, so only the drain is allowed.
        let mut leases = home(2);
        leases.push((2, released()));
        let t = table(2, leases);
        assert_eq!(
            plan(&ObjectPlacement::Owned(ShardIndex(2)), key, &t),
            AssignerAction::RequestDrain {
                from: ShardIndex(2),
                to: ShardIndex(0)
            }
        );
        assert_eq!(
            plan(
                &ObjectPlacement::Draining {
                    from: ShardIndex(2)
                },
                key,
                &t
            ),
            AssignerAction::Wait
        );
    }

    #[test]
    fn a_live_retired_owner_is_drained_toward_a_live_destination() {
        let mut leases = home(3);
        leases[2].1.retired = true;
        let t = table(2, leases);
        let key = key_on(1, 2);
        assert_eq!(
            plan(&ObjectPlacement::Owned(ShardIndex(2)), key, &t),
            AssignerAction::RequestDrain {
                from: ShardIndex(2),
                to: ShardIndex(1)
            }
        );
        let mut leases = home(3);
        leases[1].1 = expired("shardop-worker-1");
        let t = table(3, leases);
        // Destination 1 is down: do not drain toward it (the object would sit unassigned).
        assert_eq!(
            plan(&ObjectPlacement::Owned(ShardIndex(2)), key_on(1, 3), &t),
            AssignerAction::Wait
        );
    }

    #[test]
    fn tampered_labels_go_back_to_a_live_last_owner_first() {
        let t = table(3, home(3));
        let key = key_on(2, 3);
        for placement in [
            ObjectPlacement::Unassigned { stray_drain: false },
            ObjectPlacement::Invalid { value: "x".into() },
        ] {
            let facts = ObjectFacts {
                placement: &placement,
                deleting: false,
                key_hash: key,
                last_owner: Some(ShardIndex(0)),
            };
            assert_eq!(
                plan_object(facts, &t),
                AssignerAction::Assign { to: ShardIndex(0) }
            );
            let same = ObjectFacts {
                last_owner: Some(ShardIndex(2)),
                ..facts
            };
            assert_eq!(
                plan_object(same, &t),
                AssignerAction::Assign { to: ShardIndex(2) }
            );
        }
        // A dead last owner cannot be reconciling: go straight to the desired shard.
        let mut leases = home(3);
        leases[0].1 = expired("shardop-worker-0");
        let t = table(3, leases);
        let unassigned = ObjectPlacement::Unassigned { stray_drain: false };
        let facts = ObjectFacts {
            placement: &unassigned,
            deleting: false,
            key_hash: key,
            last_owner: Some(ShardIndex(0)),
        };
        assert_eq!(
            plan_object(facts, &t),
            AssignerAction::Assign { to: ShardIndex(2) }
        );
        // Edited to another valid, live shard: drained from it like any misplaced object.
        let t = table(3, home(3));
        assert_eq!(
            plan(&ObjectPlacement::Owned(ShardIndex(1)), key, &t),
            AssignerAction::RequestDrain {
                from: ShardIndex(1),
                to: ShardIndex(2)
            }
        );
    }

    #[test]
    fn in_range_shard_states() {
        let mut leases = home(3);
        leases[1].1 = held("shardop-worker-2");
        leases[2].1 = expired("shardop-worker-2");
        let t = table(4, leases);
        let state = |i| plan_shard(ShardIndex(i), &t, 5, false).state;
        assert_eq!(state(0), ShardState::Active);
        assert_eq!(state(1), ShardState::TakenOver);
        assert_eq!(state(2), ShardState::Orphaned);
        assert_eq!(state(3), ShardState::Orphaned, "Lease not created yet");
        for i in 0..4 {
            assert_eq!(plan_shard(ShardIndex(i), &t, 5, false).lease_step, None);
        }
    }

    #[test]
    fn a_shard_held_by_the_home_its_lease_names_is_active() {
        let named = |holder: &str, home: u32| LeaseSnapshot {
            home_worker: Some(ShardIndex(home)),
            ..held(holder)
        };
        // Shards 4 and 5 of six, spread over workers 0 and 1.
        let t = table(
            6,
            vec![
                (4, named("shardop-worker-1", 1)),
                (5, named("shardop-worker-5", 0)),
            ],
        );
        let state = |i| plan_shard(ShardIndex(i), &t, 5, false).state;
        assert_eq!(state(4), ShardState::Active, "held by its named home");
        assert_eq!(
            state(5),
            ShardState::TakenOver,
            "held by the worker of its index, not its named home"
        );
    }

    #[test]
    fn retirement_steps_in_order() {
        let step = |lease: Option<LeaseSnapshot>, objects: usize, in_flight: bool| {
            let leases = home(2).into_iter().chain(lease.map(|l| (2, l))).collect();
            plan_shard(ShardIndex(2), &table(2, leases), objects, in_flight)
        };
        // 1. mark retired (or create a fence for a label that has no Lease).
        let p = step(Some(held("shardop-worker-2")), 10, false);
        assert_eq!(p.lease_step, Some(LeaseStep::MarkRetired));
        assert_eq!(p.state, ShardState::Draining);
        assert_eq!(
            step(None, 3, false).lease_step,
            Some(LeaseStep::CreateRetired)
        );
        // 2. home holder drains first; a taker is asked to release at once.
        assert_eq!(
            step(Some(retired(held("shardop-worker-2"))), 10, false).lease_step,
            None
        );
        assert_eq!(
            step(Some(retired(held("shardop-worker-0"))), 10, false).lease_step,
            Some(LeaseStep::RequestRelease)
        );
        // 3. empty: the home holder is asked to release, once.
        let p = step(Some(retired(held("shardop-worker-2"))), 0, false);
        assert_eq!(p.lease_step, Some(LeaseStep::RequestRelease));
        assert_eq!(p.state, ShardState::Retired);
        let mut asked = retired(held("shardop-worker-2"));
        asked.release_requested_by = Some("shardop-assigner".into());
        assert_eq!(step(Some(asked), 0, false).lease_step, None);
        // 4. released and empty: delete the Lease (not while own moves are in flight),
        //    then the Shard object.
        assert_eq!(
            step(Some(retired(released())), 0, false).lease_step,
            Some(LeaseStep::Delete)
        );
        assert_eq!(step(Some(retired(released())), 0, true).lease_step, None);
        assert_eq!(step(Some(retired(released())), 4, false).lease_step, None);
        assert!(!step(Some(retired(released())), 0, false).delete_shard_object);
        let gone = step(None, 0, false);
        assert_eq!(gone.lease_step, None);
        assert!(gone.delete_shard_object);
        assert_eq!(gone.state, ShardState::Retired);
    }

    #[test]
    fn a_retired_shard_back_in_range_is_unfenced() {
        let mut leases = home(3);
        leases[2].1.retired = true;
        let t = table(3, leases);
        assert_eq!(
            plan_shard(ShardIndex(2), &t, 4, false).lease_step,
            Some(LeaseStep::LiftRetirement)
        );
        let mut leases = home(2);
        leases.push((2, retired(released())));
        let t = table(3, leases);
        assert_eq!(
            plan_shard(ShardIndex(2), &t, 4, false).lease_step,
            Some(LeaseStep::Delete),
            "E must wait for a fresh acquisition"
        );
        assert_eq!(plan_shard(ShardIndex(2), &t, 4, true).lease_step, None);
    }
}
