//! The API server's audit log as the ground truth of who wrote what: read incrementally
//! (scenarios poll it while they run), filtered to one namespace, and analysed for the
//! correctness fields (writes, dual ownership, overlap, relabels, duplicated side effects,
//! 429s).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;

use jiff::Timestamp;
use serde::Deserialize;

/// One completed request about an object in the watched namespace.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// create, patch, update, delete, ...
    pub verb: String,
    /// The client's User-Agent header.
    #[serde(default)]
    pub user_agent: String,
    /// The object.
    #[serde(default)]
    pub object_ref: Option<ObjectRef>,
    /// The response.
    #[serde(default)]
    pub response_status: Option<Status>,
    /// When the request arrived.
    pub request_received_timestamp: Timestamp,
    /// When the response was complete.
    pub stage_timestamp: Timestamp,
    #[serde(default)]
    stage: String,
}

/// The object of an event.
#[derive(Debug, Clone, Deserialize)]
pub struct ObjectRef {
    /// Plural resource.
    #[serde(default)]
    pub resource: String,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Subresource.
    #[serde(default)]
    pub subresource: Option<String>,
}

/// A response status.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    /// HTTP code.
    #[serde(default)]
    pub code: u16,
}

impl Event {
    fn code(&self) -> u16 {
        self.response_status.as_ref().map_or(0, |s| s.code)
    }

    /// A write the API server carried out.
    pub fn is_successful_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        ) && (200..300).contains(&self.code())
    }

    /// The shard of a `shardop-worker/shard-<i> (<pod>)` user agent.
    pub fn worker_shard(&self) -> Option<u32> {
        let rest = self.user_agent.strip_prefix("shardop-worker/shard-")?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    /// The pod of a `shardop-worker/shard-<i> (<pod>)` user agent.
    pub fn worker_pod(&self) -> Option<&str> {
        self.worker_shard()?;
        let (_, rest) = self.user_agent.split_once('(')?;
        rest.split_once(')').map(|(pod, _)| pod)
    }

    /// Whether the assigner made this request.
    pub fn by_assigner(&self) -> bool {
        self.user_agent.starts_with("shardop-assigner")
    }

    fn resource(&self) -> &str {
        self.object_ref.as_ref().map_or("", |o| o.resource.as_str())
    }

    fn name(&self) -> &str {
        self.object_ref
            .as_ref()
            .and_then(|o| o.name.as_deref())
            .unwrap_or("")
    }

    fn subresource(&self) -> Option<&str> {
        self.object_ref
            .as_ref()
            .and_then(|o| o.subresource.as_deref())
    }

    /// The DatabaseCluster this event is about: the object itself, or the parent of a
    /// child (`<name>` StatefulSet, `<name>-headless` Service).
    pub fn parent(&self) -> Option<&str> {
        let name = self.name();
        match self.resource() {
            "databaseclusters" | "statefulsets" => Some(name),
            "services" => name.strip_suffix("-headless"),
            _ => None,
        }
        .filter(|n| !n.is_empty())
    }

    /// A label-only write by the assigner on a DatabaseCluster (it writes nothing else to
    /// DatabaseClusters).
    pub fn is_assigner_label_write(&self) -> bool {
        self.by_assigner()
            && self.resource() == "databaseclusters"
            && self.subresource().is_none()
            && self.is_successful_write()
    }

    /// A patch of a DatabaseCluster itself (not its status) by a worker: how the old owner
    /// acknowledges a drain (it also adds and removes the finalizer this way).
    fn is_worker_object_patch(&self) -> bool {
        self.worker_shard().is_some()
            && self.verb == "patch"
            && self.resource() == "databaseclusters"
            && self.subresource().is_none()
    }

    /// Whether this assigner label write comes after the worker write `previous` in the
    /// handover order: it started after `previous` completed. The old owner's acknowledgement
    /// is the exception: the assigner acts on its commit, which the assigner's watch can
    /// deliver before the API server has finished (and audited) the acknowledgement's
    /// response on a busy machine, so starting after it started is enough there.
    fn follows(&self, previous: &Event) -> bool {
        self.request_received_timestamp >= previous.stage_timestamp
            || (previous.is_worker_object_patch()
                && self.request_received_timestamp >= previous.request_received_timestamp)
    }

    /// Whether this is a write of a child object (StatefulSet or Service, not status).
    pub fn is_child_write(&self) -> bool {
        matches!(self.resource(), "statefulsets" | "services")
            && self.subresource().is_none()
            && self.is_successful_write()
    }
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

/// An audit log read incrementally, keeping the events of one namespace.
pub struct AuditTail {
    path: PathBuf,
    offset: u64,
    needle: String,
    /// Completed events in the namespace, in log order.
    pub events: Vec<Event>,
}

impl AuditTail {
    /// Starts at the current end of `path`: only events from now on are kept.
    pub fn from_now(path: PathBuf, namespace: &str) -> Self {
        let offset = std::fs::metadata(&path).map_or(0, |m| m.len());
        Self {
            path,
            offset,
            needle: format!("\"namespace\":\"{namespace}\""),
            events: Vec::new(),
        }
    }

    /// Reads what was appended since the last call.
    pub fn poll(&mut self) -> anyhow::Result<()> {
        let mut file = std::fs::File::open(&self.path)?;
        let len = file.metadata()?.len();
        if len < self.offset {
            // Rotated: start over at the new file (the bench never fills 1 GiB).
            self.offset = 0;
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut line = String::new();
        loop {
            line.clear();
            let read = reader.read_line(&mut line)?;
            if read == 0 || !line.ends_with('\n') {
                break;
            }
            self.offset += read as u64;
            if !line.contains(&self.needle) {
                continue;
            }
            if let Ok(event) = serde_json::from_str::<Event>(&line)
                && event.stage == "ResponseComplete"
            {
                self.events.push(event);
            }
        }
        Ok(())
    }

    /// Successful writes by any worker received since `since`.
    fn worker_writes(&self, since: Timestamp) -> impl Iterator<Item = &Event> {
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
        let mut kinds = BTreeMap::new();
        for event in self.worker_writes(since) {
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

    /// The last time a worker wrote (successfully) anything in the namespace.
    pub fn last_worker_write(&self) -> Option<Timestamp> {
        self.events
            .iter()
            .filter(|e| e.worker_shard().is_some() && e.is_successful_write())
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

    /// Writes by a shard outside its ownership of the object: two consecutive worker writes
    /// to one DatabaseCluster (or its children) by different shards must be separated by an
    /// assigner label write that started after the first one completed (see
    /// [`Event::follows`] for the acknowledgement) and before the second one started (the
    /// handover: acknowledgement, then the new label). Returns the number of violating
    /// writes.
    pub fn dual_ownership(&self) -> usize {
        let mut by_object: HashMap<&str, Vec<&Event>> = HashMap::new();
        for event in &self.events {
            let relevant = (event.worker_shard().is_some() || event.is_assigner_label_write())
                && event.is_successful_write();
            if let (true, Some(parent)) = (relevant, event.parent()) {
                by_object.entry(parent).or_default().push(event);
            }
        }
        let mut violations = 0;
        let mut early_label_writes = 0;
        for events in by_object.values_mut() {
            events.sort_by_key(|e| e.request_received_timestamp);
            let mut last_worker: Option<&Event> = None;
            let mut separated = false;
            for event in events.iter() {
                if event.is_assigner_label_write() {
                    if let Some(previous) = last_worker
                        && event.follows(previous)
                    {
                        separated = true;
                        if event.request_received_timestamp < previous.stage_timestamp {
                            early_label_writes += 1;
                        }
                    }
                    continue;
                }
                if let Some(previous) = last_worker
                    && previous.worker_shard() != event.worker_shard()
                    && !separated
                {
                    violations += 1;
                    tracing::warn!(
                        object = event.parent().unwrap_or(""),
                        earlier = %previous.user_agent,
                        earlier_verb = %previous.verb,
                        earlier_resource = previous.resource(),
                        earlier_received = %previous.request_received_timestamp,
                        earlier_completed = %previous.stage_timestamp,
                        later = %event.user_agent,
                        later_verb = %event.verb,
                        later_resource = event.resource(),
                        later_received = %event.request_received_timestamp,
                        "write by a shard outside its ownership interval"
                    );
                }
                // The separation must follow the previous shard's *last* write.
                separated = false;
                last_worker = Some(event);
            }
        }
        if early_label_writes > 0 {
            tracing::info!(
                early_label_writes,
                "assigner label writes that started before the acknowledgement they follow was audited as complete"
            );
        }
        violations
    }

    /// Writes as `shard` by `taker_pod` that started after `home_pod`'s first write as
    /// `shard` since `since`, plus writes by the home pod before the taker's last one:
    /// both serve the shard at once (must be 0).
    pub fn overlap(&self, shard: u32, taker_pod: &str, home_pod: &str, since: Timestamp) -> usize {
        let writes = |pod: &str| -> Vec<&Event> {
            self.events
                .iter()
                .filter(|e| e.request_received_timestamp >= since && e.is_successful_write())
                .filter(|e| e.worker_shard() == Some(shard) && e.worker_pod() == Some(pod))
                .collect()
        };
        let taker = writes(taker_pod);
        let home = writes(home_pod);
        let Some(home_first) = home.iter().map(|e| e.request_received_timestamp).min() else {
            return 0;
        };
        let Some(taker_last) = taker.iter().map(|e| e.stage_timestamp).max() else {
            return 0;
        };
        let late_taker = taker
            .iter()
            .filter(|e| e.stage_timestamp > home_first)
            .count();
        let early_home = home
            .iter()
            .filter(|e| e.request_received_timestamp < taker_last)
            .count();
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
        let mut applies: BTreeMap<(&str, &str), Vec<&Event>> = BTreeMap::new();
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
            if event.worker_shard().is_none() || event.code() != 429 {
                continue;
            }
            throttled += 1;
            let same = |e: &&Event| {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ua: &str, resource: &str, name: &str, at: i64, code: u16) -> Event {
        timed(ua, resource, name, at * 1000, at * 1000 + 10, code)
    }

    /// An event received at `received` ms and completed at `completed` ms.
    fn timed(
        ua: &str,
        resource: &str,
        name: &str,
        received: i64,
        completed: i64,
        code: u16,
    ) -> Event {
        let (resource, subresource) = match resource.split_once('/') {
            Some((resource, sub)) => (resource, Some(sub.to_owned())),
            None => (resource, None),
        };
        Event {
            verb: "patch".into(),
            user_agent: ua.into(),
            object_ref: Some(ObjectRef {
                resource: resource.into(),
                name: Some(name.into()),
                subresource,
            }),
            response_status: Some(Status { code }),
            request_received_timestamp: Timestamp::from_millisecond(received).unwrap(),
            stage_timestamp: Timestamp::from_millisecond(completed).unwrap(),
            stage: "ResponseComplete".into(),
        }
    }

    fn tail(events: Vec<Event>) -> AuditTail {
        AuditTail {
            path: PathBuf::new(),
            offset: 0,
            needle: String::new(),
            events,
        }
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
    fn the_assigner_may_act_on_the_acknowledgement_before_its_response_is_audited() {
        let old = "shardop-worker/shard-2 (shardop-worker-2)";
        let new = "shardop-worker/shard-3 (shardop-worker-3)";
        let assigner = "shardop-assigner (x)";
        // The old owner writes `first`, then `last`; the assigner's label write starts while
        // the API server is still finishing `last`.
        let handover = |first: &str, last: &str| {
            tail(vec![
                timed(old, first, "db", 0, 50, 200),
                timed(old, last, "db", 1000, 1400, 200),
                timed(assigner, "databaseclusters", "db", 1300, 1800, 200),
                timed(new, "statefulsets", "db", 1900, 1950, 200),
            ])
        };
        // `last` is the acknowledgement: the assigner acted on its commit.
        let ack_then_label = handover("databaseclusters/status", "databaseclusters");
        assert_eq!(ack_then_label.dual_ownership(), 0);
        // Any other write of the old owner has to complete before the label write starts: a
        // status write in flight while the object is relabelled is a violation.
        let status_in_flight = handover("databaseclusters", "databaseclusters/status");
        assert_eq!(status_in_flight.dual_ownership(), 1);
        // A label write that started before the acknowledgement does not separate anything.
        let label_first = tail(vec![
            timed(assigner, "databaseclusters", "db", 900, 1800, 200),
            timed(old, "databaseclusters", "db", 1000, 1400, 200),
            timed(new, "statefulsets", "db", 1900, 1950, 200),
        ]);
        assert_eq!(label_first.dual_ownership(), 1);
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
