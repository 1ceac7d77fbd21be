//! `shardop-bench`: shardop's load and failure scenarios against a real control plane.
//!
//! Each scenario starts from a clean local control plane, runs the assigner and workers as
//! processes, drives load, writes `target/bench/<scenario>.json` and `.png`, and prints the
//! JSON as the last line on stdout.

mod load;
mod plot;
mod procs;
mod raw;
mod report;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use prometheus_client::registry::Registry;
use shardop_runtime::{ClientFactory, KubeClientArgs, KubeMetrics};

use crate::plot::Panel;
use crate::report::Report;

#[derive(Parser, Debug)]
#[command(name = "shardop-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(clap::Args, Debug, Clone)]
struct CommonArgs {
    /// How many DatabaseClusters the scenario works with.
    #[arg(long, env = "OBJECTS", default_value_t = 1000, global = true)]
    objects: usize,
    /// Shard counts (comma-separated; scenarios that compare counts run each).
    #[arg(
        long,
        env = "SHARDS",
        value_delimiter = ',',
        default_value = "3",
        global = true
    )]
    shards: Vec<u32>,
    /// Requests in flight from the load generator.
    #[arg(long, env = "CONCURRENCY", default_value_t = 32, global = true)]
    concurrency: usize,
    /// Where the JSON and PNG files go.
    #[arg(long, env = "BENCH_DIR", default_value = "target/bench", global = true)]
    output_dir: PathBuf,
    /// Reuse a running control plane instead of starting from a clean one.
    #[arg(long, env = "REUSE_CLUSTER", global = true)]
    reuse_cluster: bool,
}

#[derive(Subcommand, Debug, Clone, Copy)]
enum Scenario {
    /// The API server's raw write capacity with shardop's client stack.
    Raw,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !cli.common.reuse_cluster {
        fresh_control_plane()?;
    }
    let cluster = shardop_e2e::cluster();
    let report = match cli.scenario {
        Scenario::Raw => raw_scenario(cluster, &cli.common).await?,
    };
    report.finish(&cli.common.output_dir)?;
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
        .status()
        .context("running hack/cluster-down.sh")?;
    anyhow::ensure!(status.success(), "hack/cluster-down.sh failed");
    Ok(())
}

/// A client with shardop's stack (user agent, metrics, 429 handling) and no client-side
/// rate limit, so the API server is the only limit measured.
async fn unlimited_client(cluster: &shardop_e2e::Cluster) -> anyhow::Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(&cluster.kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let args = KubeClientArgs {
        kube_qps: 0.0,
        kube_burst: 0,
    };
    let factory = ClientFactory::new(
        config,
        &args,
        KubeMetrics::register(&mut Registry::default()),
    );
    Ok(factory.client("shardop-bench/loadgen")?)
}

async fn raw_scenario(cluster: &shardop_e2e::Cluster, args: &CommonArgs) -> anyhow::Result<Report> {
    let client = unlimited_client(cluster).await?;
    let namespace = shardop_e2e::TestNamespace::create(&client, "bench-raw").await?;
    let mut panel = Panel::new("raw API capacity", "operations/s");
    let started = std::time::Instant::now();
    let capacity = raw::measure(
        &client,
        &namespace.name,
        args.objects,
        args.concurrency,
        &mut panel,
    )
    .await?;
    let mut report = Report::new("raw", args.objects, &args.shards);
    report
        .set("seconds", started.elapsed().as_secs_f64())
        .set("concurrency", args.concurrency)
        .set("creates_per_s", capacity.creates_per_s)
        .set("status_patches_per_s", capacity.status_patches_per_s)
        .set("label_patches_per_s", capacity.label_patches_per_s);
    plot::draw(&args.output_dir.join("raw.png"), "raw", &[panel])?;
    Ok(report)
}
