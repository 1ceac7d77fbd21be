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

/// The `operation` of the entry a cache keeps in place of the real managedFields
/// ([`trust_marker_for`]). The API server never stores an entry whose operation is not
/// `Apply` or `Update` or that has no `fieldsType`: a write carrying one keeps the live
/// object's managedFields instead. So an object read from the API server cannot carry a
/// forged marker; only a cache's trimming makes one.
const TRUST_MARKER_OPERATION: &str = "ShardLabelTrusted";

/// Whether `entry` records the operator's assigner as an owner of its shard label, or is
/// the cache's marker of that fact.
fn owns_shard_label(entry: &ManagedFieldsEntry, names: &OperatorNames) -> bool {
    entry.manager.as_deref() == Some(names.assigner_field_manager().as_str())
        && entry.subresource.as_deref().unwrap_or_default().is_empty()
        && (is_trust_marker(entry) || label_in_field_set(entry, names))
}

/// Whether `entry` is the cache's marker (see [`TRUST_MARKER_OPERATION`]).
fn is_trust_marker(entry: &ManagedFieldsEntry) -> bool {
    entry.operation.as_deref() == Some(TRUST_MARKER_OPERATION)
        && entry.fields_type.is_none()
        && entry.fields_v1.is_none()
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

/// Whether operator `names`' assigner field manager is among the owners of its shard label.
pub fn shard_label_written_by(
    managed_fields: Option<&[ManagedFieldsEntry]>,
    names: &OperatorNames,
) -> bool {
    managed_fields.is_some_and(|entries| entries.iter().any(|e| owns_shard_label(e, names)))
}

/// The managedFields a cache keeps instead of the real ones: a single entry recording that
/// the assigner owns the shard label when it does, nothing otherwise. Caches drop
/// managedFields for memory; this keeps the one fact the protocol reads from them, in a
/// form [`shard_label_written_by_assigner`] reads back. The entry names the assigner and a
/// marker operation the API server never stores, and no field set: a copy of the real
/// entry's three nested JSON maps cost about 1.5 KiB per cached object.
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
    shard_label_written_by(managed_fields, names).then(|| {
        vec![ManagedFieldsEntry {
            manager: Some(names.assigner_field_manager()),
            operation: Some(TRUST_MARKER_OPERATION.to_owned()),
            ..Default::default()
        }]
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;
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
        assert!(!trusted(&[]));
        assert!(!shard_label_written_by_assigner(None));
    }

    #[test]
    fn the_cache_marker_keeps_exactly_the_trust() {
        let assigner = vec![
            entry("kubectl-client-side-apply", None, &["app"]),
            entry(ASSIGNER_FIELD_MANAGER, None, &[SHARD_LABEL]),
        ];
        let marker = trust_marker(Some(assigner.as_slice()));
        assert_eq!(marker.as_ref().map(Vec::len), Some(1));
        assert!(shard_label_written_by_assigner(marker.as_deref()));
        let hand_edit = vec![entry("kubectl-edit", None, &[SHARD_LABEL])];
        assert_eq!(trust_marker(Some(hand_edit.as_slice())), None);
        assert_eq!(trust_marker(None), None);
    }

    #[test]
    fn the_cache_marker_holds_no_field_set_and_is_no_entry_the_api_server_stores() {
        let assigner = [entry(ASSIGNER_FIELD_MANAGER, None, &[SHARD_LABEL])];
        let marker = trust_marker(Some(&assigner)).unwrap();
        let [entry] = marker.as_slice() else {
            panic!("one entry: {marker:?}")
        };
        assert_eq!(entry.fields_v1, None);
        assert_eq!(entry.fields_type, None);
        assert!(!matches!(
            entry.operation.as_deref(),
            Some("Apply" | "Update")
        ));
        // Someone else's marker-shaped entry, or one on a subresource, is not the marker.
        let other = ManagedFieldsEntry {
            manager: Some("kubectl-edit".to_owned()),
            ..entry.clone()
        };
        assert!(!shard_label_written_by_assigner(Some(&[other])));
        let status = ManagedFieldsEntry {
            subresource: Some("status".to_owned()),
            ..entry.clone()
        };
        assert!(!shard_label_written_by_assigner(Some(&[status])));
    }
}
