//! The desired children of a DatabaseCluster: a headless Service `<name>-headless` and a
//! StatefulSet `<name>`, built as plain objects (no I/O), and the comparison that decides
//! whether an apply is needed at all.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Container, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Service,
    ServiceSpec, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use shardop_api::constants::{
    INSTANCE_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, NAME_LABEL, NAME_VALUE, SHARD_LABEL,
};
use shardop_api::{DatabaseCluster, ReclaimPolicy, ShardIndex};

/// Name of the data volume (claim template) of every database pod.
pub const DATA_VOLUME: &str = "data";
/// Where the data volume is mounted.
pub const DATA_MOUNT_PATH: &str = "/var/lib/database";
/// Name of the database container.
pub const CONTAINER_NAME: &str = "database";

/// Name of the headless Service of a DatabaseCluster.
pub fn service_name(cluster_name: &str) -> String {
    format!("{cluster_name}-headless")
}

/// Labels that select a DatabaseCluster's pods (the StatefulSet controller also copies them
/// onto the claims it creates). They never include the shard label: moving an object
/// between shards must not roll its pods.
pub fn selector_labels(cluster_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (INSTANCE_LABEL.to_owned(), cluster_name.to_owned()),
        (NAME_LABEL.to_owned(), NAME_VALUE.to_owned()),
    ])
}

/// Labels on the Service and StatefulSet objects: the pod labels, managed-by, and the shard
/// label of the shard that applied them, so the owning worker's label-filtered watch sees
/// them.
fn child_labels(cluster_name: &str, shard: ShardIndex) -> BTreeMap<String, String> {
    let mut labels = selector_labels(cluster_name);
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned());
    labels.insert(SHARD_LABEL.to_owned(), shard.label_value());
    labels
}

fn owner_reference(cluster: &DatabaseCluster) -> Option<OwnerReference> {
    cluster.controller_owner_ref(&())
}

fn metadata(cluster: &DatabaseCluster, name: String, shard: ShardIndex) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: cluster.namespace(),
        labels: Some(child_labels(&cluster.name_any(), shard)),
        owner_references: owner_reference(cluster).map(|o| vec![o]),
        ..Default::default()
    }
}

/// The headless Service `<name>-headless` that gives each database pod a stable DNS name.
pub fn desired_service(cluster: &DatabaseCluster, shard: ShardIndex) -> Service {
    let name = cluster.name_any();
    Service {
        metadata: metadata(cluster, service_name(&name), shard),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(selector_labels(&name)),
            // Peers must find each other before they are ready (replication bootstrap).
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The StatefulSet `<name>` running the database pods.
pub fn desired_stateful_set(cluster: &DatabaseCluster, shard: ShardIndex) -> StatefulSet {
    let name = cluster.name_any();
    let spec = &cluster.spec;
    let mut pod_labels = selector_labels(&name);
    pod_labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned());
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.to_owned()),
            labels: Some(selector_labels(&name)),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            storage_class_name: spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    spec.storage.size.clone(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let when_deleted = match spec.storage.reclaim_policy {
        ReclaimPolicy::Delete => "Delete",
        ReclaimPolicy::Retain => "Retain",
    };
    StatefulSet {
        metadata: metadata(cluster, name.clone(), shard),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.replicas),
            service_name: Some(service_name(&name)),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..Default::default()
            },
            pod_management_policy: Some("Parallel".to_owned()),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(when_deleted.to_owned()),
                    when_scaled: Some("Retain".to_owned()),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: CONTAINER_NAME.to_owned(),
                        image: Some(spec.image.clone()),
                        resources: spec.resources.clone(),
                        volume_mounts: Some(vec![VolumeMount {
                            name: DATA_VOLUME.to_owned(),
                            mount_path: DATA_MOUNT_PATH.to_owned(),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            },
            volume_claim_templates: Some(vec![claim]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether `actual` already carries every field of `desired` with the same value: then a
/// server-side apply of `desired` would change nothing and is skipped (a converged object
/// costs zero writes).
///
/// Objects are compared as JSON: every key of a desired object must exist in the actual one
/// with a matching value; arrays must have the same length and match element-wise. Fields
/// the API server defaults (and status) are extra keys and do not matter. Quantities
/// (`resources.limits` and `resources.requests` values) match by amount, since the API
/// server stores them in canonical form (`1024Mi` as `1Gi`). An empty desired map or list
/// (`limits: {}`, `claims: []`) matches an absent key: the API server drops empty ones,
/// and a write that can never show would be sent on every pass.
pub fn is_subset<T: serde::Serialize, U: serde::Serialize>(desired: &T, actual: &U) -> bool {
    match (serde_json::to_value(desired), serde_json::to_value(actual)) {
        (Ok(desired), Ok(actual)) => json_subset(&desired, &actual, Position::Other),
        _ => false,
    }
}

/// Where a JSON value sits, as far as quantities are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Position {
    Other,
    /// A `resources` object (of a container or a claim).
    Resources,
    /// Its `limits` or `requests` map.
    QuantityMap,
    /// A value of that map.
    Quantity,
}

impl Position {
    fn child(self, key: &str) -> Self {
        match (self, key) {
            (Self::Resources, "limits" | "requests") => Self::QuantityMap,
            (Self::QuantityMap, _) => Self::Quantity,
            (_, "resources") => Self::Resources,
            _ => Self::Other,
        }
    }
}

fn json_subset(desired: &serde_json::Value, actual: &serde_json::Value, at: Position) -> bool {
    use serde_json::Value;
    match (desired, actual) {
        (Value::Object(d), Value::Object(a)) => d.iter().all(|(k, dv)| match a.get(k) {
            Some(av) => json_subset(dv, av, at.child(k)),
            None => is_empty(dv),
        }),
        (Value::Array(d), Value::Array(a)) => {
            d.len() == a.len()
                && d.iter()
                    .zip(a)
                    .all(|(dv, av)| json_subset(dv, av, Position::Other))
        }
        (d, a) if at == Position::Quantity => crate::quantity::same_quantity_json(d, a),
        (d, a) => d == a,
    }
}

/// What the API server does not store: `null`, `{}` and `[]`.
fn is_empty(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::Null => true,
        Value::Object(map) => map.is_empty(),
        Value::Array(list) => list.is_empty(),
        _ => false,
    }
}

/// The kind/name of a child for logs and errors.
pub fn describe<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}/{}",
        K::kind(&()),
        object.meta().name.as_deref().unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use shardop_api::{DatabaseClusterSpec, StorageSpec};

    fn cluster() -> DatabaseCluster {
        let mut c = DatabaseCluster::new(
            "db-1",
            DatabaseClusterSpec {
                replicas: 3,
                image: "postgres:17".into(),
                resources: None,
                storage: StorageSpec {
                    storage_class_name: Some("fast".into()),
                    size: Quantity("10Gi".into()),
                    reclaim_policy: ReclaimPolicy::Delete,
                },
            },
        );
        c.metadata.namespace = Some("team-a".into());
        c.metadata.uid = Some("uid-1".into());
        c
    }

    #[test]
    fn stateful_set_follows_the_spec() {
        let sts = desired_stateful_set(&cluster(), ShardIndex(2));
        assert_eq!(sts.metadata.name.as_deref(), Some("db-1"));
        assert_eq!(sts.metadata.namespace.as_deref(), Some("team-a"));
        let labels = sts.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[SHARD_LABEL], "2");
        let owner = &sts.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("DatabaseCluster", "uid-1", Some(true))
        );
        let spec = sts.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.service_name.as_deref(), Some("db-1-headless"));
        let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
        assert!(
            !pod_labels.contains_key(SHARD_LABEL),
            "a shard move must not roll the pods"
        );
        let claim = &spec.volume_claim_templates.unwrap()[0];
        let claim_spec = claim.spec.as_ref().unwrap();
        assert_eq!(claim_spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            claim_spec
                .resources
                .as_ref()
                .unwrap()
                .requests
                .as_ref()
                .unwrap()["storage"],
            Quantity("10Gi".into())
        );
        assert_eq!(
            spec.persistent_volume_claim_retention_policy
                .unwrap()
                .when_deleted
                .as_deref(),
            Some("Delete")
        );
    }

    #[test]
    fn service_is_headless() {
        let svc = desired_service(&cluster(), ShardIndex(0));
        assert_eq!(svc.metadata.name.as_deref(), Some("db-1-headless"));
        assert_eq!(svc.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    }

    #[test]
    fn subset_ignores_server_defaults_but_not_drift() {
        let desired = desired_stateful_set(&cluster(), ShardIndex(1));
        let mut actual = serde_json::to_value(&desired).unwrap();
        actual["spec"]["revisionHistoryLimit"] = 10.into();
        actual["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] =
            "/dev/termination-log".into();
        actual["status"] = serde_json::json!({"replicas": 3});
        assert!(is_subset(&desired, &actual));
        actual["spec"]["replicas"] = 1.into();
        assert!(!is_subset(&desired, &actual), "scaled by someone else");
        let moved = desired_stateful_set(&cluster(), ShardIndex(2));
        actual["spec"]["replicas"] = 3.into();
        assert!(
            !is_subset(&moved, &actual),
            "the shard label must be rewritten"
        );
    }

    #[test]
    fn quantities_match_by_amount_not_by_spelling() {
        let mut spec = cluster();
        spec.spec.storage.size = Quantity("1024Mi".into());
        spec.spec.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("0.5".into())),
                ("memory".to_owned(), Quantity("1e9".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "cpu".to_owned(),
                Quantity("1000m".into()),
            )])),
            ..Default::default()
        });
        let desired = desired_stateful_set(&spec, ShardIndex(1));
        // What the API server stores for it.
        let mut actual = serde_json::to_value(&desired).unwrap();
        let container = &mut actual["spec"]["template"]["spec"]["containers"][0];
        container["resources"]["requests"]["cpu"] = "500m".into();
        container["resources"]["requests"]["memory"] = "1G".into();
        container["resources"]["limits"]["cpu"] = "1".into();
        actual["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] =
            "1Gi".into();
        assert!(is_subset(&desired, &actual));
        actual["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] =
            "2".into();
        assert!(!is_subset(&desired, &actual), "a different amount");
        // Only quantities compare by amount: an image tag `1e3` is not `1k`.
        let mut image = cluster();
        image.spec.image = "1e3".into();
        let desired = desired_stateful_set(&image, ShardIndex(1));
        let mut actual = serde_json::to_value(&desired).unwrap();
        actual["spec"]["template"]["spec"]["containers"][0]["image"] = "1k".into();
        assert!(!is_subset(&desired, &actual));
    }

    #[test]
    fn empty_resource_maps_match_what_the_api_server_stores() {
        let mut spec = cluster();
        spec.spec.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
            requests: Some(BTreeMap::from([(
                "cpu".to_owned(),
                Quantity("500m".into()),
            )])),
            limits: Some(BTreeMap::new()),
            claims: Some(Vec::new()),
        });
        let desired = desired_stateful_set(&spec, ShardIndex(1));
        // The API server omits empty maps and lists.
        let mut actual = serde_json::to_value(&desired).unwrap();
        let resources = &mut actual["spec"]["template"]["spec"]["containers"][0]["resources"];
        let resources = resources.as_object_mut().unwrap();
        resources.remove("limits");
        resources.remove("claims");
        assert!(
            is_subset(&desired, &actual),
            "a converged StatefulSet is not applied again"
        );
        resources_of(&mut actual)["requests"]["cpu"] = "1".into();
        assert!(
            !is_subset(&desired, &actual),
            "a changed amount still counts"
        );
    }

    fn resources_of(stateful_set: &mut serde_json::Value) -> &mut serde_json::Value {
        &mut stateful_set["spec"]["template"]["spec"]["containers"][0]["resources"]
    }
}
