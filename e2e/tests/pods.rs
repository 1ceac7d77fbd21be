//! charts/shardop in real pods on the local node (hack/node-up.sh): `helm install` with
//! three workers and one shard per worker (`assigner.shards=null`, so that every shard has
//! one home ordinal to check; e2e/tests/hpa.rs runs the default fixed shard count in pods
//! too) gives Running, Ready pods that each serve their ordinal's shard, and
//! DatabaseClusters whose (stand-in database) pods become Ready; a worker holding no Lease
//! is not ready; `kubectl rollout restart` relabels nothing and every shard ends at home; a
//! deleted worker comes back to its shard; a partitioned worker's shard is taken over and
//! handed back; the PodDisruptionBudget refuses a second eviction; `helm upgrade` rolls the
//! pods; never two owners (audit log).
//!
//! One test walks through all of it on one release, so the node starts the pods once.
//! Skipped, with a message, only when this machine cannot run a node (hack/node-up.sh
//! exit status 3). Figures (pod start, rollout restart, takeover) are printed, not asserted;
//! docs/operations.md records them.

// Tests fail by panicking; the workspace lints forbid unwrap/expect only in production code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use shardop_api::DatabaseCluster;
use shardop_e2e::node::{HelmRelease, LocalNode, helm_ok};
use shardop_e2e::{Cluster, TestNamespace, audit, cluster, wait_for};

const RELEASE: &str = "shardop";
const WORKERS: u32 = 3;
/// The chart's default Lease duration.
const LEASE_DURATION: Duration = Duration::from_secs(15);
/// Generous: pods start slowly on a busy 2-core machine.
const POD_DEADLINE: Duration = Duration::from_secs(240);

fn worker_pod(ordinal: u32) -> String {
    format!("{RELEASE}-worker-{ordinal}")
}

fn shard_lease(ordinal: u32) -> String {
    format!("{RELEASE}-shard-{ordinal}")
}

/// Posts an Eviction for a pod with kubectl: one request, where kube's client would retry
/// a 429 (the PDB's refusal) until the budget allows it.
fn evict(cluster: &Cluster, namespace: &str, pod: &str) -> std::process::Output {
    let eviction = serde_json::json!({
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": { "name": pod, "namespace": namespace },
    });
    let path = format!("/api/v1/namespaces/{namespace}/pods/{pod}/eviction");
    cluster
        .kubectl_with_input(
            &["create", "--raw", &path, "-f", "-"],
            &eviction.to_string(),
        )
        .unwrap()
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn ready_pod(pods: &Api<Pod>, name: &str) -> Option<Pod> {
    pods.get_opt(name).await.ok().flatten().filter(is_ready)
}

async fn holder(leases: &Api<Lease>, ordinal: u32) -> Option<String> {
    leases
        .get_opt(&shard_lease(ordinal))
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

/// Every worker Ready and holding its own shard's Lease.
async fn all_home(pods: &Api<Pod>, leases: &Api<Lease>) -> bool {
    for ordinal in 0..WORKERS {
        if ready_pod(pods, &worker_pod(ordinal)).await.is_none()
            || holder(leases, ordinal).await.as_deref() != Some(worker_pod(ordinal).as_str())
        {
            return false;
        }
    }
    true
}

async fn wait_all_home(what: &str, pods: &Api<Pod>, leases: &Api<Lease>) {
    wait_for(what, POD_DEADLINE, || async {
        all_home(pods, leases).await.then_some(())
    })
    .await
    .unwrap();
}

/// A Lease for shard 2 held by somebody else for an hour: worker 2 must stay not ready.
fn foreign_lease(namespace: &str) -> Lease {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    Lease {
        metadata: ObjectMeta {
            name: Some(shard_lease(2)),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("someone-else".to_owned()),
            lease_duration_seconds: Some(3600),
            acquire_time: Some(MicroTime(Timestamp::now())),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    }
}

/// Seconds from the pod's creation to its Ready condition.
fn start_latency(pod: &Pod) -> Option<f64> {
    let created = pod.metadata.creation_timestamp.as_ref()?.0;
    let ready = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?
        .last_transition_time
        .as_ref()?
        .0;
    Some((ready - created).get_seconds() as f64)
}

async fn create_database_clusters(client: &Client, namespace: &str, image: &str, count: usize) {
    let api: Api<DatabaseCluster> = Api::namespaced(client.clone(), namespace);
    for i in 0..count {
        let mut spec = shardop_e2e::valid_spec(1);
        spec["image"] = image.into();
        let object: DatabaseCluster =
            serde_json::from_value(shardop_e2e::database_cluster_json(&format!("db-{i}"), spec))
                .unwrap();
        api.create(&PostParams::default(), &object).await.unwrap();
    }
}

async fn all_available(client: &Client, namespace: &str, count: usize) -> bool {
    let api: Api<DatabaseCluster> = Api::namespaced(client.clone(), namespace);
    let Ok(list) = api.list(&Default::default()).await else {
        return false;
    };
    list.items.len() == count
        && list.items.iter().all(|dc| {
            dc.status.as_ref().is_some_and(|s| {
                s.ready_replicas == dc.spec.replicas
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Available" && c.status == "True")
            })
        })
}

fn label_writes_since(cluster: &Cluster, objects: &str, since: Timestamp) -> usize {
    audit::events_in_namespace(cluster.audit_log().unwrap(), objects)
        .unwrap()
        .iter()
        .filter(|e| e.is_assigner_label_write() && e.request_received_timestamp >= since)
        .count()
}

/// A test killed while it partitions a pod cannot lift the cut; the next pod to get that
/// address would be cut off in every later run (the replacement worker-1 in this test is
/// always the same address) unless starting the node lifts it.
fn partitions_of_a_killed_test_are_lifted_when_the_node_starts(node: &LocalNode) {
    std::mem::forget(node.partition("10.244.0.250").unwrap());
    assert_eq!(node.partitions().unwrap().len(), 1);
    node.start_again().unwrap();
    assert_eq!(node.partitions().unwrap(), Vec::<String>::new());
}

#[tokio::test]
async fn the_chart_runs_in_pods_rolls_without_moves_and_fails_over() {
    let cluster = cluster();
    let Some(node) = LocalNode::start(cluster).unwrap() else {
        return;
    };
    partitions_of_a_killed_test_are_lifted_when_the_node_starts(&node);
    let client = cluster.client().await.unwrap();
    let objects = TestNamespace::create(&client, "pods-db").await.unwrap();
    let operator = TestNamespace::create(&client, "pods-op").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &operator.name);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &operator.name);

    // Readiness is "holds its Lease": worker 2 finds shard 2 held by someone else.
    leases
        .create(&PostParams::default(), &foreign_lease(&operator.name))
        .await
        .unwrap();
    let values = node.values_local.display().to_string();
    helm_ok(
        cluster,
        &[
            "install",
            RELEASE,
            "charts/shardop",
            "-n",
            &operator.name,
            "-f",
            &values,
            "--set",
            "worker.replicas=3",
            "--set",
            "assigner.shards=null",
        ],
    )
    .unwrap();
    let _release = HelmRelease {
        cluster,
        name: RELEASE,
        namespace: operator.name.clone(),
    };

    wait_for(
        "workers 0 and 1 Ready at home, both assigners Ready",
        POD_DEADLINE,
        || async {
            let assigners = pods
                .list(
                    &kube::api::ListParams::default()
                        .labels("app.kubernetes.io/component=assigner"),
                )
                .await
                .ok()?;
            let assigners_ready = assigners.items.iter().filter(|p| is_ready(p)).count();
            for ordinal in 0..2 {
                ready_pod(&pods, &worker_pod(ordinal)).await?;
                (holder(&leases, ordinal).await? == worker_pod(ordinal)).then_some(())?;
            }
            (assigners_ready == 2).then_some(())
        },
    )
    .await
    .unwrap();
    let worker_0 = pods.get(&worker_pod(0)).await.unwrap();
    println!(
        "worker pod start (created → Ready): {:?} s",
        start_latency(&worker_0)
    );
    // Worker 2 runs but must not report ready while it holds no Lease.
    let watched_until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < watched_until {
        let pod = pods.get(&worker_pod(2)).await.unwrap();
        assert!(
            !is_ready(&pod),
            "worker 2 is ready without holding its shard's Lease"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    leases
        .delete(&shard_lease(2), &DeleteParams::default())
        .await
        .unwrap();
    wait_all_home("every worker Ready at home", &pods, &leases).await;

    // The workload: DatabaseClusters whose stand-in database pods become Ready.
    let count = 4;
    create_database_clusters(&client, &objects.name, node.db_standin_image, count).await;
    wait_for(
        "every DatabaseCluster Available with Ready pods",
        POD_DEADLINE,
        || async {
            all_available(&client, &objects.name, count)
                .await
                .then_some(())
        },
    )
    .await
    .unwrap();

    // A rolling restart hands every shard over and back: no object changes shard.
    let restart_began = Timestamp::now();
    let started = Instant::now();
    cluster
        .kubectl_ok(&[
            "-n",
            &operator.name,
            "rollout",
            "restart",
            &format!("statefulset/{RELEASE}-worker"),
        ])
        .unwrap();
    cluster
        .kubectl_ok(&[
            "-n",
            &operator.name,
            "rollout",
            "status",
            &format!("statefulset/{RELEASE}-worker"),
            "--timeout=300s",
        ])
        .unwrap();
    wait_all_home(
        "every shard at home after the rollout restart",
        &pods,
        &leases,
    )
    .await;
    println!(
        "rollout restart of {WORKERS} workers: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(label_writes_since(cluster, &objects.name, restart_began), 0);

    // `kubectl delete pod`: the worker releases its Lease on SIGTERM and the StatefulSet's
    // replacement takes it back (others would only step in after 2 × the Lease duration,
    // docs/shard-protocol.md).
    let deleted_at = Instant::now();
    let old_uid = pods.get(&worker_pod(1)).await.unwrap().uid();
    pods.delete(&worker_pod(1), &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the new worker-1 back at home",
        LEASE_DURATION * 2,
        || async {
            let pod = ready_pod(&pods, &worker_pod(1)).await?;
            (pod.uid() != old_uid && holder(&leases, 1).await? == worker_pod(1)).then_some(())
        },
    )
    .await
    .unwrap();
    println!(
        "pod delete → shard 1 served by the new worker-1: {:.1} s",
        deleted_at.elapsed().as_secs_f64()
    );
    wait_all_home("every shard at home after the pod delete", &pods, &leases).await;

    // A worker cut off from the API server: its Lease expires and a live worker takes the
    // shard over; once it is reachable again it gets its shard handed back.
    let pod_ip = pods
        .get(&worker_pod(1))
        .await
        .unwrap()
        .status
        .unwrap()
        .pod_ip
        .unwrap();
    let partition = node.partition(&pod_ip).unwrap();
    let cut_at = Instant::now();
    let taker = wait_for(
        "a live worker takes shard 1 over",
        LEASE_DURATION * 4,
        || async { holder(&leases, 1).await.filter(|h| *h != worker_pod(1)) },
    )
    .await
    .unwrap();
    let takeover = cut_at.elapsed();
    println!(
        "takeover of shard 1 by {taker}: {:.1} s after the partition",
        takeover.as_secs_f64()
    );
    assert!(
        takeover < LEASE_DURATION + Duration::from_secs(15),
        "{takeover:?}"
    );
    drop(partition);
    wait_all_home("shard 1 handed back to worker-1", &pods, &leases).await;

    // The PodDisruptionBudget lets one worker go at a time (once the disruption controller
    // has seen all three healthy).
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &operator.name);
    let budget = format!("{RELEASE}-worker");
    wait_for(
        "the worker PDB to allow one disruption",
        POD_DEADLINE,
        || async {
            let status = budgets.get(&budget).await.ok()?.status?;
            (status.current_healthy == Some(3) && status.disruptions_allowed == Some(1))
                .then_some(())
        },
    )
    .await
    .unwrap();
    let first = evict(cluster, &operator.name, &worker_pod(0));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    // The eviction API and the disruption controller both write the PDB's status; a second
    // eviction is judged on whichever wrote last, so wait until the first one is counted.
    wait_for(
        "the worker PDB to count the first eviction",
        POD_DEADLINE,
        || async {
            let status = budgets.get(&budget).await.ok()?.status?;
            (status.disruptions_allowed == Some(0)).then_some(())
        },
    )
    .await
    .unwrap();
    let second = evict(cluster, &operator.name, &worker_pod(2));
    let refusal = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success() && refusal.contains("TooManyRequests"),
        "the PDB let a second worker go: {refusal}"
    );
    wait_all_home("every shard at home after the eviction", &pods, &leases).await;

    // helm upgrade changing a value rolls the pods.
    let upgrade_began = Timestamp::now();
    helm_ok(
        cluster,
        &[
            "upgrade",
            RELEASE,
            "charts/shardop",
            "-n",
            &operator.name,
            "-f",
            &values,
            "--set",
            "worker.replicas=3",
            "--set",
            "assigner.shards=null",
            "--set",
            "logLevel=debug",
        ],
    )
    .unwrap();
    cluster
        .kubectl_ok(&[
            "-n",
            &operator.name,
            "rollout",
            "status",
            &format!("statefulset/{RELEASE}-worker"),
            "--timeout=300s",
        ])
        .unwrap();
    wait_all_home("every shard at home after helm upgrade", &pods, &leases).await;
    assert_eq!(label_writes_since(cluster, &objects.name, upgrade_began), 0);
    wait_for(
        "every DatabaseCluster still Available",
        POD_DEADLINE,
        || async {
            all_available(&client, &objects.name, count)
                .await
                .then_some(())
        },
    )
    .await
    .unwrap();

    // Never two owners: every shard write came from the holder of the shard's Lease.
    audit::assert_one_owner(cluster.audit_log().unwrap(), &operator.name, &objects.name);
}
