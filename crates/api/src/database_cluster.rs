//! `DatabaseCluster`: shardop's reference workload, a database run as a StatefulSet
//! behind a headless Service.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a database cluster.
// Each `printcolumn(...)` repeats the same keys, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shardop.dev",
    version = "v1alpha1",
    kind = "DatabaseCluster",
    namespaced,
    status = "DatabaseClusterStatus",
    shortname = "dbc",
    category = "shardop",
    doc = "A database cluster: a StatefulSet of database pods behind a headless Service, reconciled by the shardop worker that owns its shard.",
    printcolumn(
        name = "Shard",
        type_ = "string",
        description = "The shard that owns this object (label shardop.dev/shard)",
        json_path = ".metadata.labels.shardop\\.dev/shard"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        description = "Desired number of database pods",
        json_path = ".spec.replicas"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        description = "Database pods that are ready",
        json_path = ".status.readyReplicas"
    ),
    printcolumn(
        name = "Available",
        type_ = "string",
        description = "Whether all desired pods are ready",
        json_path = ".status.conditions[?(@.type==\"Available\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseClusterSpec {
    /// Number of database pods.
    #[schemars(range(min = 1, max = 9))]
    pub replicas: i32,

    /// Container image of the database, e.g. `postgres:17`.
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"^\S+$"))]
    pub image: String,

    /// Compute resources of each database container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Persistent storage of each database pod.
    pub storage: StorageSpec,
}

/// Persistent storage of each database pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)",
        "message": "storageClassName is immutable",
        "fieldPath": ".storageClassName",
        "reason": "FieldValueForbidden"
    },
    {
        "rule": "quantity(self.size).compareTo(quantity(oldSelf.size)) >= 0",
        "message": "size cannot be decreased",
        "fieldPath": ".size",
        "reason": "FieldValueForbidden"
    }
]))]
pub struct StorageSpec {
    /// StorageClass of the volume claims; the cluster default when unset. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,

    /// Size of each pod's volume, a Kubernetes quantity such as `10Gi`. May grow, never shrink.
    #[schemars(schema_with = "positive_quantity_schema")]
    pub size: Quantity,

    /// What happens to the volumes when the DatabaseCluster is deleted.
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,
}

/// What happens to a DatabaseCluster's volumes when it is deleted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ReclaimPolicy {
    /// Keep the PersistentVolumeClaims (the data survives the cluster).
    #[default]
    Retain,
    /// Delete the PersistentVolumeClaims with the cluster.
    Delete,
}

/// A quantity given as a string the API server can parse, greater than zero.
fn positive_quantity_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "description": "A Kubernetes quantity such as 10Gi or 500Mi.",
        "maxLength": 64,
        "x-kubernetes-validations": [
            {
                "rule": "isQuantity(self)",
                "message": "must be a Kubernetes quantity such as 10Gi",
                "reason": "FieldValueInvalid"
            },
            {
                "rule": "!isQuantity(self) || quantity(self).isGreaterThan(quantity('0'))",
                "message": "must be greater than zero",
                "reason": "FieldValueInvalid"
            }
        ]
    })
}

/// Observed state of a database cluster, written only by the owning shard's worker.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods the StatefulSet has created.
    #[serde(default)]
    pub replicas: i32,
    /// Pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Available, Progressing and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The shard whose worker last reconciled this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
    /// How many volume-claim ordinals may exist: claims `data-<name>-0` up to
    /// `data-<name>-<claimOrdinals - 1>`, the highest replica count the StatefulSet was ever
    /// given. Claims of removed replicas are kept on scale-down, so deletion with
    /// `reclaimPolicy: Delete` deletes this many claim names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_ordinals: Option<i32>,
}

impl DatabaseCluster {
    /// The condition of the given type, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
    }
}
