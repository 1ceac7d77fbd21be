//! The state of a DatabaseCluster in the shard protocol, and the assigner's and the
//! worker's next step for it (transitions A1–A10 and W1–W2 of `docs/shard-protocol.md`).

use std::collections::BTreeMap;

use crate::names::OperatorNames;
use crate::shard_index::ShardIndex;

/// Where an object stands, read from its labels and from who wrote its shard label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectPlacement {
    /// No shard label. `stray_drain` is a drain label left without a shard label.
    Unassigned {
        /// A drain label is present although no shard owns the object.
        stray_drain: bool,
    },
    /// Owned by a shard, no move requested.
    Owned(ShardIndex),
    /// The assigner asked the owner to let go (phase 1 of a move).
    Draining {
        /// The current owner.
        from: ShardIndex,
    },
    /// The shard label is not a canonical index below `MAX_SHARDS`: no worker's selector
    /// matches it, or no shard can exist for it.
    Invalid {
        /// The offending label value.
        value: String,
    },
    /// A valid shard label that the assigner did not write (a hand edit, or an object
    /// created with the label): no worker acts on it, and the assigner moves the object
    /// through the protocol as it does for a garbage label. A drain label beside it is
    /// ignored too.
    Untrusted {
        /// The shard the label names.
        labelled: ShardIndex,
    },
}

impl ObjectPlacement {
    /// Reads the placement from an object's labels; `label_trusted` is whether the
    /// assigner wrote the shard label (see [`crate::label_trust`]).
    pub fn from_labels(labels: Option<&BTreeMap<String, String>>, label_trusted: bool) -> Self {
        Self::from_labels_of(labels, label_trusted, &OperatorNames::default())
    }

    /// [`from_labels`](Self::from_labels) with the label keys of operator `names`.
    pub fn from_labels_of(
        labels: Option<&BTreeMap<String, String>>,
        label_trusted: bool,
        names: &OperatorNames,
    ) -> Self {
        let get = |key: &str| labels.and_then(|l| l.get(key));
        let drain = get(&names.drain_label()).is_some();
        match get(&names.shard_label()) {
            None => Self::Unassigned { stray_drain: drain },
            Some(value) => match value.parse::<ShardIndex>() {
                Err(_) => Self::Invalid {
                    value: value.clone(),
                },
                Ok(labelled) if !label_trusted => Self::Untrusted { labelled },
                Ok(from) if drain => Self::Draining { from },
                Ok(owner) => Self::Owned(owner),
            },
        }
    }

    /// The shard whose worker may be reconciling the object.
    pub fn owner(&self) -> Option<ShardIndex> {
        match self {
            Self::Owned(shard) | Self::Draining { from: shard } => Some(*shard),
            Self::Unassigned { .. } | Self::Invalid { .. } | Self::Untrusted { .. } => None,
        }
    }
}

/// What the assigner does with one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AssignerAction {
    /// The object is where it belongs.
    Nothing,
    /// Nothing can be done safely yet: waiting for an acknowledgement, for a live
    /// destination, or for a live owner to finish a deletion.
    Wait,
    /// Set the shard label to `to` and remove any drain label (A1, A5, A7, A9).
    Assign {
        /// The destination shard.
        to: ShardIndex,
    },
    /// Set the drain label to ask the live owner to let go (A4, phase 1).
    RequestDrain {
        /// The current, live owner.
        from: ShardIndex,
        /// The destination, recorded in the drain label for humans.
        to: ShardIndex,
    },
    /// Remove the drain label: the object belongs to its current owner after all (A8).
    CancelDrain,
    /// Remove a drain label that no owner will ever acknowledge (A2).
    ClearStrayDrain,
}

/// The assigner's next step for an object, in the simple model where every shard that is
/// not live counts as fenced.
///
/// * `desired` is `shard_for(namespace, name, E)` for the effective shard count `E`;
/// * `deleting` is whether the object has a deletion timestamp;
/// * `is_live(i)` is whether shard `i`'s Lease is held right now.
///
/// The assigner binary uses [`assigner_decision`] (through
/// [`plan_object`](super::plan::plan_object)) instead: a shard that is merely not live may
/// be acquired again at any moment, so relabelling its objects directly is only safe once
/// it is fenced (see "Transitions" in `docs/shard-protocol.md`).
pub fn assigner_action(
    placement: &ObjectPlacement,
    deleting: bool,
    desired: ShardIndex,
    is_live: impl Fn(ShardIndex) -> bool,
) -> AssignerAction {
    assigner_decision(
        placement,
        deleting,
        Some(desired),
        |i| !is_live(i),
        &is_live,
    )
}

/// The assigner's next step for an object (transitions A1–A10).
///
/// * `desired` is `shard_for(namespace, name, E)`, `None` while there is no `E`;
/// * `deleting` is whether the object has a deletion timestamp;
/// * `is_fenced(i)`: nobody reconciles shard `i`'s objects and nobody can start to, so they
///   may be relabelled directly;
/// * `is_live(i)`: shard `i`'s Lease is held right now (a valid destination).
pub fn assigner_decision(
    placement: &ObjectPlacement,
    deleting: bool,
    desired: Option<ShardIndex>,
    is_fenced: impl Fn(ShardIndex) -> bool,
    is_live: impl Fn(ShardIndex) -> bool,
) -> AssignerAction {
    let live_destination = desired.filter(|&d| is_live(d));
    match placement {
        ObjectPlacement::Owned(owner) if Some(*owner) == desired => AssignerAction::Nothing,
        ObjectPlacement::Draining { from } if Some(*from) == desired => AssignerAction::CancelDrain,
        // An owner that is not fenced keeps the object: a deletion is finished by it (A10),
        // a move is requested from it (A4) and then waits for its acknowledgement (A6).
        // Draining only toward a live destination keeps the acknowledged object from
        // sitting unassigned.
        ObjectPlacement::Owned(owner) if !is_fenced(*owner) => match live_destination {
            _ if deleting => AssignerAction::Nothing,
            Some(to) => AssignerAction::RequestDrain { from: *owner, to },
            None => AssignerAction::Wait,
        },
        ObjectPlacement::Draining { from } if !is_fenced(*from) => AssignerAction::Wait,
        // Nobody is or can become the object's reconciler: move it straight to a live
        // destination (A1, A5, A7, A9).
        _ => match (live_destination, placement) {
            (Some(to), _) => AssignerAction::Assign { to },
            (None, ObjectPlacement::Unassigned { stray_drain: true }) => {
                AssignerAction::ClearStrayDrain
            }
            (None, _) => AssignerAction::Wait,
        },
    }
}

/// What a worker serving `shard` does with an object it sees in that shard's cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerAction {
    /// Converge the children and status (W1).
    Reconcile,
    /// Run the finalizer's cleanup: the object is being deleted.
    Cleanup,
    /// Remove the shard and drain labels in one patch (W2, phase 2 acknowledgement).
    AcknowledgeDrain,
    /// The object is not (or no longer) this shard's: do not touch it.
    Ignore,
}

/// A worker's next step for an object, given the shard the reconcile runs for.
///
/// A deleting object is cleaned up even if a drain was requested: moving an object that is
/// about to disappear would only delay its finalizer.
pub fn worker_action(
    placement: &ObjectPlacement,
    shard: ShardIndex,
    deleting: bool,
) -> WorkerAction {
    match placement.owner() {
        Some(owner) if owner == shard => match (placement, deleting) {
            (_, true) => WorkerAction::Cleanup,
            (ObjectPlacement::Draining { .. }, false) => WorkerAction::AcknowledgeDrain,
            _ => WorkerAction::Reconcile,
        },
        _ => WorkerAction::Ignore,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constants::{DRAIN_LABEL, SHARD_LABEL};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn placement(pairs: &[(&str, &str)]) -> ObjectPlacement {
        ObjectPlacement::from_labels(Some(&labels(pairs)), true)
    }

    /// The placement when the assigner did not write the shard label.
    fn untrusted(pairs: &[(&str, &str)]) -> ObjectPlacement {
        ObjectPlacement::from_labels(Some(&labels(pairs)), false)
    }

    const S0: ShardIndex = ShardIndex(0);
    const S1: ShardIndex = ShardIndex(1);
    const S2: ShardIndex = ShardIndex(2);

    #[test]
    fn another_operators_labels_are_not_ours() {
        let tenants = OperatorNames::new("tenants").unwrap();
        let ours = labels(&[("tenants.shardop.dev/shard", "1")]);
        assert_eq!(
            ObjectPlacement::from_labels_of(Some(&ours), true, &tenants),
            ObjectPlacement::Owned(S1)
        );
        assert_eq!(
            ObjectPlacement::from_labels(Some(&ours), true),
            ObjectPlacement::Unassigned { stray_drain: false },
            "the default operator does not see another operator's shard label"
        );
    }

    #[test]
    fn placement_from_labels() {
        assert_eq!(
            ObjectPlacement::from_labels(None, true),
            ObjectPlacement::Unassigned { stray_drain: false }
        );
        assert_eq!(
            placement(&[(DRAIN_LABEL, "2")]),
            ObjectPlacement::Unassigned { stray_drain: true }
        );
        assert_eq!(placement(&[(SHARD_LABEL, "1")]), ObjectPlacement::Owned(S1));
        assert_eq!(
            placement(&[(SHARD_LABEL, "1"), (DRAIN_LABEL, "")]),
            ObjectPlacement::Draining { from: S1 }
        );
        assert_eq!(
            placement(&[(SHARD_LABEL, "01"), (DRAIN_LABEL, "2")]),
            ObjectPlacement::Invalid { value: "01".into() }
        );
        assert_eq!(
            placement(&[(SHARD_LABEL, "7")]),
            ObjectPlacement::Owned(ShardIndex(7))
        );
    }

    #[test]
    fn a_shard_label_the_assigner_did_not_write_is_untrusted() {
        let hand_edit = ObjectPlacement::Untrusted { labelled: S1 };
        assert_eq!(untrusted(&[(SHARD_LABEL, "1")]), hand_edit);
        assert_eq!(
            untrusted(&[(SHARD_LABEL, "1"), (DRAIN_LABEL, "2")]),
            hand_edit
        );
        assert_eq!(hand_edit.owner(), None);
        // Trust only matters for a valid shard label.
        assert_eq!(
            untrusted(&[(DRAIN_LABEL, "2")]),
            ObjectPlacement::Unassigned { stray_drain: true }
        );
        assert_eq!(
            untrusted(&[(SHARD_LABEL, "4294967295")]),
            ObjectPlacement::Invalid {
                value: "4294967295".into()
            }
        );
    }

    #[test]
    fn labels_past_the_maximum_shard_count_are_garbage() {
        assert_eq!(
            placement(&[(SHARD_LABEL, "1023")]),
            ObjectPlacement::Owned(ShardIndex(1023))
        );
        for value in ["1024", "4294967295", "4294967296"] {
            let garbage = ObjectPlacement::Invalid {
                value: value.into(),
            };
            assert_eq!(placement(&[(SHARD_LABEL, value)]), garbage);
            assert_eq!(
                placement(&[(SHARD_LABEL, value), (DRAIN_LABEL, "1")]),
                garbage
            );
            assert_eq!(garbage.owner(), None);
        }
    }

    /// Name, placement, deleting, desired shard, liveness, expected action.
    type Case<'a> = (
        &'a str,
        &'a ObjectPlacement,
        bool,
        ShardIndex,
        &'a dyn Fn(ShardIndex) -> bool,
        AssignerAction,
    );

    #[test]
    fn assigner_transitions() {
        let all_live = |_: ShardIndex| true;
        let none_live = |_: ShardIndex| false;
        let only_s1 = |x: ShardIndex| x == S1;
        let unassigned = ObjectPlacement::Unassigned { stray_drain: false };
        let stray = ObjectPlacement::Unassigned { stray_drain: true };
        let owned = ObjectPlacement::Owned(S0);
        let draining = ObjectPlacement::Draining { from: S0 };
        let invalid = ObjectPlacement::Invalid { value: "x".into() };
        let untrusted = ObjectPlacement::Untrusted { labelled: S2 };
        let untrusted_s1 = ObjectPlacement::Untrusted { labelled: S1 };
        let cases: Vec<Case<'_>> = vec![
            (
                "A1",
                &unassigned,
                false,
                S1,
                &all_live,
                AssignerAction::Assign { to: S1 },
            ),
            (
                "A1 stray",
                &stray,
                false,
                S1,
                &all_live,
                AssignerAction::Assign { to: S1 },
            ),
            (
                "A2",
                &unassigned,
                false,
                S1,
                &none_live,
                AssignerAction::Wait,
            ),
            (
                "A2 stray",
                &stray,
                false,
                S1,
                &none_live,
                AssignerAction::ClearStrayDrain,
            ),
            ("A3", &owned, false, S0, &all_live, AssignerAction::Nothing),
            (
                "A3 owner down",
                &owned,
                false,
                S0,
                &none_live,
                AssignerAction::Nothing,
            ),
            (
                "A4",
                &owned,
                false,
                S1,
                &all_live,
                AssignerAction::RequestDrain { from: S0, to: S1 },
            ),
            (
                "A5",
                &owned,
                false,
                S1,
                &only_s1,
                AssignerAction::Assign { to: S1 },
            ),
            (
                "A5 nowhere to go",
                &owned,
                false,
                S1,
                &none_live,
                AssignerAction::Wait,
            ),
            ("A6", &draining, false, S1, &all_live, AssignerAction::Wait),
            (
                "A7",
                &draining,
                false,
                S1,
                &only_s1,
                AssignerAction::Assign { to: S1 },
            ),
            (
                "A7 nowhere to go",
                &draining,
                false,
                S2,
                &only_s1,
                AssignerAction::Wait,
            ),
            (
                "A8",
                &draining,
                false,
                S0,
                &all_live,
                AssignerAction::CancelDrain,
            ),
            (
                "A8 owner down",
                &draining,
                false,
                S0,
                &none_live,
                AssignerAction::CancelDrain,
            ),
            (
                "A9",
                &invalid,
                false,
                S1,
                &all_live,
                AssignerAction::Assign { to: S1 },
            ),
            (
                "A9 hand edit",
                &untrusted,
                false,
                S1,
                &all_live,
                AssignerAction::Assign { to: S1 },
            ),
            (
                "A9 hand edit to the desired shard",
                &untrusted_s1,
                false,
                S1,
                &all_live,
                AssignerAction::Assign { to: S1 },
            ),
            (
                "A9 nowhere to go",
                &invalid,
                false,
                S1,
                &none_live,
                AssignerAction::Wait,
            ),
            ("A10", &owned, true, S1, &all_live, AssignerAction::Nothing),
            (
                "A10 draining",
                &draining,
                true,
                S1,
                &all_live,
                AssignerAction::Wait,
            ),
            (
                "A10 owner gone",
                &owned,
                true,
                S1,
                &only_s1,
                AssignerAction::Assign { to: S1 },
            ),
            (
                "A10 unassigned",
                &unassigned,
                true,
                S1,
                &all_live,
                AssignerAction::Assign { to: S1 },
            ),
        ];
        for (name, placement, deleting, desired, live, expected) in cases {
            assert_eq!(
                assigner_action(placement, deleting, desired, live),
                expected,
                "{name}"
            );
        }
    }

    /// Every placement × deletion × desired shard × fenced/live combination over three
    /// shards: each action the assigner may take is safe, and whenever progress is
    /// possible it is made.
    #[test]
    fn assigner_decision_is_safe_and_live_in_every_combination() {
        let shards = [S0, S1, S2];
        let mut placements = vec![
            ObjectPlacement::Unassigned { stray_drain: false },
            ObjectPlacement::Unassigned { stray_drain: true },
            ObjectPlacement::Invalid { value: "x".into() },
        ];
        for s in shards {
            placements.push(ObjectPlacement::Owned(s));
            placements.push(ObjectPlacement::Draining { from: s });
            placements.push(ObjectPlacement::Untrusted { labelled: s });
        }
        let desireds = [None, Some(S0), Some(S1), Some(S2)];
        let mut checked = 0;
        for placement in &placements {
            for deleting in [false, true] {
                for desired in desireds {
                    for fenced_bits in 0..8_u32 {
                        for live_bits in 0..8_u32 {
                            // A fenced shard is never live.
                            if fenced_bits & live_bits != 0 {
                                continue;
                            }
                            let fenced = |s: ShardIndex| fenced_bits & (1 << s.0) != 0;
                            let live = |s: ShardIndex| live_bits & (1 << s.0) != 0;
                            let action =
                                assigner_decision(placement, deleting, desired, fenced, live);
                            check(placement, deleting, desired, &fenced, &live, &action);
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 12 * 2 * 4 * 27);
    }

    fn check(
        placement: &ObjectPlacement,
        deleting: bool,
        desired: Option<ShardIndex>,
        fenced: &dyn Fn(ShardIndex) -> bool,
        live: &dyn Fn(ShardIndex) -> bool,
        action: &AssignerAction,
    ) {
        let case = format!("{placement:?} deleting={deleting} desired={desired:?} -> {action:?}");
        let owner = placement.owner();
        let live_desired = desired.filter(|&d| live(d));
        let draining = matches!(placement, ObjectPlacement::Draining { .. });
        match action {
            // Safety: a label is only written where nobody is or can become the reconciler,
            // and only toward the desired, live shard.
            AssignerAction::Assign { to } => {
                assert_eq!(Some(*to), live_desired, "{case}");
                assert!(owner.is_none_or(fenced), "{case}");
            }
            AssignerAction::RequestDrain { from, to } => {
                assert_eq!(placement, &ObjectPlacement::Owned(*from), "{case}");
                assert!(!fenced(*from) && !deleting, "{case}");
                assert_eq!(Some(*to), live_desired, "{case}");
            }
            AssignerAction::CancelDrain => {
                assert!(draining && owner == desired, "{case}");
            }
            AssignerAction::ClearStrayDrain => {
                assert_eq!(
                    placement,
                    &ObjectPlacement::Unassigned { stray_drain: true },
                    "{case}"
                );
                assert_eq!(live_desired, None, "{case}");
            }
            AssignerAction::Nothing | AssignerAction::Wait => {}
        }
        // Liveness: with a live destination, every misplaced object makes progress unless
        // a live owner must finish a deletion or acknowledge a drain first.
        if let Some(to) = live_desired
            && owner != Some(to)
        {
            let owner_keeps = owner.is_some_and(|o| !fenced(o)) && (deleting || draining);
            if !owner_keeps {
                assert!(
                    matches!(
                        action,
                        AssignerAction::Assign { .. } | AssignerAction::RequestDrain { .. }
                    ),
                    "{case}"
                );
            }
        }
        if owner.is_some() && owner == desired {
            let expected = if draining {
                AssignerAction::CancelDrain
            } else {
                AssignerAction::Nothing
            };
            assert_eq!(action, &expected, "{case}");
        }
    }

    #[test]
    fn worker_transitions() {
        let owned = ObjectPlacement::Owned(S1);
        let draining = ObjectPlacement::Draining { from: S1 };
        assert_eq!(worker_action(&owned, S1, false), WorkerAction::Reconcile);
        assert_eq!(worker_action(&owned, S1, true), WorkerAction::Cleanup);
        assert_eq!(
            worker_action(&draining, S1, false),
            WorkerAction::AcknowledgeDrain
        );
        assert_eq!(worker_action(&draining, S1, true), WorkerAction::Cleanup);
        assert_eq!(worker_action(&owned, S0, false), WorkerAction::Ignore);
        assert_eq!(worker_action(&draining, S2, false), WorkerAction::Ignore);
        for other in [
            ObjectPlacement::Unassigned { stray_drain: true },
            ObjectPlacement::Invalid { value: "1x".into() },
            ObjectPlacement::Invalid {
                value: "4294967295".into(),
            },
        ] {
            assert_eq!(worker_action(&other, S1, false), WorkerAction::Ignore);
        }
    }

    #[test]
    fn no_worker_acts_on_a_shard_label_the_assigner_did_not_write() {
        let hand_edit = ObjectPlacement::Untrusted { labelled: S1 };
        for shard in [S0, S1, S2] {
            for deleting in [false, true] {
                assert_eq!(
                    worker_action(&hand_edit, shard, deleting),
                    WorkerAction::Ignore
                );
            }
        }
    }
}
