//! shardop: horizontal sharding for kube-rs controllers.
//!
//! A sharded controller runs as a StatefulSet; replica `i` serves shard `i` while it holds
//! the shard's Lease, takes over the shards of replicas that died, and hands them back when
//! they return. An assigner (`shardop-assigner`) stamps every object with its shard label
//! and moves objects between shards with a two-phase handover when the shard count
//! changes. The library decides *whether* this process may act on an object (Lease held,
//! object in its slice, not drained) and acknowledges drains before the controller ever
//! sees a drained object; the controller decides only *what* to reconcile.
//!
//! # Shard your controller
//!
//! The sharding-specific lines of an existing kube-runtime controller (see
//! `docs/library.md`; 7 lines here, marked `// shardop`):
//!
//! ```no_run
//! use std::sync::Arc;
//! use futures::StreamExt;
//! use k8s_openapi::api::core::v1::ConfigMap;
//! use kube::{Api, Client, runtime::controller::Action};
//!
//! #[derive(Debug, thiserror::Error)]
//! enum Error {
//!     #[error(transparent)]
//!     Shard(#[from] shardop::ScopeError), // shardop
//!     #[error(transparent)]
//!     Kube(#[from] kube::Error),
//! }
//!
//! async fn reconcile(object: Arc<ConfigMap>, scope: Arc<shardop::ShardScope>) -> Result<Action, Error> {
//!     // Writes through scope.client() are fenced by the shard's Lease; children carry
//!     // scope.child_labels() (or scope.label_child(&mut child)).
//!     let _client = scope.client();
//!     let _ = object;
//!     Ok(Action::await_change())
//! }
//!
//! fn error_policy(_: Arc<ConfigMap>, _: &Error, _: Arc<shardop::ShardScope>) -> Action {
//!     Action::requeue(std::time::Duration::from_secs(5))
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let client = Client::try_default().await?;
//!     let sharding = shardop::Sharding::from_env(client, "my-operator").await?; // shardop
//!     sharding
//!         .run(|scope: shardop::ShardScope| async move { // shardop
//!             let objects: Api<ConfigMap> = Api::all(scope.client()); // shardop
//!             scope
//!                 .controller(objects) // shardop
//!                 .run(scope.reconciler(reconcile), error_policy, Arc::new(scope.clone())) // shardop
//!                 .for_each(|_| async {})
//!                 .await;
//!         })
//!         .await?; // shardop
//!     Ok(())
//! }
//! ```
//!
//! # Modules
//!
//! * [`sharding`]: [`Sharding`], the entry point, and its [`ShardingSettings`];
//! * [`scope`]: [`ShardScope`], what a served shard's controller gets;
//! * [`strategy`]: how objects are assigned ([`LabelAssignment`]), the seam for a
//!   server-side `shardSelector` strategy;
//! * [`protocol`]: the shard protocol as pure functions, both the assigner's and the
//!   worker's halves (object actions, Lease failover), with its model checker;
//! * [`assignment`], [`shard_index`]: which shard an object belongs to, and shard indices;
//! * [`names`]: the label keys, Lease names and field managers of one sharded operator;
//! * [`label_trust`]: whether a shard label was written by the assigner;
//! * [`change_filter`]: which watch events deserve a reconcile, and which objects joined;
//! * [`metrics`], [`heartbeat`]: per-shard metrics and the `Shard` status heartbeat;
//! * [`shard`]: the `Shard` custom resource, one per shard index;
//! * [`lease`]: shard Lease acquire/renew/release, the write fence, and a watch over all
//!   shard Leases;
//! * [`client`]: kube clients with a user agent, a token-bucket rate limit, 429 handling,
//!   request metrics and per-shard write fencing;
//! * [`reachability`], [`step_retry`]: whether the API server answers, and how the
//!   supervisor retries when it does not;
//! * [`retry`]: the capped, jittered exponential backoff;
//! * [`watch_list`]: streaming lists only where the API server serves them;
//! * [`memory`]: giving the memory a shrunken slice freed back to the system.

#![warn(missing_docs)]
// Tests may panic on unexpected values; production code may not (workspace lints).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod assignment;
pub mod change_filter;
pub mod client;
pub mod constants;
pub mod duration;
pub mod heartbeat;
pub mod label_trust;
pub mod lease;
pub mod memory;
pub mod metrics;
pub mod names;
pub mod protocol;
pub mod reachability;
pub mod retry;
pub mod schema;
pub mod scope;
pub mod shard;
pub mod shard_index;
pub mod sharding;
pub mod step_retry;
pub mod strategy;
mod supervisor;
pub mod watch_list;

pub use assignment::shard_for;
pub use client::{ClientFactory, KubeClientArgs, KubeMetrics};
pub use duration::{parse_duration, parse_positive_duration};
pub use lease::{
    HeldLease, LeaseError, LeaseGuard, LeaseLost, LeaseSettings, ShardLeaseWatch, ShardLeases,
    watch_operator_shard_leases, watch_shard_leases,
};
pub use metrics::{ShardLoad, ShardMetrics};
pub use names::OperatorNames;
pub use reachability::ApiReachability;
pub use retry::RetrySchedule;
pub use scope::{
    Admission, MoveIn, ScopeError, ShardScope, bookkeeping_key, bookkeeping_key_of_ref, object_key,
};
pub use shard::{Shard, ShardSpec, ShardState, ShardStatus};
pub use shard_index::{
    ParseShardIndexError, ShardCount, ShardIndex, capped_shard_count, parse_shard_count,
};
pub use sharding::{Sharding, ShardingError, ShardingSettings};
pub use strategy::{AssignmentStrategy, LabelAssignment};
