//! `tenants`: the example operator (examples/tenants), sharded with the library, under
//! OBJECTS cluster-scoped Tenants on SHARDS shards (default 4), assigned by the generic
//! assigner; then one more shard. Reports the assigner's RSS and CPU, each worker's RSS, the
//! rebalance time and the moved fraction. Pass `SINGLETON=true` to first measure one worker
//! serving all Tenants alone (1 shard), for the per-worker RSS comparison.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::core::GroupVersionKind;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use shardop::OperatorNames;
use shardop_e2e::process::{ProcessSpec, ShardopProcess};
use shardop_e2e::{Cluster, TestNamespace};

use super::Outcome;
use crate::report::Report;
use crate::{Knobs, env, procs};

const OPERATOR: &str = "tenants";
const BINARY: &str = "tenants-operator";
const WORKERS: &str = "tenants-worker";
/// How long after the last Tenant was placed the steady RSS is read: one memory return
/// (`shardop::sharding::DEFAULT_MEMORY_RETURN_INTERVAL`) and a margin, so a worker whose
/// slice shrank has given the freed memory back.
const SETTLE: Duration = Duration::from_secs(15);

fn tenant_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.shardop.dev", "v1alpha1", "Tenant"),
        "tenants",
    )
}

/// Per Tenant name: its shard label and whether it is Ready for its generation.
type TenantStates = HashMap<String, (Option<u32>, bool)>;

/// What the bench knows of each Tenant: its shard label and whether its status is Ready
/// for its generation.
#[derive(Clone, Default)]
struct Tenants {
    by_name: Arc<Mutex<TenantStates>>,
}

impl Tenants {
    fn record(&self, tenant: &DynamicObject, shard_label: &str) {
        let Some(name) = tenant.metadata.name.clone() else {
            return;
        };
        let shard = tenant
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(shard_label))
            .and_then(|s| s.parse().ok());
        let status = &tenant.data["status"];
        let ready = status["observedGeneration"].as_i64() == tenant.metadata.generation
            && status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
        self.lock().insert(name, (shard, ready));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TenantStates> {
        self.by_name.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// (Tenants seen, Tenants on the shard `shards` shards give them and Ready).
    fn placed(&self, shards: u32) -> (usize, usize) {
        let Some(count) = NonZeroU32::new(shards) else {
            return (0, 0);
        };
        let by_name = self.lock();
        let placed = by_name
            .iter()
            .filter(|(name, (shard, ready))| {
                *ready && *shard == Some(shardop::shard_for("", name, count).0)
            })
            .count();
        (by_name.len(), placed)
    }

    fn labels(&self) -> HashMap<String, Option<u32>> {
        self.lock()
            .iter()
            .map(|(name, (shard, _))| (name.clone(), *shard))
            .collect()
    }
}

/// The processes of the run and their peak figures.
struct Processes {
    running: Vec<ShardopProcess>,
    peak_rss_mib: HashMap<String, f64>,
    cpu_s: HashMap<String, f64>,
}

impl Processes {
    fn sample(&mut self) {
        for process in &self.running {
            if let Some(sample) = procs::sample(process.pid()) {
                let peak = self.peak_rss_mib.entry(process.name.clone()).or_default();
                *peak = peak.max(sample.rss_mib);
                self.cpu_s.insert(process.name.clone(), sample.cpu_s);
            }
        }
    }

    fn rss_now(&self) -> HashMap<String, f64> {
        self.running
            .iter()
            .filter_map(|p| Some((p.name.clone(), procs::sample(p.pid())?.rss_mib)))
            .collect()
    }
}

struct Env {
    cluster: &'static Cluster,
    operator_ns: TestNamespace,
    settings_ns: TestNamespace,
}

impl Env {
    fn worker(&self, ordinal: u32) -> anyhow::Result<ShardopProcess> {
        ProcessSpec::binary("bench-tenants", BINARY, &format!("{WORKERS}-{ordinal}"))
            .arg("run")
            .arg("--namespace")
            .arg(&self.settings_ns.name)
            .arg("--kube-qps")
            .arg("200")
            .arg("--kube-burst")
            .arg("400")
            .env("SHARDOP_OPERATOR_NAMESPACE", &self.operator_ns.name)
            .env("RUST_LOG", "warn")
            .spawn(self.cluster)
    }

    fn assigner(&self) -> anyhow::Result<ShardopProcess> {
        ProcessSpec::assigner(
            "bench-tenants",
            "tenants-assigner-0",
            &self.operator_ns.name,
        )
        .arg("--operator-name")
        .arg(OPERATOR)
        .arg("--resource")
        .arg("tenants.v1alpha1.example.shardop.dev")
        .arg("--worker-statefulset")
        .arg(WORKERS)
        .arg("--kube-qps")
        .arg("400")
        .arg("--kube-burst")
        .arg("800")
        .env("RUST_LOG", "warn")
        .spawn(self.cluster)
    }

    fn scale(&self, replicas: u32) -> anyhow::Result<()> {
        self.cluster.kubectl_ok(&[
            "-n",
            &self.operator_ns.name,
            "scale",
            "statefulset",
            WORKERS,
            &format!("--replicas={replicas}"),
        ])?;
        Ok(())
    }
}

/// Applies the Tenant CRD the operator prints and waits until it is served.
fn install_crd(cluster: &Cluster) -> anyhow::Result<()> {
    let binary = shardop_e2e::process::bin_dir().join(BINARY);
    let output = std::process::Command::new(&binary)
        .arg("crd")
        .output()
        .with_context(|| format!("running {} crd", binary.display()))?;
    if !output.status.success() {
        bail!("{} crd failed", binary.display());
    }
    let applied = cluster.kubectl_with_input(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        &String::from_utf8_lossy(&output.stdout),
    )?;
    if !applied.status.success() {
        bail!(
            "applying the Tenant CRD: {}",
            String::from_utf8_lossy(&applied.stderr)
        );
    }
    cluster.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/tenants.example.shardop.dev",
    ])?;
    Ok(())
}

/// Keeps `tenants` up to date from a watch of every Tenant.
fn watch_tenants(client: kube::Client, tenants: Tenants) -> tokio::task::JoinHandle<()> {
    let shard_label = OperatorNames::new(OPERATOR)
        .map(|n| n.shard_label())
        .unwrap_or_default();
    let api: Api<DynamicObject> = Api::all_with(client, &tenant_resource());
    tokio::spawn(async move {
        let events = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(events);
        while let Some(event) = events.next().await {
            if let Ok(tenant) = event {
                tenants.record(&tenant, &shard_label);
            }
        }
    })
}

async fn create_tenants(
    client: kube::Client,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let api: Api<DynamicObject> = Api::all_with(client, &tenant_resource());
    futures::stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            async move {
                let tenant: DynamicObject = serde_json::from_value(json!({
                    "apiVersion": "example.shardop.dev/v1alpha1",
                    "kind": "Tenant",
                    "metadata": { "name": format!("tenant-{i:06}") },
                    "spec": {
                        "displayName": format!("Tenant {i}"),
                        "ownerEmail": "ops@example.com",
                        "quota": { "cpu": 1 + i % 8, "memoryGiB": 4, "maxNamespaces": 3 },
                    },
                }))?;
                match api.create(&PostParams::default(), &tenant).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
                    Err(err) => Err(anyhow::Error::from(err)),
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Samples the processes every second until all `count` Tenants are placed for `shards`
/// shards and Ready; the seconds it took.
async fn wait_placed(
    tenants: &Tenants,
    processes: &mut Processes,
    count: usize,
    shards: u32,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    loop {
        processes.sample();
        let (seen, placed) = tenants.placed(shards);
        if seen >= count && placed >= count {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > timeout {
            bail!("{placed} of {count} Tenants placed on {shards} shards within {timeout:?}");
        }
        tracing::info!(seen, placed, shards, "waiting for Tenants");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The worker RSS figures (MiB) of the running `tenants-worker-*` processes.
fn worker_rss(rss: &HashMap<String, f64>) -> Vec<f64> {
    let mut workers: Vec<(&String, &f64)> = rss
        .iter()
        .filter(|(name, _)| name.starts_with(WORKERS))
        .collect();
    workers.sort_by(|a, b| a.0.cmp(b.0));
    workers
        .into_iter()
        .map(|(_, rss)| (rss * 10.0).round() / 10.0)
        .collect()
}

/// One worker alone serving every Tenant (1 shard): its RSS, for the per-worker comparison.
async fn singleton_rss(
    env: &Env,
    tenants: &Tenants,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let mut processes = Processes {
        running: vec![env.worker(0)?, env.assigner()?],
        peak_rss_mib: HashMap::new(),
        cpu_s: HashMap::new(),
    };
    wait_placed(tenants, &mut processes, count, 1, timeout).await?;
    tokio::time::sleep(SETTLE).await;
    let rss = processes.rss_now();
    for process in &mut processes.running {
        process.terminate(Duration::from_secs(30))?;
    }
    Ok(worker_rss(&rss).first().copied().unwrap_or_default())
}

/// The scenario.
pub async fn tenants(knobs: &Knobs) -> anyhow::Result<Outcome> {
    let shards = knobs.first_shards();
    let count = knobs.objects;
    let timeout = knobs.converge_timeout();
    let cluster = shardop_e2e::cluster();
    install_crd(cluster)?;
    let client = env::unlimited_client(cluster).await?;
    let env = Env {
        cluster,
        operator_ns: TestNamespace::create(&client, "bench-tenants-op").await?,
        settings_ns: TestNamespace::create(&client, "bench-tenants").await?,
    };
    let sts = shardop_e2e::worker_stateful_set_named(WORKERS, i32::try_from(shards)?);
    Api::<StatefulSet>::namespaced(client.clone(), &env.operator_ns.name)
        .create(&PostParams::default(), &sts)
        .await?;
    let tenants = Tenants::default();
    let watch = watch_tenants(client.clone(), tenants.clone());

    let started = Instant::now();
    create_tenants(client.clone(), count, knobs.concurrency).await?;
    let created_s = started.elapsed().as_secs_f64();
    let singleton = if std::env::var("SINGLETON").is_ok_and(|v| v == "true") {
        env.scale(1)?;
        let rss = singleton_rss(&env, &tenants, count, timeout).await?;
        env.scale(shards)?;
        Some(rss)
    } else {
        None
    };

    let mut processes = Processes {
        running: Vec::new(),
        peak_rss_mib: HashMap::new(),
        cpu_s: HashMap::new(),
    };
    for ordinal in 0..shards {
        processes.running.push(env.worker(ordinal)?);
    }
    processes.running.push(env.assigner()?);
    let converged_s = wait_placed(&tenants, &mut processes, count, shards, timeout).await?;
    tokio::time::sleep(SETTLE).await;
    let steady_rss = processes.rss_now();
    let assigner_cpu_s = processes
        .cpu_s
        .get("tenants-assigner-0")
        .copied()
        .unwrap_or_default();

    // shards -> shards + 1.
    let before = tenants.labels();
    processes.running.push(env.worker(shards)?);
    let rescaled = Instant::now();
    env.scale(shards + 1)?;
    let rebalance_s = {
        wait_placed(&tenants, &mut processes, count, shards + 1, timeout).await?;
        rescaled.elapsed().as_secs_f64()
    };
    let after = tenants.labels();
    let moved = before
        .iter()
        .filter(|(name, shard)| after.get(*name) != Some(*shard))
        .count();
    let moved_fraction = moved as f64 / count.max(1) as f64;
    let ideal = 1.0 / f64::from(shards + 1);
    watch.abort();
    for process in &mut processes.running {
        let _ = process.terminate(Duration::from_secs(30));
    }

    let assigner_rss = processes
        .peak_rss_mib
        .get("tenants-assigner-0")
        .copied()
        .unwrap_or_default();
    let worker_peak: HashMap<String, f64> = processes
        .peak_rss_mib
        .iter()
        .filter(|(name, _)| name.starts_with(WORKERS))
        .map(|(name, rss)| (name.clone(), *rss))
        .collect();
    let mut report = Report::new("tenants", count, &[shards, shards + 1]);
    report
        .set("created_s", created_s)
        .set("assigned_and_reconciled_s", converged_s)
        .set("assigner_peak_rss_mib", assigner_rss)
        .set("assigner_cpu_s_to_converge", assigner_cpu_s)
        .set("worker_rss_mib", worker_rss(&steady_rss))
        .set("worker_peak_rss_mib", worker_rss(&worker_peak))
        .set("singleton_rss_mib", singleton)
        .set("rebalance_s", rebalance_s)
        .set("moved", moved)
        .set("moved_fraction", moved_fraction)
        .set("moved_fraction_ideal", ideal);
    // Jump hashing moves 1/(N+1) of the objects, all onto the new shard.
    let sigma = (ideal * (1.0 - ideal) / count.max(1) as f64).sqrt();
    let checks = vec![
        (
            "moved_only_to_new_shard".to_owned(),
            before.iter().all(|(name, shard)| {
                after.get(name) == Some(shard) || after.get(name) == Some(&Some(shards))
            }),
        ),
        (
            "moved_fraction_near_ideal".to_owned(),
            (moved_fraction - ideal).abs() <= (0.05 * ideal).max(4.0 * sigma),
        ),
    ];
    Ok(Outcome { report, checks })
}
