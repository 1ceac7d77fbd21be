//! Which child watch events call for a reconcile of the parent, decided against the child
//! cache itself.
//!
//! A child event matters to its parent when what the parent reads of the child changed
//! ([`Projected::change_fingerprint`]), when the child is gone (deleted, or no longer in the
//! shard's selector), or when a relist no longer shows it (deleted while the watch was
//! down). The version to compare with is the one the cache holds just before the event is
//! applied, so no second map of fingerprints is kept (kube-runtime's `predicate_filter`
//! keeps one, a key and a hash per child); and a deletion always passes, which a fingerprint
//! filter drops whenever the deleted version looks like the last one seen.
//!
//! The controller hears of such a child as a reference to its parent (the controller owner
//! reference), as kube-runtime's `owns` would turn it into one.

use kube::Resource;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::Event;

use crate::child_cache::{CachedChild, Projected};
use crate::child_store::ChildStore;
use crate::cluster_cache::CachedCluster;

/// A child cache (the shard's store of one child kind) that reports, for every event it
/// applies, the parents that should reconcile.
pub struct ChildCache<K> {
    store: ChildStore<K>,
}

impl<K: Projected> ChildCache<K> {
    /// The cache that fills `store`.
    pub fn new(store: ChildStore<K>) -> Self {
        Self { store }
    }

    /// Applies `event` to the cache; returns the parents of the children it calls to
    /// reconcile.
    pub fn apply(&mut self, event: &Event<K>) -> Vec<ObjectRef<CachedCluster>> {
        match event {
            Event::Apply(child) | Event::InitApply(child) => {
                let (namespace, name) = identity(child);
                let cached = CachedChild::of(child);
                let after = cached.change_fingerprint();
                let before = self.store.insert(namespace, name, cached);
                if before.is_none_or(|before| differs(before, after)) {
                    parent_of(child).into_iter().collect()
                } else {
                    Vec::new()
                }
            }
            Event::Delete(child) => {
                let (namespace, name) = identity(child);
                self.store.remove(namespace, name);
                parent_of(child).into_iter().collect()
            }
            // The relist replaces the cache: what it does not show again left while the
            // watch was down, and no Delete will ever say so.
            Event::InitDone => self
                .store
                .finish_relist()
                .iter()
                .filter_map(parent_of)
                .collect(),
            Event::Init => {
                self.store.start_relist();
                Vec::new()
            }
        }
    }
}

/// A child's namespace and name.
fn identity<K: Resource>(child: &K) -> (&str, &str) {
    let meta = child.meta();
    (
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    )
}

/// Whether a version with fingerprint `after` differs from one with `before` in what its
/// parent reads (a kind without a fingerprint: in every version).
fn differs(before: Option<u64>, after: Option<u64>) -> bool {
    match (before, after) {
        (Some(before), Some(after)) => before != after,
        _ => true,
    }
}

/// The parent DatabaseCluster of a child, from its controller owner reference.
pub fn parent_of<K: Resource>(child: &K) -> Option<ObjectRef<CachedCluster>> {
    let owner = child
        .meta()
        .owner_references
        .as_deref()?
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "DatabaseCluster")?;
    let (namespace, _) = identity(child);
    Some(ObjectRef::new(&owner.name).within(namespace))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use kube::api::ObjectMeta;

    /// StatefulSet `name` of DatabaseCluster `name` in namespace `ns`.
    fn sts(name: &str, resource_version: &str, ready: i32) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("ns".to_owned()),
                resource_version: Some(resource_version.to_owned()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "shardop.dev/v1alpha1".into(),
                    kind: "DatabaseCluster".into(),
                    name: name.to_owned(),
                    uid: format!("uid-{name}"),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..ObjectMeta::default()
            },
            status: Some(StatefulSetStatus {
                ready_replicas: Some(ready),
                ..StatefulSetStatus::default()
            }),
            ..StatefulSet::default()
        }
    }

    fn names(parents: &[ObjectRef<CachedCluster>]) -> Vec<String> {
        parents
            .iter()
            .map(|p| format!("{}/{}", p.namespace.as_deref().unwrap_or_default(), p.name))
            .collect()
    }

    fn cache() -> (ChildCache<StatefulSet>, ChildStore<StatefulSet>) {
        let store = ChildStore::default();
        (ChildCache::new(store.clone()), store)
    }

    #[test]
    fn a_version_that_changes_what_the_parent_reads_triggers_and_one_that_does_not_is_cached_silently()
     {
        let (mut cache, store) = cache();
        assert_eq!(
            names(&cache.apply(&Event::Apply(sts("a", "1", 0)))),
            ["ns/a"]
        );
        assert_eq!(
            names(&cache.apply(&Event::Apply(sts("a", "2", 1)))),
            ["ns/a"]
        );
        // Another resourceVersion, nothing the parent reads changed: cached, no trigger.
        assert!(cache.apply(&Event::Apply(sts("a", "3", 1))).is_empty());
        let cached = store.get("ns", "a").unwrap();
        assert_eq!(cached.metadata.resource_version.as_deref(), Some("3"));
    }

    #[test]
    fn a_deletion_triggers_even_when_the_deleted_version_looks_like_the_last_one() {
        let (mut cache, store) = cache();
        cache.apply(&Event::Apply(sts("a", "1", 1)));
        assert_eq!(
            names(&cache.apply(&Event::Delete(sts("a", "1", 1)))),
            ["ns/a"]
        );
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn a_child_without_a_controller_owner_is_cached_and_triggers_nothing() {
        let (mut cache, store) = cache();
        let mut orphan = sts("a", "1", 1);
        orphan.metadata.owner_references = None;
        assert!(cache.apply(&Event::Apply(orphan)).is_empty());
        assert!(store.get("ns", "a").is_some());
    }

    #[test]
    fn a_relist_triggers_what_changed_and_what_it_no_longer_shows() {
        let (mut cache, store) = cache();
        for event in [
            Event::Init,
            Event::InitApply(sts("a", "1", 1)),
            Event::InitApply(sts("b", "1", 1)),
            Event::InitApply(sts("c", "1", 1)),
        ] {
            assert_eq!(
                cache.apply(&event).len(),
                usize::from(event_has_object(&event))
            );
        }
        assert!(cache.apply(&Event::InitDone).is_empty(), "nothing left");
        // The watch was down: `b` changed, `c` was deleted, `a` is as it was.
        assert!(cache.apply(&Event::Init).is_empty());
        assert!(cache.apply(&Event::InitApply(sts("a", "5", 1))).is_empty());
        assert_eq!(
            names(&cache.apply(&Event::InitApply(sts("b", "6", 2)))),
            ["ns/b"]
        );
        assert_eq!(names(&cache.apply(&Event::InitDone)), ["ns/c"]);
        assert!(store.get("ns", "a").is_some());
        assert!(store.get("ns", "b").is_some());
        assert_eq!(store.len(), 2);
    }

    fn event_has_object(event: &Event<StatefulSet>) -> bool {
        !matches!(event, Event::Init | Event::InitDone)
    }
}
