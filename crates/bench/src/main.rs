//! `shardop-bench`: shardop's load and failure scenarios against a real control plane.
//!
//! Each scenario starts from a clean local control plane, runs the assigner and workers as
//! processes, drives load, writes `target/bench/<scenario>.json` and `.png`, and prints the
//! JSON as the last line on stdout. Correctness fields that must hold (writes == 0 on
//! restart, dual_ownership == 0, ...) make the binary exit non-zero when violated.

// Tests may panic on unexpected values; production code may not (workspace lints).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod apf;
mod api_requests;
mod assign_split;
mod audit_tail;
mod ceiling;
mod change_split;
mod churn_load;
mod convergence;
mod env;
mod leftovers;
mod load;
mod markdown;
mod plot;
mod procs;
mod raw;
mod report;
mod rss_fit;
mod run;
mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shardop_runtime::parse_duration;

use crate::plot::Panel;
use crate::report::Report;

#[derive(Parser, Debug)]
#[command(name = "shardop-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    #[command(flatten)]
    knobs: Knobs,
}

/// The knobs every scenario reads (flags or the environment variables `make bench` sets).
#[derive(clap::Args, Debug, Clone)]
pub struct Knobs {
    /// How many DatabaseClusters the scenario works with.
    #[arg(long, env = "OBJECTS", default_value_t = 1000, global = true)]
    pub objects: usize,
    /// `create` and `churn`: whether the assigner serves its mutating admission webhook
    /// (`on`, as the chart does: the label is stamped at creation) or not (`off`, the watch
    /// path assigns every object).
    #[arg(long, env = "WEBHOOK", default_value = "on", value_parser = parse_on_off, global = true)]
    pub webhook: bool,
    /// `churn`: run the load against the ideal writer before shardop (`on`) instead of after
    /// (`off`): each runs on a control plane that holds the other's objects, so swapping
    /// the order shows what that costs either.
    #[arg(long, env = "IDEAL_FIRST", default_value = "off", value_parser = parse_on_off, global = true)]
    pub ideal_first: bool,
    /// Shard counts (comma-separated; `create` runs each, the others use the first).
    #[arg(
        long,
        env = "SHARDS",
        value_delimiter = ',',
        default_value = "3",
        global = true
    )]
    pub shards: Vec<u32>,
    /// `rescale`: a fixed shard count spread over the workers (the assigner's `--shards`
    /// with `--worker-statefulset`), so a rescale moves whole shards between workers; 0 =
    /// one shard per worker, and a rescale moves objects between shards.
    #[arg(long, env = "FIXED_SHARDS", default_value_t = 0, global = true)]
    pub fixed_shards: u32,
    /// Requests in flight from the load generator.
    #[arg(long, env = "CONCURRENCY", default_value_t = 32, global = true)]
    pub concurrency: usize,
    /// Where the JSON and PNG files go.
    #[arg(long, env = "BENCH_DIR", default_value = "target/bench", global = true)]
    pub output_dir: PathBuf,
    /// Reuse a running control plane instead of starting from a clean one.
    #[arg(long, env = "REUSE_CLUSTER", global = true)]
    pub reuse_cluster: bool,
    /// Objects of the raw probe every scenario runs first (0 = min(OBJECTS, 1000)).
    #[arg(long, env = "RAW_OBJECTS", default_value_t = 0, global = true)]
    pub raw_objects: usize,
    /// `churn`: how long the load runs (e.g. 15m, 30s).
    #[arg(long, env = "DURATION", default_value = "15m", value_parser = parse_duration, global = true)]
    pub duration: Duration,
    /// `churn`: scales the reference load (12 creates/s, 2 deletes/s).
    #[arg(long, env = "RATE", default_value_t = 1.0, global = true)]
    pub rate: f64,
    /// `slowdep`, `crash`: objects created per second. The default is a rate the whole
    /// control plane sustains on a 2-core machine, so the lag of the other objects shows the
    /// fault and not a backlog of creates.
    #[arg(long, env = "CREATE_RATE", default_value_t = 20.0, global = true)]
    pub create_rate: f64,
    /// `slowdep`: objects whose reconcile waits on the slow dependency.
    #[arg(long, env = "SLOW_OBJECTS", default_value_t = 5, global = true)]
    pub slow_objects: usize,
    /// `slowdep`: how long the slow dependency takes.
    #[arg(long, env = "SLOW_DELAY", default_value = "30s", value_parser = parse_duration, global = true)]
    pub slow_delay: Duration,
    /// `crash`: how many times worker 0 crashes before it is left running.
    #[arg(long, env = "CRASHES", default_value_t = 3, global = true)]
    pub crashes: usize,
    /// Upper bound of every wait for convergence (0 = 120 s + 0.3 s per object).
    #[arg(long, env = "TIMEOUT", default_value = "0s", value_parser = parse_duration, global = true)]
    pub timeout: Duration,
}

impl Knobs {
    /// Objects of the raw probe.
    pub fn raw_objects(&self) -> usize {
        match self.raw_objects {
            0 => self.objects.clamp(100, 1000),
            n => n,
        }
    }

    /// The shard count of scenarios that run one.
    pub fn first_shards(&self) -> u32 {
        self.shards.first().copied().unwrap_or(3).max(1)
    }

    /// How long to wait for convergence.
    pub fn converge_timeout(&self) -> Duration {
        if self.timeout.is_zero() {
            Duration::from_secs(120) + Duration::from_millis(300) * self.objects as u32
        } else {
            self.timeout
        }
    }
}

#[derive(Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// The API server's raw write capacity with shardop's client stack.
    Raw,
    /// Create OBJECTS as fast as the API accepts them, for each shard count in SHARDS.
    Create,
    /// Restart every worker at once over converged objects.
    Restart,
    /// 3 → 4 → 2 shards.
    Rescale,
    /// kill -9 one worker, takeover, hand-back.
    Failover,
    /// Delete OBJECTS with finalizers.
    Delete,
    /// Real 429s from an APF priority level sized too small.
    Throttle,
    /// Steady create/delete/change load for DURATION.
    Churn,
    /// A slow dependency in a few objects' reconciles.
    Slowdep,
    /// A worker aborting mid-reconcile, restarted.
    Crash,
    /// Finalizer cleanup with its dependency (claim deletion) down.
    Cleanupdep,
    /// A busy, throttled worker frozen (SIGSTOP) past its Lease, taken over, resumed.
    Freeze,
    /// The example operator (examples/tenants): OBJECTS Tenants on SHARDS shards, then one more.
    Tenants,
    /// Create → labelled latency of the watch path at 10 and 50 creates/s.
    Assign,
    /// Regenerate docs/performance.md from the JSON files in BENCH_DIR.
    Report,
    /// After other scenarios on a reused control plane: every namespace they created is
    /// gone within TIMEOUT (none stuck Terminating on objects whose finalizers nobody
    /// removes).
    Leftovers,
}

impl Scenario {
    /// Whether it needs a control plane of its own (a clean one unless REUSE_CLUSTER).
    fn needs_cluster(self) -> bool {
        !matches!(self, Self::Report | Self::Leftovers)
    }
}

/// `on` or `off` (also `true`/`false`).
fn parse_on_off(value: &str) -> Result<bool, String> {
    match value.trim() {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        other => Err(format!("{other:?}: use on or off")),
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber_init();
    let cli = Cli::parse();
    if cli.scenario == Scenario::Report {
        return markdown::regenerate(
            &cli.knobs.output_dir,
            &shardop_e2e::repo_root().join("docs/performance.md"),
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli))
}

/// Logs go to stderr (`RUST_LOG`, default info): stdout is reserved for the summary and
/// the JSON line.
fn tracing_subscriber_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let knobs = &cli.knobs;
    if cli.scenario.needs_cluster() && !knobs.reuse_cluster {
        fresh_control_plane()?;
    }
    let cluster = shardop_e2e::cluster();
    let outcome = match cli.scenario {
        Scenario::Raw => scenarios::Outcome {
            report: raw_scenario(knobs).await?,
            checks: Vec::new(),
        },
        Scenario::Create => scenarios::create(knobs).await?,
        Scenario::Restart => scenarios::restart(knobs).await?,
        Scenario::Rescale => scenarios::rescale(knobs).await?,
        Scenario::Failover => scenarios::failover(knobs).await?,
        Scenario::Delete => scenarios::delete(knobs).await?,
        Scenario::Throttle => scenarios::throttle(knobs).await?,
        Scenario::Churn => scenarios::churn(knobs).await?,
        Scenario::Slowdep => scenarios::slowdep(knobs).await?,
        Scenario::Crash => scenarios::crash(knobs).await?,
        Scenario::Cleanupdep => scenarios::cleanupdep(knobs).await?,
        Scenario::Freeze => scenarios::freeze(knobs).await?,
        Scenario::Tenants => scenarios::tenants(knobs).await?,
        Scenario::Assign => scenarios::assign(knobs).await?,
        Scenario::Report => return Ok(()),
        Scenario::Leftovers => return leftovers::check(knobs.converge_timeout()).await,
    };
    let mut report = outcome.report;
    let failed: Vec<&str> = outcome
        .checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(name, _)| name.as_str())
        .collect();
    let checks: serde_json::Map<String, serde_json::Value> = outcome
        .checks
        .iter()
        .map(|(name, ok)| (name.clone(), (*ok).into()))
        .collect();
    report.set("checks", checks);
    println!("{}", report.summary());
    report.finish(&knobs.output_dir)?;
    if !failed.is_empty()
        && let Some(audit_log) = &cluster.audit_log
    {
        // The next scenario's fresh control plane starts a new log: keep the evidence.
        let kept = knobs
            .output_dir
            .join(format!("{:?}.audit.log", cli.scenario).to_lowercase());
        match std::fs::copy(audit_log, &kept) {
            Ok(_) => {
                tracing::warn!(audit_log = %kept.display(), "kept the audit log of the failed run")
            }
            Err(err) => tracing::warn!(%err, "could not keep the audit log"),
        }
    }
    anyhow::ensure!(failed.is_empty(), "checks failed: {}", failed.join(", "));
    Ok(())
}

/// Stops any running local control plane and wipes its state, so figures do not depend on
/// what an earlier run left in etcd.
fn fresh_control_plane() -> anyhow::Result<()> {
    if std::env::var_os("KUBECONFIG").is_some() {
        return Ok(());
    }
    let status = std::process::Command::new("bash")
        .arg(shardop_e2e::repo_root().join("hack/cluster-down.sh"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("running hack/cluster-down.sh")?;
    anyhow::ensure!(status.success(), "hack/cluster-down.sh failed");
    Ok(())
}

/// Between the runs of one invocation (`create` with several shard counts): a clean
/// control plane again, with the CRDs installed.
pub async fn restart_control_plane() -> anyhow::Result<()> {
    if std::env::var_os("KUBECONFIG").is_some() {
        return Ok(());
    }
    fresh_control_plane()?;
    let root = shardop_e2e::repo_root();
    let status = std::process::Command::new("bash")
        .arg(root.join("hack/cluster-up.sh"))
        .current_dir(&root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("running hack/cluster-up.sh")?;
    anyhow::ensure!(status.success(), "hack/cluster-up.sh failed");
    shardop_e2e::install_crds(shardop_e2e::cluster()).await
}

async fn raw_scenario(knobs: &Knobs) -> anyhow::Result<Report> {
    let client = env::unlimited_client(shardop_e2e::cluster()).await?;
    // The same warm-up as every scenario's probe: right after a start the API server is
    // still busy with the CRDs.
    let warmup = shardop_e2e::TestNamespace::create(&client, "bench-warmup").await?;
    let mut panel = Panel::new("warm-up", "operations/s");
    raw::measure(&client, &warmup.name, 50, knobs.concurrency, &mut panel).await?;
    let namespace = shardop_e2e::TestNamespace::create(&client, "bench-raw").await?;
    let mut panel = Panel::new("raw API capacity", "operations/s");
    let started = std::time::Instant::now();
    let capacity = raw::measure(
        &client,
        &namespace.name,
        knobs.objects,
        knobs.concurrency,
        &mut panel,
    )
    .await?;
    let mut report = Report::new("raw", knobs.objects, &knobs.shards);
    report
        .set("seconds", started.elapsed().as_secs_f64())
        .set("concurrency", knobs.concurrency)
        .set("creates_per_s", capacity.creates_per_s)
        .set("status_patches_per_s", capacity.status_patches_per_s)
        .set("label_patches_per_s", capacity.label_patches_per_s);
    plot::draw(&knobs.output_dir.join("raw.png"), "raw", &[panel])?;
    Ok(report)
}
