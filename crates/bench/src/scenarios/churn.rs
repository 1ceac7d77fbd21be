//! `churn`: create 12·RATE/s, delete 2·RATE/s, change every live object's spec once a
//! minute, for DURATION, against shardop; then the same load against the ideal writer on
//! the same control plane (does *any* operator keep the SLOs at this rate here?), and the
//! ideal writer's burst rate on the load's mix (the ceiling).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use jiff::Timestamp;
use kube::api::Api;
use serde_json::{Value, json};
use shardop_api::DatabaseCluster;

use super::{Knobs, Outcome, begin, draw, ideal_writer, ideal_writer_in, report, stamped_check};
use crate::api_requests::RequestTimes;
use crate::ceiling::{self, Served, stamped_at_creation};
use crate::change_split;
use crate::churn_load::{self, ChurnCounts, ChurnRates};
use crate::convergence::{ChangeKind, Convergence, quantile};
use crate::env::LOADGEN_USER_AGENT;
use crate::run::{self, Run};

/// The workers' queue wait: first unhandled event → reconcile start.
const QUEUE_WAIT: &str = "shardop_queue_wait_seconds";
/// The workers' lag: spec change seen → status of that generation written.
const RECONCILE_LAG: &str = "shardop_reconcile_lag_seconds";
/// The workers' reconcile durations.
const RECONCILE_DURATION: &str = "shardop_reconcile_duration_seconds";
/// The workers' reconciles.
const RECONCILE_RUNS: &str = "shardop_reconcile_runs_total";
/// How long the last changes of a load may take to converge once it stops.
const DRAIN: Duration = Duration::from_secs(60);

/// The churn SLOs: queue wait p99 ≤ 1 s and change → converged p99 ≤ 5 s, with every
/// live object converged once the load has stopped and drained.
fn slo_met(queue_p99: Option<f64>, lag_p99: f64, unconverged: usize) -> bool {
    queue_p99.is_some_and(|q| q <= 1.0) && lag_p99 <= 5.0 && unconverged == 0
}

/// What one operator made of a churn load, as the bench's watch saw it.
struct UnderLoad {
    counts: ChurnCounts,
    load_s: f64,
    queue_p50: Option<f64>,
    queue_p99: Option<f64>,
    change_lags: Vec<f64>,
    create_lags: Vec<f64>,
    /// Live objects not converged once the load stopped and had `DRAIN` to converge.
    unconverged: usize,
    /// CPU time each process and the machine used while the load ran
    /// ([`Run::cpu_figures`]).
    cpu: serde_json::Map<String, Value>,
}

impl UnderLoad {
    fn churn_per_s(&self) -> f64 {
        (self.counts.created + self.counts.changes) as f64 / self.load_s.max(1e-9)
    }

    fn lag_p99(&self) -> f64 {
        quantile(&self.change_lags, 0.99)
    }

    fn slo_met(&self) -> bool {
        slo_met(self.queue_p99, self.lag_p99(), self.unconverged)
    }

    /// Whether the CPU figures are there and sane: the machine's busy share in (0, 1] and
    /// the control plane's CPU seconds positive.
    fn cpu_measured(&self) -> bool {
        let busy = self.cpu.get("machine_busy").and_then(Value::as_f64);
        let api_server = self
            .cpu
            .get("control_plane_cpu_s")
            .and_then(|cpu| cpu.get("kube-apiserver"))
            .and_then(Value::as_f64);
        busy.is_some_and(|busy| busy > 0.0 && busy <= 1.0)
            && api_server.is_some_and(|cpu| cpu > 0.0)
    }

    /// The figures every operator under the load has.
    fn to_json(&self) -> Value {
        let mut figures = json!({
            "duration_s": self.load_s,
            "created": self.counts.created,
            "deleted": self.counts.deleted,
            "changes": self.counts.changes,
            "churn_per_s": self.churn_per_s(),
            "queue_p50_s": self.queue_p50,
            "queue_p99_s": self.queue_p99,
            "lag_p50_s": quantile(&self.change_lags, 0.5),
            "lag_p99_s": self.lag_p99(),
            "create_lag_p99_s": quantile(&self.create_lags, 0.99),
            "unconverged_at_end": self.unconverged,
            "slo_met": self.slo_met(),
        });
        if let Some(figures) = figures.as_object_mut() {
            figures.extend(self.cpu.clone());
        }
        figures
    }
}

/// `churn` (see the module): shardop and the ideal writer under the same load, in the order
/// `IDEAL_FIRST` says, then the ideal writer's burst on the load's mix.
pub async fn churn(knobs: &Knobs) -> anyhow::Result<Outcome> {
    let shards = knobs.first_shards();
    let (mut run, _, raw) = begin("churn", knobs).await?;
    run.env.webhook = knobs.webhook;
    let started = Instant::now();
    let rates = ChurnRates::scaled(knobs.rate, knobs.duration, knobs.concurrency);
    let (shardop, ideal, settled) = if knobs.ideal_first {
        let ideal = ideal_under_load(&run, knobs, shards, rates).await?;
        let settled = settle(&mut run).await?;
        run.start_operator(shards, &[], &[]).await?;
        (shardop_under_load(&mut run, rates).await?, ideal, settled)
    } else {
        run.start_operator(shards, &[], &[]).await?;
        let shardop = shardop_under_load(&mut run, rates).await?;
        let settled = settle(&mut run).await?;
        let ideal = ideal_under_load(&run, knobs, shards, rates).await?;
        (shardop, ideal, settled)
    };
    // The ideal writer's burst on this run's mix of creates and changes: what the load
    // used of the control plane's throughput.
    let (ceiling, _) = ideal_writer(&run, knobs, shards, knobs.raw_objects()).await?;
    let counts = shardop.under_load.counts;
    let churn_per_s = shardop.under_load.churn_per_s();
    let ceiling_per_s = ceiling.mixed_rate(counts.created, counts.changes);
    let efficiency = churn_per_s / ceiling_per_s;
    let stamped = run.conv.stamped_at_creation();
    let mut report = report(
        "churn",
        knobs,
        &[shards],
        started.elapsed().as_secs_f64(),
        raw,
    );
    for (key, value) in shardop
        .under_load
        .to_json()
        .as_object()
        .into_iter()
        .flatten()
    {
        report.set(key, value);
    }
    report
        .set("rate", knobs.rate)
        .set("live_at_end", shardop.live_at_end)
        .set(
            "changes_per_s",
            counts.changes as f64 / shardop.under_load.load_s,
        )
        .set("ceiling_per_s", ceiling_per_s)
        .set("efficiency", efficiency)
        .set("ceiling", ceiling.to_json(knobs.raw_objects(), shards))
        .set("worker_lag_p99_s", shardop.worker_lag_p99)
        .set("reconciles", &shardop.reconciles)
        .set("change_split", &shardop.change_split)
        .set("webhook", knobs.webhook)
        .set("stamped_at_creation", stamped)
        .set("ideal_first", knobs.ideal_first)
        .set("settled_between", settled)
        .set("ideal_at_rate", ideal.to_json())
        .set("ideal_slo_met", ideal.under_load.slo_met())
        .set(
            "slo_met_where_ideal_met",
            shardop.under_load.slo_met() || !ideal.under_load.slo_met(),
        )
        .set("longest_running_s", run.longest_running_s)
        .set("api_server_requests", &shardop.api_server_requests)
        .set("worker_writes", &shardop.worker_writes)
        .set("processes", run.process_table())
        .set("over_time", run.timeline.clone());
    draw(&run, knobs, "churn")?;
    run.finish();
    let mut checks = ceiling::checks(ceiling_per_s, efficiency);
    checks.push(stamped_check(knobs.webhook, stamped, counts.created));
    checks.extend(ideal.checks());
    checks.push((
        "CPU per process and the machine's busy share measured in both phases".into(),
        shardop.under_load.cpu_measured() && ideal.under_load.cpu_measured(),
    ));
    Ok(Outcome { report, checks })
}

/// Waits until the control plane has nothing left to do, so that the second operator
/// under the load starts as the first did; returns whether it got there.
async fn settle(run: &mut Run) -> anyhow::Result<bool> {
    run.settle(Duration::from_secs(5), Duration::from_secs(180))
        .await
}

/// shardop's figures of a churn load.
struct ShardopUnderLoad {
    under_load: UnderLoad,
    live_at_end: usize,
    /// Where the changes' time went in the audit log ([`change_split`]).
    change_split: Value,
    /// The workers' reconciles over the load and its drain: per create or change, and
    /// their durations.
    reconciles: Value,
    worker_lag_p99: Option<f64>,
    api_server_requests: Value,
    worker_writes: Value,
}

/// Runs the load against the run's operator and reads its figures once the last changes
/// had `DRAIN` to converge.
async fn shardop_under_load(run: &mut Run, rates: ChurnRates) -> anyhow::Result<ShardopUnderLoad> {
    let queue_before = run.env.worker_histogram(QUEUE_WAIT).await;
    let lag_before = run.env.worker_histogram(RECONCILE_LAG).await;
    let durations_before = run.env.worker_histogram(RECONCILE_DURATION).await;
    let runs_before = run.env.worker_metric_sum(RECONCILE_RUNS, &[]).await;
    let requests_before = RequestTimes::read(&run.env.client).await?;
    let since = Timestamp::now();
    let cpu_before = run.cpu_reading();
    let load_started = Instant::now();
    tracing::info!(?rates, "churn against shardop");
    let (api, conv) = (run.api(), run.conv.clone());
    let load = tokio::spawn(churn_load::run(
        api,
        conv,
        rates,
        churn_load::unlabelled(),
        None,
    ));
    while !load.is_finished() {
        run.sample().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let counts = load.await??;
    let load_s = load_started.elapsed().as_secs_f64();
    let cpu = run.cpu_reading().used_since(&cpu_before);
    let api_server_requests = RequestTimes::read(&run.env.client)
        .await?
        .since(&requests_before)
        .top(12);
    let live_at_end = run.conv.live();
    let _ = run
        .wait_until(DRAIN, |run| run.conv.converged() >= run.conv.live())
        .await;
    let queue_wait =
        run::histogram_delta(&run.env.worker_histogram(QUEUE_WAIT).await, &queue_before);
    let worker_lag =
        run::histogram_delta(&run.env.worker_histogram(RECONCILE_LAG).await, &lag_before);
    let durations = run::histogram_delta(
        &run.env.worker_histogram(RECONCILE_DURATION).await,
        &durations_before,
    );
    let reconciles = run.env.worker_metric_sum(RECONCILE_RUNS, &[]).await - runs_before;
    let change_split =
        change_split::summary(&run.audit()?.change_timelines(LOADGEN_USER_AGENT, since));
    // What the workers wrote for that load (including their converging after it).
    let by_kind = run.audit()?.worker_writes_by_kind_since(since);
    let total: usize = by_kind.values().sum();
    Ok(ShardopUnderLoad {
        under_load: UnderLoad {
            counts,
            load_s,
            queue_p50: run::histogram_quantile(&queue_wait, 0.5),
            queue_p99: run::histogram_quantile(&queue_wait, 0.99),
            change_lags: run.conv.lags(ChangeKind::Change, None),
            create_lags: run.conv.lags(ChangeKind::Create, None),
            unconverged: run.conv.live().saturating_sub(run.conv.converged()),
            cpu: run.cpu_figures(&cpu),
        },
        live_at_end,
        change_split,
        reconciles: json!({
            "per_create_or_change": reconciles / (counts.created + counts.changes).max(1) as f64,
            "duration_p50_s": run::histogram_quantile(&durations, 0.5),
            "duration_p99_s": run::histogram_quantile(&durations, 0.99),
        }),
        worker_lag_p99: run::histogram_quantile(&worker_lag, 0.99),
        api_server_requests: serde_json::to_value(api_server_requests)?,
        worker_writes: json!({
            "total": total,
            "per_create_or_change": total as f64 / (counts.created + counts.changes).max(1) as f64,
            "by_kind": by_kind,
        }),
    })
}

/// The ideal writer's figures of the same churn load.
struct IdealUnderLoad {
    under_load: UnderLoad,
    served: Served,
    /// Whether it answered every write within the load and `DRAIN`.
    drained: bool,
    /// What the API server served from the load's start until every write was answered.
    api_server_requests: Value,
    /// Its namespace, kept until the scenario ends so that the garbage collector's work of
    /// deleting it does not fall into the next measurement.
    _namespace: shardop_e2e::TestNamespace,
}

impl IdealUnderLoad {
    fn to_json(&self) -> Value {
        let mut figures = self.under_load.to_json();
        let handled = self.under_load.counts.created + self.under_load.counts.changes;
        figures["drained"] = json!(self.drained);
        figures["writes"] = json!(self.served.writes);
        figures["writes_per_create_or_change"] =
            json!(self.served.writes as f64 / handled.max(1) as f64);
        figures["answered"] = json!(self.served.queue_waits.len());
        figures["api_server_requests"] = self.api_server_requests.clone();
        figures
    }

    /// Present and sane, not timing: it ran the load and answered it.
    fn checks(&self) -> Vec<(String, bool)> {
        let counts = self.under_load.counts;
        vec![
            (
                format!(
                    "ideal writer under the load: {} created, {} answered",
                    counts.created,
                    self.served.queue_waits.len()
                ),
                counts.created > 0 && !self.served.queue_waits.is_empty(),
            ),
            (
                "ideal writer's queue p99 and lag p99 finite".into(),
                self.under_load.queue_p99.is_some_and(f64::is_finite)
                    && self.under_load.lag_p99().is_finite(),
            ),
        ]
    }
}

/// Runs the same load against the ideal writer in a namespace of its own (the assigner's
/// webhook does not reach it: with WEBHOOK on, the user's creates carry what the webhook
/// would have stamped), with a convergence watch of its own measuring it as shardop's does.
async fn ideal_under_load(
    run: &Run,
    knobs: &Knobs,
    shards: u32,
    rates: ChurnRates,
) -> anyhow::Result<IdealUnderLoad> {
    let (namespace, writer) = ideal_writer_in(run, knobs, shards, "bench-ideal-churn").await?;
    let api: Api<DatabaseCluster> = Api::namespaced(run.env.client.clone(), &namespace.name);
    let (conv, watch) = Convergence::watch(api.clone(), None);
    let new_object = if knobs.webhook {
        stamped_at_creation(namespace.name.clone(), shards as usize)
    } else {
        churn_load::unlabelled()
    };
    tracing::info!(?rates, "churn against the ideal writer");
    let (writes, receiver) = mpsc::unbounded();
    let served = Mutex::new(Served::default());
    let requests_before = RequestTimes::read(&run.env.client).await?;
    let cpu_before = run.cpu_reading();
    let load_started = Instant::now();
    let load = async {
        let counts = churn_load::run(api, conv.clone(), rates, new_object, Some(writes)).await?;
        let cpu = run.cpu_reading().used_since(&cpu_before);
        anyhow::Ok((counts, load_started.elapsed().as_secs_f64(), cpu))
    };
    let serving = tokio::time::timeout(
        rates.duration + DRAIN,
        writer.serve(receiver, knobs.webhook, &served),
    );
    let (loaded, answered) = futures::future::join(load, serving).await;
    let (counts, load_s, cpu) = loaded?;
    let api_server_requests = RequestTimes::read(&run.env.client)
        .await?
        .since(&requests_before)
        .top(12);
    let drained = match answered {
        Ok(answered) => answered.map(|()| true)?,
        Err(_elapsed) => false,
    };
    // The watch shows the last status writes a moment after they return.
    let _ = shardop_e2e::wait_for(
        "the ideal writer's objects converged",
        Duration::from_secs(10),
        || {
            let done = conv.converged() >= conv.live();
            async move { done.then_some(()) }
        },
    )
    .await;
    watch.abort();
    let served = served
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok(IdealUnderLoad {
        under_load: UnderLoad {
            counts,
            load_s,
            queue_p50: Some(quantile(&served.queue_waits, 0.5)),
            queue_p99: Some(quantile(&served.queue_waits, 0.99)),
            change_lags: conv.lags(ChangeKind::Change, None),
            create_lags: conv.lags(ChangeKind::Create, None),
            unconverged: conv.live().saturating_sub(conv.converged()),
            cpu: run.cpu_figures(&cpu),
        },
        served,
        drained,
        api_server_requests: serde_json::to_value(api_server_requests)?,
        _namespace: namespace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slos_need_both_bounds_and_nothing_left_unconverged() {
        assert!(slo_met(Some(0.9), 4.9, 0));
        assert!(!slo_met(Some(1.1), 4.9, 0));
        assert!(!slo_met(Some(0.9), 5.1, 0));
        assert!(!slo_met(None, 1.0, 0), "no queue figure is no evidence");
        assert!(
            !slo_met(Some(0.1), 0.1, 3),
            "objects left behind miss the SLO"
        );
    }
}
