//! The HPA loop, end to end, in pods on the local node (hack/node-up.sh): Prometheus
//! (hack/obs-up.sh, a local process) scrapes the worker pods at their pod IPs,
//! prometheus-adapter serves `shardop_queue_depth` through the custom metrics API, and the
//! chart's HPA scales the worker StatefulSet from 2 up to 4 under a create storm of
//! DatabaseClusters and back down to 2 once the queues drain; never two owners (audit log).
//! Both ways the chart shards, one test each (run one after the other, as they share the
//! node and the release name):
//!
//! * a fixed shard count (`assigner.shards`, the chart's default way; 4 here): whole shards
//!   move between the workers and no object is ever relabelled;
//! * one shard per worker (`assigner.shards=null`): the assigner expands to four shards and
//!   contracts to two, moving objects.
//!
//! The queue builds because the workers are throttled by chart values, not by fault
//! injection (the image runs the workspace's binaries, built without the fault-injection
//! feature): `worker.concurrency=1` and `worker.kubeQps=3`, so a worker converges about one
//! DatabaseCluster a second while the assigner stamps the storm's shard labels at its
//! default 50 requests a second. The target queue depth (50 a pod) sits well below the
//! storm's queue (about 240 / 2 a pod). Each contraction queues the retired shard's objects
//! on the remaining shards again; should that spike pass the target, the HPA scales out
//! once more, and the test waits for the final state (2 workers, everything converged).
//!
//! A ResourceQuota of zero pods in the objects' namespace keeps the storm's database pods
//! off the single node: a DatabaseCluster counts as converged when its status reports the
//! generation the worker last reconciled. Replicas, per-shard queue depth and converged
//! objects are written to target/hpa/hpa-<mode>.json and plotted to target/hpa/hpa-<mode>.png;
//! the scale-up and scale-down times are printed (docs/operations.md records them).

// Tests fail by panicking; the workspace lints forbid unwrap/expect only in production code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
#[path = "../../crates/bench/src/plot.rs"]
mod plot;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, ResourceQuota};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use shardop::constants::SHARD_LABEL;
use shardop_api::DatabaseCluster;
use shardop_e2e::node::{HelmRelease, LocalNode, helm_ok};
use shardop_e2e::obs::{Observability, ScrapeTarget, observability, sample_value};
use shardop_e2e::{Cluster, TestNamespace, audit, cluster};

const RELEASE: &str = "shardop";
const STORM: usize = 240;
const MIN_WORKERS: i32 = 2;
const MAX_WORKERS: i32 = 4;
/// `assigner.shards` of the fixed-shard test: one shard per worker at the most workers, two
/// at the fewest.
const FIXED_SHARDS: i32 = 4;
/// The worker pods' metrics port (the chart's default).
const METRICS_PORT: u16 = 8080;
/// Generous: pods start slowly on a busy 2-core machine, and the HPA syncs every 15 s.
const DEADLINE: Duration = Duration::from_secs(600);

/// The chart's HPA with short windows, throttled workers (see the module docs): helm flags.
const HPA_VALUES: [(&str, &str); 10] = [
    ("--set", "worker.replicas=2"),
    ("--set", "worker.concurrency=1"),
    ("--set", "worker.kubeQps=3"),
    ("--set", "worker.kubeBurst=3"),
    ("--set", "worker.autoscaling.enabled=true"),
    ("--set", "worker.autoscaling.minReplicas=2"),
    ("--set", "worker.autoscaling.maxReplicas=4"),
    ("--set-string", "worker.autoscaling.targetQueueDepth=50"),
    (
        "--set-json",
        r#"worker.autoscaling.behavior.scaleUp={"stabilizationWindowSeconds":0,"selectPolicy":"Max","policies":[{"type":"Pods","value":2,"periodSeconds":15}]}"#,
    ),
    (
        "--set-json",
        r#"worker.autoscaling.behavior.scaleDown={"stabilizationWindowSeconds":20,"selectPolicy":"Max","policies":[{"type":"Pods","value":1,"periodSeconds":15}]}"#,
    ),
];

/// The two tests share the node and the release name: one at a time.
static NODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How the chart shards: what moves when the HPA scales the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `assigner.shards` (the chart's default way): whole shards move between workers.
    FixedShards,
    /// `assigner.shards=null`: one shard per worker, objects move between shards.
    ShardPerWorker,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::FixedShards => "fixed-shards",
            Mode::ShardPerWorker => "shard-per-worker",
        }
    }

    fn shards_value(self) -> String {
        match self {
            Mode::FixedShards => format!("assigner.shards={FIXED_SHARDS}"),
            Mode::ShardPerWorker => "assigner.shards=null".to_owned(),
        }
    }

    /// Every shard held by its home among `workers` workers: with fixed shards, all of them
    /// spread evenly over those workers; with one shard per worker, shard `i` by worker `i`
    /// and no object labelled for a shard beyond them.
    fn at_home(self, sample: &Sample, workers: i32) -> bool {
        match self {
            Mode::FixedShards => {
                let mut held = BTreeMap::<&str, i32>::new();
                for shard in 0..FIXED_SHARDS {
                    let Some(holder) = sample.holders.get(&shard) else {
                        return false;
                    };
                    *held.entry(holder.as_str()).or_default() += 1;
                }
                let homes: BTreeSet<String> = (0..workers).map(worker_pod).collect();
                let (fewest, most) = (
                    FIXED_SHARDS / workers,
                    (FIXED_SHARDS + workers - 1) / workers,
                );
                held.len() == homes.len()
                    && held
                        .iter()
                        .all(|(h, n)| homes.contains(*h) && (fewest..=most).contains(n))
            }
            Mode::ShardPerWorker => {
                let home: BTreeSet<String> = (0..workers).map(|s| s.to_string()).collect();
                (0..workers).all(|s| sample.holders.get(&s) == Some(&worker_pod(s)))
                    && sample.shards_labelled.is_subset(&home)
            }
        }
    }
}

fn worker_pod(ordinal: i32) -> String {
    format!("{RELEASE}-worker-{ordinal}")
}

/// One observation of the loop.
#[derive(Debug, Clone, serde::Serialize)]
struct Sample {
    /// Seconds since the storm began.
    t: f64,
    /// The StatefulSet's desired replicas (what the HPA set).
    replicas: i32,
    /// Worker pods Ready.
    ready_workers: i32,
    /// `shardop_queue_depth` by shard, as Prometheus scraped it.
    queue_depth: BTreeMap<String, f64>,
    /// DatabaseClusters whose status reports their current generation.
    converged: usize,
    /// Shard label values on the DatabaseClusters.
    shards_labelled: BTreeSet<String>,
    /// Holder of each shard Lease `0..MAX_WORKERS` that has one.
    holders: BTreeMap<i32, String>,
    /// DatabaseClusters seen so far with a shard label other than the first they had.
    relabelled: usize,
}

/// Lets Prometheus scrape every Running worker pod at its pod IP, as a ServiceMonitor would.
struct Scrapes {
    obs: &'static Observability,
    namespace: String,
    targets: BTreeMap<String, (String, ScrapeTarget)>,
}

impl Scrapes {
    fn update(&mut self, workers: &[Pod]) {
        let mut live = BTreeSet::new();
        for pod in workers {
            let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
                continue;
            };
            let name = pod.name_any();
            live.insert(name.clone());
            if self
                .targets
                .get(&name)
                .is_some_and(|(known, _)| *known == ip)
            {
                continue;
            }
            let addr = SocketAddr::new(ip.parse().unwrap(), METRICS_PORT);
            let target = self.obs.scrape(&self.namespace, &name, addr).unwrap();
            self.targets.insert(name, (ip, target));
        }
        self.targets.retain(|name, _| live.contains(name));
    }
}

/// Objects queued on every shard together.
fn total_queue(sample: &Sample) -> f64 {
    sample.queue_depth.values().sum()
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn is_converged(dc: &DatabaseCluster) -> bool {
    dc.status.as_ref().and_then(|s| s.observed_generation) == dc.metadata.generation
}

struct Probe {
    client: Client,
    operator: String,
    objects: String,
    obs: &'static Observability,
    began: Instant,
    /// Each DatabaseCluster's first shard label seen, and those seen with another since.
    first_labels: Mutex<(BTreeMap<String, String>, BTreeSet<String>)>,
}

impl Probe {
    async fn sample(&self, scrapes: &mut Scrapes) -> anyhow::Result<Sample> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.operator);
        let workers = pods
            .list(&ListParams::default().labels("app.kubernetes.io/component=worker"))
            .await?
            .items;
        scrapes.update(&workers);
        let stateful_sets: Api<StatefulSet> = Api::namespaced(self.client.clone(), &self.operator);
        let replicas = stateful_sets
            .get(&format!("{RELEASE}-worker"))
            .await?
            .spec
            .and_then(|s| s.replicas)
            .unwrap_or_default();
        let promql = format!(
            "sum by (shard) (shardop_queue_depth{{namespace=\"{}\"}})",
            self.operator
        );
        let queue_depth = self
            .obs
            .query(&promql)?
            .iter()
            .map(|s| {
                let shard = s["metric"]["shard"].as_str().unwrap_or_default().to_owned();
                (shard, sample_value(s))
            })
            .collect();
        let dcs: Api<DatabaseCluster> = Api::namespaced(self.client.clone(), &self.objects);
        let objects = dcs.list(&ListParams::default()).await?.items;
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.operator);
        let mut holders = BTreeMap::new();
        for shard in 0..MAX_WORKERS {
            if let Some(h) = holder(&leases, shard).await {
                holders.insert(shard, h);
            }
        }
        Ok(Sample {
            t: self.began.elapsed().as_secs_f64(),
            replicas,
            ready_workers: i32::try_from(workers.iter().filter(|p| is_ready(p)).count())?,
            queue_depth,
            converged: objects.iter().filter(|dc| is_converged(dc)).count(),
            shards_labelled: objects
                .iter()
                .filter_map(|dc| dc.labels().get(SHARD_LABEL).cloned())
                .collect(),
            holders,
            relabelled: self.relabelled(&objects),
        })
    }

    fn relabelled(&self, objects: &[DatabaseCluster]) -> usize {
        let mut guard = self.first_labels.lock().unwrap();
        let (first, moved) = &mut *guard;
        for dc in objects {
            let Some(label) = dc.labels().get(SHARD_LABEL) else {
                continue;
            };
            let seen = first.entry(dc.name_any()).or_insert_with(|| label.clone());
            if seen != label {
                moved.insert(dc.name_any());
            }
        }
        moved.len()
    }
}

/// Samples every 2 s until `until` says the loop is done (or the deadline passes).
async fn record(
    probe: &Probe,
    scrapes: &mut Scrapes,
    samples: &Arc<Mutex<Vec<Sample>>>,
    what: &str,
    until: impl Fn(&Sample) -> bool,
) -> Sample {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match probe.sample(scrapes).await {
            Ok(sample) => {
                samples.lock().unwrap().push(sample.clone());
                if until(&sample) {
                    return sample;
                }
            }
            Err(error) => eprintln!("sample: {error:#}"),
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// What one test measured, for target/hpa/hpa-<mode>.json.
struct Figures {
    scale_up: f64,
    scale_down: f64,
    drained: f64,
    rescaled: usize,
}

fn write_report(mode: Mode, samples: &[Sample], figures: &Figures) {
    let Figures {
        scale_up,
        scale_down,
        drained,
        rescaled,
    } = *figures;
    let dir = shardop_e2e::repo_root().join("target/hpa");
    std::fs::create_dir_all(&dir).unwrap();
    let report = serde_json::json!({
        "mode": mode.name(),
        "storm": STORM,
        "scale_up_seconds": scale_up,
        "scale_down_seconds": scale_down,
        "all_converged_seconds": drained,
        "scale_outs_after_first_scale_in": rescaled,
        "samples": samples,
    });
    std::fs::write(
        dir.join(format!("hpa-{}.json", mode.name())),
        serde_json::to_vec_pretty(&report).unwrap(),
    )
    .unwrap();
    let mut replicas = plot::Panel::new("Worker StatefulSet", "pods");
    let mut queues = plot::Panel::new("shardop_queue_depth by shard", "objects");
    let mut converged = plot::Panel::new("Converged DatabaseClusters", "objects");
    for s in samples {
        replicas.push("spec.replicas (HPA)", s.t, f64::from(s.replicas));
        replicas.push("Ready workers", s.t, f64::from(s.ready_workers));
        for (shard, depth) in &s.queue_depth {
            queues.push(&format!("shard {shard}"), s.t, *depth);
        }
        converged.push("converged", s.t, s.converged as f64);
    }
    let title = format!(
        "HPA on queue depth ({}): {STORM} DatabaseClusters created at t = 0",
        mode.name()
    );
    let png = dir.join(format!("hpa-{}.png", mode.name()));
    plot::draw(&png, &title, &[replicas, queues, converged]).unwrap();
    println!("wrote {}", png.display());
}

async fn install(cluster: &Cluster, node: &LocalNode, namespace: &str, mode: Mode) {
    let values = node.values_local.display().to_string();
    let shards = mode.shards_value();
    let mut args = vec![
        "install",
        RELEASE,
        "charts/shardop",
        "-n",
        namespace,
        "-f",
        &values,
    ];
    for (flag, value) in HPA_VALUES {
        args.extend([flag, value]);
    }
    args.extend(["--set", &shards]);
    helm_ok(cluster, &args).unwrap();
}

/// No pod may start in the objects' namespace: the storm's database pods would not fit the
/// node, and the loop under test is the operator's, not the databases'.
async fn forbid_pods(client: &Client, namespace: &str) {
    let quota: ResourceQuota = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "no-pods" },
        "spec": { "hard": { "pods": "0", "persistentvolumeclaims": "0" } },
    }))
    .unwrap();
    Api::<ResourceQuota>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &quota)
        .await
        .unwrap();
}

async fn create_storm(client: &Client, namespace: &str, image: &str) {
    let api: Api<DatabaseCluster> = Api::namespaced(client.clone(), namespace);
    for i in 0..STORM {
        let mut spec = shardop_e2e::valid_spec(1);
        spec["image"] = image.into();
        let object: DatabaseCluster =
            serde_json::from_value(shardop_e2e::database_cluster_json(&format!("db-{i}"), spec))
                .unwrap();
        api.create(&PostParams::default(), &object).await.unwrap();
    }
}

async fn holder(leases: &Api<Lease>, shard: i32) -> Option<String> {
    leases
        .get_opt(&format!("{RELEASE}-shard-{shard}"))
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty())
}

#[tokio::test]
async fn with_fixed_shards_the_hpa_moves_whole_shards_and_relabels_nothing() {
    let _node = NODE.lock().await;
    let samples = hpa_loop(Mode::FixedShards).await;
    let Some(last) = samples.last() else {
        return; // no node on this machine (hpa_loop said why)
    };
    assert_eq!(
        last.relabelled, 0,
        "objects changed shards while only workers came and went"
    );
    let labels: BTreeSet<String> = (0..FIXED_SHARDS).map(|s| s.to_string()).collect();
    assert!(
        samples.iter().all(|s| s.shards_labelled.is_subset(&labels)),
        "an object was labelled beyond the {FIXED_SHARDS} fixed shards"
    );
}

#[tokio::test]
async fn with_a_shard_per_worker_the_hpa_expands_and_contracts_the_shards() {
    let _node = NODE.lock().await;
    let samples = hpa_loop(Mode::ShardPerWorker).await;
    if samples.is_empty() {
        return; // no node on this machine (hpa_loop said why)
    }
    let labelled: BTreeSet<&String> = samples.iter().flat_map(|s| &s.shards_labelled).collect();
    assert!(
        labelled.contains(&"3".to_owned()),
        "no object was ever assigned to shard 3: {labelled:?}"
    );
}

/// Installs the chart sharding `mode`'s way, creates the storm, follows the HPA out to
/// four workers and back to two with every shard at home, and checks the bounds and the
/// audit log. Returns the samples for the mode's own checks: none when this machine
/// cannot run a node (`LocalNode::start` has printed why).
async fn hpa_loop(mode: Mode) -> Vec<Sample> {
    let cluster = cluster();
    let Some(node) = LocalNode::start(cluster).unwrap() else {
        return vec![];
    };
    let obs = observability(cluster);
    let client = cluster.client().await.unwrap();
    let objects = TestNamespace::create(&client, "hpa-db").await.unwrap();
    let operator = TestNamespace::create(&client, "hpa-op").await.unwrap();
    forbid_pods(&client, &objects.name).await;
    install(cluster, &node, &operator.name, mode).await;
    let _release = HelmRelease {
        cluster,
        name: RELEASE,
        namespace: operator.name.clone(),
    };
    let mut scrapes = Scrapes {
        obs,
        namespace: operator.name.clone(),
        targets: BTreeMap::new(),
    };
    let mut probe = Probe {
        client: client.clone(),
        operator: operator.name.clone(),
        objects: objects.name.clone(),
        obs,
        began: Instant::now(),
        first_labels: Mutex::default(),
    };
    let samples = Arc::new(Mutex::new(Vec::new()));
    record(
        &probe,
        &mut scrapes,
        &Arc::default(),
        "2 Ready workers holding every shard",
        |s| s.ready_workers == MIN_WORKERS && mode.at_home(s, MIN_WORKERS),
    )
    .await;

    probe.began = Instant::now();
    create_storm(&client, &objects.name, node.db_standin_image).await;
    let created = probe.began.elapsed().as_secs_f64();
    println!(
        "{}: created {STORM} DatabaseClusters in {created:.1} s",
        mode.name()
    );
    let figures = follow_the_loop(mode, &probe, &mut scrapes, &samples).await;
    let samples = samples.lock().unwrap().clone();
    write_report(mode, &samples, &figures);

    // The HPA never went past either bound.
    assert!(
        samples
            .iter()
            .all(|s| (MIN_WORKERS..=MAX_WORKERS).contains(&s.replicas))
    );
    audit::assert_one_owner(cluster.audit_log().unwrap(), &operator.name, &objects.name);
    samples
}

/// Samples the loop from the storm to two workers with everything converged: scale-up
/// (four Ready workers, every shard at home among them), scale-down (from the first step
/// below four to two workers with every shard at home) and the drain.
async fn follow_the_loop(
    mode: Mode,
    probe: &Probe,
    scrapes: &mut Scrapes,
    samples: &Arc<Mutex<Vec<Sample>>>,
) -> Figures {
    let name = mode.name();
    let scaled_up = record(probe, scrapes, samples, "4 Ready workers at home", |s| {
        s.replicas == MAX_WORKERS && s.ready_workers == MAX_WORKERS && mode.at_home(s, MAX_WORKERS)
    })
    .await;
    let scale_up = scaled_up.t;
    println!("{name}: scale-up 2 → 4 Ready workers at home: {scale_up:.1} s after the storm began");

    // The HPA scales in once the queued objects fit on fewer workers at the target, before
    // they have all converged.
    let scaled_down = record(probe, scrapes, samples, "2 workers at home", |s| {
        s.replicas == MIN_WORKERS && s.ready_workers == MIN_WORKERS && mode.at_home(s, MIN_WORKERS)
    })
    .await;
    let first_step = samples
        .lock()
        .unwrap()
        .iter()
        .find(|s| s.t > scaled_up.t && s.replicas < MAX_WORKERS)
        .map_or(scaled_down.t, |s| s.t);
    let scale_down = scaled_down.t - first_step;
    println!(
        "{name}: scale-down 4 → 2 workers at home: {scale_down:.1} s from the first step \
         (t = {first_step:.1} s, total queue then {:.0})",
        samples
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.t == first_step)
            .map_or(f64::NAN, total_queue)
    );

    let drained = record(
        probe,
        scrapes,
        samples,
        "every DatabaseCluster converged with empty queues on 2 workers",
        |s| {
            s.converged == STORM
                && s.queue_depth.values().all(|d| *d == 0.0)
                && s.replicas == MIN_WORKERS
                && mode.at_home(s, MIN_WORKERS)
        },
    )
    .await;
    println!(
        "{name}: every DatabaseCluster converged, queues empty: {:.1} s after the storm began",
        drained.t
    );
    // Scale-outs after the first scale-in: a contraction's queue spike passing the target.
    let rescaled = samples
        .lock()
        .unwrap()
        .windows(2)
        .filter(|w| w[0].t >= first_step && w[1].replicas > w[0].replicas)
        .count();
    println!("{name}: scale-outs after the first scale-in step: {rescaled}");
    Figures {
        scale_up,
        scale_down,
        drained: drained.t,
        rescaled,
    }
}
