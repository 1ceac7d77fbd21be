//! The assigner's writes, each conditional on what it decided from: label patches and
//! Lease edits carry the observed resourceVersion, creates fail if the object exists.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{
    DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams, Preconditions,
};
use kube::{Api, Client};
use serde_json::{Map, Value, json};
use shardop::protocol::{AssignerAction, LeaseStep, ObjectPlacement};
use shardop::{OperatorNames, ShardIndex};

use crate::objects::{self, ObjectKey};
use crate::resources::ShardedKind;

/// How a conditional write ended.
#[derive(Debug)]
pub enum Outcome<T> {
    /// Applied; the server's answer.
    Applied(T),
    /// The precondition failed (409 Conflict), the object to create exists already (409
    /// AlreadyExists) or the object is gone (404): re-decide from the next observation.
    Stale,
}

fn classify<T>(result: Result<T, kube::Error>) -> Result<Outcome<T>, kube::Error> {
    match result {
        Ok(value) => Ok(Outcome::Applied(value)),
        Err(kube::Error::Api(status))
            if status.is_conflict() || status.is_already_exists() || status.is_not_found() =>
        {
            Ok(Outcome::Stale)
        }
        Err(err) => Err(err),
    }
}

/// The labels part of the merge patch that carries out `action` with the label keys of
/// `names` (`None`: not a write).
pub fn label_patch(names: &OperatorNames, action: &AssignerAction) -> Option<Value> {
    let mut labels = Map::new();
    match action {
        AssignerAction::Assign { to } => {
            labels.insert(names.shard_label(), Value::String(to.label_value()));
            labels.insert(names.drain_label(), Value::Null);
        }
        AssignerAction::RequestDrain { to, .. } => {
            labels.insert(names.drain_label(), Value::String(to.label_value()));
        }
        AssignerAction::CancelDrain | AssignerAction::ClearStrayDrain => {
            labels.insert(names.drain_label(), Value::Null);
        }
        AssignerAction::Nothing | AssignerAction::Wait => return None,
    }
    Some(Value::Object(labels))
}

/// Whether `action` is a label write at all.
pub fn is_label_write(action: &AssignerAction) -> bool {
    !matches!(action, AssignerAction::Nothing | AssignerAction::Wait)
}

/// The span of one label write: `object`, the `shard` the action moves it to (none for a
/// drain cancellation), the `action`, and the `result` once the write ended. At info level,
/// so that it is exported over OTLP with the default log level, like the worker's
/// `reconcile` span; it logs nothing by itself.
pub fn label_write_span(key: &ObjectKey, action: &AssignerAction) -> tracing::Span {
    let span = tracing::info_span!(
        "label_write",
        object = %key,
        shard = tracing::field::Empty,
        action = ?action,
        result = tracing::field::Empty,
    );
    if let AssignerAction::Assign { to } | AssignerAction::RequestDrain { to, .. } = action {
        span.record("shard", tracing::field::display(to));
    }
    span
}

/// How a label write ended, for its span: `applied`, `stale` or `error`.
pub fn write_result<T>(result: &Result<Outcome<T>, kube::Error>) -> &'static str {
    match result {
        Ok(Outcome::Applied(_)) => "applied",
        Ok(Outcome::Stale) => "stale",
        Err(_) => "error",
    }
}

/// The shard label to claim by server-side apply instead of a merge patch: an assignment to
/// the value the label already has but that the assigner did not write (a hand edit to the
/// right shard). A merge patch of an unchanged value records no field manager, so the
/// label would stay untrusted and no worker would ever act on it; an apply of the same
/// value makes the assigner a co-owner. Not while a drain label is there too: the apply
/// would leave it, and the label it makes trusted would then read as a drain the shard
/// acknowledges at once (an object moved for nothing); the merge patch removes the drain
/// label first, and the next pass claims the label.
pub fn claim_same_value(
    action: &AssignerAction,
    placement: &ObjectPlacement,
    drain_label: bool,
) -> Option<ShardIndex> {
    match (action, placement) {
        (AssignerAction::Assign { to }, ObjectPlacement::Untrusted { labelled })
            if to == labelled && !drain_label =>
        {
            Some(*to)
        }
        _ => None,
    }
}

/// The API of the object `key` of `kind`: its namespace's, or the cluster's for a
/// cluster-scoped kind.
fn object_api(client: Client, kind: &ShardedKind, key: &ObjectKey) -> Api<DynamicObject> {
    if kind.namespaced {
        Api::namespaced_with(client, &key.namespace, &kind.api)
    } else {
        Api::all_with(client, &kind.api)
    }
}

/// Reads the metadata of the object `key` of `kind`.
pub async fn read_metadata(
    client: Client,
    kind: &ShardedKind,
    key: &ObjectKey,
) -> Result<objects::ObjectMeta, kube::Error> {
    object_api(client, kind, key).get_metadata(&key.name).await
}

/// Claims the shard label `to` by a forced server-side apply of just that label,
/// conditional on `resource_version` (never with a drain label beside it, see
/// [`claim_same_value`]). Returns the object's metadata after the write.
pub async fn claim_shard_label(
    client: Client,
    names: &OperatorNames,
    kind: &ShardedKind,
    key: &ObjectKey,
    resource_version: &str,
    to: ShardIndex,
) -> Result<Outcome<objects::ObjectMeta>, kube::Error> {
    let api = object_api(client, kind, key);
    let mut labels = Map::new();
    labels.insert(names.shard_label(), Value::String(to.label_value()));
    let apply = json!({
        "apiVersion": kind.api.api_version,
        "kind": kind.api.kind,
        "metadata": {
            "name": &*key.name,
            "resourceVersion": resource_version,
            "labels": labels,
        }
    });
    let params = PatchParams::apply(&names.assigner_field_manager()).force();
    classify(
        api.patch_metadata(&key.name, &params, &Patch::Apply(&apply))
            .await,
    )
}

/// Applies `labels` to the object as a JSON merge patch on `metadata.labels`, conditional
/// on `resource_version`. Returns the object's metadata after the write.
pub async fn patch_labels(
    client: Client,
    names: &OperatorNames,
    kind: &ShardedKind,
    key: &ObjectKey,
    resource_version: &str,
    labels: Value,
) -> Result<Outcome<objects::ObjectMeta>, kube::Error> {
    let api = object_api(client, kind, key);
    let patch = json!({
        "metadata": { "resourceVersion": resource_version, "labels": labels }
    });
    let params = PatchParams {
        field_manager: Some(names.assigner_field_manager()),
        ..Default::default()
    };
    classify(
        api.patch_metadata(&key.name, &params, &Patch::Merge(&patch))
            .await,
    )
}

/// Reads `shard`'s Lease from the API server (`None`: there is none), past the watch.
pub async fn read_lease(
    client: Client,
    names: &OperatorNames,
    namespace: &str,
    shard: ShardIndex,
) -> Result<Option<Lease>, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    api.get_opt(&names.shard_lease_name(shard)).await
}

/// Carries out a Lease step for `shard`, conditional on `resource_version` (the observed
/// Lease; ignored for a create).
pub async fn lease_step(
    client: Client,
    names: &OperatorNames,
    namespace: &str,
    shard: ShardIndex,
    resource_version: Option<&str>,
    step: LeaseStep,
) -> Result<Outcome<()>, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let name = names.shard_lease_name(shard);
    let manager = names.assigner_field_manager();
    let annotate = |key: String, value: Value| {
        let mut annotations = Map::new();
        annotations.insert(key, value);
        json!({ "metadata": { "resourceVersion": resource_version, "annotations": annotations } })
    };
    let params = PatchParams {
        field_manager: Some(manager.clone()),
        ..Default::default()
    };
    let result = match step {
        LeaseStep::CreateRetired => {
            let lease =
                holderless_lease(names, namespace, shard, names.retired_annotation(), "true");
            api.create(&create_params(manager), &lease).await.map(drop)
        }
        LeaseStep::CreateHomed(home) => {
            let home = home.label_value();
            let lease = holderless_lease(
                names,
                namespace,
                shard,
                names.home_worker_annotation(),
                &home,
            );
            api.create(&create_params(manager), &lease).await.map(drop)
        }
        LeaseStep::SetHome(home) => {
            let patch = annotate(names.home_worker_annotation(), json!(home.label_value()));
            api.patch(&name, &params, &Patch::Merge(&patch))
                .await
                .map(drop)
        }
        LeaseStep::MarkRetired => {
            let patch = annotate(names.retired_annotation(), json!("true"));
            api.patch(&name, &params, &Patch::Merge(&patch))
                .await
                .map(drop)
        }
        LeaseStep::LiftRetirement => {
            let patch = annotate(names.retired_annotation(), Value::Null);
            api.patch(&name, &params, &Patch::Merge(&patch))
                .await
                .map(drop)
        }
        LeaseStep::RequestRelease => {
            let patch = annotate(names.release_requested_annotation(), json!(manager));
            api.patch(&name, &params, &Patch::Merge(&patch))
                .await
                .map(drop)
        }
        LeaseStep::Delete => {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: resource_version.map(str::to_owned),
                    uid: None,
                }),
                ..Default::default()
            };
            api.delete(&name, &params).await.map(drop)
        }
    };
    classify(result)
}

/// A shard Lease nobody holds yet, carrying one of the assigner's annotations.
fn holderless_lease(
    names: &OperatorNames,
    namespace: &str,
    shard: ShardIndex,
    annotation: String,
    value: &str,
) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(names.shard_lease_name(shard)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                names.shard_lease_label(),
                shard.label_value(),
            )])),
            annotations: Some(BTreeMap::from([(annotation, value.to_owned())])),
            ..Default::default()
        },
        spec: Some(LeaseSpec::default()),
    }
}

fn create_params(field_manager: String) -> PostParams {
    PostParams {
        field_manager: Some(field_manager),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_touch_only_the_protocol_labels() {
        let names = OperatorNames::default();
        let label_patch = |action: &AssignerAction| label_patch(&names, action);
        let to = ShardIndex(3);
        assert_eq!(
            label_patch(&AssignerAction::Assign { to }),
            Some(json!({ "shardop.dev/shard": "3", "shardop.dev/drain": null }))
        );
        assert_eq!(
            label_patch(&AssignerAction::RequestDrain {
                from: ShardIndex(1),
                to
            }),
            Some(json!({ "shardop.dev/drain": "3" }))
        );
        assert_eq!(
            label_patch(&AssignerAction::CancelDrain),
            Some(json!({ "shardop.dev/drain": null }))
        );
        assert_eq!(label_patch(&AssignerAction::Wait), None);
        assert_eq!(label_patch(&AssignerAction::Nothing), None);
    }

    #[test]
    fn a_hand_edit_to_the_right_shard_is_claimed_by_apply() {
        let to = ShardIndex(3);
        let assign = AssignerAction::Assign { to };
        let same = ObjectPlacement::Untrusted { labelled: to };
        let other = ObjectPlacement::Untrusted {
            labelled: ShardIndex(1),
        };
        assert_eq!(claim_same_value(&assign, &same, false), Some(to));
        // A changed value is recorded for the assigner by the merge patch.
        assert_eq!(claim_same_value(&assign, &other, false), None);
        assert_eq!(
            claim_same_value(
                &assign,
                &ObjectPlacement::Invalid { value: "x".into() },
                false
            ),
            None
        );
        assert_eq!(
            claim_same_value(&AssignerAction::CancelDrain, &same, false),
            None
        );
        // With a drain label beside it, the merge patch (which removes it) goes first.
        assert_eq!(claim_same_value(&assign, &same, true), None);
    }

    #[test]
    fn another_operator_patches_its_own_labels() {
        let tenants = OperatorNames::new("tenants").unwrap();
        let action = AssignerAction::Assign { to: ShardIndex(1) };
        assert_eq!(
            label_patch(&tenants, &action),
            Some(json!({ "tenants.shardop.dev/shard": "1", "tenants.shardop.dev/drain": null }))
        );
        assert!(is_label_write(&action));
        assert!(!is_label_write(&AssignerAction::Wait));
    }

    #[test]
    fn conflicts_existing_and_missing_objects_are_stale_and_other_errors_are_not() {
        let status = |code: u16, reason: &str| {
            Err::<(), _>(kube::Error::Api(Box::new(kube::core::Status {
                code,
                reason: reason.to_owned(),
                ..kube::core::Status::failure("", reason)
            })))
        };
        assert!(matches!(
            classify(status(409, "Conflict")),
            Ok(Outcome::Stale)
        ));
        assert!(matches!(
            classify(status(409, "AlreadyExists")),
            Ok(Outcome::Stale)
        ));
        assert!(matches!(
            classify(status(404, "NotFound")),
            Ok(Outcome::Stale)
        ));
        assert!(classify(status(403, "Forbidden")).is_err());
        assert!(classify(status(422, "Invalid")).is_err());
    }
}
