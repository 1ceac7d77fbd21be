//! Which worker serves each shard when the shard count is fixed and the workers are not
//! (the assigner's `--shards` with `--worker-statefulset`): read from the shard Leases.

use std::collections::BTreeMap;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use shardop::ShardIndex;
use shardop::constants::{SHARD_LEASE_LABEL, SHARD_LEASE_PREFIX};
use shardop::protocol::LeaseSnapshot;

/// Each shard's home worker ordinal as its Lease names it, if every shard `0..shards` has a
/// Lease held by that worker (`shardop-worker-<home>`), every home is below `workers`, and
/// each worker is home for `shards / workers` shards or one more. `None` otherwise, or if
/// the Leases cannot be listed.
pub async fn homes_served(
    client: &Client,
    operator_namespace: &str,
    shards: u32,
    workers: u32,
) -> Option<Vec<u32>> {
    let api: Api<Lease> = Api::namespaced(client.clone(), operator_namespace);
    let list = api
        .list(&ListParams::default().labels(SHARD_LEASE_LABEL))
        .await
        .ok()?;
    let leases: BTreeMap<String, Lease> = list
        .items
        .into_iter()
        .map(|lease| (lease.name_any(), lease))
        .collect();
    let mut homes = Vec::new();
    for shard in 0..shards {
        let lease = leases.get(&format!("{SHARD_LEASE_PREFIX}{shard}"))?;
        let snapshot = LeaseSnapshot::from_lease(lease);
        let home = snapshot.home_of(ShardIndex(shard)).0;
        let holder = snapshot.holder?;
        (home < workers && holder == format!("shardop-worker-{home}")).then_some(())?;
        homes.push(home);
    }
    let load = |w: u32| homes.iter().filter(|h| **h == w).count() as u32;
    let balanced = (0..workers.max(1)).all(|w| load(w).abs_diff(shards / workers.max(1)) <= 1);
    balanced.then_some(homes)
}
