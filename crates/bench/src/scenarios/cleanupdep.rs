//! `cleanupdep`: the finalizer cleanup's dependency is down. Stuck deletions must show a
//! condition, retry with a growing delay (no requeue storm) while the others keep
//! converging, and finish once the dependency is back.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, DeleteParams};
use serde_json::Value;

use super::{Knobs, Outcome, begin, change_specs, draw, fault_names, report};
use crate::convergence::quantile;
use crate::run::{Run, names};

/// The growth ([`gap_growth`]) doubling delays show at the least: 3 or more on a quiet
/// machine, a fixed poll or an immediate retry about 1. A figure of the report, not the
/// check (see [`retries_allowed`]).
#[cfg(test)]
const MIN_GAP_GROWTH: f64 = 2.0;

/// The worker's first retry delay (its `--backoff-base` default, which the bench keeps).
const BACKOFF_BASE_S: f64 = 0.5;
/// Attempts a stuck cleanup may make besides its scheduled retries: the first pass's own
/// StatefulSet deletion comes back as a child event and triggers one at once, and a
/// slow watch may deliver it after the first retry; one more for good measure.
const EVENT_TRIGGERED_ATTEMPTS: usize = 2;
/// Attempts spanning less than this cannot tell a 1 s poll from doubling delays.
const MIN_JUDGED_SPAN_S: f64 = 8.0;
/// The longest the outage waits for a stuck cleanup to become [`judgeable`]: doubling
/// delays get there with the fifth attempt, about 16 s in; a worker that stopped retrying
/// never does, and fails the check.
const MAX_OUTAGE: Duration = Duration::from_secs(60);

/// The ValidatingAdmissionPolicy (and binding) of `cleanupdep`: the claim deletions of the
/// finalizer cleanup are refused in `namespace`, i.e. the cleanup's dependency is down.
fn claim_deletion_outage(namespace: &str) -> (String, Value) {
    let name = format!("{namespace}-claims-down");
    let manifest = shardop_e2e::claim_deletion_refusal(
        &name,
        namespace,
        "the storage backend is down (bench cleanupdep)",
    );
    (name, manifest)
}

/// Whether a dry-run deletion of claim `claim` is refused (the outage is in effect).
async fn claim_deletion_refused(run: &Run, claim: &str) -> bool {
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(run.env.client.clone(), &run.env.objects_ns.name);
    let dry_run = DeleteParams {
        dry_run: true,
        ..DeleteParams::default()
    };
    matches!(
        claims.delete(claim, &dry_run).await,
        Err(kube::Error::Api(status)) if status.code != 404
    )
}

/// One cleanup pass of a stuck object that the dependency refused: from the worker's
/// deletion of the StatefulSet that opens the pass (or, without one, the claim deletion)
/// to the refused claim deletion's response.
#[derive(Clone, Copy, Debug)]
struct Attempt {
    start: Timestamp,
    end: Timestamp,
}

/// Refused claim deletions by the workers since `since`, per DatabaseCluster (from the
/// claim name `data-<name>-<ordinal>`): the cleanup attempts of the stuck objects, each
/// with the time its pass started.
fn refused_cleanups(
    run: &mut Run,
    since: Timestamp,
) -> anyhow::Result<BTreeMap<String, Vec<Attempt>>> {
    let mut attempts: BTreeMap<String, Vec<Attempt>> = BTreeMap::new();
    // The last StatefulSet deletion of each object by a worker: where its next pass began.
    let mut pass_started: BTreeMap<String, Timestamp> = BTreeMap::new();
    let mut events: Vec<_> = run.audit()?.events.iter().collect();
    events.sort_by_key(|event| event.request_received_timestamp);
    for event in events {
        let Some(object) = event.object_ref.as_ref() else {
            continue;
        };
        if event.request_received_timestamp < since
            || event.worker_shard().is_none()
            || event.verb != "delete"
        {
            continue;
        }
        let name = object.name.as_deref().unwrap_or_default();
        if object.resource == "statefulsets" {
            pass_started.insert(name.to_owned(), event.request_received_timestamp);
            continue;
        }
        let refused = event
            .response_status
            .as_ref()
            .is_some_and(|s| s.code >= 400 && s.code != 404);
        if object.resource != "persistentvolumeclaims" || !refused {
            continue;
        }
        let owner = name
            .strip_prefix("data-")
            .and_then(|n| n.rsplit_once('-'))
            .map(|(owner, _)| owner.to_owned());
        if let Some(owner) = owner {
            let start = pass_started
                .remove(&owner)
                .unwrap_or(event.request_received_timestamp);
            attempts.entry(owner).or_default().push(Attempt {
                start,
                end: event.stage_timestamp,
            });
        }
    }
    Ok(attempts)
}

/// Stuck objects whose `Cleanup` condition shows the refused deletion.
async fn cleanup_condition_shown(run: &Run, stuck: &[String]) -> usize {
    let api = run.api();
    let mut shown = 0;
    for name in stuck {
        let Ok(Some(object)) = api.get_opt(name).await else {
            continue;
        };
        if object
            .condition(shardop_api::constants::condition::CLEANUP)
            .is_some_and(|c| c.status == "True" && c.reason == "VolumeClaimDeletionFailed")
        {
            shown += 1;
        }
    }
    shown
}

/// Creates `names`, waits until they converged and their claim (`data-<name>-0`) exists:
/// without claims a cleanup has nothing to fail on. Returns the claim names.
async fn create_with_claims(
    run: &mut Run,
    knobs: &Knobs,
    names: &[String],
) -> anyhow::Result<Vec<String>> {
    run.create_objects(names.to_vec(), knobs.concurrency, 0.0)
        .await?;
    let set: HashSet<String> = names.iter().cloned().collect();
    run.wait_until(knobs.converge_timeout(), |run| run.conv.all_converged(&set))
        .await
        .context("the objects to delete did not converge")?;
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(run.env.client.clone(), &run.env.objects_ns.name);
    let claim_names: Vec<String> = names.iter().map(|n| format!("data-{n}-0")).collect();
    run.wait_until_async(knobs.converge_timeout(), async |_, _| {
        for claim in &claim_names {
            if !matches!(claims.get_opt(claim).await, Ok(Some(_))) {
                return false;
            }
        }
        true
    })
    .await
    .context("the claims of the objects to delete did not appear")?;
    Ok(claim_names)
}

/// Installs the outage and waits until deleting `probe_claim` is refused. Returns the
/// policy's name.
async fn begin_claim_deletion_outage(run: &Run, probe_claim: &str) -> anyhow::Result<String> {
    let (policy, manifest) = claim_deletion_outage(&run.env.objects_ns.name);
    let output = run
        .env
        .cluster
        .kubectl_with_input(&["apply", "-f", "-"], &manifest.to_string())?;
    anyhow::ensure!(output.status.success(), "installing the outage: {output:?}");
    for _ in 0..150 {
        if claim_deletion_refused(run, probe_claim).await {
            return Ok(policy);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("the claim deletion policy never took effect")
}

/// Creates `others` at CREATE_RATE, waits for them, changes each once and waits again.
async fn create_and_change(run: &mut Run, knobs: &Knobs, others: &[String]) -> anyhow::Result<()> {
    run.create_objects(others.to_vec(), knobs.concurrency, knobs.create_rate)
        .await?;
    let set: HashSet<String> = others.iter().cloned().collect();
    run.wait_until(knobs.converge_timeout(), |run| run.conv.all_converged(&set))
        .await
        .context("the other objects did not converge during the outage")?;
    change_specs(run, others, 1, knobs.concurrency).await?;
    run.wait_until(knobs.converge_timeout(), |run| run.conv.all_converged(&set))
        .await
        .context("the other objects' changes did not converge during the outage")?;
    Ok(())
}

/// Keeps the outage on until SLOW_DELAY has passed and at least one stuck cleanup has
/// retried long enough to be judged ([`judgeable`]), or [`MAX_OUTAGE`] has passed: a
/// quick machine converges the others early, and an outage that ended with the fifth
/// attempt of doubling delays (about 16 s in) still ahead judged nothing. Returns the
/// refused cleanups so far.
async fn hold_outage(
    run: &mut Run,
    knobs: &Knobs,
    outage_started: Instant,
    outage_since: Timestamp,
) -> anyhow::Result<BTreeMap<String, Vec<Attempt>>> {
    loop {
        let attempts = refused_cleanups(run, outage_since)?;
        let elapsed = outage_started.elapsed();
        if elapsed >= MAX_OUTAGE
            || (elapsed >= knobs.slow_delay && attempts.values().any(|t| judgeable(t)))
        {
            return Ok(attempts);
        }
        let next_look = Instant::now() + Duration::from_secs(1);
        while Instant::now() < next_look {
            run.sample().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Deletes the outage's policy and waits until every object in `stuck` is gone. Returns
/// the seconds that took, `None` on timeout.
async fn end_claim_deletion_outage(
    run: &mut Run,
    knobs: &Knobs,
    policy: &str,
    stuck: &[String],
) -> anyhow::Result<Option<f64>> {
    let output = run.env.cluster.kubectl(&[
        "delete",
        "validatingadmissionpolicybinding,validatingadmissionpolicy",
        policy,
    ])?;
    anyhow::ensure!(output.status.success(), "ending the outage: {output:?}");
    let api = run.api();
    Ok(run
        .wait_until_async(knobs.converge_timeout(), async |_, _| {
            for name in stuck {
                if !matches!(api.get_opt(name).await, Ok(None)) {
                    return false;
                }
            }
            true
        })
        .await)
}

/// `cleanupdep`: the finalizer cleanup's dependency is down. SLOW_OBJECTS objects are
/// deleted while a ValidatingAdmissionPolicy refuses every claim deletion in the namespace;
/// meanwhile OBJECTS others are created at CREATE_RATE and then changed once. The outage
/// lasts until the others converged and at least SLOW_DELAY; then the policy goes and every
/// cleanup must finish.
pub async fn cleanupdep(knobs: &Knobs) -> anyhow::Result<Outcome> {
    let shards = knobs.first_shards();
    let (mut run, _, raw) = begin("cleanupdep", knobs).await?;
    let started = Instant::now();
    run.start_operator(shards, &[], &[]).await?;
    let stuck = names("gone", 0..knobs.slow_objects.max(1));
    let claim_names = create_with_claims(&mut run, knobs, &stuck).await?;
    let policy = begin_claim_deletion_outage(&run, &claim_names[0]).await?;

    let outage_started = Instant::now();
    let outage_since = Timestamp::now();
    let api = run.api();
    for name in &stuck {
        api.delete(name, &DeleteParams::default()).await?;
    }
    let (_, others) = fault_names(knobs, 0);
    create_and_change(&mut run, knobs, &others).await?;
    let others_done = run.t();
    let attempts = hold_outage(&mut run, knobs, outage_started, outage_since).await?;
    // Counts only objects that still exist: a cleanup that got through shows nothing.
    let condition_shown = cleanup_condition_shown(&run, &stuck).await;
    let outage_s = outage_started.elapsed().as_secs_f64();
    let recovery = end_claim_deletion_outage(&mut run, knobs, &policy, &stuck).await?;

    let others_set: HashSet<String> = others.iter().cloned().collect();
    let lags = run.conv.lags_of(&others_set);
    let retries = StuckRetries::of(&attempts);
    let mut report = report(
        "cleanupdep",
        knobs,
        &[shards],
        started.elapsed().as_secs_f64(),
        raw,
    );
    report
        .set("stuck_objects", stuck.len())
        .set("outage_s", outage_s)
        .set("create_rate", knobs.create_rate)
        .set("others_lag_p50_s", quantile(&lags, 0.5))
        .set("others_lag_p99_s", quantile(&lags, 0.99))
        .set("others_converged_at_s", others_done)
        .set("cleanup_condition_shown", condition_shown)
        .set("stuck_cleanup_attempts_max", retries.attempts_max)
        .set("stuck_cleanup_attempts_total", retries.attempts_total)
        .set(
            "stuck_cleanup_attempts_over_allowed_max",
            retries.over_allowed_max,
        )
        .set("stuck_cleanup_gap_growth_median", retries.growth_median)
        .set("stuck_cleanup_gap_growth_min", retries.growth_min)
        .set("stuck_cleanups_judged", retries.judged)
        .set("cleanup_recovery_s", recovery.unwrap_or(f64::NAN))
        .set("cleanups_finished", recovery.is_some())
        .set("processes", run.process_table());
    draw(&run, knobs, "cleanupdep")?;
    run.finish();
    Ok(Outcome {
        report,
        checks: vec![
            (
                "every stuck cleanup shows the Cleanup condition".into(),
                condition_shown == stuck.len(),
            ),
            (
                "no stuck cleanup retries faster than doubling delays allow".into(),
                retries.backs_off(),
            ),
            (
                "every cleanup finished once the dependency was back".into(),
                recovery.is_some(),
            ),
        ],
    })
}

/// The refused cleanup attempts of the stuck objects, summed up.
struct StuckRetries {
    attempts_max: usize,
    attempts_total: usize,
    /// The largest ratio of an object's attempts to the [`retries_allowed`] in their span,
    /// over the objects whose attempts span [`MIN_JUDGED_SPAN_S`] or more.
    over_allowed_max: f64,
    /// The median [`gap_growth`] over the objects with enough attempts to tell.
    growth_median: f64,
    /// The smallest.
    growth_min: f64,
    /// How many objects had enough attempts to tell.
    judged: usize,
}

impl StuckRetries {
    fn of(attempts: &BTreeMap<String, Vec<Attempt>>) -> Self {
        for (name, tries) in attempts {
            tracing::info!(object = %name, waits_s = ?waits(tries), "stuck cleanup attempts");
        }
        let growths: Vec<f64> = attempts.values().filter_map(|t| gap_growth(t)).collect();
        let over_allowed: Vec<f64> = attempts
            .values()
            .filter(|t| judgeable(t))
            .map(|t| t.len() as f64 / retries_allowed(span_s(t)) as f64)
            .collect();
        Self {
            attempts_max: attempts.values().map(Vec::len).max().unwrap_or(0),
            attempts_total: attempts.values().map(Vec::len).sum(),
            over_allowed_max: over_allowed.iter().copied().fold(0.0, f64::max),
            growth_median: quantile(&growths, 0.5),
            growth_min: growths.iter().copied().fold(f64::INFINITY, f64::min),
            judged: over_allowed.len(),
        }
    }

    /// A requeue storm (an immediate retry, or a fixed poll) makes attempts faster than
    /// doubling delays allow; backoff never does. Counting attempts against that bound is
    /// immune to what a loaded API server does to single waits: the worker's next pass may
    /// wait seconds for its client or a free reconcile slot, which stretched single waits
    /// from 1 s to 9.4 s in CI runs and flattened the growth of the waits ([`gap_growth`])
    /// below 2 for doubling delays, but a stretched wait only ever means fewer attempts. At
    /// least one stuck object must have retried long enough to tell.
    fn backs_off(&self) -> bool {
        self.judged > 0 && self.over_allowed_max <= 1.0
    }
}

/// Whether `attempts` span long enough ([`MIN_JUDGED_SPAN_S`]) to tell a poll from
/// doubling delays.
fn judgeable(attempts: &[Attempt]) -> bool {
    span_s(attempts) >= MIN_JUDGED_SPAN_S
}

/// Seconds from the first attempt's start to the last one's.
fn span_s(attempts: &[Attempt]) -> f64 {
    let starts = attempts.iter().map(|attempt| attempt.start);
    match (starts.clone().min(), starts.max()) {
        (Some(first), Some(last)) => last.duration_since(first).as_secs_f64(),
        _ => 0.0,
    }
}

/// The most attempts a stuck cleanup backing off may make within `span_s` seconds of its
/// first: delays from [`BACKOFF_BASE_S`] doubling (less 10 % jitter) fit `m` retries into
/// `0.9 × base × (2^m − 1)` seconds, plus the first attempt and the
/// [`EVENT_TRIGGERED_ATTEMPTS`]. A 1 s poll exceeds it once the span reaches 6 s (7
/// attempts against 6), a requeue storm at once.
fn retries_allowed(span_s: f64) -> usize {
    let scheduled = (span_s / (0.9 * BACKOFF_BASE_S) + 1.0).log2().floor();
    1 + scheduled as usize + EVENT_TRIGGERED_ATTEMPTS
}

/// How much the waits between `attempts` grew: the mean of the later half of the waits
/// over the mean of the earlier half. `None` with fewer than four attempts (three waits),
/// too few to tell. A reported figure, not the check: a loaded API server stretches single
/// waits by seconds, which can flatten the growth of doubling delays below 2 (halves less
/// often than the last wait alone, see [`StuckRetries::backs_off`]). A wait runs from the
/// end of one attempt to the start of the next, so the time a pass spends in its own
/// requests does not flatten the growth.
fn gap_growth(attempts: &[Attempt]) -> Option<f64> {
    let gaps = waits(attempts);
    if gaps.len() < 3 {
        return None;
    }
    let (earlier, later) = gaps.split_at(gaps.len() / 2);
    let mean = |waits: &[f64]| waits.iter().sum::<f64>() / waits.len() as f64;
    let (earlier, later) = (mean(earlier), mean(later));
    Some(if earlier > 0.0 {
        later / earlier
    } else {
        f64::INFINITY
    })
}

/// The waits between `attempts` in order: from the end of one to the start of the next.
fn waits(attempts: &[Attempt]) -> Vec<f64> {
    let mut sorted = attempts.to_vec();
    sorted.sort_by_key(|attempt| attempt.start);
    sorted
        .windows(2)
        .map(|pair| {
            pair[1]
                .start
                .duration_since(pair[0].end)
                .as_secs_f64()
                .max(0.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(seconds: f64) -> Timestamp {
        Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_secs_f64(seconds)
    }

    /// Attempts that take no time, starting at `seconds`.
    fn at(seconds: &[f64]) -> Vec<Attempt> {
        seconds
            .iter()
            .map(|s| Attempt {
                start: time(*s),
                end: time(*s),
            })
            .collect()
    }

    /// Attempts waiting `waits` after one another, each taking `pass` seconds.
    fn passes(waits: &[f64], pass: f64) -> Vec<Attempt> {
        let mut start = 0.0;
        let mut attempts = vec![];
        for wait in std::iter::once(&0.0).chain(waits) {
            start += wait;
            attempts.push(Attempt {
                start: time(start),
                end: time(start + pass),
            });
            start += pass;
        }
        attempts
    }

    #[test]
    fn doubling_delays_grow_however_long_each_pass_takes() {
        // A loaded API server: every pass spends 3 s in its own requests (counted from
        // one attempt's start to the next, the growth would be 7 / 4).
        let growth = gap_growth(&passes(&[0.5, 1.0, 2.0, 4.0], 3.0)).unwrap();
        assert!(growth >= MIN_GAP_GROWTH, "{growth}");
        let polled = gap_growth(&passes(&[1.0, 1.0, 1.0, 1.0], 3.0)).unwrap();
        assert!(polled < MIN_GAP_GROWTH, "{polled}");
    }

    #[test]
    fn doubling_delays_grow() {
        // 0.5 s base, ±10 % jitter, in the order the audit log may list them.
        let growth = gap_growth(&at(&[3.6, 0.0, 0.45, 1.5, 7.3])).unwrap();
        assert!(growth >= MIN_GAP_GROWTH, "{growth}");
    }

    #[test]
    fn doubling_delays_grow_when_the_api_server_stretches_one_wait() {
        // A smoke run on a loaded API server: the third wait was due after 2 s and came
        // after 6 s. The last wait over the median of the earlier ones was 1.72.
        let growth = gap_growth(&at(&[0.0, 0.1, 2.6, 8.6, 12.9])).unwrap();
        assert!(growth >= MIN_GAP_GROWTH, "{growth}");
    }

    /// Objects whose attempts wait `waits` after one another, each pass 0.2 s long.
    fn retries_of(objects: &[&[f64]]) -> StuckRetries {
        let attempts: BTreeMap<String, Vec<Attempt>> = objects
            .iter()
            .enumerate()
            .map(|(i, waits)| (format!("gone-{i}"), passes(waits, 0.2)))
            .collect();
        StuckRetries::of(&attempts)
    }

    #[test]
    fn doubling_delays_pass_however_much_a_loaded_api_server_stretches_the_waits() {
        // Two CI runs on a loaded machine: in each, one object's waits grew too little.
        for run in [
            [
                &[0.106, 1.539, 6.256, 3.844, 8.214][..],
                &[0.158, 1.678, 2.507, 4.017, 8.426],
                &[0.284, 9.375, 2.196, 5.619],
            ],
            [
                &[0.495, 7.721, 2.615, 4.697][..],
                &[0.405, 2.784, 6.379, 4.198, 7.500],
                &[0.771, 4.734, 3.370, 3.882, 8.214],
            ],
        ] {
            let retries = retries_of(&run);
            assert!(
                retries.growth_min < MIN_GAP_GROWTH,
                "{}",
                retries.growth_min
            );
            assert!(retries.backs_off(), "{}", retries.over_allowed_max);
            assert_eq!(retries.judged, 3);
        }
        // On a quiet machine.
        assert!(retries_of(&[&[0.05, 1.0, 2.0, 4.0, 8.0, 16.0]]).backs_off());
    }

    #[test]
    fn a_poll_or_a_storm_does_not_pass_for_backoff() {
        let one_second: Vec<f64> = vec![1.0; 12];
        assert!(!retries_of(&[&one_second]).backs_off(), "a 1 s poll");
        let storm: Vec<f64> = vec![0.01; 200];
        assert!(!retries_of(&[&storm]).backs_off(), "an immediate retry");
        let two_seconds: Vec<f64> = vec![2.0; 12];
        let retries = retries_of(&[&[0.05, 1.0, 2.0, 4.0, 8.0], &two_seconds]);
        assert!(!retries.backs_off(), "one object polling is enough to fail");
    }

    #[test]
    fn too_short_a_span_is_no_pass() {
        let retries = retries_of(&[&[0.5, 1.0, 2.0]]);
        assert_eq!(retries.judged, 0);
        assert!(!retries.backs_off());
    }

    #[test]
    fn doubling_delays_become_judgeable_with_the_fifth_attempt() {
        // A CI run's stuck cleanup when the outage ended after 9.3 s: four attempts,
        // 7.5 s apart, which judged nothing; the fifth is due about 8 s later.
        let four = passes(&[0.02, 1.1, 2.0, 4.4], 0.01);
        assert!(!judgeable(&four));
        let five = [0.02, 1.1, 2.0, 4.4, 8.1];
        assert!(judgeable(&passes(&five, 0.01)));
        assert!(retries_of(&[&five]).backs_off());
    }

    #[test]
    fn the_allowance_follows_doubling_delays() {
        // 0.45 s, 0.9 s, 1.8 s, 3.6 s (base less jitter) fit 4 retries into 6.75 s.
        assert_eq!(retries_allowed(6.8), 1 + 4 + EVENT_TRIGGERED_ATTEMPTS);
        assert_eq!(retries_allowed(6.7), 1 + 3 + EVENT_TRIGGERED_ATTEMPTS);
        assert_eq!(retries_allowed(0.0), 1 + EVENT_TRIGGERED_ATTEMPTS);
    }

    #[test]
    fn a_fixed_poll_with_stretched_waits_does_not_grow() {
        let growth = gap_growth(&at(&[0.0, 0.05, 1.05, 2.05, 6.05, 7.05, 8.05, 9.05, 12.55]));
        let growth = growth.unwrap();
        assert!(growth < MIN_GAP_GROWTH, "{growth}");
    }

    #[test]
    fn a_fixed_poll_does_not_grow() {
        let growth = gap_growth(&at(&[0.0, 1.0, 2.1, 3.0, 4.0, 5.05, 6.0, 7.0])).unwrap();
        assert!(growth < MIN_GAP_GROWTH, "{growth}");
    }

    #[test]
    fn a_capped_backoff_that_settled_into_a_poll_does_not_grow() {
        let growth = gap_growth(&at(&[0.0, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5])).unwrap();
        assert!(growth < MIN_GAP_GROWTH, "{growth}");
    }

    #[test]
    fn immediate_retries_do_not_grow() {
        let growth = gap_growth(&at(&[0.0, 0.01, 0.02, 0.03, 0.04])).unwrap();
        assert!(growth < MIN_GAP_GROWTH, "{growth}");
    }

    #[test]
    fn three_attempts_are_too_few_to_tell() {
        assert_eq!(gap_growth(&at(&[0.0, 0.5, 1.5])), None);
        assert_eq!(gap_growth(&at(&[0.0, 0.5])), None);
        assert_eq!(gap_growth(&at(&[])), None);
    }
}
