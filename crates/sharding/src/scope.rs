//! [`ShardScope`]: what the controller of one served shard gets from the runtime: a client
//! fenced by the shard's Lease, the shard's watcher config, a kube-runtime `Controller`
//! over the shard's slice, the admission check every reconcile goes through (Lease held,
//! object in the slice, drains acknowledged and never delivered), children labels, and the
//! per-shard bookkeeping behind the metrics and the Shard heartbeat.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::change_filter::ChangeFilter;
use crate::lease::{LeaseGuard, LeaseLost};
use crate::metrics::{ShardLoad, ShardMetrics};
use crate::names::OperatorNames;
use crate::protocol::{ObjectPlacement, WorkerAction, worker_action};
use crate::shard_index::ShardIndex;
use crate::strategy::AssignmentStrategy;

/// `namespace/name` of an object (`/name` for a cluster-scoped one). It does not say the
/// kind: the per-shard bookkeeping keys objects by [`bookkeeping_key`].
pub fn object_key<K: Resource>(object: &K) -> String {
    let meta = object.meta();
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// `group/kind/namespace/name` of an object of the kind `dyntype` (an empty group for the
/// core API, an empty namespace for a cluster-scoped object): the key of the per-shard
/// bookkeeping. One scope may run controllers of several kinds, and objects of two kinds
/// with the same namespace and name hash to the same shard: without the kind, the end of
/// one's reconcile would count as the end of the other's.
pub fn bookkeeping_key<K: Resource>(object: &K, dyntype: &K::DynamicType) -> String {
    let meta = object.meta();
    key_of(
        &K::group(dyntype),
        &K::kind(dyntype),
        meta.namespace.as_deref(),
        meta.name.as_deref().unwrap_or_default(),
    )
}

/// [`bookkeeping_key`] of the object `object` refers to.
pub fn bookkeeping_key_of_ref<K: Resource>(object: &ObjectRef<K>) -> String {
    key_of(
        &K::group(&object.dyntype),
        &K::kind(&object.dyntype),
        object.namespace.as_deref(),
        &object.name,
    )
}

/// [`bookkeeping_key`] of an object of kind `resource`, from its metadata.
fn resource_key(resource: &ApiResource, meta: &kube::api::ObjectMeta) -> String {
    key_of(
        &resource.group,
        &resource.kind,
        meta.namespace.as_deref(),
        meta.name.as_deref().unwrap_or_default(),
    )
}

fn key_of(group: &str, kind: &str, namespace: Option<&str>, name: &str) -> String {
    format!("{group}/{kind}/{}/{name}", namespace.unwrap_or_default())
}

/// What a reconcile may do with an object, decided by [`ShardScope::admit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Converge the object (W1 of the protocol).
    Reconcile,
    /// The object is being deleted: run the finalizer's cleanup.
    Cleanup,
    /// Not this shard's business (not in its slice, untrusted label, a drain this call
    /// acknowledged or an earlier one did): do not touch it.
    Skip,
}

/// Why an admission failed.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    /// The shard's Lease is not held: nothing was written, the reconcile must not run.
    #[error(transparent)]
    LeaseLost(#[from] LeaseLost),
    /// The drain acknowledgement (W2) failed; the object is looked at again.
    #[error("acknowledging the drain: {0}")]
    Drain(#[source] kube::Error),
}

/// A change of owner the children of an object have not followed yet (see
/// [`ShardScope::moved_in`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoveIn(u64);

type LoadReport = Box<dyn Fn() -> ShardLoad + Send + Sync>;

/// How long a shard remembers the drains it acknowledged (one entry per moved object).
const ACKNOWLEDGED_MEMORY: Duration = Duration::from_secs(600);

/// Whether an object (by [`bookkeeping_key`]) is in one of the shard's caches.
type CacheLookup = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Per-object bookkeeping of one served shard.
#[derive(Default)]
struct ScopeBook {
    /// Objects with an event not yet picked up by a reconcile, with the first such event.
    pending: HashMap<String, Instant>,
    /// Reconciles running, with their start.
    running: HashMap<String, Instant>,
    /// Objects that joined the shard and whose children have not been applied since,
    /// numbered so a converge clears only the join it saw.
    joined: HashMap<String, u64>,
    /// Joins numbered so far.
    joins: u64,
    /// UIDs whose drain this shard acknowledged, with when: no copy of the object from
    /// before the acknowledgement is acted on (see [`ShardScope::already_acknowledged`]).
    acknowledged: HashMap<String, Instant>,
    /// Objects whose drain is being acknowledged straight from their watch event (ahead
    /// of the reconcile queue), each with a lock the acknowledgement holds while it runs:
    /// a reconcile of the object waits for it to end before it starts.
    acknowledging: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

impl ScopeBook {
    fn mark_pending(&mut self, key: String) {
        self.pending.entry(key).or_insert_with(Instant::now);
    }

    fn start_running(&mut self, key: &str) -> Option<Duration> {
        self.running.insert(key.to_owned(), Instant::now());
        self.pending.remove(key).map(|since| since.elapsed())
    }

    fn mark_joined(&mut self, key: String) {
        self.joins = self.joins.wrapping_add(1);
        self.joined.insert(key, self.joins);
    }

    /// The children were re-applied after join `join`: forget it unless the object
    /// joined again since.
    fn clear_join(&mut self, key: &str, join: u64) {
        if self.joined.get(key) == Some(&join) {
            self.joined.remove(key);
        }
    }

    fn forget(&mut self, key: &str) {
        self.pending.remove(key);
        self.joined.remove(key);
    }

    /// A watch event shows the object `uid` owned by this shard again (the assigner
    /// assigned it back after the acknowledgement): copies from now on are ours. Events
    /// arrive in order, so this one is newer than the acknowledged version.
    fn returned(&mut self, uid: &str) {
        self.acknowledged.remove(uid);
    }

    /// Forgets acknowledgements older than [`ACKNOWLEDGED_MEMORY`]: by then the object's
    /// watch has removed it from the cache, and a reconcile that read a copy from before
    /// the acknowledgement has long been admitted or skipped.
    fn prune_acknowledged(&mut self) {
        self.acknowledged
            .retain(|_, at| at.elapsed() < ACKNOWLEDGED_MEMORY);
    }

    /// Reserves `key` for an acknowledgement ahead of the queue: only while no reconcile
    /// of it runs and no other acknowledgement of it is under way, so the acknowledgement
    /// still comes after the object's in-flight reconcile (the protocol's W2). The guard is
    /// held until the acknowledgement ended.
    fn reserve_acknowledgement(&mut self, key: &str) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        if self.running.contains_key(key) || self.acknowledging.contains_key(key) {
            return None;
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        let guard = lock.clone().try_lock_owned().ok()?;
        self.acknowledging.insert(key.to_owned(), lock);
        Some(guard)
    }
}

/// Two controllers' loads together: counts add, the oldest ages win.
fn add_loads(total: ShardLoad, load: ShardLoad) -> ShardLoad {
    ShardLoad {
        objects: total.objects.saturating_add(load.objects),
        backlog: total.backlog.saturating_add(load.backlog),
        terminating: total.terminating.saturating_add(load.terminating),
        queue_depth: total.queue_depth.saturating_add(load.queue_depth),
        longest_running: total.longest_running.max(load.longest_running),
        oldest_unconverged: total.oldest_unconverged.max(load.oldest_unconverged),
    }
}

struct ScopeInner {
    shard: ShardIndex,
    names: OperatorNames,
    strategy: Arc<dyn AssignmentStrategy>,
    client: Client,
    guard: LeaseGuard,
    stop: CancellationToken,
    metrics: ShardMetrics,
    streaming_lists: bool,
    book: Mutex<ScopeBook>,
    /// One report per controller (or per caller of [`ShardScope::report_load`]).
    load: Mutex<Vec<LoadReport>>,
    caches: Mutex<Vec<CacheLookup>>,
    synced: AtomicBool,
}

/// One served shard, as its controller sees it. Cheap to clone; valid for one acquisition
/// of the shard's Lease (a new acquisition gets a new scope).
#[derive(Clone)]
pub struct ShardScope {
    inner: Arc<ScopeInner>,
}

impl Debug for ShardScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardScope")
            .field("shard", &self.inner.shard)
            .field("operator", &self.inner.names.operator())
            .finish_non_exhaustive()
    }
}

/// What the runtime hands a new scope.
pub(crate) struct ScopeParts {
    pub shard: ShardIndex,
    pub names: OperatorNames,
    pub strategy: Arc<dyn AssignmentStrategy>,
    pub client: Client,
    pub guard: LeaseGuard,
    pub metrics: ShardMetrics,
    pub streaming_lists: bool,
}

impl ShardScope {
    pub(crate) fn new(parts: ScopeParts) -> Self {
        Self {
            inner: Arc::new(ScopeInner {
                shard: parts.shard,
                names: parts.names,
                strategy: parts.strategy,
                client: parts.client,
                guard: parts.guard,
                stop: CancellationToken::new(),
                metrics: parts.metrics,
                streaming_lists: parts.streaming_lists,
                book: Mutex::default(),
                load: Mutex::default(),
                caches: Mutex::default(),
                synced: AtomicBool::new(false),
            }),
        }
    }

    /// A scope for tests of code that takes one: shard `shard` of operator `names` with
    /// the label strategy, `client`, and a Lease `guard` that is never renewed.
    pub fn detached(
        shard: ShardIndex,
        names: OperatorNames,
        client: Client,
        guard: LeaseGuard,
    ) -> Self {
        let mut registry = prometheus_client::registry::Registry::default();
        Self::new(ScopeParts {
            shard,
            strategy: Arc::new(crate::strategy::LabelAssignment::new(names.clone())),
            names,
            client,
            guard,
            metrics: ShardMetrics::register(&mut registry),
            streaming_lists: false,
        })
    }

    fn book(&self) -> MutexGuard<'_, ScopeBook> {
        self.inner
            .book
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The shard served.
    pub fn shard(&self) -> ShardIndex {
        self.inner.shard
    }

    /// The operator's cluster-visible names.
    pub fn names(&self) -> &OperatorNames {
        &self.inner.names
    }

    /// A client acting as this shard: its writes are fenced by the shard's Lease (refused
    /// with [`LeaseLost`] once the Lease is not held, see [`crate::client::fenced_out`]).
    pub fn client(&self) -> Client {
        self.inner.client.clone()
    }

    /// The shard Lease's fence, for checks before a write and for waiting on its loss.
    pub fn guard(&self) -> &LeaseGuard {
        &self.inner.guard
    }

    /// `Ok` while the shard's Lease is held.
    pub fn check(&self) -> Result<(), LeaseLost> {
        self.inner.guard.check()
    }

    /// The per-shard metrics.
    pub fn metrics(&self) -> &ShardMetrics {
        &self.inner.metrics
    }

    /// Completes when the shard stops being served here: its Lease is lost, it is handed
    /// back, or the process shuts down. Pass it to `Controller::graceful_shutdown_on`.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        let stop = self.inner.stop.clone();
        let lost = self.inner.guard.cancelled();
        async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = lost => {}
            }
        }
    }

    /// Whether the shard is being stopped (or its Lease is lost).
    pub fn is_stopping(&self) -> bool {
        self.inner.stop.is_cancelled() || !self.inner.guard.is_valid()
    }

    pub(crate) fn request_stop(&self) {
        self.inner.stop.cancel();
    }

    /// The watcher config of the shard's slice: for the watch of the sharded kind and of
    /// its children (`Controller::owns(api, scope.watcher_config())`).
    pub fn watcher_config(&self) -> watcher::Config {
        let config = self.inner.strategy.watcher_config(self.inner.shard);
        if self.inner.streaming_lists {
            config.streaming_lists()
        } else {
            config
        }
    }

    /// The labels every child of a reconciled object carries, so that it follows its
    /// controller's shard (and shows in the shard's child watch).
    pub fn child_labels(&self) -> BTreeMap<String, String> {
        self.inner.strategy.child_labels(self.inner.shard)
    }

    /// Adds [`child_labels`](Self::child_labels) to a child object.
    pub fn label_child<C: Resource>(&self, child: &mut C) {
        let labels = child.meta_mut().labels.get_or_insert_with(BTreeMap::new);
        labels.extend(self.child_labels());
    }

    /// Where an object stands in the protocol, for this shard's assignment strategy.
    pub fn placement<K: Resource>(&self, object: &K) -> ObjectPlacement {
        self.inner.strategy.placement(object.meta())
    }

    /// Adds a report of the shard's load to the gauges and the Shard heartbeat: `report` is
    /// called once per supervisor tick. The reports of several controllers (one per kind)
    /// add up: counts are summed, and the oldest unconverged change is the oldest of all.
    /// [`controller`](Self::controller) installs one that counts its cache; queue depth and
    /// the longest running reconcile are added by the scope.
    pub fn report_load(&self, report: impl Fn() -> ShardLoad + Send + Sync + 'static) {
        self.inner
            .load
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(report));
    }

    /// The shard's load: the controllers' reports plus the scope's queue bookkeeping.
    pub(crate) fn load(&self) -> ShardLoad {
        let mut load = self
            .inner
            .load
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|report| report())
            .fold(ShardLoad::default(), add_loads);
        let caches = self
            .inner
            .caches
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut book = self.book();
        book.prune_acknowledged();
        // Only objects still in a cache wait: one that left the shard (drain acknowledged,
        // deleted, relabelled) before its queued reconcile ran is not waiting any more.
        if !caches.is_empty() {
            book.pending
                .retain(|key, _| caches.iter().any(|cached| cached(key)));
        }
        load.queue_depth = i64::try_from(book.pending.len()).unwrap_or(i64::MAX);
        load.longest_running = book
            .running
            .values()
            .map(Instant::elapsed)
            .max()
            .unwrap_or_default();
        load
    }

    /// Says that the shard's caches have their initial lists: the process is ready once
    /// its home shard's scope said so. [`controller`](Self::controller) says it itself.
    pub fn report_synced(&self) {
        if !self.inner.synced.swap(true, Ordering::AcqRel) {
            tracing::info!(shard = %self.inner.shard, "shard caches synced");
        }
    }

    /// Whether [`report_synced`](Self::report_synced) was called.
    pub fn is_synced(&self) -> bool {
        self.inner.synced.load(Ordering::Acquire)
    }

    /// Records an event for the object `object` refers to that a reconcile has not picked
    /// up yet (a child's event queueing its parent): it counts in the queue depth until
    /// [`admit`](Self::admit) starts its reconcile.
    pub fn mark_pending<K: Resource>(&self, object: &ObjectRef<K>) {
        self.book().mark_pending(bookkeeping_key_of_ref(object));
    }

    /// The shard's objects of kind `K` from `api`: a stream for `Controller::for_stream`
    /// and the store it fills. See [`objects_with`](Self::objects_with).
    pub fn objects<K>(
        &self,
        api: Api<K>,
    ) -> (
        Store<K>,
        impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    )
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        self.objects_with(api, ())
    }

    /// The shard's objects of a kind with dynamic type `dyntype`: a watch with the shard's
    /// [`watcher_config`](Self::watcher_config) whose cached objects are
    /// [trimmed](Self::trim_cached), through [`filter_events`](Self::filter_events). The
    /// scope reports itself synced once the initial list is in the store.
    pub fn objects_with<K>(
        &self,
        api: Api<K>,
        dyntype: K::DynamicType,
    ) -> (
        Store<K>,
        impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    )
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Clone + Eq + Hash,
    {
        let dyntype_of_store = dyntype.clone();
        let dyntype_of_store_events = dyntype.clone();
        let writer = reflector::store::Writer::new(dyntype);
        let store = writer.as_reader();
        self.track_cache_with(store.clone(), dyntype_of_store);
        let scope = self.clone();
        let trim = self.clone();
        let watch = watcher(api, self.watcher_config())
            .modify(move |object: &mut K| trim.trim_cached(object));
        let events = reflector::reflector(writer, watch)
            .default_backoff()
            .inspect(move |event| {
                if matches!(event, Ok(watcher::Event::InitDone)) {
                    scope.report_synced();
                }
            });
        let resource = ApiResource::erase::<K>(&dyntype_of_store_events);
        (store, self.filter_events_of(events, resource))
    }

    /// Drops from a cached object what the assignment strategy does not need (for the
    /// label strategy: every managedFields entry, replaced by a marker of the assigner's
    /// ownership of the shard label, see [`crate::label_trust::trim_to_trust_marker`]). Use
    /// with `WatchStreamExt::modify` on a watch of the shard's objects, on the objects as
    /// the API server sent them: an object whose managed fields were already dropped
    /// otherwise (kube's `managed_fields_mut().clear()`) cannot say who wrote its shard
    /// label and reads as untrusted.
    pub fn trim_cached<K: Resource>(&self, object: &mut K) {
        self.inner.strategy.trim_cached(object.meta_mut());
    }

    /// Tells the scope about a cache of the shard's objects, so that objects gone from it
    /// stop counting in the queue depth. [`objects`](Self::objects) does it itself.
    pub fn track_cache<K>(&self, store: Store<K>)
    where
        K: Resource + Clone + Send + Sync + 'static,
        K::DynamicType: Clone + Eq + Hash + Default + Send + Sync,
    {
        self.track_cache_with(store, K::DynamicType::default());
    }

    /// [`track_cache`](Self::track_cache) for a kind with dynamic type `dyntype`.
    pub fn track_cache_with<K>(&self, store: Store<K>, dyntype: K::DynamicType)
    where
        K: Resource + Clone + Send + Sync + 'static,
        K::DynamicType: Clone + Eq + Hash + Send + Sync,
    {
        // Keys of this cache's kind start with its group and kind.
        let kind = format!("{}/{}/", K::group(&dyntype), K::kind(&dyntype));
        let lookup: CacheLookup = Box::new(move |key: &str| {
            let Some((namespace, name)) = key
                .strip_prefix(kind.as_str())
                .and_then(|key| key.split_once('/'))
            else {
                return false;
            };
            let object = reflector::ObjectRef::new_with(name, dyntype.clone());
            let object = if namespace.is_empty() {
                object
            } else {
                object.within(namespace)
            };
            store.get(&object).is_some()
        });
        self.inner
            .caches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(lookup);
    }

    /// The watch events of the shard's objects (after the reflector stored them) to the
    /// objects whose reconcile they call for: events that change nothing a reconcile reads
    /// (status-only updates) are dropped, an object that joined the shard is remembered
    /// for [`moved_in`](Self::moved_in), and every object passed on counts in the queue
    /// depth until its reconcile starts. Untrusted and draining objects are passed on:
    /// [`admit`](Self::admit) decides about them when their reconcile starts. A drain the
    /// assigner requested from this shard is also acknowledged at once, ahead of the
    /// reconcile queue (see [`admit`](Self::admit)), unless a reconcile of the object is
    /// running; the queued reconcile then finds it acknowledged.
    pub fn filter_events<K, S>(
        &self,
        events: S,
    ) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static + use<K, S>
    where
        K: Resource + Send + 'static,
        K::DynamicType: Default,
        S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    {
        self.filter_events_of(events, ApiResource::erase::<K>(&K::DynamicType::default()))
    }

    /// [`filter_events`](Self::filter_events) for objects of the kind `resource` (whose
    /// API a drain acknowledgement patches).
    ///
    /// From its first poll on, `events` is driven by a task of its own and what passes the
    /// filter reaches the returned stream through an unbounded channel: kube-runtime stops
    /// polling its trigger stream while every reconcile slot is busy, and a drain event
    /// must reach [`observe`](Self::observe) (which acknowledges it) even then. The channel
    /// holds at most the events of a stall of the controller, as the worker's child
    /// watches do. The task ends when the returned stream is dropped.
    fn filter_events_of<K, S>(
        &self,
        events: S,
        resource: ApiResource,
    ) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static + use<K, S>
    where
        K: Resource + Send + 'static,
        S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    {
        let scope = self.clone();
        futures::stream::once(async move {
            let (sender, receiver) = futures::channel::mpsc::unbounded();
            let driver = tokio::spawn(async move {
                let mut filter = ChangeFilter::new(scope.inner.names.clone());
                let mut events = std::pin::pin!(events);
                while let Some(event) = events.next().await {
                    let item = match event {
                        Ok(event) => scope.observe(&mut filter, event, &resource).map(Ok),
                        Err(error) => Some(Err(error)),
                    };
                    if let Some(item) = item
                        && sender.unbounded_send(item).is_err()
                    {
                        break;
                    }
                }
            });
            let driver = AbortOnDrop(driver);
            receiver.map(move |item| {
                let _driven_by = &driver;
                item
            })
        })
        .flatten()
    }

    /// One watch event through the change filter and the bookkeeping; a drain requested
    /// from this shard is acknowledged ahead of the queue.
    fn observe<K: Resource>(
        &self,
        filter: &mut ChangeFilter,
        event: watcher::Event<K>,
        resource: &ApiResource,
    ) -> Option<K> {
        match &event {
            watcher::Event::Delete(object) => {
                self.book().forget(&resource_key(resource, object.meta()));
            }
            watcher::Event::Apply(object) | watcher::Event::InitApply(object) => {
                self.note_if_returned(object);
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
        let admitted = filter.admit(event)?;
        let key = resource_key(resource, admitted.object.meta());
        let early = {
            let mut book = self.book();
            if admitted.joined {
                book.mark_joined(key.clone());
            }
            book.mark_pending(key.clone());
            self.early_acknowledgement(&mut book, &admitted.object, &key)
        };
        if let Some(guard) = early {
            self.spawn_acknowledgement(admitted.object.meta(), resource, key, guard);
        }
        Some(admitted.object)
    }

    /// Forgets an acknowledged drain of `object` once its watch shows it here without a
    /// drain label (see [`already_acknowledged`](Self::already_acknowledged)).
    fn note_if_returned<K: Resource>(&self, object: &K) {
        let Some(uid) = object.meta().uid.as_deref() else {
            return;
        };
        let mut book = self.book();
        if book.acknowledged.contains_key(uid)
            && !matches!(self.placement(object), ObjectPlacement::Draining { .. })
        {
            book.returned(uid);
        }
    }

    /// Whether the event of `object` asks this shard to acknowledge a drain that can be
    /// acknowledged now, ahead of the queue: it reserves the object if so.
    fn early_acknowledgement<K: Resource>(
        &self,
        book: &mut ScopeBook,
        object: &K,
        key: &str,
    ) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let meta = object.meta();
        let placement = self.placement(object);
        let deleting = meta.deletion_timestamp.is_some();
        if worker_action(&placement, self.inner.shard, deleting) != WorkerAction::AcknowledgeDrain
            || self.inner.strategy.drain_acknowledgement().is_none()
            || self.is_stopping()
            || meta
                .uid
                .as_ref()
                .is_some_and(|uid| book.acknowledged.contains_key(uid))
        {
            return None;
        }
        book.reserve_acknowledgement(key)
    }

    /// Acknowledges the drain of the object `meta` (reserved as `key`) in a task of its
    /// own. Whatever the outcome, the event also goes to the queue: a failed
    /// acknowledgement is retried by the reconcile as before.
    fn spawn_acknowledgement(
        &self,
        meta: &kube::api::ObjectMeta,
        resource: &ApiResource,
        key: String,
        guard: tokio::sync::OwnedMutexGuard<()>,
    ) {
        let scope = self.clone();
        let meta = kube::api::ObjectMeta {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            ..Default::default()
        };
        let resource = resource.clone();
        tokio::spawn(async move {
            let uid = meta.uid.clone().unwrap_or_default();
            match scope.send_drain_acknowledgement(&meta, &resource).await {
                Ok(()) => scope.record_drain_acknowledged(&key, uid),
                Err(err) => {
                    tracing::debug!(shard = %scope.inner.shard, object = %key, %err, "early drain acknowledgement failed; the reconcile retries it");
                }
            }
            scope.book().acknowledging.remove(&key);
            drop(guard);
        });
    }

    /// A kube-runtime `Controller` over the shard's objects of kind `K` from `api`
    /// (`Api::all`, `Api::namespaced`): fed by [`objects`](Self::objects), shut down
    /// gracefully when the shard [stops](Self::stopped), with a load report counting its
    /// cache. Add `.owns(child_api, scope.watcher_config())` for children labelled with
    /// [`label_child`](Self::label_child), and run it with [`reconciler`](Self::reconciler).
    pub fn controller<K>(&self, api: Api<K>) -> Controller<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        self.controller_with(api, ())
    }

    /// [`controller`](Self::controller) for a kind with dynamic type `dyntype` (e.g.
    /// `DynamicObject` with its `ApiResource`). Run it with a reconcile that calls
    /// [`admit_with`](Self::admit_with) and [`finished_with`](Self::finished_with):
    /// [`reconciler`](Self::reconciler) serves kinds known at compile time.
    pub fn controller_with<K>(&self, api: Api<K>, dyntype: K::DynamicType) -> Controller<K>
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Clone + Eq + Hash + Debug + Unpin,
    {
        let (store, stream) = self.objects_with(api, dyntype.clone());
        self.report_cache_load(store.clone());
        Controller::for_stream_with(stream, store, dyntype).graceful_shutdown_on(self.stopped())
    }

    /// Installs a load report counting the objects (and those being deleted) in `store`.
    fn report_cache_load<K>(&self, store: Store<K>)
    where
        K: Resource + Clone + Send + Sync + 'static,
        K::DynamicType: Clone + Eq + Hash,
    {
        self.report_load(move || {
            let objects = store.state();
            ShardLoad {
                objects: i64::try_from(objects.len()).unwrap_or(i64::MAX),
                terminating: i64::try_from(
                    objects
                        .iter()
                        .filter(|o| o.meta().deletion_timestamp.is_some())
                        .count(),
                )
                .unwrap_or(i64::MAX),
                ..ShardLoad::default()
            }
        });
    }

    /// Whether a reconcile may act on `object`, checked when it starts: the Lease must be
    /// held, the object must be this shard's by a trusted label, and a drain requested by
    /// the assigner is acknowledged here (W2: shard and drain labels removed in one patch
    /// conditional on the object's resourceVersion) so the controller never sees a
    /// drained object. Counts the run and its queue wait in the metrics; call
    /// [`finished`](Self::finished) when the reconcile ends.
    pub async fn admit<K>(&self, object: &K) -> Result<Admission, ScopeError>
    where
        K: Resource,
        K::DynamicType: Default,
    {
        self.admit_with(object, &K::DynamicType::default()).await
    }

    /// [`admit`](Self::admit) for a kind with dynamic type `dyntype`.
    pub async fn admit_with<K: Resource>(
        &self,
        object: &K,
        dyntype: &K::DynamicType,
    ) -> Result<Admission, ScopeError> {
        self.check()?;
        let key = bookkeeping_key(object, dyntype);
        self.start_run_after_acknowledgement(&key).await;
        let uid = object.meta().uid.clone().unwrap_or_default();
        if self.already_acknowledged(&uid) {
            return Ok(Admission::Skip);
        }
        let placement = self.placement(object);
        let deleting = object.meta().deletion_timestamp.is_some();
        match worker_action(&placement, self.inner.shard, deleting) {
            WorkerAction::Reconcile => Ok(Admission::Reconcile),
            WorkerAction::Cleanup => Ok(Admission::Cleanup),
            WorkerAction::Ignore => Ok(Admission::Skip),
            WorkerAction::AcknowledgeDrain => {
                self.acknowledge_drain(object, dyntype, &key, uid).await?;
                Ok(Admission::Skip)
            }
        }
    }

    /// Marks the reconcile of `key` running once no early acknowledgement of it is under
    /// way (it waits for one to end), then counts it.
    async fn start_run_after_acknowledgement(&self, key: &str) {
        let waited = loop {
            let acknowledging = {
                let mut book = self.book();
                match book.acknowledging.get(key) {
                    Some(lock) => lock.clone(),
                    None => break book.start_running(key),
                }
            };
            drop(acknowledging.lock().await);
        };
        self.count_run(waited);
    }

    /// Counts a reconcile start, with its queue wait if an event asked for it.
    fn count_run(&self, waited: Option<Duration>) {
        let label = ShardMetrics::shard(self.inner.shard);
        let metrics = &self.inner.metrics;
        if let Some(waited) = waited {
            metrics
                .queue_wait
                .get_or_create(&label)
                .observe(waited.as_secs_f64());
        }
        metrics.runs.get_or_create(&label).inc();
    }

    /// Whether this shard acknowledged the drain of the object `uid` and no watch event
    /// has shown it owned here again since. The copy a reconcile got may predate the
    /// acknowledgement (read from the cache just before the drain event arrived, whose
    /// early acknowledgement it then waited for), and then shows no drain label: only the
    /// watch, whose events arrive in order, can tell that the object came back.
    fn already_acknowledged(&self, uid: &str) -> bool {
        self.book().acknowledged.contains_key(uid)
    }

    /// W2: removes the shard and drain labels in one merge patch, conditional on the
    /// version decided on. After it the object leaves this shard's watch.
    async fn acknowledge_drain<K: Resource>(
        &self,
        object: &K,
        dyntype: &K::DynamicType,
        key: &str,
        uid: String,
    ) -> Result<(), ScopeError> {
        let resource = ApiResource::erase::<K>(dyntype);
        self.send_drain_acknowledgement(object.meta(), &resource)
            .await?;
        self.record_drain_acknowledged(key, uid);
        Ok(())
    }

    /// The W2 patch of the object `meta` of kind `resource`, fenced by the Lease.
    async fn send_drain_acknowledgement(
        &self,
        meta: &kube::api::ObjectMeta,
        resource: &ApiResource,
    ) -> Result<(), ScopeError> {
        let Some(labels) = self.inner.strategy.drain_acknowledgement() else {
            return Ok(());
        };
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": meta.resource_version, "labels": labels }
        });
        let api: Api<DynamicObject> = match meta.namespace.as_deref() {
            Some(namespace) => Api::namespaced_with(self.client(), namespace, resource),
            None => Api::all_with(self.client(), resource),
        };
        self.check()?;
        let params = PatchParams {
            field_manager: Some(self.inner.names.worker_field_manager()),
            ..PatchParams::default()
        };
        api.patch(
            meta.name.as_deref().unwrap_or_default(),
            &params,
            &Patch::Merge(&patch),
        )
        .await
        .map_err(|err| match crate::client::fenced_out(&err) {
            Some(lost) => ScopeError::LeaseLost(lost),
            None => ScopeError::Drain(err),
        })?;
        Ok(())
    }

    /// Books an acknowledged drain: the object's stale cache entries are not acted on.
    fn record_drain_acknowledged(&self, key: &str, uid: String) {
        {
            let mut book = self.book();
            book.acknowledged.insert(uid, Instant::now());
            book.forget(key);
        }
        self.inner
            .metrics
            .drains
            .get_or_create(&ShardMetrics::shard(self.inner.shard))
            .inc();
        tracing::info!(shard = %self.inner.shard, object = %key, "drain acknowledged: shard and drain labels removed");
    }

    /// A reconcile of `object` ended.
    pub fn finished<K>(&self, object: &K)
    where
        K: Resource,
        K::DynamicType: Default,
    {
        self.finished_with(object, &K::DynamicType::default());
    }

    /// [`finished`](Self::finished) for a kind with dynamic type `dyntype`.
    pub fn finished_with<K: Resource>(&self, object: &K, dyntype: &K::DynamicType) {
        self.book()
            .running
            .remove(&bookkeeping_key(object, dyntype));
    }

    /// Whether `object` joined this shard (moved in from another shard, or its label
    /// became trusted) and its children have not been re-applied since: they may carry
    /// the previous shard's label, invisible to this shard's child watch, so the reconcile
    /// must apply every child even if its cache shows none or an unchanged one. Pass the
    /// returned value to [`children_relabelled`](Self::children_relabelled) once it did.
    pub fn moved_in<K>(&self, object: &K) -> Option<MoveIn>
    where
        K: Resource,
        K::DynamicType: Default,
    {
        self.moved_in_with(object, &K::DynamicType::default())
    }

    /// [`moved_in`](Self::moved_in) for a kind with dynamic type `dyntype`.
    pub fn moved_in_with<K: Resource>(
        &self,
        object: &K,
        dyntype: &K::DynamicType,
    ) -> Option<MoveIn> {
        self.book()
            .joined
            .get(&bookkeeping_key(object, dyntype))
            .copied()
            .map(MoveIn)
    }

    /// The children of `object` were applied with this shard's labels after the join
    /// `move_in`: forgets it, unless the object joined again meanwhile.
    pub fn children_relabelled<K>(&self, object: &K, move_in: MoveIn)
    where
        K: Resource,
        K::DynamicType: Default,
    {
        self.children_relabelled_with(object, &K::DynamicType::default(), move_in);
    }

    /// [`children_relabelled`](Self::children_relabelled) for a kind with dynamic type
    /// `dyntype`.
    pub fn children_relabelled_with<K: Resource>(
        &self,
        object: &K,
        dyntype: &K::DynamicType,
        move_in: MoveIn,
    ) {
        self.book()
            .clear_join(&bookkeeping_key(object, dyntype), move_in.0);
    }

    /// Wraps a reconcile function for `Controller::run`: each call is first
    /// [admitted](Self::admit) (the function is not called for an object this shard may not
    /// act on, nor once the Lease is lost), then timed in
    /// `shardop_reconcile_duration_seconds{result="success"|"error"}`.
    pub fn reconciler<K, C, E, F, Fut>(
        &self,
        reconcile: F,
    ) -> impl FnMut(Arc<K>, Arc<C>) -> BoxFuture<'static, Result<Action, E>> + use<K, C, E, F, Fut>
    where
        K: Resource<DynamicType = ()> + Send + Sync + 'static,
        C: Send + Sync + 'static,
        E: From<ScopeError> + Send + 'static,
        F: Fn(Arc<K>, Arc<C>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Action, E>> + Send + 'static,
    {
        let scope = self.clone();
        let reconcile = Arc::new(reconcile);
        move |object: Arc<K>, context: Arc<C>| {
            let scope = scope.clone();
            let reconcile = reconcile.clone();
            Box::pin(async move {
                let admission = scope.admit(object.as_ref()).await;
                if !matches!(admission, Ok(Admission::Reconcile | Admission::Cleanup)) {
                    scope.finished(object.as_ref());
                    let admission = admission.map_err(|err| {
                        scope.record_admission_error(&err);
                        E::from(err)
                    })?;
                    debug_assert_eq!(admission, Admission::Skip);
                    return Ok(Action::await_change());
                }
                let started = Instant::now();
                let result = reconcile(object.clone(), context).await;
                scope.finished(object.as_ref());
                let outcome = if result.is_ok() { "success" } else { "error" };
                scope
                    .inner
                    .metrics
                    .record_reconcile(scope.shard(), outcome, started.elapsed());
                if result.is_err() {
                    scope
                        .inner
                        .metrics
                        .record_error(scope.shard(), "error", true);
                }
                result
            }) as BoxFuture<'static, Result<Action, E>>
        }
    }

    fn record_admission_error(&self, err: &ScopeError) {
        let (reason, retried) = match err {
            ScopeError::LeaseLost(_) => ("lease_lost", false),
            ScopeError::Drain(_) => ("error", true),
        };
        self.inner
            .metrics
            .record_error(self.shard(), reason, retried);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
    use kube::api::ObjectMeta;

    fn meta(namespace: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            namespace: namespace.map(str::to_owned),
            name: Some("a".into()),
            ..Default::default()
        }
    }

    /// Method, URI and body of every request sent.
    type Requests = Arc<Mutex<Vec<(String, String, String)>>>;

    /// A client that records every request and answers `200 {}`.
    fn recording_client() -> (Client, Requests) {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let seen = seen.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = body.collect_bytes().await.unwrap_or_default();
                seen.lock().unwrap().push((
                    parts.method.to_string(),
                    parts.uri.to_string(),
                    String::from_utf8_lossy(&body).into_owned(),
                ));
                let response = http::Response::new(kube::client::Body::from(b"{}".to_vec()));
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        (Client::new(service, "default"), requests)
    }

    fn scope(valid_for: Duration) -> (ShardScope, Requests) {
        let (client, requests) = recording_client();
        let guard = LeaseGuard::detached(ShardIndex(1), Instant::now() + valid_for);
        let names = OperatorNames::new("tenants").unwrap();
        (
            ShardScope::detached(ShardIndex(1), names, client, guard),
            requests,
        )
    }

    /// A cluster-scoped object labelled for shard 1 by the assigner, with more labels.
    fn assigned(labels: &[(&str, &str)], by_assigner: bool) -> Namespace {
        let names = OperatorNames::new("tenants").unwrap();
        let entry = k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry {
            manager: Some(if by_assigner {
                names.assigner_field_manager()
            } else {
                "kubectl-edit".into()
            }),
            fields_v1: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1(
                serde_json::json!({ "f:metadata": { "f:labels": { "f:tenants.shardop.dev/shard": {} } } }),
            )),
            ..Default::default()
        };
        let mut all = vec![("tenants.shardop.dev/shard", "1")];
        all.extend_from_slice(labels);
        Namespace {
            metadata: ObjectMeta {
                name: Some("a".into()),
                uid: Some("u-a".into()),
                resource_version: Some("7".into()),
                labels: Some(
                    all.iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                managed_fields: Some(vec![entry]),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Runs `scope.reconciler` once on `object`; returns whether the user's reconcile ran
    /// and the wrapper's result.
    async fn reconcile_once(
        scope: &ShardScope,
        object: Namespace,
    ) -> (bool, Result<Action, ScopeError>) {
        let called = Arc::new(AtomicBool::new(false));
        let mut reconcile =
            scope.reconciler(|_: Arc<Namespace>, called: Arc<AtomicBool>| async move {
                called.store(true, Ordering::SeqCst);
                Ok::<_, ScopeError>(Action::await_change())
            });
        let result = reconcile(Arc::new(object), called.clone()).await;
        (called.load(Ordering::SeqCst), result)
    }

    /// A controller over a kind known only at run time builds (its dynamic type, an
    /// `ApiResource`, has no `Default`).
    #[allow(dead_code)]
    fn a_dynamic_kind_gets_a_controller(
        scope: &ShardScope,
        api: Api<DynamicObject>,
        resource: ApiResource,
    ) -> Controller<DynamicObject> {
        scope.controller_with(api, resource)
    }

    #[tokio::test]
    async fn an_owned_object_is_reconciled() {
        let (scope, requests) = scope(Duration::from_secs(60));
        let (called, result) = reconcile_once(&scope, assigned(&[], true)).await;
        assert!(called && result.is_ok());
        assert!(requests.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn without_the_lease_the_reconcile_is_not_called_and_nothing_is_sent() {
        let (scope, requests) = scope(Duration::ZERO);
        let (called, result) = reconcile_once(&scope, assigned(&[], true)).await;
        assert!(!called);
        assert!(matches!(result, Err(ScopeError::LeaseLost(_))));
        let (called, _) = reconcile_once(
            &scope,
            assigned(&[("tenants.shardop.dev/drain", "2")], true),
        )
        .await;
        assert!(!called);
        assert!(
            requests.lock().unwrap().is_empty(),
            "no drain acknowledged without the lease"
        );
    }

    #[tokio::test]
    async fn a_drained_object_is_acknowledged_once_and_never_delivered() {
        let (scope, requests) = scope(Duration::from_secs(60));
        let draining = assigned(&[("tenants.shardop.dev/drain", "2")], true);
        let (called, result) = reconcile_once(&scope, draining.clone()).await;
        assert!(!called, "the controller never sees a drained object");
        assert!(result.is_ok());
        {
            let requests = requests.lock().unwrap();
            assert_eq!(requests.len(), 1);
            let (method, uri, body) = &requests[0];
            assert_eq!(method, "PATCH");
            assert!(uri.starts_with("/api/v1/namespaces/a?"), "{uri}");
            assert!(uri.contains("fieldManager=tenants-worker"), "{uri}");
            let body: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(
                body,
                serde_json::json!({ "metadata": {
                    "resourceVersion": "7",
                    "labels": {
                        "tenants.shardop.dev/shard": null,
                        "tenants.shardop.dev/drain": null,
                    },
                } })
            );
        }
        // A stale cache entry of the same object: not acknowledged again.
        let (called, _) = reconcile_once(&scope, draining).await;
        assert!(!called);
        assert_eq!(requests.lock().unwrap().len(), 1);
    }

    /// Passes `object`'s watch event through `scope.filter_events`; returns what came out.
    async fn through_filter(scope: &ShardScope, object: Namespace) -> Vec<Namespace> {
        let events = futures::stream::iter([Ok(watcher::Event::Apply(object))]);
        scope
            .filter_events(events)
            .filter_map(|item| futures::future::ready(item.ok()))
            .collect()
            .await
    }

    /// Waits (a bounded number of scheduler turns) until `requests` holds `count`.
    async fn requests_reach(requests: &Requests, count: usize) -> usize {
        for _ in 0..1000 {
            if requests.lock().unwrap().len() >= count {
                break;
            }
            tokio::task::yield_now().await;
        }
        requests.lock().unwrap().len()
    }

    #[tokio::test]
    async fn a_drain_is_acknowledged_from_its_event_ahead_of_the_queue() {
        let (scope, requests) = scope(Duration::from_secs(60));
        let draining = assigned(&[("tenants.shardop.dev/drain", "2")], true);
        let passed = through_filter(&scope, draining.clone()).await;
        assert_eq!(passed.len(), 1, "the queue still gets the event");
        assert_eq!(
            requests_reach(&requests, 1).await,
            1,
            "acknowledged before any reconcile ran"
        );
        assert!(
            requests.lock().unwrap()[0]
                .2
                .contains("\"tenants.shardop.dev/drain\":null")
        );
        // The queued reconcile finds it acknowledged: no second patch, no delivery.
        let (called, result) = reconcile_once(&scope, draining).await;
        assert!(!called && result.is_ok());
        assert_eq!(requests.lock().unwrap().len(), 1);
    }

    /// The object as the cache held it just before the drain event: owned, no drain label.
    fn before_the_drain() -> Namespace {
        let mut before = assigned(&[], true);
        before.metadata.resource_version = Some("6".into());
        before
    }

    #[tokio::test]
    async fn a_copy_read_before_an_early_acknowledgement_is_not_reconciled() {
        let (scope, requests) = scope(Duration::from_secs(60));
        let draining = assigned(&[("tenants.shardop.dev/drain", "2")], true);
        through_filter(&scope, draining).await;
        assert_eq!(requests_reach(&requests, 1).await, 1);
        // A reconcile dispatched with the copy read just before the drain event: it waits
        // for the acknowledgement, and must not act on the object it no longer owns.
        let (called, result) = reconcile_once(&scope, before_the_drain()).await;
        assert!(
            !called,
            "the stale copy shows no drain label, but the drain is acknowledged"
        );
        assert!(result.is_ok());
        assert_eq!(
            requests.lock().unwrap().len(),
            1,
            "no second acknowledgement"
        );
    }

    #[tokio::test]
    async fn an_object_assigned_back_after_its_drain_is_reconciled_again() {
        let (scope, requests) = scope(Duration::from_secs(60));
        through_filter(
            &scope,
            assigned(&[("tenants.shardop.dev/drain", "2")], true),
        )
        .await;
        assert_eq!(requests_reach(&requests, 1).await, 1);
        let (called, _) = reconcile_once(&scope, before_the_drain()).await;
        assert!(!called);
        // The assigner assigns it to this shard again; the watch shows it owned, newer.
        let mut back = assigned(&[], true);
        back.metadata.resource_version = Some("9".into());
        assert_eq!(through_filter(&scope, back.clone()).await.len(), 1);
        let (called, result) = reconcile_once(&scope, back).await;
        assert!(called && result.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn acknowledged_drains_are_forgotten_after_a_while() {
        let (scope, requests) = scope(Duration::from_secs(3600));
        through_filter(
            &scope,
            assigned(&[("tenants.shardop.dev/drain", "2")], true),
        )
        .await;
        assert_eq!(requests_reach(&requests, 1).await, 1);
        for _ in 0..1000 {
            if !scope.book().acknowledged.is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(scope.book().acknowledged.len(), 1);
        scope.load();
        assert_eq!(scope.book().acknowledged.len(), 1, "kept while young");
        tokio::time::advance(ACKNOWLEDGED_MEMORY).await;
        scope.load();
        assert!(
            scope.book().acknowledged.is_empty(),
            "one entry per drain, not forever"
        );
    }

    #[tokio::test]
    async fn a_drain_is_acknowledged_while_the_controller_polls_no_events() {
        let (scope, requests) = scope(Duration::from_secs(60));
        let mut owned = assigned(&[], true);
        owned.metadata.name = Some("b".into());
        owned.metadata.uid = Some("u-b".into());
        let draining = assigned(&[("tenants.shardop.dev/drain", "2")], true);
        let events = futures::stream::iter([
            Ok(watcher::Event::Apply(owned)),
            Ok(watcher::Event::Apply(draining)),
        ])
        .chain(futures::stream::pending());
        let mut filtered = Box::pin(scope.filter_events(events));
        // A controller takes one event, then all its reconcile slots are busy: it polls no
        // more.
        let first = filtered.next().await;
        assert_eq!(first.unwrap().unwrap().metadata.name.as_deref(), Some("b"));
        assert_eq!(
            requests_reach(&requests, 1).await,
            1,
            "the drain behind it was acknowledged anyway"
        );
        drop(filtered);
    }

    #[tokio::test]
    async fn a_drain_is_not_acknowledged_ahead_of_a_running_reconcile_of_the_object() {
        let (scope, requests) = scope(Duration::from_secs(60));
        let draining = assigned(&[("tenants.shardop.dev/drain", "2")], true);
        scope.book().start_running(&bookkeeping_key(&draining, &()));
        through_filter(&scope, draining.clone()).await;
        assert_eq!(
            requests_reach(&requests, 1).await,
            0,
            "the running reconcile goes first"
        );
        scope.finished(&draining);
        // The reconcile queued behind it acknowledges.
        let (called, _) = reconcile_once(&scope, draining).await;
        assert!(!called);
        assert_eq!(requests.lock().unwrap().len(), 1);
    }

    /// A `Node` with the same name, labels and uid scheme as `namespace`: an object of
    /// another kind that the hash places on the same shard.
    fn same_name_of_another_kind(namespace: &Namespace) -> k8s_openapi::api::core::v1::Node {
        let mut metadata = namespace.metadata.clone();
        metadata.uid = Some("u-node-a".into());
        k8s_openapi::api::core::v1::Node {
            metadata,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn two_kinds_with_the_same_name_keep_their_own_bookkeeping() {
        let (scope, requests) = scope(Duration::from_secs(60));
        let namespace = assigned(&[], true);
        let node = same_name_of_another_kind(&namespace);
        assert_eq!(scope.admit(&namespace).await.unwrap(), Admission::Reconcile);
        assert_eq!(scope.admit(&node).await.unwrap(), Admission::Reconcile);
        // The Namespace's reconcile ends; the Node's still writes.
        scope.finished(&namespace);
        assert!(
            scope
                .book()
                .running
                .contains_key(&bookkeeping_key(&node, &()))
        );
        // So the Node's drain is not acknowledged ahead of its running reconcile (W2).
        let draining =
            same_name_of_another_kind(&assigned(&[("tenants.shardop.dev/drain", "2")], true));
        let events = futures::stream::iter([Ok(watcher::Event::Apply(draining))]);
        let passed: Vec<_> = scope.filter_events(events).collect().await;
        assert_eq!(passed.len(), 1);
        assert_eq!(
            requests_reach(&requests, 1).await,
            0,
            "acknowledged while the Node's reconcile runs"
        );
        // Each kind's cache answers for its own objects only.
        let (reader, mut writer) = reflector::store::<Namespace>();
        writer.apply_watcher_event(&watcher::Event::Apply(namespace.clone()));
        scope.track_cache(reader);
        scope.mark_pending(&ObjectRef::from_obj(&node));
        assert_eq!(scope.load().queue_depth, 0, "no Node cache holds it");
        scope.mark_pending(&ObjectRef::from_obj(&namespace));
        assert_eq!(scope.load().queue_depth, 1);
    }

    #[tokio::test]
    async fn the_loads_of_several_controllers_add_up() {
        let (scope, _) = scope(Duration::from_secs(60));
        let load = |objects, oldest| ShardLoad {
            objects,
            backlog: objects / 2,
            oldest_unconverged: Duration::from_secs(oldest),
            ..ShardLoad::default()
        };
        scope.report_load(move || load(4, 30));
        scope.report_load(move || load(6, 10));
        let total = scope.load();
        assert_eq!(total.objects, 10);
        assert_eq!(total.backlog, 5);
        assert_eq!(total.oldest_unconverged, Duration::from_secs(30));
    }

    #[tokio::test]
    async fn no_early_acknowledgement_without_the_lease_or_for_an_owned_object() {
        let (scope, requests) = scope(Duration::ZERO);
        through_filter(
            &scope,
            assigned(&[("tenants.shardop.dev/drain", "2")], true),
        )
        .await;
        let (owned, owned_requests) = self::scope(Duration::from_secs(60));
        through_filter(&owned, assigned(&[], true)).await;
        assert_eq!(requests_reach(&requests, 1).await, 0);
        assert_eq!(requests_reach(&owned_requests, 1).await, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconcile_waits_for_an_early_acknowledgement_under_way() {
        let (scope, _) = scope(Duration::from_secs(60));
        let guard = scope.book().reserve_acknowledgement("/a").unwrap();
        assert!(
            scope.book().reserve_acknowledgement("/a").is_none(),
            "one acknowledgement at a time"
        );
        let started = tokio::spawn({
            let scope = scope.clone();
            async move { scope.start_run_after_acknowledgement("/a").await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            !scope.book().running.contains_key("/a"),
            "waits for the acknowledgement"
        );
        scope.book().acknowledging.remove("/a");
        drop(guard);
        started.await.unwrap();
        assert!(scope.book().running.contains_key("/a"));
        assert!(
            scope.book().reserve_acknowledgement("/a").is_none(),
            "no acknowledgement while it runs"
        );
    }

    #[tokio::test]
    async fn an_untrusted_or_foreign_label_is_skipped() {
        let (scope, requests) = scope(Duration::from_secs(60));
        let (called, _) = reconcile_once(&scope, assigned(&[], false)).await;
        assert!(!called, "a hand-edited label starts no reconcile");
        let mut other = assigned(&[], true);
        other
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("tenants.shardop.dev/shard".into(), "2".into());
        let (called, _) = reconcile_once(&scope, other).await;
        assert!(!called, "another shard's object");
        assert!(requests.lock().unwrap().is_empty());
    }

    #[test]
    fn keys_of_namespaced_and_cluster_scoped_objects() {
        let namespaced = ConfigMap {
            metadata: meta(Some("ns")),
            ..Default::default()
        };
        let cluster_scoped = Namespace {
            metadata: meta(None),
            ..Default::default()
        };
        assert_eq!(object_key(&namespaced), "ns/a");
        assert_eq!(object_key(&cluster_scoped), "/a");
    }

    #[tokio::test(start_paused = true)]
    async fn queue_wait_runs_from_the_first_unhandled_event() {
        let mut book = ScopeBook::default();
        book.mark_pending("ns/a".into());
        tokio::time::advance(Duration::from_secs(2)).await;
        // A second event while waiting does not restart the clock.
        book.mark_pending("ns/a".into());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(book.start_running("ns/a"), Some(Duration::from_secs(3)));
        assert!(book.running.contains_key("ns/a"));
        // A requeue or resync run was not asked for by an event: no queue wait.
        assert_eq!(book.start_running("ns/a"), None);
        // An event during a run waits from then on.
        book.mark_pending("ns/a".into());
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(book.start_running("ns/a"), Some(Duration::from_millis(250)));
    }

    #[test]
    fn a_converge_clears_only_the_join_it_saw() {
        let mut book = ScopeBook::default();
        book.mark_joined("ns/a".into());
        let seen = book.joined["ns/a"];
        // The object left and joined again while the converge ran.
        book.mark_joined("ns/a".into());
        book.clear_join("ns/a", seen);
        assert!(book.joined.contains_key("ns/a"));
        let seen = book.joined["ns/a"];
        book.clear_join("ns/a", seen);
        assert!(book.joined.is_empty());
    }
}
