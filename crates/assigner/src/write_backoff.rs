//! How long an object whose label write failed is left alone: per object, doubling from
//! [`BASE`] up to [`CAP`] with jitter, and forgotten on the next successful write. A write
//! the API server refuses for good (a validating webhook, a 422, missing RBAC) thus costs
//! a few writes an hour instead of one every two seconds, and is logged at its first
//! failure and then only at the cap. Failures without a response (the API server
//! unreachable) wait at most [`TRANSPORT_CAP`], so the end of an outage is picked up soon,
//! and are logged at debug: the reachability tracker reports the outage once.

use std::collections::HashMap;
use std::time::Duration;

use shardop_runtime::reachability::is_transport_error;
use shardop_runtime::retry::{API_RETRY_CAP, RetrySchedule};

use crate::objects::ObjectKey;

/// The hold after an object's first failed label write.
pub const BASE: Duration = Duration::from_secs(2);
/// The longest hold after failed label writes.
pub const CAP: Duration = Duration::from_secs(300);
/// The longest hold after writes that got no response.
pub const TRANSPORT_CAP: Duration = API_RETRY_CAP;

/// The consecutive label-write failures of each object.
#[derive(Default)]
pub struct WriteBackoff {
    failures: HashMap<ObjectKey, RetrySchedule>,
}

/// What to do after one failed write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failed {
    /// How long the object is left alone.
    pub hold: Duration,
    /// Whether the failure is worth a warning (see the module docs).
    pub warn: bool,
}

impl WriteBackoff {
    /// Records a failed write of `key`; `unit` in `[0, 1)` jitters the hold.
    pub fn failed(&mut self, key: &ObjectKey, error: &kube::Error, unit: f64) -> Failed {
        let schedule = self
            .failures
            .entry(key.clone())
            .or_insert_with(|| RetrySchedule::new(BASE, CAP));
        let hold = schedule.next_delay(unit);
        let failures = schedule.failures();
        if is_transport_error(error) {
            return Failed {
                hold: hold.min(TRANSPORT_CAP),
                warn: false,
            };
        }
        Failed {
            hold,
            warn: failures == 1 || schedule.delay(failures) >= CAP,
        }
    }

    /// A write of `key` succeeded: its next failure starts over at [`BASE`].
    pub fn succeeded(&mut self, key: &ObjectKey) {
        self.failures.remove(key);
    }

    /// Forgets the objects `exists` says are gone.
    pub fn retain(&mut self, mut exists: impl FnMut(&ObjectKey) -> bool) {
        self.failures.retain(|key, _| exists(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ObjectKey {
        ObjectKey {
            kind: 0,
            namespace: "ns".into(),
            name: "db".into(),
        }
    }

    fn denied() -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("denied by the policy webhook", "Forbidden")
                .with_code(403)
                .boxed(),
        )
    }

    #[test]
    fn repeated_failures_hold_an_object_longer_until_a_write_succeeds() {
        let mut backoff = WriteBackoff::default();
        let first = backoff.failed(&key(), &denied(), 0.99);
        backoff.failed(&key(), &denied(), 0.99);
        let third = backoff.failed(&key(), &denied(), 0.99);
        assert!(third.hold > first.hold, "{third:?} after {first:?}");
        assert!(
            first.warn && !third.warn,
            "warned at the first failure only"
        );
        // 16 s to 256 s quietly, then a warning at each failure at the 5-minute cap.
        let later: Vec<Failed> = (4..=10)
            .map(|_| backoff.failed(&key(), &denied(), 0.99))
            .collect();
        let warned: Vec<bool> = later.iter().map(|f| f.warn).collect();
        assert_eq!(warned, [false, false, false, false, false, true, true]);
        assert!(later.iter().all(|f| f.hold <= CAP));
        backoff.succeeded(&key());
        assert_eq!(backoff.failed(&key(), &denied(), 0.99), first);
    }

    #[test]
    fn failures_without_a_response_are_quiet_and_wait_less() {
        let mut backoff = WriteBackoff::default();
        let unreachable = kube::Error::Service(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        for _ in 0..20 {
            let failed = backoff.failed(&key(), &unreachable, 0.99);
            assert!(!failed.warn && failed.hold <= TRANSPORT_CAP, "{failed:?}");
        }
    }
}
