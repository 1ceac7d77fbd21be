//! The assigner's creation-time decision: whether its mutating admission webhook stamps the
//! shard label on an object being created, and toward which shard.
//!
//! A new object is Unassigned, so the webhook makes exactly the decision the watch path
//! makes for an Unassigned object ([`plan_object`] with no previous owner): stamp it toward
//! its desired shard when that shard is live, otherwise leave it to the watch path. The
//! watch path stays the fallback for every object the webhook skips or never sees.

use std::collections::BTreeMap;

use super::object::{AssignerAction, ObjectPlacement};
use super::plan::{ObjectFacts, plan_object};
use super::shards::ShardTable;
use crate::assignment::object_key_hash;
use crate::names::OperatorNames;
use crate::shard_index::ShardIndex;

/// The object being created, as the admission request shows it.
#[derive(Clone, Copy, Debug)]
pub struct Creation<'a> {
    /// Its namespace (`""` for a cluster-scoped kind).
    pub namespace: &'a str,
    /// Its name; `None` (or empty) when it is created with `generateName`: the API server
    /// generates the name only after mutating admission.
    pub name: Option<&'a str>,
    /// Its labels as created.
    pub labels: Option<&'a BTreeMap<String, String>>,
}

/// Why the webhook leaves an object to the watch path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// It already carries the shard or the drain label (set by its creator): the label is
    /// attributed to the creator, so no worker trusts it; the watch path claims or moves
    /// the object as for any untrusted label, and stamping over it would hide the forgery.
    Labelled,
    /// It has no name yet (`generateName`): its shard depends on the name.
    NoName,
    /// The assigner has no complete view of the shards yet (not synced, or no shard count).
    NotReady,
    /// Its desired shard is not live (or there is no effective shard count yet).
    NoLiveShard,
}

impl SkipReason {
    /// A short name for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Labelled => "labelled",
            Self::NoName => "no_name",
            Self::NotReady => "not_ready",
            Self::NoLiveShard => "no_live_shard",
        }
    }
}

/// What the webhook does with one CREATE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Add the shard label with this value (and record the assigner as its owner).
    Stamp(ShardIndex),
    /// Admit the object unchanged.
    Skip(SkipReason),
}

/// The webhook's decision for `creation`, given the assigner's current `view` of the shards
/// (`None` while it has none). Labels are read with operator `names`' keys.
pub fn admission(
    creation: Creation<'_>,
    view: Option<&ShardTable>,
    names: &OperatorNames,
) -> Admission {
    let labelled = creation.labels.is_some_and(|labels| {
        labels.contains_key(&names.shard_label()) || labels.contains_key(&names.drain_label())
    });
    if labelled {
        return Admission::Skip(SkipReason::Labelled);
    }
    let Some(name) = creation.name.filter(|n| !n.is_empty()) else {
        return Admission::Skip(SkipReason::NoName);
    };
    let Some(table) = view else {
        return Admission::Skip(SkipReason::NotReady);
    };
    let facts = ObjectFacts {
        placement: &ObjectPlacement::Unassigned { stray_drain: false },
        deleting: false,
        key_hash: object_key_hash(creation.namespace, name),
        last_owner: None,
    };
    match plan_object(facts, table) {
        AssignerAction::Assign { to } => Admission::Stamp(to),
        _ => Admission::Skip(SkipReason::NoLiveShard),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assignment::jump_consistent_hash;
    use crate::protocol::lease::LeaseSnapshot;
    use crate::shard_index::ShardCount;
    use jiff::Timestamp;
    use std::time::Duration;

    const NOW: i64 = 1_000;

    fn ts(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    fn held(shard: u32) -> LeaseSnapshot {
        LeaseSnapshot {
            holder: Some(format!("shardop-worker-{shard}")),
            acquired_once: true,
            renew_time: Some(ts(NOW - 1)),
            duration: Some(Duration::from_secs(15)),
            ..Default::default()
        }
    }

    fn expired(shard: u32) -> LeaseSnapshot {
        LeaseSnapshot {
            renew_time: Some(ts(NOW - 60)),
            ..held(shard)
        }
    }

    fn table(desired: u32, leases: impl IntoIterator<Item = (u32, LeaseSnapshot)>) -> ShardTable {
        ShardTable::new(
            ShardCount::new(desired).unwrap(),
            leases.into_iter().map(|(i, l)| (ShardIndex(i), l)),
            ts(NOW),
        )
    }

    fn all_held(n: u32) -> ShardTable {
        table(n, (0..n).map(|i| (i, held(i))))
    }

    fn create<'a>(
        name: Option<&'a str>,
        labels: Option<&'a BTreeMap<String, String>>,
    ) -> Creation<'a> {
        Creation {
            namespace: "ns",
            name,
            labels,
        }
    }

    fn decide(creation: Creation<'_>, view: Option<&ShardTable>) -> Admission {
        admission(creation, view, &OperatorNames::default())
    }

    /// A name whose desired shard is `want` among `e` effective shards.
    fn name_on(want: u32, e: u32) -> String {
        (0..)
            .map(|i| format!("db-{i}"))
            .find(|n| jump_consistent_hash(object_key_hash("ns", n), e) == want)
            .unwrap()
    }

    #[test]
    fn an_unlabelled_named_object_is_stamped_toward_its_desired_live_shard() {
        let view = all_held(4);
        for want in 0..4 {
            let name = name_on(want, 4);
            assert_eq!(
                decide(create(Some(&name), None), Some(&view)),
                Admission::Stamp(ShardIndex(want))
            );
        }
        // Unrelated labels do not matter.
        let other = BTreeMap::from([("app".to_owned(), "x".to_owned())]);
        let name = name_on(2, 4);
        assert_eq!(
            decide(create(Some(&name), Some(&other)), Some(&view)),
            Admission::Stamp(ShardIndex(2))
        );
    }

    #[test]
    fn the_stamp_is_the_watch_paths_assignment() {
        let names = OperatorNames::default();
        let views = [
            all_held(3),
            table(
                4,
                [(0, held(0)), (1, held(1)), (2, expired(2)), (3, held(3))],
            ),
            table(2, [(0, held(0)), (1, held(1)), (2, held(2))]),
            table(3, [(0, held(0)), (1, held(1))]),
            table(2, [(0, expired(0))]),
        ];
        for view in &views {
            for i in 0..200 {
                let name = format!("obj-{i}");
                let facts = ObjectFacts {
                    placement: &ObjectPlacement::Unassigned { stray_drain: false },
                    deleting: false,
                    key_hash: object_key_hash("ns", &name),
                    last_owner: None,
                };
                let watch = match plan_object(facts, view) {
                    AssignerAction::Assign { to } => Some(to),
                    _ => None,
                };
                let hook = match admission(create(Some(&name), None), Some(view), &names) {
                    Admission::Stamp(to) => Some(to),
                    Admission::Skip(_) => None,
                };
                assert_eq!(hook, watch, "{name} on {view:?}");
            }
        }
    }

    #[test]
    fn an_object_created_with_either_label_is_left_to_the_watch_path() {
        let names = OperatorNames::default();
        let view = all_held(3);
        let name = name_on(1, 3);
        for key in [names.shard_label(), names.drain_label()] {
            for value in ["1", "0", "garbage", ""] {
                let labels = BTreeMap::from([(key.clone(), value.to_owned())]);
                assert_eq!(
                    decide(create(Some(&name), Some(&labels)), Some(&view)),
                    Admission::Skip(SkipReason::Labelled),
                    "{key}={value}"
                );
            }
        }
        // Another operator's labels are not this operator's.
        let tenants = OperatorNames::new("tenants").unwrap();
        let labels = BTreeMap::from([(names.shard_label(), "1".to_owned())]);
        assert_eq!(
            admission(create(Some(&name), Some(&labels)), Some(&view), &tenants),
            Admission::Stamp(ShardIndex(jump_consistent_hash(
                object_key_hash("ns", &name),
                3
            )))
        );
    }

    #[test]
    fn generate_name_objects_are_left_to_the_watch_path() {
        let view = all_held(3);
        assert_eq!(
            decide(create(None, None), Some(&view)),
            Admission::Skip(SkipReason::NoName)
        );
        assert_eq!(
            decide(create(Some(""), None), Some(&view)),
            Admission::Skip(SkipReason::NoName)
        );
    }

    #[test]
    fn without_a_view_nothing_is_stamped() {
        assert_eq!(
            decide(create(Some("db"), None), None),
            Admission::Skip(SkipReason::NotReady)
        );
    }

    #[test]
    fn only_a_live_desired_shard_is_stamped() {
        // Shard 0 never acquired: no effective count.
        let none = table(3, []);
        // The desired shard's Lease expired.
        let lapsed = table(3, [(0, held(0)), (1, expired(1)), (2, held(2))]);
        let name = name_on(1, 3);
        for view in [&none, &lapsed] {
            assert_eq!(
                decide(create(Some(&name), None), Some(view)),
                Admission::Skip(SkipReason::NoLiveShard)
            );
        }
        // The other shards are still stamped in the lapsed view.
        let name = name_on(2, 3);
        assert_eq!(
            decide(create(Some(&name), None), Some(&lapsed)),
            Admission::Stamp(ShardIndex(2))
        );
    }

    #[test]
    fn growth_is_gated_like_the_watch_path() {
        // N = 4 but shard 3 was never acquired: E = 3, nothing goes to shard 3.
        let view = table(4, (0..3).map(|i| (i, held(i))));
        for i in 0..200 {
            let name = format!("obj-{i}");
            match decide(create(Some(&name), None), Some(&view)) {
                Admission::Stamp(to) => assert!(to.0 < 3, "{name} stamped to {to:?}"),
                Admission::Skip(reason) => panic!("{name} skipped: {reason:?}"),
            }
        }
    }

    #[test]
    fn skip_reasons_have_distinct_names() {
        let all = [
            SkipReason::Labelled,
            SkipReason::NoName,
            SkipReason::NotReady,
            SkipReason::NoLiveShard,
        ];
        let names: std::collections::HashSet<_> = all.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), all.len());
    }
}
