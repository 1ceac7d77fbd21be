//! The DatabaseCluster controller of one served shard (one kube-runtime Controller per
//! watched namespace): label-filtered watches of the DatabaseClusters and their children
//! through the shard's [`ShardScope`], the worker's bookkeeping for metrics, and the load
//! report behind the gauges and the Shard heartbeat. The reconcile itself is in
//! [`crate::reconcile`]; whether this shard may act on an object is the library's
//! ([`ShardScope::admit`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use shardop::{ShardIndex, ShardLoad, ShardScope};
use shardop_api::DatabaseCluster;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::{BackoffPolicy, FailureCounts};
use crate::book::key_of;
use crate::child_cache::Projected;
use crate::child_events::ChildCache;
use crate::child_store::ChildStore;
use crate::cluster_cache::CachedCluster;
use crate::context::{ScopeContext, ShardShared};
use crate::reconcile;
use crate::resync;

/// Settings shared by every shard controller of the process.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// Namespaces to watch; empty = all namespaces.
    pub namespaces: Vec<String>,
    /// Reconciles running at once per controller.
    pub concurrency: u16,
    /// Backoff of transient errors.
    pub backoff: BackoffPolicy,
    /// Requeue delay of a reconcile refused because the shard's Lease was not valid.
    pub retry_period: Duration,
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
fn load(shared: &ShardShared, stores: &[Store<CachedCluster>]) -> ShardLoad {
    let mut load = ShardLoad::default();
    for store in stores {
        for object in store.state() {
            load.objects += 1;
            load.backlog += i64::from(object.is_behind());
            load.terminating += i64::from(object.meta().deletion_timestamp.is_some());
        }
    }
    let cached = |key: &str| {
        let (namespace, name) = key.split_once('/')?;
        let object = ObjectRef::new(name).within(namespace);
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
    Store<CachedCluster>,
    futures::future::BoxFuture<'static, ()>,
) {
    let scope = shared.scope.clone();
    let client = scope.client();
    let config = scope.watcher_config();

    let (clusters, cluster_writer) = reflector::store::<CachedCluster>();
    let (stateful_sets, services) = (ChildStore::default(), ChildStore::default());
    scope.track_cache(clusters.clone());
    let clusters_synced = CancellationToken::new();

    let children = ChildWatches::start(
        &shared,
        &client,
        namespace,
        &config,
        &stateful_sets,
        &services,
    );
    let (sts_synced, svc_synced) = (children.sts_synced.clone(), children.svc_synced.clone());
    // DatabaseCluster events start flowing only once the child caches are complete, so the
    // first reconcile of every object sees its children (no blind re-apply after start-up).
    let children_synced = all_cancelled([sts_synced.clone(), svc_synced.clone()]);
    let cluster_events = cluster_events(
        &shared,
        cluster_writer,
        scoped_api::<DatabaseCluster>(&client, namespace),
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
        .reconcile_on(children.sts_events)
        .reconcile_on(children.svc_events)
        .reconcile_on(resync::due_for_resync(
            clusters.clone(),
            resync::RESYNC_PERIOD,
        ))
        .with_config(ControllerConfig::default().concurrency(settings.concurrency))
        .graceful_shutdown_on(scope.stopped());

    let report_synced = synced.report_when(scope, [clusters_synced, sts_synced, svc_synced]);
    let run = controller
        .run(reconcile::reconcile, reconcile::error_policy, context)
        .for_each(log_controller_error(shared.shard));
    let run = async move {
        // Dropped both when the controller ends and when this future is aborted (stop
        // timeout): the helper tasks never outlive their controller.
        let _helpers = AbortOnDrop(vec![
            tokio::spawn(report_synced),
            children.sts_task,
            children.svc_task,
        ]);
        run.await;
    };
    (clusters, Box::pin(run))
}

impl SyncedScopes {
    /// Waits until all `caches` of one namespace scope are synced, and reports the shard
    /// synced once every scope's are.
    async fn report_when(self, scope: ShardScope, caches: [CancellationToken; 3]) {
        all_cancelled(caches).await;
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 >= self.of {
            scope.report_synced();
        }
    }
}

/// Completes once every one of `tokens` is cancelled (each marks a synced cache).
async fn all_cancelled<const N: usize>(tokens: [CancellationToken; N]) {
    for token in &tokens {
        token.cancelled().await;
    }
}

/// What the controller's result stream gets: errors are logged at debug (the reconcile
/// and the watches report their own).
fn log_controller_error<T, E: std::fmt::Display>(
    shard: ShardIndex,
) -> impl FnMut(Result<T, E>) -> futures::future::Ready<()> {
    move |result| {
        if let Err(err) = result {
            tracing::debug!(%shard, %err, "controller event");
        }
        futures::future::ready(())
    }
}

/// The parents whose children changed, for the controller.
type ParentsToReconcile = futures::channel::mpsc::UnboundedReceiver<ObjectRef<CachedCluster>>;

/// The StatefulSet and Service watches of one namespace scope, each driven by its own task.
struct ChildWatches {
    sts_task: JoinHandle<()>,
    sts_events: ParentsToReconcile,
    sts_synced: CancellationToken,
    svc_task: JoinHandle<()>,
    svc_events: ParentsToReconcile,
    svc_synced: CancellationToken,
}

impl ChildWatches {
    /// The child caches are driven by their own tasks, not by the controller: kube-runtime
    /// stops polling its trigger streams while the runner waits for its main store or is
    /// at full concurrency, and a reconcile compares children with these caches. Their
    /// events reach the controller through unbounded channels (bounded in practice by the
    /// number of children and how long a stall lasts).
    fn start(
        shared: &Arc<ShardShared>,
        client: &Client,
        namespace: Option<&str>,
        config: &watcher::Config,
        stateful_sets: &ChildStore<StatefulSet>,
        services: &ChildStore<Service>,
    ) -> Self {
        let sts_synced = CancellationToken::new();
        let svc_synced = CancellationToken::new();
        let (sts_task, sts_events) = drive_children(
            ChildCache::new(stateful_sets.clone()),
            watcher(scoped_api::<StatefulSet>(client, namespace), config.clone()),
            sts_synced.clone(),
            shared.clone(),
        );
        let (svc_task, svc_events) = drive_children(
            ChildCache::new(services.clone()),
            watcher(scoped_api::<Service>(client, namespace), config.clone()),
            svc_synced.clone(),
            shared.clone(),
        );
        Self {
            sts_task,
            sts_events,
            sts_synced,
            svc_task,
            svc_events,
            svc_synced,
        }
    }
}

/// Keeps the worker's memos and counters in step with what the DatabaseCluster watch
/// delivered (after the reflector stored it).
fn on_cluster_event(
    shared: &ShardShared,
    event: &Result<watcher::Event<CachedCluster>, watcher::Error>,
    synced: &CancellationToken,
) {
    match event {
        Ok(watcher::Event::InitDone) => synced.cancel(),
        // A reconcile that finds the memo gone finds the write in the cache.
        Ok(watcher::Event::Apply(cluster) | watcher::Event::InitApply(cluster)) => {
            shared.book().forget_status_once_seen(cluster);
        }
        Ok(watcher::Event::Delete(cluster)) => shared.forget_object(cluster),
        Ok(watcher::Event::Init) => {}
        // Nothing else reports it: kube-runtime's watcher retries silently, and a missing
        // permission or CRD would leave the shard unsynced without a word.
        Err(err) => shardop::reachability::log_watch_error("DatabaseClusters", err),
    }
}

/// An `Api` of one namespace, or of all (`None`).
fn scoped_api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The DatabaseCluster events of one namespace scope that call for a reconcile: the
/// shard's watch through the library's filter ([`ShardScope::filter_events`]), with the
/// worker's memos kept in step with what the watch delivers.
fn cluster_events(
    shared: &Arc<ShardShared>,
    writer: reflector::store::Writer<CachedCluster>,
    api: Api<DatabaseCluster>,
    config: watcher::Config,
    synced: CancellationToken,
) -> impl futures::Stream<Item = Result<CachedCluster, watcher::Error>> + Send + 'static {
    let trim = shared.scope.clone();
    let events = reflector::reflector(
        writer,
        watcher(api, config)
            .modify(move |cluster| {
                trim.trim_cached(cluster);
                drop_unread_metadata(cluster);
            })
            .map_ok(cached_cluster_event),
    )
    .default_backoff()
    .inspect({
        let shared = shared.clone();
        move |event| on_cluster_event(&shared, event, &synced)
    });
    let shared = shared.clone();
    shared
        .scope
        .filter_events(events)
        .inspect_ok(move |cluster| {
            if cluster.is_behind() {
                shared.book().mark_unconverged(&key_of(cluster));
            }
        })
}

/// Drops what neither the reconcile nor the filters read of a cached DatabaseCluster: its
/// annotations (`kubectl apply` keeps a copy of the whole object in one). The library's
/// trim ([`ShardScope::trim_cached`]) has replaced the managed fields already.
pub(crate) fn drop_unread_metadata(cluster: &mut DatabaseCluster) {
    cluster.metadata.annotations = None;
}

/// A watch event with the cluster in its cached form.
fn cached_cluster_event(event: watcher::Event<DatabaseCluster>) -> watcher::Event<CachedCluster> {
    map_event(event, CachedCluster::of)
}

/// A watch event with its object turned into another form.
fn map_event<A, B>(event: watcher::Event<A>, into: impl Fn(A) -> B) -> watcher::Event<B> {
    use watcher::Event;
    match event {
        Event::Apply(object) => Event::Apply(into(object)),
        Event::Delete(object) => Event::Delete(into(object)),
        Event::InitApply(object) => Event::InitApply(into(object)),
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
    }
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

/// Drives a child cache in its own task; returns the task and the stream of the parents
/// whose children call for a reconcile ([`ChildCache::apply`]), for the controller. Every
/// such parent is marked pending.
fn drive_children<K, W>(
    mut cache: ChildCache<K>,
    watch: W,
    synced: CancellationToken,
    shared: Arc<ShardShared>,
) -> (JoinHandle<()>, ParentsToReconcile)
where
    K: Projected,
    W: futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
{
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let driver = watch.default_backoff().for_each(move |event| {
        match event {
            Ok(event) => {
                // Deletes too: a child that leaves the shard's selector (someone gave it
                // another shard's label) is invisible from then on, and only a reconcile
                // of its parent puts the label back.
                let parents = cache.apply(&event);
                if let watcher::Event::Apply(child)
                | watcher::Event::InitApply(child)
                | watcher::Event::Delete(child) = &event
                {
                    // After the cache holds this version (see `reconcile::apply_if_changed`).
                    shared.book().forget_applied_once_seen(child);
                }
                if matches!(event, watcher::Event::InitDone) {
                    synced.cancel();
                }
                for parent in parents {
                    shared.scope.mark_pending(&parent);
                    // The receiver is gone only when the controller stopped.
                    let _ = tx.unbounded_send(parent);
                }
            }
            Err(err) => shardop::reachability::log_watch_error("children", &err),
        }
        futures::future::ready(())
    });
    (tokio::spawn(driver), rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use shardop::OperatorNames;
    use std::collections::BTreeMap;

    #[test]
    fn a_cached_cluster_keeps_what_the_reconcile_and_the_filters_read() {
        let mut cluster: DatabaseCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "shardop.dev/v1alpha1",
            "kind": "DatabaseCluster",
            "metadata": {
                "name": "db", "namespace": "ns", "uid": "u", "generation": 3,
                "resourceVersion": "7",
                "labels": { "shardop.dev/shard": "1" },
                "finalizers": ["shardop.dev/cleanup"],
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"spec\": {}}"
                },
            },
            "spec": { "replicas": 2, "image": "postgres:17", "storage": { "size": "1Gi" } },
            "status": { "observedGeneration": 2, "replicas": 2, "readyReplicas": 0, "conditions": [], "shard": 1 },
        }))
        .unwrap();
        cluster.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        let before = cluster.clone();
        drop_unread_metadata(&mut cluster);
        assert_eq!(cluster.metadata.annotations, None);
        let mut without = before.clone();
        without.metadata.annotations = None;
        assert_eq!(
            serde_json::to_value(&cluster).unwrap(),
            serde_json::to_value(&without).unwrap(),
            "nothing else is dropped"
        );
        assert_eq!(
            cluster.metadata.labels,
            Some(BTreeMap::from([("shardop.dev/shard".into(), "1".into())]))
        );
        assert_eq!(cluster.metadata.finalizers, before.metadata.finalizers);
        assert_eq!(cluster.metadata.generation, Some(3));
        assert!(CachedCluster::of(cluster).is_behind());
    }

    /// The shared state of shard 1, with a client that answers every request `200 {}`.
    fn shared() -> ShardShared {
        let service = tower::service_fn(|_: http::Request<kube::client::Body>| async {
            let body = kube::client::Body::from(b"{}".to_vec());
            Ok::<_, std::convert::Infallible>(http::Response::new(body))
        });
        let client = Client::new(service, "default");
        let shard = ShardIndex(1);
        let valid_until = tokio::time::Instant::now() + Duration::from_secs(60);
        let guard = shardop::LeaseGuard::detached(shard, valid_until);
        let scope = ShardScope::detached(shard, OperatorNames::default(), client, guard.clone());
        ShardShared {
            metrics: scope.metrics().clone(),
            scope,
            shard,
            guard,
            backoff: BackoffPolicy {
                base: Duration::from_millis(500),
                cap: Duration::from_secs(300),
            },
            failures: FailureCounts::default(),
            cleanup_passes: FailureCounts::default(),
            book: Mutex::default(),
            retry_period: Duration::from_secs(2),
        }
    }

    #[tokio::test]
    async fn an_object_that_left_the_shard_leaves_no_counts_for_its_name() {
        let shared = shared();
        let cluster: DatabaseCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "shardop.dev/v1alpha1",
            "kind": "DatabaseCluster",
            "metadata": { "name": "db", "namespace": "ns", "uid": "u" },
            "spec": { "replicas": 1, "image": "postgres:17", "storage": { "size": "1Gi" } },
        }))
        .unwrap();
        let cluster = CachedCluster::of(cluster);
        let key = key_of(&cluster);
        // A cleanup waited for claims, then somebody removed the finalizer by hand.
        shared.cleanup_passes.record_failure(key.clone());
        shared.failures.record_failure(key.clone());
        let synced = CancellationToken::new();
        on_cluster_event(&shared, &Ok(watcher::Event::Delete(cluster)), &synced);
        // An object created again under the name starts its cleanup at the first pass.
        assert_eq!(shared.cleanup_passes.count(&key), 0);
        assert_eq!(shared.failures.count(&key), 0);
    }
}
