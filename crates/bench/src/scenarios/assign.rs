//! `assign`: the watch path's assignment latency. Three workers and the assigner (no
//! webhook) serve while unlabelled objects are created at a steady rate, once per rate in
//! [`RATES`]; for each rate, create response → first shard label seen by a watch, p50 and
//! p99. Each rate creates `rate × SECONDS_PER_RATE` objects (at most OBJECTS) and waits for
//! them to be labelled before the next rate starts, so the rates do not overlap.

use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use super::{Knobs, Outcome, begin, draw, report};
use crate::convergence::quantile;
use crate::run::names;

/// Create rates (objects per second), lowest first.
const RATES: [f64; 2] = [10.0, 50.0];
/// How long each rate creates objects (fewer with a small OBJECTS).
const SECONDS_PER_RATE: f64 = 20.0;

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
        tracing::info!(rate, count, "creating at a steady rate");
        let seconds = run.create_objects(batch, knobs.concurrency, rate).await?;
        let labelled = run
            .wait_until(knobs.converge_timeout(), |run| {
                run.conv.shards().values().all(Option::is_some)
            })
            .await;
        labelled.with_context(|| format!("objects created at {rate}/s were not all labelled"))?;
        let lags = run.conv.take_assign_lags();
        steps.push(json!({
            "rate": rate,
            "objects": count,
            "achieved_rate": count as f64 / seconds.max(1e-9),
            "labelled": lags.len(),
            "assign_latency_p50_s": quantile(&lags, 0.50),
            "assign_latency_p99_s": quantile(&lags, 0.99),
            "assign_latency_max_s": quantile(&lags, 1.0),
        }));
        // Let the workers catch up so that the next rate starts from a quiet system.
        run.settle(Duration::from_secs(3), Duration::from_secs(120))
            .await?;
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
    for key in ["rate", "assign_latency_p50_s", "assign_latency_p99_s"] {
        let values: Vec<Value> = steps.iter().map(|s| s[key].clone()).collect();
        report.set(key, values);
    }
    let every_object_timed = steps
        .iter()
        .all(|s| s["labelled"].as_u64() == s["objects"].as_u64());
    report
        .set("steps", steps)
        .set("processes", run.process_table());
    draw(&run, knobs, "assign")?;
    run.finish();
    Ok(Outcome {
        report,
        checks: vec![("every object labelled and timed".into(), every_object_timed)],
    })
}
