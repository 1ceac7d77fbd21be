//! The volume claims of a DatabaseCluster by name: the StatefulSet controller names the claim
//! of ordinal `i` `data-<name>-<i>`, so the worker never lists claims. Which ordinals may
//! exist is recorded in `status.claimOrdinals` (claims of removed replicas are kept on
//! scale-down, `whenScaled: Retain`), and the deletion pass of the cleanup deletes exactly
//! those names ([`CleanupPass`]: later passes read them first).

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, DeleteParams};
use kube::{Client, ResourceExt};
use shardop_api::{DatabaseCluster, DatabaseClusterStatus};
use shardop_runtime::{LeaseGuard, LeaseLost};

use crate::children::DATA_VOLUME;

/// The CRD's maximum of `spec.replicas`: the most claim ordinals an object can ever have had
/// (a test checks it against the generated CRD).
pub const MAX_REPLICAS: i32 = 9;

/// The name of the claim of ordinal `ordinal`.
pub fn claim_name(cluster_name: &str, ordinal: i32) -> String {
    format!("{DATA_VOLUME}-{cluster_name}-{ordinal}")
}

/// The claim names of ordinals `0..ordinals`.
pub fn claim_names(cluster_name: &str, ordinals: i32) -> Vec<String> {
    (0..ordinals.clamp(0, MAX_REPLICAS))
        .map(|ordinal| claim_name(cluster_name, ordinal))
        .collect()
}

/// How many claim ordinals may exist, the value of `status.claimOrdinals` to write and the
/// count the cleanup deletes: the highest replica count seen so far (the recorded one, the
/// spec's and the StatefulSet's). An object that already has a status
/// without the field was created before the field existed and may have been scaled down
/// since: its history is unknown, so every ordinal the CRD allows counts.
///
/// `status` is the object's status as last written (the cached one, or this shard's own
/// newer write the watch has not delivered yet): reading the cached status alone would let
/// two writes in quick succession (a scale 3 → 5 → 2 inside the watch lag) record less
/// than was once created.
pub fn ordinals_to_record(
    cluster: &DatabaseCluster,
    status: Option<&DatabaseClusterStatus>,
    stateful_set: Option<&StatefulSet>,
) -> i32 {
    let recorded = match status {
        None => 0,
        Some(status) => status.claim_ordinals.unwrap_or(MAX_REPLICAS),
    };
    let applied = stateful_set
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    recorded
        .max(cluster.spec.replicas)
        .max(applied)
        .clamp(0, MAX_REPLICAS)
}

/// A claim deletion the API server refused.
#[derive(Debug, thiserror::Error)]
pub enum ClaimDeletionError {
    /// The shard's Lease is not held: nothing more was sent.
    #[error(transparent)]
    LeaseLost(#[from] LeaseLost),
    /// The API server refused to delete a claim.
    #[error("deleting volume claim {claim}: {source}")]
    Refused {
        /// The claim.
        claim: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

impl ClaimDeletionError {
    /// The error of a failed delete of `claim`: one the shard's fenced client refused or
    /// abandoned is a lost Lease (nothing to report on the object, no backoff), anything
    /// else a refusal the Cleanup condition quotes.
    fn of(claim: &str, source: kube::Error) -> Self {
        match shardop_runtime::client::fenced_out(&source) {
            Some(lost) => Self::LeaseLost(lost),
            None => Self::Refused {
                claim: claim.to_owned(),
                source,
            },
        }
    }
}

/// What one deletion pass left behind.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeletionPass {
    /// Claims this pass deleted (gone at once, or terminating).
    pub deleted: usize,
    /// Claims that still exist (terminating, e.g. protected while a pod uses them).
    pub remaining: Vec<String>,
}

/// Which cleanup pass of an object this is, in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CleanupPass {
    /// No earlier pass left the cleanup pending: the StatefulSet and the claims may not
    /// have been deleted yet.
    First,
    /// An earlier pass deleted the StatefulSet (200 or 404) and the claims and found some
    /// claims still there. Nothing recreates the StatefulSet of an object being deleted
    /// (converge never runs for it), so it is not deleted again: each DELETE would only
    /// answer 404, once per pass, for as long as the claims take to go.
    Later,
}

impl CleanupPass {
    /// The pass after `pending_passes` passes that left the cleanup pending.
    pub fn after(pending_passes: u32) -> Self {
        if pending_passes == 0 {
            Self::First
        } else {
            Self::Later
        }
    }
}

/// Deletes the named claims (a missing one is fine), each request fenced by the Lease; stops
/// at the first refusal (the others are retried with it). A later pass looks at each claim
/// first and deletes only one that is not terminating (created again by a StatefulSet sync
/// that raced the deletion): a terminating claim waits for its finalizers, and another
/// DELETE of it would answer 200 and change nothing, a write per claim per pass for as long
/// as its pod takes to stop. Unless `name_every_claim_left`, a later pass also stops at the
/// first claim still terminating: the cleanup looks again anyway, and only the pass that
/// finds none (which has read every claim) ends it.
pub async fn delete_claims(
    client: &Client,
    guard: &LeaseGuard,
    namespace: &str,
    names: &[String],
    cleanup_pass: CleanupPass,
    name_every_claim_left: bool,
) -> Result<DeletionPass, ClaimDeletionError> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let mut pass = DeletionPass::default();
    for name in names {
        guard.check()?;
        if cleanup_pass == CleanupPass::Later {
            match claims.get_opt(name).await {
                Ok(None) => continue,
                Ok(Some(claim)) if claim.metadata.deletion_timestamp.is_some() => {
                    pass.remaining.push(name.clone());
                    if name_every_claim_left {
                        continue;
                    }
                    return Ok(pass);
                }
                Ok(Some(_)) => {}
                Err(source) => return Err(ClaimDeletionError::of(name, source)),
            }
        }
        delete_claim(&claims, name, &mut pass).await?;
    }
    Ok(pass)
}

/// Deletes claim `name` and records in `pass` what is left of it.
async fn delete_claim(
    claims: &Api<PersistentVolumeClaim>,
    name: &str,
    pass: &mut DeletionPass,
) -> Result<(), ClaimDeletionError> {
    match claims.delete(name, &DeleteParams::default()).await {
        // The claim returned: it still exists (its finalizers run), look again.
        Ok(deleted) => {
            pass.deleted += 1;
            if let Some(claim) = deleted.left() {
                pass.remaining.push(claim.name_any());
            }
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(ClaimDeletionError::of(name, source)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_cleanup_without_an_earlier_pending_pass_is_the_first() {
        assert_eq!(CleanupPass::after(0), CleanupPass::First);
        assert_eq!(CleanupPass::after(1), CleanupPass::Later);
        assert_eq!(CleanupPass::after(7), CleanupPass::Later);
    }

    fn record(cluster: &DatabaseCluster, sts: Option<&StatefulSet>) -> i32 {
        ordinals_to_record(cluster, cluster.status.as_ref(), sts)
    }
    use k8s_openapi::api::apps::v1::StatefulSetSpec;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use kube::CustomResourceExt;
    use shardop_api::{DatabaseClusterSpec, DatabaseClusterStatus, ReclaimPolicy, StorageSpec};

    fn cluster(replicas: i32, status: Option<DatabaseClusterStatus>) -> DatabaseCluster {
        let mut c = DatabaseCluster::new(
            "db",
            DatabaseClusterSpec {
                replicas,
                image: "postgres:17".into(),
                resources: None,
                storage: StorageSpec {
                    storage_class_name: None,
                    size: Quantity("1Gi".into()),
                    reclaim_policy: ReclaimPolicy::Delete,
                },
            },
        );
        c.status = status;
        c
    }

    fn recorded(n: Option<i32>) -> Option<DatabaseClusterStatus> {
        Some(DatabaseClusterStatus {
            claim_ordinals: n,
            ..Default::default()
        })
    }

    fn sts(replicas: i32) -> StatefulSet {
        StatefulSet {
            spec: Some(StatefulSetSpec {
                replicas: Some(replicas),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn claim_names_follow_the_stateful_set_controller() {
        assert_eq!(claim_names("db", 2), ["data-db-0", "data-db-1"]);
        assert!(claim_names("db", -1).is_empty());
        assert_eq!(claim_names("db", 100).len(), MAX_REPLICAS as usize);
    }

    #[test]
    fn a_scale_down_keeps_the_highest_ordinal_count() {
        // Scaled from 5 to 2: claims 2..4 are retained and must still be deleted later.
        assert_eq!(record(&cluster(2, recorded(Some(5))), None), 5);
        assert_eq!(record(&cluster(2, recorded(Some(5))), Some(&sts(2))), 5);
        // Scaled up: the new count.
        assert_eq!(record(&cluster(7, recorded(Some(5))), None), 7);
        // The StatefulSet still has more replicas than the spec (scale-down not applied yet).
        assert_eq!(record(&cluster(1, recorded(Some(1))), Some(&sts(4))), 4);
    }

    #[test]
    fn an_object_from_before_the_record_counts_every_possible_ordinal() {
        // A new object: no status yet, so no history either.
        assert_eq!(record(&cluster(3, None), None), 3);
        assert_eq!(record(&cluster(3, None), Some(&sts(3))), 3);
        // A status without the field: written by a version that did not record it.
        assert_eq!(record(&cluster(3, recorded(None)), None), MAX_REPLICAS);
        assert_eq!(record(&cluster(3, recorded(None)), None), MAX_REPLICAS);
    }

    #[test]
    fn max_replicas_is_the_crd_maximum() {
        let crd = serde_json::to_value(DatabaseCluster::crd()).unwrap();
        let maximum = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["replicas"]["maximum"];
        assert_eq!(maximum.as_f64(), Some(f64::from(MAX_REPLICAS)));
    }

    #[test]
    fn a_delete_the_fenced_client_refused_is_a_lost_lease_not_a_refusal() {
        let fenced = kube::Error::Service(Box::new(LeaseLost(shardop_api::ShardIndex(2))));
        assert!(matches!(
            ClaimDeletionError::of("data-db-0", fenced),
            ClaimDeletionError::LeaseLost(LeaseLost(shardop_api::ShardIndex(2)))
        ));
        let refused = kube::Error::Service("connection reset".into());
        assert!(matches!(
            ClaimDeletionError::of("data-db-0", refused),
            ClaimDeletionError::Refused { claim, .. } if claim == "data-db-0"
        ));
    }
}
