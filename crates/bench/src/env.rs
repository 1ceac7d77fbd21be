//! The environment of one scenario run: the control plane, the operator's processes
//! (assigner and workers, as a StatefulSet would run them), and what we sample from them.

use std::collections::BTreeMap;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use prometheus_client::registry::Registry;
use shardop_e2e::metrics::metric_value;
use shardop_e2e::process::{ProcessSpec, ShardopProcess};
use shardop_e2e::{Cluster, TestNamespace};
use shardop_runtime::{ClientFactory, KubeClientArgs, KubeMetrics};

use crate::procs;

/// The operator under test and the namespaces it works in.
pub struct BenchEnv {
    /// The control plane.
    pub cluster: &'static Cluster,
    /// The load generator's client: shardop's stack, no client-side rate limit.
    pub client: Client,
    /// Where the Leases and Shard objects live.
    pub operator_ns: TestNamespace,
    /// Where the DatabaseClusters live.
    pub objects_ns: TestNamespace,
    /// Running workers by home shard.
    pub workers: BTreeMap<u32, Process>,
    /// The running assigner, if started.
    pub assigner: Option<Process>,
    /// Start the assigner with its mutating admission webhook (registered by URL).
    pub webhook: bool,
    scenario: String,
}

impl Drop for BenchEnv {
    /// Stops the operator's processes before the namespaces go: the objects' namespace
    /// removes the DatabaseClusters' finalizers as it is deleted (fields drop after this),
    /// and a worker still running would put them back, leaving the namespace Terminating.
    fn drop(&mut self) {
        self.assigner = None;
        self.workers.clear();
    }
}

/// One shardop process and its metrics port.
pub struct Process {
    /// The process.
    pub process: ShardopProcess,
    /// Its `/metrics` port on 127.0.0.1.
    pub metrics_port: u16,
}

/// Worker flags the scenarios share: Lease timings short enough that failover scenarios
/// finish quickly, but with the production ratios (renew deadline < duration).
pub const WORKER_LEASE_FLAGS: [&str; 6] = [
    "--lease-duration",
    "6s",
    "--renew-deadline",
    "4s",
    "--retry-period",
    "1s",
];

/// The workers' default Lease timings (15 s / 10 s / 2 s), for scenarios that measure no
/// failover: with the short ones, a worker starved of CPU on a loaded 2-core machine gives
/// its Lease up every few tens of seconds and its shard's controller starts over.
pub const DEFAULT_LEASE_FLAGS: [&str; 6] = [
    "--lease-duration",
    "15s",
    "--renew-deadline",
    "10s",
    "--retry-period",
    "2s",
];

impl BenchEnv {
    /// Creates the namespaces for `scenario` on `cluster`.
    pub async fn new(cluster: &'static Cluster, scenario: &str) -> anyhow::Result<Self> {
        let client = unlimited_client(cluster).await?;
        let operator_ns = TestNamespace::create(&client, &format!("bench-{scenario}-op")).await?;
        let objects_ns = TestNamespace::create(&client, &format!("bench-{scenario}")).await?;
        Ok(Self {
            cluster,
            client,
            operator_ns,
            objects_ns,
            workers: BTreeMap::new(),
            assigner: None,
            webhook: false,
            scenario: scenario.to_owned(),
        })
    }

    /// Starts worker `shardop-worker-<index>` with `extra` flags.
    pub async fn start_worker(&mut self, index: u32, extra: &[&str]) -> anyhow::Result<()> {
        self.start_worker_with(index, extra, &[]).await
    }

    /// Starts worker `shardop-worker-<index>` with `extra` flags and environment.
    pub async fn start_worker_with(
        &mut self,
        index: u32,
        extra: &[&str],
        environment: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let mut spec = ProcessSpec::worker(
            &format!("bench-{}", self.scenario),
            &format!("shardop-worker-{index}"),
            &self.operator_ns.name,
        )
        .arg("--watch-namespaces")
        .arg(&self.objects_ns.name);
        // A scenario may give a worker a budget of its own (clap refuses a flag twice).
        if !extra.iter().any(|a| a.starts_with("--kube-qps")) {
            spec = spec.arg("--kube-qps").arg(WORKER_KUBE_QPS.to_string());
        }
        if !extra.iter().any(|a| a.starts_with("--kube-burst")) {
            spec = spec.arg("--kube-burst").arg(WORKER_KUBE_BURST.to_string());
        }
        if !extra.iter().any(|a| a.starts_with("--kube-qps")) {
            spec = spec
                .arg("--kube-qps-max")
                .arg(WORKER_KUBE_QPS_MAX.to_string());
        }
        // A scenario may give the Lease timings of its own, as it may the budget.
        for flag in WORKER_LEASE_FLAGS.chunks(2) {
            if !extra.contains(&flag[0]) {
                for arg in flag {
                    spec = spec.arg(*arg);
                }
            }
        }
        for arg in extra {
            spec = spec.arg(*arg);
        }
        for (key, value) in environment {
            spec = spec.env(*key, *value);
        }
        let process = self.spawn(spec).await?;
        self.workers.insert(index, process);
        Ok(())
    }

    /// Starts the assigner with a fixed shard count (`Some`), or with `extra` naming the
    /// source of N (`--worker-statefulset`).
    pub async fn start_assigner(
        &mut self,
        shards: Option<u32>,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let mut spec = ProcessSpec::assigner(
            &format!("bench-{}", self.scenario),
            "shardop-assigner-0",
            &self.operator_ns.name,
        );
        if let Some(shards) = shards {
            spec = spec.arg("--shards").arg(shards.to_string());
        }
        spec = spec
            .arg("--watch-namespaces")
            .arg(&self.objects_ns.name)
            .arg("--kube-qps")
            .arg("500")
            .arg("--kube-burst")
            .arg("1000");
        if self.webhook {
            // The DatabaseCluster worker's finalizer comes with the label at creation.
            spec = spec
                .with_webhook(&self.operator_ns.name)
                .arg("--webhook-finalizers")
                .arg(shardop_api::constants::FINALIZER);
        }
        for arg in extra {
            spec = spec.arg(*arg);
        }
        self.assigner = Some(self.spawn(spec).await?);
        Ok(())
    }

    /// Starts `spec` with its metrics on a port the kernel picks when the process binds it
    /// (read back from its log): a port picked in advance can be taken by another process
    /// before this one binds it, and the process then fails with "address in use".
    async fn spawn(&self, spec: ProcessSpec) -> anyhow::Result<Process> {
        let process = spec
            .arg("--metrics-addr")
            .arg("127.0.0.1:0")
            .spawn(self.cluster)?;
        let metrics_port = process.metrics_addr().await?.port();
        Ok(Process {
            process,
            metrics_port,
        })
    }

    /// Resource use of every running operator process, by process name.
    pub fn sample_processes(&self) -> BTreeMap<String, procs::ProcessSample> {
        self.workers
            .values()
            .chain(self.assigner.iter())
            .filter_map(|p| Some((p.process.name.clone(), procs::sample(p.process.pid())?)))
            .collect()
    }

    /// Whether `name` is one of the operator's processes (a worker or the assigner).
    pub fn is_operator_process(&self, name: &str) -> bool {
        self.workers
            .values()
            .chain(self.assigner.iter())
            .any(|p| p.process.name == name)
    }

    /// Cumulative buckets of histogram `name`, summed over every running worker.
    pub async fn worker_histogram(&self, name: &str) -> Vec<(f64, f64)> {
        let mut total: Vec<(f64, f64)> = Vec::new();
        for worker in self.workers.values() {
            if let Ok(text) = scrape(worker.metrics_port).await {
                let buckets = crate::run::histogram_buckets(&text, name);
                if total.is_empty() {
                    total = buckets;
                } else {
                    for (sum, bucket) in total.iter_mut().zip(buckets) {
                        sum.1 += bucket.1;
                    }
                }
            }
        }
        total
    }

    /// Cumulative buckets of the assigner's histogram `name` (empty without an assigner).
    pub async fn assigner_histogram(&self, name: &str) -> Vec<(f64, f64)> {
        match &self.assigner {
            Some(assigner) => scrape(assigner.metrics_port)
                .await
                .map(|text| crate::run::histogram_buckets(&text, name))
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// Sum of metric `name` (every label set containing all of `labels`) over every running worker.
    pub async fn worker_metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut total = 0.0;
        for worker in self.workers.values() {
            if let Ok(text) = scrape(worker.metrics_port).await {
                total += metric_value(&text, name, labels);
            }
        }
        total
    }
}

/// A bench worker's client budget (`--kube-qps`), unless a scenario gives it its own; the
/// ideal writer (`ceiling`) gets the same per shard.
pub const WORKER_KUBE_QPS: f32 = 200.0;
/// A bench worker's `--kube-burst`.
pub const WORKER_KUBE_BURST: u32 = 400;
/// A bench worker's `--kube-qps-max`: its budget adapts between `--kube-qps` and this to
/// what the API server absorbs (a scenario that sets `--kube-qps` itself gets a fixed one).
pub const WORKER_KUBE_QPS_MAX: f32 = 1000.0;

/// The load generator's client: shardop's stack (user agent, metrics, 429 handling) and no
/// client-side rate limit, so the API server is the only limit.
pub async fn unlimited_client(cluster: &Cluster) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(&cluster.kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let args = KubeClientArgs {
        kube_qps: 0.0,
        kube_burst: 0,
        ..KubeClientArgs::default()
    };
    let factory = ClientFactory::new(
        config,
        &args,
        KubeMetrics::register(&mut Registry::default()),
    );
    Ok(factory.client(LOADGEN_USER_AGENT)?)
}

/// The load generator's user agent: the audit log tells its writes from shardop's by it.
pub const LOADGEN_USER_AGENT: &str = "shardop-bench/loadgen";

/// `GET /metrics` on 127.0.0.1:`port`: the body.
pub async fn scrape(port: u16) -> anyhow::Result<String> {
    shardop_e2e::metrics::scrape(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await
}
