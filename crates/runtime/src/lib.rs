//! The Kubernetes I/O shared by shardop's binaries (worker and assigner), one concept per
//! module:
//!
//! * [`client`]: kube clients with a user agent, a token-bucket rate limit, 429 handling and
//!   request metrics;
//! * [`telemetry`]: JSON/text logs with trace ids and optional OTLP trace export;
//! * [`serve`]: `/metrics`, `/healthz` and `/readyz`;
//! * [`reachability`]: whether the API server answers, and the one place an outage is logged;
//! * [`retry`]: the capped, jittered exponential backoff both binaries retry with;
//! * [`watch_list`]: streaming lists only where the API server serves them;
//! * [`lease`]: shard Lease acquire/renew/release, the write fence, and a watch over all
//!   shard Leases;
//! * [`shutdown`]: SIGTERM/SIGINT as a cancellation token.

// Tests may panic on unexpected values; production code may not (workspace lints).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod serve;
pub mod shutdown;
pub mod telemetry;

// The Kubernetes I/O of sharding moved to the `shardop` library; these keep the binaries' paths.
pub use shardop::{client, duration, lease, reachability, retry, watch_list};

pub use client::{ClientFactory, KubeClientArgs, KubeMetrics};
pub use duration::{parse_duration, parse_positive_duration};
pub use lease::{
    HeldLease, LeaseError, LeaseGuard, LeaseLost, LeaseSettings, ShardLeaseWatch, ShardLeases,
    watch_shard_leases,
};
pub use reachability::ApiReachability;
pub use retry::RetrySchedule;
pub use serve::{Endpoints, Readiness};
pub use telemetry::{LogFormat, TelemetryGuard};
