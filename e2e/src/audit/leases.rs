//! Who held each shard Lease at each revision, rebuilt from the Lease writes' responses.
//!
//! Every acquire, renew, release and hand-back request answers with the Lease as stored,
//! so `spec.holderIdentity` of the response is the holder from that revision until the
//! next Lease write. A delete by the assigner (a retired shard's Lease) leaves no holder.
//! A delete by anyone else — the namespace controller's `deletecollection` when a test's
//! namespace goes away, a user — is not a hand-over: the last holder keeps serving until
//! its next renewal fails, and nobody else can hold the Lease before re-creating it, which
//! is itself a Lease write. So those deletions do not end the last holder's tenure here,
//! and its last writes (finalizer removals of a namespace being deleted) are not foreign.

use std::collections::HashMap;

use super::event::{AuditEvent, Outcome};
use super::operated::Operated;
use super::order::{Position, RevisionClock};

/// Who held a shard Lease at a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder<'a> {
    /// No Lease write of the shard precedes it in the log.
    Unknown,
    /// Released or deleted: nobody.
    Nobody,
    /// The process (pod name) in `holderIdentity`.
    Pod(&'a str),
}

/// The holder history of every shard Lease in one namespace.
#[derive(Debug, Default)]
pub struct LeaseHistory<'a> {
    by_shard: HashMap<u32, Vec<(Position, Option<&'a str>)>>,
}

impl<'a> LeaseHistory<'a> {
    /// Collects the holder changes of the shard Leases (`shardop-shard-<i>`) in `namespace`.
    pub fn new(
        events: impl IntoIterator<Item = &'a AuditEvent>,
        namespace: &str,
        clock: &RevisionClock,
    ) -> Self {
        Self::of_operator(events, namespace, clock, &Operated::default())
    }

    /// [`new`](Self::new) for the shard Leases (`<operator>-shard-<i>`) of `operated`.
    pub fn of_operator(
        events: impl IntoIterator<Item = &'a AuditEvent>,
        namespace: &str,
        clock: &RevisionClock,
        operated: &Operated,
    ) -> Self {
        let mut by_shard: HashMap<u32, Vec<(Position, Option<&'a str>)>> = HashMap::new();
        for event in events {
            let Some(shard) = shard_lease(event, namespace, operated) else {
                continue;
            };
            let Some(holder) = holder_after(event, operated) else {
                continue;
            };
            let (position, _) = clock.place(event);
            by_shard.entry(shard).or_default().push((position, holder));
        }
        for history in by_shard.values_mut() {
            history.sort_by_key(|(position, _)| *position);
        }
        Self { by_shard }
    }

    /// The holder of `shard`'s Lease at `position`: the last holder written before it.
    pub fn holder_at(&self, shard: u32, position: Position) -> Holder<'a> {
        let Some(history) = self.by_shard.get(&shard) else {
            return Holder::Unknown;
        };
        let index = history.partition_point(|(at, _)| *at <= position);
        match index.checked_sub(1).map(|last| history[last].1) {
            None => Holder::Unknown,
            Some(None) => Holder::Nobody,
            Some(Some(pod)) => Holder::Pod(pod),
        }
    }
}

/// The shard whose Lease `event` wrote, if it is a shard Lease in `namespace`.
fn shard_lease(event: &AuditEvent, namespace: &str, operated: &Operated) -> Option<u32> {
    let object = event.object_ref.as_ref()?;
    let is_lease = object.resource == "leases"
        && object.api_group.as_deref() == Some("coordination.k8s.io")
        && object.subresource.is_none();
    if !is_lease || !event.in_namespace(namespace) || !event.is_write() {
        return None;
    }
    operated.shard_of_lease(object.name.as_deref()?)
}

/// The holder a Lease write left (`Some(None)`: nobody), or `None` when it tells nothing:
/// refused or unanswered, or a deletion that is no hand-over (see the module docs).
fn holder_after<'a>(event: &'a AuditEvent, operated: &Operated) -> Option<Option<&'a str>> {
    if event.outcome() != Outcome::Applied {
        return None;
    }
    match event.verb.as_str() {
        "delete" if operated.by_operator(event) => Some(None),
        "create" | "update" | "patch" => {
            let lease = event
                .response_object
                .as_ref()
                .filter(|o| o.kind == "Lease")?;
            Some(lease.holder_identity())
        }
        _ => None,
    }
}
