//! Reading the API server's audit log: the ground truth of who wrote what, with which
//! user agent, at which etcd revision. One event type and one parser serve the e2e tests
//! and the bench (which tails the log with [`LogTail`]); [`Ownership`] is the oracle that
//! checks from it that every shard write came from the process holding the shard's Lease.
//!
//! The local control plane's audit policy (`hack/audit-policy.yaml`) logs writes to
//! DatabaseClusters, their children and Leases with their response objects, which is what
//! the revision order needs.

mod event;
mod leases;
mod operated;
mod order;
mod ownership;
pub mod synthetic;
mod tail;

#[cfg(test)]
mod tests;

use std::path::Path;

pub use event::{
    AuditEvent, AuditUser, ObjectRef, Outcome, ResponseObject, ResponseStatus, parse_line,
    parse_line_checked,
};
pub use leases::{Holder, LeaseHistory};
pub use operated::Operated;
pub use order::{Basis, Position, RevisionClock};
pub use ownership::{Ownership, Scope, ShardWrite};
pub use tail::LogTail;

/// Every completed audit event (stage ResponseComplete) in the log.
pub fn read_events(path: &Path) -> anyhow::Result<Vec<AuditEvent>> {
    LogTail::from_start(path.to_path_buf()).read_new(|_| true)
}

/// Completed events about objects in `namespace`.
pub fn events_in_namespace(path: &Path, namespace: &str) -> anyhow::Result<Vec<AuditEvent>> {
    let needle = namespace_needle(namespace);
    Ok(LogTail::from_start(path.to_path_buf())
        .read_new(|line| line.contains(&needle))?
        .into_iter()
        .filter(|e| e.in_namespace(namespace))
        .collect())
}

/// The ownership oracle over the whole log, for the Leases of `leases_namespace` and the
/// objects of `objects_namespace`.
pub fn ownership(
    path: &Path,
    leases_namespace: &str,
    objects_namespace: &str,
) -> anyhow::Result<Ownership> {
    let (leases, objects) = (
        namespace_needle(leases_namespace),
        namespace_needle(objects_namespace),
    );
    let mut log = LogTail::from_start(path.to_path_buf());
    let events = log.read_new(|line| line.contains(&leases) || line.contains(&objects))?;
    let scope = Scope {
        leases_namespace,
        objects_namespace,
    };
    let mut ownership = Ownership::check(&events, scope);
    ownership.unreadable_lines = log.unreadable_lines();
    Ok(ownership)
}

/// Panics unless the whole log shows shard writes to the objects of `objects_namespace`
/// and every one of them came from the holder of its shard's Lease (in
/// `leases_namespace`) at the time: never two owners.
pub fn assert_one_owner(path: &Path, leases_namespace: &str, objects_namespace: &str) {
    let ownership = match ownership(path, leases_namespace, objects_namespace) {
        Ok(ownership) => ownership,
        Err(error) => panic!("reading the audit log: {error:#}"),
    };
    assert_eq!(
        ownership.dual_ownership(),
        0,
        "{}",
        ownership.violations().join("\n")
    );
    assert!(
        !ownership.writes.is_empty(),
        "no shard write in the audit log"
    );
}

/// [`ownership`] for the shards of `operated` (another sharded operator).
pub fn ownership_of(
    path: &Path,
    leases_namespace: &str,
    objects_namespace: &str,
    operated: &Operated,
) -> anyhow::Result<Ownership> {
    let mut log = LogTail::from_start(path.to_path_buf());
    let events = log.read_new(|line| {
        line.contains(leases_namespace)
            || line.contains(objects_namespace)
            || (operated.cluster_scoped && line.contains(&operated.resource))
    })?;
    let scope = Scope {
        leases_namespace,
        objects_namespace,
    };
    let mut ownership = Ownership::check_operated(&events, scope, operated);
    ownership.unreadable_lines = log.unreadable_lines();
    Ok(ownership)
}

/// A substring every line about an object in `namespace` contains (a cheap pre-filter
/// before parsing; the parsed `objectRef` decides).
pub fn namespace_needle(namespace: &str) -> String {
    format!("\"namespace\":\"{namespace}\"")
}
