//! End-to-end tests of the assigner's mutating admission webhook (creation-time
//! assignment) against the real control plane, with real worker processes: objects are
//! stamped at creation and trusted without any label write by the assigner; objects the
//! webhook cannot stamp (generateName, a forged label) and every object while the webhook is
//! down still converge through the watch path, and no two shards ever act on an object.

// Tests fail by panicking; the workspace lints forbid unwrap/expect only in production code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use shardop::label_trust::shard_label_written_by_assigner;
use shardop_api::constants::{FINALIZER, SHARD_LABEL, WORKER_FIELD_MANAGER};
use shardop_api::{DatabaseCluster, ShardCount, shard_for};
use shardop_e2e::audit::{self, AuditEvent};
use shardop_e2e::process::{FAST_LEASES, ProcessSpec, ShardopProcess, webhook_configuration};
use shardop_e2e::reconciled::{converged_on, stateful_set_shards};
use shardop_e2e::test_env::TestEnv;
use shardop_e2e::{valid_spec, wait_for};

const SHARDS: u32 = 2;

/// The test's cluster and namespaces, and a worker StatefulSet of [`SHARDS`] replicas.
struct Env(TestEnv);

impl std::ops::Deref for Env {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.0
    }
}

impl Env {
    async fn new(test: &'static str) -> Self {
        Self(TestEnv::with_worker_stateful_set(test, SHARDS as i32).await)
    }

    fn worker(&self, ordinal: u32) -> ShardopProcess {
        self.worker_spec(ordinal)
            .args(FAST_LEASES)
            .spawn(self.cluster)
            .unwrap()
    }

    fn assigner(&self, spec: impl FnOnce(ProcessSpec) -> ProcessSpec) -> ShardopProcess {
        let base = self
            .assigner_spec("shardop-assigner-0")
            .arg("--webhook-check-interval")
            .arg("2s");
        spec(base).spawn(self.cluster).unwrap()
    }

    fn configurations(&self) -> Api<MutatingWebhookConfiguration> {
        Api::all(self.client.clone())
    }

    fn desired(&self, name: &str) -> String {
        shard_for(&self.objects.name, name, ShardCount::new(SHARDS).unwrap())
            .0
            .to_string()
    }

    /// Creates `name` (or a `generateName` object when `name` ends with `-`) with `labels`,
    /// returning the object as the create response shows it.
    async fn create(&self, name: &str, labels: serde_json::Value) -> DatabaseCluster {
        let mut manifest = shardop_e2e::database_cluster_json(name, valid_spec(1));
        if name.ends_with('-') {
            let metadata = manifest["metadata"].as_object_mut().unwrap();
            metadata.remove("name");
            metadata.insert("generateName".into(), json!(name));
        }
        manifest["metadata"]["labels"] = labels;
        let object: DatabaseCluster = serde_json::from_value(manifest).unwrap();
        self.clusters()
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|err| panic!("creating {name}: {err}"))
    }

    /// Waits until every object of the test is labelled for its desired shard by the
    /// assigner (trusted) and reconciled by that shard.
    async fn wait_converged(&self, expected: usize, timeout: Duration) -> Vec<DatabaseCluster> {
        let result = wait_for(
            &format!("{expected} objects trusted on their desired shards and reconciled"),
            timeout,
            || async {
                let list = self
                    .clusters()
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items;
                let children = stateful_set_shards(&self.client, &self.objects.name).await?;
                let done = list.iter().filter(|o| {
                    let want = self.desired(&o.name_any());
                    o.labels().get(SHARD_LABEL) == Some(&want)
                        && shard_label_written_by_assigner(o.metadata.managed_fields.as_deref())
                        && converged_on(o, &want, &children)
                });
                (list.len() == expected && done.count() == expected).then_some(list)
            },
        )
        .await;
        result.unwrap_or_else(|err| panic!("{err}"))
    }

    fn writes(&self) -> Vec<AuditEvent> {
        audit::events_in_namespace(self.cluster.audit_log().unwrap(), &self.objects.name)
            .unwrap()
            .into_iter()
            .filter(AuditEvent::is_successful_write)
            .collect()
    }

    /// The assigner's label writes to `name`.
    fn assigner_label_writes(&self, writes: &[AuditEvent], name: &str) -> usize {
        writes
            .iter()
            .filter(|e| {
                e.is_assigner_label_write() && e.target() == Some(("databaseclusters", name))
            })
            .count()
    }

    /// The workers' writes to `name` itself (not its status or children): the finalizer's
    /// apply, and its removal.
    fn worker_object_writes(&self, writes: &[AuditEvent], name: &str) -> usize {
        writes
            .iter()
            .filter(|e| {
                e.user_agent.starts_with("shardop-worker/")
                    && e.subresource().is_none()
                    && e.target() == Some(("databaseclusters", name))
            })
            .count()
    }

    /// No two shards ever acted on an object, by the audit log's own order.
    fn assert_single_owner(&self) {
        let log = self.cluster.audit_log().unwrap();
        let ownership = audit::ownership(log, &self.operator.name, &self.objects.name).unwrap();
        assert_eq!(
            ownership.dual_ownership(),
            0,
            "dual ownership by revision:\n{}",
            ownership.violations().join("\n")
        );
    }

    /// Removes the finalizers (so the harness can delete the namespace) and the
    /// cluster-scoped webhook configuration.
    async fn clean_up(&self) {
        for object in self
            .clusters()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
        {
            let _ = self
                .clusters()
                .patch(
                    &object.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "metadata": { "finalizers": null } })),
                )
                .await;
        }
        let _ = self
            .configurations()
            .delete(
                &webhook_configuration(&self.operator.name),
                &DeleteParams::default(),
            )
            .await;
    }
}

fn trusted(object: &DatabaseCluster) -> bool {
    shard_label_written_by_assigner(object.metadata.managed_fields.as_deref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_are_stamped_at_creation_and_trusted_without_a_label_write() {
    let env = Env::new("wh-stamp").await;
    let _workers: Vec<ShardopProcess> = (0..SHARDS).map(|i| env.worker(i)).collect();
    let operator = env.operator.name.clone();
    let assigner = env.assigner(|spec| {
        spec.with_webhook(&operator)
            .arg("--webhook-finalizers")
            .arg(FINALIZER)
    });
    let configuration = webhook_configuration(&operator);

    // The assigner created the certificate Secret and made the configuration trust its CA.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &operator);
    wait_for(
        "the caBundle to equal the Secret's CA bundle",
        Duration::from_secs(90),
        || async {
            let secret = secrets
                .get_opt("shardop-assigner-webhook-tls")
                .await
                .ok()??;
            let ca = secret.data?.get("ca.crt")?.clone();
            let config = env.configurations().get_opt(&configuration).await.ok()??;
            let bundle = config.webhooks?.first()?.client_config.ca_bundle.clone()?;
            (!ca.0.is_empty() && bundle == ca).then_some(())
        },
    )
    .await
    .unwrap_or_else(|err| panic!("{err}\nassigner log:\n{}", assigner.log()));

    // Once both workers hold their Leases, the webhook stamps every create.
    let mut probes = 0;
    wait_for(
        "the webhook to stamp a create",
        Duration::from_secs(90),
        || {
            probes += 1;
            let name = format!("probe-{probes}");
            let env = &env;
            async move {
                let created = env.create(&name, json!({})).await;
                created.labels().contains_key(SHARD_LABEL).then_some(())
            }
        },
    )
    .await
    .unwrap_or_else(|err| panic!("{err}\nassigner log:\n{}", assigner.log()));

    let stamped: Vec<String> = (0..20).map(|i| format!("db-{i:02}")).collect();
    for name in &stamped {
        let created = env.create(name, json!({"app": "e2e"})).await;
        // The label is in the create response: the object never existed unassigned.
        assert_eq!(
            created.labels().get(SHARD_LABEL),
            Some(&env.desired(name)),
            "{name}"
        );
        assert_eq!(created.labels().get("app").map(String::as_str), Some("e2e"));
        // The worker's finalizer too, owned by the workers' field manager.
        assert_eq!(created.finalizers(), [FINALIZER.to_owned()], "{name}");
        assert!(
            created
                .metadata
                .managed_fields
                .iter()
                .flatten()
                .any(|m| m.manager.as_deref() == Some(WORKER_FIELD_MANAGER)),
            "{name}: {:?}",
            created.metadata.managed_fields
        );
        // Owned by the assigner's field manager: the API server kept the managedFields
        // entry the webhook added, so workers trust the label as they would an assigner write.
        assert!(
            trusted(&created),
            "{name}: {:?}",
            created.metadata.managed_fields
        );
    }

    // generateName: the name is generated after mutating admission, so the watch path
    // assigns these.
    let mut generated = Vec::new();
    for _ in 0..3 {
        let created = env.create("gen-", json!({})).await;
        assert!(
            !created.labels().contains_key(SHARD_LABEL),
            "{:?}",
            created.labels()
        );
        generated.push(created.name_any());
    }

    // A forged label at creation: attributed to the creator, so no worker trusts it; the
    // webhook does not stamp over it and the assigner moves the object to its shard.
    let forged = "forged";
    let desired: u32 = env.desired(forged).parse().unwrap();
    let wrong = ((desired + 1) % SHARDS).to_string();
    let created = env.create(forged, json!({ SHARD_LABEL: wrong })).await;
    assert_eq!(created.labels().get(SHARD_LABEL), Some(&wrong));
    assert!(!trusted(&created));

    let total = probes + stamped.len() + generated.len() + 1;
    env.wait_converged(total, Duration::from_secs(120)).await;

    let writes = env.writes();
    for name in &stamped {
        assert_eq!(
            env.assigner_label_writes(&writes, name),
            0,
            "{name} needed a label write"
        );
        assert_eq!(
            env.worker_object_writes(&writes, name),
            0,
            "{name}: the worker wrote its finalizer although the webhook had added it"
        );
    }
    for name in &generated {
        assert!(
            env.worker_object_writes(&writes, name) >= 1,
            "{name}: not stamped, so the worker adds its finalizer itself"
        );
    }
    // The finalizer the webhook added does its job: a deleted object waits for the
    // worker's cleanup, which removes it.
    let deleted = &stamped[0];
    env.clusters()
        .delete(deleted, &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the deleted object's cleanup",
        Duration::from_secs(60),
        || async {
            env.clusters()
                .get_opt(deleted)
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await
    .unwrap();
    assert!(
        env.worker_object_writes(&env.writes(), deleted) >= 1,
        "{deleted}: gone without the worker removing its finalizer"
    );
    for name in &generated {
        assert!(
            env.assigner_label_writes(&writes, name) >= 1,
            "{name} never assigned by the watch path"
        );
    }
    assert!(
        env.assigner_label_writes(&writes, forged) >= 1,
        "the forged label was never claimed"
    );
    // The shard named by the forged label never acted on the object or its children.
    let foreign: Vec<String> = writes
        .iter()
        .filter(|e| {
            e.database_cluster().as_deref() == Some(forged)
                && e.worker_shard().map(|s| s.to_string()) == Some(wrong.clone())
        })
        .map(|e| format!("{} {:?} by {}", e.verb, e.target(), e.user_agent))
        .collect();
    assert!(
        foreign.is_empty(),
        "the forged label's shard acted: {foreign:?}"
    );
    env.assert_single_owner();
    env.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_webhook_down_creates_succeed_and_converge_through_the_watch_path() {
    let env = Env::new("wh-down").await;
    let _workers: Vec<ShardopProcess> = (0..SHARDS).map(|i| env.worker(i)).collect();
    let operator = env.operator.name.clone();
    let configuration = webhook_configuration(&operator);
    // The registered URL points at a port nobody listens on: every call fails at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("https://127.0.0.1:{closed_port}/mutate");
    let assigner = env.assigner(|spec| {
        spec.arg("--webhook-addr")
            .arg("127.0.0.1:0")
            .arg("--webhook-url")
            .arg(&url)
            .arg("--webhook-configuration")
            .arg(&configuration)
    });
    wait_for(
        "the webhook to be registered",
        Duration::from_secs(90),
        || async {
            let config = env.configurations().get_opt(&configuration).await.ok()??;
            let hook = config.webhooks?.into_iter().next()?;
            (hook.client_config.url.as_deref() == Some(url.as_str())
                && hook.client_config.ca_bundle.is_some())
            .then_some(())
        },
    )
    .await
    .unwrap_or_else(|err| panic!("{err}\nassigner log:\n{}", assigner.log()));

    let names: Vec<String> = (0..15).map(|i| format!("db-{i:02}")).collect();
    for name in &names {
        let created = env.create(name, json!({})).await;
        assert!(
            !created.labels().contains_key(SHARD_LABEL),
            "{name} stamped by a down webhook?"
        );
    }
    env.wait_converged(names.len(), Duration::from_secs(120))
        .await;
    let writes = env.writes();
    for name in &names {
        assert!(env.assigner_label_writes(&writes, name) >= 1, "{name}");
    }
    env.assert_single_owner();
    env.clean_up().await;
}
