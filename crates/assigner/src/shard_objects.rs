//! `Shard` objects: one report per shard index in the operator namespace. The assigner
//! creates them, owns `status.state`, `status.objects` and `status.conditions` (server-side
//! apply with its own field manager, so the worker's fields are left alone), and deletes
//! retired ones.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use shardop_api::constants::ASSIGNER_FIELD_MANAGER;
use shardop_api::protocol::LeaseState;
use shardop_api::{Shard, ShardIndex, ShardSpec, ShardState, ShardStatus};

/// Condition type the assigner sets: whether some worker serves the shard.
pub const LIVE_CONDITION: &str = "Live";

/// The assigner's part of a Shard's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssignerStatus {
    pub state: ShardState,
    pub objects: i64,
    /// `(status, reason)` of the `Live` condition.
    pub live: (&'static str, &'static str),
}

impl AssignerStatus {
    /// The status for a shard in `state` with `objects` labelled objects and this Lease.
    pub fn new(state: ShardState, objects: usize, lease: &LeaseState) -> Self {
        let live = match (state, lease) {
            (ShardState::TakenOver, LeaseState::Held { .. }) => ("True", "TakenOver"),
            (_, LeaseState::Held { .. }) => ("True", "Held"),
            (_, LeaseState::Expired { .. }) => ("False", "Expired"),
            (_, LeaseState::Released) => ("False", "Released"),
            (_, LeaseState::Absent) => ("False", "NoLease"),
        };
        Self {
            state,
            objects: i64::try_from(objects).unwrap_or(i64::MAX),
            live,
        }
    }

    /// Whether `observed` (a Shard's current status) already says this.
    pub fn matches(&self, observed: Option<&ShardStatus>) -> bool {
        observed.is_some_and(|s| {
            s.state == Some(self.state)
                && s.objects == Some(self.objects)
                && live_condition(s)
                    .is_some_and(|c| c.status == self.live.0 && c.reason == self.live.1)
        })
    }
}

fn live_condition(status: &ShardStatus) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.type_ == LIVE_CONDITION)
}

/// Creates `shard-<i>` (fails with 409 if it exists, which is fine).
pub async fn create(client: Client, namespace: &str, shard: ShardIndex) -> Result<(), kube::Error> {
    let api: Api<Shard> = Api::namespaced(client, namespace);
    let object = Shard {
        metadata: ObjectMeta {
            name: Some(shard.shard_object_name()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        spec: ShardSpec { index: shard.0 },
        status: None,
    };
    let params = PostParams {
        field_manager: Some(ASSIGNER_FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    match api.create(&params, &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(err) => Err(err),
    }
}

/// Deletes `shard-<i>` (gone already is fine).
pub async fn delete(client: Client, namespace: &str, shard: ShardIndex) -> Result<(), kube::Error> {
    let api: Api<Shard> = Api::namespaced(client, namespace);
    match api
        .delete(&shard.shard_object_name(), &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
}

/// Applies the assigner's status fields. `previous` is the observed status, whose `Live`
/// condition keeps its transition time when its status did not change.
pub async fn apply_status(
    client: Client,
    namespace: &str,
    shard: ShardIndex,
    status: &AssignerStatus,
    previous: Option<&ShardStatus>,
) -> Result<(), kube::Error> {
    let api: Api<Shard> = Api::namespaced(client, namespace);
    let transition = previous
        .and_then(live_condition)
        .filter(|c| c.status == status.live.0)
        .map_or_else(
            || Time(Timestamp::now()),
            |c| c.last_transition_time.clone(),
        );
    let message = match status.live.1 {
        "Held" => "the shard's own worker holds its Lease",
        "TakenOver" => "another worker holds the Lease while the shard's worker is away",
        "Expired" => "the holder stopped renewing the Lease",
        "Released" => "the last holder released the Lease",
        _ => "no Lease exists for this shard",
    };
    let patch = json!({
        "apiVersion": "shardop.dev/v1alpha1",
        "kind": "Shard",
        "metadata": { "name": shard.shard_object_name() },
        "status": {
            "state": status.state,
            "objects": status.objects,
            "conditions": [{
                "type": LIVE_CONDITION,
                "status": status.live.0,
                "reason": status.live.1,
                "message": message,
                "lastTransitionTime": transition,
            }],
        },
    });
    let params = PatchParams::apply(ASSIGNER_FIELD_MANAGER).force();
    api.patch_status(&shard.shard_object_name(), &params, &Patch::Apply(&patch))
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_matching_ignores_the_workers_fields() {
        let held = LeaseState::Held {
            holder: "shardop-worker-1".into(),
        };
        let desired = AssignerStatus::new(ShardState::Active, 3, &held);
        let observed = ShardStatus {
            holder: Some("shardop-worker-1".into()),
            state: Some(ShardState::Active),
            objects: Some(3),
            queue_depth: Some(7),
            conditions: vec![Condition {
                type_: LIVE_CONDITION.into(),
                status: "True".into(),
                reason: "Held".into(),
                message: String::new(),
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
                observed_generation: None,
            }],
            ..Default::default()
        };
        assert!(desired.matches(Some(&observed)));
        let fewer = AssignerStatus::new(ShardState::Active, 2, &held);
        assert!(!fewer.matches(Some(&observed)));
        assert!(!desired.matches(None));
        let orphaned = AssignerStatus::new(ShardState::Orphaned, 3, &LeaseState::Released);
        assert_eq!(orphaned.live, ("False", "Released"));
    }
}
