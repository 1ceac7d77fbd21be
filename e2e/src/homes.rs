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
    balanced(&homes, workers).then_some(homes)
}

/// Whether `homes` (each shard's home worker ordinal) gives every one of `workers` workers
/// `shards / workers` shards, rounded down or up. Within one shard of the mean is not
/// enough: 3 workers' spread of 6 shards (2, 2, 2) would pass for 4 workers (2, 2, 2, 0)
/// before the assigner named the new worker home of anything.
fn balanced(homes: &[u32], workers: u32) -> bool {
    let workers = workers.max(1);
    let shards = homes.len() as u32;
    let (fewest, most) = (shards / workers, shards.div_ceil(workers));
    (0..workers).all(|w| {
        let load = homes.iter().filter(|h| **h == w).count() as u32;
        (fewest..=most).contains(&load)
    })
}

#[cfg(test)]
mod tests {
    use super::balanced;

    #[test]
    fn a_new_worker_without_a_shard_is_not_balanced() {
        assert!(!balanced(&[0, 1, 2, 0, 1, 2], 4), "(2, 2, 2, 0)");
        assert!(balanced(&[0, 1, 2, 0, 1, 3], 4), "(2, 2, 1, 1)");
        assert!(balanced(&[0, 1, 2, 0, 1, 2], 3));
        assert!(
            !balanced(&[0, 1, 2, 3, 0, 1], 2),
            "homes beyond the workers"
        );
        assert!(balanced(&[0, 1, 0, 1, 0, 1], 2));
        assert!(!balanced(&[0, 0, 0, 0, 1, 1], 2), "(4, 2)");
    }
}
