//! Which watch events of a sharded object deserve a reconcile.
//!
//! Our own status writes come back as watch events; reconciling them again would double
//! the work for nothing. A reconcile is needed only when something the reconcile reads
//! from the object changed: the spec (`metadata.generation`), the labels (shard and drain
//! labels drive the protocol), the finalizers, or the deletion timestamp. The fingerprint
//! below covers exactly those, and [`ChangeFilter`] passes an event on only when an
//! object's fingerprint differs from the last one it saw.
//!
//! kube-runtime's `predicate_filter` is not used because it never forgets a fingerprint: an
//! object that leaves the shard's label selector (a user edits its label) and later comes
//! back unchanged would be filtered out forever and never reconciled again. A watch sends a
//! `Delete` when an object leaves the selector, and [`ChangeFilter`] forgets it then.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};

use kube::Resource;
use kube::runtime::watcher::Event;

use crate::label_trust::shard_label_trusted;
use crate::names::OperatorNames;

/// What the filter remembers of an object in the watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    fingerprint: u64,
    label_trusted: bool,
}

/// An object's identity within one watch: a 128-bit keyed hash of its namespace (none for
/// cluster-scoped kinds) and name ([`KeyHasher`]).
///
/// Two owned strings per object would cost about 100 bytes in three allocations at every
/// watched object; the hash costs 16 bytes in the table's own slot. The hash keys are
/// random per filter, so names cannot be chosen to collide, and two of 10^5 objects
/// collide with a probability of about 10^-29.
type Key = u128;

/// Hashes `(namespace, name)` into a [`Key`] with two independently keyed SipHash states.
#[derive(Debug, Default)]
struct KeyHasher {
    high: RandomState,
    low: RandomState,
}

impl KeyHasher {
    fn key_of<K: Resource>(&self, object: &K) -> Key {
        let meta = object.meta();
        let identity = (
            meta.namespace.as_deref(),
            meta.name.as_deref().unwrap_or_default(),
        );
        (u128::from(self.high.hash_one(identity)) << 64) | u128::from(self.low.hash_one(identity))
    }
}

/// Passes on the objects whose fingerprint changed since the watch last showed them.
#[derive(Debug, Default)]
pub struct ChangeFilter {
    /// The operator whose shard label decides trust.
    names: OperatorNames,
    /// Turns an object's namespace and name into its key in `seen`.
    keys: KeyHasher,
    /// What was seen of every object currently in the watch, by namespace and name.
    seen: HashMap<Key, Seen>,
    /// The initial list has completed: objects seen from now on joined the shard.
    listed: bool,
    /// While the watch relists (after a gap, e.g. its resourceVersion expired), what it
    /// showed before: the relist is compared with it, and whatever it does not list again
    /// left during the gap and is forgotten.
    before_relist: Option<HashMap<Key, Seen>>,
}

/// An object to reconcile.
#[derive(Debug)]
pub struct Admitted<K> {
    /// The object.
    pub object: K,
    /// It joined the shard after its initial list: new to the watch, or its shard label
    /// became the assigner's (trusted) while in it. Its children may carry another shard's
    /// label, invisible to this shard's child watch.
    pub joined: bool,
}

impl ChangeFilter {
    /// A filter for the objects of operator `names`.
    pub fn new(names: OperatorNames) -> Self {
        Self {
            names,
            ..Self::default()
        }
    }

    /// The object to reconcile for this watch event, if any.
    pub fn admit<K: Resource>(&mut self, event: Event<K>) -> Option<Admitted<K>> {
        match event {
            Event::Apply(object) | Event::InitApply(object) => {
                let key = self.keys.key_of(&object);
                let now = Seen {
                    fingerprint: reconcile_fingerprint(&object, &self.names),
                    label_trusted: label_trusted(&object, &self.names),
                };
                let previous = match self.before_relist.as_mut() {
                    Some(before) => {
                        self.seen.insert(key, now);
                        before.remove(&key)
                    }
                    None => self.seen.insert(key, now),
                };
                let joined = match previous {
                    None => self.listed,
                    Some(before) => now.label_trusted && !before.label_trusted,
                };
                (previous != Some(now)).then_some(Admitted { object, joined })
            }
            Event::Delete(object) => {
                self.seen.remove(&self.keys.key_of(&object));
                None
            }
            Event::InitDone => {
                self.listed = true;
                self.before_relist = None;
                None
            }
            Event::Init => {
                // A relist: an object that left and came back unchanged during the gap
                // must count as joined, not as unchanged.
                if self.listed {
                    self.before_relist = Some(std::mem::take(&mut self.seen));
                }
                None
            }
        }
    }
}

/// Whether the assigner wrote the object's shard label (kept in the cache as a marker).
fn label_trusted<K: Resource>(object: &K, names: &OperatorNames) -> bool {
    shard_label_trusted(object.meta(), names)
}

/// A hash of the fields whose change triggers a reconcile.
pub fn reconcile_fingerprint<K: Resource>(object: &K, names: &OperatorNames) -> u64 {
    let meta = object.meta();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    // A deleted and recreated object with the same name is a new object.
    meta.uid.hash(&mut hasher);
    meta.generation.hash(&mut hasher);
    meta.labels.hash(&mut hasher);
    // Who wrote the shard label decides whether the shard may act (a hand edit does not).
    label_trusted(object, names).hash(&mut hasher);
    meta.finalizers.hash(&mut hasher);
    meta.deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_nanosecond())
        .hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, Time};
    use kube::api::ObjectMeta;

    fn names() -> OperatorNames {
        OperatorNames::default()
    }

    /// The managed fields the API server serves when the assigner wrote the shard label.
    fn written_by_assigner() -> Vec<ManagedFieldsEntry> {
        vec![ManagedFieldsEntry {
            manager: Some(names().assigner_field_manager()),
            fields_v1: Some(FieldsV1(serde_json::json!({
                "f:metadata": { "f:labels": { "f:shardop.dev/shard": {} } }
            }))),
            ..Default::default()
        }]
    }

    /// `object` as cached after the assigner wrote its shard label.
    fn trusted<K: Resource>(mut object: K) -> K {
        object.meta_mut().managed_fields = Some(written_by_assigner());
        crate::label_trust::trim_to_trust_marker(object.meta_mut(), &names());
        object
    }

    fn meta(namespace: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            namespace: namespace.map(str::to_owned),
            name: Some("db".into()),
            generation: Some(1),
            labels: Some([(names().shard_label(), "1".to_owned())].into()),
            ..Default::default()
        }
    }

    fn cluster() -> ConfigMap {
        ConfigMap {
            metadata: meta(Some("ns")),
            ..Default::default()
        }
    }

    #[test]
    fn status_only_updates_are_filtered() {
        let before = cluster();
        let mut after = before.clone();
        after.data = Some([("k".to_owned(), "v".to_owned())].into());
        after.metadata.resource_version = Some("42".into());
        assert_eq!(
            reconcile_fingerprint(&before, &names()),
            reconcile_fingerprint(&after, &names())
        );
    }

    #[test]
    fn spec_labels_finalizers_and_deletion_trigger() {
        let base = cluster();
        let fp = reconcile_fingerprint(&base, &names());
        let mut spec = base.clone();
        spec.metadata.generation = Some(2);
        let mut drain = base.clone();
        drain
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(names().drain_label(), "2".into());
        let mut finalizer = base.clone();
        finalizer.metadata.finalizers = Some(vec!["example.com/cleanup".into()]);
        let mut deleting = base.clone();
        deleting.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        let claimed = trusted(base.clone());
        for changed in [spec, drain, finalizer, deleting, claimed] {
            assert_ne!(reconcile_fingerprint(&changed, &names()), fp);
        }
    }

    #[test]
    fn an_object_that_leaves_and_returns_unchanged_is_admitted_again() {
        let mut filter = ChangeFilter::new(names());
        let object = cluster();
        assert!(filter.admit(Event::InitApply(object.clone())).is_some());
        assert!(
            filter.admit(Event::Apply(object.clone())).is_none(),
            "an unchanged object is filtered"
        );
        assert!(filter.admit(Event::Delete(object.clone())).is_none());
        assert!(
            filter.admit(Event::Apply(object)).is_some(),
            "after leaving the watch it is new again"
        );
    }

    #[test]
    fn cluster_scoped_objects_are_tracked_by_name() {
        let mut filter = ChangeFilter::new(names());
        let object = trusted(Namespace {
            metadata: meta(None),
            ..Default::default()
        });
        filter.admit(Event::<Namespace>::InitDone);
        assert!(filter.admit(Event::Apply(object.clone())).unwrap().joined);
        assert!(filter.admit(Event::Apply(object.clone())).is_none());
        filter.admit(Event::Delete(object.clone()));
        assert!(filter.admit(Event::Apply(object)).unwrap().joined);
    }

    #[test]
    fn another_operators_assigner_is_not_trusted() {
        let tenants = OperatorNames::new("tenants").unwrap();
        let mut object = cluster();
        object.metadata.managed_fields = Some(written_by_assigner());
        assert!(label_trusted(&object, &names()));
        assert!(!label_trusted(&object, &tenants));
    }

    #[test]
    fn objects_of_the_same_name_in_two_namespaces_are_two_objects() {
        let mut filter = ChangeFilter::new(names());
        let here = cluster();
        let mut there = cluster();
        there.metadata.namespace = Some("other".into());
        filter.admit(Event::<ConfigMap>::InitDone);
        assert!(filter.admit(Event::Apply(here.clone())).is_some());
        assert!(filter.admit(Event::Apply(there.clone())).is_some());
        assert!(filter.admit(Event::Delete(there.clone())).is_none());
        assert!(
            filter.admit(Event::Apply(here)).is_none(),
            "the other namespace's deletion does not forget this one"
        );
        assert!(filter.admit(Event::Apply(there)).unwrap().joined);
    }

    #[test]
    fn objects_that_join_after_the_initial_list_changed_owner() {
        let mut filter = ChangeFilter::new(names());
        let listed = trusted(cluster());
        let admitted = filter.admit(Event::InitApply(listed.clone())).unwrap();
        assert!(
            !admitted.joined,
            "the initial list is not a change of owner"
        );
        filter.admit(Event::<ConfigMap>::InitDone);
        // It leaves the shard and comes back: a new owner as far as its children go.
        filter.admit(Event::Delete(listed.clone()));
        assert!(filter.admit(Event::Apply(listed.clone())).unwrap().joined);
        // A later spec change of the same owner is not.
        let mut changed = listed.clone();
        changed.metadata.generation = Some(2);
        assert!(!filter.admit(Event::Apply(changed.clone())).unwrap().joined);
        // A hand-edited label joins when the assigner claims it.
        let mut hand_edited = cluster();
        hand_edited.metadata.name = Some("other".into());
        assert!(
            filter
                .admit(Event::Apply(hand_edited.clone()))
                .unwrap()
                .joined
        );
        let claimed = trusted(hand_edited);
        assert!(filter.admit(Event::Apply(claimed)).unwrap().joined);
        // Objects of a relist that were already there have not moved.
        filter.admit(Event::<ConfigMap>::Init);
        assert!(filter.admit(Event::InitApply(changed)).is_none());
    }

    #[test]
    fn a_relist_forgets_objects_that_left_during_the_gap_and_admits_those_that_came_back() {
        let mut filter = ChangeFilter::new(names());
        let object = trusted(cluster());
        filter.admit(Event::<ConfigMap>::Init);
        assert!(filter.admit(Event::InitApply(object.clone())).is_some());
        filter.admit(Event::<ConfigMap>::InitDone);
        // The watch loses its place; while it was away the object left the shard and came
        // back unchanged. The relist shows it again, and nothing else.
        filter.admit(Event::<ConfigMap>::Init);
        let unchanged = filter.admit(Event::InitApply(object.clone()));
        assert!(
            unchanged.is_none(),
            "an object listed again unchanged is not new"
        );
        filter.admit(Event::<ConfigMap>::InitDone);
        // A second gap, in which the object left and does not come back: it is forgotten,
        // so when it returns later it is admitted as joined.
        filter.admit(Event::<ConfigMap>::Init);
        filter.admit(Event::<ConfigMap>::InitDone);
        let back = filter.admit(Event::Apply(object)).expect("admitted");
        assert!(back.joined, "it rejoined the shard");
    }
}
