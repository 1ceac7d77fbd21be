//! The DatabaseClusters as the shard's cache keeps them: metadata typed, spec and status
//! as compressed text.
//!
//! A typed DatabaseCluster spends most of its memory on what only a reconcile reads: the
//! resource quantities (two B-tree maps), the image and storage strings, and the status
//! conditions (a vector of five strings each). The library and the controller read the
//! metadata of every cached object (its labels and trust marker on each event, its name
//! for the queue and the owner triggers), and the load report reads whether each object is
//! behind its generation. A [`CachedCluster`] keeps exactly that typed: the metadata and
//! the status's observed generation. The spec and the status are kept as one JSON text
//! compressed against a dictionary ([`dictionary`]: the text of a sample cluster with the
//! status a converged one has), and a reconcile turns them back into the typed object
//! ([`CachedCluster::object`]) — one decompression and one parse, a few microseconds.

use std::sync::LazyLock;

use k8s_openapi::api::apps::v1::StatefulSetStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use shardop_api::{DatabaseCluster, DatabaseClusterSpec, DatabaseClusterStatus, ShardIndex};

use crate::cached_kind::impl_resource_as;
use crate::child_cache::sample_parent;
use crate::children::desired_stateful_set;
use crate::packed::PackedText;
use crate::status::{Observed, desired_status, is_behind};

/// A DatabaseCluster as the shard caches it (see the module docs). It deserialises from a
/// DatabaseCluster (kube-runtime's controller asks its object type to).
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "DatabaseCluster")]
pub struct CachedCluster {
    /// All of it: the library's filter and admission read labels and managed fields.
    metadata: ObjectMeta,
    /// `status.observedGeneration`, for [`Self::is_behind`] without a decompression.
    observed_generation: Option<i64>,
    /// `{"spec": …, "status": …}` compressed against [`dictionary`].
    body: PackedText,
}

/// What of a DatabaseCluster the compressed text holds, as written.
#[derive(Serialize)]
struct BodyRef<'a> {
    spec: &'a DatabaseClusterSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a DatabaseClusterStatus>,
}

/// What of a DatabaseCluster the compressed text holds, as read back.
#[derive(Deserialize)]
struct Body {
    spec: DatabaseClusterSpec,
    #[serde(default)]
    status: Option<DatabaseClusterStatus>,
}

fn body_text(spec: &DatabaseClusterSpec, status: Option<&DatabaseClusterStatus>) -> Vec<u8> {
    // A typed spec and status always serialise; should they not, the text is empty and
    // reads back as no object, so the reconcile reads the object from the API server.
    serde_json::to_vec(&BodyRef { spec, status }).unwrap_or_default()
}

/// The dictionary the texts are compressed against: the text of [`sample_parent`] with
/// the status the worker writes for it once its StatefulSet is rolled out.
fn dictionary() -> &'static [u8] {
    static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
        let mut cluster = sample_parent();
        cluster.metadata.generation = Some(1);
        let mut stateful_set = desired_stateful_set(&cluster, ShardIndex(0));
        stateful_set.metadata.generation = Some(1);
        stateful_set.status = Some(StatefulSetStatus {
            observed_generation: Some(1),
            replicas: cluster.spec.replicas,
            ready_replicas: Some(cluster.spec.replicas),
            updated_replicas: Some(cluster.spec.replicas),
            ..StatefulSetStatus::default()
        });
        let status = desired_status(&Observed {
            cluster: &cluster,
            current_status: None,
            stateful_set: Some(&stateful_set),
            problem: None,
            now: jiff::Timestamp::UNIX_EPOCH,
        });
        body_text(&cluster.spec, Some(&status))
    });
    &DICTIONARY
}

impl CachedCluster {
    /// The cached form of `cluster`.
    pub fn of(cluster: DatabaseCluster) -> Self {
        let body = PackedText::pack(
            &body_text(&cluster.spec, cluster.status.as_ref()),
            dictionary(),
        );
        Self {
            observed_generation: cluster.status.as_ref().and_then(|s| s.observed_generation),
            metadata: cluster.metadata,
            body,
        }
    }

    /// The DatabaseCluster it was made of; `None` only if the text does not decompress or
    /// parse back (never for one made by [`Self::of`]).
    pub fn object(&self) -> Option<DatabaseCluster> {
        let text = self.body.unpack(dictionary())?;
        match serde_json::from_slice::<Body>(&text) {
            Ok(body) => Some(DatabaseCluster {
                metadata: self.metadata.clone(),
                spec: body.spec,
                status: body.status,
            }),
            Err(err) => {
                tracing::warn!(%err, "a cached DatabaseCluster does not parse back");
                None
            }
        }
    }

    /// Whether the object still waits for a reconcile of its current spec.
    pub fn is_behind(&self) -> bool {
        is_behind(self.observed_generation, self.metadata.generation)
    }
}

impl From<DatabaseCluster> for CachedCluster {
    fn from(cluster: DatabaseCluster) -> Self {
        Self::of(cluster)
    }
}

impl_resource_as!(impl for CachedCluster as DatabaseCluster);

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use kube::Resource;
    use shardop_api::{ReclaimPolicy, StorageSpec};
    use std::collections::BTreeMap;

    /// A served cluster unlike the sample: other names, image, sizes, resources, labels,
    /// and a status with a problem.
    fn served() -> DatabaseCluster {
        let mut cluster = DatabaseCluster::new(
            "orders-eu-7",
            DatabaseClusterSpec {
                replicas: 5,
                image: "registry.local/postgres:16.4".into(),
                resources: Some(ResourceRequirements {
                    requests: Some(BTreeMap::from([
                        ("cpu".into(), Quantity("250m".into())),
                        ("memory".into(), Quantity("2Gi".into())),
                    ])),
                    limits: Some(BTreeMap::from([("memory".into(), Quantity("2Gi".into()))])),
                    ..Default::default()
                }),
                storage: StorageSpec {
                    storage_class_name: Some("fast-ssd".into()),
                    size: Quantity("50Gi".into()),
                    reclaim_policy: ReclaimPolicy::Delete,
                },
            },
        );
        cluster.metadata.namespace = Some("shop".into());
        cluster.metadata.uid = Some("5f0c1d2e-aaaa-bbbb-cccc-0123456789ab".into());
        cluster.metadata.resource_version = Some("123456".into());
        cluster.metadata.generation = Some(4);
        cluster.metadata.labels = Some(BTreeMap::from([("shardop.dev/shard".into(), "2".into())]));
        cluster.metadata.finalizers = Some(vec!["shardop.dev/cleanup".into()]);
        cluster.status = Some(DatabaseClusterStatus {
            observed_generation: Some(3),
            replicas: 4,
            ready_replicas: 2,
            conditions: vec![Condition {
                type_: "Degraded".into(),
                status: "True".into(),
                reason: "StatefulSetRejected".into(),
                message: "spec.replicas: Invalid value".into(),
                observed_generation: Some(3),
                last_transition_time: Time(jiff::Timestamp::from_second(1_700_000_000).unwrap()),
            }],
            claim_ordinals: Some(5),
        });
        cluster
    }

    /// Compared as JSON: the generated DatabaseCluster type has no `PartialEq`.
    fn json(cluster: Option<DatabaseCluster>) -> serde_json::Value {
        serde_json::to_value(cluster).unwrap()
    }

    #[test]
    fn a_cached_cluster_reads_back_as_the_object() {
        let cluster = served();
        let cached = CachedCluster::of(cluster.clone());
        assert_eq!(json(cached.object()), json(Some(cluster.clone())));
        assert_eq!(cached.meta(), &cluster.metadata);
        assert!(cached.is_behind(), "generation 4, observed 3");

        let mut fresh = cluster;
        fresh.status = None;
        let cached = CachedCluster::of(fresh.clone());
        assert_eq!(json(cached.object()), json(Some(fresh)));
        assert!(cached.is_behind(), "never reconciled");
    }

    #[test]
    fn a_converged_cluster_keeps_little_of_its_spec_and_status() {
        let mut cluster = sample_parent();
        cluster.metadata.generation = Some(1);
        let stateful_set = desired_stateful_set(&cluster, ShardIndex(0));
        let status = desired_status(&Observed {
            cluster: &cluster,
            current_status: None,
            stateful_set: Some(&stateful_set),
            problem: None,
            now: jiff::Timestamp::from_second(1_764_000_000).unwrap(),
        });
        cluster.status = Some(status);
        cluster.spec.image = "postgres:16".into();
        cluster.spec.replicas = 2;
        let text = body_text(&cluster.spec, cluster.status.as_ref());
        let cached = CachedCluster::of(cluster.clone());
        assert!(
            cached.body.len() * 3 < text.len(),
            "{} of {} bytes",
            cached.body.len(),
            text.len()
        );
        assert_eq!(json(cached.object()), json(Some(cluster)));
        assert!(!cached.is_behind());
    }

    #[test]
    fn a_damaged_cached_text_reads_as_no_object() {
        let mut cached = CachedCluster::of(served());
        cached.body = PackedText::damaged();
        assert!(
            cached.object().is_none(),
            "the reconcile reads it from the server"
        );
    }
}
