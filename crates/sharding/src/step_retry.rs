//! When the supervisor may run its next step after a failed one, and how a failure is
//! logged.
//!
//! A step that failed because the API server is unreachable or failing (no response, 5xx,
//! 429) waits out [`RetrySchedule::api_default`] (1 s doubling to 30 s, jittered) instead
//! of the supervisor's one-second tick, and logs at `debug` when no response arrived (the
//! outage itself is logged once by [`crate::reachability`]); once the API server
//! answers again (a watch reconnected) the next step runs at once. Any other failure
//! (a 409 from a Lease race, a 403) is part of the protocol's normal traffic: it is retried
//! at the next tick as before, so hand-backs and takeovers keep their pace, and logged at
//! `warn` at most once per [`OTHER_FAILURE_LOG_INTERVAL`] with the count since (a 403 that
//! persists, say a missing RBAC rule, would otherwise log a line every second).

use std::time::Duration;

use crate::reachability::{error_chain, is_transport_error};
use crate::retry::{RetrySchedule, jitter_unit};
use tokio::time::Instant;

/// At most one `warn` line per this interval for step failures that are retried at the
/// next tick.
pub const OTHER_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// How a step failed, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// No response arrived.
    Unreachable,
    /// The API server answered 5xx or 429.
    ServerTrouble,
    /// Anything else (conflicts, forbidden, invalid).
    Other,
}

impl FailureKind {
    /// Classifies the first kube error in `error`'s chain (`error` itself included).
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Self {
        let chain = std::iter::successors(Some(error), |e| e.source());
        let Some(kube_error) = chain
            .into_iter()
            .find_map(|e| e.downcast_ref::<kube::Error>())
        else {
            return Self::Other;
        };
        match kube_error {
            e if is_transport_error(e) => Self::Unreachable,
            kube::Error::Api(status) if status.code >= 500 || status.code == 429 => {
                Self::ServerTrouble
            }
            _ => Self::Other,
        }
    }
}

/// The supervisor's retry state.
#[derive(Debug)]
pub struct StepRetry {
    schedule: RetrySchedule,
    next: Option<Instant>,
    waiting_for_api: bool,
    /// Failures retried at the next tick since the last success, and when one was last
    /// logged at `warn`.
    other_failures: u32,
    other_logged_at: Option<Instant>,
}

impl Default for StepRetry {
    fn default() -> Self {
        Self {
            schedule: RetrySchedule::api_default(),
            next: None,
            waiting_for_api: false,
            other_failures: 0,
            other_logged_at: None,
        }
    }
}

impl StepRetry {
    /// Whether a step may run at `now`. `api_reachable`: the API server answered since
    /// (a watch reconnected): a step that failed for want of an answer need not wait out
    /// its backoff.
    pub fn is_due(&self, now: Instant, api_reachable: bool) -> bool {
        self.next
            .is_none_or(|next| now >= next || (self.waiting_for_api && api_reachable))
    }

    /// A step succeeded: the next one runs at the next tick.
    pub fn succeeded(&mut self) {
        if self.schedule.failures() > 0 {
            tracing::info!(
                failures = self.schedule.failures(),
                "supervisor steps succeed again"
            );
        }
        if self.other_failures > 1 {
            tracing::info!(
                failures = self.other_failures,
                "supervisor steps succeed again"
            );
        }
        self.schedule.reset();
        self.next = None;
        self.waiting_for_api = false;
        self.other_failures = 0;
        self.other_logged_at = None;
    }

    /// Counts a failure retried at the next tick and says whether to log it at `warn`:
    /// the first one, then at most one per [`OTHER_FAILURE_LOG_INTERVAL`].
    fn log_other_failure(&mut self, now: Instant) -> bool {
        self.other_failures = self.other_failures.saturating_add(1);
        let due = self
            .other_logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= OTHER_FAILURE_LOG_INTERVAL);
        if due {
            self.other_logged_at = Some(now);
        }
        due
    }

    /// A step failed at `now`; returns the delay before the next one (zero: next tick).
    pub fn failed(&mut self, error: &(dyn std::error::Error + 'static), now: Instant) -> Duration {
        self.failed_with(FailureKind::of(error), error, now, jitter_unit())
    }

    fn failed_with(
        &mut self,
        kind: FailureKind,
        error: &(dyn std::error::Error + 'static),
        now: Instant,
        unit: f64,
    ) -> Duration {
        let cause = error_chain(error);
        if kind == FailureKind::Other {
            self.schedule.reset();
            self.next = None;
            self.waiting_for_api = false;
            let failures = self.other_failures.saturating_add(1);
            if self.log_other_failure(now) {
                tracing::warn!(error = %cause, failures, "supervisor step failed");
            } else {
                tracing::debug!(error = %cause, failures, "supervisor step failed");
            }
            return Duration::ZERO;
        }
        let delay = self.schedule.next_delay(unit);
        self.next = Some(now + delay);
        self.waiting_for_api = kind == FailureKind::Unreachable;
        let failures = self.schedule.failures();
        let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        if kind == FailureKind::Unreachable {
            tracing::debug!(error = %cause, failures, retry_in_ms, "supervisor step failed: API server unreachable");
        } else {
            tracing::warn!(error = %cause, failures, retry_in_ms, "supervisor step failed: API server error, backing off");
        }
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step error with a kube error as its source, as the supervisor's errors are.
    #[derive(Debug, thiserror::Error)]
    enum StepError {
        #[error("acquiring shard 1")]
        Kube(#[source] kube::Error),
        #[error("no kube error")]
        Other,
    }

    fn refused() -> StepError {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        StepError::Kube(kube::Error::Service(Box::new(io)))
    }

    fn status(code: u16) -> StepError {
        let mut status = kube::core::Status::failure("boom", "Boom");
        status.code = code;
        StepError::Kube(kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn failures_are_classified_by_their_kube_error() {
        assert_eq!(FailureKind::of(&refused()), FailureKind::Unreachable);
        assert_eq!(FailureKind::of(&status(503)), FailureKind::ServerTrouble);
        assert_eq!(FailureKind::of(&status(429)), FailureKind::ServerTrouble);
        assert_eq!(FailureKind::of(&status(409)), FailureKind::Other);
        assert_eq!(FailureKind::of(&StepError::Other), FailureKind::Other);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_api_server_backs_off_to_thirty_seconds() {
        let mut retry = StepRetry::default();
        let start = Instant::now();
        assert!(retry.is_due(start, false));
        let mut now = start;
        let mut delays = Vec::new();
        for _ in 0..8 {
            assert!(retry.is_due(now, false));
            let delay = retry.failed_with(FailureKind::Unreachable, &refused(), now, 1.0);
            assert!(!retry.is_due(now + delay - Duration::from_millis(1), false));
            delays.push(delay.as_secs());
            now += delay;
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        // Over a six-minute outage that is a dozen attempts, not 360.
        assert!(
            retry.is_due(now - Duration::from_secs(20), true),
            "the API server answers again: no need to wait out the backoff"
        );
        retry.succeeded();
        assert!(retry.is_due(now, false));
        let delay = retry.failed_with(FailureKind::ServerTrouble, &status(500), now, 0.0);
        assert_eq!(delay, Duration::from_millis(500), "starts over, jittered");
        assert!(
            !retry.is_due(now, true),
            "a 5xx came with an answer: the backoff holds"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn protocol_failures_keep_the_tick() {
        let mut retry = StepRetry::default();
        let now = Instant::now();
        retry.failed_with(FailureKind::Unreachable, &refused(), now, 1.0);
        let delay = retry.failed_with(FailureKind::Other, &status(409), now, 1.0);
        assert_eq!(delay, Duration::ZERO);
        assert!(
            retry.is_due(now, false),
            "a conflict is retried at the next tick"
        );
    }

    #[test]
    fn a_failure_that_persists_is_logged_once_per_interval() {
        let mut retry = StepRetry::default();
        let start = Instant::now();
        let logged: Vec<bool> = (0..61)
            .map(|second| retry.log_other_failure(start + Duration::from_secs(second)))
            .collect();
        // One step a second for a minute: logged at 0 s, 30 s and 60 s.
        let at: Vec<usize> = logged
            .iter()
            .enumerate()
            .filter_map(|(second, logged)| logged.then_some(second))
            .collect();
        assert_eq!(at, [0, 30, 60]);
        assert_eq!(retry.other_failures, 61);
        retry.succeeded();
        assert!(retry.log_other_failure(start + Duration::from_secs(61)));
    }
}
