//! End-to-end tests of `shardop-worker` against the real control plane (etcd,
//! kube-apiserver with audit log, kube-controller-manager; no kubelet, so pods never run and
//! `readyReplicas` stays 0).
//!
//! Every test runs its own worker processes with their own operator namespace (Leases) and
//! `--watch-namespaces` pointing at their own object namespace, so tests run in parallel.
//! The tests set the shard labels themselves (the assigner is not involved).

// Tests fail by panicking; the workspace lints forbid unwrap/expect only in production code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use shardop_api::DatabaseCluster;
use shardop_api::constants::{
    ASSIGNER_FIELD_MANAGER, DRAIN_LABEL, FINALIZER, SHARD_LABEL, condition,
};
use shardop_e2e::audit::{self, AuditEvent};
use shardop_e2e::metrics::{http_get, metric_value, scrape};
use shardop_e2e::process::{FAST_LEASES, ShardopProcess};
use shardop_e2e::reconciled::{converged_on, stateful_set_shards, status_is_current};
use shardop_e2e::test_env::TestEnv;
use shardop_e2e::{valid_spec, wait_for};

/// A finalizer of some other controller.
const OTHER_FINALIZER: &str = "backup.example.com/final-snapshot";

/// The test's cluster and namespaces; it plays the assigner.
struct Env(TestEnv);

impl std::ops::Deref for Env {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.0
    }
}

impl Env {
    async fn new(test: &'static str) -> Self {
        Self(TestEnv::new(test).await)
    }

    /// The shard label of each StatefulSet of the test, by name.
    async fn children(&self) -> Option<HashMap<String, String>> {
        stateful_set_shards(&self.client, &self.objects.name).await
    }

    fn worker(&self, ordinal: u32, extra: &[&str]) -> ShardopProcess {
        self.worker_spec(ordinal)
            .args(extra.iter().copied())
            .spawn(self.cluster)
            .unwrap()
    }

    /// Creates an object; a shard label is written as the assigner would (its field
    /// manager), since the test plays the assigner.
    async fn create(&self, name: &str, shard: Option<u32>, spec: serde_json::Value) {
        let mut manifest = shardop_e2e::database_cluster_json(name, spec);
        if let Some(shard) = shard {
            manifest["metadata"]["labels"] = json!({ SHARD_LABEL: shard.to_string() });
        }
        let object: DatabaseCluster = serde_json::from_value(manifest).unwrap();
        let params = PostParams {
            field_manager: Some(ASSIGNER_FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        self.clusters()
            .create(&params, &object)
            .await
            .with_context(|| format!("creating {name}"))
            .unwrap();
    }

    /// A label patch as the assigner writes it (the test plays the assigner).
    async fn patch_labels(&self, name: &str, labels: serde_json::Value) {
        self.patch_labels_as(ASSIGNER_FIELD_MANAGER, name, labels)
            .await;
    }

    /// A label patch with field manager `manager` (a hand edit unless it is the assigner's).
    async fn patch_labels_as(&self, manager: &str, name: &str, labels: serde_json::Value) {
        self.clusters()
            .patch(
                name,
                &PatchParams {
                    field_manager: Some(manager.to_owned()),
                    ..PatchParams::default()
                },
                &Patch::Merge(json!({ "metadata": { "labels": labels } })),
            )
            .await
            .unwrap();
    }

    async fn lease_holder(&self, shard: u32) -> Option<String> {
        let lease = self
            .leases()
            .get_opt(&format!("shardop-shard-{shard}"))
            .await
            .ok()??;
        lease.spec?.holder_identity.filter(|h| !h.is_empty())
    }

    async fn wait_holder(
        &self,
        shard: u32,
        accept: impl Fn(Option<&str>) -> bool,
        timeout: Duration,
    ) -> Option<String> {
        wait_for(&format!("holder of lease {shard}"), timeout, || async {
            let holder = self.lease_holder(shard).await;
            accept(holder.as_deref()).then_some(holder)
        })
        .await
        .unwrap()
    }

    /// Successful writes by shardop workers, anywhere.
    fn worker_writes(&self) -> Vec<AuditEvent> {
        let log = self.cluster.audit_log().unwrap();
        audit::read_events(log)
            .unwrap()
            .into_iter()
            .filter(|e| e.user_agent.starts_with("shardop-worker/") && e.is_successful_write())
            .collect()
    }

    /// Successful writes by shardop workers to objects of the test's object namespace.
    fn object_writes(&self) -> Vec<AuditEvent> {
        self.worker_writes()
            .into_iter()
            .filter(|e| e.in_namespace(&self.objects.name))
            .collect()
    }

    /// Waits 3 s for late writes, then asserts the workers wrote nothing to the test's
    /// objects since there were `before` writes (a second pass over converged objects).
    async fn assert_no_object_writes_since(&self, before: usize) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = self.object_writes();
        assert_eq!(
            after.len(),
            before,
            "the second pass wrote: {:?}",
            after[before..]
                .iter()
                .map(|e| (&e.verb, e.target()))
                .collect::<Vec<_>>()
        );
    }
}

/// The pod in a worker user agent `shardop-worker/shard-<i> (<pod>)`.
fn agent_pod(event: &AuditEvent) -> &str {
    event
        .user_agent
        .rsplit_once('(')
        .map_or("", |(_, pod)| pod.trim_end_matches(')'))
}

/// Reads the worker's health address from its log.
async fn health_addr(process: &ShardopProcess) -> SocketAddr {
    wait_for(
        "health address in the log",
        Duration::from_secs(20),
        || async {
            process.log().lines().find_map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).ok()?;
                value["fields"]["health_addr"].as_str()?.parse().ok()
            })
        },
    )
    .await
    .unwrap()
}

/// Whether `object`'s status describes its generation and its StatefulSet was last applied
/// by `shard` (`children`: [`stateful_set_shards`]).
fn converged(object: &DatabaseCluster, shard: u32, children: &HashMap<String, String>) -> bool {
    converged_on(object, &shard.to_string(), children)
}

fn label_shard(object: &DatabaseCluster) -> Option<u32> {
    object.labels().get(SHARD_LABEL)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_objects_converge_on_their_own_shards_and_a_second_pass_writes_nothing() {
    let env = Env::new("w-converge").await;
    let mut workers: Vec<ShardopProcess> = (0..3).map(|i| env.worker(i, &[])).collect();

    const OBJECTS: u32 = 300;
    let started = Instant::now();
    futures::stream::iter(0..OBJECTS)
        .map(|i| {
            let env = &env;
            async move {
                env.create(&format!("db-{i:03}"), Some(i % 3), valid_spec(1))
                    .await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let created = started.elapsed();

    // Converged: status describes the current generation, written by the labelled shard,
    // and the StatefulSet has created its pod (so its status settles).
    wait_for(
        "300 objects converged",
        Duration::from_secs(120),
        || async {
            let list = env.clusters().list(&ListParams::default()).await.ok()?;
            let children = env.children().await?;
            let done = list.items.iter().filter(|o| {
                converged(o, label_shard(o).unwrap_or(u32::MAX), &children)
                    && o.status.as_ref().is_some_and(|s| s.replicas == 1)
            });
            (done.count() == OBJECTS as usize).then_some(())
        },
    )
    .await
    .unwrap();
    let converged_after = started.elapsed();

    // Wait for quiet: no new worker writes for 3 s.
    let mut last = env.object_writes().len();
    let quiet = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = env.object_writes().len();
        if now == last {
            break;
        }
        last = now;
        assert!(
            quiet.elapsed() < Duration::from_secs(60),
            "writes never settle"
        );
    }

    // Ownership from the audit log: every write to an object or its children came from
    // the worker serving its shard, acting as that shard.
    let writes = env.object_writes();
    let mut per_object: BTreeMap<String, usize> = BTreeMap::new();
    for event in &writes {
        let Some(owner) = event.database_cluster() else {
            continue;
        };
        let index: u32 = owner.trim_start_matches("db-").parse().unwrap();
        let shard = index % 3;
        assert_eq!(
            event.worker_shard(),
            Some(shard),
            "{owner} written with user agent {:?}",
            event.user_agent
        );
        assert_eq!(agent_pod(event), format!("shardop-worker-{shard}"));
        *per_object.entry(owner).or_default() += 1;
    }
    assert_eq!(per_object.len(), OBJECTS as usize);
    let total: usize = per_object.values().sum();
    eprintln!(
        "created {OBJECTS} objects in {created:?}, converged after {converged_after:?}; \
         {total} writes = {:.2} per object",
        total as f64 / f64::from(OBJECTS)
    );

    // Second pass: restart every worker; each reconciles all its objects again from a
    // fresh cache and must write nothing.
    for worker in &mut workers {
        worker.terminate(Duration::from_secs(30)).unwrap();
    }
    let before = env.object_writes().len();
    let workers: Vec<ShardopProcess> = (0..3).map(|i| env.worker(i, &[])).collect();
    let mut addrs = Vec::new();
    for worker in &workers {
        addrs.push(worker.metrics_addr().await.unwrap());
    }
    let pass = Instant::now();
    wait_for(
        "second pass reconciled every object",
        Duration::from_secs(60),
        || async {
            let mut runs = 0.0;
            for addr in &addrs {
                runs += metric_value(
                    &scrape(*addr).await.ok()?,
                    "shardop_reconcile_runs_total",
                    &[],
                );
            }
            (runs >= f64::from(OBJECTS)).then_some(())
        },
    )
    .await
    .unwrap();
    eprintln!(
        "second pass over {OBJECTS} objects took {:?}",
        pass.elapsed()
    );
    env.assert_no_object_writes_since(before).await;
    drop(workers);
    env.release_objects().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_updates_reach_the_stateful_set_and_deletion_removes_claims_and_children() {
    let env = Env::new("w-lifecycle").await;
    // The assigner creates Shard objects; here the test does, to see the worker's heartbeat.
    let shards: Api<shardop_api::Shard> = Api::namespaced(env.client.clone(), &env.operator.name);
    shards
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "shardop.dev/v1alpha1",
                "kind": "Shard",
                "metadata": { "name": "shard-0" },
                "spec": { "index": 0 },
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let worker = env.worker(0, &[]);
    let health = health_addr(&worker).await;
    wait_for("/readyz", Duration::from_secs(30), || async {
        http_get(health, "/readyz")
            .await
            .ok()?
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await
    .unwrap();
    assert!(
        http_get(health, "/healthz")
            .await
            .unwrap()
            .starts_with("HTTP/1.1 200")
    );
    let heartbeat = wait_for("Shard heartbeat", Duration::from_secs(30), || async {
        let status = shards.get("shard-0").await.ok()?.status?;
        (status.holder.as_deref() == Some("shardop-worker-0")).then_some(status)
    })
    .await
    .unwrap();
    assert!(heartbeat.last_heartbeat_time.is_some());
    assert_eq!(heartbeat.queue_depth, Some(0));
    let mut spec = valid_spec(1);
    spec["storage"]["reclaimPolicy"] = json!("Delete");
    // Someone else's finalizer: adding ours (server-side apply) and removing it (merge
    // patch) must both keep it.
    let mut manifest = shardop_e2e::database_cluster_json("db", spec);
    manifest["metadata"]["labels"] = json!({ SHARD_LABEL: "0" });
    manifest["metadata"]["finalizers"] = json!([OTHER_FINALIZER]);
    // The shard label as the assigner writes it (the test plays the assigner).
    let params = PostParams {
        field_manager: Some(ASSIGNER_FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    };
    env.clusters()
        .create(&params, &serde_json::from_value(manifest).unwrap())
        .await
        .unwrap();

    let sts_api = env.stateful_sets();
    wait_for("StatefulSet created", Duration::from_secs(30), || async {
        sts_api.get_opt("db").await.ok()?.map(|_| ())
    })
    .await
    .unwrap();
    let mut finalizers = env
        .clusters()
        .get("db")
        .await
        .unwrap()
        .finalizers()
        .to_vec();
    finalizers.sort();
    assert_eq!(finalizers, [OTHER_FINALIZER, FINALIZER]);

    env.patch_spec("db", json!({ "replicas": 3, "image": "postgres:18" }))
        .await;
    let sts = wait_for(
        "StatefulSet follows the spec",
        Duration::from_secs(30),
        || async {
            let sts = sts_api.get_opt("db").await.ok()??;
            let spec = sts.spec.as_ref()?;
            let image = spec.template.spec.as_ref()?.containers[0]
                .image
                .as_deref()?;
            (spec.replicas == Some(3) && image == "postgres:18").then_some(sts)
        },
    )
    .await
    .unwrap();
    assert_eq!(sts.labels()[SHARD_LABEL], "0");
    let owner = &sts.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("DatabaseCluster", Some(true))
    );

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &env.objects.name);
    let selector = "app.kubernetes.io/instance=db,app.kubernetes.io/name=databasecluster";
    wait_for(
        "3 claims created by the StatefulSet controller",
        Duration::from_secs(30),
        || async {
            let list = claims
                .list(&ListParams::default().labels(selector))
                .await
                .ok()?;
            (list.items.len() == 3).then_some(())
        },
    )
    .await
    .unwrap();

    env.clusters()
        .delete("db", &DeleteParams::default())
        .await
        .unwrap();
    let clusters = env.clusters();
    wait_for(
        "shardop's finalizer removed, the other one kept",
        Duration::from_secs(30),
        || async {
            let finalizers = clusters.get("db").await.ok()?.finalizers().to_vec();
            (finalizers == [OTHER_FINALIZER]).then_some(())
        },
    )
    .await
    .unwrap();
    clusters
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "finalizers": null } })),
        )
        .await
        .unwrap();
    wait_for("DatabaseCluster gone", Duration::from_secs(30), || async {
        clusters.get_opt("db").await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap();
    wait_for("claims gone", Duration::from_secs(60), || async {
        let list = claims
            .list(&ListParams::default().labels(selector))
            .await
            .ok()?;
        list.items.is_empty().then_some(())
    })
    .await
    .unwrap();
    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.objects.name);
    wait_for(
        "children garbage-collected",
        Duration::from_secs(60),
        || async {
            let sts = sts_api.get_opt("db").await.ok()?;
            let svc = services.get_opt("db-headless").await.ok()?;
            (sts.is_none() && svc.is_none()).then_some(())
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_shard_is_taken_over_without_relabeling_and_handed_back() {
    let env = Env::new("w-failover").await;
    let mut workers: BTreeMap<u32, ShardopProcess> =
        (0..3).map(|i| (i, env.worker(i, &FAST_LEASES))).collect();
    for shard in 0..3 {
        env.create(&format!("db-{shard}"), Some(shard), valid_spec(1))
            .await;
    }
    let clusters = env.clusters();
    wait_for("objects converged", Duration::from_secs(30), || async {
        let list = clusters.list(&ListParams::default()).await.ok()?;
        let children = env.children().await?;
        list.items
            .iter()
            .all(|o| converged(o, label_shard(o).unwrap(), &children))
            .then_some(())
    })
    .await
    .unwrap();

    // Crash worker 1.
    workers.get_mut(&1).unwrap().kill_9().unwrap();
    let crashed = Instant::now();
    let taker = env
        .wait_holder(
            1,
            |h| h.is_some_and(|h| h != "shardop-worker-1"),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    let takeover = crashed.elapsed();
    eprintln!("lease 1 taken over by {taker} {takeover:?} after the crash");
    assert!(
        takeover < Duration::from_secs(4 + 6),
        "takeover took {takeover:?}"
    );

    // The taker reconciles a spec change of a shard-1 object, acting as shard 1.
    env.patch_spec("db-1", json!({ "replicas": 2 })).await;
    let sts_api = env.stateful_sets();
    wait_for(
        "taker applies the change",
        Duration::from_secs(20),
        || async {
            let sts = sts_api.get_opt("db-1").await.ok()??;
            (sts.spec?.replicas == Some(2)).then_some(())
        },
    )
    .await
    .unwrap();
    let object = clusters.get("db-1").await.unwrap();
    assert_eq!(
        object.labels().get(SHARD_LABEL).map(String::as_str),
        Some("1")
    );
    assert!(!object.labels().contains_key(DRAIN_LABEL));
    let taker_sts_write = env
        .object_writes()
        .into_iter()
        .rfind(|e| e.target() == Some(("statefulsets", "db-1")))
        .unwrap();
    assert_eq!(taker_sts_write.worker_shard(), Some(1));
    assert_eq!(agent_pod(&taker_sts_write), taker);
    // No label was rewritten: nobody but the test wrote db-1's metadata after the crash.
    for event in env.object_writes() {
        if event.target() == Some(("databaseclusters", "db-1")) {
            let subresource = event
                .object_ref
                .as_ref()
                .and_then(|o| o.subresource.as_deref());
            assert!(
                subresource == Some("status") || agent_pod(&event) == "shardop-worker-1",
                "db-1 metadata written by {}",
                event.user_agent
            );
        }
    }

    // Worker 1 comes back: the taker hands shard 1 back.
    let restarted_at = Timestamp::now();
    workers.insert(1, env.worker(1, &FAST_LEASES));
    env.wait_holder(
        1,
        |h| h == Some("shardop-worker-1"),
        Duration::from_secs(20),
    )
    .await;
    env.patch_spec("db-1", json!({ "replicas": 3 })).await;
    wait_for(
        "home worker applies the change",
        Duration::from_secs(20),
        || async {
            let sts = sts_api.get_opt("db-1").await.ok()??;
            (sts.spec?.replicas == Some(3)).then_some(())
        },
    )
    .await
    .unwrap();

    // No overlap: every write the taker made as shard 1 precedes the first write of the
    // restarted home worker as shard 1.
    let writes = env.worker_writes();
    let as_shard_1 = |pod: &str| -> Vec<Timestamp> {
        writes
            .iter()
            .filter(|e| {
                e.worker_shard() == Some(1)
                    && agent_pod(e) == pod
                    && e.request_received_timestamp >= restarted_at
                    // The hand-back request (an annotation patch on the Lease) is the
                    // home worker asking, not serving.
                    && !(e.verb == "patch" && e.target().is_some_and(|(r, _)| r == "leases"))
            })
            .map(|e| e.request_received_timestamp)
            .collect()
    };
    let taker_last = as_shard_1(&taker)
        .into_iter()
        .max()
        .expect("the taker released the lease");
    let home_first = as_shard_1("shardop-worker-1").into_iter().min().unwrap();
    assert!(
        taker_last < home_first,
        "taker wrote as shard 1 at {taker_last}, after the home worker started at {home_first}"
    );
    let last_sts = env
        .object_writes()
        .into_iter()
        .rfind(|e| e.target() == Some(("statefulsets", "db-1")))
        .unwrap();
    assert_eq!(agent_pod(&last_sts), "shardop-worker-1");
    // By revision: every write came from the process holding its shard's Lease then.
    let log = env.cluster.audit_log().unwrap();
    let ownership = audit::ownership(log, &env.operator.name, &env.objects.name).unwrap();
    assert_eq!(
        ownership.dual_ownership(),
        0,
        "{}",
        ownership.violations().join("\n")
    );
    let by_pod = |pod: &str| ownership.writes.iter().filter(|w| w.pod == pod).count();
    assert!(by_pod(&taker) > 0 && by_pod("shardop-worker-1") > 0);
    assert_eq!(ownership.holder_unknown(), 0);
    drop(workers);
    env.release_objects().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_is_acknowledged_once_and_sigterm_releases_the_lease_at_once() {
    let env = Env::new("w-drain").await;
    let mut worker0 = env.worker(0, &FAST_LEASES);
    let _worker1 = env.worker(1, &FAST_LEASES);
    env.create("db", Some(0), valid_spec(1)).await;
    let clusters = env.clusters();
    // Converged, with the StatefulSet's pod created: its status is settled (no kubelet).
    wait_for("converged on shard 0", Duration::from_secs(30), || async {
        let children = env.children().await?;
        let object = clusters.get("db").await.ok()?;
        (converged(&object, 0, &children) && object.status.as_ref()?.replicas == 1).then_some(())
    })
    .await
    .unwrap();

    // Drain: the worker removes both labels in one patch.
    env.patch_labels("db", json!({ DRAIN_LABEL: "1" })).await;
    wait_for("drain acknowledged", Duration::from_secs(20), || async {
        let object = clusters.get("db").await.ok()?;
        let labels = object.labels();
        (!labels.contains_key(SHARD_LABEL) && !labels.contains_key(DRAIN_LABEL)).then_some(())
    })
    .await
    .unwrap();
    let ack = env
        .object_writes()
        .into_iter()
        .rfind(|e| {
            e.target() == Some(("databaseclusters", "db"))
                && e.object_ref.as_ref().unwrap().subresource.is_none()
        })
        .unwrap();
    assert_eq!(ack.worker_shard(), Some(0));

    // The new owner (here: the test plays the assigner) relabels the children.
    env.patch_labels("db", json!({ SHARD_LABEL: "1" })).await;
    let sts_api = env.stateful_sets();
    wait_for(
        "shard 1 relabelled the children",
        Duration::from_secs(20),
        || async {
            let sts = sts_api.get_opt("db").await.ok()??;
            let object = clusters.get("db").await.ok()?;
            (sts.labels().get(SHARD_LABEL).map(String::as_str) == Some("1")
                && status_is_current(&object))
            .then_some(())
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let late: Vec<_> = env
        .object_writes()
        .into_iter()
        .filter(|e| {
            e.worker_shard() == Some(0)
                && e.database_cluster().as_deref() == Some("db")
                && e.request_received_timestamp > ack.request_received_timestamp
        })
        .map(|e| (e.verb.clone(), e.target().map(|(r, n)| format!("{r}/{n}"))))
        .collect();
    assert!(
        late.is_empty(),
        "shard 0 wrote after its acknowledgement: {late:?}"
    );
    // Taking over cost shard 1 the children's relabel and nothing else: the status was
    // settled before the move and names no shard, so there was no status to write.
    let taken_over: Vec<_> = env
        .object_writes()
        .into_iter()
        .filter(|e| e.worker_shard() == Some(1) && e.database_cluster().as_deref() == Some("db"))
        .map(|e| {
            let subresource = e.object_ref.as_ref().and_then(|o| o.subresource.clone());
            (
                e.verb.clone(),
                e.target().map(|(r, n)| format!("{r}/{n}")),
                subresource,
            )
        })
        .collect();
    assert_eq!(
        taken_over.len(),
        2,
        "shard 1 should apply the StatefulSet and the Service only: {taken_over:?}"
    );
    assert!(
        taken_over.iter().all(|(_, _, sub)| sub.is_none()),
        "shard 1 wrote a status it had nothing to put in: {taken_over:?}"
    );

    // SIGTERM: the lease is released at once, not left to expire.
    assert_eq!(
        env.lease_holder(0).await.as_deref(),
        Some("shardop-worker-0")
    );
    let signalled = Instant::now();
    let status = worker0.terminate(Duration::from_secs(10)).unwrap();
    let exited = signalled.elapsed();
    assert!(status.success(), "worker exited with {status}");
    assert_eq!(env.lease_holder(0).await, None, "lease 0 not released");
    eprintln!("SIGTERM → exit with lease released in {exited:?}");
    assert!(exited < Duration::from_secs(3));
    env.release_objects().await;
}

/// The shard label of the object's StatefulSet and Service.
async fn child_labels(env: &Env, name: &str) -> (Option<String>, Option<String>) {
    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.objects.name);
    let sts = env.stateful_sets().get_opt(name).await.ok().flatten();
    let svc = services
        .get_opt(&format!("{name}-headless"))
        .await
        .ok()
        .flatten();
    let label = |labels: Option<&BTreeMap<String, String>>| labels?.get(SHARD_LABEL).cloned();
    (
        label(sts.as_ref().map(|s| s.labels())),
        label(svc.as_ref().map(|s| s.labels())),
    )
}

/// Waits until the object is converged by `shard` and both children carry its label.
async fn wait_owned_by(env: &Env, name: &str, shard: u32, what: &str) {
    let want = shard.to_string();
    let result = wait_for(what, Duration::from_secs(30), || async {
        let object = env.clusters().get(name).await.ok()?;
        let (sts, svc) = child_labels(env, name).await;
        (status_is_current(&object)
            && sts.as_deref() == Some(want.as_str())
            && svc.as_deref() == Some(want.as_str()))
        .then_some(())
    })
    .await;
    if let Err(err) = result {
        let children = child_labels(env, name).await;
        panic!("{err}; children's shard labels (StatefulSet, Service): {children:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_given_another_shards_label_is_relabelled_by_its_owner() {
    let env = Env::new("w-child-label").await;
    let _workers = [env.worker(0, &FAST_LEASES), env.worker(1, &FAST_LEASES)];
    env.create("db", Some(0), valid_spec(1)).await;
    wait_owned_by(&env, "db", 0, "converged on shard 0").await;

    // Let the StatefulSet controller settle (its status events would trigger a reconcile
    // of the parent anyway), so only the Service leaving the watch can.
    wait_for(
        "StatefulSet status settled",
        Duration::from_secs(30),
        || async {
            let sts = env.stateful_sets().get("db").await.ok()?;
            let status = sts.status?;
            (status.replicas == 1 && status.observed_generation == sts.metadata.generation)
                .then_some(())
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;

    // The Service now carries shard 1's label: shard 0's label-filtered watch loses it,
    // and only shard 0 may write it back (shard 1 does not own its parent).
    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.objects.name);
    services
        .patch(
            "db-headless",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { SHARD_LABEL: "1" } } })),
        )
        .await
        .unwrap();
    wait_owned_by(&env, "db", 0, "shard 0 relabelled its Service").await;
    let foreign: Vec<_> = env
        .object_writes()
        .into_iter()
        .filter(|e| e.worker_shard() == Some(1))
        .map(|e| (e.verb.clone(), e.target().map(|(r, n)| format!("{r}/{n}"))))
        .collect();
    assert!(foreign.is_empty(), "shard 1 wrote: {foreign:?}");
    env.release_objects().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_children_are_recreated_at_once() {
    // A deleted child's last version looks like the one before it: the deletion itself
    // must trigger its parent (the next resync is an hour away).
    let env = Env::new("w-child-deleted").await;
    let _worker = env.worker(0, &[]);
    env.create("db", Some(0), valid_spec(2)).await;
    wait_owned_by(&env, "db", 0, "converged on shard 0").await;
    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.objects.name);
    // One at a time: a reconcile of the parent recreates both.
    delete_and_wait_recreated(&env.stateful_sets(), "db", "the StatefulSet recreated").await;
    delete_and_wait_recreated(&services, "db-headless", "the Service recreated").await;
    env.release_objects().await;
}

/// Deletes `name` (background propagation) and waits up to 30 s for an object of that name
/// with another uid.
async fn delete_and_wait_recreated<K>(api: &Api<K>, name: &str, what: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let uid = api.get(name).await.unwrap().uid();
    api.delete(name, &DeleteParams::background()).await.unwrap();
    wait_for(what, Duration::from_secs(30), || async {
        let object = api.get(name).await.ok()?;
        (object.uid() != uid).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_edited_by_someone_else_are_restored() {
    // The shard caches only the fields it reads of each child: an edit of one of the
    // fields it applies must still show as drift, and be applied back.
    let env = Env::new("w-child-drift").await;
    let _worker = env.worker(0, &[]);
    env.create("db", Some(0), valid_spec(2)).await;
    wait_owned_by(&env, "db", 0, "converged on shard 0").await;

    let edit = PatchParams {
        field_manager: Some("kubectl-edit".to_owned()),
        ..PatchParams::default()
    };
    env.stateful_sets()
        .patch(
            "db",
            &edit,
            &Patch::Merge(json!({ "spec": {
                "replicas": 5,
                "template": { "spec": { "containers": [
                    { "name": "database", "image": "someone/else:1" }
                ] } },
            } })),
        )
        .await
        .unwrap();
    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.objects.name);
    services
        .patch(
            "db-headless",
            &edit,
            &Patch::Merge(json!({ "spec": { "publishNotReadyAddresses": false } })),
        )
        .await
        .unwrap();
    wait_for(
        "both children restored",
        Duration::from_secs(60),
        || async {
            let sts = env.stateful_sets().get("db").await.ok()?;
            let spec = sts.spec?;
            let image = spec.template.spec?.containers.first()?.image.clone();
            let svc = services.get("db-headless").await.ok()?.spec?;
            (spec.replicas == Some(2)
                && image.as_deref() == Some("postgres:17")
                && svc.publish_not_ready_addresses == Some(true))
            .then_some(())
        },
    )
    .await
    .unwrap();
    env.release_objects().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_owner_bounce_every_child_carries_the_owners_label() {
    let env = Env::new("w-bounce").await;
    let _workers = [env.worker(0, &FAST_LEASES), env.worker(1, &FAST_LEASES)];
    env.create("db", Some(0), valid_spec(1)).await;
    wait_owned_by(&env, "db", 0, "converged on shard 0").await;

    // Moved: drain, acknowledgement, new label (the test plays the assigner).
    env.patch_labels("db", json!({ DRAIN_LABEL: "1" })).await;
    wait_for("drain acknowledged", Duration::from_secs(20), || async {
        let object = env.clusters().get("db").await.ok()?;
        (!object.labels().contains_key(SHARD_LABEL)).then_some(())
    })
    .await
    .unwrap();
    env.patch_labels("db", json!({ SHARD_LABEL: "1" })).await;
    wait_owned_by(&env, "db", 1, "moved to shard 1").await;

    // Hand-edited back to shard 0, while shard 1's reconcile of a spec change may be in
    // flight: shard 0 does not act on a label the assigner did not write.
    let edited = jiff::Timestamp::now();
    env.patch_spec("db", json!({ "replicas": 2 })).await;
    env.patch_labels_as("kubectl-label", "db", json!({ SHARD_LABEL: "0" }))
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let by_shard_0: Vec<_> = env
        .object_writes()
        .into_iter()
        .filter(|e| e.worker_shard() == Some(0) && e.request_received_timestamp > edited)
        .map(|e| (e.verb.clone(), e.target().map(|(r, n)| format!("{r}/{n}"))))
        .collect();
    assert!(
        by_shard_0.is_empty(),
        "shard 0 acted on a hand-edited label: {by_shard_0:?}"
    );

    // The assigner claims the label for shard 0 (its own write of the same value: a forced
    // apply) and moves the object again, to shard 1, directly (as for a fenced shard).
    env.clusters()
        .patch_metadata(
            "db",
            &PatchParams::apply(ASSIGNER_FIELD_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "shardop.dev/v1alpha1",
                "kind": "DatabaseCluster",
                "metadata": { "name": "db", "labels": { SHARD_LABEL: "0" } },
            })),
        )
        .await
        .unwrap();
    wait_owned_by(&env, "db", 0, "claimed for shard 0").await;
    env.patch_labels("db", json!({ SHARD_LABEL: "1" })).await;
    wait_owned_by(&env, "db", 1, "moved back to shard 1").await;
    // Nothing moves it afterwards.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        child_labels(&env, "db").await,
        (Some("1".to_owned()), Some("1".to_owned()))
    );
    env.release_objects().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitted_but_unappliable_spec_ends_degraded_without_a_requeue_storm() {
    let env = Env::new("w-invalid").await;
    let worker = env.worker(0, &[]);
    let mut spec = valid_spec(1);
    // The CRD schema accepts any ResourceRequirements; StatefulSet validation does not.
    spec["resources"] = json!({ "requests": { "cpu": "2" }, "limits": { "cpu": "1" } });
    env.create("bad", Some(0), spec).await;
    let clusters = env.clusters();
    let degraded = wait_for("Degraded", Duration::from_secs(30), || async {
        let object = clusters.get("bad").await.ok()?;
        let degraded = object.condition(condition::DEGRADED)?.clone();
        (degraded.status == "True").then_some(degraded)
    })
    .await
    .unwrap();
    assert_eq!(degraded.reason, "StatefulSetRejected");
    assert!(degraded.message.contains("cpu"), "{}", degraded.message);

    tokio::time::sleep(Duration::from_secs(6)).await;
    let addr = worker.metrics_addr().await.unwrap();
    let metrics = scrape(addr).await.unwrap();
    let runs = metric_value(&metrics, "shardop_reconcile_runs_total", &[("shard", "0")]);
    assert!(runs <= 3.0, "{runs} reconciles of one broken object");
    let log = env.cluster.audit_log().unwrap();
    let attempts = audit::events_in_namespace(log, &env.objects.name)
        .unwrap()
        .into_iter()
        .filter(|e| e.target() == Some(("statefulsets", "bad")))
        .count();
    assert!(attempts <= 2, "{attempts} StatefulSet apply attempts");
    let errors = metric_value(
        &metrics,
        "shardop_reconcile_errors_total",
        &[("shard", "0")],
    );
    assert_eq!(errors, 0.0, "a terminal problem is not a retried error");

    // Fixing the spec clears Degraded.
    env.patch_spec(
        "bad",
        json!({ "resources": { "requests": { "cpu": "1" }, "limits": { "cpu": "1" } } }),
    )
    .await;
    wait_for("Degraded cleared", Duration::from_secs(30), || async {
        let object = clusters.get("bad").await.ok()?;
        (object.condition(condition::DEGRADED)?.status == "False").then_some(())
    })
    .await
    .unwrap();
    env.release_objects().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tools_objects_under_the_childrens_names_are_never_taken_over_or_deleted() {
    let env = Env::new("w-foreign").await;
    let _worker = env.worker(0, &[]);
    // Another tool's release left a Service and a StatefulSet (with its claim) under the
    // names a DatabaseCluster `db` needs.
    let by_helm = PostParams {
        field_manager: Some("helm".to_owned()),
        ..PostParams::default()
    };
    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.objects.name);
    let service = serde_json::from_value(json!({
        "metadata": { "name": "db-headless" },
        "spec": { "clusterIP": "None", "selector": { "app": "orders" },
                  "ports": [{ "port": 5432 }] },
    }))
    .unwrap();
    services.create(&by_helm, &service).await.unwrap();
    let stateful_set = serde_json::from_value(json!({
        "metadata": { "name": "db" },
        "spec": {
            "replicas": 1,
            "serviceName": "db-headless",
            "selector": { "matchLabels": { "app": "orders" } },
            "template": {
                "metadata": { "labels": { "app": "orders" } },
                "spec": { "containers": [{ "name": "orders", "image": "orders:1" }] },
            },
            "volumeClaimTemplates": [{
                "metadata": { "name": "data" },
                "spec": { "accessModes": ["ReadWriteOnce"],
                          "resources": { "requests": { "storage": "1Gi" } } },
            }],
        },
    }))
    .unwrap();
    env.stateful_sets()
        .create(&by_helm, &stateful_set)
        .await
        .unwrap();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &env.objects.name);
    wait_for(
        "the other StatefulSet's claim",
        Duration::from_secs(30),
        || {
            let claims = claims.clone();
            async move { claims.get_opt("data-db-0").await.ok()? }
        },
    )
    .await
    .unwrap();

    let mut spec = valid_spec(1);
    spec["storage"]["reclaimPolicy"] = json!("Delete");
    env.create("db", Some(0), spec).await;
    let degraded = wait_for("Degraded", Duration::from_secs(30), || async {
        let object = env.clusters().get("db").await.ok()?;
        let degraded = object.condition(condition::DEGRADED)?.clone();
        (degraded.status == "True").then_some(degraded)
    })
    .await
    .unwrap();
    assert!(degraded.reason.ends_with("NotOwned"), "{degraded:?}");
    assert!(
        degraded
            .message
            .contains("not controlled by this DatabaseCluster"),
        "{}",
        degraded.message
    );

    // Deleting the DatabaseCluster ends its cleanup without touching them.
    env.clusters()
        .delete("db", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the DatabaseCluster gone",
        Duration::from_secs(30),
        || async {
            env.clusters()
                .get_opt("db")
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await
    .unwrap();
    let service = services.get("db-headless").await.unwrap();
    assert_eq!(
        service.owner_references(),
        &[],
        "the Service was taken over"
    );
    assert_eq!(
        service.spec.unwrap().selector,
        Some(BTreeMap::from([("app".to_owned(), "orders".to_owned())]))
    );
    let stateful_set = env.stateful_sets().get("db").await.unwrap();
    assert!(stateful_set.metadata.deletion_timestamp.is_none());
    assert_eq!(stateful_set.owner_references(), &[]);
    let template = stateful_set.spec.unwrap().template.spec.unwrap();
    assert_eq!(template.containers[0].image.as_deref(), Some("orders:1"));
    let claim = claims.get("data-db-0").await.unwrap();
    assert!(
        claim.metadata.deletion_timestamp.is_none(),
        "its claim was deleted"
    );
}

/// Throughput measurement, not run by default (`cargo test -p shardop-e2e --test worker
/// -- --ignored --nocapture`): 1,000 objects are created with no worker running, then
/// `SHARDOP_BENCH_WORKERS` workers (default 3) start and the time until every object has a
/// status for its generation gives reconciles per second of the first pass. A second pass
/// (restart, converged objects, zero writes) is timed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly"]
async fn bench_first_pass_reconciles_per_second() {
    let workers: u32 = std::env::var("SHARDOP_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let objects: u32 = std::env::var("SHARDOP_BENCH_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let env = Env::new("w-bench").await;
    futures::stream::iter(0..objects)
        .map(|i| {
            let env = &env;
            async move {
                env.create(&format!("db-{i:04}"), Some(i % workers), valid_spec(1))
                    .await
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    let reconciled = |env: &Env| {
        let clusters = env.clusters();
        let (client, namespace) = (env.client.clone(), env.objects.name.clone());
        async move {
            let list = clusters.list(&ListParams::default()).await.ok()?;
            let children = stateful_set_shards(&client, &namespace).await?;
            let done = list
                .items
                .iter()
                .filter(|o| converged(o, label_shard(o).unwrap_or(u32::MAX), &children))
                .count();
            (done == objects as usize).then_some(())
        }
    };
    let extra: Vec<String> = std::env::var("SHARDOP_BENCH_ARGS")
        .map(|v| v.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let started = Instant::now();
    let mut running: Vec<ShardopProcess> = (0..workers).map(|i| env.worker(i, &extra)).collect();
    wait_for("first pass", Duration::from_secs(600), || reconciled(&env))
        .await
        .unwrap();
    let first = started.elapsed();
    let writes = env.object_writes().len();
    eprintln!(
        "BENCH workers={workers} objects={objects} first pass {first:?} = {:.1} objects/s, {writes} writes ({:.2}/object)",
        f64::from(objects) / first.as_secs_f64(),
        writes as f64 / f64::from(objects)
    );
    for worker in &mut running {
        worker.terminate(Duration::from_secs(30)).unwrap();
    }
    let running: Vec<ShardopProcess> = (0..workers).map(|i| env.worker(i, &extra)).collect();
    let mut addrs = Vec::new();
    for worker in &running {
        addrs.push(worker.metrics_addr().await.unwrap());
    }
    let second = Instant::now();
    wait_for("second pass", Duration::from_secs(300), || async {
        let mut runs = 0.0;
        for addr in &addrs {
            runs += metric_value(
                &scrape(*addr).await.ok()?,
                "shardop_reconcile_runs_total",
                &[],
            );
        }
        (runs >= f64::from(objects)).then_some(())
    })
    .await
    .unwrap();
    eprintln!(
        "BENCH workers={workers} objects={objects} second pass (restart, converged) {:?}",
        second.elapsed()
    );
    drop(running);
    env.release_objects().await;
}

/// Waits until no worker write to the test's objects has appeared for 3 s.
async fn wait_for_quiet_writes(env: &Env) {
    let mut last = env.object_writes().len();
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = env.object_writes().len();
        if now == last {
            return;
        }
        last = now;
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "writes never settle"
        );
    }
}

/// The longest name admission lets through (52 characters: the pods' label
/// `controller-revision-hash=<name>-<hash>` is then at most 63) really runs: the worker
/// creates its StatefulSet and Service, and the StatefulSet controller creates its pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_admitted_name_gets_its_children_and_its_pod() {
    let env = Env::new("w-longname").await;
    let _worker = env.worker(0, &[]);
    let name = format!("long-{}", "n".repeat(47));
    assert_eq!(
        name.len(),
        52,
        "shardop_api::database_cluster::MAX_NAME_LENGTH"
    );
    env.create(&name, Some(0), valid_spec(1)).await;

    let clusters = env.clusters();
    wait_for("converged", Duration::from_secs(60), || async {
        let object = clusters.get(&name).await.ok()?;
        converged(&object, 0, &env.children().await?).then_some(())
    })
    .await
    .unwrap();
    env.stateful_sets().get(&name).await.unwrap();
    let services: Api<Service> = Api::namespaced(env.client.clone(), &env.objects.name);
    services.get(&format!("{name}-headless")).await.unwrap();
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(env.client.clone(), &env.objects.name);
    let pod = wait_for("the StatefulSet's pod", Duration::from_secs(60), || async {
        pods.get_opt(&format!("{name}-0")).await.ok()?
    })
    .await
    .unwrap();
    let revision = &pod.labels()["controller-revision-hash"];
    assert!(revision.starts_with(&format!("{name}-")), "{revision}");
    assert!(revision.len() <= 63);
    env.release_objects().await;
}

/// Quantities written the way people write them (`0.5`, `1000m`, `1024Mi`, `1e9`) are
/// stored by the API server in canonical form; the worker compares amounts, so converged
/// objects stay at zero writes when a fresh worker reconciles them all again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_canonical_quantities_converge_and_a_second_pass_writes_nothing() {
    let env = Env::new("w-quantity").await;
    let mut worker = env.worker(0, &[]);
    let specs = [
        json!({ "requests": { "cpu": "0.5", "memory": "1024Mi" }, "limits": { "cpu": "1000m", "memory": "2e9" } }),
        json!({ "requests": { "cpu": "250000000n", "memory": "0.5Gi" }, "limits": { "cpu": 2 } }),
        json!({ "requests": { "cpu": "1.5", "memory": "1536Mi" } }),
    ];
    let sizes = ["1024Mi", "0.5Gi", "2048Ki"];
    for (i, (resources, size)) in specs.iter().zip(sizes).enumerate() {
        let mut spec = valid_spec(1);
        spec["resources"] = resources.clone();
        spec["storage"]["size"] = size.into();
        env.create(&format!("q-{i}"), Some(0), spec).await;
    }
    let clusters = env.clusters();
    wait_for("converged", Duration::from_secs(60), || async {
        let list = clusters.list(&ListParams::default()).await.ok()?;
        let children = env.children().await?;
        let done = list.items.iter().filter(|o| {
            converged(o, 0, &children) && o.status.as_ref().is_some_and(|s| s.replicas == 1)
        });
        (done.count() == specs.len()).then_some(())
    })
    .await
    .unwrap();
    // The API server did store other spellings.
    let sts = env.stateful_sets().get("q-0").await.unwrap();
    let stored =
        serde_json::to_value(&sts.spec.unwrap().template.spec.unwrap().containers[0]).unwrap();
    assert_eq!(stored["resources"]["requests"]["memory"], "1Gi", "{stored}");
    wait_for_quiet_writes(&env).await;

    worker.terminate(Duration::from_secs(30)).unwrap();
    let before = env.object_writes().len();
    let worker = env.worker(0, &[]);
    let addr = worker.metrics_addr().await.unwrap();
    wait_for(
        "second pass reconciled every object",
        Duration::from_secs(60),
        || async {
            let runs = metric_value(
                &scrape(addr).await.ok()?,
                "shardop_reconcile_runs_total",
                &[],
            );
            (runs >= specs.len() as f64).then_some(())
        },
    )
    .await
    .unwrap();
    env.assert_no_object_writes_since(before).await;
    drop(worker);
    env.release_objects().await;
}

/// An object that cannot converge for a reason retrying may fix (here a ResourceQuota that
/// forbids StatefulSets: 403 on every apply) shows in
/// `shardop_oldest_unconverged_seconds`, which grows while it is stuck and drops to 0 once
/// it converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_object_shows_in_the_oldest_unconverged_gauge() {
    let env = Env::new("w-stuck").await;
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> =
        Api::namespaced(env.client.clone(), &env.objects.name);
    let quota: k8s_openapi::api::core::v1::ResourceQuota = serde_json::from_value(json!({
        "metadata": { "name": "no-statefulsets" },
        "spec": { "hard": { "count/statefulsets.apps": "0" } },
    }))
    .unwrap();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    // Admission enforces a quota once its controller has filled in its status.
    wait_for("quota observed", Duration::from_secs(30), || async {
        let quota = quotas.get("no-statefulsets").await.ok()?;
        quota.status?.hard.map(|_| ())
    })
    .await
    .unwrap();

    let worker = env.worker(0, &["--backoff-cap", "2s"]);
    let addr = worker.metrics_addr().await.unwrap();
    env.create("stuck", Some(0), valid_spec(1)).await;
    let oldest = || async {
        let text = scrape(addr).await.ok()?;
        Some(metric_value(
            &text,
            "shardop_oldest_unconverged_seconds",
            &[("shard", "0")],
        ))
    };
    let first = wait_for(
        "the stuck object shows",
        Duration::from_secs(60),
        || async { oldest().await.filter(|age| *age >= 5.0) },
    )
    .await
    .unwrap();
    let later = wait_for("its age grows", Duration::from_secs(60), || async {
        oldest().await.filter(|age| *age >= first + 3.0)
    })
    .await
    .unwrap();
    eprintln!("oldest unconverged change: {first:.1} s, then {later:.1} s");

    quotas
        .delete("no-statefulsets", &DeleteParams::default())
        .await
        .unwrap();
    let clusters = env.clusters();
    wait_for(
        "converged once allowed",
        Duration::from_secs(60),
        || async {
            let object = clusters.get("stuck").await.ok()?;
            converged(&object, 0, &env.children().await?).then_some(())
        },
    )
    .await
    .unwrap();
    wait_for("the gauge drops to 0", Duration::from_secs(30), || async {
        oldest().await.filter(|age| *age == 0.0)
    })
    .await
    .unwrap();
    drop(worker);
    env.release_objects().await;
}
