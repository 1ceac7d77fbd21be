//! What the reconciles of one shard share, and what one namespace scope's reconciles see.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use shardop::{LeaseGuard, ShardIndex, ShardMetrics, ShardScope};

use crate::backoff::{BackoffPolicy, FailureCounts};
use crate::book::{Bookkeeping, ObjectKey, key_of};
use crate::child_store::ChildStore;
use crate::cluster_cache::CachedCluster;

/// What the reconciles of one shard share.
pub struct ShardShared {
    /// The shard as the sharding library serves it: admission, fenced client, moves.
    pub scope: ShardScope,
    /// The shard.
    pub shard: ShardIndex,
    /// Its Lease fence.
    pub guard: LeaseGuard,
    /// Metrics.
    pub metrics: ShardMetrics,
    /// Backoff shape.
    pub backoff: BackoffPolicy,
    /// Consecutive failures per object.
    pub failures: FailureCounts<ObjectKey>,
    /// Cleanup passes per deleted object that still waited for claims to go: the poll
    /// backs off, since every pass reads (and the first deletes) the object's claims.
    pub cleanup_passes: FailureCounts<ObjectKey>,
    /// Queue and lag bookkeeping.
    pub book: Mutex<Bookkeeping>,
    /// Requeue delay when the Lease is not valid.
    pub retry_period: Duration,
}

impl ShardShared {
    /// Locks the bookkeeping (poisoning only means a panic elsewhere; the maps stay usable).
    pub fn book(&self) -> std::sync::MutexGuard<'_, Bookkeeping> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The object left the shard (drain acknowledged, relabelled, deleted, its finalizer
    /// removed by hand): whatever this shard applied for it may be relabelled by its next
    /// owner, so its memos are void, and its counters must not carry over to an object
    /// created again under the same name (a cleanup that starts at a later pass would not
    /// delete the StatefulSet).
    pub fn forget_object(&self, cluster: &CachedCluster) {
        let key = key_of(cluster);
        {
            let mut book = self.book();
            book.forget_object(cluster);
            book.converged(&key);
        }
        self.failures.reset(&key);
        self.cleanup_passes.reset(&key);
    }
}

/// What one controller's reconciles see: the shard's shared state plus the caches of one
/// namespace scope.
pub struct ScopeContext {
    /// The shard's shared state.
    pub shared: Arc<ShardShared>,
    /// Client acting as the shard (`shardop-worker/shard-<i>` user agent).
    pub client: Client,
    /// Cached StatefulSets of the shard (what a reconcile reads of them).
    pub stateful_sets: ChildStore<StatefulSet>,
    /// Cached Services of the shard (what a reconcile reads of them).
    pub services: ChildStore<Service>,
    /// Cached DatabaseClusters of the shard (the controller's own store).
    pub clusters: Store<CachedCluster>,
}

impl ScopeContext {
    /// The version of `cluster` the cache holds now.
    pub fn cached_cluster(&self, cluster: &impl ResourceExt) -> Option<Arc<CachedCluster>> {
        self.clusters.get(
            &ObjectRef::new(&cluster.name_any()).within(&cluster.namespace().unwrap_or_default()),
        )
    }
}
