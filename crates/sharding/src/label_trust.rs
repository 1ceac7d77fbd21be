//! Who last wrote an object's shard label, read from `metadata.managedFields`.
//!
//! A worker acts on an object only when the assigner wrote its shard label: a hand edit
//! that moves an object to another shard must not make that shard start reconciling it
//! (see "Who may write the labels" in `docs/shard-protocol.md`). The API server records the
//! writer of every field: a write that *changes* a field's value makes its manager the
//! field's only owner (an apply of the same value adds the applier as a co-owner; a patch of
//! the same value changes nothing). So "the assigner's field manager owns the shard label"
//! holds exactly while nobody else changed the label since the assigner wrote it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};

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
/// label in `managed_fields`, as the API server sends them (see [`shard_label_trusted`] for
/// an object from a trimmed cache).
pub fn shard_label_written_by_assigner(managed_fields: Option<&[ManagedFieldsEntry]>) -> bool {
    shard_label_written_by(managed_fields, &OperatorNames::default())
}

/// Whether operator `names`' assigner field manager is among the owners of its shard label
/// in `managed_fields`, as the API server sends them. A cache's
/// [marker](trim_to_trust_marker) is not read here: it needs the rest of the metadata (see
/// [`shard_label_trusted`]).
pub fn shard_label_written_by(
    managed_fields: Option<&[ManagedFieldsEntry]>,
    names: &OperatorNames,
) -> bool {
    managed_fields.is_some_and(|entries| entries.iter().any(|e| owns_shard_label(e, names)))
}

/// Whether operator `names`' assigner wrote the shard label of the object `meta`: its
/// managed fields say so, or they were replaced by a cache's
/// [marker](trim_to_trust_marker) of that fact.
pub fn shard_label_trusted(meta: &ObjectMeta, names: &OperatorNames) -> bool {
    is_trust_marker(meta) || shard_label_written_by(meta.managed_fields.as_deref(), names)
}

/// Whether `meta` carries the cache's marker: a present but empty managedFields list *and*
/// a present but empty selfLink.
///
/// The API server sends neither: it omits both fields when empty (`omitempty`), a write
/// that sets an empty managedFields list leaves the stored entries as they were, and
/// selfLink is no longer set at all (Kubernetes 1.24 on). An empty list alone is not
/// enough: kube's own idiom for dropping managed fields,
/// `.modify(|o| o.managed_fields_mut().clear())`, makes exactly that, and an object
/// trimmed so by someone else would then be trusted whoever wrote its label. Nothing in
/// kube sets an empty selfLink. Neither part allocates: an empty `Vec` and an empty
/// `String` hold no heap memory, where a marker entry cost about 220 bytes in three
/// allocations at every cached object.
fn is_trust_marker(meta: &ObjectMeta) -> bool {
    meta.managed_fields.as_ref().is_some_and(Vec::is_empty) && meta.self_link.as_deref() == Some("")
}

/// Replaces the managed fields of a cached object by the cache's marker when operator
/// `names`' assigner owns the shard label, and by none otherwise. Caches drop managedFields
/// for memory (a copy of the real entry's three nested JSON maps cost about 1.5 KiB per
/// cached object); this keeps the one fact the protocol reads from them, in a form
/// [`shard_label_trusted`] reads back and that neither the API server nor kube's idioms
/// produce (see `is_trust_marker`). Trimming a trimmed object keeps its trust; an object
/// whose managed fields were dropped by other means reads as untrusted.
pub fn trim_to_trust_marker(meta: &mut ObjectMeta, names: &OperatorNames) {
    let trusted = shard_label_trusted(meta, names);
    meta.managed_fields = trusted.then(Vec::new);
    meta.self_link = trusted.then(String::new);
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
        assert!(!shard_label_written_by_assigner(None));
    }

    fn meta_with(managed_fields: Option<Vec<ManagedFieldsEntry>>) -> ObjectMeta {
        ObjectMeta {
            name: Some("db".into()),
            managed_fields,
            ..Default::default()
        }
    }

    fn trimmed(mut meta: ObjectMeta) -> ObjectMeta {
        trim_to_trust_marker(&mut meta, &OperatorNames::default());
        meta
    }

    fn trusted(meta: &ObjectMeta) -> bool {
        shard_label_trusted(meta, &OperatorNames::default())
    }

    #[test]
    fn the_cache_marker_keeps_exactly_the_trust() {
        let assigner = vec![
            entry("kubectl-client-side-apply", None, &["app"]),
            entry(ASSIGNER_FIELD_MANAGER, None, &[SHARD_LABEL]),
        ];
        let marked = trimmed(meta_with(Some(assigner)));
        assert_eq!(marked.managed_fields, Some(Vec::new()));
        assert!(trusted(&marked));
        // Trimming a trimmed object keeps the marker.
        assert_eq!(trimmed(marked.clone()), marked);
        let hand_edit = trimmed(meta_with(Some(vec![entry(
            "kubectl-edit",
            None,
            &[SHARD_LABEL],
        )])));
        assert_eq!(hand_edit.managed_fields, None);
        assert!(!trusted(&hand_edit));
        assert!(!trusted(&trimmed(meta_with(None))));
    }

    #[test]
    fn managed_fields_cleared_the_kube_way_are_not_the_marker() {
        use kube::ResourceExt;
        // A hand-edited label, and managed fields dropped with kube's idiom (as
        // kube-runtime's docs suggest for caches) instead of through the trim.
        let mut pod = k8s_openapi::api::core::v1::Pod {
            metadata: meta_with(Some(vec![entry("kubectl-edit", None, &[SHARD_LABEL])])),
            ..Default::default()
        };
        pod.managed_fields_mut().clear();
        assert_eq!(pod.metadata.managed_fields, Some(Vec::new()));
        assert!(!trusted(&pod.metadata), "the label's writer is unknown");
        // Through the trim afterwards, it stays untrusted.
        assert!(!trusted(&trimmed(pod.metadata.clone())));
        // Nor does an object that never had managed fields become trusted.
        let mut bare = k8s_openapi::api::core::v1::Pod::default();
        bare.managed_fields_mut().clear();
        assert!(!trusted(&bare.metadata));
    }

    #[test]
    fn the_cache_marker_allocates_nothing_and_no_object_read_from_the_api_server_has_it() {
        let marked = trimmed(meta_with(Some(vec![entry(
            ASSIGNER_FIELD_MANAGER,
            None,
            &[SHARD_LABEL],
        )])));
        assert_eq!(
            marked.managed_fields.as_ref().map(Vec::capacity),
            Some(0),
            "the marker holds no allocation"
        );
        assert_eq!(marked.self_link.as_ref().map(String::capacity), Some(0));
        // The API server omits managedFields when there are none, and selfLink: such an
        // object reads as untrusted, not as the marker.
        let served: ObjectMeta = serde_json::from_value(json!({
            "name": "db",
            "labels": { SHARD_LABEL: "1" },
        }))
        .unwrap();
        assert_eq!(served.managed_fields, None);
        assert!(!trusted(&served));
    }
}
