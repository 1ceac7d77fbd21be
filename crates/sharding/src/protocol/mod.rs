//! The shard protocol as pure functions: what state an object and a shard Lease are in,
//! and what the assigner or a worker must do about it. Both halves live here: the
//! assigner's ([`assigner_action`], [`plan`], and [`admission`] for its webhook) and the
//! worker's ([`worker_action`] for objects,
//! including the drain acknowledgement, and [`failover`] for shard Leases). `docs/shard-protocol.md` is the
//! prose version of this module; the two must stay in step.
//!
//! The binaries observe the cluster, call these functions, and carry out the returned
//! action; nothing here performs I/O or reads a clock.

// Tests may panic on unexpected values; production code may not (workspace lints).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admission;
pub mod failover;
pub mod homes;
pub mod lease;
pub mod object;
pub mod plan;
pub mod shards;

#[cfg(test)]
mod simulation;

pub use admission::{Admission, Creation, SkipReason, admission};
pub use failover::{
    Acquisition, LEASE_WRITE_ATTEMPTS, Me, StopReason, acquisition, is_home, release_wait,
    ring_distance, should_release, stop_grace,
};
pub use homes::{home_step, spread_homes, spread_plan};
pub use lease::{LeaseSnapshot, LeaseState, home_shard_of};
pub use object::{
    AssignerAction, ObjectPlacement, WorkerAction, assigner_action, assigner_decision,
    worker_action,
};
pub use plan::{LeaseStep, ObjectFacts, ShardPlan, plan_object, plan_shard};
pub use shards::ShardTable;
