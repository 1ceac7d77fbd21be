//! The API server's audit log as the ground truth of who wrote what: read incrementally
//! (scenarios poll it while they run) with the e2e crate's reader, kept for the objects'
//! namespace and the operator's shard Leases, and analysed for the correctness fields
//! (writes, dual ownership, overlap, relabels, duplicated side effects, 429s).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use jiff::Timestamp;
use serde::Serialize;
use shardop_e2e::audit::{AuditEvent, LogTail, Ownership, Position, RevisionClock, Scope};

use crate::change_split::ChangeTimeline;

/// The ownership oracle's counts (docs/performance.md defines them).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OwnershipFigures {
    /// Writes that are foreign or cross-shard (each once): must be 0.
    pub dual_ownership: usize,
    /// Writes by a process that did not hold the shard's Lease at their revision.
    pub foreign_writes: usize,
    /// Writes to an object another shard wrote last, with no assigner label write since.
    pub cross_shard_writes: usize,
    /// Every shard write to an object or its children.
    pub shard_writes: usize,
    /// Shard writes placed by request time: no-ops and writes without a response revision.
    pub ordered_by_request_time: usize,
    /// Shard writes audited as 504 or without a status, checked as if applied.
    pub possibly_applied: usize,
    /// Shard writes with no Lease write of their shard before them in the log.
    pub holder_unknown: usize,
    /// Lines of the run's log that were no audit event: events were lost (disk full), and
    /// the figures above are over an incomplete log.
    pub unreadable_audit_lines: usize,
}

/// A worker process that died: it was last seen running at `alive_at` and found dead at
/// `noticed_at`.
#[derive(Clone, Debug)]
pub struct WorkerDeath {
    /// Its pod name (the user agent's `(<pod>)`).
    pub pod: String,
    pub alive_at: Timestamp,
    pub noticed_at: Timestamp,
}

/// The API server's (received, answered) times of an object's create and of the
/// assigner's first label write of it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LabelTimeline {
    /// The load generator's create.
    pub create: Option<(Timestamp, Timestamp)>,
    /// The assigner's first successful label write of the object.
    pub label: Option<(Timestamp, Timestamp)>,
}

/// An audit log read incrementally, keeping the events of the objects' namespace and the
/// Lease writes of the operator's.
pub struct AuditTail {
    log: LogTail,
    objects_namespace: String,
    operator_namespace: String,
    /// Completed events about objects in the objects' namespace, in log order.
    pub events: Vec<AuditEvent>,
    /// Completed Lease events in the operator's namespace, in log order.
    pub lease_events: Vec<AuditEvent>,
}

impl AuditTail {
    /// Starts at the current end of `path`: only events from now on are kept.
    pub fn from_now(path: PathBuf, objects_namespace: &str, operator_namespace: &str) -> Self {
        Self {
            log: LogTail::from_now(path),
            objects_namespace: objects_namespace.to_owned(),
            operator_namespace: operator_namespace.to_owned(),
            events: Vec::new(),
            lease_events: Vec::new(),
        }
    }

    /// Reads what was appended since the last call.
    pub fn poll(&mut self) -> anyhow::Result<()> {
        let objects = shardop_e2e::audit::namespace_needle(&self.objects_namespace);
        let operator = shardop_e2e::audit::namespace_needle(&self.operator_namespace);
        let events = self
            .log
            .read_new(|line| line.contains(&objects) || line.contains(&operator))?;
        for event in events {
            if event.in_namespace(&self.objects_namespace) {
                self.events.push(event);
            } else if event.in_namespace(&self.operator_namespace) && event.resource() == "leases" {
                self.lease_events.push(event);
            }
        }
        Ok(())
    }

    /// The ownership oracle over everything read so far.
    pub fn ownership(&self) -> Ownership {
        let scope = Scope {
            leases_namespace: &self.operator_namespace,
            objects_namespace: &self.objects_namespace,
        };
        let mut ownership = Ownership::check(self.events.iter().chain(&self.lease_events), scope);
        ownership.unreadable_lines = self.log.unreadable_lines();
        ownership
    }

    /// Successful writes by any worker received since `since`.
    fn worker_writes(&self, since: Timestamp) -> impl Iterator<Item = &AuditEvent> {
        self.events
            .iter()
            .filter(move |e| e.request_received_timestamp >= since)
            .filter(|e| e.worker_shard().is_some() && e.is_successful_write())
    }

    /// Successful writes by any worker since `since`.
    pub fn worker_writes_since(&self, since: Timestamp) -> usize {
        self.worker_writes(since).count()
    }

    /// Successful writes by any worker since `since`, by `<verb> <resource>[/<subresource>]`
    /// (a server-side apply is a `patch`).
    pub fn worker_writes_by_kind_since(&self, since: Timestamp) -> BTreeMap<String, usize> {
        by_kind(self.worker_writes(since))
    }

    /// Write requests by any worker received since `since`, whatever their answer (a
    /// DELETE answered 404 included), by `<verb> <resource>[/<subresource>]`.
    pub fn worker_write_requests_by_kind_since(&self, since: Timestamp) -> BTreeMap<String, usize> {
        by_kind(
            self.events
                .iter()
                .filter(move |e| e.request_received_timestamp >= since)
                .filter(|e| e.worker_shard().is_some() && e.is_write()),
        )
    }

    /// The last time a worker wrote (successfully) anything in the namespace.
    pub fn last_worker_write(&self) -> Option<Timestamp> {
        self.events
            .iter()
            .filter(|e| e.worker_shard().is_some() && e.is_successful_write())
            .map(|e| e.stage_timestamp)
            .max()
    }

    /// The last time anyone (the controller manager's StatefulSet controller, as it creates
    /// pods and claims) updated a StatefulSet's status in the namespace: what a worker's
    /// next status write follows.
    pub fn last_stateful_set_status_write(&self) -> Option<Timestamp> {
        self.events
            .iter()
            .filter(|e| {
                e.resource() == "statefulsets"
                    && e.subresource() == Some("status")
                    && e.is_successful_write()
            })
            .map(|e| e.stage_timestamp)
            .max()
    }

    /// Successful assigner label writes since `since`.
    pub fn assigner_label_writes_since(&self, since: Timestamp) -> usize {
        self.events
            .iter()
            .filter(|e| e.request_received_timestamp >= since && e.is_assigner_label_write())
            .count()
    }

    /// For each DatabaseCluster the load generator created (`creator` starts its user
    /// agent): when the API server received and answered the create, and the assigner's
    /// first successful label write of it. Both times are the API server's. The two are
    /// joined by name, not by log order: the create's event is logged after its response
    /// was sent, and by then the assigner's label write may have finished and been logged.
    pub fn label_timelines(&self, creator: &str) -> HashMap<String, LabelTimeline> {
        let mut timelines: HashMap<String, LabelTimeline> = HashMap::new();
        let mut labels: HashMap<&str, (Timestamp, Timestamp)> = HashMap::new();
        for event in &self.events {
            if event.resource() != "databaseclusters" || event.subresource().is_some() {
                continue;
            }
            let span = (event.request_received_timestamp, event.stage_timestamp);
            if event.verb == "create"
                && event.user_agent.starts_with(creator)
                && event.is_successful_write()
            {
                timelines.entry(event.name().to_owned()).or_default().create = Some(span);
            } else if event.is_assigner_label_write() {
                labels
                    .entry(event.name())
                    .and_modify(|first| *first = (*first).min(span))
                    .or_insert(span);
            }
        }
        for (name, timeline) in &mut timelines {
            timeline.label = labels.get(name.as_str()).copied();
        }
        timelines
    }

    /// Every spec change `changer` made (a successful PATCH of a DatabaseCluster received
    /// since `since`) with the worker writes that carried it out: the first StatefulSet
    /// apply of the object received after the change was answered, and the first status
    /// patch answered after that apply.
    pub fn change_timelines(&self, changer: &str, since: Timestamp) -> Vec<ChangeTimeline> {
        let mut by_object: HashMap<&str, Vec<&AuditEvent>> = HashMap::new();
        for event in self.events.iter().filter(|e| e.is_successful_write()) {
            if let Some(owner) = event.owner() {
                by_object.entry(owner).or_default().push(event);
            }
        }
        let first_after =
            |events: &[&AuditEvent], after: Timestamp, wanted: fn(&AuditEvent) -> bool| {
                events
                    .iter()
                    .filter(|e| wanted(e) && e.request_received_timestamp >= after)
                    .min_by_key(|e| e.request_received_timestamp)
                    .map(|e| (e.request_received_timestamp, e.stage_timestamp))
            };
        let mut changes = Vec::new();
        for events in by_object.values() {
            let user_changes = events.iter().filter(|e| {
                e.user_agent.starts_with(changer)
                    && e.verb == "patch"
                    && e.resource() == "databaseclusters"
                    && e.subresource().is_none()
                    && e.request_received_timestamp >= since
            });
            for change in user_changes {
                let applied = first_after(events, change.stage_timestamp, |e| {
                    e.worker_shard().is_some()
                        && e.resource() == "statefulsets"
                        && e.verb == "patch"
                })
                .map(|(received, _)| received);
                let status_written = applied.and_then(|applied| {
                    first_after(events, applied, |e| {
                        e.worker_shard().is_some()
                            && e.resource() == "databaseclusters"
                            && e.subresource() == Some("status")
                    })
                    .map(|(_, answered)| answered)
                });
                changes.push(ChangeTimeline {
                    changed: change.stage_timestamp,
                    applied,
                    status_written,
                });
            }
        }
        changes
    }

    /// Writes outside single ownership ([`Ownership::dual_ownership`]): foreign writes (by
    /// a process that did not hold the shard's Lease at the write's revision) and
    /// cross-shard writes (another shard wrote the object last, with no assigner label write
    /// since), each write counted once. Every violation is logged.
    pub fn dual_ownership(&self) -> usize {
        self.ownership_figures().dual_ownership
    }

    /// The oracle's figures for a report; every violation is logged.
    pub fn ownership_figures(&self) -> OwnershipFigures {
        let ownership = self.ownership();
        for violation in ownership.violations() {
            tracing::warn!(%violation, "write outside single ownership");
        }
        OwnershipFigures {
            dual_ownership: ownership.dual_ownership(),
            foreign_writes: ownership.foreign.len(),
            cross_shard_writes: ownership.cross_shard.len(),
            shard_writes: ownership.writes.len(),
            ordered_by_request_time: ownership.ordered_by_request_time(),
            possibly_applied: ownership.possibly_applied(),
            holder_unknown: ownership.holder_unknown(),
            unreadable_audit_lines: ownership.unreadable_lines,
        }
    }

    /// Writes as `shard` by `taker_pod` placed after `home_pod`'s first write as `shard`
    /// since `since`, plus writes by the home pod placed before the taker's last one, in
    /// revision order: both serve the shard at once (must be 0).
    pub fn overlap(&self, shard: u32, taker_pod: &str, home_pod: &str, since: Timestamp) -> usize {
        let clock = RevisionClock::new(self.events.iter().chain(&self.lease_events));
        let positions = |pod: &str| -> Vec<Position> {
            self.events
                .iter()
                .filter(|e| e.request_received_timestamp >= since && e.is_successful_write())
                .filter(|e| e.worker_shard() == Some(shard) && e.worker_pod() == Some(pod))
                .map(|e| clock.place(e).0)
                .collect()
        };
        let taker = positions(taker_pod);
        let home = positions(home_pod);
        let (Some(home_first), Some(taker_last)) = (home.iter().min(), taker.iter().max()) else {
            return 0;
        };
        let late_taker = taker.iter().filter(|p| *p > home_first).count();
        let early_home = home.iter().filter(|p| *p < taker_last).count();
        late_taker.max(early_home)
    }

    /// Successful writes by `pod` as `shard` since `since`.
    pub fn writes_by(&self, shard: u32, pod: &str, since: Timestamp) -> usize {
        self.events
            .iter()
            .filter(|e| e.request_received_timestamp >= since && e.is_successful_write())
            .filter(|e| e.worker_shard() == Some(shard) && e.worker_pod() == Some(pod))
            .count()
    }

    /// Applies of a child (StatefulSet, Service) beyond its first, although the desired child
    /// did not change (one generation per object in the fault scenarios):
    /// `(duplicated, reapplied_after_death)`.
    ///
    /// A re-apply is not a duplicated side effect when the apply before it was still in
    /// flight when its worker died (`deaths`): the dead process never learnt whether it
    /// landed, and its successor, whose cache was filled before the API server finished
    /// that request, applies the same desired object once more, which server-side apply
    /// turns into a no-op. Those are counted apart; every other re-apply is a duplicate.
    pub fn duplicated_child_writes(&self, deaths: &[WorkerDeath]) -> (usize, usize) {
        let mut applies: BTreeMap<(&str, &str), Vec<&AuditEvent>> = BTreeMap::new();
        for event in &self.events {
            if event.worker_shard().is_some() && event.is_child_write() && event.verb == "patch" {
                applies
                    .entry((event.resource(), event.name()))
                    .or_default()
                    .push(event);
            }
        }
        let (mut duplicated, mut reapplied) = (0, 0);
        for ((resource, name), mut writes) in applies {
            writes.sort_by_key(|e| e.request_received_timestamp);
            for pair in writes.windows(2) {
                let (earlier, later) = (pair[0], pair[1]);
                let in_flight_at_death = deaths.iter().any(|death| {
                    earlier.worker_pod() == Some(death.pod.as_str())
                        && earlier.request_received_timestamp <= death.noticed_at
                        && earlier.stage_timestamp >= death.alive_at
                        && later.request_received_timestamp >= death.alive_at
                });
                if in_flight_at_death {
                    reapplied += 1;
                } else {
                    duplicated += 1;
                    tracing::warn!(
                        resource,
                        name,
                        earlier = %earlier.user_agent,
                        earlier_received = %earlier.request_received_timestamp,
                        earlier_completed = %earlier.stage_timestamp,
                        later = %later.user_agent,
                        later_received = %later.request_received_timestamp,
                        "child applied again"
                    );
                }
            }
        }
        (duplicated, reapplied)
    }

    /// 429 responses to workers, how many were retried sooner than one second (the
    /// smallest Retry-After) after the 429 arrived, and the smallest such gap in seconds.
    pub fn throttling(&self) -> (usize, usize, Option<f64>) {
        let mut early = 0;
        let mut throttled = 0;
        let mut min_gap: Option<f64> = None;
        for (index, event) in self.events.iter().enumerate() {
            if event.worker_shard().is_none() || event.code() != Some(429) {
                continue;
            }
            throttled += 1;
            let same = |e: &&AuditEvent| {
                e.user_agent == event.user_agent
                    && e.verb == event.verb
                    && e.resource() == event.resource()
                    && e.name() == event.name()
                    && e.subresource() == event.subresource()
                    && e.request_received_timestamp > event.request_received_timestamp
            };
            if let Some(next) = self.events[index + 1..].iter().find(same) {
                let gap = next
                    .request_received_timestamp
                    .duration_since(event.stage_timestamp)
                    .as_secs_f64();
                // 20 ms of slack for the response to travel back.
                if gap < 0.98 {
                    early += 1;
                }
                min_gap = Some(min_gap.map_or(gap, |m: f64| m.min(gap)));
            }
        }
        (throttled, early, min_gap)
    }
}

/// Counts `events` by `<verb> <resource>[/<subresource>]` (a server-side apply is a
/// `patch`).
fn by_kind<'a>(events: impl Iterator<Item = &'a AuditEvent>) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for event in events {
        let resource = match event.subresource() {
            Some(sub) => format!("{}/{sub}", event.resource()),
            None => event.resource().to_owned(),
        };
        *kinds
            .entry(format!("{} {resource}", event.verb))
            .or_insert(0) += 1;
    }
    kinds
}

#[cfg(test)]
mod tests {
    use super::*;

    use shardop_e2e::audit::synthetic::Line;

    /// A patch received at `at` s, complete 10 ms later, committed at revision `at` × 10.
    fn event(ua: &str, resource: &str, name: &str, at: i64, code: u16) -> AuditEvent {
        timed(ua, resource, name, at * 1000, at * 1000 + 10, code)
    }

    /// A patch received at `received` ms and complete at `completed` ms; when successful,
    /// answered with the object at revision `completed` / 100.
    fn timed(
        ua: &str,
        resource: &str,
        name: &str,
        received: i64,
        completed: i64,
        code: u16,
    ) -> AuditEvent {
        let revision = u64::try_from(completed / 100).unwrap();
        let line = Line::new("patch", ua, resource, "objs", name)
            .at(received, completed)
            .code(code);
        let line = if (200..300).contains(&code) {
            line.response("Object", revision)
        } else {
            line
        };
        line.event().unwrap()
    }

    /// Lease `shard` updated by `pod` (holder afterwards: `holder`) at `at` s.
    fn lease(shard: u32, pod: u32, holder: Option<u32>, at: i64) -> AuditEvent {
        let holder = holder.map(|h| format!("shardop-worker-{h}"));
        let agent = format!("shardop-worker/shard-{shard} (shardop-worker-{pod})");
        Line::new(
            "update",
            &agent,
            "leases",
            "op",
            &format!("shardop-shard-{shard}"),
        )
        .at(at * 1000, at * 1000 + 10)
        .lease(holder.as_deref(), u64::try_from(at * 10).unwrap())
        .event()
        .unwrap()
    }

    fn tail(events: Vec<AuditEvent>) -> AuditTail {
        let (events, lease_events) = events.into_iter().partition(|e| e.in_namespace("objs"));
        AuditTail {
            log: LogTail::from_start(PathBuf::new()),
            objects_namespace: "objs".into(),
            operator_namespace: "op".into(),
            events,
            lease_events,
        }
    }

    #[test]
    fn a_label_write_logged_before_the_create_still_joins_its_timeline() {
        let create = |name: &str, received, completed| {
            Line::new(
                "create",
                "shardop-bench/loadgen",
                "databaseclusters",
                "objs",
                name,
            )
            .at(received, completed)
            .code(201)
            .response("DatabaseCluster", 1)
            .event()
            .unwrap()
        };
        let assigner = "shardop-assigner (shardop-assigner-0)";
        let log = tail(vec![
            // The assigner saw "late" from the watch and its write was logged first.
            timed(assigner, "databaseclusters", "late", 1_004, 1_006, 200),
            create("late", 1_000, 1_008),
            create("early", 2_000, 2_002),
            timed(assigner, "databaseclusters", "early", 2_010, 2_020, 409),
            timed(assigner, "databaseclusters", "early", 2_030, 2_040, 200),
            timed(assigner, "databaseclusters", "early", 2_050, 2_060, 200),
            timed(assigner, "databaseclusters", "foreign", 3_000, 3_010, 200),
        ]);
        let ms = |ms| Timestamp::from_millisecond(ms).unwrap();
        let timelines = log.label_timelines("shardop-bench/loadgen");
        assert_eq!(
            timelines["late"],
            LabelTimeline {
                create: Some((ms(1_000), ms(1_008))),
                label: Some((ms(1_004), ms(1_006))),
            }
        );
        // The first successful label write, not the refused one nor a later one.
        assert_eq!(timelines["early"].label, Some((ms(2_030), ms(2_040))));
        assert!(!timelines.contains_key("foreign"));
    }

    #[test]
    fn a_change_joins_the_first_apply_after_it_and_the_first_status_after_that() {
        let user = "shardop-bench/loadgen";
        let worker = "shardop-worker/shard-0 (shardop-worker-0)";
        let log = tail(vec![
            // A reconcile of something else, before the change: not the change's.
            timed(worker, "statefulsets", "db", 900, 950, 200),
            timed(worker, "databaseclusters/status", "db", 960, 990, 200),
            timed(user, "databaseclusters", "db", 1_000, 1_010, 200),
            // A status write before the change's apply is not the change's status.
            timed(worker, "databaseclusters/status", "db", 1_100, 1_120, 200),
            timed(worker, "statefulsets", "db", 1_500, 1_600, 200),
            timed(worker, "databaseclusters/status", "db", 1_700, 1_750, 200),
            timed(worker, "databaseclusters/status", "db", 1_800, 1_850, 200),
            // Changed, then deleted before a worker carried it out.
            timed(user, "databaseclusters", "gone", 1_000, 1_010, 200),
            // A change before `since` is left out.
            timed(user, "databaseclusters", "old", 10, 20, 200),
        ]);
        let ms = |ms| Timestamp::from_millisecond(ms).unwrap();
        let mut changes = log.change_timelines(user, ms(500));
        changes.sort_by_key(|c| c.applied.is_none());
        assert_eq!(
            changes,
            vec![
                ChangeTimeline {
                    changed: ms(1_010),
                    applied: Some(ms(1_500)),
                    status_written: Some(ms(1_750)),
                },
                ChangeTimeline {
                    changed: ms(1_010),
                    applied: None,
                    status_written: None,
                },
            ]
        );
    }

    #[test]
    fn worker_writes_are_counted_by_kind_from_a_time_on() {
        let a = "shardop-worker/shard-0 (shardop-worker-0)";
        let log = tail(vec![
            event(a, "databaseclusters/status", "db", 1, 200),
            event(a, "databaseclusters/status", "db", 2, 200),
            event(a, "databaseclusters/status", "db", 3, 409),
            event(a, "statefulsets", "db", 4, 201),
            event("shardop-assigner (x)", "databaseclusters", "db", 5, 200),
        ]);
        let kinds = log.worker_writes_by_kind_since(Timestamp::from_second(2).unwrap());
        assert_eq!(
            kinds.into_iter().collect::<Vec<_>>(),
            [
                ("patch databaseclusters/status".to_owned(), 1),
                ("patch statefulsets".to_owned(), 1),
            ]
        );
    }

    #[test]
    fn quiet_needs_the_stateful_set_controller_quiet_too() {
        let worker = "shardop-worker/shard-0 (shardop-worker-0)";
        let controller = "kube-controller-manager/v1.36.3 (linux/amd64)";
        let log = tail(vec![
            event(worker, "databaseclusters/status", "db", 1, 200),
            event(controller, "statefulsets/status", "db", 7, 200),
            event(controller, "statefulsets/status", "db", 8, 409),
            event(controller, "statefulsets", "db", 9, 200),
        ]);
        assert_eq!(
            log.last_worker_write(),
            Some(Timestamp::from_millisecond(1_010).unwrap())
        );
        assert_eq!(
            log.last_stateful_set_status_write(),
            Some(Timestamp::from_millisecond(7_010).unwrap())
        );
    }

    #[test]
    fn handover_through_the_assigner_is_not_dual_ownership() {
        let a = "shardop-worker/shard-0 (shardop-worker-0)";
        let b = "shardop-worker/shard-3 (shardop-worker-3)";
        let ok = tail(vec![
            event(a, "databaseclusters", "db", 1, 200),
            event("shardop-assigner (x)", "databaseclusters", "db", 2, 200),
            event(a, "databaseclusters", "db", 3, 200),
            event("shardop-assigner (x)", "databaseclusters", "db", 4, 200),
            event(b, "statefulsets", "db", 5, 200),
            event(b, "services", "db-headless", 6, 200),
        ]);
        assert_eq!(ok.dual_ownership(), 0);
        let bad = tail(vec![
            event(a, "databaseclusters", "db", 1, 200),
            event("shardop-assigner (x)", "databaseclusters", "db", 2, 200),
            event(b, "statefulsets", "db", 3, 200),
            event(a, "databaseclusters", "db", 4, 200),
        ]);
        assert_eq!(bad.dual_ownership(), 1);
    }

    #[test]
    fn a_process_writing_as_a_shard_whose_lease_another_one_took_is_dual_ownership() {
        let frozen = "shardop-worker/shard-1 (shardop-worker-1)";
        let taker = "shardop-worker/shard-1 (shardop-worker-2)";
        let log = tail(vec![
            lease(1, 1, Some(1), 1),
            event(frozen, "statefulsets", "db", 2, 200),
            lease(1, 2, Some(2), 20),
            event(taker, "databaseclusters/status", "db", 21, 200),
            event(frozen, "statefulsets", "db", 28, 200),
        ]);
        assert_eq!(log.dual_ownership(), 1);
        assert_eq!(log.ownership().foreign.len(), 1);
    }

    #[test]
    fn overlap_and_duplicates() {
        let taker = "shardop-worker/shard-1 (shardop-worker-2)";
        let home = "shardop-worker/shard-1 (shardop-worker-1)";
        let since = Timestamp::from_second(0).unwrap();
        let clean = tail(vec![
            event(taker, "statefulsets", "a", 1, 200),
            event(home, "statefulsets", "b", 2, 200),
        ]);
        assert_eq!(
            clean.overlap(1, "shardop-worker-2", "shardop-worker-1", since),
            0
        );
        assert_eq!(clean.duplicated_child_writes(&[]), (0, 0));
        let overlapping = tail(vec![
            event(home, "statefulsets", "b", 2, 200),
            event(taker, "statefulsets", "b", 3, 200),
        ]);
        assert_eq!(
            overlapping.overlap(1, "shardop-worker-2", "shardop-worker-1", since),
            1
        );
        assert_eq!(overlapping.duplicated_child_writes(&[]), (1, 0));
    }

    #[test]
    fn a_reapply_of_a_write_in_flight_at_a_crash_is_not_a_duplicate() {
        let worker = "shardop-worker/shard-0 (shardop-worker-0)";
        let death = WorkerDeath {
            pod: "shardop-worker-0".into(),
            alive_at: Timestamp::from_millisecond(1000).unwrap(),
            noticed_at: Timestamp::from_millisecond(1200).unwrap(),
        };
        // `ua` applies the child at 0.9 s (finished at `finished` ms) and again at 1.3 s.
        let twice = |ua: &str, finished: i64| {
            tail(vec![
                timed(ua, "statefulsets", "db", 900, finished, 200),
                timed(ua, "statefulsets", "db", 1300, 1350, 200),
            ])
            .duplicated_child_writes(std::slice::from_ref(&death))
        };
        // Finished at 1.5 s: the worker died (between 1.0 and 1.2 s) with it in flight.
        assert_eq!(twice(worker, 1500), (0, 1));
        // Finished at 0.95 s, before the worker was last seen alive: a real duplicate.
        assert_eq!(twice(worker, 950), (1, 0));
        // Another pod's write is not excused by this pod's death.
        assert_eq!(
            twice("shardop-worker/shard-1 (shardop-worker-1)", 1500),
            (1, 0)
        );
    }

    #[test]
    fn retry_after_gap() {
        let ua = "shardop-worker/shard-0 (shardop-worker-0)";
        let t = tail(vec![
            event(ua, "statefulsets", "a", 1, 429),
            event(ua, "statefulsets", "a", 3, 200),
        ]);
        let (n, early, gap) = t.throttling();
        assert_eq!(n, 1);
        assert_eq!(early, 0);
        assert!(gap.unwrap() > 1.9);
    }
}
