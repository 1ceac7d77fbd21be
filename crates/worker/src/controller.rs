//! One kube-runtime Controller per served shard (and per watched namespace): label-filtered
//! watches, the event filter, queue/backlog bookkeeping for metrics, and graceful stop.
//! The reconcile itself is in [`crate::reconcile`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use shardop_api::label_trust::trust_marker;
use shardop_api::{DatabaseCluster, ShardIndex};
use shardop_runtime::LeaseGuard;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::{BackoffPolicy, FailureCounts};
use crate::filter::ChangeFilter;
use crate::metrics::WorkerMetrics;
use crate::reconcile;
use crate::status::{TerminalProblem, WrittenStatus, is_behind};

/// Settings shared by every shard controller of the process.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// Namespaces to watch; empty = all namespaces.
    pub namespaces: Vec<String>,
    /// Reconciles running at once per controller.
    pub concurrency: u16,
    /// Use streaming lists (WatchList) for the initial state.
    pub streaming_lists: bool,
    /// Backoff of transient errors.
    pub backoff: BackoffPolicy,
    /// How long the Lease may be unusable before a reconcile gives up waiting.
    pub retry_period: Duration,
}

/// `namespace/name`, the key of an object in the bookkeeping maps.
pub type ObjectKey = String;

/// Per-object bookkeeping of one shard, shared by its controllers and its reconciles.
#[derive(Default)]
pub struct Bookkeeping {
    /// Objects with an event not yet picked up by a reconcile (queue depth), with when the
    /// first of those events arrived (queue wait).
    pub pending: HashMap<ObjectKey, Instant>,
    /// Reconciles running, with their start.
    pub running: HashMap<ObjectKey, Instant>,
    /// When a spec change of an object was first seen, for the lag histogram.
    pub unconverged_since: HashMap<ObjectKey, Instant>,
    /// The last terminal problem per object UID and the generation it belongs to: the
    /// same generation is not re-applied (no requeue storm).
    pub terminal: HashMap<String, (Option<i64>, TerminalProblem)>,
    /// The last server-side apply of each child (`Kind/namespace/name`): fingerprint of the
    /// desired object, resourceVersion and object returned. Lets a reconcile that runs
    /// before the watch delivered our own write skip re-applying it; an entry is dropped as
    /// soon as the watch delivers that version, so the memo holds only writes in flight.
    pub applied: HashMap<String, (u64, Option<u64>, AppliedObject)>,
    /// The last status written per object, until the watch delivers that write: a
    /// reconcile in between compares with it instead of the stale cached status.
    pub status_written: HashMap<ObjectKey, WrittenStatus>,
    /// UIDs whose drain this shard acknowledged: a stale cache entry must not be
    /// reconciled again.
    pub acknowledged: HashSet<String>,
    /// Objects that joined the shard (see [`crate::filter::Admitted::joined`]) and whose
    /// children have not been applied since: the next converge applies every child, since
    /// neither the apply memo nor the label-filtered child cache can tell whether another
    /// shard relabelled a child meanwhile. The value numbers the join, so that a converge
    /// clears only the join it has seen (not one that happened while it ran).
    pub ownership_changed: HashMap<ObjectKey, u64>,
    /// Joins numbered so far.
    pub joins: u64,
}

/// A child object as returned by its last apply (a StatefulSet or a Service).
pub type AppliedObject = Arc<dyn std::any::Any + Send + Sync>;

impl Bookkeeping {
    /// Records an event for an object; an object already waiting keeps its first event's
    /// time, since that is how long it has been waiting.
    pub fn mark_pending(&mut self, key: ObjectKey) {
        self.pending.entry(key).or_insert_with(Instant::now);
    }

    /// A reconcile of the object starts: it stops waiting. Returns how long it waited for
    /// a reconcile slot, or `None` for a run no event asked for (a requeue or resync).
    pub fn start_running(&mut self, key: &ObjectKey) -> Option<Duration> {
        self.running.insert(key.clone(), Instant::now());
        self.pending.remove(key).map(|since| since.elapsed())
    }

    /// Records that an object joined the shard.
    pub fn mark_joined(&mut self, key: ObjectKey) {
        self.joins = self.joins.wrapping_add(1);
        self.ownership_changed.insert(key, self.joins);
    }

    /// The object's children have been applied for the join numbered `join`: forget it
    /// unless the object joined again since.
    pub fn children_relabelled(&mut self, key: &str, join: Option<u64>) {
        if join.is_some() && self.ownership_changed.get(key).copied() == join {
            self.ownership_changed.remove(key);
        }
    }

    /// The apply memo key of a child.
    pub fn applied_key(kind: &str, namespace: &str, name: &str) -> String {
        format!("{kind}/{namespace}/{name}")
    }

    /// Drops the apply memo of a child once the watch delivered the applied version (or a
    /// later one): from then on the cache answers for it.
    pub fn forget_applied_once_seen<K: Resource<DynamicType = ()>>(&mut self, child: &K) {
        let key = Self::applied_key(
            &K::kind(&()),
            child.meta().namespace.as_deref().unwrap_or_default(),
            child.meta().name.as_deref().unwrap_or_default(),
        );
        let seen = crate::reconcile::numeric_resource_version(child);
        if let Some((_, applied_version, _)) = self.applied.get(&key)
            && seen.is_some_and(|seen| applied_version.is_none_or(|applied| seen >= applied))
        {
            self.applied.remove(&key);
        }
    }

    /// Drops the status memo of an object once the watch delivered the written version
    /// (or a later one).
    pub fn forget_status_once_seen(&mut self, cluster: &DatabaseCluster) {
        let key = key_of(cluster);
        if self
            .status_written
            .get(&key)
            .is_some_and(|written| written.is_seen_in(cluster))
        {
            self.status_written.remove(&key);
        }
    }

    /// Age of the oldest change the shard is still working on: objects seen behind their
    /// generation and not converged since, still in the shard (`cached` finds them), and not
    /// Degraded for their current generation: those wait for the user to change the spec,
    /// their condition says why, and counting them would keep the gauge high for a problem
    /// the operator cannot fix. Zero when there is none.
    pub fn oldest_unconverged(
        &self,
        now: Instant,
        cached: impl Fn(&str) -> Option<Arc<DatabaseCluster>>,
    ) -> Duration {
        self.unconverged_since
            .iter()
            .filter(|(key, _)| cached(key).is_some_and(|object| !self.is_degraded(&object)))
            .map(|(_, since)| now.saturating_duration_since(*since))
            .max()
            .unwrap_or_default()
    }

    /// Whether the object's current generation was found impossible to apply.
    fn is_degraded(&self, object: &DatabaseCluster) -> bool {
        object
            .metadata
            .uid
            .as_ref()
            .and_then(|uid| self.terminal.get(uid))
            .is_some_and(|(generation, _)| *generation == object.metadata.generation)
    }

    /// Forgets what this shard wrote for an object that leaves it (drained, deleted):
    /// the status memo and the apply memo of its children.
    pub fn forget_object(&mut self, cluster: &DatabaseCluster) {
        self.status_written.remove(&key_of(cluster));
        self.forget_children(
            cluster.meta().namespace.as_deref().unwrap_or_default(),
            cluster.meta().name.as_deref().unwrap_or_default(),
        );
    }

    /// Forgets the apply memo of a DatabaseCluster's children.
    fn forget_children(&mut self, namespace: &str, name: &str) {
        self.applied
            .remove(&Self::applied_key("StatefulSet", namespace, name));
        self.applied.remove(&Self::applied_key(
            "Service",
            namespace,
            &crate::children::service_name(name),
        ));
    }
}

/// What the reconciles of one shard share.
pub struct ShardShared {
    /// The shard.
    pub shard: ShardIndex,
    /// Its Lease fence.
    pub guard: LeaseGuard,
    /// Metrics.
    pub metrics: WorkerMetrics,
    /// Backoff shape.
    pub backoff: BackoffPolicy,
    /// Consecutive failures per object.
    pub failures: FailureCounts<ObjectKey>,
    /// Cleanup passes per deleted object that still waited for claims to go: the poll
    /// backs off, since every pass sends one DELETE per claim.
    pub cleanup_passes: FailureCounts<ObjectKey>,
    /// Queue and lag bookkeeping.
    pub book: Mutex<Bookkeeping>,
    /// Requeue delay when the Lease is not valid.
    pub retry_period: Duration,
}

impl ShardShared {
    /// Locks the bookkeeping (poisoning only means a panic elsewhere; the maps stay usable).
    pub fn book(&self) -> std::sync::MutexGuard<'_, Bookkeeping> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What one controller's reconciles see: the shard's shared state plus the caches of one
/// namespace scope.
pub struct ScopeContext {
    /// The shard's shared state.
    pub shared: Arc<ShardShared>,
    /// Client acting as the shard (`shardop-worker/shard-<i>` user agent).
    pub client: Client,
    /// Cached StatefulSets of the shard.
    pub stateful_sets: Store<StatefulSet>,
    /// Cached Services of the shard.
    pub services: Store<Service>,
    /// Cached DatabaseClusters of the shard (the controller's own store).
    pub clusters: Store<DatabaseCluster>,
}

/// The key of an object.
pub fn key_of<K: Resource>(object: &K) -> ObjectKey {
    format!(
        "{}/{}",
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default()
    )
}

/// Counts from the caches, for metrics and the Shard heartbeat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardCounts {
    /// Objects in the cache.
    pub objects: i64,
    /// Objects behind their generation.
    pub backlog: i64,
    /// Objects being deleted.
    pub terminating: i64,
    /// Objects waiting for a reconcile.
    pub queue_depth: i64,
}

/// A running controller for one shard.
pub struct ShardController {
    shared: Arc<ShardShared>,
    stores: Vec<Store<DatabaseCluster>>,
    synced: Arc<AtomicUsize>,
    scopes: usize,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl ShardController {
    /// Starts the shard's controllers. `client` must carry the shard's user agent.
    pub fn start(
        shard: ShardIndex,
        guard: LeaseGuard,
        client: Client,
        metrics: WorkerMetrics,
        settings: &ControllerSettings,
    ) -> Self {
        let shared = Arc::new(ShardShared {
            shard,
            guard: guard.clone(),
            metrics,
            backoff: settings.backoff,
            failures: FailureCounts::default(),
            cleanup_passes: FailureCounts::default(),
            book: Mutex::default(),
            retry_period: settings.retry_period,
        });
        let stop = CancellationToken::new();
        let synced = Arc::new(AtomicUsize::new(0));
        let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
            vec![None]
        } else {
            settings.namespaces.iter().cloned().map(Some).collect()
        };
        let mut stores = Vec::new();
        let mut runs = Vec::new();
        for namespace in &scopes {
            let (store, run) = scope_controller(
                shared.clone(),
                client.clone(),
                namespace.as_deref(),
                settings,
                stop.clone(),
                synced.clone(),
            );
            stores.push(store);
            runs.push(run);
        }
        let task = tokio::spawn(async move {
            futures::future::join_all(runs).await;
        });
        tracing::info!(%shard, "shard controller started");
        Self {
            shared,
            stores,
            synced,
            scopes: scopes.len(),
            stop,
            task,
        }
    }

    /// Whether every cache of the shard has its initial list.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire) >= self.scopes
    }

    /// Current counts from the caches and the bookkeeping.
    pub fn counts(&self) -> ShardCounts {
        let mut counts = ShardCounts::default();
        for store in &self.stores {
            for object in store.state() {
                counts.objects += 1;
                counts.backlog += i64::from(is_behind(&object));
                counts.terminating += i64::from(object.metadata.deletion_timestamp.is_some());
            }
        }
        // Only objects still in a cache count: an object that left the shard (drain
        // acknowledged, deleted) before its queued reconcile ran is not waiting any more.
        let mut book = self.shared.book();
        let stores = &self.stores;
        book.pending.retain(|key, _| {
            key.split_once('/').is_some_and(|(namespace, name)| {
                stores.iter().any(|store| {
                    store
                        .get(&reflector::ObjectRef::new(name).within(namespace))
                        .is_some()
                })
            })
        });
        counts.queue_depth = i64::try_from(book.pending.len()).unwrap_or(i64::MAX);
        counts
    }

    /// Publishes the gauges of this shard.
    pub fn update_gauges(&self) {
        let counts = self.counts();
        let metrics = &self.shared.metrics;
        let label = WorkerMetrics::shard(self.shared.shard);
        metrics
            .shard_objects
            .get_or_create(&label)
            .set(counts.objects);
        metrics.backlog.get_or_create(&label).set(counts.backlog);
        metrics
            .terminating
            .get_or_create(&label)
            .set(counts.terminating);
        metrics
            .queue_depth
            .get_or_create(&label)
            .set(counts.queue_depth);
        let longest = {
            let book = self.shared.book();
            book.running
                .values()
                .map(|started| started.elapsed().as_secs_f64())
                .fold(0.0, f64::max)
        };
        metrics.longest_running.get_or_create(&label).set(longest);
        let oldest = self
            .shared
            .book()
            .oldest_unconverged(Instant::now(), |key| self.cached_object(key));
        metrics
            .oldest_unconverged
            .get_or_create(&label)
            .set(oldest.as_secs_f64());
    }

    /// The cached DatabaseCluster of a `namespace/name` key, from any scope's store.
    fn cached_object(&self, key: &str) -> Option<Arc<DatabaseCluster>> {
        let (namespace, name) = key.split_once('/')?;
        let object = reflector::ObjectRef::new(name).within(namespace);
        self.stores.iter().find_map(|store| store.get(&object))
    }

    /// Stops taking work, lets in-flight reconciles finish for up to `timeout`, then
    /// aborts whatever is left. Returns whether it stopped cleanly.
    pub async fn stop(self, timeout: Duration) -> bool {
        let shard = self.shared.shard;
        self.stop.cancel();
        let mut task = self.task;
        let clean = match tokio::time::timeout(timeout, &mut task).await {
            Ok(_) => true,
            // A zero grace (the Lease is lost: the fence already refuses every write) aborts
            // at once; that is the plan, not a reconcile that overran.
            Err(_) if timeout.is_zero() => {
                tracing::debug!(%shard, "aborting in-flight reconciles: no grace");
                task.abort();
                let _ = task.await;
                false
            }
            Err(_) => {
                tracing::warn!(%shard, ?timeout, "in-flight reconciles did not finish in time, aborting them");
                task.abort();
                let _ = task.await;
                false
            }
        };
        tracing::info!(%shard, clean, "shard controller stopped");
        clean
    }
}

/// Builds the controller of one namespace scope (`None` = all namespaces).
fn scope_controller(
    shared: Arc<ShardShared>,
    client: Client,
    namespace: Option<&str>,
    settings: &ControllerSettings,
    stop: CancellationToken,
    synced: Arc<AtomicUsize>,
) -> (
    Store<DatabaseCluster>,
    futures::future::BoxFuture<'static, ()>,
) {
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let shard = shared.shard;
    let mut config = watcher::Config::default().labels(&shard.selector());
    if settings.streaming_lists {
        config = config.streaming_lists();
    }

    let (clusters, cluster_writer) = reflector::store::<DatabaseCluster>();
    let (stateful_sets, sts_writer) = reflector::store::<StatefulSet>();
    let (services, svc_writer) = reflector::store::<Service>();
    let clusters_synced = CancellationToken::new();
    let sts_synced = CancellationToken::new();
    let svc_synced = CancellationToken::new();

    // The child caches are driven by their own tasks, not by the controller: kube-runtime
    // stops polling its trigger streams while the runner waits for its main store or is at
    // full concurrency, and a reconcile compares children with these caches. Their events
    // reach the controller through unbounded channels (bounded in practice by the number
    // of children and how long a stall lasts).
    let (sts_task, sts_events) = drive_children(
        sts_writer,
        watcher(api::<StatefulSet>(&client, namespace), config.clone()).modify(drop_managed_fields),
        sts_fingerprint,
        sts_synced.clone(),
        shared.clone(),
    );
    let (svc_task, svc_events) = drive_children(
        svc_writer,
        watcher(api::<Service>(&client, namespace), config.clone()).modify(drop_managed_fields),
        predicates::resource_version,
        svc_synced.clone(),
        shared.clone(),
    );

    // DatabaseCluster events start flowing only once the child caches are complete, so the
    // first reconcile of every object sees its children (no blind re-apply after start-up).
    let book_for_clusters = shared.clone();
    let children_synced = {
        let (sts, svc) = (sts_synced.clone(), svc_synced.clone());
        async move {
            sts.cancelled().await;
            svc.cancelled().await;
        }
    };
    let cluster_stream = reflector::reflector(
        cluster_writer,
        watcher(api::<DatabaseCluster>(&client, namespace), config).modify(keep_only_label_trust),
    )
    .default_backoff()
    .inspect({
        let synced = clusters_synced.clone();
        let shared = shared.clone();
        move |event| match event {
            Ok(watcher::Event::InitDone) => synced.cancel(),
            // After the reflector stored the object: a reconcile that finds the memo gone
            // finds the write in the cache.
            Ok(watcher::Event::Apply(cluster) | watcher::Event::InitApply(cluster)) => {
                shared.book().forget_status_once_seen(cluster);
            }
            // The object left the shard: whatever this shard applied for it may be
            // relabelled by its next owner, so its memos are void.
            Ok(watcher::Event::Delete(cluster)) => {
                let mut book = shared.book();
                book.forget_object(cluster);
                book.ownership_changed.remove(&key_of(cluster));
            }
            Ok(watcher::Event::Init) | Err(_) => {}
        }
    })
    .scan(ChangeFilter::default(), {
        let shared = shared.clone();
        move |filter, event| {
            let admitted = match event {
                Ok(event) => filter.admit(event).map(|admitted| {
                    if admitted.joined {
                        shared.book().mark_joined(key_of(&admitted.cluster));
                    }
                    Ok(admitted.cluster)
                }),
                Err(error) => Some(Err(error)),
            };
            futures::future::ready(Some(admitted))
        }
    })
    .filter_map(futures::future::ready)
    .inspect_ok(move |cluster| {
        let key = key_of(cluster);
        let mut book = book_for_clusters.book();
        if is_behind(cluster) {
            book.unconverged_since
                .entry(key.clone())
                .or_insert_with(Instant::now);
        }
        book.mark_pending(key);
    });
    let cluster_events = futures::stream::once(async move {
        children_synced.await;
        cluster_stream
    })
    .flatten();

    let context = Arc::new(ScopeContext {
        shared: shared.clone(),
        client,
        stateful_sets,
        services,
        clusters: clusters.clone(),
    });
    let controller = Controller::for_stream(cluster_events, clusters.clone())
        .owns_stream(sts_events)
        .owns_stream(svc_events)
        .with_config(ControllerConfig::default().concurrency(settings.concurrency))
        .graceful_shutdown_on({
            let guard = shared.guard.clone();
            async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = guard.cancelled() => {}
                }
            }
        });

    let shard = shared.shard;
    let report_synced = {
        let tokens = [clusters_synced, sts_synced, svc_synced];
        async move {
            for token in &tokens {
                token.cancelled().await;
            }
            synced.fetch_add(1, Ordering::AcqRel);
            tracing::info!(%shard, "shard caches synced");
        }
    };
    let run = controller
        .run(reconcile::reconcile, reconcile::error_policy, context)
        .for_each(move |result| {
            if let Err(err) = result {
                tracing::debug!(%shard, %err, "controller event");
            }
            futures::future::ready(())
        });
    let run = async move {
        // Dropped both when the controller ends and when this future is aborted (stop
        // timeout): the helper tasks never outlive their controller.
        let _helpers = AbortOnDrop(vec![tokio::spawn(report_synced), sts_task, svc_task]);
        run.await;
    };
    (clusters, Box::pin(run))
}

/// Cached children do without `managedFields`: nothing reads them, and they are a large
/// share of every object (one entry per field manager: ours, the controller manager's
/// status writes).
fn drop_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Cached DatabaseClusters keep one fact of their managedFields: whether the assigner
/// wrote the shard label, which decides whether this shard may act on them.
fn keep_only_label_trust(cluster: &mut DatabaseCluster) {
    let managed_fields = cluster.metadata.managed_fields.take();
    cluster.metadata.managed_fields = trust_marker(managed_fields.as_deref());
}

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Drives a child reflector in its own task; returns the task and the stream of (filtered)
/// child events for the controller, deletions included. Every event marks the parent as
/// pending.
fn drive_children<K, W, P>(
    writer: reflector::store::Writer<K>,
    watch: W,
    predicate: P,
    synced: CancellationToken,
    shared: Arc<ShardShared>,
) -> (
    JoinHandle<()>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
    W: futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    P: kube::runtime::Predicate<K> + Send + 'static,
{
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let driver = reflector::reflector(writer, watch)
        .default_backoff()
        .inspect(move |event| {
            if matches!(event, Ok(watcher::Event::InitDone)) {
                synced.cancel();
            }
        })
        // Deletes too: a child that leaves the shard's selector (someone gave it another
        // shard's label) is invisible from then on, and only a reconcile of its parent
        // puts the label back. The memo of a child gone from the cache is void as well.
        .touched_objects()
        .inspect_ok({
            let shared = shared.clone();
            move |child| shared.book().forget_applied_once_seen(child)
        })
        .predicate_filter(predicate, kube::runtime::PredicateConfig::default())
        .for_each(move |event| {
            match event {
                Ok(child) => {
                    if let Some(parent) = child.parent_key() {
                        shared.book().mark_pending(parent);
                    }
                    // The receiver is gone only when the controller stopped.
                    let _ = tx.unbounded_send(Ok(child));
                }
                Err(err) => shardop_runtime::reachability::log_watch_error("children", &err),
            }
            futures::future::ready(())
        });
    (tokio::spawn(driver), rx)
}

/// What of a StatefulSet matters to its parent: its spec (generation, drift by others),
/// labels (shard), and the status fields the DatabaseCluster status is computed from.
fn sts_fingerprint(sts: &StatefulSet) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let status = sts.status.clone().unwrap_or_default();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (
        sts.metadata.generation,
        status.observed_generation,
        status.replicas,
        status.ready_replicas,
        status.updated_replicas,
        sts.metadata.labels.as_ref(),
    )
        .hash(&mut hasher);
    Some(hasher.finish())
}

/// The parent DatabaseCluster of a child, from its controller owner reference.
trait ChildMeta {
    fn parent_key(&self) -> Option<ObjectKey>;
}

impl<K: Resource> ChildMeta for K {
    fn parent_key(&self) -> Option<ObjectKey> {
        let owner = self
            .owner_references()
            .iter()
            .find(|o| o.controller == Some(true) && o.kind == "DatabaseCluster")?;
        Some(format!(
            "{}/{}",
            self.meta().namespace.as_deref().unwrap_or_default(),
            owner.name
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn queue_wait_runs_from_the_first_unhandled_event() {
        let mut book = Bookkeeping::default();
        let key: ObjectKey = "ns/a".into();
        book.mark_pending(key.clone());
        tokio::time::advance(Duration::from_secs(2)).await;
        // A second event while waiting does not restart the clock.
        book.mark_pending(key.clone());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(book.start_running(&key), Some(Duration::from_secs(3)));
        assert!(book.running.contains_key(&key));
        // A requeue or resync run was not asked for by an event: no queue wait.
        assert_eq!(book.start_running(&key), None);
        // An event during a run waits from then on.
        book.mark_pending(key.clone());
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(book.start_running(&key), Some(Duration::from_millis(250)));
    }

    fn cached_cluster(name: &str, uid: &str, generation: i64) -> Arc<DatabaseCluster> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "shardop.dev/v1alpha1",
                "kind": "DatabaseCluster",
                "metadata": { "namespace": "ns", "name": name, "uid": uid, "generation": generation },
                "spec": { "replicas": 1, "image": "postgres:17", "storage": { "size": "1Gi" } },
            }))
            .unwrap(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_unconverged_change_counts_objects_still_in_the_shard_and_not_degraded() {
        let mut book = Bookkeeping::default();
        let cache: HashMap<&str, Arc<DatabaseCluster>> = HashMap::from([
            ("ns/stuck", cached_cluster("stuck", "u-stuck", 1)),
            ("ns/fresh", cached_cluster("fresh", "u-fresh", 1)),
            ("ns/degraded", cached_cluster("degraded", "u-degraded", 2)),
        ]);
        let cached = |key: &str| cache.get(key).cloned();
        assert_eq!(
            book.oldest_unconverged(Instant::now(), cached),
            Duration::ZERO
        );

        book.unconverged_since
            .insert("ns/degraded".into(), Instant::now());
        book.unconverged_since
            .insert("ns/gone".into(), Instant::now());
        book.terminal.insert(
            "u-degraded".into(),
            (
                Some(2),
                TerminalProblem {
                    reason: "StatefulSetRejected".into(),
                    message: "invalid".into(),
                },
            ),
        );
        tokio::time::advance(Duration::from_secs(100)).await;
        book.unconverged_since
            .insert("ns/stuck".into(), Instant::now());
        tokio::time::advance(Duration::from_secs(30)).await;
        book.unconverged_since
            .insert("ns/fresh".into(), Instant::now());
        tokio::time::advance(Duration::from_secs(5)).await;
        // Degraded and no longer cached (left the shard) are older but do not count.
        assert_eq!(
            book.oldest_unconverged(Instant::now(), cached),
            Duration::from_secs(35)
        );
        // A new generation of the Degraded object is being worked on again.
        let cache = HashMap::from([("ns/degraded", cached_cluster("degraded", "u-degraded", 3))]);
        assert_eq!(
            book.oldest_unconverged(Instant::now(), |key: &str| cache.get(key).cloned()),
            Duration::from_secs(135)
        );
        // Converged: gone from the map.
        book.unconverged_since.remove("ns/stuck");
        book.unconverged_since.remove("ns/fresh");
        book.unconverged_since.remove("ns/degraded");
        assert_eq!(
            book.oldest_unconverged(Instant::now(), cached),
            Duration::ZERO
        );
    }

    #[test]
    fn a_converge_clears_only_the_join_it_saw() {
        let mut book = Bookkeeping::default();
        book.mark_joined("ns/a".into());
        let seen = book.ownership_changed.get("ns/a").copied();
        // The object left and joined again while the converge ran.
        book.mark_joined("ns/a".into());
        book.children_relabelled("ns/a", seen);
        assert!(book.ownership_changed.contains_key("ns/a"));
        let seen = book.ownership_changed.get("ns/a").copied();
        book.children_relabelled("ns/a", seen);
        assert!(book.ownership_changed.is_empty());
        book.children_relabelled("ns/a", None);
        assert!(book.ownership_changed.is_empty());
    }

    #[test]
    fn the_apply_memo_is_dropped_once_the_watch_delivers_the_applied_version() {
        let service = |version: &str| Service {
            metadata: kube::api::ObjectMeta {
                namespace: Some("ns".into()),
                name: Some("a-headless".into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut book = Bookkeeping::default();
        let key = Bookkeeping::applied_key("Service", "ns", "a-headless");
        book.applied.insert(
            key.clone(),
            (1, Some(7), Arc::new(service("7")) as AppliedObject),
        );
        // An older version (the watch is still behind our write) keeps it.
        book.forget_applied_once_seen(&service("6"));
        assert!(book.applied.contains_key(&key));
        // The applied version, or a later one, makes the cache authoritative again.
        book.forget_applied_once_seen(&service("7"));
        assert!(!book.applied.contains_key(&key));
    }

    #[test]
    fn the_status_memo_is_dropped_once_the_watch_delivers_the_write() {
        let cluster = |version: &str| -> DatabaseCluster {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "shardop.dev/v1alpha1",
                "kind": "DatabaseCluster",
                "metadata": { "namespace": "ns", "name": "a", "resourceVersion": version },
                "spec": { "replicas": 1, "image": "postgres:17", "storage": { "size": "1Gi" } },
            }))
            .unwrap()
        };
        let mut book = Bookkeeping::default();
        let written = WrittenStatus {
            resource_version: 7,
            status: Default::default(),
        };
        book.status_written.insert("ns/a".into(), written);
        book.forget_status_once_seen(&cluster("6"));
        assert!(book.status_written.contains_key("ns/a"));
        book.forget_status_once_seen(&cluster("8"));
        assert!(book.status_written.is_empty());

        book.status_written.insert(
            "ns/a".into(),
            WrittenStatus {
                resource_version: 9,
                status: Default::default(),
            },
        );
        book.forget_object(&cluster("9"));
        assert!(book.status_written.is_empty());
    }
}
