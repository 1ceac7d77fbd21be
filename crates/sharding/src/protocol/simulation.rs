//! A model of the shard protocol, checked by exploring interleavings.
//!
//! The model keeps the objects' labels and the shard Leases as the API server does (every
//! write is a compare-and-swap on a resourceVersion), and runs the assigner and the
//! workers as independent actors that decide from *stale* observations:
//!
//! * the assigner decides from a snapshot taken at some earlier step, and its writes land
//!   at any later step (or never, if it restarts first — a new leader only starts after the
//!   old one's requests have timed out);
//! * each worker reconciles from its own cache of each object, refreshed at arbitrary
//!   steps (and with a fresh list when it acquires a Lease);
//! * workers crash (their in-flight reconciles die with them) and their Leases expire
//!   later; they restart, take over Leases of other shards, release on request; the
//!   desired shard count changes.
//!
//! Users may edit labels by hand: a removed or garbled shard label, or a valid one that the
//! assigner did not write (untrusted: no worker starts on it, see
//! [`crate::label_trust`]). Hand edits to valid labels are inside the safety promise;
//! removed and garbled labels are only checked for liveness.
//!
//! Objects may also be created during a run, through the assigner's mutating admission
//! webhook: it stamps the shard label from its own snapshot of the shard count and Leases
//! ([`admission`]), which may be as stale as the assigner's (a CREATE racing a shard-count
//! change), or leaves the object unlabelled (webhook down, not ready). A user may create an
//! object with a forged shard label, which no worker trusts.
//!
//! After every step it checks the safety property, **at most one shard reconciles an
//! object at any time**, and from every explored state it runs a fair completion (no more
//! failures, every worker in range running) that must end with every object owned by its
//! desired, live shard.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::time::Duration;

use jiff::Timestamp;

use super::admission::{Admission, Creation, admission};
use super::failover::{Acquisition, Me, acquisition, release_wait, should_release};
use super::homes::spread_plan;
use super::lease::LeaseSnapshot;
use super::object::{AssignerAction, ObjectPlacement, WorkerAction, worker_action};
use super::plan::{LeaseStep, ObjectFacts, plan_object, plan_shard};
use super::shards::ShardTable;
use crate::assignment::{jump_consistent_hash, object_key_hash};
use crate::constants::{DRAIN_LABEL, SHARD_LABEL};
use crate::names::OperatorNames;
use crate::shard_index::{ShardCount, ShardIndex};

/// Shards (and workers: worker `w` is home for shard `w`) in the model.
const SHARDS: usize = 3;
const NOW: i64 = 1_000_000;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Label {
    Absent,
    /// Written by the assigner.
    Shard(u32),
    Garbage,
    /// A valid shard label somebody else wrote.
    HandEdited(u32),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Obj {
    label: Label,
    drain: bool,
    rv: u32,
    /// Not created yet: nobody sees it (a worker's cached copy is unlabelled, so ignored).
    created: bool,
}

impl Obj {
    fn placement(&self) -> ObjectPlacement {
        let mut labels = std::collections::BTreeMap::new();
        match &self.label {
            Label::Absent => {}
            Label::Shard(s) => {
                labels.insert(SHARD_LABEL.to_owned(), s.to_string());
            }
            Label::Garbage => {
                labels.insert(SHARD_LABEL.to_owned(), "x".to_owned());
            }
            Label::HandEdited(s) => {
                labels.insert(SHARD_LABEL.to_owned(), s.to_string());
            }
        }
        if self.drain {
            labels.insert(DRAIN_LABEL.to_owned(), "d".to_owned());
        }
        let trusted = !matches!(self.label, Label::HandEdited(_));
        ObjectPlacement::from_labels(Some(&labels), trusted)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
struct Lease {
    exists: bool,
    holder: Option<usize>,
    /// Held and renewed; becomes false only once the holder is dead (expiry) or released.
    live: bool,
    acquired_once: bool,
    retired: bool,
    release_requested: bool,
    /// The home worker the assigner named on it (`None`: the worker of the shard's index).
    home: Option<usize>,
    rv: u32,
}

impl Lease {
    fn snapshot(&self) -> LeaseSnapshot {
        let renewed = if self.live { NOW - 1 } else { NOW - 3_600 };
        LeaseSnapshot {
            holder: self.holder.map(|w| format!("shardop-worker-{w}")),
            acquired_once: self.acquired_once,
            renew_time: Some(Timestamp::from_second(renewed).unwrap_or(Timestamp::UNIX_EPOCH)),
            duration: Some(Duration::from_secs(15)),
            release_requested_by: self.release_requested.then(|| "x".to_owned()),
            retired: self.retired,
            home_worker: self.home.map(|h| ShardIndex(h as u32)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Worker {
    alive: bool,
    cache: Vec<Option<Obj>>,
    /// In-flight reconciles: (shard, object).
    reconciling: BTreeSet<(u32, usize)>,
    /// Writes of reconciles aborted when a hand-back's grace ran out: (shard, object). The
    /// worker gave up on them, but the API server may still apply them at any later step,
    /// so they count as writers until they land.
    stray: BTreeSet<(u32, usize)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Write {
    Object {
        obj: usize,
        rv: u32,
        label: Label,
        drain: bool,
        /// The owner the decision moved the object away from, for in-flight tracking.
        from: Option<u32>,
    },
    Lease {
        shard: usize,
        rv: u32,
        step: LeaseStep,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Seen {
    n: u32,
    objs: Vec<Obj>,
    leases: Vec<Lease>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Assigner {
    seen: Option<Seen>,
    last_owner: Vec<Option<u32>>,
    /// The remembered owner was last seen asked to drain: both labels gone next is its
    /// acknowledgement, not tampering.
    drained: Vec<bool>,
    pending: Vec<Write>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
struct Budget {
    crashes: u8,
    stops: u8,
    assigner_restarts: u8,
    n_changes: u8,
    /// Removals and garbling of shard labels (outside the safety promise).
    tampers: u8,
    /// Hand edits to valid, untrusted shard labels (inside it).
    hand_edits: u8,
    /// Objects created with a forged (valid, untrusted) shard label (inside it).
    forged_creates: u8,
    /// The assigner naming another home worker on a shard's Lease (a rescale with a fixed
    /// shard count).
    rehomes: u8,
    /// Hand-backs whose grace runs out with reconciles in flight (they are aborted).
    aborts: u8,
}

/// What the webhook last observed of the shards: the desired count and the Leases.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct WebhookView {
    n: u32,
    leases: Vec<Lease>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct World {
    n: u32,
    /// The shard count is fixed and spread over all the workers (the assigner's `--shards`
    /// with `--worker-statefulset`): workers beyond `n` keep running.
    fixed: bool,
    objs: Vec<Obj>,
    leases: Vec<Lease>,
    workers: Vec<Worker>,
    assigner: Assigner,
    /// The webhook's snapshot (`None`: not ready, so it stamps nothing).
    webhook: Option<WebhookView>,
    budget: Budget,
    tampered: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    Observe,
    DecideObject(usize),
    DecideShard(usize),
    Land(usize),
    AssignerRestart,
    Acquire(usize, usize),
    Sync(usize, usize),
    StartReconcile(usize, usize, usize),
    FinishReconcile(usize, usize, usize),
    Ack(usize, usize, usize),
    Release(usize, usize),
    Crash(usize),
    GracefulStop(usize),
    Expire(usize),
    RestartWorker(usize),
    ChangeN(u32),
    Tamper(usize, Label),
    /// The webhook refreshes its snapshot of the shard count and Leases.
    WebhookObserve,
    /// Object created through the webhook, or with a forged label for this shard.
    Create(usize, Option<u32>),
    /// The assigner names worker `.1` home for shard `.0` on its Lease (a `SetHome` write
    /// landing; a stale one loses to the resourceVersion precondition like any other).
    Rehome(usize, usize),
    /// Worker `.0`, asked to let shard `.1` go, aborts its in-flight reconciles of it: their
    /// writes become stray.
    Abort(usize, usize),
    /// A stray write of worker `.0` for shard `.1` and object `.2` lands.
    StrayLands(usize, usize, usize),
}

struct Model {
    names: Vec<String>,
    keys: Vec<u64>,
}

impl Model {
    fn table(&self, seen: &Seen) -> ShardTable {
        ShardTable::new(
            ShardCount::new(seen.n).unwrap_or(ShardCount::MIN),
            seen.leases
                .iter()
                .enumerate()
                .filter(|(_, l)| l.exists)
                .map(|(i, l)| (ShardIndex(i as u32), l.snapshot())),
            Timestamp::from_second(NOW).unwrap_or(Timestamp::UNIX_EPOCH),
        )
    }

    /// The webhook's real decision for creating object `o`, from its snapshot.
    fn webhook_label(&self, w: &World, o: usize) -> Label {
        let table = w.webhook.as_ref().map(|view| {
            self.table(&Seen {
                n: view.n,
                objs: Vec::new(),
                leases: view.leases.clone(),
            })
        });
        let creation = Creation {
            namespace: "ns",
            name: Some(&self.names[o]),
            labels: None,
        };
        match admission(creation, table.as_ref(), &OperatorNames::default()) {
            Admission::Stamp(to) => Label::Shard(to.0),
            Admission::Skip(_) => Label::Absent,
        }
    }

    fn webhook_steps(&self, w: &World, steps: &mut Vec<Step>) {
        let current = WebhookView {
            n: w.n,
            leases: w.leases.clone(),
        };
        if w.webhook.as_ref() != Some(&current) {
            steps.push(Step::WebhookObserve);
        }
        for (o, obj) in w.objs.iter().enumerate() {
            if obj.created {
                continue;
            }
            steps.push(Step::Create(o, None));
            if w.budget.forged_creates > 0 {
                steps.extend((0..SHARDS as u32).map(|s| Step::Create(o, Some(s))));
            }
        }
    }

    fn steps(&self, w: &World) -> Vec<Step> {
        let mut steps = Vec::new();
        self.webhook_steps(w, &mut steps);
        let current = Seen {
            n: w.n,
            objs: w.objs.clone(),
            leases: w.leases.clone(),
        };
        if w.assigner.seen.as_ref() != Some(&current) {
            steps.push(Step::Observe);
        }
        if w.assigner.seen.is_some() {
            for o in 0..w.objs.len() {
                if self.decide_object(w, o).is_some() {
                    steps.push(Step::DecideObject(o));
                }
            }
            for s in 0..SHARDS {
                if self.decide_shard(w, s).is_some() {
                    steps.push(Step::DecideShard(s));
                }
            }
        }
        steps.extend((0..w.assigner.pending.len()).map(Step::Land));
        if w.budget.assigner_restarts > 0 {
            steps.push(Step::AssignerRestart);
        }
        for wi in 0..w.workers.len() {
            worker_steps(w, wi, &mut steps);
        }
        for (s, lease) in w.leases.iter().enumerate() {
            if lease.live && lease.holder.is_some_and(|h| !w.workers[h].alive) {
                steps.push(Step::Expire(s));
            }
        }
        if w.budget.n_changes > 0 {
            for n in 1..=SHARDS as u32 {
                if n != w.n {
                    steps.push(Step::ChangeN(n));
                }
            }
        }
        if w.budget.rehomes > 0 {
            for (s, lease) in w.leases.iter().enumerate() {
                for wi in (0..w.n as usize).filter(|wi| lease.exists && lease.home != Some(*wi)) {
                    steps.push(Step::Rehome(s, wi));
                }
            }
        }
        if w.budget.tampers > 0 {
            for o in 0..w.objs.len() {
                for label in [Label::Absent, Label::Garbage] {
                    if w.objs[o].created && w.objs[o].label != label {
                        steps.push(Step::Tamper(o, label));
                    }
                }
            }
        }
        if w.budget.hand_edits > 0 {
            for o in 0..w.objs.len() {
                for s in 0..SHARDS as u32 {
                    let label = Label::HandEdited(s);
                    if w.objs[o].created && w.objs[o].label != label {
                        steps.push(Step::Tamper(o, label));
                    }
                }
            }
        }
        steps
    }

    fn decide_object(&self, w: &World, o: usize) -> Option<Write> {
        let seen = w.assigner.seen.as_ref()?;
        if w.assigner
            .pending
            .iter()
            .any(|p| matches!(p, Write::Object { obj, .. } if *obj == o))
        {
            return None;
        }
        let obj = &seen.objs[o];
        if !obj.created {
            return None;
        }
        let placement = obj.placement();
        let action = plan_object(
            ObjectFacts {
                placement: &placement,
                deleting: false,
                key_hash: self.keys[o],
                last_owner: w.assigner.last_owner[o].map(ShardIndex),
            },
            &self.table(seen),
        );
        let (label, drain) = match action {
            AssignerAction::Nothing | AssignerAction::Wait => return None,
            AssignerAction::Assign { to } => (Label::Shard(to.0), false),
            AssignerAction::RequestDrain { .. } => (obj.label.clone(), true),
            AssignerAction::CancelDrain | AssignerAction::ClearStrayDrain => {
                (obj.label.clone(), false)
            }
        };
        Some(Write::Object {
            obj: o,
            rv: obj.rv,
            from: placement
                .owner()
                .map(|s| s.0)
                .filter(|_| label != obj.label),
            label,
            drain,
        })
    }

    fn decide_shard(&self, w: &World, s: usize) -> Option<Write> {
        let seen = w.assigner.seen.as_ref()?;
        if w.assigner
            .pending
            .iter()
            .any(|p| matches!(p, Write::Lease { shard, .. } if *shard == s))
        {
            return None;
        }
        let labelled = seen
            .objs
            .iter()
            .filter(|o| o.label == Label::Shard(s as u32))
            .count();
        let in_flight = w
            .assigner
            .pending
            .iter()
            .any(|p| matches!(p, Write::Object { from: Some(f), .. } if *f as usize == s));
        let shard = ShardIndex(s as u32);
        let table = self.table(seen);
        let mut plan = plan_shard(shard, &table, labelled, in_flight);
        if w.fixed {
            // The model's spread is the homes the Leases name (moved by `Rehome`).
            let home = table
                .in_range(shard)
                .then(|| table.lease(shard).map_or(shard, |l| l.home_of(shard)));
            plan = spread_plan(shard, table.lease(shard), plan, home);
        }
        plan.lease_step.map(|step| Write::Lease {
            shard: s,
            rv: seen.leases[s].rv,
            step,
        })
    }

    fn apply(&self, w: &mut World, step: &Step) {
        match step {
            Step::Observe => {
                for (o, obj) in w.objs.iter().enumerate() {
                    let (owner, drained) = (w.assigner.last_owner[o], w.assigner.drained[o]);
                    (w.assigner.last_owner[o], w.assigner.drained[o]) =
                        match (&obj.label, obj.drain) {
                            (Label::Shard(s), drain) => (Some(*s), drain),
                            (Label::Absent, false) if drained => (None, false),
                            _ => (owner, false),
                        };
                }
                w.assigner.seen = Some(Seen {
                    n: w.n,
                    objs: w.objs.clone(),
                    leases: w.leases.clone(),
                });
            }
            Step::DecideObject(o) => {
                if let Some(write) = self.decide_object(w, *o) {
                    w.assigner.pending.push(write);
                }
            }
            Step::DecideShard(s) => {
                if let Some(write) = self.decide_shard(w, *s) {
                    w.assigner.pending.push(write);
                }
            }
            Step::Land(i) => {
                let write = w.assigner.pending.remove(*i);
                land(w, write);
            }
            Step::AssignerRestart => {
                w.budget.assigner_restarts -= 1;
                // The memory of the owners of hand-edited objects is lost with it.
                w.tampered |= w
                    .objs
                    .iter()
                    .any(|o| matches!(o.label, Label::HandEdited(_)));
                // The old leader's requests have landed or timed out before a new leader
                // acts (its leader Lease outlives the request timeout): drop the rest.
                w.assigner = Assigner {
                    seen: None,
                    last_owner: vec![None; w.objs.len()],
                    drained: vec![false; w.objs.len()],
                    pending: Vec::new(),
                };
            }
            Step::Acquire(wi, s) => {
                let lease = &mut w.leases[*s];
                *lease = Lease {
                    exists: true,
                    holder: Some(*wi),
                    live: true,
                    acquired_once: true,
                    retired: false,
                    release_requested: false,
                    home: lease.home,
                    rv: lease.rv + 1,
                };
                // A controller for a newly acquired shard starts from a fresh list.
                w.workers[*wi].cache = w.objs.iter().cloned().map(Some).collect();
            }
            Step::Sync(wi, o) => w.workers[*wi].cache[*o] = Some(w.objs[*o].clone()),
            Step::StartReconcile(wi, s, o) => {
                w.workers[*wi].reconciling.insert((*s as u32, *o));
            }
            Step::FinishReconcile(wi, s, o) => {
                w.workers[*wi].reconciling.remove(&(*s as u32, *o));
            }
            Step::Ack(wi, _, o) => {
                let cached_rv = w.workers[*wi].cache[*o].as_ref().map(|c| c.rv);
                let obj = &mut w.objs[*o];
                if cached_rv == Some(obj.rv) {
                    obj.label = Label::Absent;
                    obj.drain = false;
                    obj.rv += 1;
                }
            }
            Step::Release(_, s) => release(&mut w.leases[*s]),
            Step::Abort(wi, s) => {
                w.budget.aborts -= 1;
                let worker = &mut w.workers[*wi];
                let aborted: Vec<(u32, usize)> = worker
                    .reconciling
                    .iter()
                    .filter(|(rs, _)| *rs as usize == *s)
                    .copied()
                    .collect();
                for key in aborted {
                    worker.reconciling.remove(&key);
                    worker.stray.insert(key);
                }
            }
            Step::StrayLands(wi, s, o) => {
                w.workers[*wi].stray.remove(&(*s as u32, *o));
            }
            Step::Crash(wi) => {
                w.budget.crashes -= 1;
                let worker = &mut w.workers[*wi];
                worker.alive = false;
                worker.reconciling.clear();
                // Expiry waits out the fencing margin for a crashed holder's writes.
                worker.stray.clear();
                worker.cache.iter_mut().for_each(|c| *c = None);
            }
            Step::GracefulStop(wi) => {
                w.budget.stops -= 1;
                for lease in &mut w.leases {
                    if lease.live && lease.holder == Some(*wi) {
                        release(lease);
                    }
                }
                let worker = &mut w.workers[*wi];
                worker.alive = false;
                worker.cache.iter_mut().for_each(|c| *c = None);
            }
            Step::Expire(s) => w.leases[*s].live = false,
            Step::RestartWorker(wi) => w.workers[*wi].alive = true,
            Step::ChangeN(n) => {
                w.budget.n_changes -= 1;
                w.n = *n;
            }
            Step::Rehome(s, wi) => {
                w.budget.rehomes -= 1;
                let lease = &mut w.leases[*s];
                lease.home = Some(*wi);
                lease.rv += 1;
            }
            Step::WebhookObserve => {
                w.webhook = Some(WebhookView {
                    n: w.n,
                    leases: w.leases.clone(),
                });
            }
            Step::Create(o, forged) => {
                let label = match forged {
                    Some(s) => {
                        w.budget.forged_creates -= 1;
                        Label::HandEdited(*s)
                    }
                    None => self.webhook_label(w, *o),
                };
                let obj = &mut w.objs[*o];
                obj.created = true;
                obj.label = label;
                obj.rv += 1;
            }
            Step::Tamper(o, label) => {
                if matches!(label, Label::HandEdited(_)) {
                    w.budget.hand_edits -= 1;
                    // Inside the promise only while the assigner remembers who owned the
                    // object: without that memory it cannot tell the owner whose
                    // reconcile may still be in flight (the admission policy closes this).
                    let remembered = match (&w.objs[*o].label, w.objs[*o].drain) {
                        (Label::Shard(s), _) => w.assigner.last_owner[*o] == Some(*s),
                        (Label::Absent, false) => true,
                        _ => false,
                    };
                    w.tampered |= !remembered;
                } else {
                    w.budget.tampers -= 1;
                    w.tampered = true;
                }
                let obj = &mut w.objs[*o];
                obj.label = label.clone();
                obj.rv += 1;
            }
        }
    }

    /// At most one (worker, shard) pair reconciles each object.
    fn check_safety(&self, w: &World, trace: &[Step]) {
        if w.tampered {
            return; // a user removing or garbling labels is outside the protocol's promise
        }
        for o in 0..w.objs.len() {
            let reconcilers: Vec<(usize, u32)> = w
                .workers
                .iter()
                .enumerate()
                .flat_map(|(wi, worker)| {
                    worker
                        .reconciling
                        .iter()
                        .chain(&worker.stray)
                        .filter(move |(_, ro)| *ro == o)
                        .map(move |(s, _)| (wi, *s))
                })
                .collect();
            assert!(
                reconcilers.len() <= 1,
                "object {o} reconciled by {reconcilers:?}\ntrace: {trace:#?}\nworld: {w:#?}"
            );
        }
    }

    /// From `w`, with no more failures and every in-range worker running, the system ends
    /// with every object owned by its desired, live shard and nothing left draining.
    fn check_liveness(&self, start: &World, trace: &[Step]) {
        let mut w = start.clone();
        w.budget = Budget::default();
        let n = w.n as usize;
        // Scaled in, the StatefulSet removes the pods beyond `n`; with a fixed shard count
        // they are workers like the others.
        let running = if w.fixed { SHARDS } else { n };
        // Objects not created yet are created now, through the webhook's (maybe stale)
        // snapshot.
        for o in 0..w.objs.len() {
            if !w.objs[o].created {
                self.apply(&mut w, &Step::Create(o, None));
            }
        }
        while let Some(write) = w.assigner.pending.pop() {
            land(&mut w, write);
        }
        for wi in 0..SHARDS {
            let worker = &mut w.workers[wi];
            worker.reconciling.clear();
            worker.stray.clear();
            if wi >= running {
                worker.alive = false;
            }
            for lease in &mut w.leases {
                if lease.holder == Some(wi) && !w.workers[wi].alive {
                    lease.live = false;
                }
            }
            w.workers[wi].alive = wi < running;
        }
        for _round in 0..12 {
            for wi in 0..running {
                for o in 0..w.objs.len() {
                    w.workers[wi].cache[o] = Some(w.objs[o].clone());
                }
                for s in 0..SHARDS {
                    if must_release(&w, wi, s) {
                        release(&mut w.leases[s]);
                    }
                }
                // Its home shards: acquire them, or ask their takers to hand them back (a
                // taker releases in its next turn, through its own decision). A shard whose
                // named home is gone is taken over (the model's clock is past every
                // stagger), as the workers do until the assigner names a new home.
                for s in 0..SHARDS {
                    match lease_decision(&w, wi, s) {
                        Acquisition::Acquire if !holds(&w, wi, s) => {
                            self.apply(&mut w, &Step::Acquire(wi, s));
                        }
                        Acquisition::RequestHandBack => {
                            let lease = &mut w.leases[s];
                            lease.release_requested = true;
                            lease.rv += 1;
                        }
                        _ => {}
                    }
                }
                for s in 0..SHARDS {
                    for o in 0..w.objs.len() {
                        let cached = w.workers[wi].cache[o].clone();
                        if holds(&w, wi, s)
                            && cached.is_some_and(|c| c.label == Label::Shard(s as u32) && c.drain)
                        {
                            self.apply(&mut w, &Step::Ack(wi, s, o));
                        }
                    }
                }
            }
            self.apply(&mut w, &Step::Observe);
            for o in 0..w.objs.len() {
                self.apply(&mut w, &Step::DecideObject(o));
            }
            for s in 0..SHARDS {
                self.apply(&mut w, &Step::DecideShard(s));
            }
            while !w.assigner.pending.is_empty() {
                let write = w.assigner.pending.remove(0);
                land(&mut w, write);
            }
        }
        for (o, obj) in w.objs.iter().enumerate() {
            let desired = jump_consistent_hash(self.keys[o], w.n);
            assert!(
                obj.label == Label::Shard(desired) && !obj.drain && w.leases[desired as usize].live,
                "object {o} did not converge to shard {desired}: {obj:?}\ntrace: {trace:#?}\nfinal: {w:#?}"
            );
        }
        for (s, lease) in w.leases.iter().enumerate() {
            // With a fixed count, a retired Lease stays as a tombstone for the worker of
            // its ordinal, but nobody holds it (an expired one may still name its holder).
            let cleaned_up = if w.fixed {
                lease.retired && !lease.live
            } else {
                !lease.exists
            };
            assert!(
                s < n || !lease.exists || cleaned_up,
                "retired shard {s} not cleaned up: {lease:?}\ntrace: {trace:#?}\nfinal: {w:#?}"
            );
        }
    }

    /// Explores every interleaving from `start` up to `depth` steps (states deduplicated),
    /// checking safety at each state and liveness from each. Returns the states visited.
    fn explore(&self, start: World, depth: usize, max_states: usize) -> usize {
        let mut seen = HashSet::new();
        let mut queue = VecDeque::from([(start, Vec::new())]);
        while let Some((w, trace)) = queue.pop_front() {
            if !seen.insert(w.clone()) {
                continue;
            }
            self.check_safety(&w, &trace);
            self.check_liveness(&w, &trace);
            if trace.len() >= depth || seen.len() >= max_states {
                continue;
            }
            for step in self.steps(&w) {
                let mut next = w.clone();
                self.apply(&mut next, &step);
                let mut next_trace = trace.clone();
                next_trace.push(step);
                queue.push_back((next, next_trace));
            }
        }
        seen.len()
    }

    /// A random walk of `len` steps, checking safety after each step and liveness at the end.
    fn walk(&self, start: World, len: usize, seed: u64) {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut w = start;
        let mut trace = Vec::new();
        for _ in 0..len {
            let steps = self.steps(&w);
            if steps.is_empty() {
                break;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let step = steps[(rng % steps.len() as u64) as usize].clone();
            self.apply(&mut w, &step);
            trace.push(step);
            self.check_safety(&w, &trace);
        }
        self.check_liveness(&w, &trace);
    }
}

fn holds(w: &World, wi: usize, s: usize) -> bool {
    w.workers[wi].alive && w.leases[s].live && w.leases[s].holder == Some(wi)
}

/// Worker `wi` as the worker's real decision functions see it.
fn me(wi: usize) -> (String, Duration, Duration) {
    (
        worker_identity(wi),
        Duration::from_secs(15),
        Duration::from_secs(2),
    )
}

fn worker_identity(wi: usize) -> String {
    format!("shardop-worker-{wi}")
}

/// The worker's real decision ([`acquisition`]) about shard `s`'s Lease as worker `wi`
/// sees it now. The model's "now" is far past every expiry and release grace, so the
/// takeover stagger is over.
fn lease_decision(w: &World, wi: usize, s: usize) -> Acquisition {
    let (identity, lease_duration, retry_period) = me(wi);
    let me = Me {
        identity: &identity,
        home: ShardIndex(wi as u32),
        lease_duration,
        retry_period,
    };
    let lease = &w.leases[s];
    let snapshot = lease.exists.then(|| lease.snapshot());
    acquisition(
        &me,
        ShardIndex(s as u32),
        snapshot.as_ref(),
        SHARDS as u32,
        Timestamp::from_second(NOW).unwrap_or(Timestamp::UNIX_EPOCH),
    )
}

/// Whether a running worker acquires shard `s`'s Lease: the worker's decision, for a Lease
/// it does not hold already.
fn can_acquire(w: &World, wi: usize, s: usize) -> bool {
    w.workers[wi].alive && !holds(w, wi, s) && lease_decision(w, wi, s) == Acquisition::Acquire
}

/// Whether worker `wi`, holding shard `s`, lets it go: the worker's real decision
/// ([`should_release`]) on a hand-back or retirement request.
fn must_release(w: &World, wi: usize, s: usize) -> bool {
    let (identity, lease_duration, retry_period) = me(wi);
    let me = Me {
        identity: &identity,
        home: ShardIndex(wi as u32),
        lease_duration,
        retry_period,
    };
    let lease = &w.leases[s];
    holds(w, wi, s) && should_release(&me, ShardIndex(s as u32), Some(&lease.snapshot()))
}

/// The steps worker `wi` can take in `w`: its real decisions about Leases and objects, and
/// the failures left in the budget.
fn worker_steps(w: &World, wi: usize, steps: &mut Vec<Step>) {
    let worker = &w.workers[wi];
    if !worker.alive {
        if w.leases.iter().all(|l| !(l.live && l.holder == Some(wi))) {
            steps.push(Step::RestartWorker(wi));
        }
        return;
    }
    for s in 0..SHARDS {
        if can_acquire(w, wi, s) {
            steps.push(Step::Acquire(wi, s));
        }
        let holds = holds(w, wi, s);
        let reconciling = worker.reconciling.iter().any(|(rs, _)| *rs as usize == s);
        if must_release(w, wi, s) && !reconciling && release_is_due(worker, s) {
            steps.push(Step::Release(wi, s));
        }
        if w.budget.aborts > 0 && must_release(w, wi, s) && reconciling {
            steps.push(Step::Abort(wi, s));
        }
        for &(rs, o) in worker.stray.iter().filter(|(rs, _)| *rs as usize == s) {
            steps.push(Step::StrayLands(wi, rs as usize, o));
        }
        for o in 0..w.objs.len() {
            let key = (s as u32, o);
            if worker.reconciling.contains(&key) {
                steps.push(Step::FinishReconcile(wi, s, o));
                continue;
            }
            // A controller aborted on a hand-back is gone: it starts nothing more.
            if !holds || worker.stray.iter().any(|(rs, _)| *rs as usize == s) {
                continue;
            }
            // The worker's own decision, from its cached copy.
            let shard = ShardIndex(s as u32);
            match worker.cache[o]
                .as_ref()
                .map(|cached| worker_action(&cached.placement(), shard, false))
            {
                Some(WorkerAction::AcknowledgeDrain) => steps.push(Step::Ack(wi, s, o)),
                Some(WorkerAction::Reconcile) => {
                    steps.push(Step::StartReconcile(wi, s, o));
                }
                _ => {}
            }
        }
    }
    for o in 0..w.objs.len() {
        if worker.cache[o].as_ref() != Some(&w.objs[o]) {
            steps.push(Step::Sync(wi, o));
        }
    }
    if w.budget.crashes > 0 {
        steps.push(Step::Crash(wi));
    }
    if w.budget.stops > 0
        && worker.reconciling.is_empty()
        && (0..SHARDS).all(|s| release_is_due(worker, s))
    {
        steps.push(Step::GracefulStop(wi));
    }
}

/// Whether worker `w` may release shard `s`'s Lease now: the worker's real rule
/// ([`release_wait`]). The model has no clock; the protocol assumes a write abandoned on
/// the wire lands within the fencing margin, so "the margin has passed" is "every stray
/// write of the shard landed", and while one has not, it was abandoned just now.
fn release_is_due(worker: &Worker, s: usize) -> bool {
    let abandoned = worker.stray.iter().any(|(rs, _)| *rs as usize == s);
    let since_abandoned = abandoned.then_some(Duration::ZERO);
    release_wait(
        since_abandoned,
        Duration::from_secs(15),
        Duration::from_secs(10),
    )
    .is_zero()
}

fn release(lease: &mut Lease) {
    lease.holder = None;
    lease.live = false;
    lease.release_requested = false;
    lease.rv += 1;
}

/// Applies an assigner write if its resourceVersion precondition still holds.
fn land(w: &mut World, write: Write) {
    match write {
        Write::Object {
            obj,
            rv,
            label,
            drain,
            ..
        } => {
            let current = &mut w.objs[obj];
            if current.rv == rv {
                // The patch response tells the assigner what it wrote, as in the binary.
                (w.assigner.last_owner[obj], w.assigner.drained[obj]) = match (&label, drain) {
                    (Label::Shard(s), drain) => (Some(*s), drain),
                    _ => (None, false),
                };
                current.label = label;
                current.drain = drain;
                current.rv += 1;
            }
        }
        Write::Lease { shard, rv, step } => {
            let lease = &mut w.leases[shard];
            match step {
                LeaseStep::CreateRetired if !lease.exists => {
                    *lease = Lease {
                        exists: true,
                        retired: true,
                        rv: lease.rv + 1,
                        ..Lease::default()
                    };
                }
                LeaseStep::CreateRetired => {}
                LeaseStep::CreateHomed(h) if !lease.exists => {
                    *lease = Lease {
                        exists: true,
                        home: Some(h.0 as usize),
                        rv: lease.rv + 1,
                        ..Lease::default()
                    };
                }
                LeaseStep::CreateHomed(_) => {}
                _ if !lease.exists || lease.rv != rv => {}
                LeaseStep::SetHome(h) => lease.home = Some(h.0 as usize),
                LeaseStep::MarkRetired => lease.retired = true,
                LeaseStep::LiftRetirement => lease.retired = false,
                LeaseStep::RequestRelease => lease.release_requested = true,
                LeaseStep::Delete => {
                    *lease = Lease {
                        rv: lease.rv,
                        ..Lease::default()
                    };
                }
            }
            if lease.exists || step == LeaseStep::Delete {
                lease.rv += 1;
            }
        }
    }
}

/// Object keys whose desired shards differ between 2 and 3 shards in useful ways: the first
/// moves to shard 2 when growing 2 -> 3, the second stays on shard 1, the third on 0.
fn key_names() -> Vec<String> {
    let find = |at2: u32, at3: u32| {
        (0..)
            .map(|i| format!("db-{i}"))
            .find(|name| {
                let h = object_key_hash("ns", name);
                jump_consistent_hash(h, 2) == at2 && jump_consistent_hash(h, 3) == at3
            })
            .unwrap_or_default()
    };
    vec![find(0, 2), find(1, 1), find(0, 0)]
}

/// A steady state: `n` shards served by their home workers, objects on their desired
/// shards, every worker (also those beyond `n`) running.
fn steady(objects: usize, n: u32, budget: Budget) -> (Model, World) {
    let names: Vec<String> = key_names().into_iter().take(objects).collect();
    let keys: Vec<u64> = names.iter().map(|n| object_key_hash("ns", n)).collect();
    let objs = keys
        .iter()
        .map(|&k| Obj {
            label: Label::Shard(jump_consistent_hash(k, n)),
            drain: false,
            rv: 1,
            created: true,
        })
        .collect::<Vec<_>>();
    let leases = (0..SHARDS)
        .map(|s| {
            if (s as u32) < n {
                Lease {
                    exists: true,
                    holder: Some(s),
                    live: true,
                    acquired_once: true,
                    rv: 1,
                    ..Lease::default()
                }
            } else {
                Lease::default()
            }
        })
        .collect();
    let workers = (0..SHARDS)
        .map(|_| Worker {
            alive: true,
            cache: objs.iter().cloned().map(Some).collect(),
            reconciling: BTreeSet::new(),
            stray: BTreeSet::new(),
        })
        .collect();
    let world = World {
        n,
        fixed: false,
        assigner: Assigner {
            seen: None,
            last_owner: vec![None; objs.len()],
            drained: vec![false; objs.len()],
            pending: Vec::new(),
        },
        objs,
        leases,
        workers,
        webhook: None,
        budget,
        tampered: false,
    };
    (Model { names, keys }, world)
}

/// `w` with object `o` not created yet (every worker's cached copy unlabelled).
fn not_created(mut w: World, o: usize) -> World {
    w.objs[o] = Obj {
        label: Label::Absent,
        drain: false,
        rv: 1,
        created: false,
    };
    for worker in &mut w.workers {
        worker.cache[o] = Some(w.objs[o].clone());
    }
    w
}

/// Runs `f` on a copy of `w` to build a scenario's starting point.
fn with(mut w: World, model: &Model, steps: &[Step]) -> World {
    for step in steps {
        model.apply(&mut w, step);
    }
    w
}

/// States explored per scenario; `SHARDOP_SIM_STATES` raises it for a deeper run.
fn max_states() -> usize {
    std::env::var("SHARDOP_SIM_STATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6_000)
}

#[test]
fn shards_handed_to_a_newly_named_home_worker_are_never_served_twice() {
    // A fixed shard count spread anew over the workers: the assigner names other home
    // workers on the Leases while their holders reconcile, crash or stop; the new home asks
    // for the shard, the holder lets go only once its reconciles are done.
    let (model, w) = steady(
        2,
        3,
        Budget {
            rehomes: 2,
            crashes: 1,
            stops: 1,
            ..Budget::default()
        },
    );
    let w = with(w, &model, &[Step::StartReconcile(1, 1, 1)]);
    let states = model.explore(w, 14, max_states());
    assert!(states > 100, "explored only {states} states");
}

#[test]
fn a_hand_back_that_aborts_its_reconciles_releases_only_once_their_writes_landed() {
    // A shard handed to a newly named home worker while its holder reconciles: the
    // hand-back's grace may run out with the reconcile in flight. It is aborted, and its
    // write may still reach the API server after the abort; the new home acquires a
    // released Lease at once, so the release waits for the stray write.
    let (model, w) = steady(
        2,
        3,
        Budget {
            aborts: 1,
            ..Budget::default()
        },
    );
    let mut w = with(w, &model, &[Step::StartReconcile(1, 1, 1)]);
    // The assigner named worker 2 home for shard 1, and worker 2 asked for it back.
    w.leases[1].home = Some(2);
    w.leases[1].release_requested = true;
    w.leases[1].rv += 1;
    let states = model.explore(w, 12, max_states());
    assert!(states > 100, "explored only {states} states");
}

#[test]
fn a_worker_beyond_a_fixed_shard_count_lets_its_ordinals_shard_go_for_good() {
    // Two shards spread over three workers: worker 2 has no shard, but it creates and
    // acquires its ordinal's Lease whenever none exists. The assigner retires it; worker 2
    // must let it go and never take it again, while it keeps running (and may crash).
    let (model, w) = steady(
        2,
        2,
        Budget {
            crashes: 1,
            ..Budget::default()
        },
    );
    let w = World { fixed: true, ..w };
    let states = model.explore(w, 12, max_states());
    assert!(states > 100, "explored only {states} states");
}

#[test]
fn expansion_with_owner_dying_mid_drain() {
    // 2 -> 3 has happened and worker 2 holds its Lease; object 0 (on shard 0) must move
    // to shard 2. Worker 0 may crash at any point of the move; worker 1 may take over.
    let (model, w) = steady(
        1,
        2,
        Budget {
            crashes: 1,
            ..Budget::default()
        },
    );
    let w = with(w, &model, &[Step::Acquire(2, 2)]);
    let w = World { n: 3, ..w };
    let states = model.explore(w, 16, max_states());
    assert!(states > 1_000, "explored only {states} states");
}

#[test]
fn assigner_restarting_mid_move() {
    let (model, w) = steady(
        2,
        2,
        Budget {
            assigner_restarts: 2,
            ..Budget::default()
        },
    );
    let w = with(w, &model, &[Step::Acquire(2, 2)]);
    let w = World { n: 3, ..w };
    model.explore(w, 16, max_states());
}

#[test]
fn shard_count_changing_again_during_a_rebalance() {
    // 2 -> 3 starts, then N goes back to 2 (or to 1) while objects are mid-move.
    let (model, w) = steady(
        2,
        2,
        Budget {
            n_changes: 2,
            ..Budget::default()
        },
    );
    let w = with(w, &model, &[Step::Acquire(2, 2)]);
    let w = World { n: 3, ..w };
    model.explore(w, 15, max_states());
}

#[test]
fn worker_ack_racing_a_drain_cancel() {
    // Object 0 is draining 0 -> 2 and N drops back to 2: the assigner cancels while worker
    // 0 acknowledges. Exactly one write wins; either way the object ends on shard 0.
    let (model, w) = steady(1, 2, Budget::default());
    let mut w = with(w, &model, &[Step::Acquire(2, 2)]);
    w.objs[0].drain = true;
    w.objs[0].rv += 1;
    w.workers[0].cache[0] = Some(w.objs[0].clone());
    w.budget.n_changes = 1;
    w.n = 3;
    model.explore(w, 14, max_states());
}

#[test]
fn scale_in_with_the_removed_worker_running_stopping_or_crashing() {
    let (model, w) = steady(
        3,
        3,
        Budget {
            crashes: 1,
            stops: 1,
            ..Budget::default()
        },
    );
    let w = World { n: 2, ..w };
    model.explore(w, 14, max_states());
}

#[test]
fn takeover_of_a_retired_shard_is_asked_to_release() {
    // Worker 2 died earlier and worker 1 took shard 2 over; then N drops to 2.
    let (model, w) = steady(3, 3, Budget::default());
    let mut w = with(w, &model, &[]);
    w.workers[2].alive = false;
    w.leases[2].holder = Some(1);
    w.leases[2].rv += 1;
    w.n = 2;
    w.budget.crashes = 1;
    model.explore(w, 14, max_states());
}

#[test]
fn tampered_labels_are_repaired() {
    let (model, w) = steady(
        2,
        3,
        Budget {
            tampers: 2,
            ..Budget::default()
        },
    );
    model.explore(w, 10, max_states());
}

#[test]
fn hand_edited_labels_never_start_a_second_reconciler() {
    // Any object's shard label may be set by hand to any shard, twice, while owners
    // reconcile, crash and get taken over: no second shard starts, and the assigner puts
    // every object back on its desired shard.
    let (model, w) = steady(
        2,
        3,
        Budget {
            hand_edits: 2,
            crashes: 1,
            ..Budget::default()
        },
    );
    let w = with(w, &model, &[Step::Observe]);
    let states = model.explore(w, 10, max_states());
    assert!(states > 1_000, "explored only {states} states");
}

#[test]
fn hand_edits_during_a_rebalance() {
    let (model, w) = steady(
        2,
        2,
        Budget {
            hand_edits: 1,
            ..Budget::default()
        },
    );
    let w = with(w, &model, &[Step::Acquire(2, 2), Step::Observe]);
    let w = World { n: 3, ..w };
    model.explore(w, 14, max_states());
}

#[test]
fn random_walks_with_every_kind_of_failure() {
    for seed in 0..400 {
        let (model, w) = steady(
            3,
            1 + (seed % 3) as u32,
            Budget {
                crashes: 3,
                stops: 2,
                assigner_restarts: 2,
                n_changes: 3,
                tampers: 0,
                hand_edits: 2,
                forged_creates: 1,
                rehomes: 2,
                aborts: 2,
            },
        );
        // The last object is created during the walk, through the webhook.
        let w = not_created(w, 2);
        model.walk(w, 250, seed);
    }
    for seed in 0..100 {
        let (model, w) = steady(
            3,
            3,
            Budget {
                crashes: 1,
                n_changes: 2,
                tampers: 3,
                ..Budget::default()
            },
        );
        model.walk(w, 150, 10_000 + seed);
    }
}

#[test]
fn webhook_stamp_from_a_stale_view_racing_a_shrink() {
    // The webhook saw 3 live shards; N drops to 2 (or to 1) while objects 0 (desired
    // shard 2 at N = 3) and 1 are being created: it may stamp shard 2 after shard 2 was
    // drained, released or deleted. Workers crash and stop too.
    let (model, w) = steady(
        3,
        3,
        Budget {
            n_changes: 1,
            crashes: 1,
            ..Budget::default()
        },
    );
    let w = with(w, &model, &[Step::WebhookObserve, Step::Observe]);
    let w = not_created(not_created(w, 0), 1);
    let w = World { n: 2, ..w };
    let states = model.explore(w, 14, max_states());
    assert!(states > 1_000, "explored only {states} states");
}

#[test]
fn webhook_stamp_from_a_stale_view_racing_a_growth() {
    // N grows 2 -> 3 (shard 2 acquired) while object 0, whose desired shard becomes 2, is
    // created by a webhook that still sees 2 shards, then N may change again.
    let (model, w) = steady(
        2,
        2,
        Budget {
            n_changes: 1,
            ..Budget::default()
        },
    );
    let w = with(w, &model, &[Step::WebhookObserve, Step::Acquire(2, 2)]);
    let w = not_created(w, 0);
    let w = World { n: 3, ..w };
    let states = model.explore(w, 15, max_states());
    assert!(states > 1_000, "explored only {states} states");
}

#[test]
fn forged_labels_at_creation_never_start_a_second_reconciler() {
    // Objects created with a valid shard label the assigner did not write, beside objects
    // stamped by the webhook, while the shard count changes: no worker acts on a forged
    // label, and the assigner claims or moves every object to its desired shard.
    let (model, w) = steady(
        2,
        3,
        Budget {
            forged_creates: 2,
            n_changes: 1,
            ..Budget::default()
        },
    );
    let w = with(w, &model, &[Step::WebhookObserve, Step::Observe]);
    let w = not_created(not_created(w, 0), 1);
    let states = model.explore(w, 12, max_states());
    assert!(states > 1_000, "explored only {states} states");
}
