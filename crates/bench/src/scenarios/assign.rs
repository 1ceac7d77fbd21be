//! `assign`: the watch path's assignment latency. Three workers and the assigner (no
//! webhook) serve while unlabelled objects are created at a steady rate, once per rate in
//! [`RATES`]; for each rate, create response → first shard label seen by a watch, p50 and
//! p99. Each rate creates `rate × SECONDS_PER_RATE` objects (at most OBJECTS) and waits for
//! them to be labelled before the next rate starts, so the rates do not overlap.
//!
//! Each step also splits that latency ([`crate::assign_split`]) into the watch's delivery,
//! the time until the label write reached the API server, the write and the watch showing
//! the label, and reports the floor no watch-path assigner can beat on the same control
//! plane under the same load; the assigner's own share (watch event → write started) comes
//! from its `shardop_assigner_unowned_wait_seconds` histogram.

use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use super::{Knobs, Outcome, begin, draw, report};
use crate::assign_split;
use crate::convergence::quantile;
use crate::env::LOADGEN_USER_AGENT;
use crate::run::{self, Run, names};

/// Create rates (objects per second), lowest first.
const RATES: [f64; 2] = [10.0, 50.0];
/// How long each rate creates objects (fewer with a small OBJECTS).
const SECONDS_PER_RATE: f64 = 20.0;
/// The assigner's histogram of its own share: watch event → label write started.
const UNOWNED_WAIT: &str = "shardop_assigner_unowned_wait_seconds";

/// `assign`: see the module docs.
pub async fn assign(knobs: &Knobs) -> anyhow::Result<Outcome> {
    let (mut run, _, raw) = begin("assign", knobs).await?;
    let shards = knobs.first_shards();
    run.start_operator(shards, &[], &[]).await?;
    let started = std::time::Instant::now();
    let mut steps = Vec::new();
    let mut next = 0;
    for rate in RATES {
        let count = ((rate * SECONDS_PER_RATE) as usize)
            .min(knobs.objects)
            .max(1);
        let batch = names(&format!("r{rate:.0}"), next..next + count);
        next += count;
        run.conv.take_assign_lags();
        let wait_before = run.env.assigner_histogram(UNOWNED_WAIT).await;
        tracing::info!(rate, count, "creating at a steady rate");
        let seconds = run
            .create_objects(batch.clone(), knobs.concurrency, rate)
            .await?;
        let labelled = run
            .wait_until(knobs.converge_timeout(), |run| {
                run.conv.shards().values().all(Option::is_some)
            })
            .await;
        labelled.with_context(|| format!("objects created at {rate}/s were not all labelled"))?;
        let lags = run.conv.take_assign_lags();
        let wait = run::histogram_delta(
            &run.env.assigner_histogram(UNOWNED_WAIT).await,
            &wait_before,
        );
        // Let the workers catch up so that the next rate starts from a quiet system (and
        // the audit log has every label write of this one).
        run.settle(Duration::from_secs(3), Duration::from_secs(120))
            .await?;
        let split = split_of(&mut run, &batch)?;
        let mut step = json!({
            "rate": rate,
            "objects": count,
            "achieved_rate": count as f64 / seconds.max(1e-9),
            "labelled": lags.len(),
            "assign_latency_p50_s": quantile(&lags, 0.50),
            "assign_latency_p99_s": quantile(&lags, 0.99),
            "assign_latency_max_s": quantile(&lags, 1.0),
            "assigner_wait_p50_s": run::histogram_quantile(&wait, 0.50),
            "assigner_wait_p99_s": run::histogram_quantile(&wait, 0.99),
        });
        if let (Some(step), Value::Object(split)) = (step.as_object_mut(), split) {
            step.extend(split);
        }
        steps.push(step);
    }
    let total = run.conv.live();
    let mut report = report(
        "assign",
        knobs,
        &[shards],
        started.elapsed().as_secs_f64(),
        raw,
    );
    report.set("objects", total);
    for key in [
        "rate",
        "assign_latency_p50_s",
        "assign_latency_p99_s",
        "floor_p99_s",
        "floor_ratio",
        "assigner_wait_p99_s",
        "watch_delivery_p99_s",
        "beyond_watch_p99_s",
        "label_write_p99_s",
    ] {
        let values: Vec<Value> = steps.iter().map(|s| s[key].clone()).collect();
        report.set(key, values);
    }
    let every_object_timed = steps
        .iter()
        .all(|s| s["labelled"].as_u64() == s["objects"].as_u64());
    let every_object_split = steps
        .iter()
        .all(|s| s["split_objects"].as_u64() == s["objects"].as_u64());
    // Both from the same objects: a floor is never above its object's latency, so the
    // ratio of the p99s is at most 1.
    let floors_sane = steps.iter().all(|s| {
        let (floor, ratio) = (s["floor_p99_s"].as_f64(), s["floor_ratio"].as_f64());
        floor
            .zip(ratio)
            .is_some_and(|(floor, ratio)| floor > 0.0 && ratio <= 1.0)
    });
    report
        .set("steps", steps)
        .set("processes", run.process_table());
    draw(&run, knobs, "assign")?;
    run.finish();
    Ok(Outcome {
        report,
        checks: vec![
            ("every object labelled and timed".into(), every_object_timed),
            (
                "every assignment split from the audit log".into(),
                every_object_split,
            ),
            ("floor above 0 and at most the latency".into(), floors_sane),
        ],
    })
}

/// The split of the assignments of `batch` ([`assign_split::summary`]).
fn split_of(run: &mut Run, batch: &[String]) -> anyhow::Result<Value> {
    let seen = run.conv.seen_after_create(batch);
    let timelines = run.audit()?.label_timelines(LOADGEN_USER_AGENT);
    let splits: Vec<_> = seen
        .iter()
        .filter_map(|seen| assign_split::split(seen, timelines.get(&seen.name)?))
        .collect();
    if splits.len() < batch.len() {
        let unsplit: Vec<_> = batch
            .iter()
            .filter(|name| {
                let timeline = timelines.get(*name);
                !seen.iter().any(|s| &s.name == *name)
                    || timeline.is_none_or(|t| t.create.is_none() || t.label.is_none())
            })
            .take(10)
            .collect();
        tracing::warn!(
            ?unsplit,
            "assignments the watch or the audit log lacks a part of"
        );
    }
    Ok(assign_split::summary(&splits))
}
