//! `create`: OBJECTS unlabelled objects created as fast as the API server accepts them, for
//! each shard count in SHARDS on a fresh control plane; then the ideal writer
//! ([`crate::ceiling`]) on the same control plane for the ceiling (docs/performance.md).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde_json::{Value, json};

use super::{Knobs, Outcome, begin, draw, ideal_writer, report};
use crate::api_requests::RequestTimes;
use crate::ceiling::{self, Ceiling};
use crate::convergence::{ChangeKind, quantile};
use crate::raw::RawCapacity;
use crate::rss_fit::RssFit;
use crate::run::{self, Run, names, round1};

/// The figures the report takes from the run of the largest shard count (`runs` has each).
const TOP_LEVEL: [&str; 15] = [
    "reconciles_per_s",
    "ceiling_per_s",
    "efficiency",
    "raw_write_probe_per_s",
    "raw_probe_efficiency",
    "writes_per_reconcile",
    "lag_p50_s",
    "lag_p99_s",
    "worker_rss_mib",
    "assigner_rss_mib",
    "worker_cpu_s",
    "webhook",
    "create_to_labelled_p50_s",
    "create_to_labelled_p99_s",
    "assigner_label_writes_per_object",
];

/// `create`: see the module docs.
pub async fn create(knobs: &Knobs) -> anyhow::Result<Outcome> {
    let mut runs = Vec::new();
    let mut first_raw = Value::Null;
    let mut checks = Vec::new();
    let mut total = 0.0;
    let mut rss_fit = RssFit::default();
    for (index, &shards) in knobs.shards.iter().enumerate() {
        if index > 0 && !knobs.reuse_cluster {
            crate::restart_control_plane().await?;
        }
        let done = create_run(knobs, shards, &mut rss_fit).await?;
        if index == 0 {
            first_raw = done.raw;
        }
        total += done.seconds;
        checks.extend(done.checks);
        runs.push(done.entry);
    }
    let mut report = report("create", knobs, &knobs.shards, total, first_raw);
    if let Some(Value::Object(last)) = runs.last() {
        for key in TOP_LEVEL {
            if let Some(value) = last.get(key) {
                report.set(key, value.clone());
            }
        }
    }
    report.set("runs", runs);
    if let Value::Object(fit) = rss_fit.to_json() {
        for (key, value) in fit {
            report.set(&key, value);
        }
    }
    checks.extend(rss_fit.checks());
    Ok(Outcome { report, checks })
}

/// One shard count's run: its entry in `runs`, its seconds, its raw probe and its checks.
struct CreateRun {
    entry: Value,
    seconds: f64,
    raw: Value,
    checks: Vec<(String, bool)>,
}

/// shardop's run with `shards` shards, then the ideal writer's on the same control plane.
async fn create_run(knobs: &Knobs, shards: u32, rss_fit: &mut RssFit) -> anyhow::Result<CreateRun> {
    let (mut run, capacity, raw) = begin("create", knobs).await?;
    run.env.webhook = knobs.webhook;
    run.start_operator(shards, &[], &[]).await?;
    let since = Timestamp::now();
    let (seconds, shardop_served) = create_and_converge(&mut run, knobs, shards).await?;
    run.settle(Duration::from_secs(5), Duration::from_secs(120))
        .await?;
    let assignment = Assignment::measure(&mut run, knobs, since)?;
    let mut checks = webhook_checks(
        knobs,
        shards,
        assignment.stamped,
        &assignment.lags,
        assignment.label_writes_per_object,
    );
    let writes_by_kind = run.audit()?.worker_writes_by_kind_since(since);
    let writes: usize = writes_by_kind.values().sum();
    let operator = OperatorFigures::read(&run).await;
    // Before the ideal writer's load: the slices as the workers served them.
    rss_fit.add_run(&run.worker_rss(), run.conv.shards().values());
    let (ceiling, ideal_served) = ideal_writer(&run, knobs, shards, knobs.objects).await?;
    let throughput = Throughput::new(knobs, seconds, writes, &capacity, &ceiling);
    checks.extend(
        ceiling::checks(ceiling.creates_per_s, throughput.efficiency)
            .into_iter()
            .map(|(check, holds)| (format!("{shards} shards: {check}"), holds)),
    );
    let entry = json!({
        "shards": shards,
        "seconds": seconds,
        "ceiling_per_s": ceiling.creates_per_s,
        "efficiency": throughput.efficiency,
        "ceiling": ceiling.to_json(knobs.objects, shards),
        "api_requests_per_object": {
            "shardop": shardop_served.per_object(knobs.objects),
            "ideal_writer": ideal_served.per_object(knobs.objects),
        },
        "raw_write_probe": raw,
        "raw_write_probe_per_s": throughput.raw_write_probe_per_s,
        "reconciles_per_s": throughput.reconciles_per_s,
        "writes": writes,
        "writes_per_reconcile": throughput.writes_per_reconcile,
        "writes_per_object_by_kind": writes_by_kind
            .iter()
            .map(|(kind, count)| (kind.clone(), json!(*count as f64 / knobs.objects.max(1) as f64)))
            .collect::<serde_json::Map<String, Value>>(),
        "raw_probe_efficiency": throughput.raw_probe_efficiency,
        "lag_p50_s": quantile(&operator.lags, 0.5),
        "lag_p99_s": quantile(&operator.lags, 0.99),
        "reconcile_p50_s": run::histogram_quantile(&operator.reconcile_durations, 0.5),
        "reconcile_p99_s": run::histogram_quantile(&operator.reconcile_durations, 0.99),
        "assignment_p99_s": run::histogram_quantile(&operator.assignment_latency, 0.99),
        "webhook": knobs.webhook,
        "stamped_at_creation": assignment.stamped,
        "create_to_labelled_p50_s": quantile(&assignment.lags, 0.5),
        "create_to_labelled_p99_s": quantile(&assignment.lags, 0.99),
        "assigner_label_writes": assignment.label_writes,
        "assigner_label_writes_per_object": assignment.label_writes_per_object,
        "worker_rss_mib": run.worker_rss(),
        "assigner_rss_mib": operator.assigner_rss_mib,
        "worker_cpu_s": operator.worker_cpu_s,
        "worker_cpu_s_total": operator.worker_cpu_s.values().sum::<f64>(),
        "reconcile_runs": operator.reconcile_runs,
        "processes": run.process_table(),
    });
    tracing::info!(%entry, "create run done");
    let name = if knobs.shards.len() == 1 {
        "create".to_owned()
    } else {
        format!("create-{shards}")
    };
    draw(&run, knobs, &name)?;
    run.finish();
    Ok(CreateRun {
        entry,
        seconds,
        raw: raw.clone(),
        checks,
    })
}

/// Creates OBJECTS and waits until every one converged: the seconds from the first create
/// to the last converged, and what the API server served meanwhile.
async fn create_and_converge(
    run: &mut Run,
    knobs: &Knobs,
    shards: u32,
) -> anyhow::Result<(f64, RequestTimes)> {
    let requests_before = RequestTimes::read(&run.env.client).await?;
    let started = Instant::now();
    tracing::info!(shards, objects = knobs.objects, "creating");
    run.create_objects(names("db", 0..knobs.objects), knobs.concurrency, 0.0)
        .await?;
    run.wait_converged(knobs.objects, knobs.converge_timeout())
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    let served = RequestTimes::read(&run.env.client)
        .await?
        .since(&requests_before);
    Ok((seconds, served))
}

/// How the objects got their shard label: at creation (webhook) or by a label write.
struct Assignment {
    /// Objects whose create response already carried the label.
    stamped: usize,
    /// Create response → labelled, seconds, per object.
    lags: Vec<f64>,
    label_writes: usize,
    label_writes_per_object: f64,
}

impl Assignment {
    fn measure(run: &mut Run, knobs: &Knobs, since: Timestamp) -> anyhow::Result<Self> {
        let label_writes = run.audit()?.assigner_label_writes_since(since);
        Ok(Self {
            stamped: run.conv.stamped_at_creation(),
            lags: run.conv.assignment_lags(),
            label_writes,
            label_writes_per_object: label_writes as f64 / knobs.objects as f64,
        })
    }
}

/// What the operator's processes report of the run: lags, metrics, RSS and CPU.
struct OperatorFigures {
    /// Create response → converged, seconds, per object.
    lags: Vec<f64>,
    reconcile_runs: f64,
    reconcile_durations: Vec<(f64, f64)>,
    assignment_latency: Vec<(f64, f64)>,
    assigner_rss_mib: f64,
    worker_cpu_s: BTreeMap<String, f64>,
}

impl OperatorFigures {
    async fn read(run: &Run) -> Self {
        Self {
            lags: run.conv.lags(ChangeKind::Create, None),
            reconcile_runs: run
                .env
                .worker_metric_sum("shardop_reconcile_runs_total", &[])
                .await,
            reconcile_durations: run
                .env
                .worker_histogram("shardop_reconcile_duration_seconds")
                .await,
            assignment_latency: run
                .env
                .assigner_histogram("shardop_assigner_assignment_latency_seconds")
                .await,
            assigner_rss_mib: run
                .processes
                .get("shardop-assigner-0")
                .map_or(0.0, |f| round1(f.peak_rss_mib)),
            worker_cpu_s: run.worker_cpu(),
        }
    }
}

/// shardop's rates against the raw probe's and the ideal writer's.
struct Throughput {
    reconciles_per_s: f64,
    writes_per_reconcile: f64,
    raw_write_probe_per_s: f64,
    raw_probe_efficiency: f64,
    efficiency: f64,
}

impl Throughput {
    fn new(
        knobs: &Knobs,
        seconds: f64,
        writes: usize,
        capacity: &RawCapacity,
        ceiling: &Ceiling,
    ) -> Self {
        let reconciles_per_s = knobs.objects as f64 / seconds;
        let writes_per_reconcile = writes as f64 / knobs.objects as f64;
        let raw_write_probe_per_s = capacity.writes_per_s();
        Self {
            reconciles_per_s,
            writes_per_reconcile,
            raw_write_probe_per_s,
            raw_probe_efficiency: reconciles_per_s
                / (raw_write_probe_per_s / writes_per_reconcile.max(1e-9)),
            efficiency: reconciles_per_s / ceiling.creates_per_s,
        }
    }
}

/// The smoke checks of `create`'s webhook figures: present and sane, not timing. With the
/// webhook on, objects are stamped at creation; off, none is and every object needs a label
/// write; every created object was seen labelled.
fn webhook_checks(
    knobs: &Knobs,
    shards: u32,
    stamped: usize,
    lags: &[f64],
    label_writes_per_object: f64,
) -> Vec<(String, bool)> {
    let mode = if knobs.webhook { "on" } else { "off" };
    let (stamped_name, stamped_ok) = super::stamped_check(knobs.webhook, stamped, knobs.objects);
    vec![
        (
            format!("{shards} shards, webhook {mode}: every object's create → labelled measured"),
            lags.len() == knobs.objects && lags.iter().all(|l| l.is_finite() && *l >= 0.0),
        ),
        (format!("{shards} shards, {stamped_name}"), stamped_ok),
        (
            format!(
                "{shards} shards, webhook {mode}: label writes per object ({label_writes_per_object:.3}) sane"
            ),
            label_writes_per_object.is_finite()
                && if knobs.webhook {
                    label_writes_per_object < 1.0
                } else {
                    label_writes_per_object >= 1.0
                },
        ),
    ]
}
