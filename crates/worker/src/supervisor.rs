//! The worker's main loop: which shards it serves. It acquires its home shard's Lease,
//! takes over expired shards of dead workers, hands taken-over shards back on request,
//! starts a controller for every held Lease and stops it when the Lease is lost, and on
//! shutdown stops everything and releases every Lease.
//!
//! The decisions are in [`crate::failover`]; this module only observes (one watch over all
//! shard Leases) and acts. The watch is a hint: every Lease write it suggests (acquire,
//! hand-back request) is decided again on a fresh read of that Lease, and retried from a
//! fresh read when it loses a race (409), so a worker that was frozen or slow never writes
//! from a stale view. Lease requests use the Lease budget of the [`ClientFactory`]; each
//! served shard's controller gets a client fenced by that acquisition's [`LeaseGuard`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use shardop_api::protocol::LeaseSnapshot;
use shardop_api::{Shard, ShardIndex};
use shardop_runtime::{
    ClientFactory, HeldLease, LeaseGuard, LeaseSettings, Readiness, ShardLeaseWatch, ShardLeases,
};
use tokio_util::sync::CancellationToken;

use crate::controller::{ControllerSettings, ShardController};
use crate::failover::{self, Acquisition, LEASE_WRITE_ATTEMPTS, Me, StopReason};
use crate::heartbeat::{Heartbeat, Report};
use crate::metrics::WorkerMetrics;
use crate::step_retry::StepRetry;

/// Everything the supervisor needs.
pub struct Supervisor {
    /// Builds one client per shard (user agent `shardop-worker/shard-<i> (<pod>)`).
    pub clients: ClientFactory,
    /// Lease identity and timing.
    pub lease_settings: LeaseSettings,
    /// The home shard.
    pub home: ShardIndex,
    /// Controller settings.
    pub controller: ControllerSettings,
    /// Metrics.
    pub metrics: WorkerMetrics,
    /// `/readyz`.
    pub readiness: Readiness,
    /// How long in-flight reconciles may take on hand-back and shutdown.
    pub shutdown_timeout: Duration,
}

struct Served {
    lease: HeldLease,
    controller: ShardController,
    heartbeat: Heartbeat,
    shards: Api<Shard>,
}

/// Clients acting as each shard (user agent `shardop-worker/shard-<i> (<pod>)`): Lease I/O
/// on the Lease budget, created on first use, and fenced clients for the controllers.
struct ShardClients {
    factory: ClientFactory,
    identity: String,
    settings: LeaseSettings,
    leases: HashMap<ShardIndex, ShardLeases>,
}

impl ShardClients {
    fn agent(&self, shard: ShardIndex) -> String {
        format!("shardop-worker/shard-{shard} ({})", self.identity)
    }

    /// Lease I/O acting as `shard`, on the Lease budget.
    fn leases(&mut self, shard: ShardIndex) -> anyhow::Result<ShardLeases> {
        if let Some(leases) = self.leases.get(&shard) {
            return Ok(leases.clone());
        }
        let client = self.factory.lease_client(&self.agent(shard))?;
        let leases = ShardLeases::new(client, self.settings.clone());
        self.leases.insert(shard, leases.clone());
        Ok(leases)
    }

    /// A client for one acquisition of `shard`: its writes are fenced by `guard`.
    fn fenced(&self, shard: ShardIndex, guard: LeaseGuard) -> anyhow::Result<kube::Client> {
        Ok(self.factory.fenced_client(&self.agent(shard), guard)?)
    }
}

impl Supervisor {
    /// Runs until `shutdown` is cancelled, then stops every controller and releases every
    /// Lease.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let identity = self.lease_settings.identity.clone();
        let namespace = self.lease_settings.namespace.clone();
        let watch_client = self
            .clients
            .lease_client(&format!("shardop-worker/leases ({identity})"))?;
        let (mut watch, driver) = shardop_runtime::watch_shard_leases(
            watch_client,
            &namespace,
            self.controller.streaming_lists,
        );
        let driver = tokio::spawn(driver);
        let mut clients = ShardClients {
            factory: self.clients.clone(),
            identity: identity.clone(),
            settings: self.lease_settings.clone(),
            leases: HashMap::new(),
        };
        tokio::select! {
            () = watch.wait_until_ready() => {}
            () = shutdown.cancelled() => {
                driver.abort();
                return Ok(());
            }
        }
        tracing::info!(home = %self.home, %identity, "watching shard leases");

        let mut served: BTreeMap<ShardIndex, Served> = BTreeMap::new();
        let retry_period = self.lease_settings.retry_period;
        let mut tick = tokio::time::interval(retry_period.min(Duration::from_secs(1)));
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
            let api_reachable = self.clients.reachability().is_reachable();
            if retry.is_due(tokio::time::Instant::now(), api_reachable) {
                match self.step(&watch, &mut clients, &mut served).await {
                    Ok(()) => retry.succeeded(),
                    Err(err) => {
                        retry.failed(&err, tokio::time::Instant::now());
                    }
                }
            }
            self.publish_readiness(&served);
        }

        // Graceful shutdown: stop taking work, finish in flight, release.
        self.readiness.set(false);
        tracing::info!(
            shards = served.len(),
            "shutting down: stopping controllers and releasing leases"
        );
        let grace = self.stop_grace(StopReason::Shutdown);
        let stops = served.into_values().map(|s| {
            let metrics = self.metrics.clone();
            async move {
                let shard = s.lease.shard();
                s.controller.stop(grace).await;
                if let Err(err) = s.lease.release().await {
                    tracing::warn!(%shard, error = %err, "releasing the shard lease failed");
                }
                metrics.forget_shard(shard);
            }
        });
        futures::future::join_all(stops).await;
        driver.abort();
        Ok(())
    }

    fn me(&self) -> Me<'_> {
        Me {
            identity: &self.lease_settings.identity,
            home: self.home,
            lease_duration: self.lease_settings.lease_duration,
            retry_period: self.lease_settings.retry_period,
        }
    }

    fn stop_grace(&self, reason: StopReason) -> Duration {
        failover::stop_grace(reason, &self.me(), self.shutdown_timeout)
    }

    async fn step(
        &self,
        watch: &ShardLeaseWatch,
        clients: &mut ShardClients,
        served: &mut BTreeMap<ShardIndex, Served>,
    ) -> anyhow::Result<()> {
        let me = self.me();
        let leases = watch.all();

        // 1. Lost Leases.
        self.stop_lost(served).await;

        // 2. Hand-back / retirement requests for shards we serve.
        let to_release: Vec<ShardIndex> = served
            .keys()
            .copied()
            .filter(|shard| {
                let snapshot = leases
                    .get(shard)
                    .map(|l| shardop_api::protocol::LeaseSnapshot::from_lease(l));
                failover::should_release(&me, *shard, snapshot.as_ref())
            })
            .collect();
        for shard in to_release {
            if let Some(s) = served.remove(&shard) {
                tracing::info!(%shard, "release requested: stopping the shard controller, then releasing its lease");
                s.controller
                    .stop(self.stop_grace(StopReason::HandBack))
                    .await;
                s.lease.release().await?;
                self.metrics.forget_shard(shard);
            }
        }

        // 3. Acquisitions: the home shard, and every known shard we do not serve.
        let now = jiff::Timestamp::now();
        let shard_count = leases
            .keys()
            .map(|s| s.0.saturating_add(1))
            .chain([self.home.0.saturating_add(1)])
            .max()
            .unwrap_or(1);
        let mut candidates: Vec<ShardIndex> = leases.keys().copied().collect();
        if !candidates.contains(&self.home) {
            candidates.push(self.home);
        }
        // Home first: it matters most and must not wait behind takeovers.
        candidates.sort_by_key(|s| (*s != self.home, s.0));
        for shard in candidates {
            if served.contains_key(&shard) {
                continue;
            }
            let lease: Option<&Arc<Lease>> = leases.get(&shard);
            let snapshot = lease.map(|l| LeaseSnapshot::from_lease(l));
            if failover::acquisition(&me, shard, snapshot.as_ref(), shard_count, now)
                == Acquisition::Wait
            {
                continue;
            }
            let lease_io = clients.leases(shard)?;
            // Bounded: a request stuck on a half-open connection must not hold up the
            // rest of the step (hand-backs, the home shard, heartbeats) for the client's
            // read timeout. A Lease acquired by a request we gave up on is never renewed
            // and simply expires; nothing is written for it without a guard.
            let attempt = tokio::time::timeout(
                self.lease_settings.lease_duration,
                self.write_lease(&lease_io, shard, shard_count),
            )
            .await;
            let Ok(attempt) = attempt else {
                tracing::warn!(%shard, "shard lease request did not finish within the lease duration");
                continue;
            };
            let Some(held) = attempt? else {
                continue;
            };
            if shard != self.home {
                tracing::warn!(%shard, "took over the shard of a worker that stopped renewing");
            }
            served.insert(shard, self.serve(clients, held)?);
        }

        // 4. Metrics and heartbeats (readiness: `publish_readiness`).
        for (shard, s) in served.iter_mut() {
            s.controller.update_gauges();
            self.metrics
                .shard_leader
                .get_or_create(&WorkerMetrics::shard(*shard))
                .set(1);
            let counts = s.controller.counts();
            let report = Report {
                holder: self.lease_settings.identity.clone(),
                queue_depth: counts.queue_depth,
                backlog: counts.backlog,
            };
            s.heartbeat
                .maybe_send(&s.shards, *shard, &s.lease.guard(), report)
                .await;
        }
        Ok(())
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
            if let Some(s) = served.remove(&shard) {
                tracing::warn!(%shard, "shard lease lost, stopping its controller");
                s.controller
                    .stop(self.stop_grace(StopReason::LeaseLost))
                    .await;
                drop(s.lease);
                self.metrics.forget_shard(shard);
            }
        }
    }

    /// Ready while the home shard is served with synced caches (`/readyz` also requires
    /// the API server to answer, see `main.rs`). Set after every tick, whether or not the
    /// step ran or failed.
    fn publish_readiness(&self, served: &BTreeMap<ShardIndex, Served>) {
        let ready = served
            .get(&self.home)
            .is_some_and(|s| s.controller.is_synced() && !s.lease.is_lost());
        self.readiness.set(ready);
    }

    /// Starts serving a freshly acquired shard: its controller, with a client fenced by
    /// this acquisition's guard.
    fn serve(&self, clients: &ShardClients, held: HeldLease) -> anyhow::Result<Served> {
        let shard = held.shard();
        let client = clients.fenced(shard, held.guard())?;
        self.metrics.start_shard(shard);
        let controller = ShardController::start(
            shard,
            held.guard(),
            client.clone(),
            self.metrics.clone(),
            &self.controller,
        );
        Ok(Served {
            lease: held,
            controller,
            heartbeat: Heartbeat::default(),
            shards: Api::namespaced(client, &self.lease_settings.namespace),
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
        shard_count: u32,
    ) -> anyhow::Result<Option<HeldLease>> {
        let me = self.me();
        for _ in 0..LEASE_WRITE_ATTEMPTS {
            let fresh = leases.get(shard).await?;
            let snapshot = fresh.as_ref().map(LeaseSnapshot::from_lease);
            let now = jiff::Timestamp::now();
            match failover::acquisition(&me, shard, snapshot.as_ref(), shard_count, now) {
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
