//! `shardop-assigner`: stamps shard labels on the objects of the sharded kinds
//! (DatabaseClusters by default) and moves them between shards when the shard count
//! changes, following `docs/shard-protocol.md`.

// Tests may panic on unexpected values; production code may not (workspace lints).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod args;
mod engine;
mod fences;
mod leader;
mod metrics;
mod objects;
mod planning;
mod resources;
mod shard_count;
mod shard_objects;
mod stalls;
mod webhook;
mod write_backoff;
mod writes;

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use shardop::OperatorNames;
use shardop::lease::watch_operator_shard_leases;
use shardop_runtime::serve::{Endpoints, serve};
use shardop_runtime::{ClientFactory, KubeMetrics, Readiness};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::args::{Cli, Command, RunArgs};

fn main() -> anyhow::Result<()> {
    let Command::Run(args) = Cli::parse_from(with_run_subcommand(std::env::args_os())).command;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the Tokio runtime")?;
    runtime.block_on(run(*args))
}

/// `run` is the only subcommand, so it may be left out: `shardop-assigner --shards 3`
/// means `shardop-assigner run --shards 3` (the chart spells it out, scripts need not).
fn with_run_subcommand(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<_> = args.into_iter().collect();
    let explicit = args
        .get(1)
        .and_then(|a| a.to_str())
        .is_some_and(|a| matches!(a, "run" | "help" | "-h" | "--help" | "-V" | "--version"));
    if !explicit {
        args.insert(args.len().min(1), "run".into());
    }
    args
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut telemetry = shardop_runtime::telemetry::init(args.log_format, "shardop-assigner")?;
    let result = run_assigner(args).await;
    if let Err(err) = &result {
        tracing::error!(error = format!("{err:#}"), "assigner failed");
    }
    telemetry.shutdown();
    result
}

async fn run_assigner(args: RunArgs) -> anyhow::Result<()> {
    let identity = args.identity();
    let shutdown = shardop_runtime::shutdown::on_signal();

    let mut registry = prometheus_client::registry::Registry::default();
    let kube_metrics = KubeMetrics::register(&mut registry);
    let metrics = metrics::AssignerMetrics::register(&mut registry);
    let webhook_metrics = webhook::WebhookMetrics::register(&mut registry);
    let registry = Arc::new(std::sync::Mutex::new(registry));
    // Reads the kubeconfig only (no request), so a bad one fails start-up at once.
    let clients = ClientFactory::infer(&args.kube, kube_metrics).await?;
    // A standby is as ready as the leader: it only waits for its turn. Neither is while
    // the API server does not answer.
    let readiness = Readiness::default();
    readiness.set(true);
    let endpoints =
        Endpoints::new(registry, readiness).requiring_api(clients.reachability().clone());
    let servers = CancellationToken::new();
    let mut tasks = JoinSet::new();
    serve_endpoints(&args, endpoints, &servers, &mut tasks).await?;

    let names = args.operator_name.clone();
    let agent = format!("{} ({identity})", names.assigner_field_manager());
    let client = clients.client(&agent)?;
    // Leader election renews on the Lease budget: never behind a backlog of label writes.
    let lease_client = clients.lease_client(&agent)?;
    tracing::info!(
        %identity,
        operator = names.operator(),
        resources = ?args.resources().iter().map(ToString::to_string).collect::<Vec<_>>(),
        api_server = clients.reachability().server(),
        operator_namespace = %args.operator_namespace,
        worker_statefulset = ?args.worker_statefulset,
        shards = ?args.shards,
        watch_namespaces = ?args.namespaces(),
        "starting shardop-assigner"
    );

    let webhook = webhook::start(
        webhook::Setup {
            args: &args.webhook,
            client: &client,
            names: &names,
            operator_namespace: &args.operator_namespace,
            watch_namespaces: args.namespaces(),
            kinds: args.resources(),
            count: shard_count_source(&client, &args),
            metrics: webhook_metrics,
        },
        &mut tasks,
        &servers,
    )
    .await?;

    let settings = engine_settings(&args, &names);
    let election = election(&args, names, identity);
    let lead = |term: CancellationToken| {
        let client = client.clone();
        let settings = settings.clone();
        let metrics = metrics.clone();
        let args = args.clone();
        let webhook = webhook.clone();
        async move {
            metrics.is_leader.set(1);
            let upkeep = webhook.map(|w| tokio::spawn(w.lead(term.clone())));
            lead(client, settings, metrics.clone(), &args, term).await;
            upkeep.inspect(tokio::task::JoinHandle::abort);
            metrics.is_leader.set(0);
        }
    };
    let result = leader::run(lease_client, election, shutdown, lead).await;
    servers.cancel();
    while tasks.join_next().await.is_some() {}
    tracing::info!("shardop-assigner stopped");
    result
}

/// The leader election's settings from the flags.
fn election(args: &RunArgs, names: OperatorNames, identity: String) -> leader::Election {
    leader::Election {
        names,
        namespace: args.operator_namespace.clone(),
        identity,
        duration: args.leader_lease_duration,
        grace: args.leader_lease_grace,
        renew_deadline: args.leader_renew_deadline,
    }
}

/// Serves /metrics, and /healthz and /readyz on their own address when it differs.
async fn serve_endpoints(
    args: &RunArgs,
    endpoints: Endpoints,
    servers: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<()> {
    let (metrics_addr, metrics_server) =
        serve(args.metrics_addr, endpoints.clone(), servers.clone()).await?;
    tasks.spawn(metrics_server);
    tracing::info!(%metrics_addr, "serving /metrics");
    if args.health_addr != args.metrics_addr {
        let (health_addr, health_server) =
            serve(args.health_addr, endpoints, servers.clone()).await?;
        tasks.spawn(health_server);
        tracing::info!(%health_addr, "serving /healthz and /readyz");
    }
    Ok(())
}

/// The engine's settings from the command line; the kinds are resolved by discovery at
/// the start of each term.
fn engine_settings(args: &RunArgs, names: &OperatorNames) -> engine::Settings {
    engine::Settings {
        names: names.clone(),
        kinds: Vec::new(),
        operator_namespace: args.operator_namespace.clone(),
        watch_namespaces: args.namespaces(),
        max_concurrent_moves: args.max_concurrent_moves.max(1),
        max_concurrent_writes: args.max_concurrent_writes.max(1),
        status_interval: args.status_interval,
        resync_period: args
            .resync_period
            .max(std::time::Duration::from_millis(100)),
    }
}

/// One term as leader: resolve the sharded kinds, start the watches, run the engine until
/// `term` is cancelled.
async fn lead(
    client: kube::Client,
    mut settings: engine::Settings,
    metrics: metrics::AssignerMetrics,
    args: &RunArgs,
    term: CancellationToken,
) {
    let Some(kinds) = resources::discover_until_served(&client, &args.resources(), &term).await
    else {
        return;
    };
    settings.kinds = kinds.into_iter().map(Arc::new).collect();
    let mut drivers = JoinSet::new();
    let (leases, lease_driver) = watch_operator_shard_leases(
        client.clone(),
        &settings.operator_namespace,
        false,
        settings.names.clone(),
    );
    drivers.spawn(lease_driver);
    let (shard_count, count_driver) = shard_count_source(&client, args);
    drivers.spawn(count_driver);
    let worker_count = worker_count_source(&client, args).map(|(rx, driver)| {
        drivers.spawn(driver);
        rx
    });
    let (engine, events) = engine::Engine::start(
        client,
        settings,
        metrics,
        leases,
        shard_count,
        worker_count,
        &mut drivers,
    );
    engine.run(events, term).await;
    drivers.abort_all();
}

/// Where N comes from: `--shards`, else the worker StatefulSet.
fn shard_count_source(
    client: &kube::Client,
    args: &RunArgs,
) -> (
    shard_count::ShardCountRx,
    futures::future::BoxFuture<'static, ()>,
) {
    match (args.shards, &args.worker_statefulset) {
        (Some(n), _) => shard_count::fixed(n),
        (None, Some(name)) => {
            shard_count::from_statefulset(client.clone(), &args.operator_namespace, name)
        }
        // clap requires one of the two.
        (None, None) => shard_count::fixed(shardop_api::ShardCount::MIN),
    }
}

/// The worker count the shards are spread over, when both `--shards` and
/// `--worker-statefulset` are given: the shard count stays fixed and a rescale moves whole
/// shards between workers instead of objects between shards.
fn worker_count_source(
    client: &kube::Client,
    args: &RunArgs,
) -> Option<(
    shard_count::ShardCountRx,
    futures::future::BoxFuture<'static, ()>,
)> {
    let name = args.worker_statefulset.as_deref()?;
    args.shards?;
    Some(shard_count::from_statefulset(
        client.clone(),
        &args.operator_namespace,
        name,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_may_be_left_out() {
        let parse = |args: &[&str]| {
            let args = with_run_subcommand(args.iter().map(std::ffi::OsString::from));
            Cli::try_parse_from(args).map(|cli| {
                let Command::Run(run) = cli.command;
                run.shards.map(|n| n.get())
            })
        };
        assert_eq!(parse(&["a", "--shards", "3"]).unwrap(), Some(3));
        assert_eq!(parse(&["a", "run", "--shards", "2"]).unwrap(), Some(2));
    }
}
