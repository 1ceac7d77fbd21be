//! Shard Lease I/O: acquire, renew, release and hand-back requests for the
//! `coordination.k8s.io/v1` Leases `shardop-shard-<i>`, a fence that every write checks, and
//! one watch over all shard Leases.
//!
//! The *judgement* (is a Lease held, expired, released; whose home shard is it) is
//! `crate::protocol::lease`; this module only reads and writes Lease objects.
//!
//! Why not kube-lease-manager: it exposes one `bool` watch channel per lease, polls every
//! lease separately, has no notion of a fencing deadline that a write can check
//! synchronously, and cannot carry our hand-back and retirement annotations. See
//! `docs/worker.md`.
//!
//! # Fencing
//!
//! [`LeaseGuard::is_valid`] is true until `sent + renew_deadline`, where `sent` is the
//! monotonic instant at which the last *successful* acquire/renew request was sent. The
//! request may have been applied by the server at any moment after `sent`, so the server's
//! `renewTime` is never earlier than `sent` by our clock (up to skew); other parties wait the
//! full `leaseDurationSeconds` after `renewTime`. The gap `lease_duration − renew_deadline`
//! absorbs clock-rate skew and the latency of one write in flight.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::ShardIndex;
use crate::names::OperatorNames;
use crate::protocol::lease::{LeaseSnapshot, LeaseState};
use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Timing and identity of a Lease holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Namespace of the shard Leases (the operator namespace).
    pub namespace: String,
    /// Holder identity written into `holderIdentity`: the pod name.
    pub identity: String,
    /// `leaseDurationSeconds`: how long others wait after `renewTime` before the Lease
    /// counts as expired. Whole seconds (the API field is an integer).
    pub lease_duration: Duration,
    /// How long after the last successful renew *send* this holder still writes.
    /// Must be less than `lease_duration`.
    pub renew_deadline: Duration,
    /// How often the holder renews.
    pub retry_period: Duration,
}

impl LeaseSettings {
    /// `leaseDurationSeconds` as written to the Lease: the lease duration rounded *up* to
    /// whole seconds (at least 1), so that others never wait less than this holder assumes.
    /// [`crate::ShardingSettings::validate`] only accepts whole seconds, where this is exact.
    pub fn lease_duration_seconds(&self) -> i32 {
        let rounded_up = self
            .lease_duration
            .as_secs()
            .saturating_add(u64::from(self.lease_duration.subsec_nanos() > 0));
        i32::try_from(rounded_up.max(1)).unwrap_or(i32::MAX)
    }
}

/// A failed Lease request.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API server rejected or did not answer a request.
    #[error("shard lease request failed: {0}")]
    Kube(#[from] kube::Error),
}

/// A write was refused because the shard's Lease is not (or no longer) held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the lease of shard {0} is not held: write skipped")]
pub struct LeaseLost(pub ShardIndex);

/// The fence of one held shard Lease. Cheap to clone; check it right before every write.
#[derive(Clone, Debug)]
pub struct LeaseGuard {
    inner: Arc<GuardInner>,
}

#[derive(Debug)]
struct GuardInner {
    shard: ShardIndex,
    valid_until: Mutex<Instant>,
    /// When a write for the shard was last given up while it may have been on the wire (its
    /// future dropped before the answer): the server may still apply it.
    abandoned_at: Mutex<Option<Instant>>,
    /// Cancelled once the guard is invalid for good (renew deadline passed, Lease taken by
    /// someone else, or released).
    lost: CancellationToken,
}

impl LeaseGuard {
    fn new(shard: ShardIndex, valid_until: Instant) -> Self {
        Self {
            inner: Arc::new(GuardInner {
                shard,
                valid_until: Mutex::new(valid_until),
                abandoned_at: Mutex::new(None),
                lost: CancellationToken::new(),
            }),
        }
    }

    /// A guard that is valid until `valid_until` and is never renewed; for tests of code
    /// that takes a guard.
    pub fn detached(shard: ShardIndex, valid_until: Instant) -> Self {
        Self::new(shard, valid_until)
    }

    /// The shard this guard fences.
    pub fn shard(&self) -> ShardIndex {
        self.inner.shard
    }

    /// The monotonic instant until which writes are allowed (if not lost earlier).
    pub fn valid_until(&self) -> Instant {
        *self
            .inner
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn extend(&self, until: Instant) {
        let mut valid_until = self
            .inner
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *valid_until = (*valid_until).max(until);
    }

    /// Whether this process may write for the shard right now.
    pub fn is_valid(&self) -> bool {
        !self.inner.lost.is_cancelled() && Instant::now() < self.valid_until()
    }

    /// `Ok` if [`Self::is_valid`], for use with `?` right before a write.
    pub fn check(&self) -> Result<(), LeaseLost> {
        if self.is_valid() {
            Ok(())
        } else {
            Err(LeaseLost(self.inner.shard))
        }
    }

    /// Completes once the guard has become invalid for good.
    pub fn cancelled(&self) -> WaitForCancellationFutureOwned {
        self.inner.lost.clone().cancelled_owned()
    }

    /// A token cancelled when the guard becomes invalid for good.
    pub fn token(&self) -> CancellationToken {
        self.inner.lost.child_token()
    }

    /// Completes as soon as [`Self::is_valid`] turns false: the guard is lost or released,
    /// or its deadline passes without a renew having moved it. A write in flight is
    /// abandoned at that instant (see `client`), however long the server takes.
    pub async fn invalidated(&self) {
        loop {
            let until = self.valid_until();
            tokio::select! {
                biased;
                () = self.inner.lost.cancelled() => return,
                () = tokio::time::sleep_until(until) => {}
            }
            if !self.is_valid() {
                return;
            }
        }
    }

    /// Records that a write may have been left on the wire just now: a request future
    /// dropped before its answer, or a controller aborted with its writes. Aborting does not
    /// un-send a request; the server may still apply it (see [`Self::abandoned_at`]).
    pub fn note_abandoned_write(&self) {
        let mut abandoned_at = self
            .inner
            .abandoned_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *abandoned_at = Some(Instant::now());
    }

    /// When a write for the shard was last abandoned while it may have been on the wire,
    /// if ever; the release of the Lease waits for it (see
    /// [`crate::protocol::failover::release_wait`]).
    pub fn abandoned_at(&self) -> Option<Instant> {
        *self
            .inner
            .abandoned_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the guard invalid for good.
    pub(crate) fn invalidate(&self) {
        self.inner.lost.cancel();
    }
}

/// Reads and writes shard Leases for one holder identity.
#[derive(Clone)]
pub struct ShardLeases {
    api: Api<Lease>,
    settings: Arc<LeaseSettings>,
    names: Arc<OperatorNames>,
}

impl ShardLeases {
    /// Lease I/O in `settings.namespace` through `client`. The client's user agent shows up
    /// in the audit log for every acquire, renew and release.
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self::for_operator(client, settings, OperatorNames::default())
    }

    /// Lease I/O for the shard Leases of operator `names` (`<operator>-shard-<i>`).
    pub fn for_operator(client: Client, settings: LeaseSettings, names: OperatorNames) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings: Arc::new(settings),
            names: Arc::new(names),
        }
    }

    /// The operator whose shard Leases these are.
    pub fn names(&self) -> &OperatorNames {
        &self.names
    }

    /// The holder settings.
    pub fn settings(&self) -> &LeaseSettings {
        &self.settings
    }

    /// Reads a shard Lease.
    pub async fn get(&self, shard: ShardIndex) -> Result<Option<Lease>, LeaseError> {
        Ok(self
            .api
            .get_opt(&self.names.shard_lease_name(shard))
            .await?)
    }

    /// Tries to acquire shard `shard`'s Lease, given `observed`, the caller's latest view of
    /// it (`None` = no Lease exists). Whether acquiring is allowed is the caller's
    /// judgement; this only makes the write conditional on `observed` being current (create
    /// fails if it exists, update carries `observed`'s resourceVersion). Losing that race
    /// returns `Ok(None)`.
    ///
    /// On success the Lease is renewed in the background until [`HeldLease::release`] or
    /// until renewing fails for `renew_deadline`.
    pub async fn acquire(
        &self,
        shard: ShardIndex,
        observed: Option<&Lease>,
    ) -> Result<Option<HeldLease>, LeaseError> {
        let sent = Instant::now();
        let now = MicroTime(jiff::Timestamp::now());
        let result = match observed {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.names.shard_lease_name(shard)),
                        namespace: Some(self.settings.namespace.clone()),
                        labels: Some(BTreeMap::from([(
                            self.names.shard_lease_label(),
                            shard.label_value(),
                        )])),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.settings.identity.clone()),
                        lease_duration_seconds: Some(self.settings.lease_duration_seconds()),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(observed) => {
                let mut lease = observed.clone();
                lease.metadata.managed_fields = None;
                lease
                    .labels_mut()
                    .insert(self.names.shard_lease_label(), shard.label_value());
                // A new holder starts without a pending hand-back request.
                lease
                    .annotations_mut()
                    .remove(&self.names.release_requested_annotation());
                let spec = lease.spec.get_or_insert_with(Default::default);
                let previous = spec.holder_identity.clone().filter(|h| !h.is_empty());
                if previous.as_deref() != Some(self.settings.identity.as_str()) {
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.holder_identity = Some(self.settings.identity.clone());
                spec.lease_duration_seconds = Some(self.settings.lease_duration_seconds());
                spec.acquire_time = Some(now.clone());
                spec.renew_time = Some(now);
                self.api
                    .replace(
                        &self.names.shard_lease_name(shard),
                        &PostParams::default(),
                        &lease,
                    )
                    .await
            }
        };
        let lease = match result {
            Ok(lease) => lease,
            Err(err) if is_conflict(&err) => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        let guard = LeaseGuard::new(shard, sent + self.settings.renew_deadline);
        let stop = CancellationToken::new();
        let task = tokio::spawn(renew_loop(self.clone(), lease, guard.clone(), stop.clone()));
        tracing::info!(%shard, identity = %self.settings.identity, "acquired shard lease");
        Ok(Some(HeldLease {
            guard,
            stop,
            task: Some(task),
            leases: self.clone(),
        }))
    }

    /// Asks the holder of `observed` to release it by setting the
    /// `shardop.dev/release-requested-by` annotation to `by` (a merge patch with
    /// `observed`'s resourceVersion as precondition). Returns whether the patch applied.
    pub async fn request_release(
        &self,
        shard: ShardIndex,
        observed: &Lease,
        by: &str,
    ) -> Result<bool, LeaseError> {
        let patch = serde_json::json!({
            "metadata": {
                "resourceVersion": observed.resource_version(),
                "annotations": { self.names.release_requested_annotation(): by },
            }
        });
        match self
            .api
            .patch(
                &self.names.shard_lease_name(shard),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(err) if is_conflict(&err) || is_not_found(&err) => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    /// One renew: `renewTime = now` on top of `current`, conditional on its resourceVersion.
    async fn renew(&self, current: &Lease) -> Result<Lease, kube::Error> {
        let mut lease = current.clone();
        lease.metadata.managed_fields = None;
        let spec = lease.spec.get_or_insert_with(Default::default);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        spec.lease_duration_seconds = Some(self.settings.lease_duration_seconds());
        self.api
            .replace(&current.name_any(), &PostParams::default(), &lease)
            .await
    }

    /// Clears the holder of `current` (keeping `acquireTime`, so the shard still counts as
    /// acquired once), removes any hand-back request, and stamps `renewTime` with the
    /// release time so others can tell how long it has been released.
    async fn release_lease(&self, current: &Lease) -> Result<(), kube::Error> {
        let mut lease = current.clone();
        lease.metadata.managed_fields = None;
        lease
            .annotations_mut()
            .remove(&self.names.release_requested_annotation());
        let spec = lease.spec.get_or_insert_with(Default::default);
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        self.api
            .replace(&current.name_any(), &PostParams::default(), &lease)
            .await
            .map(drop)
    }

    fn holds(&self, lease: &Lease) -> bool {
        LeaseSnapshot::from_lease_of(lease, &self.names)
            .holder
            .as_deref()
            == Some(self.settings.identity.as_str())
    }
}

/// A shard Lease this process holds and renews in the background.
pub struct HeldLease {
    guard: LeaseGuard,
    stop: CancellationToken,
    task: Option<JoinHandle<Option<Lease>>>,
    leases: ShardLeases,
}

impl HeldLease {
    /// The shard.
    pub fn shard(&self) -> ShardIndex {
        self.guard.shard()
    }

    /// The fence to check before every write for this shard.
    pub fn guard(&self) -> LeaseGuard {
        self.guard.clone()
    }

    /// Whether the Lease has been lost (renew deadline passed or taken by someone else).
    pub fn is_lost(&self) -> bool {
        !self.guard.is_valid()
    }

    /// Stops renewing and releases the Lease, if it is still ours. The guard becomes invalid
    /// *before* the release is written, so no write for the shard can follow the release.
    /// Callers must have stopped (and waited for) their work for the shard first.
    pub async fn release(mut self) -> Result<(), LeaseError> {
        let shard = self.guard.shard();
        self.stop.cancel();
        let latest = match self.task.take() {
            Some(task) => task.await.ok().flatten(),
            None => None,
        };
        let still_valid = self.guard.is_valid();
        self.guard.invalidate();
        let Some(latest) = latest.filter(|_| still_valid) else {
            tracing::info!(%shard, "shard lease already lost, nothing to release");
            return Ok(());
        };
        let mut current = latest;
        // One retry on conflict: an annotation (hand-back request, retirement) may have
        // been added since our last renew.
        for _ in 0..2 {
            match self.leases.release_lease(&current).await {
                Ok(()) => {
                    tracing::info!(%shard, "released shard lease");
                    return Ok(());
                }
                Err(err) if is_conflict(&err) => match self.leases.get(shard).await? {
                    Some(fresh) if self.leases.holds(&fresh) && same_tenure(&current, &fresh) => {
                        current = fresh;
                    }
                    _ => return Ok(()),
                },
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        // Dropping without release stops renewing; the Lease then expires on its own.
        self.stop.cancel();
        self.guard.invalidate();
    }
}

/// Renews every `retry_period` until stopped (returns the latest Lease object) or until the
/// renew deadline passes / someone else holds the Lease (returns `None`).
async fn renew_loop(
    leases: ShardLeases,
    mut latest: Lease,
    guard: LeaseGuard,
    stop: CancellationToken,
) -> Option<Lease> {
    let shard = guard.shard();
    let settings = leases.settings.clone();
    let mut next = Instant::now() + settings.retry_period;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return Some(latest),
            () = tokio::time::sleep_until(guard.valid_until()) => {
                tracing::warn!(%shard, "shard lease not renewed within the renew deadline, giving it up");
                guard.invalidate();
                return None;
            }
            () = tokio::time::sleep_until(next) => {}
        }
        let sent = Instant::now();
        next = sent + settings.retry_period;
        // Bounded by the fence: a renew still in flight at the deadline is abandoned so the
        // loop can give the Lease up on time. A stop abandons it too: the release waits for
        // this loop, and a hand-back must not wait out a slow renew (the release is written
        // from a fresh read if this renew landed after all).
        let renewed = tokio::select! {
            biased;
            () = stop.cancelled() => return Some(latest),
            renewed = tokio::time::timeout_at(guard.valid_until(), leases.renew(&latest)) => renewed,
        };
        let Ok(renewed) = renewed else { continue };
        match renewed {
            Ok(renewed) => {
                latest = renewed;
                guard.extend(sent + settings.renew_deadline);
            }
            Err(err) if is_conflict(&err) => {
                // Someone wrote the Lease: a hand-back request, retirement, or a new holder.
                let fresh = tokio::select! {
                    biased;
                    () = stop.cancelled() => return Some(latest),
                    fresh = tokio::time::timeout_at(guard.valid_until(), leases.get(shard)) => fresh,
                };
                // Timed out at the deadline: the top of the loop gives the Lease up.
                let Ok(fresh) = fresh else { continue };
                match fresh {
                    Ok(Some(fresh)) if leases.holds(&fresh) && same_tenure(&latest, &fresh) => {
                        latest = fresh;
                        next = Instant::now();
                    }
                    Ok(_) => {
                        tracing::warn!(%shard, "shard lease is held by someone else now");
                        guard.invalidate();
                        return None;
                    }
                    Err(err) => tracing::warn!(%shard, %err, "reading the shard lease failed"),
                }
            }
            Err(err) if is_not_found(&err) => {
                tracing::warn!(%shard, "shard lease was deleted");
                guard.invalidate();
                return None;
            }
            Err(err) => tracing::warn!(%shard, %err, "renewing the shard lease failed, retrying"),
        }
    }
}

/// Whether `fresh` is still the tenure this process acquired as `held`: the same
/// `acquireTime`. A hand-back request or a retirement changes the Lease but not that; an
/// acquisition under the same identity does, by another process of the same name (a pod
/// force-deleted and started again while the old one still runs), which must not be
/// taken for our own: both would keep renewing and writing.
fn same_tenure(held: &Lease, fresh: &Lease) -> bool {
    let acquired = |lease: &Lease| lease.spec.as_ref().and_then(|s| s.acquire_time.clone());
    acquired(held) == acquired(fresh)
}

/// A write that lost a race: an update on a stale resourceVersion (409 Conflict) or a
/// create of a Lease someone created meanwhile (409 AlreadyExists, which kube's
/// reason-based `is_conflict` does not count as a conflict).
fn is_conflict(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.is_conflict() || status.is_already_exists())
}

fn is_not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.is_not_found())
}

/// A cache of every shard Lease in a namespace, kept current by one watch with the
/// selector `shardop.dev/shard-lease`. Cheap to clone.
#[derive(Clone)]
pub struct ShardLeaseWatch {
    store: Store<Lease>,
    namespace: String,
    names: Arc<OperatorNames>,
    changes: watch::Receiver<u64>,
    /// Cancelled once the initial list is in the store. Used instead of
    /// `Store::wait_until_ready`, which wakes only one of several concurrent waiters.
    ready: CancellationToken,
}

/// Starts watching the shard Leases of `namespace`. The returned future drives the watch
/// (with kube-runtime's default backoff on errors) and must be spawned or polled.
pub fn watch_shard_leases(
    client: Client,
    namespace: &str,
    streaming_lists: bool,
) -> (ShardLeaseWatch, BoxFuture<'static, ()>) {
    watch_operator_shard_leases(client, namespace, streaming_lists, OperatorNames::default())
}

/// [`watch_shard_leases`] for the shard Leases of operator `names` (selector
/// `<prefix>/shard-lease`).
pub fn watch_operator_shard_leases(
    client: Client,
    namespace: &str,
    streaming_lists: bool,
    names: OperatorNames,
) -> (ShardLeaseWatch, BoxFuture<'static, ()>) {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let mut config = watcher::Config::default().labels(&names.shard_lease_label());
    if streaming_lists {
        config = config.streaming_lists();
    }
    let (store, writer) = reflector::store();
    let (tx, rx) = watch::channel(0_u64);
    let ready = CancellationToken::new();
    let ready_signal = ready.clone();
    let driver = reflector::reflector(writer, watcher(api, config))
        .default_backoff()
        .for_each(move |event| {
            match event {
                Ok(event) => {
                    if matches!(event, watcher::Event::InitDone) {
                        ready_signal.cancel();
                    }
                    tx.send_modify(|n| *n = n.wrapping_add(1));
                }
                Err(err) => crate::reachability::log_watch_error("shard leases", &err),
            }
            futures::future::ready(())
        });
    (
        ShardLeaseWatch {
            store,
            namespace: namespace.to_owned(),
            names: Arc::new(names),
            changes: rx,
            ready,
        },
        Box::pin(driver),
    )
}

impl ShardLeaseWatch {
    /// Waits until the initial list has been received. Any number of tasks may wait.
    pub async fn wait_until_ready(&self) {
        self.ready.cancelled().await;
    }

    /// Whether the initial list has been received.
    pub fn is_ready(&self) -> bool {
        self.ready.is_cancelled()
    }

    /// Completes when any shard Lease changed since the last call (or the watch restarted).
    pub async fn changed(&mut self) {
        if self.changes.changed().await.is_err() {
            // The driver is gone; never complete rather than spin.
            futures::future::pending::<()>().await;
        }
    }

    /// The Lease of `shard`, if it exists.
    pub fn get(&self, shard: ShardIndex) -> Option<Arc<Lease>> {
        self.store
            .get(&ObjectRef::new(&self.names.shard_lease_name(shard)).within(&self.namespace))
    }

    /// The protocol snapshot of `shard`'s Lease, if it exists.
    pub fn snapshot(&self, shard: ShardIndex) -> Option<LeaseSnapshot> {
        self.get(shard)
            .map(|l| LeaseSnapshot::from_lease_of(&l, &self.names))
    }

    /// The state of `shard`'s Lease at wall-clock time `now`.
    pub fn state(&self, shard: ShardIndex, now: jiff::Timestamp) -> LeaseState {
        LeaseState::of(self.snapshot(shard).as_ref(), now)
    }

    /// Every shard Lease, by shard index (Leases whose name is not a shard Lease name are
    /// skipped).
    pub fn all(&self) -> BTreeMap<ShardIndex, Arc<Lease>> {
        self.store
            .state()
            .into_iter()
            .filter_map(|lease| Some((self.names.shard_of_lease(&lease.name_any())?, lease)))
            .collect()
    }

    /// The shards whose Lease is live at `now`.
    pub fn live_shards(&self, now: jiff::Timestamp) -> BTreeSet<ShardIndex> {
        self.all()
            .into_iter()
            .filter(|(_, lease)| {
                LeaseSnapshot::from_lease_of(lease, &self.names)
                    .state(now)
                    .is_live()
            })
            .map(|(shard, _)| shard)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_create_that_finds_the_lease_and_a_stale_update_both_lost_a_race() {
        let status = |code: u16, reason: &str| {
            let mut status = kube::core::Status::failure("lost", reason);
            status.code = code;
            kube::Error::Api(Box::new(status))
        };
        assert!(is_conflict(&status(409, "AlreadyExists")));
        assert!(is_conflict(&status(409, "Conflict")));
        assert!(!is_conflict(&status(404, "NotFound")));
        assert!(!is_conflict(&status(403, "Forbidden")));
        assert!(is_not_found(&status(404, "NotFound")));
    }

    #[tokio::test(start_paused = true)]
    async fn guard_is_valid_until_its_deadline() {
        let guard = LeaseGuard::new(ShardIndex(1), Instant::now() + Duration::from_secs(10));
        assert!(guard.is_valid());
        assert_eq!(guard.check(), Ok(()));
        tokio::time::advance(Duration::from_secs(5)).await;
        guard.extend(Instant::now() + Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(guard.is_valid(), "extended by the renew");
        // Extending never moves the deadline backwards.
        guard.extend(Instant::now());
        assert!(guard.is_valid());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(guard.check(), Err(LeaseLost(ShardIndex(1))));
    }

    #[tokio::test]
    async fn invalidation_is_final_and_observable() {
        let guard = LeaseGuard::new(ShardIndex(0), Instant::now() + Duration::from_secs(60));
        let token = guard.token();
        let cancelled = guard.cancelled();
        guard.invalidate();
        cancelled.await;
        assert!(token.is_cancelled());
        assert!(!guard.is_valid());
        guard.extend(Instant::now() + Duration::from_secs(60));
        assert!(!guard.is_valid(), "a lost guard stays lost");
    }

    #[tokio::test(start_paused = true)]
    async fn invalidated_follows_renewals_and_completes_at_the_deadline() {
        let start = Instant::now();
        let guard = LeaseGuard::new(ShardIndex(2), start + Duration::from_secs(4));
        let renewer = guard.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            renewer.extend(Instant::now() + Duration::from_secs(4));
        });
        guard.invalidated().await;
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(7),
            "the renewed deadline"
        );

        let lost = LeaseGuard::new(ShardIndex(2), Instant::now() + Duration::from_secs(60));
        let waiter = tokio::spawn({
            let lost = lost.clone();
            async move { lost.invalidated().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        lost.invalidate();
        waiter.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(8), "at once when lost");
    }

    #[test]
    fn lease_duration_is_whole_seconds() {
        let settings = LeaseSettings {
            namespace: "ns".into(),
            identity: "w-0".into(),
            lease_duration: Duration::from_millis(500),
            renew_deadline: Duration::from_millis(300),
            retry_period: Duration::from_millis(100),
        };
        assert_eq!(settings.lease_duration_seconds(), 1);
        let settings = LeaseSettings {
            lease_duration: Duration::from_millis(10_500),
            ..settings
        };
        assert_eq!(settings.lease_duration_seconds(), 11, "never shorter");
    }

    /// Worker `w-0`'s settings with the production Lease timings (15 s / 10 s / 2 s).
    fn production_timings() -> LeaseSettings {
        LeaseSettings {
            namespace: "ns".into(),
            identity: "w-0".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// An API server that never answers.
    #[derive(Clone)]
    struct Unanswered;

    impl tower::Service<http::Request<kube::client::Body>> for Unanswered {
        type Response = http::Response<kube::client::Body>;
        type Error = tower::BoxError;
        type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<kube::client::Body>) -> Self::Future {
            Box::pin(futures::future::pending())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_abandons_a_renew_in_flight() {
        let settings = production_timings();
        let leases = ShardLeases::new(Client::new(Unanswered, "ns"), settings);
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(ShardIndex(0).lease_name()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("w-0".into()),
                ..Default::default()
            }),
        };
        let guard = LeaseGuard::new(ShardIndex(0), Instant::now() + Duration::from_secs(10));
        let stop = CancellationToken::new();
        let task = tokio::spawn(renew_loop(leases, lease, guard, stop.clone()));
        // The renew sent at 2 s hangs.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let stopped = Instant::now();
        stop.cancel();
        let latest = task.await.unwrap();
        assert!(
            latest.is_some(),
            "a stopped loop hands back its latest Lease"
        );
        assert!(
            stopped.elapsed() < Duration::from_secs(1),
            "the release waited {:?} for a renew in flight",
            stopped.elapsed()
        );
    }

    /// An API server holding one Lease that another process under our identity acquired
    /// after us: every write conflicts, every read shows the newer tenure. After a few
    /// requests it stops answering, so a loop that adopts the Lease again and again waits
    /// instead of spinning.
    fn reacquired_under_our_name(lease: Lease) -> Client {
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let lease = lease.clone();
            let seen = requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if seen >= 4 {
                    futures::future::pending::<()>().await;
                }
                let (status, body) = if request.method() == http::Method::GET {
                    (http::StatusCode::OK, serde_json::to_vec(&lease).unwrap())
                } else {
                    let conflict = serde_json::json!({
                        "apiVersion": "v1", "kind": "Status", "status": "Failure",
                        "reason": "Conflict", "code": 409, "message": "the object has been modified",
                    });
                    (
                        http::StatusCode::CONFLICT,
                        serde_json::to_vec(&conflict).unwrap(),
                    )
                };
                let mut response = http::Response::new(kube::client::Body::from(body));
                *response.status_mut() = status;
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        Client::new(service, "ns")
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_acquired_again_under_our_name_is_lost_not_adopted() {
        let held_since = |seconds: i64| Lease {
            metadata: ObjectMeta {
                name: Some(ShardIndex(0).lease_name()),
                namespace: Some("ns".into()),
                resource_version: Some("1".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("w-0".into()),
                acquire_time: Some(MicroTime(jiff::Timestamp::from_second(seconds).unwrap())),
                ..Default::default()
            }),
        };
        let settings = production_timings();
        // The pod was force-deleted and its successor acquired the Lease at t = 200 s.
        let leases = ShardLeases::new(reacquired_under_our_name(held_since(200)), settings);
        let guard = LeaseGuard::new(ShardIndex(0), Instant::now() + Duration::from_secs(10));
        let task = tokio::spawn(renew_loop(
            leases,
            held_since(100),
            guard.clone(),
            CancellationToken::new(),
        ));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!guard.is_valid(), "the old process stops writing at once");
        assert!(
            task.await.unwrap().is_none(),
            "and does not release the successor's Lease"
        );
        assert!(same_tenure(&held_since(100), &held_since(100)));
    }
}
