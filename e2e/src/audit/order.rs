//! Ordering writes by etcd revision.
//!
//! On one API server over one etcd, `metadata.resourceVersion` is the etcd revision of the
//! write, global across every resource: it orders an object's writes against the shard
//! Leases' writes exactly, which request timestamps cannot (a request received first may
//! commit last). Two kinds of writes carry no revision of their own:
//!
//! * a write without a response object (504, a killed client, a `Status` answer to a
//!   delete), and
//! * a write that changed nothing: the API server skips the etcd write and answers with the
//!   object's existing `resourceVersion`, the revision of an *earlier* write, possibly
//!   someone else's.
//!
//! Both are placed by the time they were received: right after the highest revision whose
//! write was complete (audited) before the request arrived. That revision had committed
//! when the request was handled, so the request read at least that state. Every real write
//! committed after its request arrived, so its revision is above that bound, which is how a
//! no-op is told apart: its answer's revision is not.

use jiff::Timestamp;

use super::event::AuditEvent;

/// Where a write sits in the revision order. Ordered by revision first; a write placed by
/// its request time (`after`) comes after the write that made `revision` and before the
/// next revision; ties between those go by arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// The etcd revision.
    pub revision: u64,
    /// Placed after `revision` (by request time) rather than at it.
    pub after: bool,
    /// When the request arrived.
    pub received: Timestamp,
}

/// What a [`Position`] is based on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// The response's `resourceVersion`: the revision the write committed at.
    Revision,
    /// The response named an older revision: the write changed nothing, and is placed by
    /// its request time.
    NoOp,
    /// No response object (or one without a `resourceVersion`): placed by request time.
    RequestTime,
}

/// Which revisions were committed by when: every audited write with a revision, by the
/// time its event completed.
#[derive(Debug, Clone, Default)]
pub struct RevisionClock {
    /// `(stage timestamp, highest revision completed up to then)`, by timestamp.
    completed: Vec<(Timestamp, u64)>,
}

impl RevisionClock {
    /// Learns from every event with a revision.
    pub fn new<'a>(events: impl IntoIterator<Item = &'a AuditEvent>) -> Self {
        let mut completed: Vec<(Timestamp, u64)> = events
            .into_iter()
            .filter_map(|e| Some((e.stage_timestamp, e.resource_version()?)))
            .collect();
        completed.sort_unstable();
        let mut highest = 0;
        for (_, revision) in &mut completed {
            highest = highest.max(*revision);
            *revision = highest;
        }
        Self { completed }
    }

    /// The highest revision whose write completed strictly before `at` (0: none known).
    pub fn committed_before(&self, at: Timestamp) -> u64 {
        let index = self.completed.partition_point(|(t, _)| *t < at);
        index
            .checked_sub(1)
            .map_or(0, |last| self.completed[last].1)
    }

    /// Where `event` sits, and on what basis.
    pub fn place(&self, event: &AuditEvent) -> (Position, Basis) {
        let received = event.request_received_timestamp;
        let floor = self.committed_before(received);
        let by_request_time = |basis| {
            let position = Position {
                revision: floor,
                after: true,
                received,
            };
            (position, basis)
        };
        match event.resource_version() {
            Some(revision) if revision > floor => {
                let position = Position {
                    revision,
                    after: false,
                    received,
                };
                (position, Basis::Revision)
            }
            Some(_) => by_request_time(Basis::NoOp),
            None => by_request_time(Basis::RequestTime),
        }
    }
}
