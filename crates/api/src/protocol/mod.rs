//! The shard protocol as pure functions: what state an object and a shard Lease are in,
//! and what the assigner or a worker must do about it. `docs/shard-protocol.md` is the
//! prose version of this module; the two must stay in step.
//!
//! The binaries observe the cluster, call these functions, and carry out the returned
//! action; nothing here performs I/O or reads a clock.

pub mod lease;
pub mod object;

pub use lease::{LeaseSnapshot, LeaseState, home_shard_of};
pub use object::{AssignerAction, ObjectPlacement, WorkerAction, assigner_action, worker_action};
