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
use kube::runtime::{Controller, watcher};
use kube::{Api, CustomResourceExt};

use crate::reconcile::{Context, error_policy, reconcile};
use crate::tenant::Tenant;

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
    /// Only Tenants matching this label selector (e.g. `env=prod`); all when empty.
    #[arg(long, env = "TENANTS_SELECTOR", default_value = "")]
    selector: String,
    /// This process's name in the User-Agent of its requests (the pod name in a cluster).
    #[arg(long, env = "POD_NAME", default_value = "tenants-operator")]
    identity: String,
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
    // The library's client factory: rate-limited, and its requests name the process in
    // their User-Agent (the audit log tells the operator's writes apart by it).
    let metrics =
        shardop::KubeMetrics::register(&mut prometheus_client::registry::Registry::default());
    let client = shardop::ClientFactory::infer(&args.kube, metrics)
        .await
        .context("building the kube client")?
        .client(&format!("tenants-operator ({})", args.identity))?;
    let tenants: Api<Tenant> = Api::all(client.clone());
    let settings: Api<ConfigMap> = Api::namespaced(client.clone(), &args.namespace);
    let settings_config = watcher::Config::default().labels(&format!(
        "{}={}",
        desired::MANAGED_BY_LABEL,
        desired::MANAGED_BY
    ));
    let ctx = Arc::new(Context {
        client,
        namespace: args.namespace,
    });
    tracing::info!(namespace = ctx.namespace, "tenants-operator starting");
    let tenants_config = match args.selector.as_str() {
        "" => watcher::Config::default(),
        selector => watcher::Config::default().labels(selector),
    };
    Controller::new(tenants, tenants_config)
        .watches(settings, settings_config, |cm| {
            desired::owner_of_settings(&cm)
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "reconcile not run");
            }
        })
        .await;
    tracing::info!("tenants-operator stopped");
    Ok(())
}
