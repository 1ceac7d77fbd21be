//! The assigner's writes, each conditional on what it decided from: label patches and
//! Lease edits carry the observed resourceVersion, creates fail if the object exists.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::Resource;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::{Api, Client};
use serde_json::json;
use shardop_api::constants::{
    ASSIGNER_FIELD_MANAGER, DRAIN_LABEL, RELEASE_REQUESTED_ANNOTATION, RETIRED_ANNOTATION,
    SHARD_LABEL, SHARD_LEASE_LABEL,
};
use shardop_api::protocol::{AssignerAction, LeaseStep, ObjectPlacement};
use shardop_api::{DatabaseCluster, ShardIndex};

use crate::objects::ObjectKey;

/// How a conditional write ended.
#[derive(Debug)]
pub enum Outcome<T> {
    /// Applied; the server's answer.
    Applied(T),
    /// The precondition failed (409) or the object is gone (404): re-decide from the next
    /// observation.
    Stale,
}

fn classify<T>(result: Result<T, kube::Error>) -> Result<Outcome<T>, kube::Error> {
    match result {
        Ok(value) => Ok(Outcome::Applied(value)),
        Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {
            Ok(Outcome::Stale)
        }
        Err(err) => Err(err),
    }
}

/// The labels part of the merge patch that carries out `action` (`None`: not a write).
pub fn label_patch(action: &AssignerAction) -> Option<serde_json::Value> {
    Some(match action {
        AssignerAction::Assign { to } => {
            json!({ SHARD_LABEL: to.label_value(), DRAIN_LABEL: null })
        }
        AssignerAction::RequestDrain { to, .. } => json!({ DRAIN_LABEL: to.label_value() }),
        AssignerAction::CancelDrain | AssignerAction::ClearStrayDrain => {
            json!({ DRAIN_LABEL: null })
        }
        AssignerAction::Nothing | AssignerAction::Wait => return None,
    })
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

/// Claims the shard label `to` by a forced server-side apply of just that label,
/// conditional on `resource_version` (never with a drain label beside it, see
/// [`claim_same_value`]). Returns the object's metadata after the write.
pub async fn claim_shard_label(
    client: Client,
    key: &ObjectKey,
    resource_version: &str,
    to: ShardIndex,
) -> Result<Outcome<PartialObjectMeta<DatabaseCluster>>, kube::Error> {
    let api: Api<DatabaseCluster> = Api::namespaced(client, &key.namespace);
    let apply = json!({
        "apiVersion": DatabaseCluster::api_version(&()),
        "kind": DatabaseCluster::kind(&()),
        "metadata": {
            "name": &*key.name,
            "resourceVersion": resource_version,
            "labels": { SHARD_LABEL: to.label_value() },
        }
    });
    let params = PatchParams::apply(ASSIGNER_FIELD_MANAGER).force();
    classify(
        api.patch_metadata(&key.name, &params, &Patch::Apply(&apply))
            .await,
    )
}

/// Applies `labels` to the object as a JSON merge patch on `metadata.labels`, conditional
/// on `resource_version`. Returns the object's metadata after the write.
pub async fn patch_labels(
    client: Client,
    key: &ObjectKey,
    resource_version: &str,
    labels: serde_json::Value,
) -> Result<Outcome<PartialObjectMeta<DatabaseCluster>>, kube::Error> {
    let api: Api<DatabaseCluster> = Api::namespaced(client, &key.namespace);
    let patch = json!({
        "metadata": { "resourceVersion": resource_version, "labels": labels }
    });
    let params = PatchParams {
        field_manager: Some(ASSIGNER_FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    classify(
        api.patch_metadata(&key.name, &params, &Patch::Merge(&patch))
            .await,
    )
}

/// Carries out a Lease step for `shard`, conditional on `resource_version` (the observed
/// Lease; ignored for a create).
pub async fn lease_step(
    client: Client,
    namespace: &str,
    shard: ShardIndex,
    resource_version: Option<&str>,
    step: LeaseStep,
) -> Result<Outcome<()>, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let name = shard.lease_name();
    let annotate = |value: serde_json::Value| json!({ "metadata": { "resourceVersion": resource_version, "annotations": value } });
    let params = PatchParams {
        field_manager: Some(ASSIGNER_FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    let result = match step {
        LeaseStep::CreateRetired => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(BTreeMap::from([(
                        SHARD_LEASE_LABEL.to_owned(),
                        shard.label_value(),
                    )])),
                    annotations: Some(BTreeMap::from([(
                        RETIRED_ANNOTATION.to_owned(),
                        "true".to_owned(),
                    )])),
                    ..Default::default()
                },
                spec: Some(LeaseSpec::default()),
            };
            let params = PostParams {
                field_manager: Some(ASSIGNER_FIELD_MANAGER.to_owned()),
                ..Default::default()
            };
            api.create(&params, &lease).await.map(drop)
        }
        LeaseStep::MarkRetired => {
            let patch = annotate(json!({ RETIRED_ANNOTATION: "true" }));
            api.patch(&name, &params, &Patch::Merge(&patch))
                .await
                .map(drop)
        }
        LeaseStep::LiftRetirement => {
            let patch = annotate(json!({ RETIRED_ANNOTATION: null }));
            api.patch(&name, &params, &Patch::Merge(&patch))
                .await
                .map(drop)
        }
        LeaseStep::RequestRelease => {
            let patch = annotate(json!({ RELEASE_REQUESTED_ANNOTATION: ASSIGNER_FIELD_MANAGER }));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_touch_only_the_protocol_labels() {
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
}
