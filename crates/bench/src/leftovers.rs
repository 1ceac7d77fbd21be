//! `leftovers`: run last on a reused control plane (`make bench-smoke` does), it checks
//! that every namespace the scenarios created is gone. A namespace stuck in Terminating
//! means a scenario's teardown left objects whose finalizers nobody will remove, e.g. a
//! worker still running while the teardown took its finalizers off, putting them back.

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, ResourceExt};
use shardop_api::DatabaseCluster;
use shardop_e2e::TEST_NAMESPACE_LABEL;

/// Waits up to `timeout` for every test and bench namespace to be gone; fails naming the
/// ones left and how many DatabaseClusters each still holds.
pub async fn check(timeout: Duration) -> anyhow::Result<()> {
    let client = crate::env::unlimited_client(shardop_e2e::cluster()).await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let selector = ListParams::default().labels(&format!("{TEST_NAMESPACE_LABEL}=true"));
    let gone = shardop_e2e::wait_for("the scenarios' namespaces to be gone", timeout, || async {
        let left = namespaces.list_metadata(&selector).await.ok()?.items;
        left.is_empty().then_some(())
    })
    .await;
    if gone.is_ok() {
        tracing::info!("no namespace of the scenarios is left");
        return Ok(());
    }
    let mut described = Vec::new();
    for namespace in namespaces.list_metadata(&selector).await?.items {
        let name = namespace.name_any();
        let objects: Api<DatabaseCluster> = Api::namespaced(client.clone(), &name);
        let held = objects
            .list_metadata(&ListParams::default())
            .await
            .map_or(0, |list| list.items.len());
        described.push(format!("{name} ({held} DatabaseClusters)"));
    }
    anyhow::bail!(
        "namespaces still there {timeout:?} after the scenarios: {}",
        described.join(", ")
    )
}
