//! The webhook's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of `shardop_assigner_webhook_reviews_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabel {
    /// `stamped`, or why the object was left to the watch path (`labelled`, `no_name`,
    /// `not_ready`, `no_live_shard`), `not_ours` or `unreadable`.
    pub verdict: &'static str,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct WebhookMetrics {
    pub reviews: Family<VerdictLabel, Counter>,
    pub seconds: Histogram,
    pub certificate_writes: Counter,
}

impl WebhookMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            reviews: Family::default(),
            // 0.1 ms .. ~0.8 s.
            seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 14)),
            certificate_writes: Counter::default(),
        };
        registry.register(
            "shardop_assigner_webhook_reviews",
            "AdmissionReviews answered, by verdict",
            metrics.reviews.clone(),
        );
        registry.register(
            "shardop_assigner_webhook_review_seconds",
            "Time to answer one AdmissionReview (after the request body was read)",
            metrics.seconds.clone(),
        );
        registry.register(
            "shardop_assigner_webhook_certificate_writes",
            "Writes of the webhook's certificate Secret (creation and rotations)",
            metrics.certificate_writes.clone(),
        );
        metrics
    }
}
