//! End-to-end tests of how the worker and the assigner live with their API server: one
//! that does not serve streaming lists, and one that goes away and comes back.
//!
//! Each test starts a control plane of its own (`e2e/src/control_plane.rs`: its own
//! directory, the shared ports + 1 and + 2), so stopping its API server or switching a
//! feature gate off never disturbs the other tests.

// Tests fail by panicking; the workspace lints forbid unwrap/expect only in production code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shardop_api::DatabaseCluster;
use shardop_api::constants::SHARD_LABEL;
use shardop_e2e::control_plane::OwnControlPlane;
use shardop_e2e::metrics::http_get;
use shardop_e2e::process::{FAST_LEASES, ProcessSpec, ShardopProcess};
use shardop_e2e::reconciled::{converged_on, stateful_set_shards};
use shardop_e2e::{database_cluster_json, valid_spec, wait_for};

const OPERATOR_NAMESPACE: &str = "shardop-system";
const OBJECT_NAMESPACE: &str = "objects";

/// A control plane of the test's own with the operator and object namespaces.
async fn control_plane(name: &str, offset: u16, feature_gates: &str) -> OwnControlPlane {
    let plane = OwnControlPlane::start(name, offset, feature_gates)
        .await
        .unwrap();
    plane.create_namespace(OPERATOR_NAMESPACE).await.unwrap();
    plane.create_namespace(OBJECT_NAMESPACE).await.unwrap();
    plane
}

fn worker(test: &str, plane: &OwnControlPlane) -> ShardopProcess {
    let mut spec = ProcessSpec::worker(test, "shardop-worker-0", OPERATOR_NAMESPACE)
        .arg("--watch-namespaces")
        .arg(OBJECT_NAMESPACE);
    for arg in FAST_LEASES {
        spec = spec.arg(arg);
    }
    spec.spawn(&plane.cluster).unwrap()
}

fn assigner(test: &str, plane: &OwnControlPlane) -> ShardopProcess {
    ProcessSpec::assigner(test, "shardop-assigner-0", OPERATOR_NAMESPACE)
        .arg("--shards")
        .arg("1")
        .arg("--watch-namespaces")
        .arg(OBJECT_NAMESPACE)
        .spawn(&plane.cluster)
        .unwrap()
}

/// Creates `db-<first>` ... `db-<first + count - 1>` without shard labels (the assigner
/// stamps them).
async fn create_objects(client: &Client, first: usize, count: usize) {
    let api: Api<DatabaseCluster> = Api::namespaced(client.clone(), OBJECT_NAMESPACE);
    for i in first..first + count {
        let manifest = database_cluster_json(&format!("db-{i}"), valid_spec(1));
        let object = serde_json::from_value(manifest).unwrap();
        api.create(&PostParams::default(), &object).await.unwrap();
    }
}

/// Waits until every DatabaseCluster carries shard 0 and a status of its current
/// generation, reconciled by shard 0.
async fn wait_converged(client: &Client, count: usize, timeout: Duration) {
    let api: Api<DatabaseCluster> = Api::namespaced(client.clone(), OBJECT_NAMESPACE);
    wait_for("every object assigned and converged", timeout, || async {
        let list = api.list(&ListParams::default()).await.ok()?;
        let children = stateful_set_shards(client, OBJECT_NAMESPACE).await?;
        let done = list.items.iter().filter(|o| {
            o.labels().get(SHARD_LABEL).map(String::as_str) == Some("0")
                && converged_on(o, "0", &children)
        });
        (done.count() == count).then_some(())
    })
    .await
    .unwrap();
}

/// The address serving `/readyz`: the health address when the process logged one, else
/// the metrics address (one listener serves all paths).
async fn readyz_addr(process: &ShardopProcess) -> SocketAddr {
    let metrics = process.metrics_addr().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    process
        .log()
        .lines()
        .find_map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            value["fields"]["health_addr"].as_str()?.parse().ok()
        })
        .unwrap_or(metrics)
}

async fn is_ready(addr: SocketAddr) -> Option<bool> {
    let response = http_get(addr, "/readyz").await.ok()?;
    Some(response.starts_with("HTTP/1.1 200"))
}

async fn wait_ready(what: &str, addr: SocketAddr, ready: bool, timeout: Duration) {
    wait_for(what, timeout, || async {
        (is_ready(addr).await? == ready).then_some(())
    })
    .await
    .unwrap();
}

async fn healthz_ok(addr: SocketAddr) -> bool {
    http_get(addr, "/healthz")
        .await
        .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_streaming_lists_the_worker_falls_back_and_everything_converges() {
    let test = "r-no-watchlist";
    let plane = control_plane(test, 1, "WatchList=false").await;
    let client = plane.cluster.client().await.unwrap();

    // What this server answers to a streaming list (the worker's probe asks the same).
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let refused = leases
        .watch(&WatchParams::streaming_lists().timeout(5), "")
        .await
        .err()
        .expect("kube-apiserver with WatchList=false serves streaming lists");
    let kube::Error::Api(status) = &refused else {
        panic!("unexpected error {refused:?}");
    };
    assert_eq!(status.code, 422, "{status:?}");
    assert!(status.message.contains("sendInitialEvents"), "{status:?}");

    let _assigner = assigner(test, &plane);
    let worker = worker(test, &plane);
    create_objects(&client, 0, 5).await;
    wait_converged(&client, 5, Duration::from_secs(120)).await;

    let log = worker.log();
    let fallbacks = log
        .lines()
        .filter(|l| l.contains("does not serve streaming lists"))
        .count();
    assert_eq!(fallbacks, 1, "one clear line about the fallback:\n{log}");
    assert!(
        !log.contains("sendInitialEvents"),
        "no watch was refused for streaming lists:\n{log}"
    );
}

/// Lines of `log` after the first `skip`.
fn lines_after(log: &str, skip: usize) -> Vec<String> {
    log.lines().skip(skip).map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_outage_is_waited_out_with_bounded_logs_and_truthful_readiness() {
    let test = "r-outage";
    let plane = control_plane(test, 2, "").await;
    let client = plane.cluster.client().await.unwrap();
    let api_server = plane.api_server();

    // 1. Start-up without an API server: both binaries wait instead of exiting.
    plane.stop_api_server().unwrap();
    let mut assigner = assigner(test, &plane);
    let mut worker = worker(test, &plane);
    let assigner_ready = readyz_addr(&assigner).await;
    let worker_ready = readyz_addr(&worker).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        assigner.is_running(),
        "the assigner exited:\n{}",
        assigner.log()
    );
    assert!(worker.is_running(), "the worker exited:\n{}", worker.log());
    for (name, addr) in [("assigner", assigner_ready), ("worker", worker_ready)] {
        assert_eq!(
            is_ready(addr).await,
            Some(false),
            "{name} ready without an API server"
        );
        assert!(
            healthz_ok(addr).await,
            "{name} /healthz fails during an outage"
        );
    }
    for process in [&assigner, &worker] {
        let log = process.log();
        assert!(
            log.contains("API server unreachable") && log.contains(&api_server),
            "{} does not name the API server and the cause:\n{log}",
            process.name
        );
    }

    // 2. The API server comes up: both recover on their own and objects converge.
    plane.restart().unwrap();
    wait_ready("worker ready", worker_ready, true, Duration::from_secs(120)).await;
    wait_ready(
        "assigner ready",
        assigner_ready,
        true,
        Duration::from_secs(60),
    )
    .await;
    create_objects(&client, 0, 3).await;
    wait_converged(&client, 3, Duration::from_secs(120)).await;

    // 3. An outage under running processes: readiness false, logs bounded.
    let before = [assigner.log().lines().count(), worker.log().lines().count()];
    plane.stop_api_server().unwrap();
    let outage = Instant::now();
    wait_ready(
        "worker not ready",
        worker_ready,
        false,
        Duration::from_secs(30),
    )
    .await;
    wait_ready(
        "assigner not ready",
        assigner_ready,
        false,
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(outage.elapsed())).await;
    let outage_secs = outage.elapsed().as_secs();
    for (process, skip) in [(&assigner, before[0]), (&worker, before[1])] {
        let lines = lines_after(&process.log(), skip);
        let text = lines.join("\n");
        // Before: two lines per second per worker (≈120 in a minute). Now: the outage
        // line, a summary every 30 s, the Lease being lost and its controller stopping,
        // a few backed-off retries.
        assert!(
            lines.len() <= 15,
            "{}: {} log lines in a {outage_secs} s outage:\n{text}",
            process.name,
            lines.len()
        );
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("API server unreachable"))
                .count(),
            1,
            "{}: one outage line:\n{text}",
            process.name
        );
        assert!(
            !text.contains("failed with error"),
            "{}: kube's own ERROR line is repeated:\n{text}",
            process.name
        );
        eprintln!(
            "{}: {} log lines in a {outage_secs} s outage",
            process.name,
            lines.len()
        );
    }
    assert!(healthz_ok(worker_ready).await && healthz_ok(assigner_ready).await);

    // 4. The API server returns: both recover, and a change converges.
    plane.restart().unwrap();
    wait_ready(
        "worker ready again",
        worker_ready,
        true,
        Duration::from_secs(120),
    )
    .await;
    wait_ready(
        "assigner ready again",
        assigner_ready,
        true,
        Duration::from_secs(60),
    )
    .await;
    assert!(worker.log().contains("API server reachable again"));
    let api: Api<DatabaseCluster> = Api::namespaced(client.clone(), OBJECT_NAMESPACE);
    api.patch(
        "db-0",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "replicas": 2 } })),
    )
    .await
    .unwrap();
    create_objects(&client, 3, 2).await;
    wait_converged(&client, 5, Duration::from_secs(120)).await;
    assert!(assigner.is_running() && worker.is_running());
}
