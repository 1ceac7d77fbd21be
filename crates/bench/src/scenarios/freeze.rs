//! `freeze`: a worker whose writes are throttled (`--kube-qps 1`) is frozen with SIGSTOP
//! while it is busy, for longer than the Lease duration; another worker takes its shard
//! over; then it is resumed with SIGCONT. Nothing it queued before the freeze may reach the
//! API server once the taker holds the Lease, and it must get its shard back within
//! 2 × the Lease duration.
//!
//! The Lease events are read straight from the audit log (a few lines of parsing kept
//! here, apart from the ownership oracle in `audit_tail`).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use jiff::Timestamp;
use serde::Deserialize;
use shardop_e2e::metrics::metric_value;

use super::{Knobs, Outcome, begin, change_specs, draw, holder_of, populate, report};
use crate::env::{self, WORKER_LEASE_FLAGS};
use crate::run::{Run, on_shard};

/// The worker that is throttled and frozen, and its shard.
const VICTIM: u32 = 1;
/// Objects of its slice changed right before the freeze: at one write per second, a
/// backlog of about two writes each.
const BUSY_OBJECTS: usize = 20;
/// How long the victim works through its backlog before it is frozen.
const BUSY_FOR: Duration = Duration::from_secs(3);
/// How long the freeze lasts after the takeover: the taker reconciles the slice meanwhile.
const FROZEN_AFTER_TAKEOVER: Duration = Duration::from_secs(3);

/// `freeze`: see the module docs.
pub async fn freeze(knobs: &Knobs) -> anyhow::Result<Outcome> {
    let shards = knobs.first_shards().max(2);
    let home = format!("shardop-worker-{VICTIM}");
    let lease_duration = shardop_runtime::parse_duration(WORKER_LEASE_FLAGS[1])
        .map_err(anyhow::Error::msg)?
        .as_secs_f64();
    let (mut run, _, raw) = begin("freeze", knobs).await?;
    let started = Instant::now();
    run.start_operator(shards, &[], &[]).await?;
    populate(&mut run, knobs).await?;
    let all: HashSet<String> = run.conv.shards().into_keys().collect();

    restart_throttled(&mut run, &home).await?;
    let mut busy: Vec<String> = on_shard(&run.conv, VICTIM).into_iter().collect();
    busy.sort();
    busy.truncate(BUSY_OBJECTS);
    tracing::info!(objects = busy.len(), "changing part of the victim's slice");
    change_specs(&run, &busy, 1, knobs.concurrency).await?;
    let busy_until = Instant::now() + BUSY_FOR;
    run.wait_until(BUSY_FOR + Duration::from_secs(1), |_| {
        Instant::now() >= busy_until
    })
    .await;

    // Out of `run.env.workers` while frozen: a scrape of a stopped process would hang.
    let mut frozen = run
        .env
        .workers
        .remove(&VICTIM)
        .context("the victim is not running")?;
    signal(frozen.process.pid(), "STOP")?;
    let frozen_at = Timestamp::now();
    let frozen_instant = Instant::now();
    tracing::info!("SIGSTOP {home}");
    let taker = wait_for_takeover(&run, knobs.converge_timeout()).await;
    let resume = signal(frozen.process.pid(), "CONT");
    let frozen_s = frozen_instant.elapsed().as_secs_f64();
    let resumed_at = Timestamp::now();
    let resumed_instant = Instant::now();
    tracing::info!(frozen_s, ?taker, "SIGCONT {home}");
    resume?;
    let home_port = frozen.metrics_port;
    if !frozen.process.is_running() {
        bail!("{home} exited after SIGCONT");
    }
    run.env.workers.insert(VICTIM, frozen);
    let taker = taker?;

    let victim_label = VICTIM.to_string();
    run.wait_until_async(knobs.converge_timeout(), async |_, _| {
        env::scrape(home_port).await.is_ok_and(|text| {
            metric_value(&text, "shardop_shard_leader", &[("shard", &victim_label)]) >= 1.0
        })
    })
    .await
    .context("the shard was not handed back to its home worker")?;
    let handback_polled_s = resumed_instant.elapsed().as_secs_f64();
    // The writes the frozen worker had queued, refused or cancelled by the fence after
    // SIGCONT: without any the run would not have tested anything.
    let fenced_writes = env::scrape(home_port).await.map_or(0.0, |text| {
        metric_value(&text, "shardop_kube_fenced_requests_total", &[])
    });
    let converged = run
        .wait_until(knobs.converge_timeout(), |run| run.conv.all_converged(&all))
        .await
        .is_some();
    run.settle(Duration::from_secs(3), Duration::from_secs(60))
        .await?;

    let audit_log = run
        .env
        .cluster
        .audit_log
        .clone()
        .context("the freeze scenario reads the audit log")?;
    let leases = LeaseEvents::read(&audit_log, &run.env.operator_ns.name, VICTIM)?;
    let taker_acquired = leases.first_acquire(&taker, frozen_at);
    let home_back = leases.first_acquire(&home, resumed_at);
    let handback_conflicts = leases.conflicts(&home, resumed_at);
    let audit = run.audit()?;
    let late_writes = match taker_acquired {
        Some(taken) => audit
            .events
            .iter()
            .filter(|e| e.is_successful_write() && e.worker_shard() == Some(VICTIM))
            .filter(|e| e.worker_pod() == Some(home.as_str()))
            .filter(|e| e.request_received_timestamp >= taken)
            .filter(|e| home_back.is_none_or(|back| e.request_received_timestamp < back))
            .inspect(|e| {
                tracing::warn!(
                    verb = %e.verb,
                    received = %e.request_received_timestamp,
                    "late write by the frozen worker"
                );
            })
            .count(),
        None => 0,
    };
    let dual_ownership = audit.dual_ownership();
    let overlap = audit.overlap(VICTIM, &taker, &home, frozen_at);
    let handback_s = home_back.map_or(handback_polled_s, |back| {
        back.duration_since(resumed_at).as_secs_f64()
    });
    let handback_limit_s = 2.0 * lease_duration;

    let mut report = report(
        "freeze",
        knobs,
        &[shards],
        started.elapsed().as_secs_f64(),
        raw,
    );
    report
        .set("busy_objects", busy.len())
        .set("victim_kube_qps", 1)
        .set("lease_duration_s", lease_duration)
        .set("frozen_s", frozen_s)
        .set("taker", &taker)
        .set("taken_over", taker_acquired.is_some())
        .set("fenced_writes", fenced_writes)
        .set("late_writes", late_writes)
        .set("dual_ownership", dual_ownership)
        .set("overlap", overlap)
        .set("converged", converged)
        .set("handback_s", handback_s)
        .set("handback_limit_s", handback_limit_s)
        .set("handback_conflicts", handback_conflicts)
        .set("processes", run.process_table());
    draw(&run, knobs, "freeze")?;
    run.finish();
    Ok(Outcome {
        report,
        checks: vec![
            (
                "frozen while busy (fenced_writes > 0)".into(),
                fenced_writes > 0.0,
            ),
            ("late_writes == 0".into(), late_writes == 0),
            ("dual_ownership == 0".into(), dual_ownership == 0),
            ("overlap == 0".into(), overlap == 0),
            ("all converged".into(), converged),
            (
                "handback_s <= 2 x lease duration".into(),
                home_back.is_some() && handback_s <= handback_limit_s,
            ),
        ],
    })
}

/// Restarts the victim (SIGTERM: it releases its Lease, and gets it back at once as its
/// home worker) with a client budget of one request per second.
async fn restart_throttled(run: &mut Run, home: &str) -> anyhow::Result<()> {
    if let Some(mut worker) = run.env.workers.remove(&VICTIM) {
        worker.process.terminate(Duration::from_secs(60))?;
    }
    run.process_restarted(home);
    run.env
        .start_worker(VICTIM, &["--kube-qps", "1", "--kube-burst", "1"])
        .await?;
    let slice = on_shard(&run.conv, VICTIM).len() as f64;
    let port = run
        .env
        .workers
        .get(&VICTIM)
        .map(|w| w.metrics_port)
        .context("the victim did not start")?;
    let label = VICTIM.to_string();
    run.wait_until_async(Duration::from_secs(120), async |_, _| {
        env::scrape(port).await.is_ok_and(|text| {
            metric_value(&text, "shardop_shard_leader", &[("shard", &label)]) >= 1.0
                && metric_value(&text, "shardop_shard_objects", &[("shard", &label)]) >= slice
        })
    })
    .await
    .context("the throttled worker did not serve its shard again")?;
    Ok(())
}

/// Waits (without sampling: the frozen process cannot answer a scrape) until another
/// worker holds the victim's shard, then a little longer so it reconciles the slice.
async fn wait_for_takeover(run: &Run, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(taker) = holder_of(run, VICTIM).await {
            tokio::time::sleep(FROZEN_AFTER_TAKEOVER).await;
            return Ok(taker);
        }
        if Instant::now() >= deadline {
            bail!("nobody took the frozen worker's shard over within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `kill -<signal> <pid>`.
fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}

/// One audit event about a Lease.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseEvent {
    verb: String,
    #[serde(default)]
    user_agent: String,
    object_ref: Option<LeaseRef>,
    response_status: Option<Code>,
    request_received_timestamp: Timestamp,
    #[serde(default)]
    stage: String,
}

#[derive(Debug, Deserialize)]
struct LeaseRef {
    #[serde(default)]
    resource: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
}

#[derive(Debug, Deserialize)]
struct Code {
    #[serde(default)]
    code: u16,
}

/// The audited writes of one shard Lease, in log order.
struct LeaseEvents(Vec<LeaseEvent>);

impl LeaseEvents {
    fn read(audit_log: &Path, namespace: &str, shard: u32) -> anyhow::Result<Self> {
        let lease = format!("shardop-shard-{shard}");
        let file = std::fs::File::open(audit_log)
            .with_context(|| format!("opening {}", audit_log.display()))?;
        let mut events = Vec::new();
        for line in BufReader::new(file).lines() {
            let line = line?;
            if !line.contains(&lease) || !line.contains(namespace) {
                continue;
            }
            let Ok(event) = serde_json::from_str::<LeaseEvent>(&line) else {
                continue;
            };
            let ours = event.object_ref.as_ref().is_some_and(|o| {
                o.resource == "leases" && o.namespace == namespace && o.name == lease
            });
            if ours && event.stage == "ResponseComplete" {
                events.push(event);
            }
        }
        Ok(Self(events))
    }

    fn by<'a>(&'a self, pod: &'a str, since: Timestamp) -> impl Iterator<Item = &'a LeaseEvent> {
        let agent = format!("({pod})");
        self.0
            .iter()
            .filter(move |e| e.request_received_timestamp >= since)
            .filter(move |e| e.user_agent.contains(&agent))
    }

    /// When `pod` first acquired the Lease since `since`: its first successful create or
    /// update (a renew is an update too, but only a holder renews, and `pod` did not hold
    /// the Lease at `since`).
    fn first_acquire(&self, pod: &str, since: Timestamp) -> Option<Timestamp> {
        self.by(pod, since)
            .filter(|e| matches!(e.verb.as_str(), "create" | "update"))
            .find(|e| e.response_status.as_ref().is_some_and(|s| s.code < 300))
            .map(|e| e.request_received_timestamp)
    }

    /// Lease writes by `pod` since `since` rejected with 409 Conflict.
    fn conflicts(&self, pod: &str, since: Timestamp) -> usize {
        self.by(pod, since)
            .filter(|e| e.response_status.as_ref().is_some_and(|s| s.code == 409))
            .count()
    }
}
