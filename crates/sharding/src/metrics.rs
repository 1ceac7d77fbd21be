//! Per-shard Prometheus metrics of a sharded controller (names and labels as documented in
//! `docs/worker.md`; the chart's alerts, HPA and dashboard read them).
//! `shardop_kube_requests_total` lives in [`crate::client`].
//!
//! The library updates the gauges of every served shard (from [`crate::ShardScope`]'s load
//! report), counts reconcile runs, queue waits and drain acknowledgements; a controller
//! records the outcome of its reconciles with [`ShardMetrics::record_reconcile`] and
//! [`ShardMetrics::record_error`] (or lets [`crate::ShardScope::reconciler`] do it).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

use crate::shard_index::ShardIndex;

/// `{shard}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    /// Shard index.
    pub shard: String,
}

/// `{shard,result}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// Shard index.
    pub shard: String,
    /// `success`, `error`, `terminal`, `skipped`.
    pub result: &'static str,
}

/// `{shard,reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Shard index.
    pub shard: String,
    /// Error class, e.g. `conflict`, `api`, `lease_lost`, `invalid`.
    pub reason: &'static str,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

fn histogram_1ms_to_16s() -> Histogram {
    // 1 ms, 2 ms, ... 16.384 s: 15 buckets.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Lag and queue wait are seconds to minutes, and SLOs are stated in round seconds (p99
/// queue ≤ 1 s, p99 lag ≤ 5 s), so their buckets are round numbers up to 5 min that alert thresholds can name exactly.
fn lag_histogram() -> Histogram {
    Histogram::new(LAG_BUCKETS.iter().copied())
}

/// Bucket bounds of `shardop_reconcile_lag_seconds` and `shardop_queue_wait_seconds`.
pub const LAG_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// The error reasons a controller reports when it does not name its own
/// ([`ShardMetrics::register`]).
pub const DEFAULT_ERROR_REASONS: [&str; 2] = ["lease_lost", "error"];

/// All per-shard metrics. Cheap to clone.
#[derive(Clone)]
pub struct ShardMetrics {
    /// `shardop_reconcile_duration_seconds{shard,result}`.
    pub reconcile_duration: Family<ResultLabels, Histogram, fn() -> Histogram>,
    /// `shardop_reconcile_errors_total{shard,reason}`.
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    /// `shardop_queue_depth{shard}`.
    pub queue_depth: Family<ShardLabel, Gauge>,
    /// `shardop_backlog_objects{shard}`.
    pub backlog: Family<ShardLabel, Gauge>,
    /// `shardop_longest_running_reconcile_seconds{shard}`.
    pub longest_running: Family<ShardLabel, FloatGauge>,
    /// `shardop_reconcile_retries_total{shard}`.
    pub retries: Family<ShardLabel, Counter>,
    /// `shardop_terminating_objects{shard}`.
    pub terminating: Family<ShardLabel, Gauge>,
    /// `shardop_queue_wait_seconds{shard}`.
    pub queue_wait: Family<ShardLabel, Histogram, fn() -> Histogram>,
    /// `shardop_reconcile_lag_seconds{shard}`.
    pub reconcile_lag: Family<ShardLabel, Histogram, fn() -> Histogram>,
    /// `shardop_oldest_unconverged_seconds{shard}`.
    pub oldest_unconverged: Family<ShardLabel, FloatGauge>,
    /// `shardop_shard_objects{shard}`.
    pub shard_objects: Family<ShardLabel, Gauge>,
    /// `shardop_shard_leader{shard}`.
    pub shard_leader: Family<ShardLabel, Gauge>,
    /// `shardop_drains_total{shard}`.
    pub drains: Family<ShardLabel, Counter>,
    /// `shardop_reconciles_total{shard,action}`-like count of reconcile starts, used by
    /// the e2e tests to prove "no requeue storm": `shardop_reconcile_runs_total{shard}`.
    pub runs: Family<ShardLabel, Counter>,
    /// Every `reason` of `shardop_reconcile_errors_total`, created at zero per shard.
    error_reasons: &'static [&'static str],
}

impl std::fmt::Debug for ShardMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardMetrics")
            .field("error_reasons", &self.error_reasons)
            .finish_non_exhaustive()
    }
}

impl ShardMetrics {
    /// Creates and registers every per-shard metric, with the error reasons
    /// [`DEFAULT_ERROR_REASONS`].
    pub fn register(registry: &mut Registry) -> Self {
        Self::register_with_reasons(registry, &DEFAULT_ERROR_REASONS)
    }

    /// Creates and registers every per-shard metric; `error_reasons` are the values of the
    /// `reason` label the controller's errors use, each created at zero for every shard.
    pub fn register_with_reasons(
        registry: &mut Registry,
        error_reasons: &'static [&'static str],
    ) -> Self {
        let metrics = Self {
            error_reasons,
            reconcile_duration: Family::new_with_constructor(histogram_1ms_to_16s),
            reconcile_errors: Family::default(),
            queue_depth: Family::default(),
            backlog: Family::default(),
            longest_running: Family::default(),
            retries: Family::default(),
            terminating: Family::default(),
            queue_wait: Family::new_with_constructor(lag_histogram),
            reconcile_lag: Family::new_with_constructor(lag_histogram),
            oldest_unconverged: Family::default(),
            shard_objects: Family::default(),
            shard_leader: Family::default(),
            drains: Family::default(),
            runs: Family::default(),
        };
        registry.register(
            "shardop_reconcile_duration_seconds",
            "Duration of reconciles by shard and result",
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "shardop_reconcile_errors",
            "Failed reconciles by shard and reason",
            metrics.reconcile_errors.clone(),
        );
        registry.register(
            "shardop_queue_depth",
            "Objects waiting for a reconcile",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "shardop_backlog_objects",
            "Objects whose observedGeneration is behind their generation",
            metrics.backlog.clone(),
        );
        registry.register(
            "shardop_longest_running_reconcile_seconds",
            "Age of the oldest reconcile still running",
            metrics.longest_running.clone(),
        );
        registry.register(
            "shardop_reconcile_retries",
            "Reconciles requeued with backoff after a transient error",
            metrics.retries.clone(),
        );
        registry.register(
            "shardop_terminating_objects",
            "Objects with a deletion timestamp waiting for cleanup",
            metrics.terminating.clone(),
        );
        registry.register(
            "shardop_queue_wait_seconds",
            "Time from an object's first unhandled event to the start of its reconcile",
            metrics.queue_wait.clone(),
        );
        registry.register(
            "shardop_reconcile_lag_seconds",
            "Time from seeing a spec change to having converged it",
            metrics.reconcile_lag.clone(),
        );
        registry.register(
            "shardop_oldest_unconverged_seconds",
            "Age of the oldest spec change the shard is still working on (Degraded objects excluded)",
            metrics.oldest_unconverged.clone(),
        );
        registry.register(
            "shardop_shard_objects",
            "Objects in the shard's cache",
            metrics.shard_objects.clone(),
        );
        registry.register(
            "shardop_shard_leader",
            "1 while this process holds the shard's Lease",
            metrics.shard_leader.clone(),
        );
        registry.register(
            "shardop_drains",
            "Drain acknowledgements (objects handed to the assigner for a move)",
            metrics.drains.clone(),
        );
        registry.register(
            "shardop_reconcile_runs",
            "Reconciles started",
            metrics.runs.clone(),
        );
        metrics
    }

    /// The `{shard}` label of a shard.
    pub fn shard(shard: ShardIndex) -> ShardLabel {
        ShardLabel {
            shard: shard.label_value(),
        }
    }

    /// Creates the counters of a shard at zero, so dashboards and alerts see a series (and
    /// `rate()` a starting point) before the first error or retry happens.
    pub fn start_shard(&self, shard: ShardIndex) {
        let label = Self::shard(shard);
        self.retries.get_or_create(&label).inc_by(0);
        self.drains.get_or_create(&label).inc_by(0);
        self.runs.get_or_create(&label).inc_by(0);
        for &reason in self.error_reasons {
            self.reconcile_errors
                .get_or_create(&ReasonLabels {
                    shard: label.shard.clone(),
                    reason,
                })
                .inc_by(0);
        }
    }

    /// Records one finished reconcile of `shard`: its duration under `result`
    /// (`success`, `error`, or a controller's own outcome such as `skipped`).
    pub fn record_reconcile(&self, shard: ShardIndex, result: &'static str, took: Duration) {
        self.reconcile_duration
            .get_or_create(&ResultLabels {
                shard: shard.label_value(),
                result,
            })
            .observe(took.as_secs_f64());
    }

    /// Records a failed reconcile of `shard` with error class `reason`; `retried`: it is
    /// requeued with backoff (counted in `shardop_reconcile_retries_total`).
    pub fn record_error(&self, shard: ShardIndex, reason: &'static str, retried: bool) {
        self.reconcile_errors
            .get_or_create(&ReasonLabels {
                shard: shard.label_value(),
                reason,
            })
            .inc();
        if retried {
            self.retries.get_or_create(&Self::shard(shard)).inc();
        }
    }

    /// Records how long a spec change of `shard` took to converge.
    pub fn record_lag(&self, shard: ShardIndex, lag: Duration) {
        self.reconcile_lag
            .get_or_create(&Self::shard(shard))
            .observe(lag.as_secs_f64());
    }

    /// Publishes the gauges of a served shard.
    pub fn publish_load(&self, shard: ShardIndex, load: &ShardLoad) {
        let label = Self::shard(shard);
        self.shard_objects.get_or_create(&label).set(load.objects);
        self.backlog.get_or_create(&label).set(load.backlog);
        self.terminating.get_or_create(&label).set(load.terminating);
        self.queue_depth.get_or_create(&label).set(load.queue_depth);
        self.longest_running
            .get_or_create(&label)
            .set(load.longest_running.as_secs_f64());
        self.oldest_unconverged
            .get_or_create(&label)
            .set(load.oldest_unconverged.as_secs_f64());
        self.shard_leader.get_or_create(&label).set(1);
    }

    /// Resets the gauges of a shard this process stopped serving.
    pub fn forget_shard(&self, shard: ShardIndex) {
        let label = Self::shard(shard);
        self.queue_depth.get_or_create(&label).set(0);
        self.backlog.get_or_create(&label).set(0);
        self.longest_running.get_or_create(&label).set(0.0);
        self.oldest_unconverged.get_or_create(&label).set(0.0);
        self.terminating.get_or_create(&label).set(0);
        self.shard_objects.get_or_create(&label).set(0);
        self.shard_leader.get_or_create(&label).set(0);
    }
}

/// What a served shard reports about its objects, for the gauges and the Shard heartbeat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardLoad {
    /// Objects in the shard's cache (`shardop_shard_objects`).
    pub objects: i64,
    /// Objects behind their generation (`shardop_backlog_objects`, Shard `backlog`).
    pub backlog: i64,
    /// Objects being deleted (`shardop_terminating_objects`).
    pub terminating: i64,
    /// Objects waiting for a reconcile (`shardop_queue_depth`, Shard `queueDepth`).
    pub queue_depth: i64,
    /// Age of the oldest reconcile still running.
    pub longest_running: Duration,
    /// Age of the oldest spec change not converged yet.
    pub oldest_unconverged: Duration,
}
