//! Watching DatabaseClusters converge: for each object, when the load generator changed it
//! and when the watch first showed it converged (status for the current generation, which
//! only the owning shard writes), plus its shard and drain labels and the shard label of
//! its StatefulSet (the shard that last reconciled it: the status names no shard). Lag
//! figures come from here, with the watch's own latency included, as a user watching
//! `kubectl get dbc -w` would see it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt};
use shardop_api::DatabaseCluster;
use shardop_api::constants::{DRAIN_LABEL, SHARD_LABEL};

/// Convergence state of every object in one namespace.
#[derive(Clone, Default)]
pub struct Convergence {
    inner: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    objects: HashMap<String, ObjectTimes>,
    /// Every change the generator made that converged: (kind, lag seconds, when converged).
    completed: Vec<(ChangeKind, f64, Instant)>,
    /// Live objects without a valid shard label, now and at most since the last reset.
    unassigned: usize,
    max_unassigned: usize,
    /// Create response → first shard label seen (seconds), per created object, in order.
    assign_lags: Vec<f64>,
    /// The shard label of each StatefulSet (named as its DatabaseCluster).
    children: HashMap<String, u32>,
}

/// What the load generator did to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Created it.
    Create,
    /// Changed its spec.
    Change,
}

#[derive(Debug, Clone, Default)]
struct ObjectTimes {
    /// When the load generator last created or changed the object, and how.
    changed_at: Option<(Instant, ChangeKind)>,
    /// The generation it changed it to (0 = unknown).
    generation: i64,
    /// When the object was first seen converged at that generation.
    converged_at: Option<Instant>,
    /// Whether the object still exists.
    deleted: bool,
    /// Its shard label, if valid.
    shard: Option<u32>,
    /// Whether it carries a drain label.
    draining: bool,
    /// When the load generator's create returned, and whether its response already
    /// carried a shard label (stamped at creation by the assigner's webhook).
    created: Option<(Instant, bool)>,
    /// When the watch first showed it.
    first_seen: Option<Instant>,
    /// When a shard label was first seen on it.
    first_labelled: Option<Instant>,
    /// Whether its create → labelled lag was recorded.
    assign_recorded: bool,
}

impl ObjectTimes {
    fn unassigned(&self) -> bool {
        !self.deleted && self.shard.is_none()
    }
}

/// When this watch first showed a created object, and first showed it labelled, in
/// seconds after the create's response (0 when the watch was first).
#[derive(Debug, Clone, PartialEq)]
pub struct SeenAfterCreate {
    /// The object's name.
    pub name: String,
    /// Create response → first event of the object: the watch's own delivery latency.
    pub delivered_s: f64,
    /// Create response → first event showing a shard label.
    pub labelled_s: f64,
}

/// An event of one of the two watches.
enum Seen {
    Object(watcher::Result<Event<DatabaseCluster>>),
    Child(watcher::Result<Event<PartialObjectMeta<StatefulSet>>>),
}

impl Convergence {
    /// Starts watching the DatabaseClusters of `api` and, when given, the StatefulSets of
    /// `children` (their metadata only: [`placed`](Self::placed) reads their shard label);
    /// the watches end with the returned task.
    pub fn watch(
        api: Api<DatabaseCluster>,
        children: Option<Api<PartialObjectMeta<StatefulSet>>>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let state = Self::default();
        let inner = state.clone();
        let task = tokio::spawn(async move {
            let objects = watcher::watcher(api, watcher::Config::default()).map(Seen::Object);
            let children = match children {
                Some(api) => watcher::watcher(api, watcher::Config::default())
                    .map(Seen::Child)
                    .boxed(),
                None => futures::stream::pending().boxed(),
            };
            let mut events = futures::stream::select(objects.boxed(), children);
            while let Some(event) = events.next().await {
                match event {
                    Seen::Object(Ok(Event::Apply(object) | Event::InitApply(object))) => {
                        inner.observe(&object);
                    }
                    Seen::Object(Ok(Event::Delete(object))) => inner.mark_deleted(&object),
                    Seen::Child(Ok(Event::Apply(child) | Event::InitApply(child))) => {
                        inner.observe_child(&child.metadata, true);
                    }
                    Seen::Child(Ok(Event::Delete(child))) => {
                        inner.observe_child(&child.metadata, false);
                    }
                    Seen::Object(Ok(Event::Init | Event::InitDone))
                    | Seen::Child(Ok(Event::Init | Event::InitDone)) => {}
                    Seen::Object(Err(error)) | Seen::Child(Err(error)) => {
                        tracing::warn!(%error, "convergence watch error");
                    }
                }
            }
        });
        (state, task)
    }

    /// Records the shard label of a StatefulSet (`exists`) or forgets it (deleted).
    fn observe_child(&self, meta: &kube::api::ObjectMeta, exists: bool) {
        let Some(name) = meta.name.clone() else {
            return;
        };
        let shard = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(SHARD_LABEL))
            .and_then(|v| v.parse::<u32>().ok());
        let mut state = self.lock();
        match shard.filter(|_| exists) {
            Some(shard) => state.children.insert(name, shard),
            None => state.children.remove(&name),
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that the load generator created or changed `name` to `generation`.
    pub fn changed(&self, name: &str, generation: i64, kind: ChangeKind) {
        let now = Instant::now();
        let mut state = self.lock();
        let State {
            objects,
            completed,
            assign_lags,
            ..
        } = &mut *state;
        let entry = objects.entry(name.to_owned()).or_default();
        if kind == ChangeKind::Create && !entry.assign_recorded && entry.shard.is_some() {
            // Labelled before the create's response arrived.
            entry.assign_recorded = true;
            assign_lags.push(0.0);
        }
        // The watch can beat the response: an event that already showed this generation
        // converged counts as converged at once.
        if entry.generation == generation
            && let Some(converged) = entry.converged_at
        {
            if entry.changed_at.is_none_or(|(_, k)| k != kind) {
                completed.push((kind, 0.0, converged));
            }
            entry.changed_at = Some((now, kind));
            return;
        }
        entry.changed_at = Some((now, kind));
        entry.generation = generation;
        entry.converged_at = None;
    }

    fn observe(&self, object: &DatabaseCluster) {
        let Some(name) = object.metadata.name.clone() else {
            return;
        };
        let now = Instant::now();
        let generation = object.metadata.generation.unwrap_or(0);
        let labels = object.metadata.labels.as_ref();
        let shard = labels
            .and_then(|l| l.get(SHARD_LABEL))
            .and_then(|v| v.parse::<u32>().ok());
        let draining = labels.is_some_and(|l| l.contains_key(DRAIN_LABEL));
        let converged = object
            .status
            .as_ref()
            .is_some_and(|s| s.observed_generation == Some(generation));
        let mut state = self.lock();
        let State {
            objects,
            completed,
            unassigned,
            max_unassigned,
            assign_lags,
            ..
        } = &mut *state;
        let entry = objects.entry(name).or_default();
        let was_unassigned = entry.unassigned() && entry.generation != 0;
        entry.first_seen.get_or_insert(now);
        if shard.is_some() && entry.first_labelled.is_none() {
            entry.first_labelled = Some(now);
        }
        if shard.is_some()
            && !entry.assign_recorded
            && let Some((at, ChangeKind::Create)) = entry.changed_at
        {
            entry.assign_recorded = true;
            assign_lags.push(now.duration_since(at).as_secs_f64());
        }
        entry.deleted = false;
        entry.shard = shard;
        entry.draining = draining;
        if entry.generation != generation {
            entry.generation = generation;
            entry.converged_at = None;
        }
        if converged && entry.converged_at.is_none() {
            entry.converged_at = Some(now);
            if let Some((at, kind)) = entry.changed_at {
                completed.push((kind, now.duration_since(at).as_secs_f64(), now));
            }
        }
        let is_unassigned = entry.unassigned();
        match (was_unassigned, is_unassigned) {
            (false, true) => *unassigned += 1,
            (true, false) => *unassigned = unassigned.saturating_sub(1),
            _ => {}
        }
        *max_unassigned = (*max_unassigned).max(*unassigned);
    }

    fn mark_deleted(&self, object: &DatabaseCluster) {
        if let Some(name) = &object.metadata.name {
            let mut state = self.lock();
            let entry = state.objects.entry(name.clone()).or_default();
            let was_unassigned = entry.unassigned() && entry.generation != 0;
            entry.deleted = true;
            if was_unassigned {
                state.unassigned = state.unassigned.saturating_sub(1);
            }
        }
    }

    /// Records that the load generator's create returned `object`: when, whether the
    /// response already carried a shard label (stamped by the assigner's webhook), and its
    /// generation as a change of kind `Create` to converge.
    pub fn created(&self, object: &DatabaseCluster) {
        let name = object.name_any();
        let labelled = object.labels().contains_key(SHARD_LABEL);
        {
            let mut state = self.lock();
            let entry = state.objects.entry(name.clone()).or_default();
            entry.created = Some((Instant::now(), labelled));
        }
        self.changed(
            &name,
            object.metadata.generation.unwrap_or(1),
            ChangeKind::Create,
        );
    }

    /// Create → labelled, in seconds, of every created object seen labelled: 0 when the
    /// create response carried the label (or the watch showed it first), else from the
    /// response to the first watch event with a label.
    pub fn assignment_lags(&self) -> Vec<f64> {
        self.lock()
            .objects
            .values()
            .filter_map(|o| {
                let (created, labelled) = o.created?;
                if labelled {
                    return Some(0.0);
                }
                let first = o.first_labelled?;
                Some(first.saturating_duration_since(created).as_secs_f64())
            })
            .collect()
    }

    /// What this watch saw of each of `names` after the load generator's create of it
    /// returned, for the objects created, seen, and seen labelled.
    pub fn seen_after_create<'a>(
        &self,
        names: impl IntoIterator<Item = &'a String>,
    ) -> Vec<SeenAfterCreate> {
        let state = self.lock();
        names
            .into_iter()
            .filter_map(|name| {
                let object = state.objects.get(name)?;
                let (created, _) = object.created?;
                let since_create =
                    |at: Instant| at.saturating_duration_since(created).as_secs_f64();
                Some(SeenAfterCreate {
                    name: name.clone(),
                    delivered_s: since_create(object.first_seen?),
                    labelled_s: since_create(object.first_labelled?),
                })
            })
            .collect()
    }

    /// Created objects whose create response carried a shard label.
    pub fn stamped_at_creation(&self) -> usize {
        self.lock()
            .objects
            .values()
            .filter(|o| o.created.is_some_and(|(_, labelled)| labelled))
            .count()
    }

    /// Objects that exist and are converged at their current generation.
    pub fn converged(&self) -> usize {
        self.lock()
            .objects
            .values()
            .filter(|t| !t.deleted && t.converged_at.is_some())
            .count()
    }

    /// Whether every object in `names` exists and is converged.
    pub fn all_converged<'a>(&self, names: impl IntoIterator<Item = &'a String>) -> bool {
        let state = self.lock();
        names.into_iter().all(|n| {
            state
                .objects
                .get(n)
                .is_some_and(|t| !t.deleted && t.converged_at.is_some())
        })
    }

    /// Objects that still exist.
    pub fn live(&self) -> usize {
        self.lock().objects.values().filter(|t| !t.deleted).count()
    }

    /// The shard label of every live object.
    pub fn shards(&self) -> HashMap<String, Option<u32>> {
        self.lock()
            .objects
            .iter()
            .filter(|(_, t)| !t.deleted)
            .map(|(n, t)| (n.clone(), t.shard))
            .collect()
    }

    /// Whether every live object carries `desired(name)` as its shard label, no drain label,
    /// and a StatefulSet that shard applied (the new owner's reconcile after a move). Needs
    /// the StatefulSet watch ([`watch`](Self::watch) with `children`).
    pub fn placed(&self, desired: impl Fn(&str) -> u32) -> bool {
        let state = self.lock();
        state
            .objects
            .iter()
            .filter(|(_, t)| !t.deleted)
            .all(|(n, t)| {
                let want = desired(n);
                t.shard == Some(want) && !t.draining && state.children.get(n) == Some(&want)
            })
    }

    /// Create response → first shard label seen (seconds) of the objects created since the
    /// last call (the watch's own latency included); clears them.
    pub fn take_assign_lags(&self) -> Vec<f64> {
        std::mem::take(&mut self.lock().assign_lags)
    }

    /// The most live objects without a valid shard label at once since the last call.
    pub fn take_max_unassigned(&self) -> usize {
        let mut state = self.lock();
        let max = state.max_unassigned;
        state.max_unassigned = state.unassigned;
        max
    }

    /// Lags (seconds) of converged changes of `kind` that converged after `since`.
    pub fn lags(&self, kind: ChangeKind, since: Option<Instant>) -> Vec<f64> {
        self.lock()
            .completed
            .iter()
            .filter(|(k, _, at)| *k == kind && since.is_none_or(|s| *at >= s))
            .map(|(_, lag, _)| *lag)
            .collect()
    }

    /// Lags of converged changes of the objects `names` (any kind).
    pub fn lags_of(&self, names: &std::collections::HashSet<String>) -> Vec<f64> {
        let state = self.lock();
        state
            .objects
            .iter()
            .filter(|(n, _)| names.contains(*n))
            .filter_map(|(_, t)| {
                let (at, _) = t.changed_at?;
                Some(t.converged_at?.duration_since(at).as_secs_f64())
            })
            .collect()
    }
}

/// The `q`-quantile (0..=1) of `values`, nearest-rank; 0 when empty.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), 50.0);
        assert_eq!(quantile(&values, 0.99), 99.0);
        assert_eq!(quantile(&values, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
        assert_eq!(quantile(&[3.0], 0.01), 3.0);
    }
}
