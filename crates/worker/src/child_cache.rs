//! The children (StatefulSets, Services) as the shard's caches keep them: only the fields a
//! reconcile or the child watch's filter reads, not the full typed object.
//!
//! A full typed StatefulSet is several KB (pod template with every server default, claim
//! templates, managed fields, annotations), and the worker caches one StatefulSet and one
//! Service per object of its slice. A [`CachedChild`] keeps what a reconcile reads — the
//! fields the worker applies (for the drift comparison, [`crate::children::is_subset`]),
//! the metadata it reads (identity, labels, owner) and the status — as one compact JSON
//! text, and the fingerprint the child watch's filter compares. A reconcile turns it back
//! into the typed object ([`CachedChild::object`]), so the comparison and the status are
//! computed from the same values as from a full cache; fields outside [`Projected::READ`]
//! read as absent. [`crate::child_store`] keeps them by namespace and name.
//!
//! The text is kept LZ4-compressed against a dictionary per kind
//! ([`Projected::dictionary`]): the text of the child the worker would apply for a sample
//! parent. Every child of a kind repeats the same keys, labels and template, so what is
//! left per child is little more than its names, uids and counts (a StatefulSet's ≈ 1.5 KB
//! text keeps ≈ 0.23 KB, a Service's 0.67 KB ≈ 0.16 KB); a reconcile pays one
//! decompression of a few microseconds.

use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::sync::LazyLock;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use kube::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use shardop_api::{DatabaseCluster, DatabaseClusterSpec, ShardIndex, StorageSpec};

use crate::children::{desired_service, desired_stateful_set};
use crate::packed::PackedText;

/// Which fields of a JSON object to keep: all of a value, or only some keys of an object
/// (arrays apply the mask to each element).
#[derive(Debug)]
pub enum Mask {
    /// The whole value.
    All,
    /// Only these keys, each with its own mask.
    Fields(&'static [(&'static str, Mask)]),
}

/// A child kind the shard caches as a [`CachedChild`].
pub trait Projected:
    Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// The fields a reconcile reads, as JSON paths (`metadata` included).
    const READ: Mask;

    /// What of the child matters to its parent: a version whose fingerprint did not change
    /// triggers no reconcile. `None`: every version does.
    fn change_fingerprint(&self) -> Option<u64>;

    /// The dictionary the cached texts of this kind are compressed against: the
    /// [`Self::READ`] text of a typical child, so what all children share is stored once.
    fn dictionary() -> &'static [u8];
}

/// The parent the dictionaries are built from: a DatabaseCluster with every optional
/// field the desired children carry, so each key and label of a child is in its
/// dictionary.
pub fn sample_parent() -> DatabaseCluster {
    let spec: DatabaseClusterSpec = DatabaseClusterSpec {
        replicas: 3,
        image: "postgres:17".into(),
        resources: serde_json::from_value(serde_json::json!({
            "requests": {"cpu": "500m", "memory": "1Gi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        }))
        .ok(),
        storage: StorageSpec {
            storage_class_name: Some("standard".into()),
            size: k8s_openapi::apimachinery::pkg::api::resource::Quantity("10Gi".into()),
            reclaim_policy: Default::default(),
        },
    };
    let mut parent = DatabaseCluster::new("database", spec);
    parent.metadata.namespace = Some("default".into());
    parent.metadata.uid = Some("00000000-0000-0000-0000-000000000000".into());
    parent
}

/// The JSON text [`CachedChild`] keeps of `object`: [`Projected::READ`].
fn projected_text<K: Projected>(object: &K) -> String {
    let Ok(mut value) = serde_json::to_value(object) else {
        // A typed object always serialises; should it not, the cached text reads back as
        // no child, and the next reconcile re-applies it.
        return String::new();
    };
    keep(&mut value, &K::READ);
    value.to_string()
}

/// The dictionary of kind `K`: the text of `sample`, a child as served (generation,
/// resourceVersion, uid and the status fields set).
fn dictionary_of<K: Projected>(mut sample: K, status: Value) -> Vec<u8> {
    if let Ok(mut value) = serde_json::to_value(&sample) {
        value["metadata"]["generation"] = 1.into();
        value["metadata"]["resourceVersion"] = "1".into();
        value["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000".into();
        if !status.is_null() {
            value["status"] = status;
        }
        if let Ok(served) = serde_json::from_value(value) {
            sample = served;
        }
    }
    projected_text(&sample).into_bytes()
}

/// Metadata every child keeps: identity, owner, and what the reconcile reads of the rest.
const METADATA: Mask = Mask::Fields(&[
    ("name", Mask::All),
    ("namespace", Mask::All),
    ("uid", Mask::All),
    ("resourceVersion", Mask::All),
    ("generation", Mask::All),
    ("deletionTimestamp", Mask::All),
    ("labels", Mask::All),
    ("ownerReferences", Mask::All),
]);

/// The `resources` of a container or a claim: quantities under any key.
const RESOURCES: Mask = Mask::All;

impl Projected for StatefulSet {
    /// What [`crate::children::desired_stateful_set`] sets (and the volume resize shapes),
    /// and the status fields the DatabaseCluster status is computed from
    /// ([`crate::status::desired_status`]); revisions, conditions and the other counts are
    /// not read.
    const READ: Mask = Mask::Fields(&[
        ("apiVersion", Mask::All),
        ("kind", Mask::All),
        ("metadata", METADATA),
        (
            "spec",
            Mask::Fields(&[
                ("replicas", Mask::All),
                ("serviceName", Mask::All),
                ("selector", Mask::All),
                ("podManagementPolicy", Mask::All),
                ("persistentVolumeClaimRetentionPolicy", Mask::All),
                (
                    "template",
                    Mask::Fields(&[
                        ("metadata", Mask::Fields(&[("labels", Mask::All)])),
                        (
                            "spec",
                            Mask::Fields(&[(
                                "containers",
                                Mask::Fields(&[
                                    ("name", Mask::All),
                                    ("image", Mask::All),
                                    ("resources", RESOURCES),
                                    (
                                        "volumeMounts",
                                        Mask::Fields(&[
                                            ("name", Mask::All),
                                            ("mountPath", Mask::All),
                                        ]),
                                    ),
                                ]),
                            )]),
                        ),
                    ]),
                ),
                (
                    "volumeClaimTemplates",
                    Mask::Fields(&[
                        ("apiVersion", Mask::All),
                        ("kind", Mask::All),
                        (
                            "metadata",
                            Mask::Fields(&[("name", Mask::All), ("labels", Mask::All)]),
                        ),
                        (
                            "spec",
                            Mask::Fields(&[
                                ("accessModes", Mask::All),
                                ("storageClassName", Mask::All),
                                ("resources", RESOURCES),
                            ]),
                        ),
                    ]),
                ),
            ]),
        ),
        (
            "status",
            Mask::Fields(&[
                ("observedGeneration", Mask::All),
                ("replicas", Mask::All),
                ("readyReplicas", Mask::All),
                ("updatedReplicas", Mask::All),
            ]),
        ),
    ]);

    /// Its spec (generation, drift by others), labels (shard), and the status fields the
    /// DatabaseCluster status is computed from.
    fn change_fingerprint(&self) -> Option<u64> {
        let status = self.status.clone().unwrap_or_default();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (
            self.metadata.generation,
            status.observed_generation,
            status.replicas,
            status.ready_replicas,
            status.updated_replicas,
            self.metadata.labels.as_ref(),
        )
            .hash(&mut hasher);
        Some(hasher.finish())
    }

    fn dictionary() -> &'static [u8] {
        static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
            dictionary_of(
                desired_stateful_set(&sample_parent(), ShardIndex(0)),
                serde_json::json!({
                    "observedGeneration": 1, "replicas": 3, "readyReplicas": 3,
                    "updatedReplicas": 3
                }),
            )
        });
        &DICTIONARY
    }
}

impl Projected for Service {
    /// What [`crate::children::desired_service`] sets.
    const READ: Mask = Mask::Fields(&[
        ("apiVersion", Mask::All),
        ("kind", Mask::All),
        ("metadata", METADATA),
        (
            "spec",
            Mask::Fields(&[
                ("clusterIP", Mask::All),
                ("selector", Mask::All),
                ("publishNotReadyAddresses", Mask::All),
            ]),
        ),
    ]);

    /// Every new version.
    fn change_fingerprint(&self) -> Option<u64> {
        kube::runtime::predicates::resource_version(self)
    }

    fn dictionary() -> &'static [u8] {
        static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
            dictionary_of(
                desired_service(&sample_parent(), ShardIndex(0)),
                Value::Null,
            )
        });
        &DICTIONARY
    }
}

/// A child as the shard caches it (see the module docs).
#[derive(Debug)]
pub struct CachedChild<K> {
    /// [`Projected::READ`] of the child, as JSON text compressed against
    /// [`Projected::dictionary`] (its length prepended).
    read: PackedText,
    /// [`Projected::change_fingerprint`] of the full object.
    change: Option<u64>,
    kind: PhantomData<fn() -> K>,
}

impl<K> Clone for CachedChild<K> {
    fn clone(&self) -> Self {
        Self {
            read: self.read.clone(),
            change: self.change,
            kind: PhantomData,
        }
    }
}

impl<K: Projected> CachedChild<K> {
    /// The cached form of `object`.
    pub fn of(object: &K) -> Self {
        let read = PackedText::pack(projected_text(object).as_bytes(), K::dictionary());
        Self {
            read,
            change: object.change_fingerprint(),
            kind: PhantomData,
        }
    }

    /// The child with the fields the reconcile reads ([`Projected::READ`]); `None` only if
    /// the cached text does not decompress or parse back (never for one made by
    /// [`Self::of`]).
    pub fn object(&self) -> Option<K> {
        let text = self.read.unpack(K::dictionary())?;
        match serde_json::from_slice(&text) {
            Ok(object) => Some(object),
            Err(err) => {
                tracing::warn!(%err, "a cached child does not parse back");
                None
            }
        }
    }

    /// [`Projected::change_fingerprint`] of the object it was made of.
    pub fn change_fingerprint(&self) -> Option<u64> {
        self.change
    }
}

/// Removes from `value` every field `mask` does not keep.
fn keep(value: &mut Value, mask: &Mask) {
    let Mask::Fields(fields) = mask else {
        return;
    };
    match value {
        Value::Object(map) => {
            map.retain(|key, _| fields.iter().any(|(name, _)| name == key));
            for (name, inner) in fields.iter() {
                if let Some(child) = map.get_mut(*name) {
                    keep(child, inner);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                keep(item, mask);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::{desired_service, desired_stateful_set, is_subset};
    use crate::volume_resize::{Resize, template_size};
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use shardop_api::{
        DatabaseCluster, DatabaseClusterSpec, ReclaimPolicy, ShardIndex, StorageSpec,
    };
    use std::collections::BTreeMap;

    /// A DatabaseCluster that sets every optional field the desired children carry.
    fn cluster() -> DatabaseCluster {
        let mut c = DatabaseCluster::new(
            "db-1",
            DatabaseClusterSpec {
                replicas: 3,
                image: "postgres:17".into(),
                resources: Some(ResourceRequirements {
                    requests: Some(BTreeMap::from([("cpu".into(), Quantity("500m".into()))])),
                    limits: Some(BTreeMap::from([("memory".into(), Quantity("1Gi".into()))])),
                    ..Default::default()
                }),
                storage: StorageSpec {
                    storage_class_name: Some("fast".into()),
                    size: Quantity("10Gi".into()),
                    reclaim_policy: ReclaimPolicy::Retain,
                },
            },
        );
        c.metadata.namespace = Some("team-a".into());
        c.metadata.uid = Some("uid-1".into());
        c
    }

    fn desired_sts() -> StatefulSet {
        let sts = desired_stateful_set(&cluster(), ShardIndex(1));
        Resize::hold(&Quantity("20Gi".into()), Some(&sts))
            .stateful_set_to_apply(sts.clone())
            .expect("a StatefulSet behind the spec is applied with its template kept")
    }

    /// `desired` as the API server returns it: server defaults, managed fields, an
    /// annotation, and a status.
    fn as_served<K: Serialize + DeserializeOwned>(desired: &K, status: Value) -> K {
        let mut value = serde_json::to_value(desired).unwrap();
        value["metadata"]["resourceVersion"] = "42".into();
        value["metadata"]["generation"] = 2.into();
        value["metadata"]["creationTimestamp"] = "2026-12-01T00:00:00Z".into();
        value["metadata"]["annotations"] = serde_json::json!({
            "kubectl.kubernetes.io/last-applied-configuration": "{\"a\": \"large\"}"
        });
        value["metadata"]["managedFields"] = serde_json::json!([{
            "manager": "shardop-worker", "operation": "Apply", "apiVersion": "v1",
            "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}
        }]);
        if let Some(spec) = value["spec"].as_object_mut() {
            spec.insert("revisionHistoryLimit".into(), 10.into());
            spec.insert("sessionAffinity".into(), "None".into());
        }
        if let Some(pod) = value["spec"]["template"]["spec"].as_object_mut() {
            pod.insert("dnsPolicy".into(), "ClusterFirst".into());
            pod.insert("restartPolicy".into(), "Always".into());
            let container = &mut pod.get_mut("containers").unwrap()[0];
            container["terminationMessagePath"] = "/dev/termination-log".into();
            container["imagePullPolicy"] = "IfNotPresent".into();
        }
        value["status"] = status;
        serde_json::from_value(value).unwrap()
    }

    fn sts_status() -> Value {
        serde_json::json!({
            "observedGeneration": 2, "replicas": 3, "readyReplicas": 2,
            "updatedReplicas": 3, "currentRevision": "db-1-abc", "updateRevision": "db-1-abc",
            "availableReplicas": 2
        })
    }

    #[test]
    fn the_read_fields_cover_every_field_the_worker_applies() {
        for desired in [
            serde_json::to_value(desired_sts()).unwrap(),
            serde_json::to_value(desired_service(&cluster(), ShardIndex(1))).unwrap(),
        ] {
            let mask = if desired["kind"] == "Service" {
                &Service::READ
            } else {
                &StatefulSet::READ
            };
            let mut kept = desired.clone();
            keep(&mut kept, mask);
            assert_eq!(kept, desired, "a field the worker applies is not cached");
        }
    }

    #[test]
    fn a_cached_stateful_set_compares_and_reads_like_the_served_one() {
        let desired = desired_sts();
        let served = as_served(&desired, sts_status());
        let cached = CachedChild::of(&served);
        let object = cached.object().unwrap();
        assert!(is_subset(&desired, &object), "in sync, no apply");
        // What the status, the resize and the cleanup read.
        let (status, served_status) = (
            object.status.clone().unwrap(),
            served.status.clone().unwrap(),
        );
        assert_eq!(
            status.observed_generation,
            served_status.observed_generation
        );
        assert_eq!(status.replicas, served_status.replicas);
        assert_eq!(status.ready_replicas, served_status.ready_replicas);
        assert_eq!(status.updated_replicas, served_status.updated_replicas);
        assert_eq!(status.current_revision, None, "not read, not kept");
        assert_eq!(status.available_replicas, None, "not read, not kept");
        assert_eq!(object.metadata.generation, Some(2));
        assert_eq!(object.metadata.labels, served.metadata.labels);
        assert_eq!(
            object.metadata.owner_references,
            served.metadata.owner_references
        );
        assert_eq!(object.metadata.uid, served.metadata.uid);
        assert_eq!(object.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(template_size(&object), Some(&Quantity("10Gi".into())));
        assert_eq!(object.spec.as_ref().unwrap().replicas, Some(3));
        assert_eq!(
            cached.change_fingerprint(),
            served.change_fingerprint(),
            "the change filter sees what it saw of the full object"
        );
        // What nobody reads is gone.
        assert_eq!(object.metadata.annotations, None);
        assert_eq!(object.metadata.managed_fields, None);
        assert_eq!(object.metadata.creation_timestamp, None);
        let spec = object.spec.unwrap();
        assert_eq!(spec.revision_history_limit, None);
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.dns_policy, None);
        assert_eq!(pod.containers[0].termination_message_path, None);
        assert!(cached.read.len() < serde_json::to_string(&served).unwrap().len());
    }

    #[test]
    fn a_cached_child_keeps_little_more_than_what_sets_it_apart() {
        // Names, image, sizes and counts all differ from the dictionary's sample parent.
        let sts = as_served(&desired_sts(), sts_status());
        let text = projected_text(&sts);
        let cached = CachedChild::of(&sts);
        assert!(
            cached.read.len() * 4 < text.len(),
            "{} compressed bytes of a {}-byte text",
            cached.read.len(),
            text.len()
        );
        assert!(is_subset(&desired_sts(), &cached.object().unwrap()));
        let service = desired_service(&cluster(), ShardIndex(1));
        let cached = CachedChild::of(&service);
        assert!(cached.read.len() * 3 < projected_text(&service).len());
        assert!(is_subset(&service, &cached.object().unwrap()));
    }

    #[test]
    fn a_damaged_cached_text_reads_as_no_child() {
        let mut cached = CachedChild::of(&as_served(&desired_sts(), sts_status()));
        cached.read = PackedText::damaged();
        assert!(
            cached.object().is_none(),
            "the next reconcile re-applies it"
        );
    }

    #[test]
    fn drift_of_a_cached_stateful_set_is_still_seen() {
        let desired = desired_sts();
        let drifted = |edit: &dyn Fn(&mut Value)| {
            let mut value = serde_json::to_value(as_served(&desired, sts_status())).unwrap();
            edit(&mut value);
            let served: StatefulSet = serde_json::from_value(value).unwrap();
            CachedChild::of(&served).object().unwrap()
        };
        let scaled = drifted(&|v| v["spec"]["replicas"] = 1.into());
        assert!(!is_subset(&desired, &scaled), "scaled by someone else");
        let image = drifted(&|v| {
            v["spec"]["template"]["spec"]["containers"][0]["image"] = "other:1".into();
        });
        assert!(!is_subset(&desired, &image), "image edited");
        let relabelled = drifted(&|v| v["metadata"]["labels"]["shardop.dev/shard"] = "0".into());
        assert!(!is_subset(&desired, &relabelled), "another shard's label");
        let limits = drifted(&|v| {
            v["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] =
                "2Gi".into();
        });
        assert!(!is_subset(&desired, &limits), "resources edited");
        let deleting =
            drifted(&|v| v["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:01Z".into());
        assert!(deleting.metadata.deletion_timestamp.is_some());
    }

    #[test]
    fn a_cached_service_compares_like_the_served_one() {
        let desired = desired_service(&cluster(), ShardIndex(1));
        let served = as_served(&desired, serde_json::json!({"loadBalancer": {}}));
        let object = CachedChild::of(&served).object().unwrap();
        assert!(is_subset(&desired, &object));
        assert_eq!(object.status, None);
        assert_eq!(object.spec.as_ref().unwrap().session_affinity, None);
        let mut edited = serde_json::to_value(&served).unwrap();
        edited["spec"]["publishNotReadyAddresses"] = false.into();
        let edited: Service = serde_json::from_value(edited).unwrap();
        let object = CachedChild::of(&edited).object().unwrap();
        assert!(!is_subset(&desired, &object), "edited by someone else");
        // Every new version of a Service reaches its parent.
        assert_eq!(
            CachedChild::of(&served).change_fingerprint(),
            kube::runtime::predicates::resource_version(&served)
        );
    }

    #[test]
    fn a_deletion_timestamp_reaches_the_resize() {
        let mut served = as_served(&desired_sts(), sts_status());
        served.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        let object = CachedChild::of(&served).object().unwrap();
        assert_eq!(
            object.metadata.deletion_timestamp,
            served.metadata.deletion_timestamp
        );
    }
}
