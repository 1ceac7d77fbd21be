//! The ideal writer under the churn load: the user's creates, changes and deletes at the
//! rate shardop got, each answered at once by exactly the writes a perfect operator makes,
//! on as many shards with a worker's client limits and concurrency. Whether the ideal
//! writer keeps the churn SLOs at a rate says whether any operator could on this control
//! plane; its burst throughput ([`Ceiling`](super::Ceiling)) cannot say that, because a
//! rate at the control plane's throughput has no bounded latency for anyone.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use futures::channel::mpsc::{self, UnboundedReceiver};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Patch, PatchParams};
use serde_json::json;
use shardop::constants::{FINALIZER, SHARD_LABEL};
use shardop_api::{DatabaseCluster, shard_for};

use super::{IdealWriter, WORKER_CONCURRENCY};
use crate::churn_load::{NewObject, UserWrite};

/// What the ideal writer did with a churn load's writes.
#[derive(Debug, Clone, Default)]
pub struct Served {
    /// Seconds each user write waited for a free slot of its shard: the ideal writer's
    /// queue, as a worker's queue wait is shardop's.
    pub queue_waits: Vec<f64>,
    /// The API writes it issued (the user's own not counted).
    pub writes: usize,
}

/// The ideal writer's shard of `name`: the assigner's hash, so the objects spread as
/// shardop's do.
fn shard_of(namespace: &str, name: &str, shards: usize) -> usize {
    let count =
        NonZeroU32::new(u32::try_from(shards).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
    shard_for(namespace, name, count).0 as usize
}

/// A user's DatabaseCluster in `namespace` as the assigner's webhook would have let it in:
/// its shard label and the operator's finalizer set at creation.
pub fn stamped_at_creation(namespace: String, shards: usize) -> NewObject {
    Arc::new(move |name| {
        let mut object = crate::load::database_cluster(name, 1);
        let shard = shard_of(&namespace, name, shards);
        object.metadata.labels = Some([(SHARD_LABEL.to_owned(), shard.to_string())].into());
        object.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
        object
    })
}

/// How an ideal writer's operator stage handles one user write.
enum Step {
    /// A new object: label and finalizer unless stamped, then Service, StatefulSet, status.
    Create(DatabaseCluster),
    /// A spec change: StatefulSet and status.
    Change(DatabaseCluster),
    /// A deleted object: the finalizer removed (the garbage collector takes the children).
    Delete(String),
}

impl Step {
    fn of(write: UserWrite) -> (Self, Instant) {
        match write {
            UserWrite::Created(object, at) => (Self::Create(object), at),
            UserWrite::Changed(object, at) => (Self::Change(object), at),
            UserWrite::Deleted(name, at) => (Self::Delete(name), at),
        }
    }

    fn name(&self) -> &str {
        match self {
            Self::Create(object) | Self::Change(object) => {
                object.metadata.name.as_deref().unwrap_or_default()
            }
            Self::Delete(name) => name,
        }
    }
}

impl IdealWriter {
    /// Answers every write of `writes` until the load closes it, each object's on its own
    /// shard (the assigner's hash), a worker's concurrency per shard; `stamped` says the
    /// creates already carry label and finalizer. Records each answer in `served` as it
    /// completes, so a caller that stops waiting keeps what was done. A write whose object
    /// is gone meanwhile (churn deletes) counts as answered.
    pub async fn serve(
        &self,
        writes: UnboundedReceiver<UserWrite>,
        stamped: bool,
        served: &Mutex<Served>,
    ) -> anyhow::Result<()> {
        let shard_count = self.shards.len();
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..shard_count).map(|_| mpsc::unbounded()).unzip();
        let namespace = self.namespace.clone();
        let route = writes.for_each(move |write| {
            let (step, at) = Step::of(write);
            let shard = shard_of(&namespace, step.name(), shard_count);
            // The stages live until the router ends.
            let _ = senders[shard].unbounded_send((step, at));
            async {}
        });
        let stages = futures::future::try_join_all(receivers.into_iter().enumerate().map(
            |(shard, receiver)| {
                receiver
                    .map(move |(step, at): (Step, Instant)| {
                        let waited = at.elapsed().as_secs_f64();
                        async move {
                            let writes = self.answer(step, shard, stamped).await?;
                            let mut served = served.lock().unwrap_or_else(PoisonError::into_inner);
                            served.queue_waits.push(waited);
                            served.writes += writes;
                            anyhow::Ok(())
                        }
                    })
                    .buffer_unordered(WORKER_CONCURRENCY)
                    .try_for_each(|()| async { Ok(()) })
            },
        ));
        let ((), stages) = futures::future::join(route, stages).await;
        stages.map(|_| ())
    }

    /// The writes for one user write; returns how many it issued.
    async fn answer(&self, step: Step, shard: usize, stamped: bool) -> anyhow::Result<usize> {
        let done = match step {
            Step::Create(object) if stamped => self.converge_stamped(object, shard).await,
            Step::Create(object) => self.converge_new(object, shard).await.map(|()| 5),
            Step::Change(object) => self.converge_change(object, shard).await.map(|()| 2),
            Step::Delete(name) => self.release(&name, shard).await.map(|()| 1),
        };
        match done {
            Ok(writes) => Ok(writes),
            Err(error) if gone(&error) => Ok(0),
            Err(error) => Err(error),
        }
    }

    /// A new object the webhook stamped: Service, StatefulSet, status.
    async fn converge_stamped(
        &self,
        cluster: DatabaseCluster,
        shard: usize,
    ) -> anyhow::Result<usize> {
        self.apply_service(&cluster, shard).await?;
        self.converge_change(cluster, shard).await?;
        Ok(3)
    }

    /// Removes the finalizer of a deleted object.
    async fn release(&self, name: &str, shard: usize) -> anyhow::Result<()> {
        let patch = json!({ "metadata": { "finalizers": null } });
        self.api(shard)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }
}

/// Whether `error` says the object is gone (a churn delete came first).
fn gone(error: &anyhow::Error) -> bool {
    matches!(error.downcast_ref::<kube::Error>(), Some(kube::Error::Api(status)) if status.is_not_found())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_objects_carry_the_assigners_shard_and_the_finalizer() {
        let stamp = stamped_at_creation("ns".to_owned(), 4);
        for i in 0..50 {
            let name = format!("churn-{i:06}");
            let object = stamp(&name);
            let labels = object.metadata.labels.clone().unwrap_or_default();
            let expected = shard_for("ns", &name, NonZeroU32::new(4).unwrap()).0;
            assert_eq!(labels.get(SHARD_LABEL), Some(&expected.to_string()));
            assert_eq!(object.metadata.finalizers, Some(vec![FINALIZER.to_owned()]));
        }
    }

    #[test]
    fn only_not_found_counts_as_gone() {
        let status = |reason, code| {
            let mut status = kube::core::Status::failure("x", reason);
            status.code = code;
            anyhow::Error::from(kube::Error::Api(Box::new(status)))
        };
        assert!(gone(&status("NotFound", 404)));
        assert!(!gone(&status("Conflict", 409)));
        assert!(!gone(&anyhow::anyhow!("other")));
    }
}
