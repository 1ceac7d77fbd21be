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
const OPERATOR: &str = "tenants";

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
    // sharding: identity (POD_NAME), home shard and Lease namespace from the environment.
    let settings = shardop::ShardingSettings::from_env(OPERATOR, &args.namespace)?; // sharding:
    let sharding = shardop::Sharding::with_client_factory(factory, settings); // sharding:
    tracing::info!(namespace = args.namespace, "tenants-operator starting");
    let namespace = args.namespace;
    // sharding: one Controller per served shard (home shard and taken-over ones).
    sharding
        .run(move |scope: shardop::ShardScope| {
            // sharding:
            let namespace = namespace.clone();
            async move { run_shard(scope, namespace).await }
        })
        .await?; // sharding:
    tracing::info!("tenants-operator stopped");
    Ok(())
}

/// Runs the Tenant controller over one shard's slice until the shard stops.
async fn run_shard(scope: shardop::ShardScope, namespace: String) {
    let client = scope.client(); // sharding: writes fenced by the shard's Lease
    let settings: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    // sharding: the shard's children only (they carry its label); ours among them.
    let mut settings_config = scope.watcher_config(); // sharding:
    let own = format!("{}={}", desired::MANAGED_BY_LABEL, desired::MANAGED_BY);
    settings_config.label_selector = Some(match settings_config.label_selector.take() {
        Some(shard) => format!("{shard},{own}"), // sharding:
        None => own,
    });
    let ctx = Arc::new(Context {
        client: client.clone(),
        namespace,
        scope: scope.clone(), // sharding:
    });
    scope
        .controller(Api::<Tenant>::all(client)) // sharding: the shard's Tenants
        .watches(settings, settings_config, |cm| {
            desired::owner_of_settings(&cm)
        })
        .run(scope.reconciler(reconcile), error_policy, ctx) // sharding:
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "reconcile not run");
            }
        })
        .await;
}
