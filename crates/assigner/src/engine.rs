//! The leader's loop: observe the metadata of every sharded kind, shard Leases, Shard
//! objects and N; on any change (and periodically, because Leases expire by the passage of
//! time) plan every object and shard (`crate::planning`, over `shardop::protocol::plan`),
//! and carry the plan out with bounded concurrency. Objects are planned per key (kind,
//! namespace, name), so the protocol's guarantees hold for each kind. Nothing here is needed by the next leader: all progress is in labels and
//! Leases, and what is kept in memory (move start times, write back-off) only serves
//! metrics and pacing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use shardop::protocol::{
    AssignerAction, LeaseStep, ObjectPlacement, ShardTable, plan_shard, spread_homes, spread_plan,
};
use shardop::{OperatorNames, Shard, ShardCount, ShardIndex, ShardLeaseWatch, ShardState};
use shardop_runtime::retry::jitter_unit;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::fences::{self, Fences};
use crate::metrics::{AssignerMetrics, ShardLabel};
use crate::objects::{ObjectKey, ObjectMeta, ObjectStore, Source, SourceScope};
use crate::planning::{self, Admitted, Candidate, Hold, Limits, Progress, Room};
use crate::resources::{KindId, ShardedKind};
use crate::shard_count::ShardCountRx;
use crate::shard_objects::{self, AssignerStatus};
use crate::stalls::{LongUnassigned, Rereads};
use crate::write_backoff::WriteBackoff;
use crate::writes::{self, Outcome, label_write_span, write_result};

/// Passes run at most this often, so an event storm is handled in batches.
const PASS_INTERVAL: Duration = Duration::from_millis(100);
/// Stalled-move re-reads in flight at once take at most this share (1/n) of the write
/// slots, and only slots the pass's label writes left free: a label write (one that ends
/// a move, say) never waits behind re-reads.
const REREAD_SHARE: usize = 16;
/// A conflicted object waits for a newer observation, but not forever.
const STALE_HOLD: Duration = Duration::from_secs(10);
/// A Lease or Shard-object write is not repeated before the watch shows its effect,
/// or this long.
const SHARD_WRITE_HOLD: Duration = Duration::from_secs(5);

/// What the engine needs from start-up.
#[derive(Clone)]
pub struct Settings {
    /// Whose labels, Leases and Shard objects these are.
    pub names: OperatorNames,
    /// The sharded kinds, indexed by [`KindId`].
    pub kinds: Vec<Arc<ShardedKind>>,
    pub operator_namespace: String,
    /// Namespaces watched for namespaced kinds (all when empty); cluster-scoped kinds are
    /// watched cluster-wide.
    pub watch_namespaces: Vec<String>,
    pub max_concurrent_moves: usize,
    pub max_concurrent_writes: usize,
    pub status_interval: Duration,
    pub resync_period: Duration,
}

/// The pause after a pass that took `took`: [`PASS_INTERVAL`], or longer when a pass over
/// many objects is slow, so that passes take at most a fifth of the engine's time and
/// events and write results are taken in between.
fn pass_interval(took: Duration) -> Duration {
    PASS_INTERVAL.max(took.saturating_mul(4))
}

type ObjectEvent = (Source, Result<watcher::Event<ObjectMeta>, watcher::Error>);

type LabelResult = Result<Outcome<ObjectMeta>, kube::Error>;

/// A label write in flight.
struct LabelWrite {
    key: ObjectKey,
    action: AssignerAction,
    /// The valid owner the object had when the write was decided.
    owner: Option<ShardIndex>,
    /// Whether this is the object's first shard label (for assignment latency).
    first: Option<Timestamp>,
    /// The resourceVersion the write was decided on (and is conditional on).
    resource_version: Box<str>,
}

enum Done {
    Label(Box<(LabelWrite, LabelResult)>),
    Lease(ShardIndex, LeaseStep, Result<Outcome<()>, kube::Error>),
    ShardObject(ShardIndex, &'static str, Result<(), kube::Error>),
    /// A stalled move's object re-read, and the resourceVersion its record had then.
    Reread(Box<(ObjectKey, Box<str>, Result<ObjectMeta, kube::Error>)>),
    /// A fresh read of the Lease of a shard the watched copy shows fenced.
    FenceRead(ShardIndex, Result<Option<Box<Lease>>, kube::Error>),
}

/// The leader's state; dropped with the leadership.
pub struct Engine {
    client: Client,
    settings: Settings,
    metrics: AssignerMetrics,
    leases: ShardLeaseWatch,
    shards: Store<Shard>,
    shard_count: ShardCountRx,
    /// The worker count the shards are spread over, when the shard count is fixed and the
    /// worker count follows the StatefulSet (`None`: worker `i` is home for shard `i`).
    worker_count: Option<ShardCountRx>,
    objects: ObjectStore,
    /// What each watch stream covers, indexed by [`Source`].
    scopes: Vec<SourceScope>,
    writes: JoinSet<Done>,
    /// Objects with a label write in flight, and the owner it moves them off (if any).
    in_flight: HashMap<ObjectKey, Option<ShardIndex>>,
    holds: HashMap<ObjectKey, Hold>,
    /// Consecutive label-write failures per object, which set their holds.
    write_backoff: WriteBackoff,
    /// Objects in a move (from the drain request or direct relabel to the new label).
    moves: HashMap<ObjectKey, Instant>,
    /// Shards with a Lease or Shard-object write in flight or recently done.
    shard_holds: HashMap<(ShardIndex, &'static str), (Option<String>, Instant)>,
    /// The status last applied to each Shard object, and when.
    statuses: HashMap<ShardIndex, (AssignerStatus, Instant)>,
    exported_shards: BTreeSet<ShardIndex>,
    rereads: Rereads,
    /// Stalled-move re-reads in flight (each also counts in `writes`).
    rereads_in_flight: usize,
    /// Which fences the watched Leases show were confirmed by a fresh read.
    fences: Fences,
    /// Objects a watch event showed without a valid owner since the last pass: they are
    /// assigned at once ([`Engine::assign_unowned`]) instead of at the next pass.
    unowned_events: Vec<ObjectKey>,
}

impl Engine {
    /// Starts the watches (their drivers are spawned into `drivers`).
    pub fn start(
        client: Client,
        settings: Settings,
        metrics: AssignerMetrics,
        leases: ShardLeaseWatch,
        shard_count: ShardCountRx,
        worker_count: Option<ShardCountRx>,
        drivers: &mut JoinSet<()>,
    ) -> (Self, SelectAll<BoxStream<'static, ObjectEvent>>) {
        let scopes = source_scopes(&settings.kinds, &settings.watch_namespaces);
        let mut events = SelectAll::new();
        for (source, scope) in scopes.iter().enumerate() {
            let Some(kind) = settings.kinds.get(usize::from(scope.kind)) else {
                continue;
            };
            // Metadata only: labels, resourceVersion and timestamps are all the protocol
            // needs, and they are a small fraction of a full object.
            let api: Api<PartialObjectMeta<kube::api::DynamicObject>> = match &scope.namespace {
                Some(ns) => Api::namespaced_with(client.clone(), ns, &kind.api),
                None => Api::all_with(client.clone(), &kind.api),
            };
            let stream = watcher(api, watcher::Config::default().any_semantic())
                .default_backoff()
                .map(move |event| (source, event))
                .boxed();
            events.push(stream);
        }
        let shard_api: Api<Shard> = Api::namespaced(client.clone(), &settings.operator_namespace);
        let (shards, writer) = reflector::store();
        drivers.spawn(
            watcher(shard_api, watcher::Config::default())
                .default_backoff()
                .reflect(writer)
                .for_each(|event| {
                    if let Err(err) = event {
                        shardop_runtime::reachability::log_watch_error("Shard objects", &err);
                    }
                    futures::future::ready(())
                }),
        );
        let objects = ObjectStore::new(settings.names.clone());
        let engine = Self {
            client,
            settings,
            metrics,
            leases,
            shards,
            shard_count,
            worker_count,
            objects,
            scopes,
            writes: JoinSet::new(),
            in_flight: HashMap::new(),
            holds: HashMap::new(),
            write_backoff: WriteBackoff::default(),
            moves: HashMap::new(),
            shard_holds: HashMap::new(),
            statuses: HashMap::new(),
            exported_shards: BTreeSet::new(),
            rereads: Rereads::default(),
            rereads_in_flight: 0,
            fences: Fences::default(),
            unowned_events: Vec::new(),
        };
        (engine, events)
    }

    /// Runs until `stop` is cancelled. Writes still in flight are abandoned: each is
    /// conditional, so the next leader cannot be confused by one landing late.
    pub async fn run(
        mut self,
        mut events: SelectAll<BoxStream<'static, ObjectEvent>>,
        stop: CancellationToken,
    ) {
        let mut resync = tokio::time::interval(self.settings.resync_period);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dirty = true;
        let mut next_pass = Instant::now();
        loop {
            // Checked before waiting, so a steady stream of events cannot starve planning.
            if dirty && Instant::now() >= next_pass {
                let started = Instant::now();
                self.pass();
                dirty = false;
                next_pass = Instant::now() + pass_interval(started.elapsed());
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some(done) = self.writes.join_next(), if !self.writes.is_empty() => {
                    match done {
                        Ok(done) => self.on_done(done),
                        Err(err) => tracing::error!(%err, "a write task failed"),
                    }
                    dirty = true;
                }
                Some((source, event)) = events.next() => {
                    dirty |= self.on_event(source, event);
                    // Take whatever else is already queued before planning.
                    for _ in 0..1024 {
                        match events.next().now_or_never() {
                            Some(Some((source, event))) => dirty |= self.on_event(source, event),
                            _ => break,
                        }
                    }
                    self.assign_unowned();
                }
                () = self.leases.changed() => dirty = true,
                Ok(()) = self.shard_count.changed() => dirty = true,
                Ok(()) = changed(self.worker_count.as_mut()) => dirty = true,
                _ = resync.tick() => dirty = true,
                () = tokio::time::sleep_until(next_pass), if dirty => {}
            }
        }
        self.writes.abort_all();
    }

    fn on_event(
        &mut self,
        source: Source,
        event: Result<watcher::Event<ObjectMeta>, watcher::Error>,
    ) -> bool {
        let Some(scope) = self.scopes.get(source) else {
            return false;
        };
        match event {
            Ok(watcher::Event::Apply(meta)) => {
                let Some(key) = self.objects.apply_change(scope.kind, &meta) else {
                    return false;
                };
                if self
                    .objects
                    .get(&key)
                    .is_some_and(|r| r.placement.owner().is_none())
                {
                    self.unowned_events.push(key);
                }
                true
            }
            Ok(event) => self.objects.apply(source, scope, event),
            Err(err) => {
                let what = self
                    .settings
                    .kinds
                    .get(usize::from(scope.kind))
                    .map_or("sharded objects", |k| k.api.plural.as_str());
                shardop::reachability::log_watch_error(what, &err);
                false
            }
        }
    }

    /// Plans, right away, the objects watch events just showed without a valid owner (a
    /// new object, a drain acknowledged): the same decision a pass makes for them
    /// ([`planning::plan_objects`] over these objects only), without waiting up to
    /// [`PASS_INTERVAL`] and without planning every other object again. Only label
    /// writes that give an object its owner are started here; everything else waits for
    /// the pass.
    fn assign_unowned(&mut self) {
        let keys = std::mem::take(&mut self.unowned_events);
        if keys.is_empty() {
            return;
        }
        let Some(n) = *self.shard_count.borrow() else {
            return;
        };
        if !self.objects.is_ready(self.scopes.len()) || !self.leases.is_ready() {
            return;
        }
        let leases = self.leases.all();
        let (table, _) = self.object_table(n, &leases, Timestamp::now());
        let records = keys
            .iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|key| Some((key, self.objects.get(key)?)));
        let plan = planning::plan_objects(
            records,
            &Progress {
                in_flight: &self.in_flight,
                holds: &self.holds,
                moves: &self.moves,
            },
            &table,
            self.room(),
            Instant::now(),
        );
        let assignments = planning::assignments_of_unowned(plan.candidates, |key| {
            self.objects.get(key).map(|r| r.placement.owner())
        });
        self.dispatch_labels(assignments);
    }

    /// One planning pass over every object and shard.
    #[tracing::instrument(level = "debug", skip_all)]
    fn pass(&mut self) {
        self.unowned_events.clear();
        let n = *self.shard_count.borrow();
        self.metrics
            .desired_shards
            .set(n.map_or(0, |n| i64::from(n.get())));
        let Some(n) = n else { return };
        // Never decide on a partial view: "no object carries label i" must be true.
        if !self.objects.is_ready(self.scopes.len()) || !self.leases.is_ready() {
            return;
        }
        let now = Timestamp::now();
        let leases = self.leases.all();
        let table = planning::shard_table(&self.settings.names, n, &leases, now);
        self.metrics
            .effective_shards
            .set(table.effective_count().map_or(0, |e| i64::from(e.get())));

        let (object_table, pending) = self.object_table(n, &leases, now);
        let (labelled, mut candidates) = self.plan_objects(&object_table);
        hold_drains_off(&mut candidates, &pending);
        self.dispatch_labels(candidates);
        self.reread_stalled_moves(Instant::now());
        // Every Lease step is conditional on the watched copy's resourceVersion (a create
        // fails if the Lease exists), so a stale copy makes it fail rather than act on an
        // old state: the watched table will do.
        self.plan_shards(&table, n, &labelled, &leases);
    }

    /// The shard table object decisions are made on: the watched `leases`, with the fences
    /// no fresh read of the Lease confirmed yet lifted (see [`crate::fences`]). Starts the
    /// reads those fences need; also returns the shards none of those reads answered yet.
    fn object_table(
        &mut self,
        n: ShardCount,
        leases: &BTreeMap<ShardIndex, Arc<Lease>>,
        now: Timestamp,
    ) -> (ShardTable, BTreeSet<ShardIndex>) {
        let names = &self.settings.names;
        let watched = planning::shard_table(names, n, leases, now);
        let review = self.fences.review(&watched, leases, Instant::now());
        for shard in review.to_read {
            let client = self.client.clone();
            let names = names.clone();
            let namespace = self.settings.operator_namespace.clone();
            self.writes.spawn(async move {
                let result = writes::read_lease(client, &names, &namespace, shard).await;
                Done::FenceRead(shard, result.map(|lease| lease.map(Box::new)))
            });
        }
        let table = fences::object_table(names, n, leases, &review.unconfirmed, now);
        (table, review.pending)
    }

    /// Plans every object ([`planning::plan_objects`]) and keeps the engine's book-keeping
    /// and metrics in step with the plan.
    fn plan_objects(
        &mut self,
        table: &ShardTable,
    ) -> (BTreeMap<ShardIndex, usize>, Vec<Candidate>) {
        let now = Instant::now();
        let plan = planning::plan_objects(
            self.objects.iter(),
            &Progress {
                in_flight: &self.in_flight,
                holds: &self.holds,
                moves: &self.moves,
            },
            table,
            self.room(),
            now,
        );
        for key in &plan.expired_holds {
            self.holds.remove(key);
        }
        // Holds of deleted objects would otherwise stay forever.
        let objects = &self.objects;
        self.holds.retain(|key, _| objects.get(key).is_some());
        self.write_backoff.retain(|key| objects.get(key).is_some());
        // Moves that ended without our write (object deleted, relabelled by someone else)
        // are forgotten; moves found in progress (a previous leader's) are adopted.
        self.moves.retain(|key, _| plan.in_move.contains(key));
        for key in plan.in_move {
            self.moves.entry(key).or_insert(now);
        }
        self.export_counts(plan.unassigned, &plan.labelled);
        self.report_long_unassigned(&plan.long_unassigned, plan.oldest_unassigned);
        (plan.labelled, plan.candidates)
    }

    /// Reports the waits for an owner: the oldest as a metric, and a warning for those that
    /// just passed [`crate::stalls::LONG_UNASSIGNED`] (once per wait).
    fn report_long_unassigned(&mut self, long: &[LongUnassigned], oldest: Duration) {
        crate::stalls::log_long_unassigned(long);
        for waiting in long {
            self.objects.mark_wait_reported(&waiting.key);
        }
        self.metrics
            .oldest_unassigned_seconds
            .set(i64::try_from(oldest.as_secs()).unwrap_or(i64::MAX));
    }

    /// Re-reads the objects of moves stalled for [`crate::stalls::STALLED_MOVE`]: the watch
    /// normally brings every step, so a stall is either a slow owner or a record that fell
    /// behind its object, and only a fresh read tells them apart.
    /// Runs after the pass's label writes started, in the slots they left (see
    /// [`reread_room`]).
    fn reread_stalled_moves(&mut self, now: Instant) {
        let in_flight = &self.in_flight;
        let room = reread_room(self.limits(), self.writes.len(), self.rereads_in_flight);
        let (stalled, due) =
            self.rereads
                .due(&self.moves, |key| in_flight.contains_key(key), now, room);
        self.metrics
            .stalled_moves
            .set(i64::try_from(stalled).unwrap_or(i64::MAX));
        for key in due {
            let (Some(record), Some(kind)) = (self.objects.get(&key), self.kind(key.kind)) else {
                continue;
            };
            tracing::warn!(
                object = %key,
                placement = ?record.placement,
                "move stalled; re-reading the object"
            );
            let based_on = record.resource_version.clone();
            let client = self.client.clone();
            self.rereads_in_flight += 1;
            self.writes.spawn(async move {
                let result = writes::read_metadata(client, &kind, &key).await;
                Done::Reread(Box::new((key, based_on, result)))
            });
        }
    }

    fn export_counts(&mut self, unassigned: usize, labelled: &BTreeMap<ShardIndex, usize>) {
        self.metrics
            .unassigned_objects
            .set(i64::try_from(unassigned).unwrap_or(i64::MAX));
        self.metrics
            .moves_in_flight
            .set(i64::try_from(self.moves.len()).unwrap_or(i64::MAX));
        for (shard, count) in labelled {
            self.metrics
                .shard_objects
                .get_or_create(&ShardLabel {
                    shard: shard.to_string(),
                })
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
        for gone in self
            .exported_shards
            .iter()
            .filter(|s| !labelled.contains_key(s))
        {
            self.metrics.shard_objects.remove(&ShardLabel {
                shard: gone.to_string(),
            });
        }
        self.exported_shards = labelled.keys().copied().collect();
    }

    fn limits(&self) -> Limits {
        Limits {
            max_concurrent_writes: self.settings.max_concurrent_writes,
            max_concurrent_moves: self.settings.max_concurrent_moves,
        }
    }

    /// How many label writes and moves may start now.
    fn room(&self) -> Room {
        Room::left(self.limits(), self.writes.len(), self.moves.len())
    }

    /// Starts the label writes [`planning::admit`] lets through.
    fn dispatch_labels(&mut self, candidates: Vec<Candidate>) {
        let limits = self.limits();
        let objects = &self.objects;
        let admitted = planning::admit(
            candidates,
            |key| objects.get(key).map(|r| r.placement.owner()),
            &self.moves,
            self.writes.len(),
            limits,
        );
        for admitted in admitted {
            self.start_label_write(admitted);
        }
    }

    fn start_label_write(&mut self, admitted: Admitted) {
        let Admitted {
            candidate: Candidate { key, action, .. },
            owner,
            starts_move,
        } = admitted;
        let (Some(record), Some(kind)) = (self.objects.get(&key), self.kind(key.kind)) else {
            return;
        };
        if let (AssignerAction::Assign { .. }, Some(wait)) = (&action, record.unowned) {
            // The assigner's own share of assignment latency: the watch and the write are
            // the API server's.
            self.metrics
                .unowned_wait
                .observe(wait.since.elapsed().as_secs_f64());
        }
        let Some(labels) = writes::label_patch(&self.settings.names, &action) else {
            return;
        };
        if starts_move {
            self.moves.insert(key.clone(), Instant::now());
        }
        let direct_from = matches!(action, AssignerAction::Assign { .. })
            .then_some(owner)
            .flatten();
        self.in_flight.insert(key.clone(), direct_from);
        let write = LabelWrite {
            key: key.clone(),
            owner,
            first: (!record.ever_owned && matches!(action, AssignerAction::Assign { .. }))
                .then_some(record.created)
                .flatten(),
            action,
            resource_version: record.resource_version.clone(),
        };
        let client = self.client.clone();
        let names = self.settings.names.clone();
        let claim = writes::claim_same_value(&write.action, &record.placement, record.drain_label);
        let span = label_write_span(&key, &write.action);
        span.in_scope(|| tracing::debug!(claim = claim.is_some(), "label write"));
        self.writes.spawn(
            async move {
                let (key, version) = (&write.key, &write.resource_version);
                let result = match claim {
                    Some(to) => {
                        writes::claim_shard_label(client, &names, &kind, key, version, to).await
                    }
                    None => writes::patch_labels(client, &names, &kind, key, version, labels).await,
                };
                tracing::Span::current().record("result", write_result(&result));
                Done::Label(Box::new((write, result)))
            }
            .instrument(span),
        );
    }

    /// The sharded kind `id` (shared with a write task).
    fn kind(&self, id: KindId) -> Option<Arc<ShardedKind>> {
        self.settings.kinds.get(usize::from(id)).cloned()
    }

    /// Shard objects, their status, and the Lease steps of retirement.
    fn plan_shards(
        &mut self,
        table: &ShardTable,
        n: ShardCount,
        labelled: &BTreeMap<ShardIndex, usize>,
        leases: &BTreeMap<ShardIndex, Arc<Lease>>,
    ) {
        // Another operator's Shard objects in the same namespace are not this one's.
        let names = &self.settings.names;
        let shard_objects: BTreeMap<ShardIndex, Arc<Shard>> = self
            .shards
            .state()
            .into_iter()
            .filter_map(|s| Some((shard_objects::index_of(names, &s)?, s)))
            .collect();
        let direct_from: HashSet<ShardIndex> = self.in_flight.values().flatten().copied().collect();
        let indices: BTreeSet<ShardIndex> = (0..n.get())
            .map(ShardIndex)
            .chain(leases.keys().copied())
            .chain(labelled.keys().copied())
            .chain(shard_objects.keys().copied())
            .collect();
        let now = Instant::now();
        self.shard_holds.retain(|_, (_, until)| now < *until);
        let homes = self.spread_homes(table);
        for shard in indices {
            let count = labelled.get(&shard).copied().unwrap_or(0);
            let mut plan = plan_shard(shard, table, count, direct_from.contains(&shard));
            // Spread over the workers (a fixed shard count), a shard's worker stays when the
            // shard leaves the count: see `spread_plan`.
            if !homes.is_empty() {
                let home = homes.get(shard.0 as usize).copied();
                plan = spread_plan(shard, table.lease(shard), plan, home);
            }
            let lease = leases.get(&shard);
            let lease_rv = lease.and_then(|l| l.resource_version());
            if let Some(step) = plan.lease_step {
                self.shard_write(shard, "lease", lease_rv.clone(), |client, names, ns| {
                    async move {
                        let rv = lease_rv.as_deref();
                        let result = writes::lease_step(client, &names, &ns, shard, rv, step).await;
                        Done::Lease(shard, step, result)
                    }
                    .boxed()
                });
            }
            let object = shard_objects.get(&shard);
            if object.is_none() && table.in_range(shard) {
                self.shard_write(shard, "create", None, |client, names, ns| {
                    async move {
                        Done::ShardObject(
                            shard,
                            "create",
                            shard_objects::create(client, &names, &ns, shard).await,
                        )
                    }
                    .boxed()
                });
            }
            if object.is_some() && plan.delete_shard_object {
                self.shard_write(shard, "delete", None, |client, names, ns| {
                    async move {
                        Done::ShardObject(
                            shard,
                            "delete",
                            shard_objects::delete(client, &names, &ns, shard).await,
                        )
                    }
                    .boxed()
                });
            }
            if let Some(object) = object {
                self.maybe_write_status(shard, plan.state, count, table, object);
            }
        }
        self.statuses.retain(|s, _| shard_objects.contains_key(s));
    }

    /// The home worker of every shard in range, when the shards are spread over a worker
    /// count of their own (empty otherwise: worker `i` is home for shard `i`).
    fn spread_homes(&self, table: &ShardTable) -> Vec<ShardIndex> {
        let Some(workers) = self.worker_count.as_ref().and_then(|rx| *rx.borrow()) else {
            return Vec::new();
        };
        spread_homes(table.desired_count(), workers, |shard| {
            table.lease(shard).map_or(shard, |l| l.home_of(shard))
        })
    }

    fn maybe_write_status(
        &mut self,
        shard: ShardIndex,
        state: ShardState,
        count: usize,
        table: &ShardTable,
        object: &Arc<Shard>,
    ) {
        let desired = AssignerStatus::new(state, count, &table.lease_state(shard));
        let now = Instant::now();
        match self.statuses.get(&shard) {
            Some((last, _)) if *last == desired => return,
            Some((_, at)) if now < *at + self.settings.status_interval => return,
            _ => {}
        }
        if desired.matches(object.status.as_ref()) {
            self.statuses.insert(shard, (desired, now));
            return;
        }
        if self.shard_holds.contains_key(&(shard, "status")) {
            return;
        }
        self.statuses.insert(shard, (desired.clone(), now));
        let previous = object.status.clone();
        self.shard_write(shard, "status", None, move |client, names, ns| {
            async move {
                let previous = previous.as_ref();
                let result =
                    shard_objects::apply_status(client, &names, &ns, shard, &desired, previous)
                        .await;
                Done::ShardObject(shard, "status", result)
            }
            .boxed()
        });
    }

    /// Starts a shard-level write unless the same kind is in flight or was just made for
    /// the same observed resourceVersion.
    fn shard_write(
        &mut self,
        shard: ShardIndex,
        kind: &'static str,
        observed_rv: Option<String>,
        write: impl FnOnce(Client, OperatorNames, String) -> futures::future::BoxFuture<'static, Done>,
    ) {
        if let Some((rv, _)) = self.shard_holds.get(&(shard, kind))
            && (*rv == observed_rv || kind != "lease")
        {
            return;
        }
        self.shard_holds.insert(
            (shard, kind),
            (observed_rv, Instant::now() + SHARD_WRITE_HOLD),
        );
        let future = write(
            self.client.clone(),
            self.settings.names.clone(),
            self.settings.operator_namespace.clone(),
        );
        self.writes.spawn(future);
    }

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Label(done) => {
                let (write, result) = *done;
                self.on_label_done(write, result);
            }
            Done::Reread(done) => {
                self.rereads_in_flight = self.rereads_in_flight.saturating_sub(1);
                let (key, based_on, result) = *done;
                match result {
                    Ok(meta) => {
                        if self.objects.observe_response(key.kind, &meta, &based_on) {
                            self.metrics.rereads.inc();
                        }
                    }
                    Err(err) => {
                        tracing::debug!(object = %key, %err, "re-reading the object failed")
                    }
                }
            }
            Done::FenceRead(shard, result) => self.on_fence_read(shard, result),
            Done::Lease(shard, step, result) => match result {
                Ok(Outcome::Applied(())) => tracing::info!(%shard, ?step, "shard lease updated"),
                Ok(Outcome::Stale) => {
                    tracing::debug!(%shard, ?step, "shard lease changed meanwhile");
                    self.shard_holds.remove(&(shard, "lease"));
                }
                Err(err) => tracing::warn!(%shard, ?step, %err, "updating the shard lease failed"),
            },
            Done::ShardObject(shard, kind, result) => match result {
                // The status interval is enforced by `statuses`; the hold only prevents two
                // status writes in flight at once.
                Ok(()) if kind == "status" => {
                    self.shard_holds.remove(&(shard, kind));
                }
                Ok(()) => tracing::info!(%shard, kind, "shard object updated"),
                Err(err) => {
                    if shardop::reachability::is_transport_error(&err) {
                        // The outage is logged once by the reachability tracker.
                        tracing::debug!(%shard, kind, %err, "writing the Shard object failed");
                    } else {
                        tracing::warn!(%shard, kind, %err, "writing the Shard object failed");
                    }
                    self.statuses.remove(&shard);
                }
            },
        }
    }

    fn on_fence_read(
        &mut self,
        shard: ShardIndex,
        result: Result<Option<Box<Lease>>, kube::Error>,
    ) {
        let now = Instant::now();
        match result {
            Ok(fresh) => {
                let (names, wall) = (&self.settings.names, Timestamp::now());
                if self.fences.read(shard, fresh.as_deref(), names, wall, now) {
                    tracing::debug!(%shard, "a fresh read of the Lease confirmed the fence");
                } else {
                    tracing::debug!(
                        %shard,
                        "the watched Lease reads fenced but a fresh read does not: no direct \
                         relabels off the shard for now"
                    );
                }
            }
            Err(err) => {
                tracing::debug!(%shard, %err, "reading the Lease to confirm its fence failed");
                self.fences.read_failed(shard, now);
            }
        }
    }

    fn on_label_done(&mut self, write: LabelWrite, result: LabelResult) {
        self.in_flight.remove(&write.key);
        match result {
            Ok(Outcome::Applied(meta)) => self.on_label_applied(&write, &meta),
            Ok(Outcome::Stale) => self.on_label_stale(&write),
            Err(err) => self.on_label_failed(&write.key, &err),
        }
    }

    /// A label write went through: the record follows the response, and the move or the
    /// assignment it made is counted.
    fn on_label_applied(&mut self, write: &LabelWrite, meta: &ObjectMeta) {
        let key = &write.key;
        self.write_backoff.succeeded(key);
        if !self
            .objects
            .observe_response(key.kind, meta, &write.resource_version)
        {
            tracing::debug!(object = %key, "the watch was ahead of the write's response");
        }
        match write.action {
            AssignerAction::Assign { to } => self.on_assigned(write, to),
            AssignerAction::RequestDrain { from, to } => {
                self.metrics.move_step("drain");
                tracing::info!(object = %key, %from, %to, "drain requested");
            }
            AssignerAction::CancelDrain => {
                self.metrics.move_step("cancel");
                self.moves.remove(key);
                tracing::info!(object = %key, "drain cancelled");
            }
            AssignerAction::ClearStrayDrain => {
                tracing::info!(object = %key, "stray drain label cleared");
            }
            AssignerAction::Nothing | AssignerAction::Wait => {}
        }
    }

    /// A shard label written: a move finished, or a first assignment.
    fn on_assigned(&mut self, write: &LabelWrite, to: ShardIndex) {
        let key = &write.key;
        if let Some(started) = self.moves.remove(key) {
            let phase = if write.owner.is_some() {
                "direct"
            } else {
                "complete"
            };
            self.metrics.move_step(phase);
            self.metrics
                .move_duration
                .observe(started.elapsed().as_secs_f64());
            tracing::info!(object = %key, shard = %to, phase, "move finished");
        } else {
            self.metrics.assignments.inc();
            if let Some(created) = write.first {
                let latency = Timestamp::now().duration_since(created);
                self.metrics
                    .assignment_latency
                    .observe(latency.as_secs_f64().max(0.0));
            }
            tracing::debug!(object = %key, shard = %to, "assigned");
        }
    }

    /// A write decided on a version the object no longer has.
    fn on_label_stale(&mut self, write: &LabelWrite) {
        let key = &write.key;
        self.metrics.conflicts.inc();
        if write.owner.is_some() && !matches!(write.action, AssignerAction::CancelDrain) {
            // Not started after all; a later pass re-decides.
            if !self
                .objects
                .get(key)
                .is_some_and(|r| matches!(r.placement, ObjectPlacement::Draining { .. }))
            {
                self.moves.remove(key);
            }
        }
        // Wait for a newer observation than the one the write was decided on (the watch
        // may already have brought it).
        self.holds.insert(
            key.clone(),
            Hold::UntilChanged(write.resource_version.clone(), Instant::now() + STALE_HOLD),
        );
    }

    /// A write that failed: the object waits out its backoff.
    fn on_label_failed(&mut self, key: &ObjectKey, err: &kube::Error) {
        let failed = self.write_backoff.failed(key, err, jitter_unit());
        let retry_in_ms = u64::try_from(failed.hold.as_millis()).unwrap_or(u64::MAX);
        if failed.warn {
            tracing::warn!(object = %key, %err, retry_in_ms, "label write failed");
        } else {
            tracing::debug!(object = %key, %err, retry_in_ms, "label write failed");
        }
        self.holds
            .insert(key.clone(), Hold::Until(Instant::now() + failed.hold));
    }
}

/// Drops the drain requests off the `pending` shards (see [`fences::Review::pending`]).
fn hold_drains_off(candidates: &mut Vec<Candidate>, pending: &BTreeSet<ShardIndex>) {
    if pending.is_empty() {
        return;
    }
    candidates.retain(|candidate| {
        !matches!(candidate.action, AssignerAction::RequestDrain { from, .. } if pending.contains(&from))
    });
}

/// How many stalled-move re-reads may start: up to [`REREAD_SHARE`]'s share of the write
/// slots in flight at once, within the slots left free.
fn reread_room(limits: Limits, writes_in_flight: usize, rereads_in_flight: usize) -> usize {
    let share = (limits.max_concurrent_writes / REREAD_SHARE).max(1);
    let free = limits
        .max_concurrent_writes
        .saturating_sub(writes_in_flight);
    share.saturating_sub(rereads_in_flight).min(free)
}

/// One watch stream per namespaced kind and watched namespace (or one for all namespaces),
/// and one per cluster-scoped kind.
fn source_scopes(kinds: &[Arc<ShardedKind>], watch_namespaces: &[String]) -> Vec<SourceScope> {
    let mut scopes = Vec::new();
    for kind in kinds {
        if kind.namespaced && !watch_namespaces.is_empty() {
            scopes.extend(watch_namespaces.iter().map(|ns| SourceScope {
                kind: kind.id,
                namespace: Some(ns.clone()),
            }));
        } else {
            scopes.push(SourceScope {
                kind: kind.id,
                namespace: None,
            });
        }
    }
    scopes
}

/// Resolves when `rx` (if any) changes; never when there is none or its sender is gone.
async fn changed(
    rx: Option<&mut ShardCountRx>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::core::ApiResource;

    #[test]
    fn a_slow_pass_spaces_out_the_next_so_passes_take_at_most_a_fifth_of_the_time() {
        let ms = Duration::from_millis;
        assert_eq!(pass_interval(ms(5)), PASS_INTERVAL);
        assert_eq!(pass_interval(ms(25)), PASS_INTERVAL);
        assert_eq!(pass_interval(ms(200)), ms(800));
    }

    fn kind(id: KindId, namespaced: bool) -> Arc<ShardedKind> {
        Arc::new(ShardedKind {
            id,
            name: "configmaps.v1".parse().unwrap(),
            api: ApiResource::erase::<ConfigMap>(&()),
            namespaced,
        })
    }

    #[test]
    fn namespaced_kinds_are_watched_per_namespace_and_cluster_scoped_ones_cluster_wide() {
        let kinds = [kind(0, true), kind(1, false)];
        let all = |kind| SourceScope {
            kind,
            namespace: None,
        };
        assert_eq!(source_scopes(&kinds, &[]), [all(0), all(1)]);
        let in_ns = |ns: &str| SourceScope {
            kind: 0,
            namespace: Some(ns.to_owned()),
        };
        assert_eq!(
            source_scopes(&kinds, &["a".to_owned(), "b".to_owned()]),
            [in_ns("a"), in_ns("b"), all(1)]
        );
    }

    #[test]
    fn no_drain_is_requested_off_a_shard_whose_fence_awaits_its_read() {
        let candidate = |name: &str, action| Candidate {
            created: None,
            key: ObjectKey {
                kind: 0,
                namespace: Arc::from("ns"),
                name: name.into(),
            },
            action,
        };
        let drain = |from| AssignerAction::RequestDrain {
            from: ShardIndex(from),
            to: ShardIndex(0),
        };
        let mut candidates = vec![
            candidate("off-3", drain(3)),
            candidate("off-2", drain(2)),
            candidate("new", AssignerAction::Assign { to: ShardIndex(1) }),
        ];
        hold_drains_off(&mut candidates, &BTreeSet::from([ShardIndex(3)]));
        let names: Vec<&str> = candidates.iter().map(|c| &*c.key.name).collect();
        assert_eq!(names, ["off-2", "new"]);
    }

    #[test]
    fn rereads_take_a_small_share_of_the_write_slots_and_only_free_ones() {
        let limits = Limits {
            max_concurrent_writes: 256,
            max_concurrent_moves: 1000,
        };
        assert_eq!(reread_room(limits, 0, 0), 16);
        assert_eq!(reread_room(limits, 250, 0), 6, "what label writes left");
        assert_eq!(reread_room(limits, 20, 16), 0, "the share is in flight");
        let one = Limits {
            max_concurrent_writes: 1,
            ..limits
        };
        assert_eq!(reread_room(one, 0, 0), 1);
        assert_eq!(reread_room(one, 1, 0), 0);
    }
}
