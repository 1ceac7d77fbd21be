//! The churn load: a user who creates, deletes and changes DatabaseClusters at fixed rates.
//! The same load drives shardop and the ideal writer; the ideal writer has no watch, so the
//! load hands it each write's result as the user saw it.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::channel::mpsc::UnboundedSender;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use shardop_api::DatabaseCluster;

use crate::convergence::{ChangeKind, Convergence};

/// The reference churn at RATE 1: 12 creates and 2 deletes a second, and every live object's
/// spec changed once a minute.
#[derive(Debug, Clone, Copy)]
pub struct ChurnRates {
    /// How long the load runs.
    pub duration: Duration,
    /// Creates per second.
    pub create_rate: f64,
    /// Deletes per second (the oldest objects first).
    pub delete_rate: f64,
    /// The user's requests in flight.
    pub concurrency: usize,
}

impl ChurnRates {
    /// The reference load scaled by `rate`.
    pub fn scaled(rate: f64, duration: Duration, concurrency: usize) -> Self {
        Self {
            duration,
            create_rate: 12.0 * rate,
            delete_rate: 2.0 * rate,
            concurrency: concurrency.max(1),
        }
    }
}

/// How the user writes a new object of a name.
pub type NewObject = Arc<dyn Fn(&str) -> DatabaseCluster + Send + Sync>;

/// The user's new objects without a label or finalizer, as a user writes them.
pub fn unlabelled() -> NewObject {
    Arc::new(|name| crate::load::database_cluster(name, 1))
}

/// One of the user's writes as its response showed it, with when it returned.
#[derive(Debug, Clone)]
pub enum UserWrite {
    /// A create returned this object.
    Created(DatabaseCluster, Instant),
    /// A spec change returned this object.
    Changed(DatabaseCluster, Instant),
    /// A delete of the named object was accepted.
    Deleted(String, Instant),
}

/// What a churn load did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChurnCounts {
    /// Objects created.
    pub created: usize,
    /// Objects deleted.
    pub deleted: usize,
    /// Spec changes.
    pub changes: usize,
}

/// Where the load sends what it did: the convergence watch records each create and change,
/// and `writes`, when given, receives every write (the ideal writer's input).
#[derive(Clone)]
struct Observers {
    conv: Convergence,
    writes: Option<UnboundedSender<UserWrite>>,
}

impl Observers {
    fn send(&self, write: UserWrite) {
        if let Some(writes) = &self.writes {
            // A consumer that stopped early only loses its own figures.
            let _ = writes.unbounded_send(write);
        }
    }
}

/// Runs the churn load against `api` for `rates.duration`: objects `churn-<n>` made by
/// `new_object`, the oldest (at least a minute old, so changed once) deleted, every live
/// object's spec changed once a minute. Records each create and change in `conv` and sends
/// every write to `writes` when given.
pub async fn run(
    api: Api<DatabaseCluster>,
    conv: Convergence,
    rates: ChurnRates,
    new_object: NewObject,
    writes: Option<UnboundedSender<UserWrite>>,
) -> anyhow::Result<ChurnCounts> {
    let mut user = User {
        api,
        observers: Observers { conv, writes },
        new_object,
        in_flight: Arc::new(tokio::sync::Semaphore::new(rates.concurrency)),
        tasks: tokio::task::JoinSet::new(),
        live: VecDeque::new(),
        rotation: VecDeque::new(),
        deleted: HashSet::new(),
        counts: ChurnCounts::default(),
        change_budget: 0.0,
    };
    let started = Instant::now();
    let tick = Duration::from_millis(100);
    let mut next = started;
    let mut round = 0_usize;
    while started.elapsed() < rates.duration {
        next += tick;
        tokio::time::sleep_until(next.into()).await;
        let t = started.elapsed().as_secs_f64();
        round += 1;
        user.create_due(t * rates.create_rate);
        user.delete_due(t * rates.delete_rate);
        user.change_due(tick.as_secs_f64() / 60.0, round);
        while let Some(result) = user.tasks.try_join_next() {
            result??;
        }
    }
    while let Some(result) = user.tasks.join_next().await {
        result??;
    }
    Ok(user.counts)
}

/// The user of a churn load: what it created, what is live, whose change is next, and its
/// writes in flight.
struct User {
    api: Api<DatabaseCluster>,
    observers: Observers,
    new_object: NewObject,
    in_flight: Arc<tokio::sync::Semaphore>,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
    /// Live objects, oldest first (the next to delete).
    live: VecDeque<String>,
    /// Objects in the order of their next spec change.
    rotation: VecDeque<String>,
    deleted: HashSet<String>,
    counts: ChurnCounts,
    /// Spec changes due and not made yet.
    change_budget: f64,
}

impl User {
    /// Creates objects until `due` have been created.
    fn create_due(&mut self, due: f64) {
        while (self.counts.created as f64) < due {
            let name = format!("churn-{:06}", self.counts.created);
            self.counts.created += 1;
            self.live.push_back(name.clone());
            self.rotation.push_back(name.clone());
            let (api, observers, permit) = self.handles();
            let object = (self.new_object)(&name);
            self.tasks.spawn(async move {
                let _permit = permit.acquire_owned().await?;
                let object = api
                    .create(&PostParams::default(), &object)
                    .await
                    .with_context(|| format!("creating {name}"))?;
                observers.conv.created(&object);
                observers.send(UserWrite::Created(object, Instant::now()));
                anyhow::Ok(())
            });
        }
    }

    /// Deletes the oldest objects until `due` have been deleted.
    fn delete_due(&mut self, due: f64) {
        while (self.counts.deleted as f64) < due {
            let Some(name) = self.live.pop_front() else {
                break;
            };
            self.counts.deleted += 1;
            self.deleted.insert(name.clone());
            let (api, observers, permit) = self.handles();
            self.tasks.spawn(async move {
                let _permit = permit.acquire_owned().await?;
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {
                        observers.send(UserWrite::Deleted(name, Instant::now()));
                        anyhow::Ok(())
                    }
                    Err(kube::Error::Api(_)) => anyhow::Ok(()),
                    Err(e) => Err(e.into()),
                }
            });
        }
    }

    /// Changes the specs due after `share` of a minute (every live object once a minute),
    /// the longest unchanged first, to round `round`'s image.
    fn change_due(&mut self, share: f64, round: usize) {
        self.change_budget += self.live.len() as f64 * share;
        while self.change_budget >= 1.0 {
            self.change_budget -= 1.0;
            let Some(name) = self.rotation.pop_front() else {
                break;
            };
            if self.deleted.contains(&name) {
                continue;
            }
            // A new object joins the back of the rotation, so its first change comes about a
            // minute after its creation.
            self.rotation.push_back(name.clone());
            self.counts.changes += 1;
            let (api, observers, permit) = self.handles();
            self.tasks.spawn(async move {
                let _permit = permit.acquire_owned().await?;
                if let Some(changed) = change_spec(&api, &observers.conv, &name, round).await? {
                    observers.send(UserWrite::Changed(changed, Instant::now()));
                }
                anyhow::Ok(())
            });
        }
    }

    /// What a write's task needs: the API, the observers and a slot among the writes in
    /// flight.
    fn handles(&self) -> (Api<DatabaseCluster>, Observers, Arc<tokio::sync::Semaphore>) {
        (
            self.api.clone(),
            self.observers.clone(),
            self.in_flight.clone(),
        )
    }
}

/// Changes the spec (image) of `name` to round `round`'s and records the change in `conv`;
/// returns the changed object, or `None` when it was deleted meanwhile (churn).
pub async fn change_spec(
    api: &Api<DatabaseCluster>,
    conv: &Convergence,
    name: &str,
    round: usize,
) -> anyhow::Result<Option<DatabaseCluster>> {
    let patch = json!({ "spec": { "image": format!("postgres:17.{round}") } });
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(changed) => {
            conv.changed(
                name,
                changed.metadata.generation.unwrap_or(0),
                ChangeKind::Change,
            );
            Ok(Some(changed))
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
        Err(err) => Err(err).with_context(|| format!("changing {name}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_one_is_the_reference_load() {
        let rates = ChurnRates::scaled(1.0, Duration::from_secs(60), 0);
        assert!((rates.create_rate - 12.0).abs() < 1e-9);
        assert!((rates.delete_rate - 2.0).abs() < 1e-9);
        assert_eq!(rates.concurrency, 1, "at least one request in flight");
        let doubled = ChurnRates::scaled(2.5, Duration::from_secs(60), 32);
        assert!((doubled.create_rate - 30.0).abs() < 1e-9);
        assert!((doubled.delete_rate - 5.0).abs() < 1e-9);
    }
}
