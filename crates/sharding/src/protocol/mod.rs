//! The shard protocol as pure functions: what state an object and a shard Lease are in,
//! and what the assigner or a worker must do about it. `docs/shard-protocol.md` is the
//! prose version of this module; the two must stay in step.
//!
//! The binaries observe the cluster, call these functions, and carry out the returned
//! action; nothing here performs I/O or reads a clock.

// Tests may panic on unexpected values; production code may not (workspace lints).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod lease;
pub mod object;
pub mod plan;
pub mod shards;

#[cfg(test)]
mod simulation;

pub use lease::{LeaseSnapshot, LeaseState, home_shard_of};
pub use object::{
    AssignerAction, ObjectPlacement, WorkerAction, assigner_action, assigner_decision,
    worker_action,
};
pub use plan::{LeaseStep, ObjectFacts, ShardPlan, plan_object, plan_shard};
pub use shards::ShardTable;
