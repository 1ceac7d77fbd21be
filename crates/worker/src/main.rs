//! `shardop-worker`: the sharded DatabaseCluster reconciler.

// Tests may panic on unexpected values; production code may not (workspace lints).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod backoff;
mod book;
mod cache_footprint;
mod cached_kind;
mod child_cache;
mod child_events;
mod child_store;
mod children;
mod claims;
mod cluster_cache;
mod condition_set;
mod context;
mod controller;
mod error;
mod fault;
mod ownership;
mod packed;
mod quantity;
mod reconcile;
mod resync;
mod status;
mod volume_resize;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use shardop::{
    ClientFactory, KubeClientArgs, KubeMetrics, OperatorNames, ShardIndex, ShardMetrics, Sharding,
    ShardingSettings, parse_positive_duration,
};
use shardop_runtime::serve::{Endpoints, serve};
use shardop_runtime::{LogFormat, Readiness};
use tokio_util::sync::CancellationToken;

/// The sharded DatabaseCluster reconciler: serves the shard of its StatefulSet ordinal while
/// it holds that shard's Lease, and takes over shards whose worker died.
#[derive(Parser, Debug)]
#[command(name = "shardop-worker", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the worker.
    Run(Box<RunArgs>),
    /// Print every shardop CustomResourceDefinition as YAML (or write one file per CRD).
    Crd {
        /// Write `<crd-name>.yaml` files into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        output_dir: Option<PathBuf>,
    },
}

/// `auto` (the ordinal at the end of the identity) or a shard index.
#[derive(Clone, Copy, Debug)]
enum ShardArg {
    Auto,
    Index(ShardIndex),
}

impl FromStr for ShardArg {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, String> {
        if value == "auto" {
            return Ok(Self::Auto);
        }
        value
            .parse()
            .map(Self::Index)
            .map_err(|e: shardop::ParseShardIndexError| e.to_string())
    }
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Home shard: `auto` takes the StatefulSet ordinal at the end of the identity
    /// (`shardop-worker-2` → 2).
    #[arg(long, env = "SHARDOP_SHARD", default_value = "auto")]
    shard: ShardArg,
    /// Holder identity in the shard Leases; the pod name.
    #[arg(long, env = "POD_NAME")]
    identity: String,
    /// Name of the sharded operator: the shard label on DatabaseClusters, the shard Lease
    /// and Shard names and the field managers derive from it (docs/assigner.md, "Names").
    /// The assigner must run with the same name.
    #[arg(long, env = "SHARDOP_OPERATOR_NAME", default_value = shardop::names::DEFAULT_OPERATOR, value_parser = parse_operator_name)]
    operator_name: OperatorNames,
    /// Namespace of the shard Leases and Shard objects.
    #[arg(
        long,
        env = "SHARDOP_OPERATOR_NAMESPACE",
        default_value = "shardop-system"
    )]
    operator_namespace: String,
    /// Comma-separated namespaces to watch for DatabaseClusters; all namespaces when empty.
    #[arg(long, env = "SHARDOP_WATCH_NAMESPACES", value_delimiter = ',', num_args = 0..)]
    watch_namespaces: Vec<String>,
    /// How long others wait after the last renew before a shard Lease counts as expired
    /// (whole seconds).
    #[arg(long, env = "SHARDOP_LEASE_DURATION", default_value = "15s", value_parser = parse_positive_duration)]
    lease_duration: Duration,
    /// How long after its last successful renew the holder keeps writing. Must be less
    /// than the lease duration.
    #[arg(long, env = "SHARDOP_RENEW_DEADLINE", default_value = "10s", value_parser = parse_positive_duration)]
    renew_deadline: Duration,
    /// How often the holder renews; also the unit of the takeover stagger.
    #[arg(long, env = "SHARDOP_RETRY_PERIOD", default_value = "2s", value_parser = parse_positive_duration)]
    retry_period: Duration,
    /// Reconciles running at once per shard (and watched namespace).
    #[arg(long, env = "SHARDOP_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Use streaming lists (WatchList) for the initial state of the watches.
    #[arg(long, env = "SHARDOP_STREAMING_LISTS", default_value_t = true, action = clap::ArgAction::Set)]
    streaming_lists: bool,
    /// How often memory freed by a shrunken slice is given back to the system (`off`:
    /// never).
    #[arg(long, env = "SHARDOP_MEMORY_RETURN_INTERVAL", default_value = "10s", value_parser = shardop::sharding::parse_memory_return_interval)]
    // Spelled out so clap parses the value itself into `None` (off) or `Some`.
    memory_return_interval: std::option::Option<Duration>,
    /// Backoff of transient reconcile errors: first delay.
    #[arg(long, env = "SHARDOP_BACKOFF_BASE", default_value = "500ms", value_parser = parse_positive_duration)]
    backoff_base: Duration,
    /// Backoff of transient reconcile errors: maximum delay.
    #[arg(long, env = "SHARDOP_BACKOFF_CAP", default_value = "5m", value_parser = parse_positive_duration)]
    backoff_cap: Duration,
    #[command(flatten)]
    kube: KubeClientArgs,
    /// Address of `/metrics` (port 0 = any free port, logged at start-up).
    #[arg(long, env = "SHARDOP_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Address of `/healthz` and `/readyz`; may equal the metrics address.
    #[arg(long, env = "SHARDOP_HEALTH_ADDR", default_value = "0.0.0.0:8081")]
    health_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "SHARDOP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// How long in-flight reconciles may run after SIGTERM (or a hand-back request)
    /// before they are abandoned and the Leases released.
    #[arg(long, env = "SHARDOP_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = parse_positive_duration)]
    shutdown_timeout: Duration,
}

/// With `--features heap-profile`, every allocation goes through dhat's profiler.
#[cfg(feature = "heap-profile")]
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

fn main() -> anyhow::Result<()> {
    // Written to dhat-heap.json when it drops, i.e. when the worker exits normally. Deep
    // backtraces: what holds a cached object is often many (inlined) frames up.
    #[cfg(feature = "heap-profile")]
    let _profiler = dhat::Profiler::builder().trim_backtraces(Some(48)).build();
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { output_dir } => print_crds(output_dir),
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the Tokio runtime")?;
            runtime.block_on(run(*args))
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut telemetry = shardop_runtime::telemetry::init(args.log_format, "shardop-worker")?;
    let result = run_worker(args).await;
    if let Err(err) = &result {
        tracing::error!(error = format!("{err:#}"), "worker failed");
    }
    telemetry.shutdown();
    result
}

async fn run_worker(args: RunArgs) -> anyhow::Result<()> {
    let settings = sharding_settings(&args)?;
    let shutdown = shardop_runtime::shutdown::on_signal();

    let mut registry = prometheus_client::registry::Registry::default();
    let kube_metrics = KubeMetrics::register(&mut registry);
    let metrics =
        ShardMetrics::register_with_reasons(&mut registry, &error::ReconcileError::REASONS);
    let registry = Arc::new(std::sync::Mutex::new(registry));
    // Reads the kubeconfig only (no request), so a bad one fails start-up at once.
    let clients = ClientFactory::infer(&args.kube, kube_metrics).await?;
    let readiness = Readiness::default();
    let endpoints =
        Endpoints::new(registry, readiness.clone()).requiring_api(clients.reachability().clone());
    let servers = CancellationToken::new();
    let servers_done = serve_endpoints(&args, endpoints, &servers).await?;

    tracing::info!(
        identity = %args.identity,
        home = %settings.home,
        operator_namespace = %args.operator_namespace,
        watch_namespaces = ?args.watch_namespaces,
        api_server = clients.reachability().server(),
        "starting shardop-worker"
    );
    let controller = controller::ControllerSettings {
        namespaces: watched_namespaces(&args.watch_namespaces),
        concurrency: args.concurrency,
        backoff: backoff::BackoffPolicy {
            base: args.backoff_base,
            cap: args.backoff_cap,
        },
        retry_period: args.retry_period,
    };
    // The sharding-specific part of the worker: everything else is the DatabaseCluster
    // controller's own.
    let result = Sharding::with_client_factory(clients, settings)
        .with_metrics(metrics)
        .with_shutdown(shutdown)
        .on_readiness(move |ready| readiness.set(ready))
        .run(move |scope| controller::serve(scope, controller.clone()))
        .await;
    servers.cancel();
    servers_done.await;
    tracing::info!("shardop-worker stopped");
    Ok(result?)
}

fn parse_operator_name(value: &str) -> Result<OperatorNames, String> {
    OperatorNames::new(value.trim()).map_err(|e| e.to_string())
}

/// The namespaces to watch, each once: two controllers over one namespace would share
/// the shard's bookkeeping and reconcile one object twice at a time.
fn watched_namespaces(listed: &[String]) -> Vec<String> {
    let unique: std::collections::BTreeSet<&str> = listed
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .collect();
    unique.into_iter().map(str::to_owned).collect()
}

/// The sharding settings from the flags (the chart and the bench set them as env).
fn sharding_settings(args: &RunArgs) -> anyhow::Result<ShardingSettings> {
    let home = match args.shard {
        ShardArg::Index(index) => index,
        ShardArg::Auto => shardop::protocol::home_shard_of(&args.identity).with_context(|| {
            format!(
                "--shard auto: identity {:?} does not end in an ordinal below {}",
                args.identity,
                shardop::constants::MAX_SHARDS
            )
        })?,
    };
    let settings = ShardingSettings {
        names: args.operator_name.clone(),
        identity: args.identity.clone(),
        home,
        namespace: args.operator_namespace.clone(),
        lease_duration: args.lease_duration,
        renew_deadline: args.renew_deadline,
        retry_period: args.retry_period,
        shutdown_timeout: args.shutdown_timeout,
        streaming_lists: args.streaming_lists,
        memory_return_interval: args.memory_return_interval,
    };
    // The library's check, so that the worker accepts exactly the timings a Lease can
    // express (whole-second lease durations) and the library runs with.
    settings
        .validate()
        .context("--lease-duration, --renew-deadline or --retry-period")?;
    Ok(settings)
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `servers` is cancelled; the returned
/// future completes once they stopped.
async fn serve_endpoints(
    args: &RunArgs,
    endpoints: Endpoints,
    servers: &CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let (metrics_addr, metrics_server) =
        serve(args.metrics_addr, endpoints.clone(), servers.clone()).await?;
    let metrics_task = tokio::spawn(metrics_server);
    // One listener serves all three paths; a second one only when the health address
    // differs (two `:0` addresses mean two free ports).
    let health_task = if args.health_addr == args.metrics_addr && args.metrics_addr.port() != 0 {
        tracing::info!(health_addr = %metrics_addr, "serving /healthz and /readyz");
        None
    } else {
        let (health_addr, health_server) =
            serve(args.health_addr, endpoints, servers.clone()).await?;
        tracing::info!(%health_addr, "serving /healthz and /readyz");
        Some(tokio::spawn(health_server))
    };
    tracing::info!(%metrics_addr, "serving /metrics");
    Ok(async move {
        let _ = metrics_task.await;
        if let Some(task) = health_task {
            let _ = task.await;
        }
    })
}

fn print_crds(output_dir: Option<PathBuf>) -> anyhow::Result<()> {
    use std::io::Write;
    match output_dir {
        None => {
            let yaml = shardop_api::crd::all_to_yaml()?;
            std::io::stdout().write_all(yaml.as_bytes())?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for crd in shardop_api::crd::all() {
                let path = dir.join(shardop_api::crd::file_name(&crd));
                std::fs::write(&path, shardop_api::crd::to_yaml(&crd)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_defaults_and_env_free_parse() {
        let cli = Cli::try_parse_from([
            "shardop-worker",
            "run",
            "--identity",
            "shardop-worker-2",
            "--watch-namespaces",
            "a,b",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("run expected")
        };
        assert!(matches!(args.shard, ShardArg::Auto));
        assert_eq!(args.watch_namespaces, ["a", "b"]);
        assert!(args.operator_name.is_default());
        assert_eq!(args.lease_duration, Duration::from_secs(15));
        assert_eq!(args.kube.kube_qps, 50.0);
    }

    fn run_args(extra: &[&str]) -> RunArgs {
        let args = ["shardop-worker", "run", "--identity", "shardop-worker-1"]
            .iter()
            .chain(extra)
            .copied();
        match Cli::try_parse_from(args).unwrap().command {
            Command::Run(args) => *args,
            _ => panic!("run expected"),
        }
    }

    #[test]
    fn the_operator_name_reaches_the_sharding_settings() {
        let args = run_args(&["--operator-name", "dbs"]);
        let settings = sharding_settings(&args).unwrap();
        assert_eq!(settings.names.operator(), "dbs");
        assert_eq!(settings.names.shard_label(), "dbs.shardop.dev/shard");
        let default = sharding_settings(&run_args(&[])).unwrap();
        assert!(default.names.is_default());
    }

    #[test]
    fn each_watched_namespace_gets_one_controller() {
        let args = run_args(&["--watch-namespaces", "a, b,a,,b "]);
        assert_eq!(watched_namespaces(&args.watch_namespaces), ["a", "b"]);
    }

    #[test]
    fn knobs_that_make_no_sense_are_rejected_at_start() {
        let parse = |extra: &[&str]| {
            let args = ["shardop-worker", "run", "--identity", "w-0"]
                .iter()
                .chain(extra)
                .copied();
            Cli::try_parse_from(args)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert!(parse(&["--concurrency", "1", "--kube-qps", "0"]).is_ok());
        for bad in [
            &["--concurrency", "0"][..],
            &["--lease-duration=0s"],
            &["--renew-deadline", "0"],
            &["--retry-period", "0ms"],
            &["--backoff-base=0s"],
            &["--backoff-cap", "0m"],
            &["--shutdown-timeout", "0s"],
            &["--kube-qps=-1"],
            &["--kube-qps=NaN"],
            &["--kube-burst", "0"],
        ] {
            let err = parse(bad).expect_err(&format!("{bad:?} must be rejected"));
            assert!(err.contains(bad[0].split('=').next().unwrap()), "{err}");
        }
    }

    #[test]
    fn lease_timings_are_checked_as_the_library_checks_them() {
        let settings = |extra: &[&str]| {
            let args = ["shardop-worker", "run", "--identity", "w-0"]
                .iter()
                .chain(extra)
                .copied();
            let Command::Run(args) = Cli::try_parse_from(args).unwrap().command else {
                panic!("run expected")
            };
            sharding_settings(&args)
        };
        assert!(settings(&[]).is_ok());
        for bad in [
            // The Lease would say 10 s while the holder writes until 10.2 s.
            &["--lease-duration=10.5s", "--renew-deadline=10.2s"][..],
            &["--lease-duration=15s", "--renew-deadline=15s"],
            &["--renew-deadline=2s", "--retry-period=2s"],
        ] {
            assert!(settings(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn shard_flag_is_bounded_by_the_maximum_shard_count() {
        let shard = |value: &str| {
            Cli::try_parse_from([
                "shardop-worker",
                "run",
                "--identity",
                "shardop-worker-0",
                "--shard",
                value,
            ])
            .map(|cli| match cli.command {
                Command::Run(args) => args.shard,
                _ => panic!("run expected"),
            })
        };
        assert!(matches!(
            shard("1023"),
            Ok(ShardArg::Index(ShardIndex(1023)))
        ));
        for value in ["1024", "4294967295", "4294967296"] {
            assert!(shard(value).is_err(), "--shard {value} must be rejected");
        }
    }
}
