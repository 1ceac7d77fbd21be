//! End-to-end tests of `shardop-assigner` with real `shardop-worker` processes against the
//! real control plane (no kubelet: the worker StatefulSet only carries the desired shard
//! count N; the "pods" are processes the tests start and stop).
//!
//! Sizes are kept small enough for `make test` on a 2-core machine; set
//! `SHARDOP_E2E_ASSIGNER_OBJECTS` (e.g. 1000 or 10000) for the full runs of issue 4.

// Tests fail by panicking; the workspace lints forbid unwrap/expect only in production code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use shardop_api::constants::{DRAIN_LABEL, SHARD_LABEL};
use shardop_api::{DatabaseCluster, Shard, ShardCount, ShardState, shard_for};
use shardop_e2e::audit::{self, AuditEvent};
use shardop_e2e::metrics::{metric_value, scrape};
use shardop_e2e::process::{FAST_LEASES, ShardopProcess};
use shardop_e2e::reconciled::{converged_on, stateful_set_shards};
use shardop_e2e::test_env::TestEnv;
use shardop_e2e::{valid_spec, wait_for};

/// Objects per test (`SHARDOP_E2E_ASSIGNER_OBJECTS`, default 300).
fn objects() -> usize {
    std::env::var("SHARDOP_E2E_ASSIGNER_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// Waits scale with the object count.
fn budget(base_secs: u64) -> Duration {
    Duration::from_secs(base_secs + (objects() as u64) / 5)
}

/// Every label state of every object, as the test's own watch saw it, with the time seen.
type Timeline = Arc<Mutex<HashMap<String, Vec<(Timestamp, Option<String>, bool)>>>>;

/// The test's cluster and namespaces, a worker StatefulSet, and the label timeline its
/// watch records.
struct Env {
    base: TestEnv,
    timeline: Timeline,
}

impl std::ops::Deref for Env {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.base
    }
}

impl Env {
    async fn new(test: &'static str, shards: i32) -> Self {
        let env = Self {
            base: TestEnv::with_worker_stateful_set(test, shards).await,
            timeline: Timeline::default(),
        };
        env.record_timeline();
        env
    }

    fn worker(&self, ordinal: u32) -> ShardopProcess {
        self.worker_spec(ordinal)
            .args(FAST_LEASES)
            .spawn(self.cluster)
            .unwrap()
    }

    fn assigner(&self, name: &str, extra: &[&str]) -> ShardopProcess {
        self.assigner_spec(name)
            .args([
                "--status-interval",
                "1s",
                "--kube-qps",
                "200",
                "--kube-burst",
                "400",
            ])
            .args(extra.iter().copied())
            .spawn(self.cluster)
            .unwrap()
    }

    fn shards(&self) -> Api<Shard> {
        Api::namespaced(self.client.clone(), &self.operator.name)
    }

    /// Records every label change of every object into the timeline.
    fn record_timeline(&self) {
        let timeline = self.timeline.clone();
        let stream = watcher(self.clusters(), watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(object)) = stream.next().await {
                let shard = object.labels().get(SHARD_LABEL).cloned();
                let drain = object.labels().contains_key(DRAIN_LABEL);
                let mut timeline = timeline.lock().unwrap();
                let entries = timeline.entry(object.name_any()).or_default();
                if entries
                    .last()
                    .is_none_or(|(_, s, d)| *s != shard || *d != drain)
                {
                    entries.push((Timestamp::now(), shard, drain));
                }
            }
        });
    }

    /// Creates `count` unlabelled objects, returning when each create returned.
    async fn create_objects(&self, count: usize) -> HashMap<String, Instant> {
        futures::stream::iter(0..count)
            .map(|i| async move {
                let name = format!("db-{i:05}");
                let manifest = shardop_e2e::database_cluster_json(&name, valid_spec(1));
                let object: DatabaseCluster = serde_json::from_value(manifest).unwrap();
                self.clusters()
                    .create(&PostParams::default(), &object)
                    .await
                    .with_context(|| format!("creating {name}"))
                    .unwrap();
                (name, Instant::now())
            })
            .buffer_unordered(32)
            .collect()
            .await
    }

    async fn list(&self) -> Vec<DatabaseCluster> {
        self.clusters()
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }

    /// The shard each object belongs on with `n` shards.
    fn desired(&self, name: &str, n: u32) -> String {
        shard_for(&self.objects.name, name, ShardCount::new(n).unwrap())
            .0
            .to_string()
    }

    /// Waits until every object carries its desired shard label for `n` shards, no drain
    /// label, and was reconciled by that shard (its StatefulSet carries that label).
    async fn wait_placed(&self, n: u32, expected: usize, timeout: Duration) -> Duration {
        let started = Instant::now();
        let result = wait_for(
            &format!("{expected} objects placed on {n} shards and converged"),
            timeout,
            || async {
                let list = self.list().await;
                let children = stateful_set_shards(&self.client, &self.objects.name).await?;
                let placed = list.iter().filter(|o| {
                    let want = self.desired(&o.name_any(), n);
                    o.labels().get(SHARD_LABEL) == Some(&want)
                        && !o.labels().contains_key(DRAIN_LABEL)
                        && converged_on(o, &want, &children)
                });
                (list.len() == expected && placed.count() == expected).then_some(())
            },
        )
        .await;
        if let Err(err) = result {
            let children = stateful_set_shards(&self.client, &self.objects.name)
                .await
                .unwrap_or_default();
            let stale: Vec<String> = self
                .list()
                .await
                .iter()
                .filter(|o| {
                    let want = self.desired(&o.name_any(), n);
                    o.labels().get(SHARD_LABEL) == Some(&want) && !converged_on(o, &want, &children)
                })
                .map(|o| {
                    format!(
                        "{} (StatefulSet of shard {:?})",
                        o.name_any(),
                        children.get(&o.name_any())
                    )
                })
                .collect();
            panic!(
                "{err}\nplacement: {:?}\nlabelled right but not reconciled by their shard: {stale:?}",
                self.placement_summary_blocking()
            );
        }
        started.elapsed()
    }

    /// Waits until every object carries its desired shard label for `n` shards and no
    /// drain label (the protocol's part, whatever the workers did).
    async fn wait_labelled(&self, n: u32, expected: usize, timeout: Duration) {
        wait_for(
            &format!("{expected} objects labelled for {n} shards"),
            timeout,
            || async {
                let list = self.list().await;
                let placed = list.iter().filter(|o| {
                    o.labels().get(SHARD_LABEL) == Some(&self.desired(&o.name_any(), n))
                        && !o.labels().contains_key(DRAIN_LABEL)
                });
                (list.len() == expected && placed.count() == expected).then_some(())
            },
        )
        .await
        .unwrap_or_else(|err| panic!("{err}\nplacement: {:?}", self.placement_summary_blocking()));
    }

    fn placement_summary_blocking(&self) -> BTreeMap<String, usize> {
        let timeline = self.timeline.lock().unwrap();
        let mut summary = BTreeMap::new();
        for entries in timeline.values() {
            if let Some((_, shard, drain)) = entries.last() {
                let key = format!(
                    "{}{}",
                    shard.as_deref().unwrap_or("none"),
                    if *drain { "+drain" } else { "" }
                );
                *summary.entry(key).or_default() += 1;
            }
        }
        summary
    }

    async fn labels(&self) -> BTreeMap<String, Option<String>> {
        self.list()
            .await
            .iter()
            .map(|o| (o.name_any(), o.labels().get(SHARD_LABEL).cloned()))
            .collect()
    }

    /// Every successful worker write to an object of this test (or a child of it) happened
    /// while the writing shard owned the object, as the test's watch saw the labels. The
    /// start of an ownership interval is widened by 2 s (the watch sees a label a moment
    /// after it is written), its end by 0.5 s. The ownership oracle confirms it from the
    /// audit log alone.
    fn assert_single_owner(&self) -> usize {
        let log = self.cluster.audit_log().unwrap();
        let writes: Vec<AuditEvent> = audit::events_in_namespace(log, &self.objects.name)
            .unwrap()
            .into_iter()
            .filter(|e| e.user_agent.starts_with("shardop-worker/") && e.is_successful_write())
            .collect();
        let timeline = self.timeline.lock().unwrap();
        let mut violations = Vec::new();
        for event in &writes {
            let (Some(owner), Some(shard)) = (event.database_cluster(), event.worker_shard())
            else {
                continue;
            };
            let Some(entries) = timeline.get(&owner) else {
                violations.push(format!("{owner}: write by shard {shard} but never watched"));
                continue;
            };
            let t = event.request_received_timestamp;
            let shard = shard.to_string();
            let owned = entries.iter().enumerate().any(|(i, (start, label, _))| {
                label.as_deref() == Some(shard.as_str()) && {
                    let end = entries.get(i + 1).map(|(end, _, _)| *end);
                    let from = *start - jiff::SignedDuration::from_secs(2);
                    let until = end.map(|e| e + jiff::SignedDuration::from_millis(500));
                    t >= from && until.is_none_or(|u| t <= u)
                }
            });
            if !owned {
                violations.push(format!(
                    "{owner}: {} {:?} by shard {shard} at {t}, labels seen: {entries:?}",
                    event.verb,
                    event.target()
                ));
            }
        }
        assert!(
            violations.is_empty(),
            "dual ownership ({} of {} writes):\n{}",
            violations.len(),
            writes.len(),
            violations.join("\n")
        );
        // The audit log's own order: by revision, every shard write came from the process
        // holding the shard's Lease, and no two shards wrote an object between relabels.
        let ownership = audit::ownership(log, &self.operator.name, &self.objects.name).unwrap();
        assert_eq!(
            ownership.dual_ownership(),
            0,
            "dual ownership by revision:\n{}",
            ownership.violations().join("\n")
        );
        assert!(!ownership.writes.is_empty() && ownership.holder_unknown() == 0);
        writes.len()
    }

    async fn shard_state(&self, index: u32) -> Option<(Option<ShardState>, Option<i64>)> {
        let shard = self
            .shards()
            .get_opt(&format!("shard-{index}"))
            .await
            .ok()??;
        let status = shard.status.unwrap_or_default();
        Some((status.state, status.objects))
    }
}

/// The upper bound of the histogram bucket holding quantile `q` of `metric`.
fn histogram_quantile(text: &str, metric: &str, q: f64) -> f64 {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&format!("{metric}_bucket{{le=\""))?;
            let (le, value) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value.split_whitespace().next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map_or(f64::NAN, |b| b.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// The leader's identity, from the `shardop-assigner` Lease.
async fn leader(env: &Env) -> Option<String> {
    let lease = env.leases().get_opt("shardop-assigner").await.ok()??;
    lease.spec?.holder_identity.filter(|h| !h.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_storm_is_assigned_balanced_and_converges() {
    let env = Env::new("a-storm", 3).await;
    let workers: Vec<ShardopProcess> = (0..3).map(|i| env.worker(i)).collect();
    let assigner = env.assigner("shardop-assigner-0", &[]);
    let count = objects();
    let addr = assigner.metrics_addr().await.unwrap();
    // Latency is measured from a running system: the assigner leads and every shard is
    // served (E = 3).
    wait_for("E = 3", Duration::from_secs(30), || async {
        let metrics = scrape(addr).await.ok()?;
        (metric_value(&metrics, "shardop_assigner_effective_shards", &[]) == 3.0).then_some(())
    })
    .await
    .unwrap();

    // When each object's label was first seen, by the test's own watch.
    let creating = Instant::now();
    let created = env.create_objects(count).await;
    let created_in = creating.elapsed();
    env.wait_placed(3, count, budget(60)).await;

    let timeline = env.timeline.lock().unwrap().clone();
    let mut latencies: Vec<Duration> = created
        .iter()
        .filter_map(|(name, created_at)| {
            let (seen, _, _) = timeline.get(name)?.iter().find(|(_, s, _)| s.is_some())?;
            let age = Timestamp::now().duration_since(*seen);
            let seen_at = Instant::now().checked_sub(age.unsigned_abs())?;
            Some(seen_at.saturating_duration_since(*created_at))
        })
        .collect();
    latencies.sort();
    assert_eq!(latencies.len(), count);

    let mut per_shard = BTreeMap::<String, usize>::new();
    for labels in env.labels().await.values() {
        *per_shard.entry(labels.clone().unwrap()).or_default() += 1;
    }
    let mean = count as f64 / 3.0;
    let max = *per_shard.values().max().unwrap() as f64;
    // Placement is exactly jump hash (checked by wait_placed); its imbalance at small
    // counts is statistical: allow 4 standard deviations, and 5 % from 10,000 objects on.
    let sigma = (count as f64 * (1.0 / 3.0) * (2.0 / 3.0)).sqrt();
    let allowed = if count >= 10_000 {
        1.05
    } else {
        1.0 + 4.0 * sigma / mean
    };
    assert!(
        max / mean <= allowed,
        "max/mean {:.3} > {allowed:.3}: {per_shard:?}",
        max / mean
    );

    let metrics = scrape(addr).await.unwrap();
    assert_eq!(
        metric_value(&metrics, "shardop_assigner_assignments_total", &[]),
        count as f64
    );
    assert_eq!(
        metric_value(&metrics, "shardop_assigner_unassigned_objects", &[]),
        0.0
    );
    // Every first label write timed the object's wait in the assigner (a conflict's retry
    // times it again).
    assert!(
        metric_value(&metrics, "shardop_assigner_unowned_wait_seconds_count", &[]) >= count as f64
    );
    assert_eq!(
        metric_value(&metrics, "shardop_assigner_desired_shards", &[]),
        3.0
    );
    let on_shards: f64 = (0..3)
        .map(|s| {
            metric_value(
                &metrics,
                "shardop_assigner_shard_objects",
                &[("shard", &s.to_string())],
            )
        })
        .sum();
    assert_eq!(on_shards, count as f64);

    // Shard objects report who serves them and how many objects they have.
    wait_for("Shard status", Duration::from_secs(20), || async {
        for i in 0..3 {
            let (state, objects) = env.shard_state(i).await?;
            let want = per_shard.get(&i.to_string()).copied().unwrap_or(0) as i64;
            (state == Some(ShardState::Active) && objects == Some(want)).then_some(())?;
        }
        Some(())
    })
    .await
    .unwrap();
    let table = env
        .cluster
        .kubectl_ok(&["-n", &env.operator.name, "get", "shards"])
        .unwrap();
    let writes = env.assert_single_owner();
    let metric = "shardop_assigner_assignment_latency_seconds";
    let wait = "shardop_assigner_unowned_wait_seconds";
    eprintln!(
        "{count} objects created in {created_in:?}: assignment latency (create returned -> label \
         seen by a watch) p50 {:?} p99 {:?} max {:?}; assigner's histogram (creationTimestamp \
         -> patch response) p50 <= {}s p99 <= {}s, its own wait (event -> write) p99 <= {}s; \
         per shard {per_shard:?} (max/mean {:.3}); {writes} worker writes, all by the owner\n{table}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap(),
        histogram_quantile(&metrics, metric, 0.5),
        histogram_quantile(&metrics, metric, 0.99),
        histogram_quantile(&metrics, wait, 0.99),
        max / mean
    );
    drop(assigner);
    drop(workers);
    env.release_objects().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_then_in_moves_the_minimum_without_dual_ownership() {
    let env = Env::new("a-scale", 3).await;
    let mut workers: BTreeMap<u32, ShardopProcess> = (0..3).map(|i| (i, env.worker(i))).collect();
    let assigner = env.assigner("shardop-assigner-0", &["--max-concurrent-moves", "50"]);
    let count = objects();
    env.create_objects(count).await;
    env.wait_placed(3, count, budget(60)).await;
    let before = env.labels().await;

    // 3 -> 4: the 4th worker starts, then the StatefulSet is scaled.
    workers.insert(3, env.worker(3));
    let started = Instant::now();
    env.scale_workers(4);
    env.wait_labelled(4, count, budget(60)).await;
    let relabelled = started.elapsed();
    env.wait_placed(4, count, budget(60)).await;
    let rebalance = started.elapsed();
    let after = env.labels().await;
    let moved: Vec<&String> = before
        .keys()
        .filter(|name| before[*name] != after[*name])
        .collect();
    // Exactly the objects that hash onto the new shard moved, and nothing else.
    for name in &moved {
        assert_eq!(after[*name].as_deref(), Some("3"), "{name} moved elsewhere");
    }
    let fraction = moved.len() as f64 / count as f64;
    let sigma = (0.25 * 0.75 / count as f64).sqrt();
    assert!(
        (fraction - 0.25).abs() <= (0.05 * 0.25_f64).max(4.0 * sigma),
        "moved fraction {fraction:.4}"
    );

    // 4 -> 2: the StatefulSet shrinks; workers 3 and 2 are stopped gracefully (pod
    // deletion), after the assigner has had a moment to start draining them.
    let shrink = Instant::now();
    env.scale_workers(2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for ordinal in [3, 2] {
        workers
            .get_mut(&ordinal)
            .unwrap()
            .terminate(Duration::from_secs(30))
            .unwrap();
    }
    env.wait_labelled(2, count, budget(60)).await;
    let shrink_relabelled = shrink.elapsed();
    env.wait_placed(2, count, budget(60)).await;
    let shrink_time = shrink.elapsed();
    // Retired shards are cleaned up: Leases and Shard objects of 2 and 3 are deleted.
    wait_for(
        "retired shards deleted",
        Duration::from_secs(30),
        || async {
            for i in [2, 3] {
                env.leases()
                    .get_opt(&format!("shardop-shard-{i}"))
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())?;
                env.shards()
                    .get_opt(&format!("shard-{i}"))
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())?;
            }
            Some(())
        },
    )
    .await
    .unwrap();
    wait_for("shards 0 and 1 active", Duration::from_secs(20), || async {
        for i in [0, 1] {
            (env.shard_state(i).await?.0 == Some(ShardState::Active)).then_some(())?;
        }
        Some(())
    })
    .await
    .unwrap();

    let metrics = scrape(assigner.metrics_addr().await.unwrap())
        .await
        .unwrap();
    let drains = metric_value(
        &metrics,
        "shardop_assigner_moves_total",
        &[("phase", "drain")],
    );
    let direct = metric_value(
        &metrics,
        "shardop_assigner_moves_total",
        &[("phase", "direct")],
    );
    let writes = env.assert_single_owner();
    eprintln!(
        "{count} objects: 3->4 moved {} ({fraction:.4}, ideal 0.25): labels in \
         {relabelled:?}, converged in {rebalance:?}; 4->2: labels in {shrink_relabelled:?}, \
         converged in {shrink_time:?}; drains {drains}, direct moves {direct}; \
         {writes} worker writes, all by the owner",
        moved.len()
    );
    drop(assigner);
    drop(workers);
    env.release_objects().await;
}

async fn homes_served(env: &Env, shards: u32, workers: u32) -> Option<Vec<u32>> {
    shardop_e2e::homes::homes_served(&env.client, &env.operator.name, shards, workers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_shards_move_between_workers_without_relabelling() {
    const SHARDS: u32 = 6;
    let env = Env::new("a-homes", 2).await;
    let mut workers: BTreeMap<u32, ShardopProcess> = (0..2).map(|i| (i, env.worker(i))).collect();
    let shards = SHARDS.to_string();
    let assigner = env.assigner("shardop-assigner-0", &["--shards", &shards]);
    let count = objects().min(300);
    env.create_objects(count).await;
    env.wait_placed(SHARDS, count, budget(60)).await;
    let two = wait_for(
        "6 shards served by 2 workers",
        Duration::from_secs(60),
        || homes_served(&env, SHARDS, 2),
    )
    .await
    .unwrap();
    let before = env.labels().await;
    // Objects created while the first shards were still being acquired moved once E
    // reached 6; from here on, none may.
    let moves = async || {
        let metrics = scrape(assigner.metrics_addr().await.unwrap())
            .await
            .unwrap();
        metric_value(&metrics, "shardop_assigner_moves_total", &[])
    };
    let moves_before = moves().await;

    // 2 -> 3 workers: the new worker is named home for a third of the shards and their
    // holders hand them over; no object label changes.
    workers.insert(2, env.worker(2));
    let grow = Instant::now();
    env.scale_workers(3);
    let three = wait_for("6 shards served by 3 workers", budget(60), || {
        homes_served(&env, SHARDS, 3)
    })
    .await
    .unwrap();
    let grown = grow.elapsed();
    let moved = two.iter().zip(&three).filter(|(a, b)| a != b).count();
    assert_eq!(
        moved, 2,
        "only the new worker's share moves: {two:?} → {three:?}"
    );
    assert!(two.iter().zip(&three).all(|(a, b)| a == b || *b == 2));
    // The new holders reconcile what changes from now on.
    let patch = json!({ "spec": { "replicas": 2 } });
    for name in before.keys() {
        env.clusters()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }
    env.wait_placed(SHARDS, count, budget(60)).await;

    // 3 -> 2: the StatefulSet shrinks and worker 2 stops; its shards go back.
    let shrink = Instant::now();
    env.scale_workers(2);
    workers
        .get_mut(&2)
        .unwrap()
        .terminate(Duration::from_secs(30))
        .unwrap();
    wait_for("6 shards served by 2 workers again", budget(60), || {
        homes_served(&env, SHARDS, 2)
    })
    .await
    .unwrap();
    let shrunk = shrink.elapsed();
    env.wait_placed(SHARDS, count, budget(60)).await;
    assert_eq!(env.labels().await, before, "no object was relabelled");

    assert_eq!(
        moves().await,
        moves_before,
        "no object moved between shards"
    );
    let writes = env.assert_single_owner();
    eprintln!(
        "{count} objects on {SHARDS} shards: 2 -> 3 workers in {grown:?} ({moved} shards \
         moved), 3 -> 2 in {shrunk:?}; {writes} worker writes, all by the owner"
    );
    drop(assigner);
    drop(workers);
    env.release_objects().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_assigner_finishes_the_rebalance_of_a_killed_leader() {
    let env = Env::new("a-failover", 3).await;
    let mut workers: Vec<ShardopProcess> = (0..3).map(|i| env.worker(i)).collect();
    let election = [
        "--leader-lease-duration",
        "4s",
        "--leader-lease-grace",
        "2s",
        "--max-concurrent-moves",
        "4",
    ];
    let mut assigners: BTreeMap<String, ShardopProcess> =
        ["shardop-assigner-0", "shardop-assigner-1"]
            .into_iter()
            .map(|name| (name.to_owned(), env.assigner(name, &election)))
            .collect();
    let count = objects();
    env.create_objects(count).await;
    env.wait_placed(3, count, budget(60)).await;
    let expected_moves = env
        .list()
        .await
        .iter()
        .filter(|o| env.desired(&o.name_any(), 4) == "3")
        .count();

    workers.push(env.worker(3));
    env.scale_workers(4);
    // Kill the leader once the expansion is under way but far from done.
    wait_for("expansion under way", budget(30), || async {
        let on_new = env
            .labels()
            .await
            .values()
            .filter(|l| l.as_deref() == Some("3"))
            .count();
        (on_new >= 2.min(expected_moves)).then_some(())
    })
    .await
    .unwrap();
    let leader_name = leader(&env).await.expect("a leader");
    let on_new_at_kill = env
        .labels()
        .await
        .values()
        .filter(|l| l.as_deref() == Some("3"))
        .count();
    assigners.get_mut(&leader_name).unwrap().kill_9().unwrap();
    let killed = Instant::now();
    env.wait_placed(4, count, budget(60)).await;
    let new_leader = leader(&env).await.expect("a new leader");
    assert_ne!(new_leader, leader_name);
    let writes = env.assert_single_owner();
    eprintln!(
        "leader {leader_name} killed with {on_new_at_kill}/{expected_moves} moved; \
         {new_leader} finished {:?} later; {writes} worker writes, all by the owner",
        killed.elapsed()
    );
    drop(assigners);
    drop(workers);
    env.release_objects().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_labels_are_repaired_through_the_protocol() {
    let env = Env::new("a-tamper", 3).await;
    let mut workers: Vec<ShardopProcess> = (0..3).map(|i| env.worker(i)).collect();
    let assigner = env.assigner("shardop-assigner-0", &[]);
    let count = 12;
    env.create_objects(count).await;
    env.wait_placed(3, count, budget(30)).await;
    let tampered_at = Timestamp::now();

    let other = |name: &str| {
        let current: u32 = env.desired(name, 3).parse().unwrap();
        ((current + 1) % 3).to_string()
    };
    let tampering: Vec<(String, serde_json::Value)> = vec![
        ("db-00000".into(), json!({ SHARD_LABEL: null })),
        ("db-00001".into(), json!({ SHARD_LABEL: other("db-00001") })),
        ("db-00002".into(), json!({ SHARD_LABEL: "x" })),
        ("db-00003".into(), json!({ SHARD_LABEL: "01" })),
        ("db-00004".into(), json!({ SHARD_LABEL: "9" })),
        (
            "db-00005".into(),
            json!({ SHARD_LABEL: null, DRAIN_LABEL: "2" }),
        ),
        ("db-00006".into(), json!({ DRAIN_LABEL: other("db-00006") })),
        // Past the maximum shard count (issue #11: every worker panicked).
        ("db-00007".into(), json!({ SHARD_LABEL: "4294967295" })),
    ];
    // The owner of db-00001 is busy with a spec change when its label is rewritten.
    env.clusters()
        .patch(
            "db-00001",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 2 } })),
        )
        .await
        .unwrap();
    for (name, labels) in &tampering {
        env.clusters()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "labels": labels } })),
            )
            .await
            .unwrap();
    }
    // Created with a shard label (the desired one): not the assigner's, so no worker acts
    // until the assigner claims it, which takes an apply (a merge patch of the same value
    // would leave the label untrusted forever).
    let restored = "db-restored";
    let mut manifest = shardop_e2e::database_cluster_json(restored, valid_spec(1));
    manifest["metadata"]["labels"] = json!({ SHARD_LABEL: env.desired(restored, 3) });
    let object: DatabaseCluster = serde_json::from_value(manifest).unwrap();
    env.clusters()
        .create(&PostParams::default(), &object)
        .await
        .unwrap();
    let count = count + 1;
    env.wait_labelled(3, count, Duration::from_secs(60)).await;
    // Labels the assigner did not write never get a Lease: not "9" (hand-edited, so not an
    // old label of a retired shard), and never one past the maximum shard count.
    let audit_log = env.cluster.audit_log().unwrap();
    let lease_writes: Vec<String> = audit::events_in_namespace(audit_log, &env.operator.name)
        .unwrap()
        .into_iter()
        .filter(|e| e.is_successful_write() && e.request_received_timestamp > tampered_at)
        .filter_map(|e| {
            let (resource, name) = e.target()?;
            (resource == "leases"
                && ["shardop-shard-9", "shardop-shard-4294967295"].contains(&name))
            .then(|| format!("{} {name} by {}", e.verb, e.user_agent))
        })
        .collect();
    assert!(lease_writes.is_empty(), "{lease_writes:?}");
    for (i, worker) in workers.iter_mut().enumerate() {
        assert!(worker.is_running(), "worker {i} died:\n{}", worker.log());
    }
    let timeline = env.timeline.lock().unwrap().clone();
    for (name, labels) in &tampering {
        let seen: Vec<String> = timeline[name]
            .iter()
            .map(|(_, s, d)| {
                format!(
                    "{}{}",
                    s.as_deref().unwrap_or("-"),
                    if *d { "+drain" } else { "" }
                )
            })
            .collect();
        eprintln!(
            "{name}: tampered with {labels}; labels seen: {}",
            seen.join(" -> ")
        );
    }
    // And the workers reconcile each object on its repaired shard (an object that left a
    // shard without a drain and came back with the same labels must be reconciled again).
    env.wait_placed(3, count, Duration::from_secs(30)).await;
    // No shard but the last assigned owner wrote the hand-edited objects or their children,
    // and nobody wrote the restored object before the assigner claimed its label.
    let writes: Vec<AuditEvent> = audit::events_in_namespace(audit_log, &env.objects.name)
        .unwrap()
        .into_iter()
        .filter(AuditEvent::is_successful_write)
        .collect();
    let claimed = writes
        .iter()
        .filter(|e| {
            e.user_agent.starts_with("shardop-assigner")
                && e.target() == Some(("databaseclusters", restored))
        })
        .map(|e| e.request_received_timestamp)
        .min()
        .expect("the assigner claimed the restored object's label");
    let foreign: Vec<String> = writes
        .iter()
        .filter_map(|e| {
            let owner = e.database_cluster()?;
            let shard = e.worker_shard()?.to_string();
            let hand_edited = owner == "db-00001" && shard == other("db-00001");
            let unclaimed = owner == restored && e.request_received_timestamp < claimed;
            (hand_edited || unclaimed)
                .then(|| format!("{} {:?} by shard {shard}", e.verb, e.target()))
        })
        .collect();
    assert!(foreign.is_empty(), "{foreign:?}");
    for (i, worker) in workers.iter_mut().enumerate() {
        assert!(worker.is_running(), "worker {i} died:\n{}", worker.log());
    }
    drop(assigner);
    drop(workers);
    env.release_objects().await;
}

/// A stand-in for a worker in benchmarks: holds shard `shard`'s Lease and acknowledges
/// drains (removing both labels, conditional on the resourceVersion), nothing else — so
/// the assigner can be measured at 10,000 objects without 10,000 StatefulSets.
struct StandIn {
    shard: u32,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl StandIn {
    async fn start(env: &Env, shard: u32) -> Self {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        let leases = env.leases();
        let name = format!("shardop-shard-{shard}");
        let now = MicroTime(Timestamp::now());
        let spec = json!({
            "holderIdentity": format!("shardop-worker-{shard}"),
            "acquireTime": now,
            "renewTime": now,
            "leaseDurationSeconds": 15,
        });
        let lease: Lease = serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": { "name": name, "labels": { "shardop.dev/shard-lease": shard.to_string() } },
            "spec": spec,
        }))
        .unwrap();
        if leases.create(&PostParams::default(), &lease).await.is_err() {
            leases
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "spec": spec })),
                )
                .await
                .unwrap();
        }
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let patch = json!({ "spec": { "renewTime": MicroTime(Timestamp::now()) } });
                let _ = leases
                    .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await;
            }
        });
        let clusters = env.clusters();
        let selector = format!("{SHARD_LABEL}={shard},{DRAIN_LABEL}");
        let ack = tokio::spawn(async move {
            watcher(
                clusters.clone(),
                watcher::Config::default().labels(&selector),
            )
            .applied_objects()
            .for_each_concurrent(32, |object| {
                let clusters = clusters.clone();
                async move {
                    let Ok(object) = object else { return };
                    let patch = json!({ "metadata": {
                        "resourceVersion": object.resource_version(),
                        "labels": { SHARD_LABEL: null, DRAIN_LABEL: null },
                    }});
                    let _ = clusters
                        .patch(
                            &object.name_any(),
                            &PatchParams::default(),
                            &Patch::Merge(patch),
                        )
                        .await;
                }
            })
            .await;
        });
        Self {
            shard,
            tasks: vec![renew, ack],
        }
    }

    /// Stops acknowledging and releases the Lease (a graceful stop).
    async fn stop(self, env: &Env) {
        for task in &self.tasks {
            task.abort();
        }
        let patch = json!({ "spec": { "holderIdentity": null } });
        env.leases()
            .patch(
                &format!("shardop-shard-{}", self.shard),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
            .unwrap();
    }
}

impl Env {
    /// Waits, on the test's own watch (no lists: they are expensive at 10,000 objects),
    /// until every object carries its desired label for `n` shards and no drain label.
    async fn wait_labelled_watched(&self, n: u32, expected: usize, timeout: Duration) {
        wait_for(
            &format!("{expected} objects labelled for {n} shards"),
            timeout,
            || async {
                let timeline = self.timeline.lock().unwrap();
                let placed = timeline
                    .iter()
                    .filter(|(name, entries)| {
                        entries.last().is_some_and(|(_, shard, drain)| {
                            !drain && shard.as_deref() == Some(self.desired(name, n).as_str())
                        })
                    })
                    .count();
                (timeline.len() == expected && placed == expected).then_some(())
            },
        )
        .await
        .unwrap_or_else(|err| panic!("{err}\nplacement: {:?}", self.placement_summary_blocking()));
    }

    fn watched_labels(&self) -> BTreeMap<String, Option<String>> {
        self.timeline
            .lock()
            .unwrap()
            .iter()
            .map(|(name, entries)| (name.clone(), entries.last().and_then(|e| e.1.clone())))
            .collect()
    }
}

/// The assigner alone at scale: a creation storm of `SHARDOP_E2E_BENCH_OBJECTS` (default
/// 10,000) unlabelled objects, then 3 -> 4 -> 2 shards, with stand-in workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run with --ignored (SHARDOP_E2E_BENCH_OBJECTS, default 10000)"]
async fn bench_the_assigner_with_stand_in_workers() {
    let count: usize = std::env::var("SHARDOP_E2E_BENCH_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let env = Env::new("a-bench", 3).await;
    let mut stand_ins = BTreeMap::new();
    for shard in 0..3 {
        stand_ins.insert(shard, StandIn::start(&env, shard).await);
    }
    let assigner = env.assigner("shardop-assigner-0", &["--max-concurrent-moves", "200"]);
    let addr = assigner.metrics_addr().await.unwrap();
    wait_for("E = 3", Duration::from_secs(30), || async {
        let metrics = scrape(addr).await.ok()?;
        (metric_value(&metrics, "shardop_assigner_effective_shards", &[]) == 3.0).then_some(())
    })
    .await
    .unwrap();
    let timeout = Duration::from_secs(60 + count as u64 / 20);

    let creating = Instant::now();
    let created = env.create_objects(count).await;
    let created_in = creating.elapsed();
    env.wait_labelled_watched(3, count, timeout).await;
    let storm = creating.elapsed();
    let timeline = env.timeline.lock().unwrap().clone();
    let mut latencies: Vec<Duration> = created
        .iter()
        .filter_map(|(name, created_at)| {
            let (seen, _, _) = timeline.get(name)?.iter().find(|(_, s, _)| s.is_some())?;
            let age = Timestamp::now().duration_since(*seen);
            let seen_at = Instant::now().checked_sub(age.unsigned_abs())?;
            Some(seen_at.saturating_duration_since(*created_at))
        })
        .collect();
    latencies.sort();
    let before = env.watched_labels();

    stand_ins.insert(3, StandIn::start(&env, 3).await);
    let growing = Instant::now();
    env.scale_workers(4);
    env.wait_labelled_watched(4, count, timeout).await;
    let grow_time = growing.elapsed();
    let after = env.watched_labels();
    let moved = before.keys().filter(|k| before[*k] != after[*k]).count();
    assert!(
        before
            .keys()
            .filter(|k| before[*k] != after[*k])
            .all(|k| after[k].as_deref() == Some("3"))
    );

    let shrinking = Instant::now();
    env.scale_workers(2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for shard in [3, 2] {
        stand_ins.remove(&shard).unwrap().stop(&env).await;
    }
    env.wait_labelled_watched(2, count, timeout).await;
    let shrink_time = shrinking.elapsed();

    let metrics = scrape(addr).await.unwrap();
    let metric = "shardop_assigner_move_duration_seconds";
    let rss = std::fs::read_to_string(format!("/proc/{}/status", assigner.pid()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    eprintln!(
        "BENCH {count} objects: created in {created_in:?}, all labelled {storm:?} after the first \
         create; assignment latency p50 {:?} p99 {:?} max {:?}; 3->4 moved {moved} ({:.4}, ideal \
         0.25) in {grow_time:?}; 4->2 in {shrink_time:?}; move duration p50 <= {}s p99 <= {}s; \
         assigner RSS {rss}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap(),
        moved as f64 / count as f64,
        histogram_quantile(&metrics, metric, 0.5),
        histogram_quantile(&metrics, metric, 0.99),
    );
    drop(assigner);
    for (_, stand_in) in stand_ins {
        stand_in.stop(&env).await;
    }
}
