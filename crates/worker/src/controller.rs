//! The DatabaseCluster controller of one served shard (one kube-runtime Controller per
//! watched namespace): label-filtered watches of the DatabaseClusters and their children
//! through the shard's [`ShardScope`], the worker's bookkeeping for metrics, and the load
//! report behind the gauges and the Shard heartbeat. The reconcile itself is in
//! [`crate::reconcile`]; whether this shard may act on an object is the library's
//! ([`ShardScope::admit`]).

use std::collections::HashMap;
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
use shardop::{LeaseGuard, ShardIndex, ShardLoad, ShardMetrics, ShardScope};
use shardop_api::DatabaseCluster;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::{BackoffPolicy, FailureCounts};
use crate::reconcile;
use crate::status::{TerminalProblem, WrittenStatus, is_behind};

/// Settings shared by every shard controller of the process.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// Namespaces to watch; empty = all namespaces.
    pub namespaces: Vec<String>,
    /// Reconciles running at once per controller.
    pub concurrency: u16,
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
}

/// A child object as returned by its last apply (a StatefulSet or a Service).
pub type AppliedObject = Arc<dyn std::any::Any + Send + Sync>;

impl Bookkeeping {
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
    /// The shard as the sharding library serves it: admission, fenced client, moves.
    pub scope: ShardScope,
    /// The shard.
    pub shard: ShardIndex,
    /// Its Lease fence.
    pub guard: LeaseGuard,
    /// Metrics.
    pub metrics: ShardMetrics,
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

/// Serves one shard until its scope stops: one controller per watched namespace, and a
/// load report from their caches. `settings` are the process's.
pub async fn serve(scope: ShardScope, settings: ControllerSettings) {
    let shard = scope.shard();
    let shared = Arc::new(ShardShared {
        scope: scope.clone(),
        shard,
        guard: scope.guard().clone(),
        metrics: scope.metrics().clone(),
        backoff: settings.backoff,
        failures: FailureCounts::default(),
        cleanup_passes: FailureCounts::default(),
        book: Mutex::default(),
        retry_period: settings.retry_period,
    });
    let namespaces: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };
    let synced = Arc::new(AtomicUsize::new(0));
    let mut stores = Vec::new();
    let mut runs = Vec::new();
    for namespace in &namespaces {
        let (store, run) = scope_controller(
            shared.clone(),
            namespace.as_deref(),
            &settings,
            SyncedScopes {
                count: synced.clone(),
                of: namespaces.len(),
            },
        );
        stores.push(store);
        runs.push(run);
    }
    scope.report_load({
        let shared = shared.clone();
        move || load(&shared, &stores)
    });
    futures::future::join_all(runs).await;
}

/// The shard's load, from the caches and the bookkeeping (the library adds queue depth and
/// the longest running reconcile).
fn load(shared: &ShardShared, stores: &[Store<DatabaseCluster>]) -> ShardLoad {
    let mut load = ShardLoad::default();
    for store in stores {
        for object in store.state() {
            load.objects += 1;
            load.backlog += i64::from(is_behind(&object));
            load.terminating += i64::from(object.metadata.deletion_timestamp.is_some());
        }
    }
    let cached = |key: &str| {
        let (namespace, name) = key.split_once('/')?;
        let object = reflector::ObjectRef::new(name).within(namespace);
        stores.iter().find_map(|store| store.get(&object))
    };
    load.oldest_unconverged = shared.book().oldest_unconverged(Instant::now(), cached);
    load
}

/// How many namespace scopes of the shard have synced caches, out of how many: the shard
/// is synced once all have.
#[derive(Clone)]
struct SyncedScopes {
    count: Arc<AtomicUsize>,
    of: usize,
}

/// Builds the controller of one namespace scope (`None` = all namespaces).
fn scope_controller(
    shared: Arc<ShardShared>,
    namespace: Option<&str>,
    settings: &ControllerSettings,
    synced: SyncedScopes,
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
    let scope = shared.scope.clone();
    let client = scope.client();
    let config = scope.watcher_config();

    let (clusters, cluster_writer) = reflector::store::<DatabaseCluster>();
    let (stateful_sets, sts_writer) = reflector::store::<StatefulSet>();
    let (services, svc_writer) = reflector::store::<Service>();
    scope.track_cache(clusters.clone());
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
    let children_synced = {
        let (sts, svc) = (sts_synced.clone(), svc_synced.clone());
        async move {
            sts.cancelled().await;
            svc.cancelled().await;
        }
    };
    let cluster_events = cluster_events(
        &shared,
        cluster_writer,
        api::<DatabaseCluster>(&client, namespace),
        config,
        clusters_synced.clone(),
    );
    let cluster_events = futures::stream::once(async move {
        children_synced.await;
        cluster_events
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
        .graceful_shutdown_on(scope.stopped());

    let shard = shared.shard;
    let report_synced = {
        let tokens = [clusters_synced, sts_synced, svc_synced];
        async move {
            for token in &tokens {
                token.cancelled().await;
            }
            if synced.count.fetch_add(1, Ordering::AcqRel) + 1 >= synced.of {
                scope.report_synced();
            }
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

/// The DatabaseCluster events of one namespace scope that call for a reconcile: the
/// shard's watch through the library's filter ([`ShardScope::filter_events`]), with the
/// worker's memos kept in step with what the watch delivers.
fn cluster_events(
    shared: &Arc<ShardShared>,
    writer: reflector::store::Writer<DatabaseCluster>,
    api: Api<DatabaseCluster>,
    config: watcher::Config,
    synced: CancellationToken,
) -> impl futures::Stream<Item = Result<DatabaseCluster, watcher::Error>> + Send + 'static {
    let trim = shared.scope.clone();
    let events = reflector::reflector(
        writer,
        watcher(api, config).modify(move |cluster| trim.trim_cached(cluster)),
    )
    .default_backoff()
    .inspect({
        let shared = shared.clone();
        move |event| match event {
            Ok(watcher::Event::InitDone) => synced.cancel(),
            // After the reflector stored the object: a reconcile that finds the memo gone
            // finds the write in the cache.
            Ok(watcher::Event::Apply(cluster) | watcher::Event::InitApply(cluster)) => {
                shared.book().forget_status_once_seen(cluster);
            }
            // The object left the shard (drain acknowledged, relabelled, deleted):
            // whatever this shard applied for it may be relabelled by its next owner, so
            // its memos are void.
            Ok(watcher::Event::Delete(cluster)) => {
                let mut book = shared.book();
                book.forget_object(cluster);
                book.unconverged_since.remove(&key_of(cluster));
            }
            Ok(watcher::Event::Init) | Err(_) => {}
        }
    });
    let shared = shared.clone();
    shared
        .scope
        .filter_events(events)
        .inspect_ok(move |cluster| {
            if is_behind(cluster) {
                shared
                    .book()
                    .unconverged_since
                    .entry(key_of(cluster))
                    .or_insert_with(Instant::now);
            }
        })
}

/// Cached children do without `managedFields`: nothing reads them, and they are a large
/// share of every object (one entry per field manager: ours, the controller manager's
/// status writes).
fn drop_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
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
                        shared.scope.mark_pending(parent);
                    }
                    // The receiver is gone only when the controller stopped.
                    let _ = tx.unbounded_send(Ok(child));
                }
                Err(err) => shardop::reachability::log_watch_error("children", &err),
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
