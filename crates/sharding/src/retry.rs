//! How both binaries retry while the API server does not answer: exponential backoff with
//! jitter, capped.
//!
//! The worker's supervisor and the assigner's start-up (and the streaming-list probe) wait
//! `base × 2^(n−1)` after the n-th consecutive failure, at most `cap`, drawn uniformly from
//! the upper half of that delay ("equal jitter"): processes that lost the API server at
//! the same moment spread their retries out instead of returning in lockstep, and no delay
//! ever exceeds the cap. A success starts the schedule over.

use std::time::Duration;

/// First delay of [`RetrySchedule::api_default`].
pub const API_RETRY_BASE: Duration = Duration::from_secs(1);
/// Upper bound of [`RetrySchedule::api_default`].
pub const API_RETRY_CAP: Duration = Duration::from_secs(30);

/// `base × 2^(failures−1)`, at most `cap`: the delay after the n-th consecutive failure
/// (`failures` ≥ 1; 0 counts as 1), without overflow however many failures there were.
/// Every backoff of shardop has this shape; they differ in base, cap and jitter.
pub fn doubling_delay(base: Duration, cap: Duration, failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(30);
    base.checked_mul(1_u32 << exponent).unwrap_or(cap).min(cap)
}

/// The delays between consecutive failed attempts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrySchedule {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl RetrySchedule {
    /// A schedule starting at `base`, doubling up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            failures: 0,
        }
    }

    /// 1 s, doubling up to 30 s: the schedule both binaries use against the API server.
    pub fn api_default() -> Self {
        Self::new(API_RETRY_BASE, API_RETRY_CAP)
    }

    /// Delay after `failures` consecutive failures (≥ 1), before jitter.
    pub fn delay(&self, failures: u32) -> Duration {
        doubling_delay(self.base, self.cap, failures)
    }

    /// Records one more failure and returns how long to wait before the next attempt,
    /// jittered with `unit` in `[0, 1)`: a delay in `[d/2, d]` of the un-jittered `d`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = self.delay(self.failures);
        delay.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A cheap pseudo-random number in `[0, 1)` for jitter (no need for a crypto RNG).
pub fn jitter_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos()
            .into(),
    );
    (hasher.finish() >> 11) as f64 / (1_u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_one_second_up_to_thirty() {
        let schedule = RetrySchedule::api_default();
        let delays: Vec<u64> = (1..=8).map(|n| schedule.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(schedule.delay(u32::MAX), API_RETRY_CAP);
    }

    #[test]
    fn jitter_stays_in_the_upper_half_and_never_passes_the_cap() {
        let mut schedule = RetrySchedule::api_default();
        assert_eq!(schedule.next_delay(0.0), Duration::from_millis(500));
        assert_eq!(schedule.next_delay(1.0), Duration::from_secs(2));
        for _ in 0..100 {
            let delay = schedule.next_delay(jitter_unit());
            assert!(delay >= API_RETRY_CAP / 2 || schedule.failures() < 6);
            assert!(delay <= API_RETRY_CAP, "{delay:?}");
        }
        for _ in 0..100 {
            assert!((0.0..1.0).contains(&jitter_unit()));
        }
    }

    #[test]
    fn a_success_starts_over() {
        let mut schedule = RetrySchedule::api_default();
        for _ in 0..10 {
            schedule.next_delay(1.0);
        }
        assert_eq!(schedule.failures(), 10);
        schedule.reset();
        assert_eq!(schedule.next_delay(1.0), API_RETRY_BASE);
    }

    #[test]
    fn a_cap_below_the_base_is_the_base() {
        let schedule = RetrySchedule::new(Duration::from_secs(5), Duration::from_secs(1));
        assert_eq!(schedule.delay(3), Duration::from_secs(5));
    }
}
