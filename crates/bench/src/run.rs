//! One scenario run: the environment, a convergence watch, the audit log tail, and a
//! sampler that records converged objects, per-shard queue depth, RSS and CPU of every
//! process once per tick for the plot and the resource figures.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use kube::Api;
use serde_json::{Value, json};
use shardop_api::DatabaseCluster;
use shardop_e2e::metrics::{metric_value, samples};

use crate::audit_tail::AuditTail;
use crate::convergence::Convergence;
use crate::env::{self, BenchEnv};
use crate::plot::Panel;
use crate::procs;
use crate::raw::{self, RawCapacity};

/// The bench's own process in [`Run::cpu_reading`] (its load generator, watches and, in
/// `churn`, the ideal writer).
pub const BENCH_PROCESS: &str = "bench";

/// Seconds between samples.
const TICK: Duration = Duration::from_secs(1);

/// Peak and last figures of one process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessFigures {
    /// Highest RSS seen, MiB.
    pub peak_rss_mib: f64,
    /// CPU seconds used (summed over restarts of the same name).
    pub cpu_s: f64,
    last_cpu_s: f64,
}

/// A running scenario.
pub struct Run {
    /// Processes and namespaces.
    pub env: BenchEnv,
    /// Convergence and labels of the objects.
    pub conv: Convergence,
    watch: tokio::task::JoinHandle<()>,
    /// The audit log, from the start of the run, for the objects' namespace and the shard
    /// Leases.
    pub audit: Option<AuditTail>,
    /// When the run started.
    pub started: Instant,
    /// Time series for the plot.
    pub converged_panel: Panel,
    /// Queue depth per shard.
    pub queue_panel: Panel,
    /// RSS per process.
    pub rss_panel: Panel,
    /// CPU per process, percent of one core.
    pub cpu_panel: Panel,
    /// Figures per process name.
    pub processes: BTreeMap<String, ProcessFigures>,
    /// Highest `shardop_longest_running_reconcile_seconds` seen.
    pub longest_running_s: f64,
    /// Series to put into the JSON, sampled every `json_every` ticks.
    pub timeline: Vec<Value>,
    last_tick: Option<Instant>,
    ticks: u64,
    control_plane: Vec<(String, u32)>,
}

impl Run {
    /// Creates the namespaces and the watch for `scenario`.
    pub async fn new(scenario: &str) -> anyhow::Result<Self> {
        let cluster = shardop_e2e::cluster();
        let env = BenchEnv::new(cluster, scenario).await?;
        let api: Api<DatabaseCluster> = Api::namespaced(env.client.clone(), &env.objects_ns.name);
        // Only `rescale` asks which shard applied the children: the other scenarios keep
        // the API server free of a watch their figures do not read.
        let children = (scenario == "rescale")
            .then(|| Api::namespaced(env.client.clone(), &env.objects_ns.name));
        let (conv, watch) = Convergence::watch(api, children);
        let audit = cluster
            .audit_log
            .clone()
            .map(|path| AuditTail::from_now(path, &env.objects_ns.name, &env.operator_ns.name));
        let marker = cluster
            .kubeconfig
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let control_plane = ["etcd", "kube-apiserver", "kube-controller-manager"]
            .iter()
            .filter_map(|name| Some((name.to_string(), procs::find_pid(name, &marker)?)))
            .collect();
        Ok(Self {
            env,
            conv,
            watch,
            audit,
            started: Instant::now(),
            converged_panel: Panel::new("converged objects", "objects"),
            queue_panel: Panel::new("queue depth per shard", "objects"),
            rss_panel: Panel::new("RSS per process", "MiB"),
            cpu_panel: Panel::new("CPU per process", "% of one core"),
            processes: BTreeMap::new(),
            longest_running_s: 0.0,
            timeline: Vec::new(),
            last_tick: None,
            ticks: 0,
            control_plane,
        })
    }

    /// Seconds since the run started.
    pub fn t(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The objects' API.
    pub fn api(&self) -> Api<DatabaseCluster> {
        Api::namespaced(self.env.client.clone(), &self.env.objects_ns.name)
    }

    /// The audit log tail (fails when the cluster has none, e.g. KUBECONFIG set).
    pub fn audit(&mut self) -> anyhow::Result<&mut AuditTail> {
        let audit = self
            .audit
            .as_mut()
            .context("the audit log is needed (the bench's own control plane has one)")?;
        audit.poll()?;
        Ok(audit)
    }

    /// Records one sample of everything (at most once per tick).
    pub async fn sample(&mut self) {
        let now = Instant::now();
        if self.last_tick.is_some_and(|last| now - last < TICK) {
            return;
        }
        let dt = self
            .last_tick
            .map_or(TICK.as_secs_f64(), |l| (now - l).as_secs_f64());
        self.last_tick = Some(now);
        self.ticks += 1;
        let t = self.t();
        self.converged_panel
            .push("converged", t, self.conv.converged() as f64);
        self.converged_panel
            .push("live", t, self.conv.live() as f64);
        let mut queues: BTreeMap<String, f64> = BTreeMap::new();
        for worker in self.env.workers.values() {
            let Ok(text) = env::scrape(worker.metrics_port).await else {
                continue;
            };
            for (shard, depth) in series(&text, "shardop_queue_depth") {
                *queues.entry(format!("shard-{shard}")).or_default() += depth;
            }
            for (_, longest) in series(&text, "shardop_longest_running_reconcile_seconds") {
                self.longest_running_s = self.longest_running_s.max(longest);
            }
        }
        for (shard, depth) in &queues {
            self.queue_panel.push(shard, t, *depth);
        }
        let samples = self.process_samples();
        let mut point = serde_json::Map::new();
        point.insert("t".into(), json!((t * 10.0).round() / 10.0));
        point.insert("converged".into(), json!(self.conv.converged()));
        for (name, sample) in samples {
            // The control plane ran before this run: count its CPU from the first sample.
            let baseline = !self.processes.contains_key(&name)
                && self.control_plane.iter().any(|(n, _)| *n == name);
            let figures = self.processes.entry(name.clone()).or_default();
            if baseline {
                figures.last_cpu_s = sample.cpu_s;
            }
            figures.peak_rss_mib = figures.peak_rss_mib.max(sample.rss_mib);
            // A restarted process starts from 0 CPU seconds again.
            let delta = if sample.cpu_s >= figures.last_cpu_s {
                sample.cpu_s - figures.last_cpu_s
            } else {
                sample.cpu_s
            };
            figures.cpu_s += delta;
            figures.last_cpu_s = sample.cpu_s;
            let cpu_percent = 100.0 * delta / dt.max(1e-3);
            self.rss_panel.push(&name, t, sample.rss_mib);
            self.cpu_panel.push(&name, t, cpu_percent);
            point.insert(
                name,
                json!({ "rss_mib": (sample.rss_mib * 10.0).round() / 10.0,
                        "cpu_percent": cpu_percent.round() }),
            );
        }
        if self.ticks % 10 == 1 {
            self.timeline.push(Value::Object(point));
        }
    }

    /// Forgets a process's last CPU reading (before it is restarted under the same name).
    pub fn process_restarted(&mut self, name: &str) {
        if let Some(figures) = self.processes.get_mut(name) {
            figures.last_cpu_s = 0.0;
        }
    }

    /// Samples while polling `done` every 200 ms until it holds or `timeout` passes.
    /// Returns the seconds it took, or `None` on timeout.
    pub async fn wait_until<F>(&mut self, timeout: Duration, mut done: F) -> Option<f64>
    where
        F: FnMut(&mut Self) -> bool,
    {
        let started = Instant::now();
        loop {
            self.sample().await;
            if done(self) {
                return Some(started.elapsed().as_secs_f64());
            }
            if started.elapsed() >= timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Like `wait_until`, with an async probe that may look at metrics.
    pub async fn wait_until_async<F>(&mut self, timeout: Duration, mut done: F) -> Option<f64>
    where
        F: AsyncFnMut(&BenchEnv, &Convergence) -> bool,
    {
        let started = Instant::now();
        loop {
            self.sample().await;
            if done(&self.env, &self.conv).await {
                return Some(started.elapsed().as_secs_f64());
            }
            if started.elapsed() >= timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts the assigner and `shards` workers and waits until every shard is served and
    /// the assigner leads with E = `shards`.
    pub async fn start_operator(
        &mut self,
        shards: u32,
        worker_env: &[(&str, &str)],
        worker_flags: &[&str],
    ) -> anyhow::Result<()> {
        for index in 0..shards {
            self.env
                .start_worker_with(index, worker_flags, worker_env)
                .await?;
        }
        self.env.start_assigner(Some(shards), &[]).await?;
        self.wait_for_operator(shards).await
    }

    /// Waits until shards `0..shards` are held and the assigner hashes over all of them.
    pub async fn wait_for_operator(&mut self, shards: u32) -> anyhow::Result<()> {
        let assigner_port = self.env.assigner.as_ref().map(|a| a.metrics_port);
        let ready = self
            .wait_until_async(Duration::from_secs(60), async |env, _| {
                let held = env.worker_metric_sum("shardop_shard_leader", &[]).await;
                let effective = match assigner_port {
                    Some(port) => env::scrape(port).await.map_or(0.0, |text| {
                        metric_value(&text, "shardop_assigner_effective_shards", &[])
                    }),
                    None => f64::from(shards),
                };
                held >= f64::from(shards) && effective >= f64::from(shards)
            })
            .await;
        ready.map(drop).with_context(|| {
            format!("the operator did not serve {shards} shards within 60 s (see target/e2e-logs)")
        })
    }

    /// Creates `names` (unlabelled, replicas 1) with `concurrency` requests in flight, at
    /// most `rate` per second (0 = as fast as the API server accepts them), sampling
    /// meanwhile. Returns the seconds the creates took.
    pub async fn create_objects(
        &mut self,
        names: Vec<String>,
        concurrency: usize,
        rate: f64,
    ) -> anyhow::Result<f64> {
        let api = self.api();
        let conv = self.conv.clone();
        let started = Instant::now();
        let task = tokio::spawn(create_all(api, conv, names, concurrency, rate));
        while !task.is_finished() {
            self.sample().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        task.await??;
        Ok(started.elapsed().as_secs_f64())
    }

    /// Waits until `expected` objects are converged; fails after `timeout`.
    pub async fn wait_converged(
        &mut self,
        expected: usize,
        timeout: Duration,
    ) -> anyhow::Result<f64> {
        self.wait_until(timeout, |run| run.conv.converged() >= expected)
            .await
            .with_context(|| {
                format!(
                    "only {} of {expected} objects converged within {timeout:?}",
                    self.conv.converged()
                )
            })
    }

    /// Waits until neither a worker nor the StatefulSet controller has written in the
    /// objects' namespace for `quiet` (at most `timeout`): the StatefulSet controller's
    /// follow-up (pods and claims created, StatefulSet status) has been reflected in the
    /// objects' status and nothing is left to do. Returns whether it got quiet.
    pub async fn settle(&mut self, quiet: Duration, timeout: Duration) -> anyhow::Result<bool> {
        let started = Instant::now();
        loop {
            self.sample().await;
            let audit = self.audit()?;
            let last = audit
                .last_worker_write()
                .max(audit.last_stateful_set_status_write());
            let idle = last.is_none_or(|last| {
                jiff::Timestamp::now().duration_since(last).as_secs_f64() >= quiet.as_secs_f64()
            });
            if idle || started.elapsed() >= timeout {
                if !idle {
                    tracing::warn!("workers still writing after {timeout:?}; continuing");
                }
                return Ok(idle);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The CPU time every process of the run (control plane, operator, the bench itself as
    /// [`BENCH_PROCESS`]) and the machine have used so far: the difference of two readings
    /// is what a phase of a scenario cost each.
    pub fn cpu_reading(&self) -> procs::CpuReading {
        let mut processes: BTreeMap<String, f64> = self
            .process_samples()
            .into_iter()
            .map(|(name, sample)| (name, sample.cpu_s))
            .collect();
        if let Some(own) = procs::sample(std::process::id()) {
            processes.insert(BENCH_PROCESS.to_owned(), own.cpu_s);
        }
        procs::CpuReading {
            processes,
            machine: procs::MachineCpu::read(),
        }
    }

    /// One sample of every process under test: the operator's, then the control plane's.
    fn process_samples(&self) -> Vec<(String, procs::ProcessSample)> {
        let mut samples: Vec<(String, procs::ProcessSample)> =
            self.env.sample_processes().into_iter().collect();
        samples.extend(
            self.control_plane
                .iter()
                .filter_map(|(name, pid)| Some((name.clone(), procs::sample(*pid)?))),
        );
        samples
    }

    /// `used` as report figures: `control_plane_cpu_s` and `operator_cpu_s` (CPU seconds
    /// by process), `bench_cpu_s` and `machine_busy` (the share of all cores busy).
    pub fn cpu_figures(&self, used: &procs::CpuUse) -> serde_json::Map<String, Value> {
        let control_plane = used.of(|name| self.control_plane.iter().any(|(n, _)| n == name));
        let operator = used.of(|name| self.env.is_operator_process(name));
        let bench = used.of(|name| name == BENCH_PROCESS);
        let busy = used
            .machine_busy
            .map(|busy| (busy * 1000.0).round() / 1000.0);
        serde_json::Map::from_iter([
            ("control_plane_cpu_s".to_owned(), json!(control_plane)),
            ("operator_cpu_s".to_owned(), json!(operator)),
            ("bench_cpu_s".to_owned(), json!(bench.get(BENCH_PROCESS))),
            ("machine_busy".to_owned(), json!(busy)),
        ])
    }

    /// Peak RSS of every worker process (MiB), by name.
    pub fn worker_rss(&self) -> BTreeMap<String, f64> {
        self.processes
            .iter()
            .filter(|(n, _)| n.starts_with("shardop-worker"))
            .map(|(n, f)| (n.clone(), round1(f.peak_rss_mib)))
            .collect()
    }

    /// CPU seconds of every worker process, by name.
    pub fn worker_cpu(&self) -> BTreeMap<String, f64> {
        self.processes
            .iter()
            .filter(|(n, _)| n.starts_with("shardop-worker"))
            .map(|(n, f)| (n.clone(), round1(f.cpu_s)))
            .collect()
    }

    /// Peak RSS and CPU seconds of every process (operator and control plane).
    pub fn process_table(&self) -> Value {
        let map: serde_json::Map<String, Value> = self
            .processes
            .iter()
            .map(|(n, f)| {
                (
                    n.clone(),
                    json!({ "peak_rss_mib": round1(f.peak_rss_mib), "cpu_s": round1(f.cpu_s) }),
                )
            })
            .collect();
        Value::Object(map)
    }

    /// The plot's panels.
    pub fn panels(&self) -> Vec<Panel> {
        vec![
            self.converged_panel.clone(),
            self.queue_panel.clone(),
            self.rss_panel.clone(),
            self.cpu_panel.clone(),
        ]
    }

    /// Stops the watch and the processes.
    pub fn finish(self) {
        self.watch.abort();
    }
}

/// `round(x, 1)`.
pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Object names `<prefix>-<i>` for `range`.
pub fn names(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i:05}")).collect()
}

/// (shard label value, value) of every sample of metric `name` that has a `shard` label.
pub fn series(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{')?;
            if metric != name {
                return None;
            }
            let shard = labels.split("shard=\"").nth(1)?.split('"').next()?;
            Some((shard.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The `q`-quantile from cumulative histogram buckets `(le, count)`, estimated as PromQL does.
pub fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.iter().map(|b| b.1).fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    // As PromQL's histogram_quantile: linear inside the bucket the rank falls into, from
    // 0 for the first bucket; a rank in +Inf reads as the highest finite bound.
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            let share = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * share);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

/// Cumulative buckets of histogram `name` summed over every label set, from scrape `text`.
pub fn histogram_buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for sample in samples(text).filter(|s| s.name == bucket) {
        let Some(le) = sample.label("le") else {
            continue;
        };
        let le = le.parse::<f64>().unwrap_or(f64::INFINITY);
        by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += sample.value;
    }
    let mut buckets: Vec<(f64, f64)> = by_le.into_values().collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// Subtracts bucket counts `before` from `after` (same bounds).
pub fn histogram_delta(after: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|(le, count)| {
            let earlier = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, count - earlier)
        })
        .collect()
}

/// Creates `names` with `concurrency` in flight, at most `rate`/s (0 = unlimited).
pub async fn create_all(
    api: Api<DatabaseCluster>,
    conv: Convergence,
    names: Vec<String>,
    concurrency: usize,
    rate: f64,
) -> anyhow::Result<()> {
    use futures::{StreamExt, TryStreamExt};
    let started = Instant::now();
    futures::stream::iter(names.into_iter().enumerate())
        .map(|(i, name)| {
            let api = api.clone();
            let conv = conv.clone();
            async move {
                if rate > 0.0 {
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let created = api
                    .create(
                        &kube::api::PostParams::default(),
                        &crate::load::database_cluster(&name, 1),
                    )
                    .await
                    .with_context(|| format!("creating {name}"))?;
                conv.created(&created);
                anyhow::Ok(())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_for_each(|()| async { Ok(()) })
        .await
}

/// Runs a short raw probe in its own namespace: the denominator of the run's figures.
pub async fn raw_probe(objects: usize, concurrency: usize) -> anyhow::Result<(RawCapacity, Value)> {
    let cluster = shardop_e2e::cluster();
    let client = env::unlimited_client(cluster).await?;
    // A short warm-up first: right after a start the API server is still busy with the
    // CRDs (OpenAPI, discovery), which would make the first creates look slow.
    let warmup = shardop_e2e::TestNamespace::create(&client, "bench-warmup").await?;
    let mut panel = Panel::new("raw", "ops/s");
    raw::measure(&client, &warmup.name, 50, concurrency, &mut panel).await?;
    let namespace = shardop_e2e::TestNamespace::create(&client, "bench-probe").await?;
    let mut panel = Panel::new("raw", "ops/s");
    let capacity = raw::measure(&client, &namespace.name, objects, concurrency, &mut panel).await?;
    let value = json!({
        "objects": objects,
        "concurrency": concurrency,
        "creates_per_s": capacity.creates_per_s,
        "status_patches_per_s": capacity.status_patches_per_s,
        "label_patches_per_s": capacity.label_patches_per_s,
    });
    Ok((capacity, value))
}

/// The names in `names` whose shard label is `shard`.
pub fn on_shard(conv: &Convergence, shard: u32) -> HashSet<String> {
    conv.shards()
        .into_iter()
        .filter(|(_, s)| *s == Some(shard))
        .map(|(n, _)| n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantile_interpolates_like_promql() {
        // 100 observations: 50 ≤ 0.1, 40 in (0.1, 0.5], 10 in (0.5, 1].
        let buckets = [
            (0.1, 50.0),
            (0.5, 90.0),
            (1.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        let at = |q| histogram_quantile(&buckets, q).unwrap();
        assert!((at(0.25) - 0.05).abs() < 1e-9);
        assert!((at(0.7) - 0.3).abs() < 1e-9);
        assert!((at(0.99) - 0.95).abs() < 1e-9);
        // Beyond the highest finite bound: that bound.
        let overflow = [(1.0, 10.0), (f64::INFINITY, 100.0)];
        assert_eq!(histogram_quantile(&overflow, 0.99), Some(1.0));
        assert_eq!(histogram_quantile(&[(1.0, 0.0)], 0.99), None);
    }
}
