//! Where the desired shard count N comes from: a fixed `--shards`, or the worker
//! StatefulSet's `spec.replicas` (so `kubectl scale` and an HPA drive the shard count).

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use shardop_api::constants::MAX_SHARDS;
use shardop_api::{ShardCount, capped_shard_count};
use tokio::sync::watch;

/// The current N (`None`: not known yet, or the StatefulSet is absent or scaled to 0 — no
/// worker runs, so nothing can be assigned).
pub type ShardCountRx = watch::Receiver<Option<ShardCount>>;

/// A fixed N.
pub fn fixed(count: ShardCount) -> (ShardCountRx, futures::future::BoxFuture<'static, ()>) {
    let (tx, rx) = watch::channel(Some(count));
    // Keep the sender alive so the receiver never reports a closed channel.
    (
        rx,
        Box::pin(async move {
            tx.closed().await;
        }),
    )
}

/// N follows `spec.replicas` of StatefulSet `name` in `namespace`. The returned future
/// drives the watch and must be polled.
pub fn from_statefulset(
    client: Client,
    namespace: &str,
    name: &str,
) -> (ShardCountRx, futures::future::BoxFuture<'static, ()>) {
    let (tx, rx) = watch::channel(None);
    let api: Api<StatefulSet> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let name = name.to_owned();
    let driver = watcher(api, config)
        .default_backoff()
        .for_each(move |event| {
            match event {
                Ok(watcher::Event::Apply(sts) | watcher::Event::InitApply(sts)) => {
                    let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    let count = u32::try_from(replicas).ok().and_then(capped_shard_count);
                    if count.is_some_and(|c| i64::from(c.get()) < i64::from(replicas)) {
                        tracing::warn!(statefulset = %name, replicas, max = MAX_SHARDS, "more worker replicas than the maximum shard count: the extra workers stay idle");
                    }
                    tx.send_if_modified(|current| {
                        let changed = *current != count;
                        if changed {
                            tracing::info!(statefulset = %name, ?count, "desired shard count changed");
                        }
                        *current = count;
                        changed
                    });
                }
                Ok(watcher::Event::Delete(_)) => {
                    tracing::warn!(statefulset = %name, "worker StatefulSet deleted");
                    tx.send_replace(None);
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                Err(err) => {
                    shardop_runtime::reachability::log_watch_error("worker StatefulSet", &err);
                }
            }
            futures::future::ready(())
        });
    (rx, Box::pin(driver))
}
