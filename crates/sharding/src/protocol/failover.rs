//! The worker's half of the protocol about shard Leases: which Leases a worker acquires,
//! asks back, or lets go, and how long a stopping shard's reconciles may go on (no I/O).
//!
//! This is the worker's column of "Lease transitions" in `docs/shard-protocol.md`; the
//! Lease state itself is judged by [`super::lease`]. The worker's half about objects
//! (reconcile, acknowledge a drain, clean up, ignore) is [`super::worker_action`].

use std::time::Duration;

use super::lease::{LeaseSnapshot, LeaseState};
use crate::shard_index::ShardIndex;
use jiff::{SignedDuration, Timestamp};

/// What the worker does about a shard it does not serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquisition {
    /// Try to acquire the Lease now.
    Acquire,
    /// Ask the current holder to hand the home shard back (set the annotation).
    RequestHandBack,
    /// Nothing yet (held by someone else, retired, or the takeover stagger is not over).
    Wait,
}

/// The worker's situation.
#[derive(Clone, Debug)]
pub struct Me<'a> {
    /// Holder identity (pod name).
    pub identity: &'a str,
    /// The pod ordinal: the home shard, unless a shard's Lease names another home worker
    /// ([`LeaseSnapshot::home_worker`]).
    pub home: ShardIndex,
    /// Lease duration, for "released long enough ago".
    pub lease_duration: Duration,
    /// Retry period, the unit of the takeover stagger.
    pub retry_period: Duration,
}

/// Ring distance from `shard` forward to `home` among `shards` shards: the worker right
/// after a dead shard is at distance 1 and goes first.
pub fn ring_distance(shard: ShardIndex, home: ShardIndex, shards: u32) -> u32 {
    let n = shards.max(1);
    (home.0 % n + n - shard.0 % n) % n
}

/// Whether this worker is home for `shard`, whose Lease is `lease` (`None` = absent): the
/// worker the Lease names, else the worker whose ordinal is the shard's index.
pub fn is_home(me: &Me<'_>, shard: ShardIndex, lease: Option<&LeaseSnapshot>) -> bool {
    lease.map_or(shard, |l| l.home_of(shard)) == me.home
}

/// Decides about shard `shard`'s Lease (`None` = absent) at wall-clock `now`.
/// `ring` is the number of worker ordinals known (for the stagger): the highest home
/// worker any Lease names (a shard's own index where none is named), plus one.
pub fn acquisition(
    me: &Me<'_>,
    shard: ShardIndex,
    lease: Option<&LeaseSnapshot>,
    ring: u32,
    now: Timestamp,
) -> Acquisition {
    let home = is_home(me, shard, lease);
    let Some(lease) = lease else {
        // Only the home worker creates a shard's first Lease: a shard nobody ever served
        // is not part of the desired count yet (expansion gating).
        return if home {
            Acquisition::Acquire
        } else {
            Acquisition::Wait
        };
    };
    if lease.retired {
        // Workers never take over a retired shard, and a home worker whose shard is
        // retired is on its way out: it keeps what it holds but acquires nothing.
        return Acquisition::Wait;
    }
    let state = lease.state(now);
    if home {
        return match state {
            LeaseState::Held { holder } if holder != me.identity => {
                if lease.release_requested_by.as_deref() == Some(me.identity) {
                    Acquisition::Wait
                } else {
                    Acquisition::RequestHandBack
                }
            }
            // Absent, Released, Expired, or held by a previous incarnation of this pod.
            _ => Acquisition::Acquire,
        };
    }
    // Ordered by distance from the shard's home worker, so the worker right after it goes
    // first whichever shards it was home for.
    let stagger =
        me.retry_period
            .saturating_mul(ring_distance(lease.home_of(shard), me.home, ring));
    let free_since = match state {
        LeaseState::Held { holder } if holder == me.identity => return Acquisition::Acquire,
        LeaseState::Held { .. } | LeaseState::Absent => return Acquisition::Wait,
        // Expired: the holder stopped renewing at `expires_at`.
        LeaseState::Expired { .. } => lease.expires_at(),
        // Released on purpose: wait 2 × lease duration for its home worker to come back.
        // The releaser stamps renewTime with the release time.
        LeaseState::Released => lease.renew_time.and_then(|released| {
            let grace = SignedDuration::try_from(me.lease_duration.saturating_mul(2)).ok()?;
            released.checked_add(grace).ok()
        }),
    };
    let Some(free_since) = free_since else {
        // No usable timestamps: judge it free now, after the stagger like everyone else.
        return Acquisition::Wait;
    };
    let due = SignedDuration::try_from(stagger)
        .ok()
        .and_then(|s| free_since.checked_add(s).ok());
    match due {
        Some(due) if now >= due => Acquisition::Acquire,
        _ => Acquisition::Wait,
    }
}

/// How many times one step writes a shard Lease (acquire, hand-back request) that keeps
/// changing under it (409): each attempt reads the Lease afresh and decides again. The
/// holder renews every retry period, so one retry is almost always enough; the next step
/// starts over anyway.
pub const LEASE_WRITE_ATTEMPTS: usize = 3;

/// Why the controller of a served shard is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The Lease is gone (renew deadline passed, or someone else holds it).
    LeaseLost,
    /// Its home worker asked for it back (or it is retired).
    HandBack,
    /// The process is shutting down (SIGTERM).
    Shutdown,
}

/// How long in-flight reconciles of a stopping shard may go on before they are aborted.
///
/// * Lease lost: not at all. The fenced client has refused or cancelled every write
///   already, so nothing left can finish usefully; aborting at once also hands the tokens
///   of waiting writes back to the bucket.
/// * Hand-back: at most half a Lease duration. The home worker waits for this release, and
///   must have its shard back within 2 × the Lease duration whatever this worker's client
///   budget (a throttled worker's reconciles may queue for far longer than that).
/// * Shutdown: the full `--shutdown-timeout`.
pub fn stop_grace(reason: StopReason, me: &Me<'_>, shutdown_timeout: Duration) -> Duration {
    match reason {
        StopReason::LeaseLost => Duration::ZERO,
        StopReason::HandBack => shutdown_timeout.min(me.lease_duration / 2),
        StopReason::Shutdown => shutdown_timeout,
    }
}

/// How long the holder of a stopped shard still waits before it releases the Lease, when
/// a write for the shard was last abandoned `since_abandoned` ago (`None`: never) — given
/// up on while it may have been on the wire, or aborted with the controller after the stop
/// grace ran out.
///
/// Aborting a request does not un-send it: the API server may still apply a write queued
/// behind others (priority and fairness, a slow webhook). A released Lease is acquired by
/// its home worker at once, so releasing right away could let such a write land after the
/// next holder started. The wait is the margin that protects expiry the same way
/// (`lease_duration − renew_deadline`, see "Fencing" in `docs/shard-protocol.md`), counted
/// from the abandonment. After a clean stop nothing is in flight and the release is
/// immediate.
pub fn release_wait(
    since_abandoned: Option<Duration>,
    lease_duration: Duration,
    renew_deadline: Duration,
) -> Duration {
    let margin = lease_duration.saturating_sub(renew_deadline);
    since_abandoned.map_or(Duration::ZERO, |since| margin.saturating_sub(since))
}

/// Whether the worker should let go of a shard it serves: a hand-back or retirement was
/// requested and the shard is not its home. A home worker keeps the shard of its ordinal
/// (retired, it is on its way out with its pod); a worker the assigner named home lets a
/// retired shard go like any other, as it stays on while the shard count shrank.
pub fn should_release(me: &Me<'_>, shard: ShardIndex, lease: Option<&LeaseSnapshot>) -> bool {
    lease.is_some_and(|l| {
        let keeps = is_home(me, shard, Some(l)) && !(l.retired && l.home_worker.is_some());
        !keeps
            && l.release_requested_by
                .as_deref()
                .is_some_and(|by| by != me.identity)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const W1: &str = "shardop-worker-1";

    fn me() -> Me<'static> {
        Me {
            identity: W1,
            home: ShardIndex(1),
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn lease(holder: Option<&str>, renewed: i64) -> LeaseSnapshot {
        LeaseSnapshot {
            holder: holder.map(str::to_owned),
            acquired_once: true,
            renew_time: Some(ts(renewed)),
            duration: Some(Duration::from_secs(15)),
            ..Default::default()
        }
    }

    #[test]
    fn ring_distance_wraps() {
        assert_eq!(ring_distance(ShardIndex(0), ShardIndex(1), 3), 1);
        assert_eq!(ring_distance(ShardIndex(2), ShardIndex(1), 3), 2);
        assert_eq!(ring_distance(ShardIndex(1), ShardIndex(1), 3), 0);
        assert_eq!(ring_distance(ShardIndex(5), ShardIndex(0), 3), 1);
    }

    #[test]
    fn home_shard() {
        let home = ShardIndex(1);
        assert_eq!(
            acquisition(&me(), home, None, 3, ts(0)),
            Acquisition::Acquire
        );
        let released = lease(None, 100);
        assert_eq!(
            acquisition(&me(), home, Some(&released), 3, ts(101)),
            Acquisition::Acquire
        );
        let expired = lease(Some("shardop-worker-0"), 100);
        assert_eq!(
            acquisition(&me(), home, Some(&expired), 3, ts(116)),
            Acquisition::Acquire
        );
        let mine = lease(Some(W1), 100);
        assert_eq!(
            acquisition(&me(), home, Some(&mine), 3, ts(101)),
            Acquisition::Acquire
        );
        let taken = lease(Some("shardop-worker-0"), 100);
        assert_eq!(
            acquisition(&me(), home, Some(&taken), 3, ts(101)),
            Acquisition::RequestHandBack
        );
        let asked = LeaseSnapshot {
            release_requested_by: Some(W1.into()),
            ..taken
        };
        assert_eq!(
            acquisition(&me(), home, Some(&asked), 3, ts(101)),
            Acquisition::Wait
        );
    }

    #[test]
    fn takeover_after_expiry_and_stagger() {
        // Shard 0 is at distance 1 from worker 1: expiry at 115 + 1 × 2 s.
        let expired = lease(Some("shardop-worker-0"), 100);
        let take = |now| acquisition(&me(), ShardIndex(0), Some(&expired), 3, ts(now));
        assert_eq!(take(114), Acquisition::Wait, "still held");
        assert_eq!(take(116), Acquisition::Wait, "stagger");
        assert_eq!(take(117), Acquisition::Acquire);
        // Shard 2 is at distance 2: worker 0 goes first.
        let expired2 = lease(Some("shardop-worker-2"), 100);
        assert_eq!(
            acquisition(&me(), ShardIndex(2), Some(&expired2), 3, ts(118)),
            Acquisition::Wait
        );
        assert_eq!(
            acquisition(&me(), ShardIndex(2), Some(&expired2), 3, ts(119)),
            Acquisition::Acquire
        );
    }

    #[test]
    fn released_shards_wait_for_their_home_worker() {
        let released = lease(None, 100);
        let take = |now| acquisition(&me(), ShardIndex(0), Some(&released), 3, ts(now));
        assert_eq!(take(120), Acquisition::Wait);
        assert_eq!(take(131), Acquisition::Wait);
        assert_eq!(take(132), Acquisition::Acquire, "2 × 15 s + 1 × 2 s");
    }

    #[test]
    fn never_absent_or_retired_shards_of_others() {
        assert_eq!(
            acquisition(&me(), ShardIndex(0), None, 3, ts(0)),
            Acquisition::Wait
        );
        let retired = LeaseSnapshot {
            retired: true,
            ..lease(Some("shardop-worker-0"), 0)
        };
        assert_eq!(
            acquisition(&me(), ShardIndex(0), Some(&retired), 3, ts(1000)),
            Acquisition::Wait
        );
        assert_eq!(
            acquisition(
                &me(),
                ShardIndex(1),
                Some(&LeaseSnapshot {
                    retired: true,
                    ..lease(None, 0)
                }),
                3,
                ts(1000)
            ),
            Acquisition::Wait
        );
    }

    fn homed_at(home: u32, lease: LeaseSnapshot) -> LeaseSnapshot {
        LeaseSnapshot {
            home_worker: Some(ShardIndex(home)),
            ..lease
        }
    }

    #[test]
    fn a_shard_whose_lease_names_this_worker_home_is_treated_as_home() {
        // Shard 5 of 8 shards spread over 3 workers; its Lease names worker 1 home.
        let shard = ShardIndex(5);
        let taken = homed_at(1, lease(Some("shardop-worker-0"), 100));
        assert!(is_home(&me(), shard, Some(&taken)));
        assert_eq!(
            acquisition(&me(), shard, Some(&taken), 3, ts(101)),
            Acquisition::RequestHandBack
        );
        let released = homed_at(1, lease(None, 100));
        assert_eq!(
            acquisition(&me(), shard, Some(&released), 3, ts(101)),
            Acquisition::Acquire,
            "a released shard goes to its home worker at once"
        );
        // Its own index is no longer home when the Lease names another worker.
        let elsewhere = homed_at(2, lease(Some("shardop-worker-2"), 100));
        assert!(!is_home(&me(), ShardIndex(1), Some(&elsewhere)));
        assert_eq!(
            acquisition(&me(), ShardIndex(1), Some(&elsewhere), 3, ts(101)),
            Acquisition::Wait
        );
        // An absent Lease is home by index only: a named home needs a Lease to name it.
        assert!(is_home(&me(), ShardIndex(1), None));
        assert!(!is_home(&me(), shard, None));
    }

    #[test]
    fn a_worker_named_home_no_longer_hands_the_shard_back_on_request() {
        let asked = LeaseSnapshot {
            release_requested_by: Some("shardop-worker-3".into()),
            ..lease(Some(W1), 100)
        };
        // Shard 1 used to be worker 1's own; the assigner named worker 3 home for it.
        assert!(!should_release(&me(), ShardIndex(1), Some(&asked)));
        assert!(should_release(
            &me(),
            ShardIndex(1),
            Some(&homed_at(3, asked.clone()))
        ));
        // And a shard it was named home for, it keeps, unless the shard was retired.
        assert!(!should_release(
            &me(),
            ShardIndex(6),
            Some(&homed_at(1, asked.clone()))
        ));
        let retired = LeaseSnapshot {
            retired: true,
            ..homed_at(1, asked)
        };
        assert!(should_release(&me(), ShardIndex(6), Some(&retired)));
    }

    #[test]
    fn the_takeover_stagger_counts_from_the_named_home_worker() {
        // Shard 7's home is worker 0, which died: worker 1 is next to it and goes first.
        let expired = homed_at(0, lease(Some("shardop-worker-0"), 100));
        let take = |now| acquisition(&me(), ShardIndex(7), Some(&expired), 3, ts(now));
        assert_eq!(take(116), Acquisition::Wait, "stagger");
        assert_eq!(take(117), Acquisition::Acquire, "115 + 1 × 2 s");
    }

    #[test]
    fn stop_grace_by_reason() {
        let timeout = Duration::from_secs(20);
        assert_eq!(
            stop_grace(StopReason::LeaseLost, &me(), timeout),
            Duration::ZERO
        );
        // Half of the 15 s Lease duration, not the 20 s shutdown timeout.
        assert_eq!(
            stop_grace(StopReason::HandBack, &me(), timeout),
            Duration::from_millis(7500)
        );
        assert_eq!(
            stop_grace(StopReason::HandBack, &me(), Duration::from_secs(2)),
            Duration::from_secs(2)
        );
        assert_eq!(stop_grace(StopReason::Shutdown, &me(), timeout), timeout);
    }

    #[test]
    fn a_stale_view_after_a_freeze_suggests_writes_a_fresh_read_does_not() {
        // Worker 1 was frozen for 40 s. Its cache still shows shard 0 renewed at 100 and
        // its own shard 1 held by itself; meanwhile worker 0 renewed shard 0 and worker 2
        // took shard 1 over.
        let now = ts(140);
        let stale_other = lease(Some("shardop-worker-0"), 100);
        let stale_home = lease(Some(W1), 100);
        assert_eq!(
            acquisition(&me(), ShardIndex(0), Some(&stale_other), 3, now),
            Acquisition::Acquire,
            "from the stale view shard 0 looks expired"
        );
        assert_eq!(
            acquisition(&me(), ShardIndex(1), Some(&stale_home), 3, now),
            Acquisition::Acquire
        );
        // The fresh reads the supervisor decides on.
        let fresh_other = lease(Some("shardop-worker-0"), 139);
        let fresh_home = lease(Some("shardop-worker-2"), 139);
        assert_eq!(
            acquisition(&me(), ShardIndex(0), Some(&fresh_other), 3, now),
            Acquisition::Wait
        );
        assert_eq!(
            acquisition(&me(), ShardIndex(1), Some(&fresh_home), 3, now),
            Acquisition::RequestHandBack
        );
    }

    #[test]
    fn an_abandoned_write_delays_the_release_by_the_fencing_margin() {
        let (duration, deadline) = (Duration::from_secs(15), Duration::from_secs(10));
        assert_eq!(release_wait(None, duration, deadline), Duration::ZERO);
        assert_eq!(
            release_wait(Some(Duration::ZERO), duration, deadline),
            Duration::from_secs(5),
            "aborted just now: the whole margin"
        );
        assert_eq!(
            release_wait(Some(Duration::from_secs(2)), duration, deadline),
            Duration::from_secs(3)
        );
        assert_eq!(
            release_wait(Some(Duration::from_secs(60)), duration, deadline),
            Duration::ZERO,
            "abandoned long ago"
        );
    }

    #[test]
    fn release_on_request_except_home() {
        let asked = LeaseSnapshot {
            release_requested_by: Some("shardop-worker-0".into()),
            ..lease(Some(W1), 100)
        };
        assert!(should_release(&me(), ShardIndex(0), Some(&asked)));
        assert!(!should_release(&me(), ShardIndex(1), Some(&asked)));
        assert!(!should_release(
            &me(),
            ShardIndex(0),
            Some(&lease(Some(W1), 100))
        ));
    }
}
