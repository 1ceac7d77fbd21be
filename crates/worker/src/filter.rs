//! Which watch events of a DatabaseCluster deserve a reconcile.
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
use std::hash::{Hash, Hasher};

use kube::ResourceExt;
use kube::runtime::watcher::Event;
use shardop_api::DatabaseCluster;

/// Passes on the objects whose fingerprint changed since the watch last showed them.
#[derive(Debug, Default)]
pub struct ChangeFilter {
    /// Fingerprint by `namespace/name` of every object currently in the watch.
    seen: HashMap<(Option<String>, String), u64>,
}

impl ChangeFilter {
    /// The object to reconcile for this watch event, if any.
    pub fn admit(&mut self, event: Event<DatabaseCluster>) -> Option<DatabaseCluster> {
        match event {
            Event::Apply(cluster) | Event::InitApply(cluster) => {
                let key = (cluster.namespace(), cluster.name_any());
                let fingerprint = reconcile_fingerprint(&cluster)?;
                let previous = self.seen.insert(key, fingerprint);
                (previous != Some(fingerprint)).then_some(cluster)
            }
            Event::Delete(cluster) => {
                self.seen.remove(&(cluster.namespace(), cluster.name_any()));
                None
            }
            Event::Init | Event::InitDone => None,
        }
    }
}

/// A hash of the fields whose change triggers a reconcile.
pub fn reconcile_fingerprint(cluster: &DatabaseCluster) -> Option<u64> {
    let meta = &cluster.metadata;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    // A deleted and recreated object with the same name is a new object.
    meta.uid.hash(&mut hasher);
    meta.generation.hash(&mut hasher);
    meta.labels.hash(&mut hasher);
    meta.finalizers.hash(&mut hasher);
    meta.deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_nanosecond())
        .hash(&mut hasher);
    Some(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use shardop_api::constants::{DRAIN_LABEL, FINALIZER, SHARD_LABEL};
    use shardop_api::{DatabaseClusterSpec, DatabaseClusterStatus, ReclaimPolicy, StorageSpec};

    fn cluster() -> DatabaseCluster {
        let mut c = DatabaseCluster::new(
            "db",
            DatabaseClusterSpec {
                replicas: 1,
                image: "postgres:17".into(),
                resources: None,
                storage: StorageSpec {
                    storage_class_name: None,
                    size: Quantity("1Gi".into()),
                    reclaim_policy: ReclaimPolicy::Retain,
                },
            },
        );
        c.metadata.generation = Some(1);
        c.metadata.labels = Some([(SHARD_LABEL.to_owned(), "1".to_owned())].into());
        c
    }

    #[test]
    fn status_only_updates_are_filtered() {
        let before = cluster();
        let mut after = before.clone();
        after.status = Some(DatabaseClusterStatus {
            observed_generation: Some(1),
            ..Default::default()
        });
        after.metadata.resource_version = Some("42".into());
        assert_eq!(
            reconcile_fingerprint(&before),
            reconcile_fingerprint(&after)
        );
    }

    #[test]
    fn spec_labels_finalizers_and_deletion_trigger() {
        let base = cluster();
        let fp = reconcile_fingerprint(&base);
        let mut spec = base.clone();
        spec.metadata.generation = Some(2);
        let mut drain = base.clone();
        drain
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(DRAIN_LABEL.into(), "2".into());
        let mut finalizer = base.clone();
        finalizer.metadata.finalizers = Some(vec![FINALIZER.into()]);
        let mut deleting = base.clone();
        deleting.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        for changed in [spec, drain, finalizer, deleting] {
            assert_ne!(reconcile_fingerprint(&changed), fp);
        }
    }

    #[test]
    fn an_object_that_leaves_and_returns_unchanged_is_admitted_again() {
        let mut filter = ChangeFilter::default();
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
}
