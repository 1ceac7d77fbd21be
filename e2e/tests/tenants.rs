//! End-to-end tests of the example operator `tenants-operator` (examples/tenants) against the
//! real control plane: a cluster-scoped `Tenant` rendered into a ConfigMap it owns.
//!
//! Tenants are cluster-scoped, so each test labels its Tenants with a run label of its own and
//! starts its operator with `--selector` on it; the settings ConfigMaps go to a namespace of
//! the test's own.

// Tests fail by panicking; the workspace lints forbid unwrap/expect only in production code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::{Client, ResourceExt};
use serde_json::json;
use shardop_e2e::audit::{self, AuditEvent};
use shardop_e2e::process::{ProcessSpec, ShardopProcess};
use shardop_e2e::{Cluster, TestNamespace, cluster, random_suffix, wait_for};

const OPERATOR_BINARY: &str = "tenants-operator";
const RUN_LABEL: &str = "e2e.example.shardop.dev/run";

fn tenant_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.shardop.dev", "v1alpha1", "Tenant"),
        "tenants",
    )
}

struct Env {
    cluster: &'static Cluster,
    client: Client,
    test: &'static str,
    run: String,
    settings: TestNamespace,
}

impl Env {
    async fn new(test: &'static str) -> Self {
        let cluster = cluster();
        install_tenant_crd(cluster).await;
        let client = cluster.client().await.unwrap();
        let settings = TestNamespace::create(&client, test).await.unwrap();
        Self {
            cluster,
            client,
            test,
            run: random_suffix(),
            settings,
        }
    }

    fn operator(&self, name: &str) -> ShardopProcess {
        ProcessSpec::binary(self.test, OPERATOR_BINARY, name)
            .arg("run")
            .arg("--namespace")
            .arg(&self.settings.name)
            .arg("--selector")
            .arg(format!("{RUN_LABEL}={}", self.run))
            .spawn(self.cluster)
            .unwrap()
    }

    fn tenants(&self) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &tenant_resource())
    }

    fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.settings.name)
    }

    fn name(&self, index: usize) -> String {
        format!("{}-{}-{index:03}", self.test, self.run)
    }

    fn manifest(&self, name: &str, spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "example.shardop.dev/v1alpha1",
            "kind": "Tenant",
            "metadata": { "name": name, "labels": { RUN_LABEL: self.run } },
            "spec": spec,
        }))
        .unwrap()
    }

    async fn create(&self, name: &str, spec: serde_json::Value) -> Result<(), kube::Error> {
        self.tenants()
            .create(&Default::default(), &self.manifest(name, spec))
            .await
            .map(drop)
    }

    async fn run_tenants(&self) -> Vec<DynamicObject> {
        let selector = ListParams::default().labels(&format!("{RUN_LABEL}={}", self.run));
        self.tenants().list(&selector).await.unwrap().items
    }

    /// Successful writes of this test's operators (their user agent) to its Tenants and
    /// settings ConfigMaps.
    fn operator_writes(&self) -> Vec<AuditEvent> {
        let log = self.cluster.audit_log().unwrap();
        let prefix = format!("{}-{}-", self.test, self.run);
        audit::read_events(log)
            .unwrap()
            .into_iter()
            .filter(|e| e.is_successful_write() && e.user_agent.starts_with(OPERATOR_BINARY))
            .filter(|e| match e.resource() {
                "tenants" => e.name().starts_with(&prefix),
                "configmaps" => e.in_namespace(&self.settings.name),
                _ => false,
            })
            .collect()
    }

    /// Polls until no operator write arrived for 3 s; returns the writes so far.
    async fn quiet_writes(&self) -> Vec<AuditEvent> {
        let started = Instant::now();
        let mut last = self.operator_writes();
        loop {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let now = self.operator_writes();
            if now.len() == last.len() {
                return now;
            }
            last = now;
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "writes never settle"
            );
        }
    }

    /// Deletes the test's Tenants and waits until they are gone (their finalizer needs a
    /// running operator).
    async fn delete_tenants(&self) {
        for tenant in self.run_tenants().await {
            let _ = self
                .tenants()
                .delete(&tenant.name_any(), &DeleteParams::default())
                .await;
        }
        wait_for(
            "the test's Tenants are gone",
            Duration::from_secs(120),
            || async { self.run_tenants().await.is_empty().then_some(()) },
        )
        .await
        .unwrap();
    }
}

async fn install_tenant_crd(cluster: &Cluster) {
    let binary = shardop_e2e::process::bin_dir().join(OPERATOR_BINARY);
    let output = std::process::Command::new(&binary)
        .arg("crd")
        .output()
        .unwrap();
    assert!(output.status.success(), "{} crd failed", binary.display());
    let yaml = String::from_utf8(output.stdout).unwrap();
    let applied = cluster
        .kubectl_with_input(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            &yaml,
        )
        .unwrap();
    assert!(
        applied.status.success(),
        "applying the Tenant CRD: {}",
        String::from_utf8_lossy(&applied.stderr)
    );
    cluster
        .kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/tenants.example.shardop.dev",
        ])
        .unwrap();
}

fn spec(cpu: i64) -> serde_json::Value {
    json!({
        "displayName": "Acme",
        "ownerEmail": "ops@acme.example",
        "quota": { "cpu": cpu, "memoryGiB": cpu * 4, "maxNamespaces": 3 },
        "labels": { "team": "payments" },
    })
}

/// Ready=True for the current generation, with the ConfigMap named.
fn ready(tenant: &DynamicObject) -> bool {
    let status = &tenant.data["status"];
    let generation = tenant.metadata.generation;
    status["observedGeneration"].as_i64() == generation
        && status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tenants_are_refused_at_admission() {
    let env = Env::new("t-admission").await;
    let cases = [
        (
            "email",
            json!({"ownerEmail": "nope"}),
            "ownerEmail must look like name@domain",
        ),
        (
            "quota",
            json!({"quota": {"cpu": 1, "memoryGiB": 17, "maxNamespaces": 0}}),
            "16 GiB per CPU",
        ),
        (
            "reserved",
            json!({"labels": {"tenants.shardop.dev/shard": "1"}}),
            "shardop.dev prefixes",
        ),
        (
            "labelkey",
            json!({"labels": {"not a key": "x"}}),
            "label keys",
        ),
        (
            "labelvalue",
            json!({"labels": {"team": "has space"}}),
            "labels",
        ),
    ];
    for (case, patch, message) in cases {
        let mut bad = spec(2);
        json_patch_merge(&mut bad, &patch);
        let refused = env.create(&env.name(0).replace("000", case), bad).await;
        match refused {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{case}: {status:?}");
                assert!(
                    status.message.contains(message),
                    "{case}: {}",
                    status.message
                );
            }
            other => panic!("{case}: admitted: {other:?}"),
        }
    }
    let upper = env.create(&format!("Upper-{}", env.run), spec(1)).await;
    assert!(upper.is_err(), "an uppercase name is refused");
}

fn json_patch_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(target), serde_json::Value::Object(patch)) => {
            for (key, value) in patch {
                json_patch_merge(target.entry(key.clone()).or_insert(json!(null)), value);
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_converge_a_restart_writes_nothing_drift_is_repaired_and_deletion_waits_for_the_child()
 {
    let env = Env::new("t-plain").await;
    let mut operator = env.operator("tenants-operator-0");
    const TENANTS: usize = 30;
    futures::stream::iter(0..TENANTS)
        .map(|i| {
            let env = &env;
            async move {
                env.create(&env.name(i), spec(1 + i as i64 % 4))
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    wait_for("every Tenant Ready", Duration::from_secs(120), || async {
        let tenants = env.run_tenants().await;
        (tenants.len() == TENANTS && tenants.iter().all(ready)).then_some(())
    })
    .await
    .unwrap();
    let settings = env
        .config_maps()
        .get(&format!("tenant-{}", env.name(7)))
        .await
        .unwrap();
    let data = settings.data.clone().unwrap_or_default();
    assert_eq!(data["quota.cpu"], "4");
    assert_eq!(settings.labels()["team"], "payments");

    // Converged: a finalizer, a ConfigMap and a status each, plus the odd status write a
    // reconcile makes from a cache that has not seen the previous one's yet.
    let writes = env.quiet_writes().await;
    eprintln!(
        "first pass over {TENANTS} Tenants: {} writes = {:.2} per Tenant",
        writes.len(),
        writes.len() as f64 / TENANTS as f64
    );
    assert!(writes.len() >= 3 * TENANTS, "{:?}", summary(&writes));
    assert!(writes.len() <= 4 * TENANTS, "{:?}", summary(&writes));

    // A restart reconciles every Tenant again from a fresh cache and writes nothing.
    operator.terminate(Duration::from_secs(30)).unwrap();
    let mut operator = env.operator("tenants-operator-1");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after_restart = env.quiet_writes().await;
    assert_eq!(
        after_restart.len(),
        writes.len(),
        "{:?}",
        summary(&after_restart[writes.len()..])
    );

    // Drift in the child and a spec change are both repaired by the next reconcile.
    let drifted = format!("tenant-{}", env.name(3));
    env.config_maps()
        .patch(
            &drifted,
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"quota.cpu": "999"}})),
        )
        .await
        .unwrap();
    env.tenants()
        .patch(
            &env.name(4),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"quota": {"cpu": 9}}})),
        )
        .await
        .unwrap();
    wait_for(
        "drift repaired and the spec change rendered",
        Duration::from_secs(60),
        || async {
            let repaired = env.config_maps().get(&drifted).await.ok()?.data?["quota.cpu"] == "4";
            let changed = env
                .config_maps()
                .get(&format!("tenant-{}", env.name(4)))
                .await
                .ok()?
                .data?["quota.cpu"]
                == "9";
            let observed = ready(&env.tenants().get(&env.name(4)).await.ok()?);
            (repaired && changed && observed).then_some(())
        },
    )
    .await
    .unwrap();

    // Deletion: the finalizer goes only after the ConfigMap is gone.
    env.delete_tenants().await;
    let left = env
        .config_maps()
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=tenants-operator"))
        .await
        .unwrap();
    assert!(
        left.items.is_empty(),
        "settings left: {:?}",
        left.items.iter().map(|c| c.name_any()).collect::<Vec<_>>()
    );
    operator.terminate(Duration::from_secs(30)).unwrap();
}

fn summary(writes: &[AuditEvent]) -> Vec<(String, String, Option<String>)> {
    writes
        .iter()
        .map(|e| {
            (
                e.verb.clone(),
                e.name().to_owned(),
                e.subresource().map(str::to_owned),
            )
        })
        .collect()
}
