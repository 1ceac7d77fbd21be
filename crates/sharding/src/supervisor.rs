//! The runtime's main loop: which shards this process serves. It acquires its home shard's
//! Lease, takes over expired shards of dead workers, hands taken-over shards back on
//! request, starts the user's controller (through a [`ShardScope`]) for every held Lease and
//! stops it when the Lease is lost, and on shutdown stops everything and releases every
//! Lease.
//!
//! The decisions are in [`crate::protocol::failover`]; this module only observes (one watch
//! over all shard Leases) and acts. The watch is a hint: every Lease write it suggests
//! (acquire, hand-back request) is decided again on a fresh read of that Lease, and retried
//! from a fresh read when it loses a race (409), so a worker that was frozen or slow never
//! writes from a stale view. Each served shard's scope gets a client fenced by that
//! acquisition's [`LeaseGuard`](crate::LeaseGuard).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::heartbeat::{Heartbeat, Report};
use crate::lease::{HeldLease, ShardLeaseWatch, ShardLeases, watch_operator_shard_leases};
use crate::protocol::LeaseSnapshot;
use crate::protocol::failover::{self, Acquisition, LEASE_WRITE_ATTEMPTS, Me, StopReason};
use crate::scope::{ScopeParts, ShardScope};
use crate::shard::Shard;
use crate::shard_index::ShardIndex;
use crate::sharding::{Clients, Runtime, ShardingError};
use crate::step_retry::StepRetry;

/// The user's controller for one shard, started for every acquisition.
pub(crate) type Serve =
    Arc<dyn Fn(ShardScope) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// A shard this process serves.
struct Served {
    lease: HeldLease,
    scope: ShardScope,
    task: JoinHandle<()>,
    heartbeat: Heartbeat,
    shards: Api<Shard>,
}

impl Served {
    /// Stops the shard's controller: asks it to stop, lets it finish for up to `grace`,
    /// then aborts it. Returns whether it stopped in time.
    async fn stop(&mut self, grace: Duration) -> bool {
        let shard = self.scope.shard();
        self.scope.request_stop();
        let clean = match tokio::time::timeout(grace, &mut self.task).await {
            Ok(_) => true,
            // A zero grace (the Lease is lost: the fence already refuses every write) aborts
            // at once; that is the plan, not a reconcile that overran.
            Err(_) if grace.is_zero() => {
                tracing::debug!(%shard, "aborting in-flight reconciles: no grace");
                self.abort().await;
                false
            }
            Err(_) => {
                tracing::warn!(%shard, ?grace, "in-flight reconciles did not finish in time, aborting them");
                self.abort().await;
                false
            }
        };
        tracing::info!(%shard, clean, "shard controller stopped");
        clean
    }

    /// Aborts the controller. Its writes on the wire are not un-sent by that: the guard
    /// records an abandoned write, which delays the release (see [`release`]).
    async fn abort(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        self.lease.guard().note_abandoned_write();
    }
}

/// Releases `lease` once no write abandoned for its shard can still land (see
/// [`failover::release_wait`]), bounded like every Lease write of the supervisor: a
/// release that does not finish within the lease duration is given up, and the Lease, no
/// longer renewed, expires.
async fn release(lease: HeldLease, runtime: &Runtime) -> Result<(), ShardingError> {
    let shard = lease.shard();
    let settings = &runtime.settings;
    let since_abandoned = lease.guard().abandoned_at().map(|at| at.elapsed());
    let wait = failover::release_wait(
        since_abandoned,
        settings.lease_duration,
        settings.renew_deadline,
    );
    if !wait.is_zero() {
        tracing::info!(%shard, ?wait, "a write of the stopped controller may still land: releasing the shard lease after the fencing margin");
        tokio::time::sleep(wait).await;
    }
    match tokio::time::timeout(settings.lease_duration, lease.release()).await {
        Ok(released) => Ok(released?),
        Err(_) => {
            tracing::warn!(%shard, "releasing the shard lease did not finish within the lease duration; it expires instead");
            Ok(())
        }
    }
}

/// Lease I/O acting as each shard, created on first use.
struct ShardClients {
    clients: Clients,
    runtime: Arc<Runtime>,
    leases: HashMap<ShardIndex, ShardLeases>,
}

impl ShardClients {
    /// Lease I/O acting as `shard`, on the Lease budget.
    fn leases(&mut self, shard: ShardIndex) -> Result<ShardLeases, ShardingError> {
        if let Some(leases) = self.leases.get(&shard) {
            return Ok(leases.clone());
        }
        let client = self.clients.lease_client(&self.runtime.agent(shard))?;
        let leases = ShardLeases::for_operator(
            client,
            self.runtime.settings.lease_settings(),
            self.runtime.settings.names.clone(),
        );
        self.leases.insert(shard, leases.clone());
        Ok(leases)
    }
}

/// The supervisor of one process.
pub(crate) struct Supervisor {
    pub runtime: Arc<Runtime>,
    pub clients: Clients,
    pub serve: Serve,
}

impl Supervisor {
    /// Runs until `shutdown` is cancelled, then stops every controller and releases every
    /// Lease.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ShardingError> {
        let settings = &self.runtime.settings;
        let watch_client = self.clients.lease_client(&self.runtime.leases_agent())?;
        let (mut watch, driver) = watch_operator_shard_leases(
            watch_client,
            &settings.namespace,
            self.runtime.streaming_lists,
            settings.names.clone(),
        );
        let driver = tokio::spawn(driver);
        let mut clients = ShardClients {
            clients: self.clients.clone(),
            runtime: self.runtime.clone(),
            leases: HashMap::new(),
        };
        tokio::select! {
            () = watch.wait_until_ready() => {}
            () = shutdown.cancelled() => {
                driver.abort();
                return Ok(());
            }
        }
        tracing::info!(home = %settings.home, identity = %settings.identity, "watching shard leases");

        let mut served: BTreeMap<ShardIndex, Served> = BTreeMap::new();
        let mut tick = tokio::time::interval(settings.retry_period.min(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = StepRetry::default();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = watch.changed() => {}
                _ = tick.tick() => {}
            }
            // Local work runs at every tick; steps that talk to the API server wait out
            // the backoff while it is unreachable.
            self.stop_lost(&mut served).await;
            if retry.is_due(tokio::time::Instant::now(), self.clients.is_reachable()) {
                match self.step(&watch, &mut clients, &mut served).await {
                    Ok(()) => retry.succeeded(),
                    Err(err) => {
                        retry.failed(&err, tokio::time::Instant::now());
                    }
                }
            }
            self.publish_readiness(&watch, &served);
        }
        self.shut_down(served).await;
        driver.abort();
        Ok(())
    }

    /// Graceful shutdown: stop taking work, finish in flight, release.
    async fn shut_down(&self, served: BTreeMap<ShardIndex, Served>) {
        self.runtime.set_ready(false);
        tracing::info!(
            shards = served.len(),
            "shutting down: stopping controllers and releasing leases"
        );
        let grace = self.stop_grace(StopReason::Shutdown);
        let stops = served.into_values().map(|mut s| {
            let runtime = &self.runtime;
            async move {
                let shard = s.lease.shard();
                s.stop(grace).await;
                if let Err(err) = release(s.lease, runtime).await {
                    tracing::warn!(%shard, error = %err, "releasing the shard lease failed");
                }
                runtime.metrics.forget_shard(shard);
            }
        });
        futures::future::join_all(stops).await;
    }

    fn me(&self) -> Me<'_> {
        let settings = &self.runtime.settings;
        Me {
            identity: &settings.identity,
            home: settings.home,
            lease_duration: settings.lease_duration,
            retry_period: settings.retry_period,
        }
    }

    fn stop_grace(&self, reason: StopReason) -> Duration {
        failover::stop_grace(reason, &self.me(), self.runtime.settings.shutdown_timeout)
    }

    fn snapshot(&self, lease: &Lease) -> LeaseSnapshot {
        LeaseSnapshot::from_lease_of(lease, &self.runtime.settings.names)
    }

    /// [`Self::snapshot`] of each Lease.
    fn snapshots(
        &self,
        leases: &BTreeMap<ShardIndex, Arc<Lease>>,
    ) -> BTreeMap<ShardIndex, LeaseSnapshot> {
        leases
            .iter()
            .map(|(shard, lease)| (*shard, self.snapshot(lease)))
            .collect()
    }

    /// One step: lost Leases, hand-back requests, acquisitions, then metrics and
    /// heartbeats.
    async fn step(
        &self,
        watch: &ShardLeaseWatch,
        clients: &mut ShardClients,
        served: &mut BTreeMap<ShardIndex, Served>,
    ) -> Result<(), ShardingError> {
        let leases = watch.all();
        self.stop_lost(served).await;
        self.release_requested(&leases, served).await?;
        self.acquire(&leases, clients, served).await?;
        self.report(served).await;
        Ok(())
    }

    /// Hand-back / retirement requests for shards we serve.
    async fn release_requested(
        &self,
        leases: &BTreeMap<ShardIndex, Arc<Lease>>,
        served: &mut BTreeMap<ShardIndex, Served>,
    ) -> Result<(), ShardingError> {
        let me = self.me();
        let to_release: Vec<ShardIndex> = served
            .keys()
            .copied()
            .filter(|shard| {
                let snapshot = leases.get(shard).map(|l| self.snapshot(l));
                failover::should_release(&me, *shard, snapshot.as_ref())
            })
            .collect();
        for shard in to_release {
            if let Some(mut s) = served.remove(&shard) {
                tracing::info!(%shard, "release requested: stopping the shard controller, then releasing its lease");
                s.stop(self.stop_grace(StopReason::HandBack)).await;
                release(s.lease, &self.runtime).await?;
                self.runtime.metrics.forget_shard(shard);
            }
        }
        Ok(())
    }

    /// Acquisitions: the home shards, and every known shard we do not serve.
    async fn acquire(
        &self,
        leases: &BTreeMap<ShardIndex, Arc<Lease>>,
        clients: &mut ShardClients,
        served: &mut BTreeMap<ShardIndex, Served>,
    ) -> Result<(), ShardingError> {
        let me = self.me();
        let now = jiff::Timestamp::now();
        let snapshots = self.snapshots(leases);
        let ring = worker_ring(&snapshots, me.home);
        let mut candidates: Vec<ShardIndex> = snapshots.keys().copied().collect();
        if !candidates.contains(&me.home) {
            candidates.push(me.home);
        }
        // Home shards first: they matter most and must not wait behind takeovers.
        candidates.sort_by_key(|s| (!failover::is_home(&me, *s, snapshots.get(s)), s.0));
        for shard in candidates {
            if served.contains_key(&shard) {
                continue;
            }
            let snapshot = snapshots.get(&shard);
            if failover::acquisition(&me, shard, snapshot, ring, now) == Acquisition::Wait {
                continue;
            }
            let lease_io = clients.leases(shard)?;
            // Bounded: a request stuck on a half-open connection must not hold up the
            // rest of the step (hand-backs, the home shard, heartbeats) for the client's
            // read timeout. A Lease acquired by a request we gave up on is never renewed
            // and simply expires; nothing is written for it without a guard.
            let attempt = tokio::time::timeout(
                self.runtime.settings.lease_duration,
                self.write_lease(&lease_io, shard, ring),
            )
            .await;
            let Ok(attempt) = attempt else {
                tracing::warn!(%shard, "shard lease request did not finish within the lease duration");
                continue;
            };
            let Some(held) = attempt? else {
                continue;
            };
            if !failover::is_home(&me, shard, snapshot) {
                tracing::warn!(%shard, "took over the shard of a worker that stopped renewing");
            }
            served.insert(shard, self.serve(held)?);
        }
        Ok(())
    }

    /// Metrics and heartbeats of every served shard. The heartbeats go out together and
    /// are given up after a retry period: they are reports, and one stuck behind the bulk
    /// budget or on a connection that never answers must not hold up the Lease handling
    /// (hand-backs, acquisitions, lost shards, shutdown) of the next steps.
    async fn report(&self, served: &mut BTreeMap<ShardIndex, Served>) {
        let runtime = &self.runtime;
        let heartbeats = served.iter_mut().map(|(shard, s)| {
            let load = s.scope.load();
            runtime.metrics.publish_load(*shard, &load);
            let report = Report {
                holder: runtime.settings.identity.clone(),
                queue_depth: load.queue_depth,
                backlog: load.backlog,
            };
            let guard = s.lease.guard();
            async move {
                s.heartbeat
                    .maybe_send(&s.shards, &runtime.settings.names, &guard, report)
                    .await;
            }
        });
        let all = futures::future::join_all(heartbeats);
        if tokio::time::timeout(runtime.settings.retry_period, all)
            .await
            .is_err()
        {
            tracing::warn!(
                "shard heartbeats did not finish within the retry period, given up until the next step"
            );
        }
    }

    /// Lost Leases (renew deadline passed, or someone else holds them): the fence has
    /// already stopped every write and cancelled those in flight; stop the controller. No
    /// API request.
    async fn stop_lost(&self, served: &mut BTreeMap<ShardIndex, Served>) {
        let lost: Vec<ShardIndex> = served
            .iter()
            .filter(|(_, s)| s.lease.is_lost())
            .map(|(shard, _)| *shard)
            .collect();
        for shard in lost {
            if let Some(mut s) = served.remove(&shard) {
                tracing::warn!(%shard, "shard lease lost, stopping its controller");
                s.stop(self.stop_grace(StopReason::LeaseLost)).await;
                drop(s.lease);
                self.runtime.metrics.forget_shard(shard);
            }
        }
    }

    /// Ready while every home shard is served with synced caches: the shard of the pod's
    /// ordinal, or those whose Leases name this worker home. Set after every tick, whether
    /// or not the step ran or failed.
    fn publish_readiness(&self, watch: &ShardLeaseWatch, served: &BTreeMap<ShardIndex, Served>) {
        let me = self.me();
        let snapshots = self.snapshots(&watch.all());
        let ready = home_shards(&me, &snapshots).iter().all(|shard| {
            served
                .get(shard)
                .is_some_and(|s| s.scope.is_synced() && !s.lease.is_lost())
        });
        self.runtime.set_ready(ready);
    }

    /// Starts serving a freshly acquired shard: the user's controller, through a scope
    /// whose client is fenced by this acquisition's guard.
    fn serve(&self, held: HeldLease) -> Result<Served, ShardingError> {
        let shard = held.shard();
        let runtime = &self.runtime;
        let client = self.clients.fenced(&runtime.agent(shard), held.guard())?;
        runtime.metrics.start_shard(shard);
        let scope = ShardScope::new(ScopeParts {
            shard,
            names: runtime.settings.names.clone(),
            strategy: runtime.strategy.clone(),
            client: client.clone(),
            guard: held.guard(),
            metrics: runtime.metrics.clone(),
            streaming_lists: runtime.streaming_lists,
        });
        let task = tokio::spawn((self.serve)(scope.clone()));
        tracing::info!(%shard, "shard controller started");
        Ok(Served {
            lease: held,
            scope,
            task,
            heartbeat: Heartbeat::default(),
            shards: Api::namespaced(client, &runtime.settings.namespace),
        })
    }

    /// Carries out the Lease write the cached view suggested for `shard`, decided again on a
    /// fresh read of the Lease: after a freeze or a slow step the cache can be seconds
    /// behind (every Lease looks expired, the holder has renewed since), and a write based
    /// on it would only lose a race. A write that loses one anyway (409: the holder renewed
    /// in between) is decided again from the Lease read afresh, a few times. Returns the
    /// Lease if it is ours now.
    async fn write_lease(
        &self,
        leases: &ShardLeases,
        shard: ShardIndex,
        ring: u32,
    ) -> Result<Option<HeldLease>, ShardingError> {
        let me = self.me();
        for _ in 0..LEASE_WRITE_ATTEMPTS {
            let fresh = leases.get(shard).await?;
            let snapshot = fresh.as_ref().map(|l| self.snapshot(l));
            let now = jiff::Timestamp::now();
            match failover::acquisition(&me, shard, snapshot.as_ref(), ring, now) {
                Acquisition::Wait => return Ok(None),
                Acquisition::RequestHandBack => {
                    let Some(fresh) = fresh else { continue };
                    if leases.request_release(shard, &fresh, me.identity).await? {
                        tracing::info!(%shard, "home shard is held by another worker: hand-back requested");
                        return Ok(None);
                    }
                }
                Acquisition::Acquire => {
                    if let Some(held) = leases.acquire(shard, fresh.as_ref()).await? {
                        return Ok(Some(held));
                    }
                }
            }
            tracing::debug!(%shard, "shard lease changed under our write, reading it again");
        }
        Ok(None)
    }
}

/// The number of worker ordinals the Leases show, for the takeover stagger: the highest
/// home worker any Lease names (a shard's own index where none is named), or this
/// worker's ordinal, plus one.
fn worker_ring(leases: &BTreeMap<ShardIndex, LeaseSnapshot>, me: ShardIndex) -> u32 {
    leases
        .iter()
        .map(|(shard, lease)| lease.home_of(*shard))
        .chain([me])
        .map(|worker| worker.0.saturating_add(1))
        .max()
        .unwrap_or(1)
}

/// The shards this worker is home for and must serve to be ready: those whose Leases name
/// it (or, naming nobody, carry its ordinal as index) and are not retired (no worker
/// acquires a retired shard), and its ordinal's shard while that has no Lease yet.
fn home_shards(me: &Me<'_>, leases: &BTreeMap<ShardIndex, LeaseSnapshot>) -> Vec<ShardIndex> {
    let mut homes: Vec<ShardIndex> = leases
        .iter()
        .filter(|(shard, lease)| !lease.retired && failover::is_home(me, **shard, Some(lease)))
        .map(|(shard, _)| *shard)
        .collect();
    if !leases.contains_key(&me.home) {
        homes.push(me.home);
    }
    homes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use crate::sharding::{Sharding, ShardingSettings};

    /// An API server with one shard Lease store, whose Shard status writes (heartbeats)
    /// never answer if `hang` is set. Records when the Lease is released.
    #[derive(Clone, Default)]
    struct HangingHeartbeats {
        hang: bool,
        lease: Arc<Mutex<Option<serde_json::Value>>>,
        released: Arc<Mutex<Option<tokio::time::Instant>>>,
        heartbeats: Arc<Mutex<usize>>,
    }

    impl HangingHeartbeats {
        fn client(&self) -> kube::Client {
            let api = self.clone();
            let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
                let api = api.clone();
                async move { Ok::<_, std::convert::Infallible>(api.answer(request).await) }
            });
            kube::Client::new(service, "ops")
        }

        /// Shuts the supervisor `run` down and returns how long after that it released
        /// the Lease (the run must end within a minute).
        async fn released_after_shutdown(
            &self,
            shutdown: &CancellationToken,
            run: tokio::task::JoinHandle<Result<(), crate::ShardingError>>,
        ) -> Duration {
            let stopping = tokio::time::Instant::now();
            shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(60), run)
                .await
                .expect("the supervisor is stuck on its way out")
                .unwrap()
                .unwrap();
            let released = self.released.lock().unwrap();
            released.expect("the lease was not released") - stopping
        }

        async fn answer(
            &self,
            request: http::Request<kube::client::Body>,
        ) -> http::Response<kube::client::Body> {
            let (parts, body) = request.into_parts();
            let body = body.collect_bytes().await.unwrap_or_default();
            let (path, query) = (parts.uri.path(), parts.uri.query().unwrap_or(""));
            let method = parts.method.as_str();
            if path.ends_with("/status") {
                *self.heartbeats.lock().unwrap() += 1;
                if self.hang {
                    return futures::future::pending().await;
                }
            }
            if path.ends_with("/leases") && query.contains("watch=true") {
                return futures::future::pending().await;
            }
            let mut stored = self.lease.lock().unwrap();
            let reply = match (method, path.ends_with("/leases")) {
                _ if path.ends_with("/status") => Some(serde_json::json!({})),
                ("GET", true) => Some(serde_json::json!({
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "LeaseList",
                    "metadata": { "resourceVersion": "1" },
                    "items": stored.iter().cloned().collect::<Vec<_>>(),
                })),
                ("GET", false) => stored.clone(),
                ("POST" | "PUT", _) => {
                    let mut lease: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    lease["metadata"]["resourceVersion"] = "2".into();
                    if lease["spec"]["holderIdentity"].is_null() {
                        *self.released.lock().unwrap() = Some(tokio::time::Instant::now());
                    }
                    *stored = Some(lease.clone());
                    Some(lease)
                }
                _ => None,
            };
            let (status, reply) = match reply {
                Some(reply) => (200, reply),
                None => (
                    404,
                    serde_json::json!({
                        "apiVersion": "v1", "kind": "Status", "status": "Failure",
                        "reason": "NotFound", "code": 404, "message": "not found",
                    }),
                ),
            };
            http::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(kube::client::Body::from(
                    serde_json::to_vec(&reply).unwrap(),
                ))
                .unwrap()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_that_never_answers_does_not_hold_up_the_release() {
        let api = HangingHeartbeats {
            hang: true,
            ..Default::default()
        };
        let mut settings = ShardingSettings::new("shardop", "shardop-worker-0", "ops").unwrap();
        settings.streaming_lists = false;
        settings.memory_return_interval = None;
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(
            Sharding::new(api.client(), settings)
                .with_shutdown(shutdown.clone())
                .run(|scope| async move { scope.stopped().await }),
        );
        // The home shard is acquired and its first heartbeat hangs.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(*api.heartbeats.lock().unwrap() > 0, "no heartbeat sent");
        assert!(api.released.lock().unwrap().is_none());
        let released = api.released_after_shutdown(&shutdown, run).await;
        // The heartbeat was given up after a retry period (2 s); it may still land, so the
        // release waits out the fencing margin (5 s) after that.
        assert!(
            released <= Duration::from_secs(8),
            "released {released:?} after the shutdown"
        );
    }

    fn me() -> Me<'static> {
        Me {
            identity: "shardop-worker-1",
            home: ShardIndex(1),
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }

    fn homed(home: Option<u32>) -> LeaseSnapshot {
        LeaseSnapshot {
            home_worker: home.map(ShardIndex),
            ..Default::default()
        }
    }

    #[test]
    fn without_named_homes_the_home_shard_is_the_ordinal() {
        let leases = BTreeMap::from([(ShardIndex(0), homed(None)), (ShardIndex(2), homed(None))]);
        assert_eq!(home_shards(&me(), &leases), vec![ShardIndex(1)]);
        assert_eq!(worker_ring(&leases, ShardIndex(1)), 3);
        let own = BTreeMap::from([(ShardIndex(1), homed(None))]);
        assert_eq!(home_shards(&me(), &own), vec![ShardIndex(1)]);
    }

    #[test]
    fn named_homes_replace_the_ordinal() {
        // Eight shards over three workers; worker 1 is named home for 3 and 6, and its
        // ordinal's shard 1 went to worker 0.
        let leases: BTreeMap<ShardIndex, LeaseSnapshot> = [0, 0, 2, 1, 0, 2, 1, 2]
            .into_iter()
            .enumerate()
            .map(|(shard, home)| (ShardIndex(shard as u32), homed(Some(home))))
            .collect();
        assert_eq!(
            home_shards(&me(), &leases),
            vec![ShardIndex(3), ShardIndex(6)]
        );
        assert_eq!(
            worker_ring(&leases, ShardIndex(1)),
            3,
            "three workers, not eight shards"
        );
        // A worker the spread gave nothing is home for nothing (and so ready).
        let far = BTreeMap::from([(ShardIndex(1), homed(Some(0)))]);
        assert!(home_shards(&me(), &far).is_empty());
        // Nor is a worker whose ordinal is beyond a fixed shard count, once the retired
        // Lease of its ordinal's shard was let go: it never acquires it again.
        let retired = LeaseSnapshot {
            retired: true,
            ..homed(Some(1))
        };
        let beyond = BTreeMap::from([(ShardIndex(1), retired)]);
        assert!(home_shards(&me(), &beyond).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_controller_aborted_at_shutdown_releases_its_lease_after_the_fencing_margin() {
        let api = HangingHeartbeats::default();
        let mut settings = ShardingSettings::new("shardop", "shardop-worker-0", "ops").unwrap();
        settings.streaming_lists = false;
        settings.memory_return_interval = None;
        settings.shutdown_timeout = Duration::from_secs(1);
        let shutdown = CancellationToken::new();
        // A controller that ignores the stop: it is aborted after the shutdown timeout, and
        // a write of it may still be on its way to the API server.
        let run = tokio::spawn(
            Sharding::new(api.client(), settings)
                .with_shutdown(shutdown.clone())
                .run(|_| futures::future::pending()),
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            api.lease.lock().unwrap().is_some(),
            "the home shard is held"
        );
        let released = api.released_after_shutdown(&shutdown, run).await;
        // Aborted at 1 s, released after the 5 s margin (15 s lease − 10 s renew deadline).
        assert_eq!(released, Duration::from_secs(6));
    }
}
