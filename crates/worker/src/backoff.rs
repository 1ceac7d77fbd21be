//! Per-object exponential backoff for transient reconcile errors (kube-runtime has none
//! built in: its error policy only returns one requeue delay).
//!
//! The n-th consecutive failure of an object waits `base × 2^(n−1)`, capped, with ±10 %
//! jitter so objects that failed together (an API server blip) do not retry in lockstep.
//! A success forgets the object's failures.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

/// Shape of the backoff.
#[derive(Clone, Copy, Debug)]
pub struct BackoffPolicy {
    /// Delay after the first failure.
    pub base: Duration,
    /// Upper bound of the delay.
    pub cap: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(300),
        }
    }
}

impl BackoffPolicy {
    /// Delay after `failures` consecutive failures (≥ 1), before jitter.
    pub fn delay(&self, failures: u32) -> Duration {
        shardop_runtime::retry::doubling_delay(self.base, self.cap, failures)
    }

    /// `delay` spread by ±10 % using `unit` in `[0, 1)` as the random draw.
    pub fn jittered(&self, failures: u32, unit: f64) -> Duration {
        self.delay(failures)
            .mul_f64(0.9 + 0.2 * unit.clamp(0.0, 1.0))
    }
}

/// Consecutive failure counts per object key.
#[derive(Debug, Default)]
pub struct FailureCounts<K> {
    counts: Mutex<HashMap<K, u32>>,
}

impl<K: Eq + Hash> FailureCounts<K> {
    /// Records a failure and returns the number of consecutive failures so far.
    pub fn record_failure(&self, key: K) -> u32 {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(key).or_insert(0);
        *count = count.saturating_add(1);
        *count
    }

    /// The consecutive failures of `key` so far: 0 when none since its last success.
    pub fn count(&self, key: &K) -> u32 {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Forgets the failures of `key` after a success.
    pub fn reset(&self, key: &K) {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

pub use shardop_runtime::retry::jitter_unit;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_failures_until_a_success() {
        let counts = FailureCounts::default();
        assert_eq!(counts.count(&"a"), 0);
        assert_eq!(counts.record_failure("a"), 1);
        assert_eq!(counts.record_failure("a"), 2);
        assert_eq!(counts.count(&"a"), 2);
        assert_eq!(counts.count(&"b"), 0);
        counts.reset(&"a");
        assert_eq!(counts.count(&"a"), 0);
    }

    #[test]
    fn doubles_up_to_the_cap() {
        let policy = BackoffPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        };
        let delays: Vec<u64> = (1..=8).map(|n| policy.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(policy.delay(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let policy = BackoffPolicy::default();
        assert_eq!(policy.jittered(1, 0.0), Duration::from_millis(450));
        assert_eq!(policy.jittered(1, 1.0), Duration::from_millis(550));
        for _ in 0..100 {
            let unit = jitter_unit();
            assert!((0.0..1.0).contains(&unit));
        }
    }

    #[test]
    fn success_resets_the_count() {
        let counts = FailureCounts::default();
        assert_eq!(counts.record_failure("a"), 1);
        assert_eq!(counts.record_failure("a"), 2);
        assert_eq!(counts.record_failure("b"), 1);
        counts.reset(&"a");
        assert_eq!(counts.record_failure("a"), 1);
    }
}
