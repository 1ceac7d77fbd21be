//! `Shard`: one object per shard index in the operator namespace, the place where an
//! operator reads at a glance who serves each shard and how loaded it is.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A shard of the DatabaseCluster key space.
// Each `printcolumn(...)` repeats the same keys, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shardop.dev",
    version = "v1alpha1",
    kind = "Shard",
    namespaced,
    status = "ShardStatus",
    category = "shardop",
    doc = "One shard of shardop's DatabaseCluster key space: who holds its Lease and how loaded it is. Created and retired by the assigner; status shared by the assigner and the shard's worker.",
    printcolumn(name = "Index", type_ = "integer", json_path = ".spec.index"),
    printcolumn(
        name = "Holder",
        type_ = "string",
        description = "Identity of the worker holding this shard's Lease",
        json_path = ".status.holder"
    ),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Objects",
        type_ = "integer",
        description = "DatabaseClusters assigned to this shard",
        json_path = ".status.objects"
    ),
    printcolumn(
        name = "Queue",
        type_ = "integer",
        description = "Objects waiting for a reconcile",
        json_path = ".status.queueDepth"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::known_formats_only)]
pub struct ShardSpec {
    /// The shard index, below 1024 (the maximum shard count); the object is named
    /// `shard-<index>`. Immutable.
    // The bound is `MAX_SHARDS - 1`, written out because an attribute cannot name a
    // constant; `crd::tests::shard_index_is_bounded_by_the_maximum_shard_count` checks it.
    #[schemars(range(max = 1023))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "index is immutable"}]))]
    pub index: u32,
}

/// The lifecycle state of a shard, as the assigner sees it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ShardState {
    /// Part of the desired shard count and served by its own worker.
    Active,
    /// Objects are being moved off this shard.
    Draining,
    /// Part of the desired shard count, but nobody holds its Lease.
    Orphaned,
    /// Served by another worker while its own worker is away (failover).
    TakenOver,
    /// No longer part of the desired shard count; deleted once empty and released.
    Retired,
}

/// Observed state of a shard. The assigner owns `state`, `objects` and `conditions`; the
/// shard's worker owns `holder`, `queueDepth`, `backlog` and `lastHeartbeatTime` (each side
/// applies only its own fields, with its own field manager).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::known_formats_only)]
pub struct ShardStatus {
    /// Identity (pod name) of the worker that holds the shard Lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// Lifecycle state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ShardState>,
    /// DatabaseClusters labelled with this shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<i64>,
    /// Objects waiting for a reconcile slot in the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<i64>,
    /// Objects whose observedGeneration is behind their generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<i64>,
    /// When the worker last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Conditions set by the assigner.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
