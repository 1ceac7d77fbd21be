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

use std::sync::Arc;

use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{Lookup, Store};
use kube::runtime::watcher::Event;

use crate::child_cache::{CachedChild, Projected};

/// A child cache (the shard's store of one child kind) that reports, for every event it
/// applies, the children whose parents should reconcile.
pub struct ChildCache<K: Projected> {
    writer: Writer<CachedChild<K>>,
    reader: Store<CachedChild<K>>,
}

impl<K: Projected> ChildCache<K> {
    /// The cache `writer` fills.
    pub fn new(writer: Writer<CachedChild<K>>) -> Self {
        let reader = writer.as_reader();
        Self { writer, reader }
    }

    /// Applies `event` to the cache; returns the children whose parents it calls to
    /// reconcile.
    pub fn apply(&mut self, event: &Event<CachedChild<K>>) -> Vec<CachedChild<K>> {
        match event {
            Event::Apply(child) | Event::InitApply(child) => {
                let changed = self
                    .reader
                    .get(&child.to_object_ref(()))
                    .is_none_or(|before| differs(&before, child));
                self.writer.apply_watcher_event(event);
                if changed {
                    vec![child.clone()]
                } else {
                    Vec::new()
                }
            }
            Event::Delete(child) => {
                self.writer.apply_watcher_event(event);
                vec![child.clone()]
            }
            Event::InitDone => {
                // The relist replaces the cache: what it does not show again left while the
                // watch was down, and no Delete will ever say so.
                let before = self.reader.state();
                self.writer.apply_watcher_event(event);
                before
                    .into_iter()
                    .filter(|child| self.reader.get(&child.to_object_ref(())).is_none())
                    .map(Arc::unwrap_or_clone)
                    .collect()
            }
            Event::Init => {
                self.writer.apply_watcher_event(event);
                Vec::new()
            }
        }
    }
}

/// Whether `after` differs from `before` in what its parent reads (a kind without a
/// fingerprint: in every version).
fn differs<K: Projected>(before: &CachedChild<K>, after: &CachedChild<K>) -> bool {
    match (before.change_fingerprint(), after.change_fingerprint()) {
        (Some(before), Some(after)) => before != after,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetStatus};
    use kube::Resource;
    use kube::api::ObjectMeta;
    use kube::runtime::reflector;

    fn sts(name: &str, resource_version: &str, ready: i32) -> CachedChild<StatefulSet> {
        CachedChild::of(&StatefulSet {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("ns".to_owned()),
                resource_version: Some(resource_version.to_owned()),
                ..ObjectMeta::default()
            },
            status: Some(StatefulSetStatus {
                ready_replicas: Some(ready),
                ..StatefulSetStatus::default()
            }),
            ..StatefulSet::default()
        })
    }

    fn names(children: &[CachedChild<StatefulSet>]) -> Vec<String> {
        children
            .iter()
            .map(|c| c.to_object_ref(()).name.clone())
            .collect()
    }

    fn cache() -> (ChildCache<StatefulSet>, Store<CachedChild<StatefulSet>>) {
        let (reader, writer) = reflector::store();
        (ChildCache::new(writer), reader)
    }

    #[test]
    fn a_version_that_changes_what_the_parent_reads_triggers_and_one_that_does_not_is_cached_silently()
     {
        let (mut cache, reader) = cache();
        assert_eq!(names(&cache.apply(&Event::Apply(sts("a", "1", 0)))), ["a"]);
        assert_eq!(names(&cache.apply(&Event::Apply(sts("a", "2", 1)))), ["a"]);
        // Another resourceVersion, nothing the parent reads changed: cached, no trigger.
        assert!(cache.apply(&Event::Apply(sts("a", "3", 1))).is_empty());
        let cached = reader.get(&sts("a", "3", 1).to_object_ref(())).unwrap();
        assert_eq!(cached.meta().resource_version.as_deref(), Some("3"));
    }

    #[test]
    fn a_deletion_triggers_even_when_the_deleted_version_looks_like_the_last_one() {
        let (mut cache, reader) = cache();
        cache.apply(&Event::Apply(sts("a", "1", 1)));
        assert_eq!(names(&cache.apply(&Event::Delete(sts("a", "1", 1)))), ["a"]);
        assert!(reader.state().is_empty());
    }

    #[test]
    fn a_relist_triggers_what_changed_and_what_it_no_longer_shows() {
        let (mut cache, reader) = cache();
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
            ["b"]
        );
        assert_eq!(names(&cache.apply(&Event::InitDone)), ["c"]);
        let mut left: Vec<String> = reader
            .state()
            .iter()
            .map(|c| c.to_object_ref(()).name.clone())
            .collect();
        left.sort();
        assert_eq!(left, ["a", "b"]);
    }

    fn event_has_object(event: &Event<CachedChild<StatefulSet>>) -> bool {
        !matches!(event, Event::Init | Event::InitDone)
    }
}
