//! shardop's shared API: the custom resources, the well-known names every component
//! agrees on, and the pure logic of shard assignment and handover.
//!
//! Nothing in this crate talks to a cluster; the binaries wrap it in thin Kubernetes I/O.

// Tests may panic on unexpected values; production code may not (workspace lints).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod constants;
pub mod crd;
pub mod database_cluster;

// The shard protocol moved to the `shardop` library; these keep the operator's paths.
pub use shardop::{assignment, label_trust, protocol, schema, shard, shard_index};

pub use assignment::shard_for;
pub use database_cluster::{
    DatabaseCluster, DatabaseClusterSpec, DatabaseClusterStatus, ReclaimPolicy, StorageSpec,
};
pub use shard::{Shard, ShardSpec, ShardState, ShardStatus};
pub use shard_index::{
    ParseShardIndexError, ShardCount, ShardIndex, capped_shard_count, parse_shard_count,
};
