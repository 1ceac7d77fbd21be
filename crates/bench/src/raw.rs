//! The API server's raw capacity on this machine: how fast the same client stack, at the
//! same concurrency, can create DatabaseClusters, patch their status and patch their
//! labels when nothing else runs. Every other scenario divides by these figures.

use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde::Serialize;
use serde_json::json;
use shardop_api::DatabaseCluster;

use crate::load;
use crate::plot::Panel;

/// Operations per second of each kind of write.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RawCapacity {
    /// Creates of new DatabaseClusters per second.
    pub creates_per_s: f64,
    /// Status subresource merge patches per second.
    pub status_patches_per_s: f64,
    /// Label merge patches per second.
    pub label_patches_per_s: f64,
}

impl RawCapacity {
    /// Mean write throughput across the three kinds, the denominator of `efficiency`.
    pub fn writes_per_s(&self) -> f64 {
        (self.creates_per_s + self.status_patches_per_s + self.label_patches_per_s) / 3.0
    }
}

/// Measures the three write rates on `objects` fresh objects in `namespace`, plotting the
/// completions per second of each phase into `panel`.
pub async fn measure(
    client: &Client,
    namespace: &str,
    objects: usize,
    concurrency: usize,
    panel: &mut Panel,
) -> anyhow::Result<RawCapacity> {
    let api: Api<DatabaseCluster> = Api::namespaced(client.clone(), namespace);
    let started = Instant::now();

    let creates_per_s = phase(objects, concurrency, started, panel, "create", |i| {
        let api = api.clone();
        async move {
            api.create(
                &PostParams::default(),
                &load::database_cluster(&format!("raw-{i}"), 1),
            )
            .await
            .map(drop)
        }
    })
    .await?;

    let status_patches_per_s = phase(objects, concurrency, started, panel, "status patch", |i| {
        let api = api.clone();
        async move {
            let patch = json!({ "status": { "replicas": 1, "readyReplicas": (i % 2) } });
            api.patch_status(
                &format!("raw-{i}"),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map(drop)
        }
    })
    .await?;

    let label_patches_per_s = phase(objects, concurrency, started, panel, "label patch", |i| {
        let api = api.clone();
        async move {
            let patch =
                json!({ "metadata": { "labels": { "bench.shardop.dev/probe": i.to_string() } } });
            api.patch(
                &format!("raw-{i}"),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map(drop)
        }
    })
    .await?;

    Ok(RawCapacity {
        creates_per_s,
        status_patches_per_s,
        label_patches_per_s,
    })
}

/// Runs `op(0..count)` with `concurrency` requests in flight; returns operations per second.
async fn phase<F, Fut>(
    count: usize,
    concurrency: usize,
    started: Instant,
    panel: &mut Panel,
    name: &str,
    op: F,
) -> anyhow::Result<f64>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), kube::Error>>,
{
    let phase_start = Instant::now();
    let mut done = 0_usize;
    let mut last_mark = phase_start;
    let mut done_at_mark = 0_usize;
    let mut results = futures::stream::iter(0..count)
        .map(op)
        .buffer_unordered(concurrency.max(1));
    while results.try_next().await?.is_some() {
        done += 1;
        // One plot point per 0.5 s: completions per second in that window.
        let since = last_mark.elapsed().as_secs_f64();
        if since >= 0.5 || (done == count && since >= 0.1) {
            let rate = (done - done_at_mark) as f64 / since.max(1e-3);
            panel.push(name, started.elapsed().as_secs_f64(), rate);
            last_mark = Instant::now();
            done_at_mark = done;
        }
    }
    Ok(count as f64 / phase_start.elapsed().as_secs_f64().max(1e-9))
}
