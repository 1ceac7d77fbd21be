//! `rescale` with a fixed shard count (`FIXED_SHARDS` > 0): the assigner runs with
//! `--shards FIXED_SHARDS --worker-statefulset`, so a rescale names new home workers on the
//! shard Leases and whole shards change hands; no object is relabelled and no child is
//! applied again. A step is over when every shard is held by its home among the new
//! workers and every moved shard's new holder has reconciled each of its objects.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use jiff::Timestamp;
use serde_json::{Value, json};
use shardop_e2e::homes::homes_served;
use shardop_e2e::metrics::metric_value;

use super::{scale_workers, writes_per_moved_object};
use crate::Knobs;
use crate::env;
use crate::run::Run;

/// Whether worker `worker` has reconciled at least `objects` objects of `shard` since it
/// acquired it, and has none of them queued.
async fn reconciled_by(env: &env::BenchEnv, worker: u32, shard: u32, objects: usize) -> bool {
    let Some(process) = env.workers.get(&worker) else {
        return false;
    };
    let Ok(text) = env::scrape(process.metrics_port).await else {
        return false;
    };
    let label = shard.to_string();
    let runs = metric_value(&text, "shardop_reconcile_runs_total", &[("shard", &label)]);
    let queued = metric_value(&text, "shardop_queue_depth", &[("shard", &label)]);
    runs >= objects as f64 && queued == 0.0
}

/// One step of `rescale` with `shards` fixed shards, `from` → `to` workers.
pub(super) async fn homes_step(
    run: &mut Run,
    knobs: &Knobs,
    shards: u32,
    from: u32,
    to: u32,
) -> anyhow::Result<Value> {
    let before = homes_served(&run.env.client, &run.env.operator_ns.name, shards, from)
        .await
        .with_context(|| {
            format!("{shards} shards not served by their homes among {from} workers")
        })?;
    let labels_before = run.conv.shards();
    let mut per_shard: BTreeMap<u32, usize> = BTreeMap::new();
    for shard in labels_before.values().flatten() {
        *per_shard.entry(*shard).or_default() += 1;
    }
    run.conv.take_max_unassigned();
    let step_started = Instant::now();
    let step_since = Timestamp::now();
    tracing::info!(shards, from, to, "rescaling the workers of fixed shards");
    scale_workers(run, from, to).await?;
    let mut after = None;
    let handover = run
        .wait_until_async(knobs.converge_timeout(), async |env, _| {
            after = homes_served(&env.client, &env.operator_ns.name, shards, to).await;
            after.is_some()
        })
        .await
        .with_context(|| format!("{from} → {to}: shards not served by their new homes"))?;
    let after = after.context("homes read")?;
    let moved: Vec<(u32, u32)> = (0..shards)
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| b != a)
        .map(|(shard, (_, a))| (shard, *a))
        .collect();
    let reconciled = run
        .wait_until_async(knobs.converge_timeout(), async |env, _| {
            for (shard, worker) in &moved {
                let objects = per_shard.get(shard).copied().unwrap_or(0);
                if !reconciled_by(env, *worker, *shard, objects).await {
                    return false;
                }
            }
            true
        })
        .await
        .with_context(|| {
            format!("{from} → {to}: moved shards not reconciled by their new holders")
        })?;
    let rebalance_s = step_started
        .elapsed()
        .as_secs_f64()
        .max(handover + reconciled);
    let labels_after = run.conv.shards();
    let relabelled = labels_after
        .iter()
        .filter(|(name, shard)| labels_before.get(*name) != Some(shard))
        .count();
    let objects_moved: usize = moved
        .iter()
        .map(|(shard, _)| per_shard.get(shard).copied().unwrap_or(0))
        .sum();
    let objects = labels_after.len().max(1) as f64;
    let (writes, writes_by_kind) = writes_per_moved_object(run, step_since, objects_moved)?;
    let load = |w: u32| after.iter().filter(|h| **h == w).count();
    let objects_per_worker: BTreeMap<u32, usize> = (0..to)
        .map(|w| {
            let on = (0..shards)
                .filter(|s| after.get(*s as usize) == Some(&w))
                .map(|s| per_shard.get(&s).copied().unwrap_or(0))
                .sum();
            (w, on)
        })
        .collect();
    let max = objects_per_worker.values().copied().max().unwrap_or(0) as f64;
    let mean = objects / f64::from(to);
    Ok(json!({
        "from": from,
        "to": to,
        "fixed_shards": shards,
        "shards_moved": moved.len(),
        "shards_per_worker": (0..to).map(load).collect::<Vec<_>>(),
        "moved_fraction": objects_moved as f64 / objects,
        "ideal_fraction": f64::from(from.abs_diff(to)) / f64::from(from.max(to)),
        "handover_s": handover,
        "rebalance_s": rebalance_s,
        "relabelled": relabelled,
        "max_unassigned": run.conv.take_max_unassigned(),
        "imbalance": max / mean.max(1e-9),
        "objects_per_worker": objects_per_worker,
        "writes_per_moved_object": writes,
        "writes_per_moved_object_by_kind": writes_by_kind,
    }))
}
