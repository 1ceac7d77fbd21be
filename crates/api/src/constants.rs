//! Names that every shardop component, the chart and the docs agree on.
//!
//! Changing one of these is a breaking change of the shard protocol
//! (see `docs/shard-protocol.md`).

// The shard protocol's names live with the protocol; re-exported so every name the
// DatabaseCluster operator uses is in one place.
pub use shardop::constants::*;

/// Standard label set on every child object the worker applies.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`] on shardop's children.
pub const MANAGED_BY_VALUE: &str = "shardop";
/// Label on children that names the DatabaseCluster they belong to.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Label on children that names the kind of workload.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Value of [`NAME_LABEL`] on DatabaseCluster children.
pub const NAME_VALUE: &str = "databasecluster";

/// Condition types of a DatabaseCluster.
pub mod condition {
    /// All desired replicas are ready.
    pub const AVAILABLE: &str = "Available";
    /// The children are being created or rolled to a new spec.
    pub const PROGRESSING: &str = "Progressing";
    /// Something is wrong that shardop cannot fix by retrying.
    pub const DEGRADED: &str = "Degraded";
    /// A larger `spec.storage.size` is being carried out (claims expanded, StatefulSet
    /// replaced around the new claim template); `False` once done or when impossible.
    pub const STORAGE_RESIZING: &str = "StorageResizing";
    /// The finalizer cleanup of a deleted object: what is left, what failed.
    pub const CLEANUP: &str = "Cleanup";
}
