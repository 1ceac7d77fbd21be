//! Which shard reconciled a DatabaseCluster, as a test sees it.
//!
//! The DatabaseCluster's status does not name a shard (a moved object would cost its new
//! owner a status write for nothing else). The worker applies its shard's label with the
//! StatefulSet `<name>` on every reconcile that follows a move, before the status, so the
//! StatefulSet's shard label is the shard that last reconciled the object.

use std::collections::HashMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::Client;
use kube::api::{Api, ListParams};
use shardop_api::DatabaseCluster;
use shardop_api::constants::SHARD_LABEL;

/// The shard label of every StatefulSet in `namespace`, by StatefulSet name (a
/// DatabaseCluster's name); `None` when the list fails.
pub async fn stateful_set_shards(
    client: &Client,
    namespace: &str,
) -> Option<HashMap<String, String>> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    let list = api.list_metadata(&ListParams::default()).await.ok()?;
    Some(
        list.items
            .into_iter()
            .filter_map(|sts| {
                let name = sts.metadata.name?;
                let shard = sts.metadata.labels?.remove(SHARD_LABEL)?;
                Some((name, shard))
            })
            .collect(),
    )
}

/// Whether `object`'s status describes its current generation.
pub fn status_is_current(object: &DatabaseCluster) -> bool {
    object
        .status
        .as_ref()
        .is_some_and(|s| s.observed_generation == object.metadata.generation)
}

/// Whether `object`'s status describes its current generation and its StatefulSet was
/// last applied by `shard` (from [`stateful_set_shards`]).
pub fn converged_on(
    object: &DatabaseCluster,
    shard: &str,
    stateful_set_shards: &HashMap<String, String>,
) -> bool {
    let name = object.metadata.name.as_deref().unwrap_or_default();
    status_is_current(object) && stateful_set_shards.get(name).map(String::as_str) == Some(shard)
}
