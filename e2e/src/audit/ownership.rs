//! The ownership oracle: did every write to a DatabaseCluster or its children come from the
//! process that held the writing shard's Lease at that moment?
//!
//! Each shard write (user agent `shardop-worker/shard-<i> (<pod>)`) is placed in etcd
//! revision order ([`super::order`]) and attributed to its shard *and* its process (pod).
//! Two checks follow:
//!
//! * **foreign**: the process did not hold shard `<i>`'s Lease at the write's revision
//!   ([`super::leases`]). This tells apart two processes acting as the same shard, e.g. a
//!   frozen worker resuming after another one took its Lease.
//! * **cross-shard**: two shards wrote one object while both believed they owned it: two
//!   consecutive shard writes to an object (or its children) by different shards without an
//!   assigner label write between them in revision order (the handover: acknowledgement,
//!   then the new label).
//!
//! Writes by anyone else — the assigner's label writes, the garbage collector, the
//! namespace controller, a user — are not shard writes. A write audited as 504 or without a
//! status may still have been applied: a shard write is checked as if it had, at its
//! request time, and flagged; an assigner label write separates a handover at its request
//! time (a leader killed mid-write leaves a 504 whose label the new owner then acts on).

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use super::event::{AuditEvent, Outcome};
use super::leases::{Holder, LeaseHistory};
use super::operated::Operated;
use super::order::{Basis, Position, RevisionClock};

/// Which namespaces a check looks at: the shard Leases live in the operator's namespace,
/// the objects in theirs.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// The namespace of the `shardop-shard-<i>` Leases.
    pub leases_namespace: &'a str,
    /// The namespace of the DatabaseClusters.
    pub objects_namespace: &'a str,
}

/// One write by a shard to a DatabaseCluster or one of its children.
#[derive(Debug, Clone)]
pub struct ShardWrite {
    /// The DatabaseCluster.
    pub object: String,
    /// `<verb> <resource>[/<subresource>] <name>`.
    pub request: String,
    /// The shard in the user agent.
    pub shard: u32,
    /// The process (pod) in the user agent.
    pub pod: String,
    /// Where it sits in revision order.
    pub position: Position,
    /// What the position is based on.
    pub basis: Basis,
    /// Audited as 504 or without a status: it may or may not have been applied.
    pub possibly_applied: bool,
    /// Who held the shard's Lease at `position` (`None`: nobody; unknown is kept apart).
    pub holder: Option<String>,
    /// No Lease write of the shard precedes it in the log, so the holder is unknown.
    pub holder_unknown: bool,
}

impl ShardWrite {
    /// Whether its process held the shard's Lease at its position (unknown counts as held:
    /// the log does not reach back far enough to say otherwise).
    pub fn by_holder(&self) -> bool {
        self.holder_unknown || self.holder.as_deref() == Some(self.pod.as_str())
    }
}

impl fmt::Display for ShardWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Position {
            revision, received, ..
        } = self.position;
        let at = match self.basis {
            Basis::Revision => format!("revision {revision}"),
            Basis::NoOp => format!("after revision {revision} (no-op, by request time {received})"),
            Basis::RequestTime => {
                format!(
                    "after revision {revision} (no response revision, by request time {received})"
                )
            }
        };
        let holder = match (&self.holder, self.holder_unknown) {
            (_, true) => "unknown".to_owned(),
            (Some(pod), false) => pod.clone(),
            (None, false) => "nobody".to_owned(),
        };
        write!(
            f,
            "{}: {} by {} as shard {} at {at}; Lease {} held by {holder}{}",
            self.object,
            self.request,
            self.pod,
            self.shard,
            self.shard,
            if self.possibly_applied {
                " (possibly applied: audited without success)"
            } else {
                ""
            }
        )
    }
}

/// The result of the oracle over a log.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    /// Every shard write to an object of the scope, in revision order.
    pub writes: Vec<ShardWrite>,
    /// Indexes into `writes` of the foreign writes.
    pub foreign: Vec<usize>,
    /// Indexes into `writes` of the cross-shard writes (the later write of each pair).
    pub cross_shard: Vec<usize>,
    /// Lines of the log that were no audit event (set by whoever read the log): the API
    /// server lost events, e.g. a Lease write, and the checks ran on an incomplete log.
    pub unreadable_lines: usize,
}

impl Ownership {
    /// Runs both checks over `events` (any order, any namespaces; only `scope`'s are used).
    pub fn check<'a>(events: impl IntoIterator<Item = &'a AuditEvent>, scope: Scope<'_>) -> Self {
        Self::check_operated(events, scope, &Operated::default())
    }

    /// [`check`](Self::check) for the shards of `operated` (another operator than the
    /// DatabaseCluster one, e.g. a cluster-scoped kind).
    pub fn check_operated<'a>(
        events: impl IntoIterator<Item = &'a AuditEvent>,
        scope: Scope<'_>,
        operated: &Operated,
    ) -> Self {
        let events: Vec<&AuditEvent> = events.into_iter().collect();
        let clock = RevisionClock::new(events.iter().copied());
        let leases = LeaseHistory::of_operator(
            events.iter().copied(),
            scope.leases_namespace,
            &clock,
            operated,
        );
        let mut entries: Vec<Entry> = events
            .iter()
            .filter(|e| operated.in_scope(e, scope.objects_namespace))
            .filter_map(|e| Entry::of(e, &clock, &leases, operated))
            .collect();
        entries.sort_by_key(|entry| entry.position());
        let cross_shard_at = cross_shard_indexes(&entries);
        let mut writes = Vec::new();
        let mut foreign = Vec::new();
        let mut cross_shard = Vec::new();
        for (index, entry) in entries.into_iter().enumerate() {
            let Entry::Shard(write) = entry else {
                continue;
            };
            if !write.by_holder() {
                foreign.push(writes.len());
            }
            if cross_shard_at.contains(&index) {
                cross_shard.push(writes.len());
            }
            writes.push(write);
        }
        Self {
            writes,
            foreign,
            cross_shard,
            unreadable_lines: 0,
        }
    }

    /// The foreign writes.
    pub fn foreign_writes(&self) -> impl Iterator<Item = &ShardWrite> {
        self.foreign.iter().map(|&i| &self.writes[i])
    }

    /// The cross-shard writes.
    pub fn cross_shard_writes(&self) -> impl Iterator<Item = &ShardWrite> {
        self.cross_shard.iter().map(|&i| &self.writes[i])
    }

    /// Writes outside single ownership: foreign or cross-shard (each write counted once).
    /// The figure that must be 0.
    pub fn dual_ownership(&self) -> usize {
        self.violating().len()
    }

    /// Writes placed by request time (no-ops and writes without a response revision).
    pub fn ordered_by_request_time(&self) -> usize {
        self.writes
            .iter()
            .filter(|w| w.basis != Basis::Revision)
            .count()
    }

    /// Writes audited without success that may have been applied.
    pub fn possibly_applied(&self) -> usize {
        self.writes.iter().filter(|w| w.possibly_applied).count()
    }

    /// Writes for which no Lease write of their shard precedes them in the log.
    pub fn holder_unknown(&self) -> usize {
        self.writes.iter().filter(|w| w.holder_unknown).count()
    }

    /// One line per violating write, for an assertion message or a log (after a warning
    /// when the log is incomplete).
    pub fn violations(&self) -> Vec<String> {
        let incomplete = (self.unreadable_lines > 0).then(|| {
            format!(
                "the audit log is incomplete: {} unreadable lines (see kube-apiserver.log)",
                self.unreadable_lines
            )
        });
        let violating = self.violating();
        if violating.is_empty() {
            return Vec::new();
        }
        incomplete
            .into_iter()
            .chain(violating.into_iter().map(|i| {
                let kind = match (self.foreign.contains(&i), self.cross_shard.contains(&i)) {
                    (true, true) => "foreign, cross-shard",
                    (true, false) => "foreign",
                    _ => "cross-shard",
                };
                format!("{kind}: {}", self.writes[i])
            }))
            .collect()
    }

    fn violating(&self) -> BTreeSet<usize> {
        self.foreign
            .iter()
            .chain(&self.cross_shard)
            .copied()
            .collect()
    }
}

/// An event of the objects' namespace that matters to ownership.
enum Entry {
    /// A shard write.
    Shard(ShardWrite),
    /// An assigner label write on the DatabaseCluster `object`.
    Label { object: String, position: Position },
}

impl Entry {
    fn of(
        event: &AuditEvent,
        clock: &RevisionClock,
        leases: &LeaseHistory<'_>,
        operated: &Operated,
    ) -> Option<Self> {
        let object = (operated.owner)(event)?;
        if operated.is_assigner_label_request(event) {
            let (position, _) = clock.place(event);
            return Some(Self::Label { object, position });
        }
        let (shard, pod) = (operated.worker_shard(event)?, operated.worker_pod(event)?);
        let outcome = event.outcome();
        if !event.is_write() || outcome == Outcome::Rejected {
            return None;
        }
        let (position, basis) = clock.place(event);
        let (holder, holder_unknown) = match leases.holder_at(shard, position) {
            Holder::Unknown => (None, true),
            Holder::Nobody => (None, false),
            Holder::Pod(pod) => (Some(pod.to_owned()), false),
        };
        let request = match event.subresource() {
            Some(sub) => format!("{} {}/{sub} {}", event.verb, event.resource(), event.name()),
            None => format!("{} {} {}", event.verb, event.resource(), event.name()),
        };
        Some(Self::Shard(ShardWrite {
            object,
            request,
            shard,
            pod: pod.to_owned(),
            position,
            basis,
            possibly_applied: outcome == Outcome::PossiblyApplied,
            holder,
            holder_unknown,
        }))
    }

    fn position(&self) -> Position {
        match self {
            Self::Shard(write) => write.position,
            Self::Label { position, .. } => *position,
        }
    }

    fn object(&self) -> &str {
        match self {
            Self::Shard(write) => &write.object,
            Self::Label { object, .. } => object,
        }
    }
}

/// Indexes (into `entries`, in revision order) of shard writes that follow another shard's
/// write to the same object with no assigner label write in between.
fn cross_shard_indexes(entries: &[Entry]) -> BTreeSet<usize> {
    // Per object: the last shard to write it, and whether a label write came since.
    let mut last: HashMap<&str, (u32, bool)> = HashMap::new();
    let mut found = BTreeSet::new();
    for (index, entry) in entries.iter().enumerate() {
        match entry {
            Entry::Label { .. } => {
                if let Some((_, relabelled)) = last.get_mut(entry.object()) {
                    *relabelled = true;
                }
            }
            Entry::Shard(write) => {
                let previous = last.insert(entry.object(), (write.shard, false));
                if previous.is_some_and(|(shard, relabelled)| shard != write.shard && !relabelled) {
                    found.insert(index);
                }
            }
        }
    }
    found
}
