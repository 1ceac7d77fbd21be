//! shardop: horizontal sharding for kube-rs controllers.
//!
//! * [`protocol`]: the shard protocol as pure functions (what the assigner and a worker must
//!   do about an object or a shard Lease), with its model checker;
//! * [`assignment`], [`shard_index`]: which shard an object belongs to, and shard indices;
//! * [`names`]: the label keys, Lease names and field managers of one sharded operator;
//! * [`label_trust`]: whether a shard label was written by the assigner;
//! * [`shard`]: the `Shard` custom resource, one per shard index;
//! * [`lease`]: shard Lease acquire/renew/release, the write fence, and a watch over all
//!   shard Leases;
//! * [`client`]: kube clients with a user agent, a token-bucket rate limit, 429 handling,
//!   request metrics and per-shard write fencing;
//! * [`reachability`]: whether the API server answers, and the one place an outage is logged;
//! * [`retry`]: the capped, jittered exponential backoff;
//! * [`watch_list`]: streaming lists only where the API server serves them.

// Tests may panic on unexpected values; production code may not (workspace lints).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod assignment;
pub mod client;
pub mod constants;
pub mod duration;
pub mod label_trust;
pub mod lease;
pub mod names;
pub mod protocol;
pub mod reachability;
pub mod retry;
pub mod schema;
pub mod shard;
pub mod shard_index;
pub mod watch_list;

pub use assignment::shard_for;
pub use client::{ClientFactory, KubeClientArgs, KubeMetrics};
pub use duration::{parse_duration, parse_positive_duration};
pub use lease::{
    HeldLease, LeaseError, LeaseGuard, LeaseLost, LeaseSettings, ShardLeaseWatch, ShardLeases,
    watch_shard_leases,
};
pub use names::OperatorNames;
pub use reachability::ApiReachability;
pub use retry::RetrySchedule;
pub use shard::{Shard, ShardSpec, ShardState, ShardStatus};
pub use shard_index::{
    ParseShardIndexError, ShardCount, ShardIndex, capped_shard_count, parse_shard_count,
};
