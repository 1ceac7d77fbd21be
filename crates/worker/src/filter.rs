//! Which watch events of a DatabaseCluster deserve a reconcile.
//!
//! Our own status writes come back as watch events; reconciling them again would double
//! the work for nothing. A reconcile is needed only when something the reconcile reads
//! from the object changed: the spec (`metadata.generation`), the labels (shard and drain
//! labels drive the protocol), the finalizers, or the deletion timestamp. The fingerprint
//! below covers exactly those, and kube-runtime's `predicate_filter` passes an event on
//! only when an object's fingerprint differs from the last one it saw.

use std::hash::{Hash, Hasher};

use shardop_api::DatabaseCluster;

/// A hash of the fields whose change triggers a reconcile.
pub fn reconcile_fingerprint(cluster: &DatabaseCluster) -> Option<u64> {
    let meta = &cluster.metadata;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
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
}
