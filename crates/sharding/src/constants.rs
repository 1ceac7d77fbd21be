//! The names of the shard protocol that every component, the chart and the docs agree on.
//!
//! Changing one of these is a breaking change of the shard protocol
//! (see `docs/shard-protocol.md`).

/// API group of shardop's custom resources.
pub const API_GROUP: &str = "shardop.dev";
/// API version of shardop's custom resources.
pub const API_VERSION: &str = "v1alpha1";

/// Label that names the shard owning an object; its value is a canonical decimal
/// [`ShardIndex`](crate::ShardIndex). Workers watch with the selector `shardop.dev/shard=<i>`.
pub const SHARD_LABEL: &str = "shardop.dev/shard";
/// Label the assigner sets to ask the owning shard to let go of an object (phase 1 of a
/// move). Its value is the destination shard, for humans; the protocol only checks presence.
pub const DRAIN_LABEL: &str = "shardop.dev/drain";
/// Finalizer the worker adds so that cleanup runs before a DatabaseCluster disappears.
pub const FINALIZER: &str = "shardop.dev/cleanup";

/// Field manager of the worker's server-side applies and patches.
pub const WORKER_FIELD_MANAGER: &str = "shardop-worker";
/// Field manager of the assigner's server-side applies and patches.
pub const ASSIGNER_FIELD_MANAGER: &str = "shardop-assigner";

/// The most shards shardop runs: every shard index is below it. Labels, Lease names and flags
/// naming a shard at or above it are rejected (an out-of-range shard label is garbage, like
/// `x`), and the assigner caps the desired shard count at it. It keeps index arithmetic far
/// from `u32` overflow and bounds what one label can make the assigner create.
pub const MAX_SHARDS: u32 = 1024;

/// Prefix of the per-shard Lease names: shard `i` is guarded by `shardop-shard-<i>`.
pub const SHARD_LEASE_PREFIX: &str = "shardop-shard-";
/// Label put on every shard Lease so components can watch all of them with one selector.
pub const SHARD_LEASE_LABEL: &str = "shardop.dev/shard-lease";
/// Annotation on a shard Lease that asks its current holder to release it: set by the
/// home worker of a taken-over shard (hand-back) or by the assigner for a retired shard.
/// Its value names who asked.
pub const RELEASE_REQUESTED_ANNOTATION: &str = "shardop.dev/release-requested-by";
/// Annotation the assigner puts on the Lease of a shard that is no longer part of the
/// desired shard count; workers never take over a retired shard.
pub const RETIRED_ANNOTATION: &str = "shardop.dev/retired";
/// Annotation the assigner puts on a shard Lease to name the worker ordinal that is home for
/// the shard, when the shard count is fixed and the worker count is not; without it, shard
/// `i`'s home worker is ordinal `i`.
pub const HOME_WORKER_ANNOTATION: &str = "shardop.dev/home-worker";
/// Name of the assigner's own leader-election Lease.
pub const ASSIGNER_LEASE_NAME: &str = "shardop-assigner";
