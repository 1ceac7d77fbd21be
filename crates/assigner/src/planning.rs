//! The engine's decisions, without I/O: which label writes one planning pass makes, and
//! which of them start now within the concurrency bounds. The engine observes, calls these,
//! and carries the result out.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use shardop::protocol::{
    AssignerAction, LeaseSnapshot, ObjectFacts, ObjectPlacement, ShardTable, plan_object,
};
use shardop::{OperatorNames, ShardCount, ShardIndex};
use tokio::time::Instant;

use crate::objects::{ObjectKey, ObjectRecord, UnownedWait};
use crate::stalls::{LONG_UNASSIGNED, LongUnassigned, Unassigned};
use crate::writes;

/// The shard table of one pass: `n` desired shards and the operator's shard Leases, read
/// with the operator's own annotations (retirement, release requests).
pub fn shard_table(
    names: &OperatorNames,
    n: ShardCount,
    leases: &BTreeMap<ShardIndex, Arc<Lease>>,
    now: Timestamp,
) -> ShardTable {
    let snapshots = leases
        .iter()
        .map(|(shard, lease)| (*shard, LeaseSnapshot::from_lease_of(lease, names)));
    ShardTable::new(n, snapshots, now)
}

/// Why an object is left alone for now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Its write conflicted: wait until a newer resourceVersion is observed.
    UntilChanged(Box<str>, Instant),
    /// Its write failed: wait a moment.
    Until(Instant),
}

impl Hold {
    /// Whether the hold still keeps an object observed at `resource_version` alone at `now`.
    fn holds(&self, resource_version: &str, now: Instant) -> bool {
        match self {
            Self::UntilChanged(rv, until) => **rv == *resource_version && now < *until,
            Self::Until(until) => now < *until,
        }
    }
}

/// A label write to make: the object, what to do, and when it was created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub created: Option<Timestamp>,
    pub key: ObjectKey,
    pub action: AssignerAction,
}

/// What the engine tracks between passes, as the planning reads it.
pub struct Progress<'a> {
    /// Objects with a label write in flight, and the owner it moves them off (if any).
    pub in_flight: &'a HashMap<ObjectKey, Option<ShardIndex>>,
    pub holds: &'a HashMap<ObjectKey, Hold>,
    /// Objects in a move (from the drain request or direct relabel to the new label).
    pub moves: &'a HashMap<ObjectKey, Instant>,
}

/// The outcome of planning every object once.
#[derive(Debug, Default)]
pub struct ObjectPlan {
    /// Objects per owning shard (all kinds together).
    pub labelled: BTreeMap<ShardIndex, usize>,
    /// Objects without a valid owner.
    pub unassigned: usize,
    /// Label writes to make, oldest object first: at most what [`Room`] lets start.
    pub candidates: Vec<Candidate>,
    /// Objects in a move now: drain label set, acknowledged but not relabelled yet, or a
    /// write in flight that moves them off an owner.
    pub in_move: HashSet<ObjectKey>,
    /// Holds that ran out (or whose object changed) and can be forgotten.
    pub expired_holds: Vec<ObjectKey>,
    /// How long the object without a valid owner the longest has waited.
    pub oldest_unassigned: Duration,
    /// Objects whose wait for an owner has just passed [`LONG_UNASSIGNED`] (not reported
    /// before), and why this pass leaves them so.
    pub long_unassigned: Vec<LongUnassigned>,
}

/// How many label writes may start now: a pass keeps only that many candidates (the
/// oldest), so that planning a backlog of 100,000 objects copies a few hundred keys, not
/// every one, and sorts only those.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Room {
    /// Writes that may start.
    pub writes: usize,
    /// Moves that may start (each also takes a write).
    pub moves: usize,
}

impl Room {
    /// Room left under `limits` with `writes` writes in flight and `moves` moves under way.
    pub fn left(limits: Limits, writes: usize, moves: usize) -> Self {
        Self {
            writes: limits.max_concurrent_writes.saturating_sub(writes),
            moves: limits.max_concurrent_moves.saturating_sub(moves),
        }
    }
}

/// Plans every object against `table`: counts, moves under way, waits for an owner, and
/// the label writes to make (none for an object with a write in flight or a hold that
/// still applies), of which only the oldest that `room` lets start are kept.
pub fn plan_objects<'a>(
    objects: impl IntoIterator<Item = (&'a ObjectKey, &'a ObjectRecord)>,
    progress: &Progress<'_>,
    table: &ShardTable,
    room: Room,
    now: Instant,
) -> ObjectPlan {
    let mut plan = ObjectPlan::default();
    // Admission ([`admit`]) takes the oldest candidates in order, skipping moves beyond
    // the move bound: what it can take are the oldest `writes` that start no move and
    // the oldest `min(writes, moves)` that do, so those are all a pass must keep.
    let mut others = OldestCandidates::new(room.writes);
    let mut movers = OldestCandidates::new(room.writes.min(room.moves));
    for (key, record) in objects {
        let owner = record.placement.owner();
        match owner {
            Some(owner) => *plan.labelled.entry(owner).or_default() += 1,
            None => plan.unassigned += 1,
        }
        // A move is under way while the drain label is set, and between the
        // acknowledgement and the new label.
        let in_move = progress.moves.contains_key(key);
        let moving = matches!(record.placement, ObjectPlacement::Draining { .. })
            || (in_move && owner.is_none());
        if moving || progress.in_flight.get(key).is_some_and(Option::is_some) {
            plan.in_move.insert(key.clone());
        }
        let Some(action) = action_now(key, record, progress, table, now, &mut plan) else {
            continue;
        };
        if let Some(wait) = &record.unowned {
            let why = if matches!(action, AssignerAction::Assign { .. }) {
                Unassigned::WritePlanned
            } else {
                Unassigned::NoLiveDestination
            };
            plan.time_wait(key, wait, why, now);
        }
        if writes::is_label_write(&action) {
            let sort = if starts_move(&action, owner, in_move) {
                &mut movers
            } else {
                &mut others
            };
            sort.offer(record.created, key, action);
        }
    }
    // Writes that start no move (first assignments, the new label that ends a move,
    // cancellations) go ahead of those that start one: an object between its drain
    // acknowledgement and its new label is served by nobody, while one waiting for its
    // drain request is still served by its old owner. Ending moves first also lets the new
    // owners reconcile beside the rest of the label phase instead of after it. Within each
    // group, oldest first keeps the assignment latency of a creation storm fair.
    plan.candidates = others
        .into_oldest_first()
        .chain(movers.into_oldest_first())
        .collect();
    plan
}

/// What the protocol decides for one object now, or `None` when a write in flight or a
/// hold leaves it alone this pass (noted in `plan`).
fn action_now(
    key: &ObjectKey,
    record: &ObjectRecord,
    progress: &Progress<'_>,
    table: &ShardTable,
    now: Instant,
    plan: &mut ObjectPlan,
) -> Option<AssignerAction> {
    let waits = |plan: &mut ObjectPlan, why| {
        if let Some(wait) = &record.unowned {
            plan.time_wait(key, wait, why, now);
        }
    };
    if progress.in_flight.contains_key(key) {
        waits(plan, Unassigned::WriteInFlight);
        return None;
    }
    if let Some(hold) = progress.holds.get(key) {
        if hold.holds(&record.resource_version, now) {
            waits(plan, Unassigned::Held);
            return None;
        }
        plan.expired_holds.push(key.clone());
    }
    Some(plan_object(
        ObjectFacts {
            placement: &record.placement,
            deleting: record.deleting,
            key_hash: record.key_hash,
            last_owner: record.last_owner,
        },
        table,
    ))
}

impl ObjectPlan {
    /// Times the wait of an object without a valid owner.
    fn time_wait(&mut self, key: &ObjectKey, wait: &UnownedWait, why: Unassigned, now: Instant) {
        let waited = now.saturating_duration_since(wait.since);
        self.oldest_unassigned = self.oldest_unassigned.max(waited);
        if waited >= LONG_UNASSIGNED && !wait.reported {
            self.long_unassigned.push(LongUnassigned {
                key: key.clone(),
                why,
                waited,
            });
        }
    }
}

/// Whether a label write begins a move (counted against the move bound): a drain
/// request, or a direct relabel of an object that has a valid owner and no move yet.
fn starts_move(action: &AssignerAction, owner: Option<ShardIndex>, in_move: bool) -> bool {
    match action {
        AssignerAction::RequestDrain { .. } => true,
        AssignerAction::Assign { .. } => owner.is_some() && !in_move,
        _ => false,
    }
}

/// What orders candidates: creation, then key.
fn age(candidate: &Candidate) -> (Option<Timestamp>, &ObjectKey) {
    (candidate.created, &candidate.key)
}

/// Candidates by [`age`]: the order label writes start in.
fn oldest_first(a: &Candidate, b: &Candidate) -> Ordering {
    age(a).cmp(&age(b))
}

/// The `capacity` oldest candidates offered (a max-heap whose top is the newest kept).
struct OldestCandidates {
    capacity: usize,
    heap: BinaryHeap<ByAge>,
}

/// A candidate ordered by [`oldest_first`].
struct ByAge(Candidate);

impl PartialEq for ByAge {
    fn eq(&self, other: &Self) -> bool {
        oldest_first(&self.0, &other.0) == Ordering::Equal
    }
}

impl Eq for ByAge {}

impl PartialOrd for ByAge {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByAge {
    fn cmp(&self, other: &Self) -> Ordering {
        oldest_first(&self.0, &other.0)
    }
}

impl OldestCandidates {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            heap: BinaryHeap::new(),
        }
    }

    /// Keeps the candidate if it is among the `capacity` oldest so far; its key is copied
    /// only then.
    fn offer(&mut self, created: Option<Timestamp>, key: &ObjectKey, action: AssignerAction) {
        if self.heap.len() >= self.capacity {
            let Some(newest) = self.heap.peek() else {
                return;
            };
            if (created, key) >= age(&newest.0) {
                return;
            }
            self.heap.pop();
        }
        self.heap.push(ByAge(Candidate {
            created,
            key: key.clone(),
            action,
        }));
    }

    /// The candidates kept, oldest first ([`oldest_first`]).
    fn into_oldest_first(self) -> impl Iterator<Item = Candidate> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|by_age| by_age.0)
    }
}

/// The candidates that give an object without a valid owner its shard label (an
/// assignment), in order: what may start between passes. `owner_of` is the object's
/// current valid owner (`None` inside when it has none; outer `None`: the object is gone).
pub fn assignments_of_unowned(
    candidates: Vec<Candidate>,
    owner_of: impl Fn(&ObjectKey) -> Option<Option<ShardIndex>>,
) -> Vec<Candidate> {
    candidates
        .into_iter()
        .filter(|c| {
            matches!(c.action, AssignerAction::Assign { .. }) && owner_of(&c.key) == Some(None)
        })
        .collect()
}

/// The concurrency bounds of label writes.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Writes in flight at once (label and shard writes together).
    pub max_concurrent_writes: usize,
    /// Objects in a move at once.
    pub max_concurrent_moves: usize,
}

/// A candidate allowed to start now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub candidate: Candidate,
    /// The object's valid owner when the write was decided.
    pub owner: Option<ShardIndex>,
    /// The write begins a move (counted against the move bound from now on).
    pub starts_move: bool,
}

/// Which candidates start now, in order, given `writes_in_flight` writes already running
/// and the moves already under way: a drain request, or a direct relabel off a live owner,
/// starts a move; other writes (first assignments, the end of a move, cancellations) are
/// bounded by the write limit only.
pub fn admit(
    candidates: Vec<Candidate>,
    owner_of: impl Fn(&ObjectKey) -> Option<Option<ShardIndex>>,
    moves: &HashMap<ObjectKey, Instant>,
    writes_in_flight: usize,
    limits: Limits,
) -> Vec<Admitted> {
    let mut writes = writes_in_flight;
    let mut moving = moves.len();
    let mut admitted = Vec::new();
    for candidate in candidates {
        if writes >= limits.max_concurrent_writes {
            break;
        }
        let Some(owner) = owner_of(&candidate.key) else {
            continue;
        };
        let starts_move = starts_move(&candidate.action, owner, moves.contains_key(&candidate.key));
        if starts_move {
            if moving >= limits.max_concurrent_moves {
                continue;
            }
            moving += 1;
        }
        writes += 1;
        admitted.push(Admitted {
            candidate,
            owner,
            starts_move,
        });
    }
    admitted
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
    use kube::api::ObjectMeta;
    use kube::core::PartialObjectMeta;
    use kube::runtime::watcher;
    use shardop::assignment::shard_for;
    use shardop::protocol::{LeaseStep, plan_shard};

    use super::*;
    use crate::fences::{self, Fences};
    use crate::objects::{ObjectMeta as Meta, ObjectStore, SourceScope};

    fn names() -> OperatorNames {
        OperatorNames::new("tenants").unwrap()
    }

    /// An object (cluster-scoped when `ns` is empty) with the operator's shard and drain
    /// labels as given, the shard label written by its assigner.
    fn object(ns: &str, name: &str, shard: Option<u32>, drain: Option<u32>) -> Meta {
        let names = names();
        let mut labels = BTreeMap::new();
        if let Some(shard) = shard {
            labels.insert(names.shard_label(), shard.to_string());
        }
        if let Some(drain) = drain {
            labels.insert(names.drain_label(), drain.to_string());
        }
        let written = [ManagedFieldsEntry {
            manager: Some(names.assigner_field_manager()),
            fields_v1: Some(FieldsV1(serde_json::json!({
                "f:metadata": { "f:labels": { format!("f:{}", names.shard_label()): {} } }
            }))),
            ..Default::default()
        }];
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                namespace: (!ns.is_empty()).then(|| ns.to_owned()),
                name: Some(name.to_owned()),
                resource_version: Some("1".to_owned()),
                labels: Some(labels),
                managed_fields: Some(written.to_vec()),
                ..Default::default()
            },
            _phantom: Default::default(),
        }
    }

    fn store(objects: Vec<(u16, Meta)>) -> ObjectStore {
        let mut store = ObjectStore::new(names());
        for (kind, meta) in objects {
            let scope = SourceScope {
                kind,
                namespace: None,
            };
            store.apply(usize::from(kind), &scope, watcher::Event::Apply(meta));
        }
        store
    }

    /// `n` desired shards, each of `live` held by its own worker.
    fn table(n: u32, live: u32) -> ShardTable {
        let now = Timestamp::now();
        ShardTable::new(
            ShardCount::new(n).unwrap(),
            (0..live).map(|i| {
                (
                    ShardIndex(i),
                    LeaseSnapshot {
                        holder: Some(format!("tenants-worker-{i}")),
                        acquired_once: true,
                        renew_time: Some(now),
                        duration: Some(Duration::from_secs(30)),
                        ..Default::default()
                    },
                )
            }),
            now,
        )
    }

    fn key(kind: u16, ns: &str, name: &str) -> ObjectKey {
        ObjectKey {
            kind,
            namespace: ns.into(),
            name: name.into(),
        }
    }

    const UNBOUNDED: Room = Room {
        writes: usize::MAX,
        moves: usize::MAX,
    };

    struct Book {
        in_flight: HashMap<ObjectKey, Option<ShardIndex>>,
        holds: HashMap<ObjectKey, Hold>,
        moves: HashMap<ObjectKey, Instant>,
    }

    impl Book {
        fn new() -> Self {
            Self {
                in_flight: HashMap::new(),
                holds: HashMap::new(),
                moves: HashMap::new(),
            }
        }

        fn plan(&self, store: &ObjectStore, table: &ShardTable) -> ObjectPlan {
            self.plan_at(store, table, UNBOUNDED, Instant::now())
        }

        fn plan_at(
            &self,
            store: &ObjectStore,
            table: &ShardTable,
            room: Room,
            now: Instant,
        ) -> ObjectPlan {
            let progress = Progress {
                in_flight: &self.in_flight,
                holds: &self.holds,
                moves: &self.moves,
            };
            plan_objects(store.iter(), &progress, table, room, now)
        }
    }

    fn actions(plan: &ObjectPlan) -> BTreeMap<ObjectKey, AssignerAction> {
        plan.candidates
            .iter()
            .map(|c| (c.key.clone(), c.action.clone()))
            .collect()
    }

    #[test]
    fn new_objects_of_every_kind_are_assigned_by_the_hash_of_their_namespace_and_name() {
        let store = store(vec![
            (0, object("a", "x", None, None)),
            (1, object("", "x", None, None)),
            (1, object("", "y", None, None)),
        ]);
        let n = ShardCount::new(4).unwrap();
        let plan = Book::new().plan(&store, &table(4, 4));
        assert_eq!(plan.unassigned, 3);
        let expected: BTreeMap<_, _> = [
            (key(0, "a", "x"), shard_for("a", "x", n)),
            (key(1, "", "x"), shard_for("", "x", n)),
            (key(1, "", "y"), shard_for("", "y", n)),
        ]
        .into_iter()
        .map(|(k, to)| (k, AssignerAction::Assign { to }))
        .collect();
        assert_eq!(actions(&plan), expected);
    }

    #[test]
    fn between_passes_only_objects_without_an_owner_are_assigned() {
        let (mut store, table, movers) = grown();
        let scope = SourceScope {
            kind: 0,
            namespace: None,
        };
        store.apply(
            0,
            &scope,
            watcher::Event::Apply(object("a", "new", None, None)),
        );
        let plan = Book::new().plan(&store, &table);
        assert!(
            plan.candidates.len() > 1,
            "drains and an assignment planned"
        );
        let owner_of = |key: &ObjectKey| store.get(key).map(|r| r.placement.owner());
        let started = assignments_of_unowned(plan.candidates, owner_of);
        assert_eq!(started.len(), 1, "{started:?}");
        assert_eq!(started[0].key, key(0, "a", "new"));
        assert!(matches!(started[0].action, AssignerAction::Assign { .. }));
        assert!(
            !movers.contains(&started[0].key),
            "no drain starts between passes"
        );
        // A candidate whose object is gone, or got an owner meanwhile, is dropped too.
        let gone = Candidate {
            created: None,
            key: key(0, "a", "gone"),
            action: AssignerAction::Assign { to: ShardIndex(0) },
        };
        let owned = Candidate {
            key: movers[0].clone(),
            ..gone.clone()
        };
        assert!(assignments_of_unowned(vec![gone, owned], owner_of).is_empty());
    }

    #[test]
    fn nothing_is_assigned_before_shard_zero_was_ever_held() {
        let store = store(vec![(0, object("a", "x", None, None))]);
        let plan = Book::new().plan(&store, &table(2, 0));
        assert!(plan.candidates.is_empty(), "{:?}", plan.candidates);
        assert_eq!(plan.unassigned, 1);
    }

    /// Objects of several kinds owned by shard 0 of 1, after N went to 2.
    fn grown() -> (ObjectStore, ShardTable, Vec<ObjectKey>) {
        let two = ShardCount::new(2).unwrap();
        // Names that hash to shard 1 of 2, for each kind.
        let mut objects = Vec::new();
        let mut movers = Vec::new();
        for kind in [0_u16, 1] {
            let ns = if kind == 0 { "a" } else { "" };
            for i in 0..40 {
                let name = format!("o-{i}");
                objects.push((kind, object(ns, &name, Some(0), None)));
                if shard_for(ns, &name, two) == ShardIndex(1) {
                    movers.push(key(kind, ns, &name));
                }
            }
        }
        assert!(!movers.is_empty());
        (store(objects), table(2, 2), movers)
    }

    #[test]
    fn a_shard_count_change_drains_exactly_the_objects_that_move() {
        let (store, table, movers) = grown();
        let plan = Book::new().plan(&store, &table);
        assert_eq!(plan.labelled.get(&ShardIndex(0)), Some(&80));
        let drained: Vec<_> = plan.candidates.iter().map(|c| c.key.clone()).collect();
        let mut expected = movers.clone();
        expected.sort();
        let mut sorted = drained.clone();
        sorted.sort();
        assert_eq!(sorted, expected);
        for c in &plan.candidates {
            assert_eq!(
                c.action,
                AssignerAction::RequestDrain {
                    from: ShardIndex(0),
                    to: ShardIndex(1)
                }
            );
        }
    }

    #[test]
    fn an_acknowledged_drain_is_relabelled_to_the_new_shard() {
        let two = ShardCount::new(2).unwrap();
        let name = (0..)
            .map(|i| format!("o-{i}"))
            .find(|n| shard_for("", n, two) == ShardIndex(1))
            .unwrap();
        let draining = store(vec![(1, object("", &name, Some(0), Some(1)))]);
        let plan = Book::new().plan(&draining, &table(2, 2));
        // Waiting for the owner's acknowledgement: no write, but a move under way.
        assert!(plan.candidates.is_empty());
        assert!(plan.in_move.contains(&key(1, "", &name)));
        // Acknowledged (both labels gone after the drain).
        let mut acknowledged = draining;
        acknowledged.apply(
            1,
            &SourceScope {
                kind: 1,
                namespace: None,
            },
            watcher::Event::Apply(object("", &name, None, None)),
        );
        let plan = Book::new().plan(&acknowledged, &table(2, 2));
        assert_eq!(
            actions(&plan).get(&key(1, "", &name)),
            Some(&AssignerAction::Assign { to: ShardIndex(1) })
        );
    }

    /// `object` at resourceVersion `rv`.
    fn at(mut meta: Meta, rv: &str) -> Meta {
        meta.metadata.resource_version = Some(rv.to_owned());
        meta
    }

    /// The tenants bench run: a cluster-scoped object drained from shard 3 to shard 4 of 5
    /// whose owner acknowledged the drain before the drain request's response came back.
    #[test]
    fn a_drain_acknowledged_before_the_write_response_is_still_relabelled() {
        let five = ShardCount::new(5).unwrap();
        let name = (0..)
            .map(|i| format!("tenant-{i:06}"))
            .find(|n| shard_for("", n, five) == ShardIndex(4))
            .unwrap();
        let scope = SourceScope {
            kind: 0,
            namespace: None,
        };
        let mut store = store(vec![(0, at(object("", &name, Some(3), None), "10"))]);
        let key = key(0, "", &name);
        let table = table(5, 5);
        assert_eq!(
            actions(&Book::new().plan(&store, &table)).get(&key),
            Some(&AssignerAction::RequestDrain {
                from: ShardIndex(3),
                to: ShardIndex(4)
            })
        );
        // The drain request lands at 11; the watch brings it, then the acknowledgement (12),
        // before the engine reads the write's response.
        let draining = at(object("", &name, Some(3), Some(4)), "11");
        store.apply(0, &scope, watcher::Event::Apply(draining.clone()));
        store.apply(
            0,
            &scope,
            watcher::Event::Apply(at(object("", &name, None, None), "12")),
        );
        assert!(
            !store.observe_response(0, &draining, "10"),
            "an older version"
        );
        let plan = Book::new().plan(&store, &table);
        assert_eq!(
            actions(&plan).get(&key),
            Some(&AssignerAction::Assign { to: ShardIndex(4) })
        );
        // A response that is the newest known is taken.
        let assigned = at(object("", &name, Some(4), None), "13");
        assert!(store.observe_response(0, &assigned, "12"));
        assert_eq!(
            store.get(&key).unwrap().placement,
            ObjectPlacement::Owned(ShardIndex(4))
        );
        // A response for an object deleted meanwhile does not bring it back.
        store.apply(0, &scope, watcher::Event::Delete(assigned.clone()));
        assert!(!store.observe_response(0, &at(assigned, "14"), "13"));
        assert!(store.get(&key).is_none());
    }

    /// The safety net for a record that fell behind its object anyway: the re-read of a
    /// stalled move is taken, and the move completes.
    #[test]
    fn a_reread_catches_a_record_up_with_an_acknowledged_drain() {
        let two = ShardCount::new(2).unwrap();
        let name = (0..)
            .map(|i| format!("o-{i}"))
            .find(|n| shard_for("", n, two) == ShardIndex(1))
            .unwrap();
        let mut store = store(vec![(0, at(object("", &name, Some(0), Some(1)), "11"))]);
        let key = key(0, "", &name);
        let table = table(2, 2);
        assert_eq!(actions(&Book::new().plan(&store, &table)).get(&key), None);
        let reread = at(object("", &name, None, None), "12");
        assert!(store.observe_response(0, &reread, "11"));
        assert_eq!(
            actions(&Book::new().plan(&store, &table)).get(&key),
            Some(&AssignerAction::Assign { to: ShardIndex(1) })
        );
    }

    #[test]
    fn a_pass_keeps_only_the_oldest_candidates_that_can_start_and_admission_takes_the_same() {
        let (mut store, table, movers) = grown();
        let scope = SourceScope {
            kind: 0,
            namespace: None,
        };
        for i in 0..30 {
            let new = object("a", &format!("new-{i}"), None, None);
            store.apply(0, &scope, watcher::Event::Apply(new));
        }
        let book = Book::new();
        let now = Instant::now();
        let all = book.plan_at(&store, &table, UNBOUNDED, now).candidates;
        assert_eq!(all.len(), movers.len() + 30, "drains and assignments");
        let owner_of = |key: &ObjectKey| store.get(key).map(|r| r.placement.owner());
        for writes in [0, 1, 3, 10, 45, 200] {
            for moves in [0, 2, 5, 1000] {
                let limits = Limits {
                    max_concurrent_writes: writes,
                    max_concurrent_moves: moves,
                };
                let room = Room::left(limits, 0, 0);
                let kept = book.plan_at(&store, &table, room, now).candidates;
                assert!(kept.len() <= writes + writes.min(moves));
                assert_eq!(
                    admit(kept, owner_of, &book.moves, 0, limits),
                    admit(all.clone(), owner_of, &book.moves, 0, limits),
                    "{writes} writes, {moves} moves"
                );
            }
        }
    }

    /// The 3 → 4 rebalance at 10,000 objects: with the assigner's write slots full of
    /// drain requests for older objects, no move finished until nearly all had started.
    #[test]
    fn the_write_that_ends_a_move_starts_before_older_drain_requests() {
        let (mut store, table, movers) = grown();
        let scope = SourceScope {
            kind: 0,
            namespace: None,
        };
        // The newest object of all has had its drain acknowledged (no labels left).
        let mut acknowledged = object("a", "acknowledged", None, None);
        acknowledged.metadata.creation_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        store.apply(0, &scope, watcher::Event::Apply(acknowledged));
        let ended = key(0, "a", "acknowledged");
        let mut book = Book::new();
        book.moves.insert(ended.clone(), Instant::now());
        let plan = book.plan(&store, &table);
        assert_eq!(plan.candidates.len(), movers.len() + 1);
        assert_eq!(plan.candidates[0].key, ended, "{:?}", plan.candidates[0]);
        let owner_of = |key: &ObjectKey| store.get(key).map(|r| r.placement.owner());
        let one_slot = Limits {
            max_concurrent_writes: 1,
            max_concurrent_moves: 1000,
        };
        let admitted = admit(plan.candidates, owner_of, &book.moves, 0, one_slot);
        assert_eq!(admitted.len(), 1);
        assert_eq!(admitted[0].candidate.key, ended);
    }

    #[test]
    fn a_long_wait_for_an_owner_is_reported_once_and_a_new_wait_starts_after_an_owner() {
        let mut store = store(vec![(0, object("", "x", None, None))]);
        let scope = SourceScope {
            kind: 0,
            namespace: None,
        };
        let x = key(0, "", "x");
        let table = table(4, 0);
        let book = Book::new();
        let since = store.get(&x).and_then(|r| r.unowned).unwrap().since;
        let young = book.plan_at(&store, &table, UNBOUNDED, since + Duration::from_secs(1));
        assert_eq!(young.oldest_unassigned, Duration::from_secs(1));
        assert!(young.long_unassigned.is_empty());
        let long = since + LONG_UNASSIGNED;
        let plan = book.plan_at(&store, &table, UNBOUNDED, long);
        assert_eq!(plan.long_unassigned.len(), 1);
        assert_eq!(plan.long_unassigned[0].waited, LONG_UNASSIGNED);
        store.mark_wait_reported(&x);
        // A newer observation of the still unowned object keeps the wait and its report.
        store.apply(
            0,
            &scope,
            watcher::Event::Apply(object("", "x", None, None)),
        );
        let later = book.plan_at(&store, &table, UNBOUNDED, long + Duration::from_secs(1));
        assert!(later.long_unassigned.is_empty(), "reported already");
        assert_eq!(
            later.oldest_unassigned,
            LONG_UNASSIGNED + Duration::from_secs(1)
        );
        // Owned, then without an owner again: a new wait.
        store.apply(
            0,
            &scope,
            watcher::Event::Apply(object("", "x", Some(0), None)),
        );
        assert_eq!(store.get(&x).and_then(|r| r.unowned), None);
        store.apply(
            0,
            &scope,
            watcher::Event::Apply(object("", "x", None, None)),
        );
        let again = store.get(&x).and_then(|r| r.unowned).unwrap();
        assert!(again.since > since && !again.reported);
    }

    #[test]
    fn every_object_long_without_an_owner_is_listed_with_why_it_stays_so() {
        let two = ShardCount::new(2).unwrap();
        let names: Vec<String> = (0..)
            .map(|i| format!("o-{i}"))
            .filter(|n| shard_for("", n, two) == ShardIndex(1))
            .take(4)
            .collect();
        let mut objects: Vec<_> = names
            .iter()
            .map(|n| (0, object("", n, None, None)))
            .collect();
        objects.push((0, object("", "owned", Some(0), None)));
        let store = store(objects);
        let keys: Vec<_> = names.iter().map(|n| key(0, "", n)).collect();
        let mut book = Book::new();
        book.in_flight.insert(keys[0].clone(), None);
        let long = Instant::now() + LONG_UNASSIGNED;
        book.holds
            .insert(keys[1].clone(), Hold::Until(long + Duration::from_secs(1)));
        let reasons = |table: &ShardTable| -> BTreeMap<ObjectKey, Unassigned> {
            let plan = book.plan_at(&store, table, UNBOUNDED, long);
            assert!(plan.oldest_unassigned >= LONG_UNASSIGNED);
            plan.long_unassigned
                .into_iter()
                .map(|l| (l.key, l.why))
                .collect()
        };
        // Shard 1 of 2 has no live Lease (acquired once, then lost).
        let live = table(2, 2);
        let lost = ShardTable::new(
            two,
            [
                (ShardIndex(0), live.lease(ShardIndex(0)).unwrap().clone()),
                (
                    ShardIndex(1),
                    LeaseSnapshot {
                        acquired_once: true,
                        ..Default::default()
                    },
                ),
            ],
            Timestamp::now(),
        );
        let expected = |rest| {
            BTreeMap::from([
                (keys[0].clone(), Unassigned::WriteInFlight),
                (keys[1].clone(), Unassigned::Held),
                (keys[2].clone(), rest),
                (keys[3].clone(), rest),
            ])
        };
        assert_eq!(reasons(&lost), expected(Unassigned::NoLiveDestination));
        assert_eq!(reasons(&live), expected(Unassigned::WritePlanned));
    }

    #[test]
    fn writes_in_flight_and_holds_leave_an_object_alone_until_they_end() {
        let (store, table, movers) = grown();
        let (first, second) = (movers[0].clone(), movers[1].clone());
        let mut book = Book::new();
        book.in_flight.insert(first.clone(), Some(ShardIndex(0)));
        book.holds.insert(
            second.clone(),
            Hold::UntilChanged("1".into(), Instant::now() + Duration::from_secs(60)),
        );
        let plan = book.plan(&store, &table);
        let planned = actions(&plan);
        assert!(!planned.contains_key(&first));
        assert!(!planned.contains_key(&second));
        assert!(
            plan.in_move.contains(&first),
            "a write moving it off shard 0"
        );
        // A newer observation than the conflicted write's ends the hold.
        book.holds.insert(
            second.clone(),
            Hold::UntilChanged("0".into(), Instant::now() + Duration::from_secs(60)),
        );
        let plan = book.plan(&store, &table);
        assert!(actions(&plan).contains_key(&second));
        assert_eq!(plan.expired_holds, vec![second]);
    }

    fn candidate(i: usize, action: AssignerAction) -> Candidate {
        Candidate {
            created: None,
            key: key(0, "a", &format!("o-{i}")),
            action,
        }
    }

    #[test]
    fn admission_bounds_moves_and_writes() {
        let drain = AssignerAction::RequestDrain {
            from: ShardIndex(0),
            to: ShardIndex(1),
        };
        let assign = AssignerAction::Assign { to: ShardIndex(1) };
        let mut candidates: Vec<_> = (0..5).map(|i| candidate(i, drain.clone())).collect();
        // New objects (no owner) are not moves.
        candidates.extend((5..8).map(|i| candidate(i, assign.clone())));
        let owner_of = |k: &ObjectKey| {
            let i: usize = k.name.trim_start_matches("o-").parse().unwrap();
            Some((i < 5).then_some(ShardIndex(0)))
        };
        let limits = Limits {
            max_concurrent_writes: 100,
            max_concurrent_moves: 2,
        };
        let mut moves = HashMap::new();
        moves.insert(key(0, "b", "already-moving"), Instant::now());
        let admitted = admit(candidates.clone(), owner_of, &moves, 0, limits);
        let started: Vec<_> = admitted.iter().filter(|a| a.starts_move).collect();
        assert_eq!(started.len(), 1, "one move already under way, bound 2");
        assert_eq!(
            admitted.len(),
            4,
            "one drain and the three first assignments"
        );
        // The write bound counts writes already in flight.
        let few = admit(
            candidates,
            owner_of,
            &HashMap::new(),
            98,
            Limits {
                max_concurrent_writes: 100,
                max_concurrent_moves: 100,
            },
        );
        assert_eq!(few.len(), 2);
    }

    #[test]
    fn the_end_of_a_move_is_not_a_new_move() {
        let assign = AssignerAction::Assign { to: ShardIndex(1) };
        let moving = candidate(0, assign);
        let mut moves = HashMap::new();
        moves.insert(moving.key.clone(), Instant::now());
        let limits = Limits {
            max_concurrent_writes: 10,
            max_concurrent_moves: 1,
        };
        // A direct relabel off a (dead) owner already counted as a move.
        let admitted = admit(
            vec![moving],
            |_| Some(Some(ShardIndex(0))),
            &moves,
            0,
            limits,
        );
        assert_eq!(admitted.len(), 1);
        assert!(!admitted[0].starts_move);
    }

    #[test]
    fn the_shard_table_reads_the_operators_own_lease_annotations() {
        let names = names();
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "tenants-shard-2",
                "annotations": {
                    names.retired_annotation(): "true",
                    names.release_requested_annotation(): "tenants-assigner",
                },
            },
            "spec": {
                "holderIdentity": "tenants-worker-2",
                "acquireTime": Timestamp::now(),
                "renewTime": Timestamp::now(),
                "leaseDurationSeconds": 30,
            },
        }))
        .unwrap();
        let leases = BTreeMap::from([(ShardIndex(2), Arc::new(lease))]);
        let table = shard_table(
            &names,
            ShardCount::new(2).unwrap(),
            &leases,
            Timestamp::now(),
        );
        let snapshot = table.lease(ShardIndex(2)).unwrap();
        assert!(snapshot.retired);
        assert_eq!(
            snapshot.release_requested_by.as_deref(),
            Some("tenants-assigner")
        );
        // Retired and asked already: no Lease write until the holder lets go (read with the
        // default names, it would be marked retired again and again).
        assert_eq!(plan_shard(ShardIndex(2), &table, 0, false).lease_step, None);
        let unmarked = BTreeMap::from([(ShardIndex(2), Arc::new(Lease::default()))]);
        let table = shard_table(
            &names,
            ShardCount::new(2).unwrap(),
            &unmarked,
            Timestamp::now(),
        );
        assert_eq!(
            plan_shard(ShardIndex(2), &table, 0, false).lease_step,
            Some(LeaseStep::MarkRetired)
        );
    }

    /// Shard `shard`'s Lease, held by its worker and renewed at `renewed` for 30 s.
    fn held_lease(names: &OperatorNames, shard: u32, renewed: Timestamp, retired: bool) -> Lease {
        let annotations = if retired {
            serde_json::json!({ names.retired_annotation(): "true" })
        } else {
            serde_json::json!({})
        };
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": names.shard_lease_name(ShardIndex(shard)),
                "uid": format!("uid-{shard}"),
                "annotations": annotations,
            },
            "spec": {
                "holderIdentity": format!("tenants-worker-{shard}"),
                "acquireTime": renewed,
                "renewTime": renewed,
                "leaseDurationSeconds": 30,
            },
        }))
        .unwrap()
    }

    fn direct_relabels(plan: &ObjectPlan) -> usize {
        plan.candidates
            .iter()
            .filter(|c| matches!(c.action, AssignerAction::Assign { .. }))
            .count()
    }

    #[test]
    fn objects_on_a_shard_fenced_only_in_the_watched_lease_move_directly_once_a_read_confirms_it() {
        let names = names();
        let two = ShardCount::new(2).unwrap();
        let (wall, at) = (Timestamp::now(), Instant::now());
        let two_minutes_ago = wall - jiff::SignedDuration::from_secs(120);
        // Shard 2 is retired and, as watched, expired: its holder may still be renewing it.
        let leases = BTreeMap::from([
            (ShardIndex(0), Arc::new(held_lease(&names, 0, wall, false))),
            (ShardIndex(1), Arc::new(held_lease(&names, 1, wall, false))),
            (
                ShardIndex(2),
                Arc::new(held_lease(&names, 2, two_minutes_ago, true)),
            ),
        ]);
        let store = store(
            (0..20)
                .map(|i| (0, object("a", &format!("o-{i}"), Some(2), None)))
                .collect(),
        );
        let watched = shard_table(&names, two, &leases, wall);
        assert!(watched.is_fenced(ShardIndex(2)));
        let plan_with = |review: &fences::Review| {
            let table = fences::object_table(&names, two, &leases, &review.unconfirmed, wall);
            Book::new().plan(&store, &table)
        };
        let mut fences = Fences::default();

        let review = fences.review(&watched, &leases, at);
        assert_eq!(review.to_read, [ShardIndex(2)], "one read of the Lease");
        assert_eq!(
            review.pending,
            BTreeSet::from([ShardIndex(2)]),
            "no drain requests until the read answers"
        );
        let plan = plan_with(&review);
        assert_eq!(plan.candidates.len(), 20);
        assert_eq!(
            direct_relabels(&plan),
            0,
            "drained, not relabelled directly"
        );

        // The read shows the Lease renewed: the watched copy was old.
        let renewed = held_lease(&names, 2, wall, true);
        assert!(!fences.read(ShardIndex(2), Some(&renewed), &names, wall, at));
        let review = fences.review(&watched, &leases, at);
        assert!(review.to_read.is_empty(), "not read again at once");
        assert!(
            review.pending.is_empty(),
            "live after all: drained the normal way"
        );
        assert_eq!(direct_relabels(&plan_with(&review)), 0);

        // A later read finds it expired after all.
        let later = at + fences::RECHECK;
        let review = fences.review(&watched, &leases, later);
        assert_eq!(review.to_read, [ShardIndex(2)]);
        assert!(fences.read(
            ShardIndex(2),
            Some(&leases[&ShardIndex(2)]),
            &names,
            wall,
            later
        ));
        let review = fences.review(&watched, &leases, later + Duration::from_secs(3600));
        assert_eq!(
            review,
            fences::Review::default(),
            "confirmed: no more reads"
        );
        assert_eq!(direct_relabels(&plan_with(&review)), 20);

        // The confirmation ends with the watched fence (the shard back in range).
        let three = shard_table(&names, ShardCount::new(3).unwrap(), &leases, wall);
        assert_eq!(
            fences.review(&three, &leases, later),
            fences::Review::default()
        );
        assert_eq!(
            fences.review(&watched, &leases, later).to_read,
            [ShardIndex(2)]
        );
    }

    #[test]
    fn a_fence_is_confirmed_only_by_a_read_of_the_same_lease_showing_it() {
        let names = names();
        let two = ShardCount::new(2).unwrap();
        let (wall, at) = (Timestamp::now(), Instant::now());
        let expired = held_lease(&names, 2, wall - jiff::SignedDuration::from_secs(120), true);
        let leases = BTreeMap::from([(ShardIndex(2), Arc::new(expired.clone()))]);
        let watched = shard_table(&names, two, &leases, wall);
        let mut fences = Fences::default();
        let mut read = |fresh: Option<&Lease>, at: Instant| {
            fences.review(&watched, &leases, at);
            fences.read(ShardIndex(2), fresh, &names, wall, at);
            fences.review(&watched, &leases, at).unconfirmed
        };
        let unretired = {
            let mut lease = expired.clone();
            lease.metadata.annotations = None;
            lease
        };
        let recreated = {
            let mut lease = expired.clone();
            lease.metadata.uid = Some("another".to_owned());
            lease
        };
        let step = fences::RECHECK;
        assert_eq!(read(None, at), [ShardIndex(2)].into(), "gone");
        assert_eq!(read(Some(&unretired), at + step), [ShardIndex(2)].into());
        assert_eq!(
            read(Some(&recreated), at + step * 2),
            [ShardIndex(2)].into()
        );
        assert!(read(Some(&expired), at + step * 3).is_empty());
    }
}
