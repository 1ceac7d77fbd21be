//! Who last wrote an object's shard label, read from `metadata.managedFields`.
//!
//! A worker acts on an object only when the assigner wrote its shard label: a hand edit
//! that moves an object to another shard must not make that shard start reconciling it
//! (see "Who may write the labels" in `docs/shard-protocol.md`). The API server records the
//! writer of every field: a write that *changes* a field's value makes its manager the
//! field's only owner (an apply of the same value adds the applier as a co-owner; a patch of
//! the same value changes nothing). So "the assigner's field manager owns the shard label"
//! holds exactly while nobody else changed the label since the assigner wrote it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

use crate::names::OperatorNames;

/// The key of the shard label in a `fieldsV1` set.
fn label_field(names: &OperatorNames) -> String {
    format!("f:{}", names.shard_label())
}

/// Whether `entry` records the operator's assigner as an owner of its shard label.
fn owns_shard_label(entry: &ManagedFieldsEntry, names: &OperatorNames) -> bool {
    entry.manager.as_deref() == Some(names.assigner_field_manager().as_str())
        && entry.subresource.as_deref().unwrap_or_default().is_empty()
        && label_in_field_set(entry, names)
}

/// Whether `entry`'s field set holds the shard label.
fn label_in_field_set(entry: &ManagedFieldsEntry, names: &OperatorNames) -> bool {
    entry
        .fields_v1
        .as_ref()
        .and_then(|fields| fields.0.get("f:metadata")?.get("f:labels"))
        .is_some_and(|labels| labels.get(label_field(names)).is_some())
}

/// Whether the default operator's assigner field manager is among the owners of the shard
/// label.
pub fn shard_label_written_by_assigner(managed_fields: Option<&[ManagedFieldsEntry]>) -> bool {
    shard_label_written_by(managed_fields, &OperatorNames::default())
}

/// Whether operator `names`' assigner field manager is among the owners of its shard label,
/// or the managed fields are a cache's [marker](trust_marker_for) of that fact.
pub fn shard_label_written_by(
    managed_fields: Option<&[ManagedFieldsEntry]>,
    names: &OperatorNames,
) -> bool {
    managed_fields.is_some_and(|entries| {
        is_trust_marker(entries) || entries.iter().any(|e| owns_shard_label(e, names))
    })
}

/// Whether `entries` are the cache's marker: a present but empty list.
///
/// The API server never sends one: it omits `metadata.managedFields` when the object has
/// no entries (`omitempty`), and a write that sets an empty list leaves the stored entries
/// as they were. So an object read from the API server cannot carry a forged marker; only
/// a cache's trim ([`trust_marker_for`]) makes one. An empty `Vec` allocates nothing, where
/// a marker entry cost about 220 bytes in three allocations at every cached object.
fn is_trust_marker(entries: &[ManagedFieldsEntry]) -> bool {
    entries.is_empty()
}

/// The managedFields a cache keeps instead of the real ones: an empty list when the
/// assigner owns the shard label, none otherwise. Caches drop managedFields for memory;
/// this keeps the one fact the protocol reads from them, in a form
/// [`shard_label_written_by_assigner`] reads back and the API server never sends (see
/// `is_trust_marker`). A copy of the real entry's three nested JSON maps cost about
/// 1.5 KiB per cached object.
pub fn trust_marker(
    managed_fields: Option<&[ManagedFieldsEntry]>,
) -> Option<Vec<ManagedFieldsEntry>> {
    trust_marker_for(managed_fields, &OperatorNames::default())
}

/// [`trust_marker`] for operator `names`: read back by [`shard_label_written_by`].
pub fn trust_marker_for(
    managed_fields: Option<&[ManagedFieldsEntry]>,
    names: &OperatorNames,
) -> Option<Vec<ManagedFieldsEntry>> {
    shard_label_written_by(managed_fields, names).then(Vec::new)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ObjectMeta};
    use serde_json::json;

    use super::*;
    use crate::constants::{ASSIGNER_FIELD_MANAGER, SHARD_LABEL};

    fn entry(manager: &str, subresource: Option<&str>, labels: &[&str]) -> ManagedFieldsEntry {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|l| (format!("f:{l}"), json!({})))
            .collect();
        ManagedFieldsEntry {
            manager: Some(manager.to_owned()),
            operation: Some("Update".to_owned()),
            subresource: subresource.map(str::to_owned),
            fields_type: Some("FieldsV1".to_owned()),
            fields_v1: Some(FieldsV1(json!({ "f:metadata": { "f:labels": labels } }))),
            ..Default::default()
        }
    }

    #[test]
    fn only_the_assigner_owning_the_shard_label_is_trusted() {
        let assigner = entry(ASSIGNER_FIELD_MANAGER, None, &[SHARD_LABEL]);
        let drain_only = entry(ASSIGNER_FIELD_MANAGER, None, &["shardop.dev/drain"]);
        let kubectl = entry("kubectl-label", None, &[SHARD_LABEL]);
        let status = entry(ASSIGNER_FIELD_MANAGER, Some("status"), &[SHARD_LABEL]);
        let trusted =
            |entries: &[ManagedFieldsEntry]| shard_label_written_by_assigner(Some(entries));
        assert!(trusted(std::slice::from_ref(&assigner)));
        // A co-owner (an apply of the same value by someone else) does not take it away.
        assert!(trusted(&[kubectl.clone(), assigner]));
        assert!(!trusted(&[kubectl]));
        assert!(!trusted(&[drain_only]));
        assert!(!trusted(&[status]));
        assert!(!shard_label_written_by_assigner(None));
    }

    #[test]
    fn the_cache_marker_keeps_exactly_the_trust() {
        let assigner = vec![
            entry("kubectl-client-side-apply", None, &["app"]),
            entry(ASSIGNER_FIELD_MANAGER, None, &[SHARD_LABEL]),
        ];
        let marker = trust_marker(Some(assigner.as_slice()));
        assert_eq!(marker, Some(Vec::new()));
        assert!(shard_label_written_by_assigner(marker.as_deref()));
        // Trimming a trimmed object keeps the marker.
        assert_eq!(trust_marker(marker.as_deref()), Some(Vec::new()));
        let hand_edit = vec![entry("kubectl-edit", None, &[SHARD_LABEL])];
        assert_eq!(trust_marker(Some(hand_edit.as_slice())), None);
        assert_eq!(trust_marker(None), None);
    }

    #[test]
    fn the_cache_marker_allocates_nothing_and_no_object_read_from_the_api_server_has_it() {
        let assigner = [entry(ASSIGNER_FIELD_MANAGER, None, &[SHARD_LABEL])];
        let marker = trust_marker(Some(&assigner)).unwrap();
        assert_eq!(marker.capacity(), 0, "the marker holds no allocation");
        // The API server omits managedFields when there are none: such an object reads
        // as untrusted, not as the marker.
        let served: ObjectMeta = serde_json::from_value(json!({
            "name": "db",
            "labels": { SHARD_LABEL: "1" },
        }))
        .unwrap();
        assert_eq!(served.managed_fields, None);
        assert!(!shard_label_written_by_assigner(
            served.managed_fields.as_deref()
        ));
    }
}
