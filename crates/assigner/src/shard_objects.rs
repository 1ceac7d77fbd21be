//! `Shard` objects: one report per shard index in the operator namespace. The assigner
//! creates them, owns `status.state`, `status.objects` and `status.conditions` (server-side
//! apply with its own field manager, so the worker's fields are left alone), and deletes
//! retired ones.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use shardop::protocol::LeaseState;
use shardop::{OperatorNames, Shard, ShardIndex, ShardSpec, ShardState, ShardStatus};

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

/// The index of `object` if it is one of the Shard objects of the operator `names` (named
/// after its own index by its own scheme); another operator's Shards in the same namespace
/// are not.
pub fn index_of(names: &OperatorNames, object: &Shard) -> Option<ShardIndex> {
    let shard = ShardIndex(object.spec.index);
    (object.name_any() == names.shard_object_name(shard)).then_some(shard)
}

/// Creates the Shard object of `shard` (`shard-<i>` for the default operator; exists
/// already is fine).
pub async fn create(
    client: Client,
    names: &OperatorNames,
    namespace: &str,
    shard: ShardIndex,
) -> Result<(), kube::Error> {
    let api: Api<Shard> = Api::namespaced(client, namespace);
    let object = Shard {
        metadata: ObjectMeta {
            name: Some(names.shard_object_name(shard)),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        spec: ShardSpec { index: shard.0 },
        status: None,
    };
    let params = PostParams {
        field_manager: Some(names.assigner_field_manager()),
        ..Default::default()
    };
    match api.create(&params, &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(()),
        Err(err) => Err(err),
    }
}

/// Deletes the Shard object of `shard` (gone already is fine).
pub async fn delete(
    client: Client,
    names: &OperatorNames,
    namespace: &str,
    shard: ShardIndex,
) -> Result<(), kube::Error> {
    let api: Api<Shard> = Api::namespaced(client, namespace);
    match api
        .delete(&names.shard_object_name(shard), &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(err) => Err(err),
    }
}

/// Applies the assigner's status fields. `previous` is the observed status, whose `Live`
/// condition keeps its transition time when its status did not change.
pub async fn apply_status(
    client: Client,
    names: &OperatorNames,
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
        "metadata": { "name": names.shard_object_name(shard) },
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
    let params = PatchParams::apply(&names.assigner_field_manager()).force();
    api.patch_status(
        &names.shard_object_name(shard),
        &params,
        &Patch::Apply(&patch),
    )
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

    #[test]
    fn only_the_operators_own_shard_objects_are_its_shards() {
        let shard = |name: &str, index: u32| Shard {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            spec: ShardSpec { index },
            status: None,
        };
        let default = OperatorNames::default();
        let tenants = OperatorNames::new("tenants").unwrap();
        assert_eq!(
            index_of(&default, &shard("shard-2", 2)),
            Some(ShardIndex(2))
        );
        assert_eq!(index_of(&default, &shard("tenants-shard-2", 2)), None);
        assert_eq!(
            index_of(&tenants, &shard("tenants-shard-2", 2)),
            Some(ShardIndex(2))
        );
        assert_eq!(index_of(&tenants, &shard("shard-2", 2)), None);
        // A name that does not match its own index is nobody's.
        assert_eq!(index_of(&default, &shard("shard-2", 3)), None);
    }
}
