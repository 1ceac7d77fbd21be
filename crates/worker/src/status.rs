//! The status of a DatabaseCluster, computed from what the worker observed (no I/O).
//!
//! Conditions keep their `lastTransitionTime` while their status stays the same, so a
//! recomputation of an unchanged world yields an identical status and no write.
//!
//! "The status the object has" is not always the cached one: the watch delivers our own
//! status write a few milliseconds after the write returns, and a reconcile triggered in
//! that window (typically by the StatefulSet event of the apply just made) would compare
//! with the status from before the write, see a difference and write the same status
//! again. [`known_status`] prefers the status we wrote while the cache lags it.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use shardop_api::constants::condition::{AVAILABLE, DEGRADED, PROGRESSING};
use shardop_api::{DatabaseCluster, DatabaseClusterStatus};

use crate::book::numeric_resource_version;
pub use crate::book::{TerminalProblem, WrittenStatus};

/// The status the server holds as far as this worker knows: the newest of the version a
/// reconcile started from (`started`), the version the cache holds now (`latest`) and the
/// status it wrote itself while the cache has not caught up with that write (`written`).
/// Only the worker owning the shard writes the status subresource, so nothing else can have
/// replaced our write without the cache showing a later version.
///
/// `latest` matters because the watch drops the memo of a write once the cache holds it,
/// and that may happen after the reconcile took its snapshot (kube-runtime reads the cache
/// when it dispatches the reconcile, before the reconcile runs): the snapshot then shows
/// neither the write nor the memo, and a decision taken from it (a resize that looks not
/// under way) undoes what the previous reconcile wrote.
pub fn known_status<'a>(
    started: &'a DatabaseCluster,
    latest: Option<&'a DatabaseCluster>,
    written: Option<&'a WrittenStatus>,
) -> Option<&'a DatabaseClusterStatus> {
    let newest = latest
        .filter(|latest| is_newer(*latest, started))
        .unwrap_or(started);
    match written {
        Some(written) if !written.is_seen_in(newest) => Some(&written.status),
        _ => newest.status.as_ref(),
    }
}

/// Whether `candidate` is a later version than `than` (both with numeric resourceVersions).
pub fn is_newer(candidate: &impl kube::Resource, than: &impl kube::Resource) -> bool {
    match (
        numeric_resource_version(candidate),
        numeric_resource_version(than),
    ) {
        (Some(candidate), Some(than)) => candidate > than,
        _ => false,
    }
}

/// What the status is computed from.
pub struct Observed<'a> {
    /// The DatabaseCluster as last read.
    pub cluster: &'a DatabaseCluster,
    /// The status it has (see [`known_status`]); conditions keep their transition times
    /// from it.
    pub current_status: Option<&'a DatabaseClusterStatus>,
    /// Its StatefulSet, if it exists.
    pub stateful_set: Option<&'a StatefulSet>,
    /// A terminal problem with the current generation, if any.
    pub problem: Option<&'a TerminalProblem>,
    /// The current time, for conditions that transition now.
    pub now: jiff::Timestamp,
}

/// The status the object should have.
pub fn desired_status(observed: &Observed<'_>) -> DatabaseClusterStatus {
    let cluster = observed.cluster;
    let generation = cluster.metadata.generation;
    let counts = ReplicaCounts::of(observed);
    let previous = observed
        .current_status
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let condition = |type_: &str, (status, reason, message): ConditionParts<'_>| {
        let last_transition_time = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or_else(|| Time(observed.now), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            last_transition_time,
        }
    };
    DatabaseClusterStatus {
        observed_generation: generation,
        replicas: counts.replicas,
        ready_replicas: counts.ready,
        conditions: vec![
            condition(AVAILABLE, available(&counts)),
            condition(PROGRESSING, progressing(observed, &counts)),
            condition(DEGRADED, degraded(observed)),
        ],
        claim_ordinals: Some(crate::claims::ordinals_to_record(
            cluster,
            observed.current_status,
            observed.stateful_set,
        )),
    }
}

/// A condition's status, reason and message.
type ConditionParts<'a> = (&'static str, &'a str, String);

/// The replica counts the conditions are computed from: the spec's and the StatefulSet's.
struct ReplicaCounts {
    desired: i32,
    replicas: i32,
    ready: i32,
    updated: i32,
    /// The StatefulSet controller observed the applied spec and rolled it out.
    rolled_out: bool,
}

impl ReplicaCounts {
    fn of(observed: &Observed<'_>) -> Self {
        let desired = observed.cluster.spec.replicas;
        let sts_status = observed.stateful_set.and_then(|s| s.status.as_ref());
        let replicas = sts_status.map_or(0, |s| s.replicas);
        let ready = sts_status.and_then(|s| s.ready_replicas).unwrap_or(0);
        let updated = sts_status.and_then(|s| s.updated_replicas).unwrap_or(0);
        let sts_current = observed.stateful_set.is_some_and(|s| {
            s.status.as_ref().and_then(|st| st.observed_generation) >= s.metadata.generation
        });
        Self {
            desired,
            replicas,
            ready,
            updated,
            rolled_out: sts_current && updated >= desired && replicas == desired,
        }
    }
}

fn available(counts: &ReplicaCounts) -> ConditionParts<'static> {
    let (ready, desired) = (counts.ready, counts.desired);
    let message = format!("{ready}/{desired} replicas ready");
    if ready >= desired {
        ("True", "AllReplicasReady", message)
    } else {
        ("False", "ReplicasNotReady", message)
    }
}

fn progressing(observed: &Observed<'_>, counts: &ReplicaCounts) -> ConditionParts<'static> {
    let (ready, updated, desired) = (counts.ready, counts.updated, counts.desired);
    match observed.problem {
        Some(_) => (
            "False",
            "Blocked",
            "the spec cannot be applied, see Degraded".to_owned(),
        ),
        None if observed.stateful_set.is_none() => {
            ("True", "Creating", "creating the StatefulSet".to_owned())
        }
        None if !counts.rolled_out => (
            "True",
            "RollingOut",
            format!("{updated}/{desired} replicas updated"),
        ),
        None if ready < desired => (
            "True",
            "WaitingForReplicas",
            format!("{ready}/{desired} replicas ready"),
        ),
        None => (
            "False",
            "Converged",
            "all replicas updated and ready".to_owned(),
        ),
    }
}

fn degraded<'a>(observed: &'a Observed<'_>) -> ConditionParts<'a> {
    match observed.problem {
        Some(problem) => ("True", problem.reason.as_str(), problem.message.clone()),
        None => (
            "False",
            "Reconciled",
            "the children match the spec".to_owned(),
        ),
    }
}

/// Whether an object of `generation` whose status describes generation `observed` (none:
/// never reconciled) still waits for a reconcile of its current spec.
pub fn is_behind(observed: Option<i64>, generation: Option<i64>) -> bool {
    observed < generation
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::StatefulSetStatus;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use shardop_api::{DatabaseClusterSpec, ReclaimPolicy, StorageSpec};

    fn cluster(generation: i64) -> DatabaseCluster {
        let mut c = DatabaseCluster::new(
            "db",
            DatabaseClusterSpec {
                replicas: 2,
                image: "postgres:17".into(),
                resources: None,
                storage: StorageSpec {
                    storage_class_name: None,
                    size: Quantity("1Gi".into()),
                    reclaim_policy: ReclaimPolicy::Retain,
                },
            },
        );
        c.metadata.generation = Some(generation);
        c
    }

    fn sts(replicas: i32, ready: i32) -> StatefulSet {
        StatefulSet {
            metadata: kube::api::ObjectMeta {
                generation: Some(1),
                ..Default::default()
            },
            status: Some(StatefulSetStatus {
                observed_generation: Some(1),
                replicas,
                ready_replicas: Some(ready),
                updated_replicas: Some(replicas),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn at(seconds: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(seconds).unwrap()
    }

    fn cond<'a>(status: &'a DatabaseClusterStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn new_object_is_progressing_and_not_available() {
        let c = cluster(1);
        let status = desired_status(&Observed {
            cluster: &c,
            current_status: c.status.as_ref(),
            stateful_set: None,
            problem: None,
            now: at(100),
        });
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(cond(&status, AVAILABLE).status, "False");
        assert_eq!(cond(&status, PROGRESSING).reason, "Creating");
        assert_eq!(cond(&status, DEGRADED).status, "False");
        assert!(is_behind(None, c.metadata.generation), "never reconciled");
    }

    #[test]
    fn recomputation_is_stable_and_transition_times_move_only_on_change() {
        let mut c = cluster(1);
        let s = sts(2, 0);
        let observe = |c: &DatabaseCluster, s: &StatefulSet, now| {
            desired_status(&Observed {
                cluster: c,
                current_status: c.status.as_ref(),
                stateful_set: Some(s),
                problem: None,
                now: at(now),
            })
        };
        let first = observe(&c, &s, 100);
        c.status = Some(first.clone());
        assert!(!is_behind(first.observed_generation, c.metadata.generation));
        assert_eq!(
            observe(&c, &s, 200),
            first,
            "nothing changed, nothing to write"
        );

        let ready = sts(2, 2);
        let second = observe(&c, &ready, 300);
        assert_eq!(cond(&second, AVAILABLE).status, "True");
        assert_eq!(cond(&second, AVAILABLE).last_transition_time, Time(at(300)));
        assert_eq!(
            cond(&second, DEGRADED).last_transition_time,
            Time(at(100)),
            "Degraded did not change"
        );
        assert_eq!(cond(&second, PROGRESSING).reason, "Converged");
    }

    fn at_version(mut c: DatabaseCluster, version: &str) -> DatabaseCluster {
        c.metadata.resource_version = Some(version.into());
        c
    }

    #[test]
    fn claim_ordinals_count_our_own_status_write_the_cache_has_not_delivered() {
        // Cached: 3 claim ordinals recorded. Our own write since (a scale to 5 inside the
        // watch lag) recorded 5; now the spec is 2 and the StatefulSet shows 2.
        let mut cached = cluster(3);
        cached.status = Some(DatabaseClusterStatus {
            claim_ordinals: Some(3),
            ..Default::default()
        });
        let written = DatabaseClusterStatus {
            claim_ordinals: Some(5),
            ..Default::default()
        };
        let s = sts(2, 2);
        let status = desired_status(&Observed {
            cluster: &cached,
            current_status: Some(&written),
            stateful_set: Some(&s),
            problem: None,
            now: at(100),
        });
        assert_eq!(status.claim_ordinals, Some(5), "claims 3 and 4 may exist");
    }

    #[test]
    fn our_status_write_is_not_repeated_while_the_cache_lags_it() {
        let cached = at_version(cluster(1), "10");
        let s = sts(2, 0);
        let observe = |current: Option<&DatabaseClusterStatus>, now| {
            desired_status(&Observed {
                cluster: &cached,
                current_status: current,
                stateful_set: Some(&s),
                problem: None,
                now: at(now),
            })
        };
        let written = WrittenStatus {
            resource_version: 11,
            status: observe(known_status(&cached, None, None), 100),
        };
        // A reconcile right after the write, before the watch delivered it: the cache
        // still has no status, yet the status to compare with is the one written.
        let current = known_status(&cached, None, Some(&written));
        assert_eq!(current, Some(&written.status));
        assert_eq!(observe(current, 101), written.status, "nothing to write");
        // Compared with the stale cache instead, the same world looks different (fresh
        // transition times): the redundant write this avoids.
        assert_ne!(observe(cached.status.as_ref(), 101), written.status);
    }

    #[test]
    fn the_cache_answers_once_it_holds_our_write_or_a_later_version() {
        let mut later = cluster(2);
        later.status = Some(DatabaseClusterStatus {
            observed_generation: Some(2),
            ..Default::default()
        });
        let written = WrittenStatus {
            resource_version: 11,
            status: DatabaseClusterStatus {
                observed_generation: Some(1),
                ..Default::default()
            },
        };
        for (version, expected) in [
            ("10", &written.status),
            ("11", later.status.as_ref().unwrap()),
            ("12", later.status.as_ref().unwrap()),
        ] {
            let cached = at_version(later.clone(), version);
            assert_eq!(
                known_status(&cached, None, Some(&written)),
                Some(expected),
                "{version}"
            );
        }
        // A resourceVersion that is not a number: trust the cache (a write at worst).
        let opaque = at_version(later.clone(), "opaque");
        assert_eq!(
            known_status(&opaque, None, Some(&written)),
            later.status.as_ref()
        );
        assert_eq!(known_status(&later, None, None), later.status.as_ref());
    }

    #[test]
    fn a_reconcile_started_before_the_watch_delivered_our_write_sees_it_in_the_cache() {
        // The reconcile's snapshot predates our last write (version 11); the watch then
        // delivered it, storing version 11 and dropping the memo.
        let mut started = at_version(cluster(2), "10");
        started.status = Some(DatabaseClusterStatus {
            observed_generation: Some(1),
            ..Default::default()
        });
        let mut latest = at_version(cluster(2), "11");
        latest.status = Some(DatabaseClusterStatus {
            observed_generation: Some(2),
            ..Default::default()
        });
        assert_eq!(
            known_status(&started, Some(&latest), None),
            latest.status.as_ref(),
            "not the snapshot's older status"
        );
        // The memo, while it is there, still wins over an older cache.
        let written = WrittenStatus {
            resource_version: 12,
            status: DatabaseClusterStatus {
                observed_generation: Some(3),
                ..Default::default()
            },
        };
        assert_eq!(
            known_status(&started, Some(&latest), Some(&written)),
            Some(&written.status)
        );
        // A cache older than the snapshot (never the case, but harmless) is not used.
        assert_eq!(
            known_status(&latest, Some(&started), None),
            latest.status.as_ref()
        );
    }

    #[test]
    fn terminal_problem_is_degraded() {
        let c = cluster(3);
        let problem = TerminalProblem {
            reason: "StatefulSetRejected".into(),
            message: "spec: Forbidden".into(),
        };
        let status = desired_status(&Observed {
            cluster: &c,
            current_status: c.status.as_ref(),
            stateful_set: None,
            problem: Some(&problem),
            now: at(1),
        });
        let degraded = cond(&status, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "StatefulSetRejected")
        );
        assert_eq!(degraded.observed_generation, Some(3));
        assert_eq!(cond(&status, PROGRESSING).status, "False");
    }
}
