//! The assigner's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of `shardop_assigner_moves_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// `drain` (phase 1 requested), `complete` (phase 2: stamped after the acknowledgement),
    /// `direct` (relabelled off a fenced shard), `cancel` (drain withdrawn).
    pub phase: &'static str,
}

/// Label of `shardop_assigner_shard_objects`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    /// The shard index.
    pub shard: String,
}

/// Every metric the assigner exports. Cheap to clone.
#[derive(Clone)]
pub struct AssignerMetrics {
    pub desired_shards: Gauge,
    pub effective_shards: Gauge,
    pub is_leader: Gauge,
    pub assignments: Counter,
    pub moves: Family<PhaseLabel, Counter>,
    pub moves_in_flight: Gauge,
    pub move_duration: Histogram,
    pub assignment_latency: Histogram,
    pub unowned_wait: Histogram,
    pub unassigned_objects: Gauge,
    pub shard_objects: Family<ShardLabel, Gauge>,
    pub conflicts: Counter,
    pub oldest_unassigned_seconds: Gauge,
    pub stalled_moves: Gauge,
    pub rereads: Counter,
}

impl AssignerMetrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            desired_shards: Gauge::default(),
            effective_shards: Gauge::default(),
            is_leader: Gauge::default(),
            assignments: Counter::default(),
            moves: Family::default(),
            moves_in_flight: Gauge::default(),
            // 50 ms .. ~7 min: a move waits for a worker's acknowledgement.
            move_duration: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            // 10 ms .. ~80 s: a creation storm queues behind the client rate limit.
            assignment_latency: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            // 0.1 ms .. ~13 s: the assigner's own time is sub-millisecond unless its write
            // budget or a pass holds an object back.
            unowned_wait: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            unassigned_objects: Gauge::default(),
            shard_objects: Family::default(),
            conflicts: Counter::default(),
            oldest_unassigned_seconds: Gauge::default(),
            stalled_moves: Gauge::default(),
            rereads: Counter::default(),
        };
        let m = metrics.clone();
        registry.register(
            "shardop_assigner_desired_shards",
            "Desired shard count N (worker StatefulSet replicas or --shards)",
            m.desired_shards,
        );
        registry.register(
            "shardop_assigner_effective_shards",
            "Effective shard count E objects are hashed with (shards acquired at least once)",
            m.effective_shards,
        );
        registry.register(
            "shardop_assigner_is_leader",
            "1 while this replica is the leader",
            m.is_leader,
        );
        registry.register(
            "shardop_assigner_assignments",
            "Shard labels stamped on objects that had none (new, acknowledged or repaired)",
            m.assignments,
        );
        registry.register(
            "shardop_assigner_moves",
            "Steps of moves between shards, by phase",
            m.moves,
        );
        registry.register(
            "shardop_assigner_moves_in_flight",
            "Objects between the start of a move and their new shard label",
            m.moves_in_flight,
        );
        registry.register(
            "shardop_assigner_move_duration_seconds",
            "Time from the start of a move to the new shard label",
            m.move_duration,
        );
        registry.register(
            "shardop_assigner_assignment_latency_seconds",
            "Time from an object's creation to its first shard label",
            m.assignment_latency,
        );
        registry.register(
            "shardop_assigner_unowned_wait_seconds",
            "Time from the watch event that showed an object without a valid owner to the start of the label write that gives it one",
            m.unowned_wait,
        );
        registry.register(
            "shardop_assigner_unassigned_objects",
            "Objects without a valid shard label",
            m.unassigned_objects,
        );
        registry.register(
            "shardop_assigner_shard_objects",
            "Objects carrying each shard label",
            m.shard_objects,
        );
        registry.register(
            "shardop_assigner_label_conflicts",
            "Label writes rejected by their resourceVersion precondition (409)",
            m.conflicts,
        );
        registry.register(
            "shardop_assigner_oldest_unassigned_seconds",
            "How long the object longest without a valid shard label has been so",
            m.oldest_unassigned_seconds,
        );
        registry.register(
            "shardop_assigner_stalled_moves",
            "Moves without their next step for a minute or more",
            m.stalled_moves,
        );
        registry.register(
            "shardop_assigner_stalled_move_rereads",
            "Re-reads of a stalled move's object that brought a newer version than the watch had",
            m.rereads,
        );
        metrics
    }

    /// Counts one move step.
    pub fn move_step(&self, phase: &'static str) {
        self.moves.get_or_create(&PhaseLabel { phase }).inc();
    }
}
