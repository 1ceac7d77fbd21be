//! `tenants-operator`: renders each cluster-scoped `Tenant` into a settings ConfigMap.
//!
//! `tenants-operator crd` prints the Tenant CRD; `tenants-operator run` runs the controller.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod desired;
mod reconcile;
mod tenant;

use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, CustomResourceExt};

use crate::reconcile::{Context, error_policy, reconcile};
use crate::tenant::Tenant;

/// The operator's name: its label keys (`tenants.shardop.dev/shard`), shard Leases
/// (`tenants-shard-<i>`) and field managers derive from it.
const OPERATOR: &str = "tenants"; // sharding:

#[derive(Parser, Debug)]
#[command(name = "tenants-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the Tenant CustomResourceDefinition as YAML.
    Crd,
    /// Run the operator.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Namespace of the settings ConfigMaps.
    #[arg(long, env = "TENANTS_NAMESPACE", default_value = "tenants")]
    namespace: String,
    #[command(flatten)]
    kube: shardop::KubeClientArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => print_crd(),
        Command::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the Tokio runtime")?
                .block_on(run(args))
        }
    }
}

fn print_crd() -> anyhow::Result<()> {
    use std::io::Write;
    let yaml = serde_yaml::to_string(&Tenant::crd())?;
    std::io::stdout().write_all(yaml.as_bytes())?;
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // The library's client factory: rate-limited, and each shard's client names the shard
    // and the process in its User-Agent (`tenants-worker/shard-<i> (<pod>)`).
    let metrics =
        shardop::KubeMetrics::register(&mut prometheus_client::registry::Registry::default());
    let factory = shardop::ClientFactory::infer(&args.kube, metrics)
        .await
        .context("building the kube client")?;
    tracing::info!(namespace = args.namespace, "tenants-operator starting");
    // Identity (POD_NAME), home shard (its ordinal) and Lease namespace from the environment;
    // one Controller per served shard: the home shard and any taken over from a dead peer.
    let settings = shardop::ShardingSettings::from_env(OPERATOR, &args.namespace)?; // sharding:
    let sharding = shardop::Sharding::with_client_factory(factory, settings); // sharding:
    let namespace = args.namespace;
    sharding // sharding:
        .run(move |scope: shardop::ShardScope| run_shard(scope, namespace.clone())) // sharding:
        .await?; // sharding:
    tracing::info!("tenants-operator stopped");
    Ok(())
}

/// Runs the Tenant controller over one shard's slice until the shard stops (its
/// `scope` parameter is a sharding line).
async fn run_shard(scope: shardop::ShardScope, namespace: String) {
    // Writes through the shard's client are fenced by its Lease.
    let client = scope.client(); // sharding:
    let settings: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let ctx = Arc::new(Context {
        client: client.clone(),
        namespace,
        scope: scope.clone(), // sharding:
    });
    // The shard's Tenants, and the settings ConfigMaps labelled with its shard.
    scope // sharding:
        .controller(Api::<Tenant>::all(client)) // sharding:
        .watches(settings, scope.watcher_config(), desired::owner_of_settings) // sharding:
        .run(scope.reconciler(reconcile), error_policy, ctx) // sharding:
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "reconcile not run");
            }
        })
        .await;
}
