//! The load and failure scenarios of issue 6. Each returns its report; the fields every
//! scenario must carry are documented in `docs/performance.md`.

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use shardop_api::shard_for;
use shardop_e2e::metrics::metric_value;

use crate::api_requests::RequestTimes;
use crate::audit_tail::WorkerDeath;
use crate::ceiling::{Ceiling, IdealWriter};
use crate::churn_load;
use crate::convergence::{ChangeKind, quantile};
use crate::env;
use crate::plot;
use crate::raw::RawCapacity;
use crate::report::Report;
use crate::run::{self, Run, names, on_shard};
use crate::{Knobs, apf};

mod assign;
mod churn;
mod cleanupdep;
mod create;
mod freeze;
mod homes;
mod tenants;
pub use assign::assign;
pub use churn::churn;
pub use cleanupdep::cleanupdep;
pub use create::create;
pub use freeze::freeze;
pub use tenants::tenants;

/// A scenario's result and the correctness checks it must pass.
pub struct Outcome {
    /// The JSON report.
    pub report: Report,
    /// (field, holds) pairs; a false one makes the binary exit non-zero.
    pub checks: Vec<(String, bool)>,
}

/// Common start of a scenario: the raw probe and the run.
async fn begin(scenario: &str, knobs: &Knobs) -> anyhow::Result<(Run, RawCapacity, Value)> {
    tracing::info!(scenario, "raw probe");
    let (capacity, raw) = run::raw_probe(knobs.raw_objects(), knobs.concurrency).await?;
    let run = Run::new(scenario).await?;
    Ok((run, capacity, raw))
}

/// A report with the common fields.
fn report(scenario: &str, knobs: &Knobs, shards: &[u32], seconds: f64, raw: Value) -> Report {
    let mut report = Report::new(scenario, knobs.objects, shards);
    report.set("seconds", seconds).set("raw_write_probe", raw);
    report
}

/// The ideal writer of `shards` shards over `objects` objects, in a namespace of its own on
/// the run's control plane (after shardop's figures are taken, so the two never compete).
/// Also returns what the API server served during its creates (every client's requests:
/// the controller manager's reaction included, as in shardop's window).
async fn ideal_writer(
    run: &Run,
    knobs: &Knobs,
    shards: u32,
    objects: usize,
) -> anyhow::Result<(Ceiling, RequestTimes)> {
    tracing::info!(shards, objects, "ideal writer");
    // The namespace lives until the figures are taken (its guard deletes it).
    let (_namespace, writer) = ideal_writer_in(run, knobs, shards, "bench-ceiling").await?;
    let before = RequestTimes::read(&run.env.client).await?;
    let creates_per_s = writer.measure_creates(objects).await?;
    let served = RequestTimes::read(&run.env.client).await?.since(&before);
    let changes_per_s = writer.measure_changes(objects).await?;
    let ceiling = Ceiling::new(creates_per_s, changes_per_s);
    tracing::info!(?ceiling, "ideal writer done");
    Ok((ceiling, served))
}

/// The ideal writer of `shards` shards in a new namespace `<prefix>-<suffix>` of the run's
/// control plane (deleted when the returned guard drops).
async fn ideal_writer_in(
    run: &Run,
    knobs: &Knobs,
    shards: u32,
    prefix: &str,
) -> anyhow::Result<(shardop_e2e::TestNamespace, IdealWriter)> {
    let namespace = shardop_e2e::TestNamespace::create(&run.env.client, prefix).await?;
    let writer = IdealWriter::new(
        &shardop_e2e::cluster().kubeconfig,
        &namespace.name,
        shards,
        run.env.client.clone(),
        knobs.concurrency,
    )
    .await?;
    Ok((namespace, writer))
}

/// Draws the run's panels to `<dir>/<name>.png`.
fn draw(run: &Run, knobs: &Knobs, name: &str) -> anyhow::Result<()> {
    plot::draw(
        &knobs.output_dir.join(format!("{name}.png")),
        name,
        &run.panels(),
    )
}

/// Creates OBJECTS and waits for convergence and quiet: the common preparation. Returns
/// whether it got quiet: a scenario that measures from here measures its own work only
/// then, not the controller manager's follow-up of the creates.
async fn populate(run: &mut Run, knobs: &Knobs) -> anyhow::Result<bool> {
    let objects = names("db", 0..knobs.objects);
    run.create_objects(objects, knobs.concurrency, 0.0).await?;
    run.wait_converged(knobs.objects, knobs.converge_timeout())
        .await?;
    run.settle(Duration::from_secs(10), settle_timeout(knobs.objects))
        .await
}

/// How long the StatefulSet controller's follow-up of `objects` may take: it creates a pod
/// and a claim per object at its own client limit (200 QPS) and the status follows; at
/// 10,000 objects that took 11–14 minutes on this machine.
fn settle_timeout(objects: usize) -> Duration {
    2 * (Duration::from_secs(120)
        + Duration::from_millis(50) * u32::try_from(objects).unwrap_or(u32::MAX))
}

/// `restart`: with OBJECTS converged, every worker restarts at once.
pub async fn restart(knobs: &Knobs) -> anyhow::Result<Outcome> {
    let shards = knobs.first_shards();
    let (mut run, _, raw) = begin("restart", knobs).await?;
    let started = Instant::now();
    run.start_operator(shards, &[], &[]).await?;
    // Every write after the restart must be one the restart caused: wait until the
    // controller manager's follow-up (pods, claims, their status) is done, or say it is not.
    let quiet = populate(&mut run, knobs).await?;
    let since = Timestamp::now();
    tracing::info!("restarting every worker at once");
    for worker in run.env.workers.values_mut() {
        // SIGTERM to all first, like a rollout that deletes every pod at once.
        std::process::Command::new("kill")
            .args(["-TERM", &worker.process.pid().to_string()])
            .status()?;
    }
    for worker in run.env.workers.values_mut() {
        let deadline = Instant::now() + Duration::from_secs(30);
        while worker.process.is_running() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for index in 0..shards {
        run.process_restarted(&format!("shardop-worker-{index}"));
        run.env.start_worker(index, &[]).await?;
    }
    let objects = knobs.objects as f64;
    let reverify = run
        .wait_until_async(knobs.converge_timeout(), async |env, _| {
            let runs = env
                .worker_metric_sum("shardop_reconcile_runs_total", &[])
                .await;
            let queued = env.worker_metric_sum("shardop_queue_depth", &[]).await;
            let held = env.worker_metric_sum("shardop_shard_leader", &[]).await;
            runs >= objects && queued == 0.0 && held >= f64::from(shards)
        })
        .await
        .context("the restarted workers did not see every object again")?;
    run.settle(Duration::from_secs(5), Duration::from_secs(60))
        .await?;
    let writes = run.audit()?.worker_writes_since(since);
    let mut report = report(
        "restart",
        knobs,
        &[shards],
        started.elapsed().as_secs_f64(),
        raw,
    );
    report
        .set("reverify_s", reverify)
        .set("quiet_before_restart", quiet)
        .set("writes", writes)
        .set("worker_rss_mib", run.worker_rss())
        .set("processes", run.process_table());
    draw(&run, knobs, "restart")?;
    run.finish();
    Ok(Outcome {
        report,
        checks: vec![
            ("quiet before the restart".into(), quiet),
            ("writes == 0".into(), writes == 0),
        ],
    })
}

/// The worker StatefulSet whose replicas the assigner reads as N (no kubelet runs its
/// pods; it is only the source of N, as `kubectl scale` would set it).
async fn worker_statefulset(run: &Run, replicas: i32) -> anyhow::Result<()> {
    let api: Api<StatefulSet> = Api::namespaced(run.env.client.clone(), &run.env.operator_ns.name);
    let sts = shardop_e2e::worker_stateful_set(replicas);
    api.patch(
        "shardop-worker",
        &PatchParams::apply("shardop-bench").force(),
        &Patch::Apply(&sts),
    )
    .await?;
    Ok(())
}

fn desired_shard(namespace: &str, shards: u32) -> impl Fn(&str) -> u32 + '_ {
    move |name| {
        let count = NonZeroU32::new(shards).unwrap_or(NonZeroU32::MIN);
        shard_for(namespace, name, count).0
    }
}

/// The writes a rebalance step cost per moved object, from the audit log since
/// `since`: their total, and the assigner's label writes and the workers' writes by verb
/// and resource (acknowledgements, child applies, status patches), each ÷ `moved`.
fn writes_per_moved_object(
    run: &mut Run,
    since: Timestamp,
    moved: usize,
) -> anyhow::Result<(f64, Value)> {
    let audit = run.audit()?;
    let per_move = |count: usize| count as f64 / moved.max(1) as f64;
    let mut by_kind = serde_json::Map::new();
    let mut total = audit.assigner_label_writes_since(since);
    by_kind.insert("assigner label".into(), json!(per_move(total)));
    for (kind, count) in audit.worker_writes_by_kind_since(since) {
        total += count;
        by_kind.insert(format!("worker {kind}"), json!(per_move(count)));
    }
    Ok((per_move(total), Value::Object(by_kind)))
}

/// Starts or stops workers as the StatefulSet would for `from` → `to` replicas.
async fn scale_workers(run: &mut Run, from: u32, to: u32) -> anyhow::Result<()> {
    if to > from {
        for index in from..to {
            run.env
                .start_worker(index, &env::DEFAULT_LEASE_FLAGS)
                .await?;
        }
        worker_statefulset(run, i32::try_from(to)?).await?;
    } else {
        worker_statefulset(run, i32::try_from(to)?).await?;
        // The StatefulSet controller deletes the highest ordinals.
        for index in (to..from).rev() {
            if let Some(mut worker) = run.env.workers.remove(&index) {
                worker.process.terminate(Duration::from_secs(30))?;
            }
        }
    }
    Ok(())
}

/// One `rescale` step, `from` → `to` shards: starts or stops workers as the StatefulSet
/// would, waits until every object is placed and reconciled by its desired shard, and
/// returns the step's figures.
async fn rescale_step(run: &mut Run, knobs: &Knobs, from: u32, to: u32) -> anyhow::Result<Value> {
    let namespace = run.env.objects_ns.name.clone();
    let before = run.conv.shards();
    run.conv.take_max_unassigned();
    let step_started = Instant::now();
    let step_since = Timestamp::now();
    tracing::info!(from, to, "rescaling");
    scale_workers(run, from, to).await?;
    let desired = desired_shard(&namespace, to);
    let rebalance = run
        .wait_until(knobs.converge_timeout(), |run| run.conv.placed(&desired))
        .await
        .with_context(|| format!("{from} → {to}: objects not on their desired shards"))?;
    let rebalance_s = step_started.elapsed().as_secs_f64().max(rebalance);
    let after = run.conv.shards();
    let moved = after
        .iter()
        .filter(|(name, shard)| before.get(*name) != Some(shard))
        .count();
    let mut per_shard: BTreeMap<u32, usize> = BTreeMap::new();
    for shard in after.values().flatten() {
        *per_shard.entry(*shard).or_default() += 1;
    }
    let max = per_shard.values().copied().max().unwrap_or(0) as f64;
    let mean = after.len() as f64 / f64::from(to);
    let objects = after.len().max(1) as f64;
    let (writes, writes_by_kind) = writes_per_moved_object(run, step_since, moved)?;
    Ok(json!({
        "from": from,
        "to": to,
        "moved_fraction": moved as f64 / objects,
        "ideal_fraction": f64::from(from.abs_diff(to)) / f64::from(from.max(to)),
        "rebalance_s": rebalance_s,
        "max_unassigned": run.conv.take_max_unassigned(),
        "imbalance": max / mean.max(1e-9),
        "objects_per_shard": per_shard,
        "writes_per_moved_object": writes,
        "writes_per_moved_object_by_kind": writes_by_kind,
    }))
}

/// `rescale`: 3 → 4, then 4 → 2 workers; one shard per worker (objects move between
/// shards), or `FIXED_SHARDS` shards spread over them (shards move between workers).
pub async fn rescale(knobs: &Knobs) -> anyhow::Result<Outcome> {
    let (mut run, _, raw) = begin("rescale", knobs).await?;
    let started = Instant::now();
    let fixed = knobs.fixed_shards;
    worker_statefulset(&run, 3).await?;
    for index in 0..3 {
        run.env
            .start_worker(index, &env::DEFAULT_LEASE_FLAGS)
            .await?;
    }
    let fixed_flag = fixed.to_string();
    let mut assigner_flags = vec!["--worker-statefulset", "shardop-worker"];
    if fixed > 0 {
        assigner_flags.extend(["--shards", fixed_flag.as_str()]);
    }
    run.env.start_assigner(None, &assigner_flags).await?;
    run.wait_for_operator(if fixed > 0 { fixed } else { 3 })
        .await?;
    // Measured from quiet: moves share the API server with the controller manager's
    // follow-up of the creates otherwise, and the step times measure that backlog.
    let quiet = populate(&mut run, knobs).await?;
    let mut steps = Vec::new();
    for (from, to) in [(3_u32, 4_u32), (4, 2)] {
        let step = if fixed > 0 {
            homes::homes_step(&mut run, knobs, fixed, from, to).await?
        } else {
            rescale_step(&mut run, knobs, from, to).await?
        };
        steps.push(step);
    }
    run.settle(Duration::from_secs(3), Duration::from_secs(60))
        .await?;
    let ownership = run.audit()?.ownership_figures();
    let dual_ownership = ownership.dual_ownership;
    // Every step moves objects, each with at least its new label and its children's; with
    // fixed shards, none is relabelled.
    let writes_counted = steps.iter().all(|s| {
        s["writes_per_moved_object"]
            .as_f64()
            .is_some_and(|w| w.is_finite() && (w >= 1.0 || fixed > 0))
    });
    let none_relabelled = steps
        .iter()
        .all(|s| s["relabelled"].as_u64().unwrap_or(0) == 0);
    let mut report = report(
        "rescale",
        knobs,
        &[3, 4, 2],
        started.elapsed().as_secs_f64(),
        raw,
    );
    for key in [
        "moved_fraction",
        "ideal_fraction",
        "rebalance_s",
        "max_unassigned",
        "imbalance",
        "writes_per_moved_object",
    ] {
        let values: Vec<Value> = steps.iter().map(|s| s[key].clone()).collect();
        report.set(key, values);
    }
    report
        .set("quiet_before_rescale", quiet)
        .set("fixed_shards", fixed)
        .set("dual_ownership", dual_ownership)
        .set("ownership", ownership)
        .set("steps", steps)
        .set("processes", run.process_table());
    draw(&run, knobs, "rescale")?;
    run.finish();
    Ok(Outcome {
        report,
        checks: vec![
            ("dual_ownership == 0".into(), dual_ownership == 0),
            if fixed > 0 {
                ("no object relabelled".into(), none_relabelled)
            } else {
                ("writes_per_moved_object >= 1".into(), writes_counted)
            },
        ],
    })
}

/// Changes the spec (image) of every object in `names` once; records the changes.
async fn change_specs(
    run: &Run,
    names: &[String],
    round: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let api = run.api();
    let conv = run.conv.clone();
    futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let api = api.clone();
            let conv = conv.clone();
            async move {
                churn_load::change_spec(&api, &conv, &name, round)
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_for_each(|()| async { Ok(()) })
        .await
}

/// Which worker process holds `shard`'s Lease (by process name), if any.
async fn holder_of(run: &Run, shard: u32) -> Option<String> {
    for (index, worker) in &run.env.workers {
        let Ok(text) = env::scrape(worker.metrics_port).await else {
            continue;
        };
        let held = metric_value(
            &text,
            "shardop_shard_leader",
            &[("shard", &shard.to_string())],
        );
        if held >= 1.0 {
            return Some(format!("shardop-worker-{index}"));
        }
    }
    None
}

/// `failover`: kill -9 one worker; takeover, then hand-back.
pub async fn failover(knobs: &Knobs) -> anyhow::Result<Outcome> {
    let shards = knobs.first_shards().max(2);
    let victim = 1_u32;
    let (mut run, _, raw) = begin("failover", knobs).await?;
    let started = Instant::now();
    run.start_operator(shards, &[], &[]).await?;
    let quiet = populate(&mut run, knobs).await?;
    let slice: Vec<String> = on_shard(&run.conv, victim).into_iter().collect();
    let slice_set: HashSet<String> = slice.iter().cloned().collect();
    tracing::info!(objects = slice.len(), "kill -9 shardop-worker-{victim}");
    let killed_at = Timestamp::now();
    if let Some(mut worker) = run.env.workers.remove(&victim) {
        worker.process.kill_9()?;
    }
    let kill_instant = Instant::now();
    // The slice changes right after the crash: it is reconciled again once someone took
    // the shard over.
    change_specs(&run, &slice, 1, knobs.concurrency).await?;
    run.wait_until(knobs.converge_timeout(), |run| {
        run.conv.all_converged(&slice_set)
    })
    .await
    .context("the dead worker's slice was not taken over")?;
    let takeover_s = kill_instant.elapsed().as_secs_f64();
    let taker = holder_of(&run, victim).await.unwrap_or_default();
    tracing::info!(%taker, takeover_s, "taken over; restarting the home worker");
    let back_at = Timestamp::now();
    let back_instant = Instant::now();
    run.process_restarted(&format!("shardop-worker-{victim}"));
    run.env.start_worker(victim, &[]).await?;
    change_specs(&run, &slice, 2, knobs.concurrency).await?;
    let home = format!("shardop-worker-{victim}");
    let victim_label = victim.to_string();
    let home_port = run.env.workers.get(&victim).map(|w| w.metrics_port);
    let slice_for_probe = slice_set.clone();
    run.wait_until_async(knobs.converge_timeout(), async |_, conv| {
        let done = conv.all_converged(&slice_for_probe);
        let home_holds = match home_port {
            Some(port) => env::scrape(port).await.is_ok_and(|text| {
                metric_value(&text, "shardop_shard_leader", &[("shard", &victim_label)]) >= 1.0
            }),
            None => false,
        };
        done && home_holds
    })
    .await
    .context("the shard was not handed back")?;
    let handback_s = back_instant.elapsed().as_secs_f64();
    run.settle(Duration::from_secs(3), Duration::from_secs(60))
        .await?;
    let audit = run.audit()?;
    let relabels = audit.assigner_label_writes_since(killed_at);
    let overlap = audit.overlap(victim, &taker, &home, back_at);
    let taker_writes = audit.writes_by(victim, &taker, killed_at);
    let home_writes = audit.writes_by(victim, &home, back_at);
    let ownership = audit.ownership_figures();
    let mut report = report(
        "failover",
        knobs,
        &[shards],
        started.elapsed().as_secs_f64(),
        raw,
    );
    report
        .set("slice_objects", slice.len())
        .set("quiet_before_kill", quiet)
        .set("takeover_s", takeover_s)
        .set("taker", taker)
        .set("relabels", relabels)
        .set("handback_s", handback_s)
        .set("overlap", overlap)
        .set("dual_ownership", ownership.dual_ownership)
        .set("ownership", ownership)
        .set("taker_writes", taker_writes)
        .set("home_writes_after_restart", home_writes)
        .set("processes", run.process_table());
    draw(&run, knobs, "failover")?;
    run.finish();
    Ok(Outcome {
        report,
        checks: vec![
            ("relabels == 0".into(), relabels == 0),
            ("overlap == 0".into(), overlap == 0),
            ("dual_ownership == 0".into(), ownership.dual_ownership == 0),
            ("taker wrote as the shard".into(), taker_writes > 0),
        ],
    })
}

/// Children left in the namespace: StatefulSets, Services and claims.
async fn children_left(run: &Run) -> anyhow::Result<usize> {
    let ns = &run.env.objects_ns.name;
    let client = run.env.client.clone();
    let sts = Api::<StatefulSet>::namespaced(client.clone(), ns)
        .list_metadata(&ListParams::default())
        .await?
        .items
        .len();
    let svc = Api::<Service>::namespaced(client.clone(), ns)
        .list_metadata(&ListParams::default())
        .await?
        .items
        .len();
    let pvc = Api::<PersistentVolumeClaim>::namespaced(client, ns)
        .list_metadata(&ListParams::default())
        .await?
        .items
        .len();
    Ok(sts + svc + pvc)
}

/// `delete`: delete OBJECTS with finalizers; drain, stuck and orphans.
pub async fn delete(knobs: &Knobs) -> anyhow::Result<Outcome> {
    let shards = knobs.first_shards();
    let (mut run, _, raw) = begin("delete", knobs).await?;
    let started = Instant::now();
    run.start_operator(shards, &[], &[]).await?;
    populate(&mut run, knobs).await?;
    let children_before = children_left(&run).await?;
    let api = run.api();
    let since = Timestamp::now();
    let deleting = Instant::now();
    tracing::info!(objects = knobs.objects, children_before, "deleting");
    let names = names("db", 0..knobs.objects);
    let task = tokio::spawn({
        let concurrency = knobs.concurrency;
        async move {
            futures::stream::iter(names)
                .map(|name| {
                    let api = api.clone();
                    async move {
                        match api.delete(&name, &DeleteParams::default()).await {
                            Ok(_) => Ok(()),
                            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                            Err(e) => Err(anyhow::Error::from(e)),
                        }
                    }
                })
                .buffer_unordered(concurrency.max(1))
                .try_for_each(|()| async { Ok(()) })
                .await
        }
    });
    while !task.is_finished() {
        run.sample().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    task.await??;
    let drained = run
        .wait_until(knobs.converge_timeout(), |run| run.conv.live() == 0)
        .await;
    let drain_s = deleting.elapsed().as_secs_f64();
    let stuck_terminating = run.conv.live();
    // The garbage collector removes the children through their owner references.
    // The collector works through the children at its own pace (130–180 deletes/s on two
    // cores), so its window grows with their number: 120 s plus 10 ms per child.
    let gc_window = Duration::from_secs(120)
        + Duration::from_millis(10)
            .saturating_mul(u32::try_from(children_before).unwrap_or(u32::MAX));
    let mut orphaned_children = children_left(&run).await?;
    let children_after_drain = orphaned_children;
    let gc_started = Instant::now();
    while orphaned_children > 0 && gc_started.elapsed() < gc_window {
        run.sample().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        orphaned_children = children_left(&run).await?;
    }
    let gc_s = gc_started.elapsed().as_secs_f64();
    let cleanup_deletes = CleanupDeletes::read(&mut run, since, knobs.objects)?;
    let mut report = report(
        "delete",
        knobs,
        &[shards],
        started.elapsed().as_secs_f64(),
        raw,
    );
    report
        .set("drain_s", drain_s)
        .set("drained", drained.is_some())
        .set("stuck_terminating", stuck_terminating)
        .set("children_before", children_before)
        .set("orphaned_children", orphaned_children)
        .set("children_after_drain", children_after_drain)
        .set("gc_window_s", gc_window.as_secs_f64())
        .set("gc_s", gc_s)
        .set("worker_delete_requests", &cleanup_deletes.by_kind)
        .set("processes", run.process_table());
    draw(&run, knobs, "delete")?;
    run.finish();
    let mut checks = vec![
        ("stuck_terminating == 0".into(), stuck_terminating == 0),
        ("orphaned_children == 0".into(), orphaned_children == 0),
    ];
    checks.extend(cleanup_deletes.checks());
    Ok(Outcome { report, checks })
}

/// The DELETE requests the workers' cleanups sent (audit log, whatever their answer),
/// against what one DELETE per child allows: each object has one StatefulSet and, at one
/// replica, one claim.
struct CleanupDeletes {
    by_kind: BTreeMap<String, usize>,
    objects: usize,
}

impl CleanupDeletes {
    fn read(run: &mut Run, since: Timestamp, objects: usize) -> anyhow::Result<Self> {
        let by_kind = run
            .audit()?
            .worker_write_requests_by_kind_since(since)
            .into_iter()
            .filter(|(kind, _)| kind.starts_with("delete "))
            .collect();
        Ok(Self { by_kind, objects })
    }

    /// A pass that found claims still terminating sends neither the StatefulSet's DELETE
    /// again (it would answer 404) nor the claims' (it would answer 200 and change
    /// nothing): one of each per object, and 5 % more for the rare pass that runs again from
    /// the start (after an error, or on a cached version whose finalizer is already gone).
    /// Sending them on every pass made 3.8 per object.
    fn checks(&self) -> Vec<(String, bool)> {
        ["statefulsets", "persistentvolumeclaims"]
            .iter()
            .map(|resource| {
                let sent = self
                    .by_kind
                    .get(&format!("delete {resource}"))
                    .copied()
                    .unwrap_or(0);
                (
                    format!(
                        "DELETE {resource} by workers ({sent}) at most one per object ({}) + 5 %",
                        self.objects
                    ),
                    sent <= self.objects + self.objects.div_ceil(20),
                )
            })
            .collect()
    }
}

/// `throttle`: the workers' writes go through an APF priority level far too small for
/// them; the API server answers 429 and the operator recovers by itself.
pub async fn throttle(knobs: &Knobs) -> anyhow::Result<Outcome> {
    let shards = knobs.first_shards();
    let (mut run, _, raw) = begin("throttle", knobs).await?;
    let started = Instant::now();
    let throttling = apf::Throttle::install(&run).await?;
    let kubeconfig = throttling.kubeconfig.display().to_string();
    let outcome = async {
        run.start_operator(shards, &[("KUBECONFIG", kubeconfig.as_str())], &[])
            .await?;
        run.create_objects(names("db", 0..knobs.objects), knobs.concurrency, 0.0)
            .await?;
        let last_create = Instant::now();
        run.wait_converged(knobs.objects, knobs.converge_timeout())
            .await?;
        let recover_s = last_create.elapsed().as_secs_f64();
        run.settle(Duration::from_secs(3), Duration::from_secs(60))
            .await?;
        anyhow::Ok(recover_s)
    }
    .await;
    let recover_s = match outcome {
        Ok(recover_s) => recover_s,
        Err(err) => {
            run.env.workers.clear();
            throttling.remove(&run).await;
            return Err(err);
        }
    };
    let metric_429s = run
        .env
        .worker_metric_sum("shardop_kube_requests_total", &[("code", "429")])
        .await;
    let resends = run
        .env
        .worker_metric_sum("shardop_kube_throttled_retries_total", &[])
        .await;
    let (audited_429s, early_retries, min_gap) = run.audit()?.throttling();
    let honoured = early_retries == 0;
    // The workers go first: without the binding they would only collect 403s.
    run.env.workers.clear();
    throttling.remove(&run).await;
    let lags = run.conv.lags(ChangeKind::Create, None);
    let mut report = report(
        "throttle",
        knobs,
        &[shards],
        started.elapsed().as_secs_f64(),
        raw,
    );
    report
        .set("429s", metric_429s)
        .set("429s_in_audit_log", audited_429s)
        .set("throttled_resends", resends)
        .set("recover_s", recover_s)
        .set("retry_after_honoured", honoured)
        .set("early_retries", early_retries)
        .set("min_resend_gap_s", min_gap)
        .set("lag_p99_s", quantile(&lags, 0.99))
        .set("priority_level", throttling.describe())
        .set("processes", run.process_table());
    draw(&run, knobs, "throttle")?;
    run.finish();
    Ok(Outcome {
        report,
        checks: vec![
            ("429s > 0".into(), metric_429s > 0.0 || audited_429s > 0),
            ("retry_after_honoured".into(), honoured),
        ],
    })
}

/// Whether `stamped` of `created` objects carried their shard label in the create
/// response as the webhook mode says: some with the webhook on (it may time out and leave
/// one to the watch path), none with it off.
pub(crate) fn stamped_check(webhook: bool, stamped: usize, created: usize) -> (String, bool) {
    let mode = if webhook { "on" } else { "off" };
    (
        format!("webhook {mode}: {stamped} of {created} created objects stamped at creation"),
        if webhook { stamped > 0 } else { stamped == 0 },
    )
}

/// The objects the fault scenarios create: `slow` prefixed ones first, then the others at
/// CREATE_RATE.
fn fault_names(knobs: &Knobs, slow: usize) -> (Vec<String>, Vec<String>) {
    (names("slow", 0..slow), names("db", 0..knobs.objects))
}

/// `slowdep`: a few objects' reconciles wait on a slow dependency.
pub async fn slowdep(knobs: &Knobs) -> anyhow::Result<Outcome> {
    let shards = knobs.first_shards();
    let (mut run, _, raw) = begin("slowdep", knobs).await?;
    let started = Instant::now();
    let slow_setting = format!("slow-={}s", knobs.slow_delay.as_secs_f64());
    run.start_operator(
        shards,
        &[("SHARDOP_FAULT_SLOW", slow_setting.as_str())],
        &[],
    )
    .await?;
    let (slow, others) = fault_names(knobs, knobs.slow_objects);
    run.create_objects(slow.clone(), knobs.concurrency, 0.0)
        .await?;
    run.create_objects(others.clone(), knobs.concurrency, knobs.create_rate)
        .await?;
    let others_set: HashSet<String> = others.iter().cloned().collect();
    run.wait_until(knobs.converge_timeout(), |run| {
        run.conv.all_converged(&others_set)
    })
    .await
    .context("the other objects did not converge")?;
    let others_done = run.t();
    let slow_set: HashSet<String> = slow.iter().cloned().collect();
    let slow_timeout = knobs.slow_delay * 4 + Duration::from_secs(60);
    let slow_converged = run
        .wait_until(slow_timeout, |run| run.conv.all_converged(&slow_set))
        .await
        .is_some();
    run.settle(Duration::from_secs(3), Duration::from_secs(60))
        .await?;
    let lags = run.conv.lags_of(&others_set);
    let slow_lags = run.conv.lags_of(&slow_set);
    let (duplicated, _) = run.audit()?.duplicated_child_writes(&[]);
    let p99 = quantile(&lags, 0.99);
    let mut report = report(
        "slowdep",
        knobs,
        &[shards],
        started.elapsed().as_secs_f64(),
        raw,
    );
    report
        .set("slow_objects", slow.len())
        .set("slow_delay_s", knobs.slow_delay.as_secs_f64())
        .set("create_rate", knobs.create_rate)
        .set("others_lag_p50_s", quantile(&lags, 0.5))
        .set("others_lag_p99_s", p99)
        .set("others_converged_at_s", others_done)
        .set("within_slo", p99 <= 5.0)
        .set("longest_running_s", run.longest_running_s)
        .set("slow_lag_max_s", quantile(&slow_lags, 1.0))
        .set("slow_converged", slow_converged)
        .set("duplicated_side_effects", duplicated)
        .set("processes", run.process_table());
    draw(&run, knobs, "slowdep")?;
    let longest_running_s = run.longest_running_s;
    run.finish();
    Ok(Outcome {
        report,
        checks: vec![
            ("duplicated_side_effects == 0".into(), duplicated == 0),
            ("slow objects converged".into(), slow_converged),
            (
                "longest_running shows the slow reconcile".into(),
                longest_running_s >= 0.8 * knobs.slow_delay.as_secs_f64(),
            ),
        ],
    })
}

/// `crash`: worker 0 aborts in the middle of reconciles (after a number of writes), is
/// restarted like a kubelet would, and crashes again, CRASHES times.
pub async fn crash(knobs: &Knobs) -> anyhow::Result<Outcome> {
    let shards = knobs.first_shards();
    let (mut run, _, raw) = begin("crash", knobs).await?;
    let started = Instant::now();
    let crash_after = (knobs.objects / 20).clamp(10, 500).to_string();
    let fault = [("SHARDOP_FAULT_CRASH_AFTER_WRITES", crash_after.as_str())];
    for index in 0..shards {
        let environment: &[(&str, &str)] = if index == 0 { &fault } else { &[] };
        run.env.start_worker_with(index, &[], environment).await?;
    }
    run.env.start_assigner(Some(shards), &[]).await?;
    run.wait_for_operator(shards).await?;
    let (_, objects) = fault_names(knobs, 0);
    let api = run.api();
    let conv = run.conv.clone();
    let (concurrency, rate) = (knobs.concurrency, knobs.create_rate);
    let creates = tokio::spawn(run::create_all(
        api,
        conv,
        objects.clone(),
        concurrency,
        rate,
    ));
    let all: HashSet<String> = objects.iter().cloned().collect();
    let mut crashes = 0_usize;
    let mut deaths: Vec<WorkerDeath> = Vec::new();
    let mut alive_at = Timestamp::now();
    let deadline = Instant::now() + knobs.converge_timeout();
    loop {
        run.sample().await;
        let crashed = run
            .env
            .workers
            .get_mut(&0)
            .is_some_and(|w| !w.process.is_running());
        if !crashed {
            alive_at = Timestamp::now();
        } else {
            crashes += 1;
            deaths.push(WorkerDeath {
                pod: "shardop-worker-0".into(),
                alive_at,
                noticed_at: Timestamp::now(),
            });
            tracing::info!(crashes, "worker 0 crashed; restarting it");
            run.process_restarted("shardop-worker-0");
            let environment: &[(&str, &str)] = if crashes < knobs.crashes { &fault } else { &[] };
            run.env.start_worker_with(0, &[], environment).await?;
        }
        if creates.is_finished() && run.conv.all_converged(&all) {
            break;
        }
        if Instant::now() >= deadline {
            bail!("not converged after {:?}", knobs.converge_timeout());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    creates.await??;
    run.settle(Duration::from_secs(3), Duration::from_secs(60))
        .await?;
    let shard0: HashSet<String> = on_shard(&run.conv, 0);
    let others: HashSet<String> = all.difference(&shard0).cloned().collect();
    let other_lags = run.conv.lags_of(&others);
    let crashed_lags = run.conv.lags_of(&shard0);
    let audit = run.audit()?;
    let (duplicated, reapplied) = audit.duplicated_child_writes(&deaths);
    let dual_ownership = audit.dual_ownership();
    let mut report = report(
        "crash",
        knobs,
        &[shards],
        started.elapsed().as_secs_f64(),
        raw,
    );
    let p99 = quantile(&other_lags, 0.99);
    report
        .set("crashes", crashes)
        .set(
            "crash_after_writes",
            crash_after.parse::<u64>().unwrap_or(0),
        )
        .set("create_rate", knobs.create_rate)
        .set("others_lag_p50_s", quantile(&other_lags, 0.5))
        .set("others_lag_p99_s", p99)
        .set("within_slo", p99 <= 5.0)
        .set("crashed_shard_lag_p99_s", quantile(&crashed_lags, 0.99))
        .set("longest_running_s", run.longest_running_s)
        .set("duplicated_side_effects", duplicated)
        .set("reapplied_after_crash", reapplied)
        .set("dual_ownership", dual_ownership)
        .set("processes", run.process_table());
    draw(&run, knobs, "crash")?;
    run.finish();
    Ok(Outcome {
        report,
        checks: vec![
            ("duplicated_side_effects == 0".into(), duplicated == 0),
            ("dual_ownership == 0".into(), dual_ownership == 0),
            ("worker crashed mid-reconcile".into(), crashes > 0),
        ],
    })
}
