//! End-to-end tests of the worker's storage handling against the real control plane:
//! volume expansion when `spec.storage.size` grows, and the cleanup of the volume claims
//! (by name, with its progress in the `Cleanup` condition).
//!
//! There is no kubelet and no provisioner: the tests create static PersistentVolumes pre-bound
//! to the claim names, which the controller manager's binder binds, because the API server
//! only lets a *bound* claim grow. StorageClasses, volumes and admission policies are
//! cluster-scoped and named after the test's namespace; they are deleted when the test ends.

// Tests fail by panicking; the workspace lints forbid unwrap/expect only in production code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use shardop_api::DatabaseCluster;
use shardop_api::constants::{ASSIGNER_FIELD_MANAGER, SHARD_LABEL, condition};
use shardop_e2e::audit;
use shardop_e2e::process::ShardopProcess;
use shardop_e2e::test_env::TestEnv;
use shardop_e2e::{valid_spec, wait_for};

const TIMEOUT: Duration = Duration::from_secs(90);

/// The test's cluster and namespaces, and the cluster-scoped objects it made.
struct Env {
    base: TestEnv,
    /// Cluster-scoped objects to delete at the end: (kubectl resource, name).
    cluster_scoped: std::sync::Mutex<Vec<(&'static str, String)>>,
}

impl std::ops::Deref for Env {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.base
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let leftovers = std::mem::take(
            &mut *self
                .cluster_scoped
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for (resource, name) in leftovers.iter().rev() {
            let _ = self.cluster.kubectl(&[
                "delete",
                resource,
                name,
                "--ignore-not-found",
                "--wait=false",
            ]);
        }
    }
}

impl Env {
    async fn new(test: &'static str) -> Self {
        Self {
            base: TestEnv::new(test).await,
            cluster_scoped: std::sync::Mutex::default(),
        }
    }

    fn worker(&self) -> ShardopProcess {
        self.worker_spec(0).spawn(self.cluster).unwrap()
    }

    fn remember(&self, resource: &'static str, name: &str) {
        self.cluster_scoped
            .lock()
            .unwrap()
            .push((resource, name.to_owned()));
    }

    fn claims(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), &self.objects.name)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.objects.name)
    }

    /// A StorageClass `<namespace>-<suffix>` without a provisioner (static volumes only).
    async fn storage_class(&self, suffix: &str, expandable: bool) -> String {
        let name = format!("{}-{suffix}", self.objects.name);
        let class: StorageClass = serde_json::from_value(json!({
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": { "name": name },
            "provisioner": "kubernetes.io/no-provisioner",
            "allowVolumeExpansion": expandable,
            "volumeBindingMode": "Immediate",
        }))
        .unwrap();
        self.remember("storageclass", &name);
        Api::<StorageClass>::all(self.client.clone())
            .create(&PostParams::default(), &class)
            .await
            .unwrap();
        name
    }

    /// A 5Gi static volume of `class`, pre-bound to claim `claim` of the test namespace.
    async fn volume(&self, class: &str, claim: &str) {
        let name = format!("{}-{claim}", self.objects.name);
        let volume: PersistentVolume = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": { "name": name },
            "spec": {
                "capacity": { "storage": "5Gi" },
                "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": class,
                "hostPath": { "path": format!("/tmp/{name}") },
                "claimRef": { "namespace": self.objects.name, "name": claim },
            },
        }))
        .unwrap();
        self.remember("persistentvolume", &name);
        Api::<PersistentVolume>::all(self.client.clone())
            .create(&PostParams::default(), &volume)
            .await
            .unwrap();
    }

    async fn create(&self, name: &str, spec: serde_json::Value) {
        let mut manifest = shardop_e2e::database_cluster_json(name, spec);
        manifest["metadata"]["labels"] = json!({ SHARD_LABEL: "0" });
        // The shard label as the assigner writes it (the test plays the assigner): a worker
        // acts only on a label the assigner's field manager owns.
        let params = PostParams {
            field_manager: Some(ASSIGNER_FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        self.clusters()
            .create(&params, &serde_json::from_value(manifest).unwrap())
            .await
            .unwrap();
    }

    /// Waits until the object's status describes its current generation.
    async fn converged(&self, name: &str) -> DatabaseCluster {
        let api = self.clusters();
        wait_for("status of the current generation", TIMEOUT, || async {
            let object = api.get(name).await.ok()?;
            let status = object.status.as_ref()?;
            (status.observed_generation == object.metadata.generation).then_some(object)
        })
        .await
        .unwrap()
    }

    /// Waits until condition `type_` has `status` and `reason`.
    async fn condition(
        &self,
        name: &str,
        type_: &str,
        status: &str,
        reason: &str,
    ) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        let api = self.clusters();
        wait_for(&format!("{type_}={status} ({reason})"), TIMEOUT, || async {
            let object = api.get(name).await.ok()?;
            let found = object.condition(type_)?.clone();
            (found.status == status && found.reason == reason).then_some(found)
        })
        .await
        .unwrap()
    }

    /// From the audit log: the worker created StatefulSet `db` twice (the original and its
    /// replacement) and deleted it once, and nothing deleted a claim. A StatefulSet applied
    /// while it is being deleted comes back with the old template and is replaced again, and
    /// the StatefulSet controller's claim adoption racing such a short-lived StatefulSet
    /// leaves claims owned by a deleted owner, which the garbage collector deletes.
    fn replaced_once_and_no_claim_deleted(&self) {
        let log = self.cluster.audit_log().unwrap();
        let events = audit::events_in_namespace(log, &self.objects.name).unwrap();
        let worker_writes = |verb: &str, code: u16| {
            events
                .iter()
                .filter(|e| e.by_shardop() && e.target() == Some(("statefulsets", "db")))
                .filter(|e| e.verb == verb && e.code() == Some(code))
                .count()
        };
        assert_eq!(worker_writes("patch", 201), 2, "StatefulSet creations");
        assert_eq!(worker_writes("delete", 200), 1, "StatefulSet deletions");
        let claim_deletions: Vec<_> = events
            .iter()
            .filter(|e| e.resource() == "persistentvolumeclaims" && e.verb.starts_with("delete"))
            .map(|e| format!("{} {} by {}", e.verb, e.name(), e.user.username))
            .collect();
        assert!(claim_deletions.is_empty(), "{claim_deletions:?}");
    }

    async fn claims_bound(&self, names: &[String]) {
        let claims = self.claims();
        wait_for("claims bound", TIMEOUT, || async {
            for name in names {
                let claim = claims.get_opt(name).await.ok()??;
                if claim.status?.phase.as_deref() != Some("Bound") {
                    return None;
                }
            }
            Some(())
        })
        .await
        .unwrap();
    }

    /// The uid of each named claim (`None` for a missing or terminating one).
    async fn claim_uids(&self, names: &[String]) -> Vec<Option<String>> {
        let mut uids = Vec::new();
        for name in names {
            let claim = self.claims().get_opt(name).await.unwrap();
            uids.push(
                claim
                    .filter(|c| c.metadata.deletion_timestamp.is_none())
                    .and_then(|c| c.uid()),
            );
        }
        uids
    }

    async fn claim_request(&self, name: &str) -> Option<String> {
        let claim = self.claims().get_opt(name).await.ok()??;
        Some(claim.spec?.resources?.requests?.get("storage")?.0.clone())
    }

    /// name → (uid, controller-revision-hash, uid of the controlling owner) of every pod.
    async fn pods_by_name(&self) -> BTreeMap<String, (String, String, Option<String>)> {
        let pods = self.pods().list(&Default::default()).await.unwrap();
        pods.items
            .iter()
            .map(|pod| {
                let hash = pod
                    .labels()
                    .get("controller-revision-hash")
                    .cloned()
                    .unwrap_or_default();
                let owner = pod
                    .owner_references()
                    .iter()
                    .find(|o| o.controller == Some(true))
                    .map(|o| o.uid.clone());
                (pod.name_any(), (pod.uid().unwrap_or_default(), hash, owner))
            })
            .collect()
    }
}

fn template_size(sts: &StatefulSet) -> Option<String> {
    let template = sts
        .spec
        .as_ref()?
        .volume_claim_templates
        .as_ref()?
        .first()?;
    Some(
        template
            .spec
            .as_ref()?
            .resources
            .as_ref()?
            .requests
            .as_ref()?
            .get("storage")?
            .0
            .clone(),
    )
}

fn claim_names(count: i32) -> Vec<String> {
    (0..count).map(|i| format!("data-db-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_storage_expands_the_claims_and_replaces_the_stateful_set_without_touching_its_pods()
 {
    let env = Env::new("w-resize").await;
    let class = env.storage_class("expandable", true).await;
    let claims = claim_names(2);
    for claim in &claims {
        env.volume(&class, claim).await;
    }
    let _worker = env.worker();
    let mut spec = valid_spec(2);
    spec["storage"]["storageClassName"] = json!(class);
    // With Delete the StatefulSet controller makes the StatefulSet an owner of the claims:
    // replacing the StatefulSet must orphan them, not let the garbage collector take them.
    spec["storage"]["reclaimPolicy"] = json!("Delete");
    env.create("db", spec).await;
    env.claims_bound(&claims).await;
    let claim_uids = env.claim_uids(&claims).await;
    let sts_api = env.stateful_sets();
    let before = wait_for("2 pods of the StatefulSet", TIMEOUT, || async {
        let pods = env.pods_by_name().await;
        (pods.len() == 2
            && pods
                .values()
                .all(|(_, hash, owner)| !hash.is_empty() && owner.is_some()))
        .then_some(pods)
    })
    .await
    .unwrap();
    let old_uid = sts_api.get("db").await.unwrap().uid().unwrap();
    env.converged("db").await;

    env.patch_spec("db", json!({ "storage": { "size": "2Gi" } }))
        .await;
    let replaced = wait_for(
        "StatefulSet recreated with a 2Gi claim template",
        TIMEOUT,
        || async {
            let sts = sts_api.get_opt("db").await.ok()??;
            (template_size(&sts).as_deref() == Some("2Gi")).then_some(sts)
        },
    )
    .await
    .unwrap();
    let new_uid = replaced.uid().unwrap();
    assert_ne!(
        new_uid, old_uid,
        "the template is immutable: a new StatefulSet"
    );
    for claim in &claims {
        assert_eq!(
            env.claim_request(claim).await.as_deref(),
            Some("2Gi"),
            "{claim}"
        );
    }
    env.condition("db", condition::STORAGE_RESIZING, "False", "Resized")
        .await;
    // The pods were orphaned, not deleted, and the new StatefulSet adopted them without a
    // rollout: same pods, same revision.
    let after = wait_for("pods adopted by the new StatefulSet", TIMEOUT, || async {
        let pods = env.pods_by_name().await;
        pods.values()
            .all(|(_, _, owner)| owner.as_deref() == Some(new_uid.as_str()))
            .then_some(pods)
    })
    .await
    .unwrap();
    let identity = |pods: &BTreeMap<String, (String, String, Option<String>)>| {
        pods.iter()
            .map(|(name, (uid, hash, _))| (name.clone(), uid.clone(), hash.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(identity(&after), identity(&before), "pods untouched");

    // Later changes still apply, and the object ends as any other.
    env.patch_spec("db", json!({ "image": "postgres:18" }))
        .await;
    wait_for("image change applied", TIMEOUT, || async {
        let sts = sts_api.get_opt("db").await.ok()??;
        let image = sts.spec?.template.spec?.containers[0].image.clone()?;
        (image == "postgres:18").then_some(())
    })
    .await
    .unwrap();
    let object = env.converged("db").await;
    let degraded = object.condition(condition::DEGRADED).unwrap();
    assert_eq!(degraded.status, "False", "{degraded:?}");
    let progressing = object.condition(condition::PROGRESSING).unwrap();
    assert_ne!(progressing.reason, "Blocked", "{progressing:?}");
    assert_eq!(object.status.as_ref().unwrap().claim_ordinals, Some(2));
    assert_eq!(env.claim_uids(&claims).await, claim_uids, "same claims");
    env.replaced_once_and_no_claim_deleted();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_that_cannot_expand_is_degraded_and_later_changes_still_apply() {
    let env = Env::new("w-noexpand").await;
    let class = env.storage_class("fixed", false).await;
    let claims = claim_names(1);
    env.volume(&class, &claims[0]).await;
    let _worker = env.worker();
    let mut spec = valid_spec(1);
    spec["storage"]["storageClassName"] = json!(class);
    env.create("db", spec).await;
    env.claims_bound(&claims).await;
    env.converged("db").await;
    let sts_api = env.stateful_sets();
    let uid = sts_api.get("db").await.unwrap().uid();

    env.patch_spec("db", json!({ "storage": { "size": "2Gi" } }))
        .await;
    let degraded = env
        .condition(
            "db",
            condition::DEGRADED,
            "True",
            "StorageExpansionNotAllowed",
        )
        .await;
    assert!(degraded.message.contains(&class), "{}", degraded.message);
    env.condition(
        "db",
        condition::STORAGE_RESIZING,
        "False",
        "ExpansionNotAllowed",
    )
    .await;
    assert_eq!(env.claim_request("data-db-0").await.as_deref(), Some("1Gi"));

    // A replicas change still reaches the StatefulSet, which keeps its claim template.
    env.patch_spec("db", json!({ "replicas": 2 })).await;
    let sts = wait_for("replicas change applied", TIMEOUT, || async {
        let sts = sts_api.get_opt("db").await.ok()??;
        (sts.spec.as_ref()?.replicas == Some(2)).then_some(sts)
    })
    .await
    .unwrap();
    assert_eq!(sts.uid(), uid, "not replaced");
    assert_eq!(template_size(&sts).as_deref(), Some("1Gi"));
    let object = env.converged("db").await;
    assert_eq!(
        object.condition(condition::DEGRADED).unwrap().reason,
        "StorageExpansionNotAllowed"
    );
}

/// A size change made together with a spec error the CRD lets through (requests above
/// limits) and with claims the StatefulSet does not own (`Retain`, so nothing to let go
/// of first): the replacement StatefulSet would be rejected, so the old one must stay with
/// its pods; once the spec is fixed the resize goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resize_whose_replacement_would_be_rejected_keeps_the_old_stateful_set() {
    let env = Env::new("w-badresize").await;
    let class = env.storage_class("expandable", true).await;
    let claims = claim_names(1);
    env.volume(&class, &claims[0]).await;
    let _worker = env.worker();
    let mut spec = valid_spec(1);
    spec["storage"]["storageClassName"] = json!(class);
    spec["storage"]["reclaimPolicy"] = json!("Retain");
    env.create("db", spec).await;
    env.claims_bound(&claims).await;
    let sts_api = env.stateful_sets();
    wait_for("the pod of the StatefulSet", TIMEOUT, || async {
        let pods = env.pods_by_name().await;
        (pods.len() == 1 && pods.values().all(|(_, _, owner)| owner.is_some())).then_some(())
    })
    .await
    .unwrap();
    env.converged("db").await;
    let uid = sts_api.get("db").await.unwrap().uid().unwrap();

    env.patch_spec(
        "db",
        json!({
            "storage": { "size": "2Gi" },
            "resources": { "requests": { "cpu": "2" }, "limits": { "cpu": "1" } },
        }),
    )
    .await;
    let resizing = env
        .condition(
            "db",
            condition::STORAGE_RESIZING,
            "False",
            "ReplacementRejected",
        )
        .await;
    assert!(
        resizing.message.contains("cpu limit"),
        "{}",
        resizing.message
    );
    let object = env.converged("db").await;
    assert_eq!(
        object.condition(condition::DEGRADED).unwrap().status,
        "True"
    );
    let kept = sts_api.get("db").await.unwrap();
    assert_eq!(
        kept.uid().as_deref(),
        Some(uid.as_str()),
        "the old StatefulSet stays"
    );
    assert!(
        kept.metadata.deletion_timestamp.is_none(),
        "not being deleted"
    );
    assert_eq!(template_size(&kept).as_deref(), Some("1Gi"));
    let pods = env.pods_by_name().await;
    assert!(
        pods.values()
            .all(|(_, _, owner)| owner.as_deref() == Some(uid.as_str())),
        "the pods keep their StatefulSet: {pods:?}"
    );

    // The spec fixed: the StatefulSet is replaced around the new template.
    env.patch_spec(
        "db",
        json!({ "resources": { "requests": { "cpu": "1" }, "limits": { "cpu": "1" } } }),
    )
    .await;
    env.condition("db", condition::STORAGE_RESIZING, "False", "Resized")
        .await;
    let replaced = sts_api.get("db").await.unwrap();
    assert_ne!(replaced.uid().as_deref(), Some(uid.as_str()));
    assert_eq!(template_size(&replaced).as_deref(), Some("2Gi"));
    let object = env.converged("db").await;
    assert_eq!(
        object.condition(condition::DEGRADED).unwrap().status,
        "False"
    );
}

/// A ValidatingAdmissionPolicy that refuses every claim deletion in `namespace`, and its
/// binding; returns the binding's name.
fn refuse_claim_deletion(env: &Env, namespace: &str) -> String {
    let name = format!("{namespace}-no-claim-deletion");
    let manifest = shardop_e2e::claim_deletion_refusal(
        &name,
        namespace,
        "claim deletion is paused by the test",
    );
    env.remember("validatingadmissionpolicy", &name);
    env.remember("validatingadmissionpolicybinding", &name);
    let output = env
        .cluster
        .kubectl_with_input(&["apply", "-f", "-"], &manifest.to_string())
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_claim_ordinal_is_deleted_and_a_refused_deletion_shows_in_the_cleanup_condition() {
    let env = Env::new("w-claims").await;
    let _worker = env.worker();
    let mut spec = valid_spec(3);
    spec["storage"]["reclaimPolicy"] = json!("Delete");
    env.create("db", spec).await;
    let claims = env.claims();
    let names = claim_names(3);
    wait_for("3 claims", TIMEOUT, || async {
        for name in &names {
            claims.get_opt(name).await.ok()??;
        }
        Some(())
    })
    .await
    .unwrap();
    // Scale down: claims 1 and 2 are retained (whenScaled: Retain) and recorded.
    env.patch_spec("db", json!({ "replicas": 1 })).await;
    let object = env.converged("db").await;
    assert_eq!(object.status.as_ref().unwrap().claim_ordinals, Some(3));

    let binding = refuse_claim_deletion(&env, &env.objects.name);
    // The policy takes effect once the API server loaded it: probe with a dry-run.
    wait_for("claim deletion refused", TIMEOUT, || async {
        let dry_run = DeleteParams {
            dry_run: true,
            ..DeleteParams::default()
        };
        claims
            .delete(&names[0], &dry_run)
            .await
            .is_err()
            .then_some(())
    })
    .await
    .unwrap();

    env.clusters()
        .delete("db", &DeleteParams::default())
        .await
        .unwrap();
    let cleanup = env
        .condition(
            "db",
            condition::CLEANUP,
            "True",
            "VolumeClaimDeletionFailed",
        )
        .await;
    assert!(
        cleanup.message.contains("paused by the test"),
        "{}",
        cleanup.message
    );
    for name in &names {
        assert!(claims.get_opt(name).await.unwrap().is_some(), "{name}");
    }

    // The dependency is back: the cleanup finishes by itself.
    let output = env
        .cluster
        .kubectl(&["delete", "validatingadmissionpolicybinding", &binding])
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let clusters = env.clusters();
    wait_for("object gone", Duration::from_secs(180), || async {
        clusters.get_opt("db").await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap();
    for name in &names {
        assert!(
            claims
                .get_opt(name)
                .await
                .unwrap()
                .is_none_or(|c| c.metadata.deletion_timestamp.is_some()),
            "{name} deleted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_left_by_a_replaced_stateful_set_go_with_their_object() {
    let env = Env::new("w-orphans").await;
    let mut worker = env.worker();
    let mut spec = valid_spec(1);
    spec["storage"]["reclaimPolicy"] = json!("Delete");
    env.create("db", spec).await;
    env.converged("db").await;
    let pods = env.pods();
    wait_for("the StatefulSet's pod", TIMEOUT, || async {
        pods.get_opt("db-0").await.ok()?
    })
    .await
    .unwrap();

    // A volume resize deletes the StatefulSet keeping its pods and creates it again; here
    // the worker stops in between and the object is deleted before it comes back.
    worker.terminate(Duration::from_secs(30)).unwrap();
    let orphan = DeleteParams {
        propagation_policy: Some(kube::api::PropagationPolicy::Orphan),
        ..DeleteParams::default()
    };
    let stateful_sets: Api<StatefulSet> = Api::namespaced(env.client.clone(), &env.objects.name);
    stateful_sets.delete("db", &orphan).await.unwrap();
    wait_for("StatefulSet gone, its pod kept", TIMEOUT, || async {
        let gone = stateful_sets.get_opt("db").await.ok()?.is_none();
        let pod = pods.get_opt("db-0").await.ok()??;
        (gone && pod.owner_references().is_empty()).then_some(())
    })
    .await
    .unwrap();
    env.clusters()
        .delete("db", &DeleteParams::default())
        .await
        .unwrap();

    let _worker = env.worker();
    let clusters = env.clusters();
    wait_for("object gone", TIMEOUT, || async {
        clusters.get_opt("db").await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap();
    wait_for("the pod it left gone", TIMEOUT, || async {
        pods.get_opt("db-0")
            .await
            .ok()?
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
            .then_some(())
    })
    .await
    .unwrap();
}
