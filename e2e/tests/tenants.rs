//! End-to-end tests of the example operator `tenants-operator` (examples/tenants), sharded
//! with the shardop library, against the real control plane: a cluster-scoped `Tenant`
//! rendered into a ConfigMap it owns, its Tenants assigned by the generic assigner
//! (`--operator-name tenants --resource tenants.v1alpha1.example.shardop.dev`).
//!
//! Tenants are cluster-scoped and the assigner shards all of them, so the tests of this
//! binary take turns ([`serial`]); each has its own operator namespace (Leases, Shards, the
//! worker StatefulSet) and settings namespace (ConfigMaps), and deletes its Tenants at the end.

// Tests fail by panicking; the workspace lints forbid unwrap/expect only in production code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::core::GroupVersionKind;
use kube::{Client, ResourceExt};
use serde_json::json;
use shardop::OperatorNames;
use shardop_e2e::audit::{self, AuditEvent, Operated};
use shardop_e2e::process::{ProcessSpec, ShardopProcess};
use shardop_e2e::{Cluster, TestNamespace, cluster, wait_for};

const OPERATOR: &str = "tenants";
const OPERATOR_BINARY: &str = "tenants-operator";
const RESOURCE: &str = "tenants.v1alpha1.example.shardop.dev";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by=tenants-operator";
/// Lease timings for tests that wait for expiry (4 s / 3 s / 1 s, the worker tests' ratios).
const FAST_LEASES: [(&str, &str); 3] = [
    ("SHARDOP_LEASE_DURATION", "4s"),
    ("SHARDOP_RENEW_DEADLINE", "3s"),
    ("SHARDOP_RETRY_PERIOD", "1s"),
];

/// One test at a time in this binary: the assigner of each test shards every Tenant.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn names() -> OperatorNames {
    OperatorNames::new(OPERATOR).unwrap()
}

fn tenant_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.shardop.dev", "v1alpha1", "Tenant"),
        "tenants",
    )
}

/// The oracle's view of the tenants operator: a write to a Tenant or to its
/// `tenant-<name>` ConfigMap belongs to that Tenant.
fn operated() -> Operated {
    Operated {
        names: names(),
        resource: "tenants".to_owned(),
        cluster_scoped: true,
        owner: |event| match event.resource() {
            "tenants" => Some(event.name().to_owned()),
            "configmaps" => event.name().strip_prefix("tenant-").map(str::to_owned),
            _ => None,
        },
    }
}

struct Env {
    cluster: &'static Cluster,
    client: Client,
    test: &'static str,
    operator: TestNamespace,
    settings: TestNamespace,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Env {
    async fn new(test: &'static str, shards: i32) -> Self {
        let serial = SERIAL.lock().await;
        let cluster = cluster();
        install_tenant_crd(cluster).await;
        let client = cluster.client().await.unwrap();
        let operator = TestNamespace::create(&client, &format!("{test}-op"))
            .await
            .unwrap();
        remove_leftover_tenants(&client).await;
        let settings = TestNamespace::create(&client, test).await.unwrap();
        let env = Self {
            cluster,
            client,
            test,
            operator,
            settings,
            _serial: serial,
        };
        let sts = shardop_e2e::worker_stateful_set_named("tenants-worker", shards);
        Api::<StatefulSet>::namespaced(env.client.clone(), &env.operator.name)
            .create(&PostParams::default(), &sts)
            .await
            .unwrap();
        env
    }

    /// Worker pod `tenants-worker-<ordinal>`: the operator, sharded, home shard `ordinal`.
    fn worker(&self, ordinal: u32, fast_leases: bool) -> ShardopProcess {
        let mut spec = ProcessSpec::binary(
            self.test,
            OPERATOR_BINARY,
            &format!("tenants-worker-{ordinal}"),
        )
        .arg("run")
        .arg("--namespace")
        .arg(&self.settings.name)
        .env("SHARDOP_OPERATOR_NAMESPACE", &self.operator.name);
        if fast_leases {
            for (key, value) in FAST_LEASES {
                spec = spec.env(key, value);
            }
        }
        spec.spawn(self.cluster).unwrap()
    }

    fn assigner(&self) -> ShardopProcess {
        ProcessSpec::assigner(self.test, "tenants-assigner-0", &self.operator.name)
            .arg("--operator-name")
            .arg(OPERATOR)
            .arg("--resource")
            .arg(RESOURCE)
            .arg("--worker-statefulset")
            .arg("tenants-worker")
            .arg("--status-interval")
            .arg("1s")
            .arg("--kube-qps")
            .arg("200")
            .arg("--kube-burst")
            .arg("400")
            .spawn(self.cluster)
            .unwrap()
    }

    fn scale(&self, replicas: u32) {
        self.cluster
            .scale_stateful_set(&self.operator.name, "tenants-worker", replicas);
    }

    fn tenants(&self) -> Api<DynamicObject> {
        Api::all_with(self.client.clone(), &tenant_resource())
    }

    fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.settings.name)
    }

    fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.operator.name)
    }

    /// The test's Tenants are named after its settings namespace (unique per run).
    fn name(&self, index: usize) -> String {
        format!("{}-{index:03}", self.settings.name)
    }

    async fn create(&self, name: &str, spec: serde_json::Value) -> Result<(), kube::Error> {
        let tenant: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "example.shardop.dev/v1alpha1",
            "kind": "Tenant",
            "metadata": { "name": name },
            "spec": spec,
        }))
        .unwrap();
        self.tenants()
            .create(&PostParams::default(), &tenant)
            .await
            .map(drop)
    }

    async fn create_many(&self, count: usize) {
        futures::stream::iter(0..count)
            .map(|i| async move {
                self.create(&self.name(i), spec(1 + i as i64 % 4))
                    .await
                    .unwrap()
            })
            .buffer_unordered(8)
            .collect::<Vec<()>>()
            .await;
    }

    async fn test_tenants(&self) -> Vec<DynamicObject> {
        let prefix = format!("{}-", self.settings.name);
        let list = self.tenants().list(&ListParams::default()).await.unwrap();
        list.items
            .into_iter()
            .filter(|t| t.name_any().starts_with(&prefix))
            .collect()
    }

    /// Waits until all `count` Tenants carry the shard `shards` shards give them, are
    /// Ready for their generation, and their ConfigMaps carry the same shard label.
    async fn wait_placed(&self, shards: u32, count: usize, timeout: Duration) {
        let shard_label = names().shard_label();
        let shards = NonZeroU32::new(shards).unwrap();
        wait_for(
            &format!("{count} Tenants placed on {shards} shards"),
            timeout,
            || async {
                let tenants = self.test_tenants().await;
                let config_maps = self
                    .config_maps()
                    .list(&ListParams::default().labels(MANAGED_BY))
                    .await
                    .ok()?;
                let child_shard: BTreeMap<String, Option<String>> = config_maps
                    .items
                    .iter()
                    .map(|c| (c.name_any(), c.labels().get(&shard_label).cloned()))
                    .collect();
                let placed = tenants.iter().filter(|t| {
                    let want = shardop::shard_for("", &t.name_any(), shards).to_string();
                    t.labels().get(&shard_label) == Some(&want)
                        && ready(t)
                        && child_shard.get(&format!("tenant-{}", t.name_any()))
                            == Some(&Some(want.clone()))
                });
                (placed.count() == count && tenants.len() == count).then_some(())
            },
        )
        .await
        .unwrap();
    }

    async fn shard_labels(&self) -> BTreeMap<String, Option<String>> {
        let shard_label = names().shard_label();
        self.test_tenants()
            .await
            .iter()
            .map(|t| (t.name_any(), t.labels().get(&shard_label).cloned()))
            .collect()
    }

    async fn lease_holder(&self, shard: u32) -> Option<String> {
        let lease = self
            .leases()
            .get_opt(&names().shard_lease_name(shardop::ShardIndex(shard)))
            .await
            .ok()??;
        lease.spec?.holder_identity.filter(|h| !h.is_empty())
    }

    /// Successful writes by the test's workers (any shard) to its Tenants and ConfigMaps.
    fn worker_writes(&self) -> Vec<AuditEvent> {
        let log = self.cluster.audit_log().unwrap();
        let operated = operated();
        let prefix = format!("{}-", self.settings.name);
        audit::read_events(log)
            .unwrap()
            .into_iter()
            .filter(|e| e.is_successful_write() && operated.worker_shard(e).is_some())
            .filter(|e| match e.resource() {
                "tenants" => e.name().starts_with(&prefix),
                "configmaps" => {
                    e.in_namespace(&self.settings.name)
                        && e.name().starts_with(&format!("tenant-{prefix}"))
                }
                _ => false,
            })
            .collect()
    }

    /// Polls until no worker write arrived for 3 s; returns the writes so far.
    async fn quiet_writes(&self) -> Vec<AuditEvent> {
        let started = Instant::now();
        let mut last = self.worker_writes();
        loop {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let now = self.worker_writes();
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

    /// Asserts 0 dual ownership over the test's Leases, Tenants and ConfigMaps; returns
    /// the number of shard writes checked.
    fn assert_single_owner(&self) -> usize {
        let log = self.cluster.audit_log().unwrap();
        let ownership =
            audit::ownership_of(log, &self.operator.name, &self.settings.name, &operated())
                .unwrap();
        assert_eq!(
            ownership.dual_ownership(),
            0,
            "{}",
            ownership.violations().join("\n")
        );
        let prefix = format!("{}-", self.settings.name);
        ownership
            .writes
            .iter()
            .filter(|w| w.object.starts_with(&prefix))
            .count()
    }

    /// Deletes the test's Tenants and waits until they are gone (their finalizer needs
    /// running workers).
    async fn delete_tenants(&self) {
        for tenant in self.test_tenants().await {
            let _ = self
                .tenants()
                .delete(&tenant.name_any(), &DeleteParams::default())
                .await;
        }
        wait_for(
            "the test's Tenants are gone",
            Duration::from_secs(120),
            || async { self.test_tenants().await.is_empty().then_some(()) },
        )
        .await
        .unwrap();
    }
}

/// Tenants left by an earlier, failed run (nobody serves their finalizer any more) would be
/// served by this test's workers, which shard every Tenant: remove them first.
async fn remove_leftover_tenants(client: &Client) {
    let tenants: Api<DynamicObject> = Api::all_with(client.clone(), &tenant_resource());
    for tenant in tenants.list(&ListParams::default()).await.unwrap().items {
        let name = tenant.name_any();
        let _ = tenants
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "finalizers": null } })),
            )
            .await;
        let _ = tenants.delete(&name, &DeleteParams::default()).await;
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

/// Ready=True for the current generation.
fn ready(tenant: &DynamicObject) -> bool {
    let status = &tenant.data["status"];
    status["observedGeneration"].as_i64() == tenant.metadata.generation
        && status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
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

fn json_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(target), serde_json::Value::Object(patch)) => {
            for (key, value) in patch {
                json_merge(target.entry(key.clone()).or_insert(json!(null)), value);
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tenants_are_refused_at_admission() {
    let env = Env::new("t-admission", 1).await;
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
        json_merge(&mut bad, &patch);
        match env
            .create(&format!("{}-{case}", env.settings.name), bad)
            .await
        {
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
    let upper = env
        .create(&format!("Upper-{}", env.settings.name), spec(1))
        .await;
    assert!(upper.is_err(), "an uppercase name is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_converge_a_restart_writes_nothing_drift_is_repaired_and_deletion_waits_for_the_child()
 {
    let env = Env::new("t-converge", 1).await;
    let _assigner = env.assigner();
    let mut worker = env.worker(0, false);
    const TENANTS: usize = 30;
    env.create_many(TENANTS).await;
    env.wait_placed(1, TENANTS, Duration::from_secs(120)).await;
    let settings = env
        .config_maps()
        .get(&format!("tenant-{}", env.name(7)))
        .await
        .unwrap();
    assert_eq!(settings.data.clone().unwrap_or_default()["quota.cpu"], "4");
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
    assert!(writes.len() <= 6 * TENANTS, "{:?}", summary(&writes));

    // A restart reconciles every Tenant again from a fresh cache and writes nothing.
    worker.terminate(Duration::from_secs(30)).unwrap();
    let mut worker = env.worker(0, false);
    wait_for(
        "the restarted worker holds its Lease",
        Duration::from_secs(60),
        || async {
            (env.lease_holder(0).await.as_deref() == Some("tenants-worker-0")).then_some(())
        },
    )
    .await
    .unwrap();
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
        .list(&ListParams::default().labels(MANAGED_BY))
        .await
        .unwrap();
    assert!(
        left.items.is_empty(),
        "settings left: {:?}",
        left.items.iter().map(|c| c.name_any()).collect::<Vec<_>>()
    );
    env.assert_single_owner();
    worker.terminate(Duration::from_secs(30)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescaling_3_4_2_moves_tenants_and_their_settings_without_dual_ownership() {
    let env = Env::new("t-rescale", 3).await;
    let mut workers: BTreeMap<u32, ShardopProcess> =
        (0..3).map(|i| (i, env.worker(i, true))).collect();
    let _assigner = env.assigner();
    const TENANTS: usize = 60;
    env.create_many(TENANTS).await;
    env.wait_placed(3, TENANTS, Duration::from_secs(120)).await;
    let before = env.shard_labels().await;

    // 3 -> 4: the 4th worker starts, then the StatefulSet is scaled.
    workers.insert(3, env.worker(3, true));
    let started = Instant::now();
    env.scale(4);
    env.wait_placed(4, TENANTS, Duration::from_secs(120)).await;
    let grow = started.elapsed();
    let after = env.shard_labels().await;
    let moved = before.keys().filter(|n| before[*n] != after[*n]).count();
    for name in before.keys().filter(|n| before[*n] != after[*n]) {
        assert_eq!(after[name].as_deref(), Some("3"), "{name} moved elsewhere");
    }
    assert!(moved > 0, "some Tenants hash onto shard 3");

    // 4 -> 2: the StatefulSet shrinks; workers 3 and 2 stop gracefully (pod deletion).
    let shrink = Instant::now();
    env.scale(2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for ordinal in [3, 2] {
        workers
            .get_mut(&ordinal)
            .unwrap()
            .terminate(Duration::from_secs(30))
            .unwrap();
    }
    env.wait_placed(2, TENANTS, Duration::from_secs(120)).await;
    let shrunk = shrink.elapsed();

    let writes = env.assert_single_owner();
    eprintln!(
        "{TENANTS} Tenants: 3->4 moved {moved} in {grow:?}; 4->2 in {shrunk:?}; \
         {writes} shard writes, all by the owner"
    );
    env.delete_tenants().await;
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_tenants_are_taken_over_without_relabels_and_handed_back() {
    let env = Env::new("t-failover", 3).await;
    let mut workers: BTreeMap<u32, ShardopProcess> =
        (0..3).map(|i| (i, env.worker(i, true))).collect();
    let _assigner = env.assigner();
    const TENANTS: usize = 30;
    env.create_many(TENANTS).await;
    env.wait_placed(3, TENANTS, Duration::from_secs(120)).await;
    let shard_label = names().shard_label();
    let victim = (0..TENANTS)
        .map(|i| env.name(i))
        .find(|n| shardop::shard_for("", n, NonZeroU32::new(3).unwrap()).0 == 1)
        .expect("a Tenant on shard 1");

    // Crash worker 1; another worker takes its Lease over.
    workers.get_mut(&1).unwrap().kill_9().unwrap();
    let crashed_at = Timestamp::now();
    let crashed = Instant::now();
    let taker = wait_for("Lease 1 taken over", Duration::from_secs(60), || async {
        env.lease_holder(1)
            .await
            .filter(|h| h != "tenants-worker-1")
    })
    .await
    .unwrap();
    eprintln!(
        "Lease 1 taken over by {taker} {:?} after the crash",
        crashed.elapsed()
    );

    // The taker reconciles a spec change of a shard-1 Tenant, as shard 1.
    env.tenants()
        .patch(
            &victim,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"quota": {"cpu": 11}}})),
        )
        .await
        .unwrap();
    let rendered = |cpu: &'static str| {
        let env = &env;
        let name = format!("tenant-{victim}");
        async move {
            wait_for(
                &format!("{name} renders cpu {cpu}"),
                Duration::from_secs(60),
                || async {
                    (env.config_maps().get(&name).await.ok()?.data?["quota.cpu"] == cpu)
                        .then_some(())
                },
            )
            .await
            .unwrap();
        }
    };
    rendered("11").await;
    let operated = operated();
    let by_taker = env.worker_writes().into_iter().rfind(|e| {
        e.name() == format!("tenant-{victim}") && e.request_received_timestamp > crashed_at
    });
    let by_taker = by_taker.expect("the taker wrote the ConfigMap");
    assert_eq!(operated.worker_shard(&by_taker), Some(1));
    assert_eq!(operated.worker_pod(&by_taker), Some(taker.as_str()));

    // 0 relabels: nobody wrote a Tenant's metadata since the crash but the workers' own
    // status and finalizer writes (the assigner does not move a dead worker's Tenants).
    let log = env.cluster.audit_log().unwrap();
    let relabels: Vec<AuditEvent> = audit::read_events(log)
        .unwrap()
        .into_iter()
        .filter(|e| {
            e.request_received_timestamp > crashed_at
                && e.is_successful_write()
                && operated.by_assigner(e)
                && e.resource() == "tenants"
                && e.name().starts_with(&env.settings.name)
        })
        .collect();
    assert!(relabels.is_empty(), "relabels: {:?}", summary(&relabels));
    let tenant = env.tenants().get(&victim).await.unwrap();
    assert_eq!(
        tenant.labels().get(&shard_label).map(String::as_str),
        Some("1")
    );

    // Worker 1 comes back: the taker hands shard 1 back, and worker 1 serves it.
    let restarted_at = Timestamp::now();
    workers.insert(1, env.worker(1, true));
    wait_for("Lease 1 handed back", Duration::from_secs(60), || async {
        (env.lease_holder(1).await.as_deref() == Some("tenants-worker-1")).then_some(())
    })
    .await
    .unwrap();
    env.tenants()
        .patch(
            &victim,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"quota": {"cpu": 12}}})),
        )
        .await
        .unwrap();
    rendered("12").await;

    // No overlap: the taker's last write as shard 1 precedes the home worker's first.
    let as_shard_1 = |pod: &str| -> Vec<Timestamp> {
        env.worker_writes()
            .iter()
            .filter(|e| {
                operated.worker_shard(e) == Some(1)
                    && operated.worker_pod(e) == Some(pod)
                    && e.request_received_timestamp >= restarted_at
            })
            .map(|e| e.request_received_timestamp)
            .collect()
    };
    let home_first = as_shard_1("tenants-worker-1").into_iter().min().unwrap();
    if let Some(taker_last) = as_shard_1(&taker).into_iter().max() {
        assert!(
            taker_last < home_first,
            "taker wrote as shard 1 at {taker_last}, after the home worker started at {home_first}"
        );
    }
    let writes = env.assert_single_owner();
    eprintln!("{writes} shard writes, all by the Lease holder");
    env.delete_tenants().await;
    drop(workers);
}
