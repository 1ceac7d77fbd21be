//! The ideal writer: the best any operator could do on this control plane. For each object
//! it issues exactly the writes a perfect DatabaseCluster operator issues (shard label,
//! finalizer, headless Service, StatefulSet, status; for a spec change the StatefulSet and
//! the status), through shardop's rate-limited client with a worker's QPS, burst and
//! concurrency per shard, and nothing else: no watch, no cache, no reconcile logic. Its
//! objects/s, in the same run and on the same control plane as shardop, is the ceiling that
//! `efficiency` divides by; the controller manager reacts to its StatefulSets as it does to
//! shardop's.

use std::future::Future;
use std::time::Instant;

use futures::channel::mpsc;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Resource};
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::{Value, json};
use shardop::client::{ClientFactory, KubeClientArgs, KubeMetrics};
use shardop::constants::{FINALIZER, SHARD_LABEL, WORKER_FIELD_MANAGER};
use shardop_api::constants::condition::{AVAILABLE, DEGRADED, PROGRESSING};
use shardop_api::constants::{
    INSTANCE_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, NAME_LABEL, NAME_VALUE,
};
use shardop_api::{DatabaseCluster, DatabaseClusterStatus};

use crate::env::{WORKER_KUBE_BURST, WORKER_KUBE_QPS, WORKER_KUBE_QPS_MAX};
use crate::load;

mod at_rate;
pub use at_rate::{Served, stamped_at_creation};

/// A worker's default `--concurrency`: reconciles in flight per shard.
pub const WORKER_CONCURRENCY: usize = 16;

/// What the ideal writer sustained.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ceiling {
    /// Objects it took from create to converged status, per second.
    pub creates_per_s: f64,
    /// Spec changes it took from the user's patch to converged status, per second.
    pub changes_per_s: f64,
    /// API writes it issued per created object (the user's create included).
    pub writes_per_create: u32,
    /// API writes it issued per spec change (the user's patch included).
    pub writes_per_change: u32,
}

impl Ceiling {
    /// The figures of both passes; the writes per object are fixed by the workload.
    pub fn new(creates_per_s: f64, changes_per_s: f64) -> Self {
        Self {
            creates_per_s,
            changes_per_s,
            writes_per_create: 6,
            writes_per_change: 3,
        }
    }

    /// Its rate on a mix of `creates` creates and `changes` spec changes: the time the mix
    /// takes is the sum of the time of each kind at its own rate.
    pub fn mixed_rate(&self, creates: usize, changes: usize) -> f64 {
        let seconds = creates as f64 / self.creates_per_s + changes as f64 / self.changes_per_s;
        (creates + changes) as f64 / seconds
    }

    /// The figures for a report.
    pub fn to_json(self, objects: usize, shards: u32) -> Value {
        json!({
            "objects": objects,
            "shards": shards,
            "concurrency": shards as usize * WORKER_CONCURRENCY,
            "kube_qps_per_shard": WORKER_KUBE_QPS,
            "kube_qps_max_per_shard": WORKER_KUBE_QPS_MAX,
            "creates_per_s": self.creates_per_s,
            "changes_per_s": self.changes_per_s,
            "writes_per_create": self.writes_per_create,
            "writes_per_change": self.writes_per_change,
        })
    }
}

/// The ideal writer's object names.
fn names(objects: usize) -> Vec<String> {
    (0..objects).map(|i| format!("ideal-{i:06}")).collect()
}

/// The smoke checks of a scenario's ceiling figures: present and sane, not timing.
pub fn checks(ceiling_per_s: f64, efficiency: f64) -> Vec<(String, bool)> {
    vec![
        (
            "ceiling_per_s > 0".into(),
            ceiling_per_s.is_finite() && ceiling_per_s > 0.0,
        ),
        (
            "efficiency finite and > 0".into(),
            efficiency.is_finite() && efficiency > 0.0,
        ),
    ]
}

/// The ideal operator of `shards` shards, writing into one namespace.
pub struct IdealWriter {
    namespace: String,
    /// The user's client (the load generator's, unlimited).
    user: Client,
    /// The user's writes in flight (the load generator's CONCURRENCY).
    user_concurrency: usize,
    /// One client per shard, each with a worker's own rate limit.
    shards: Vec<Client>,
}

impl IdealWriter {
    /// A writer for `shards` shards into `namespace`, with clients built from `kubeconfig`;
    /// `user` writes the user's creates and changes, `user_concurrency` at a time.
    pub async fn new(
        kubeconfig: &std::path::Path,
        namespace: &str,
        shards: u32,
        user: Client,
        user_concurrency: usize,
    ) -> anyhow::Result<Self> {
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(kubeconfig)?,
            &KubeConfigOptions::default(),
        )
        .await?;
        let args = KubeClientArgs {
            kube_qps: WORKER_KUBE_QPS,
            kube_burst: WORKER_KUBE_BURST,
            kube_qps_max: WORKER_KUBE_QPS_MAX,
            ..KubeClientArgs::default()
        };
        let shards = (0..shards.max(1))
            .map(|shard| {
                // One factory per shard: each worker process has its own token bucket.
                let factory = ClientFactory::new(
                    config.clone(),
                    &args,
                    KubeMetrics::register(&mut Registry::default()),
                );
                factory.client(&format!("shardop-bench/ideal-writer-{shard}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            namespace: namespace.to_owned(),
            user,
            user_concurrency: user_concurrency.max(1),
            shards,
        })
    }

    /// Creates `objects` objects (`ideal-<i>`) and converges each (label, finalizer,
    /// Service, StatefulSet, status); returns objects per second.
    pub async fn measure_creates(&self, objects: usize) -> anyhow::Result<f64> {
        self.pipeline(
            &names(objects),
            |name| self.user_create(name),
            |cluster, shard| self.converge_new(cluster, shard),
        )
        .await
    }

    /// Changes the spec of the `objects` objects `measure_creates` made and converges each
    /// again (StatefulSet, status); returns changes per second.
    pub async fn measure_changes(&self, objects: usize) -> anyhow::Result<f64> {
        self.pipeline(
            &names(objects),
            |name| self.user_change(name),
            |cluster, shard| self.converge_change(cluster, shard),
        )
        .await
    }

    /// The user's writes (`user`, the load generator's concurrency in flight) feeding the
    /// operator's (`operator`, a worker's concurrency per shard in flight), as in a bench
    /// run of shardop; returns objects per second from the first user write to the last
    /// operator write.
    async fn pipeline<'a, U, UF, O, OF>(
        &'a self,
        names: &'a [String],
        user: U,
        operator: O,
    ) -> anyhow::Result<f64>
    where
        U: Fn(&'a str) -> UF,
        UF: Future<Output = anyhow::Result<DatabaseCluster>>,
        O: Fn(DatabaseCluster, usize) -> OF,
        OF: Future<Output = anyhow::Result<()>>,
    {
        let started = Instant::now();
        let shard_count = self.shards.len();
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..shard_count).map(|_| mpsc::unbounded()).unzip();
        let users = async move {
            futures::stream::iter(names.iter().enumerate())
                .map(|(i, name)| {
                    let written = user(name);
                    async move { anyhow::Ok((i % shard_count, written.await?)) }
                })
                .buffer_unordered(self.user_concurrency)
                .try_for_each(|(shard, cluster)| {
                    // The receivers live until every sender is gone.
                    let sent = senders[shard].unbounded_send(cluster);
                    async move { sent.map_err(|_| anyhow::anyhow!("operator stage ended early")) }
                })
                .await
            // `senders` drops here: each shard's stage ends once its backlog is done.
        };
        let operator = &operator;
        let operators = futures::future::try_join_all(receivers.into_iter().enumerate().map(
            |(shard, receiver)| {
                receiver
                    .map(move |cluster| operator(cluster, shard))
                    .buffer_unordered(WORKER_CONCURRENCY)
                    .try_for_each(|()| async { Ok(()) })
            },
        ));
        futures::future::try_join(users, operators).await?;
        Ok(names.len() as f64 / started.elapsed().as_secs_f64().max(1e-9))
    }

    /// The user's create.
    async fn user_create(&self, name: &str) -> anyhow::Result<DatabaseCluster> {
        let user: Api<DatabaseCluster> = Api::namespaced(self.user.clone(), &self.namespace);
        Ok(user
            .create(&PostParams::default(), &load::database_cluster(name, 1))
            .await?)
    }

    /// Every write the owning shard's operator makes for a new object.
    async fn converge_new(&self, cluster: DatabaseCluster, shard: usize) -> anyhow::Result<()> {
        let name = cluster.metadata.name.clone().unwrap_or_default();
        let name = name.as_str();
        let api = self.api(shard);
        let label = json!({ "metadata": { "labels": { SHARD_LABEL: shard.to_string() } } });
        // A label changes no generation: the created object's spec is the one to apply.
        api.patch(name, &PatchParams::default(), &Patch::Merge(&label))
            .await?;
        let finalizer = json!({
            "apiVersion": DatabaseCluster::api_version(&()),
            "kind": DatabaseCluster::kind(&()),
            "metadata": { "name": name, "finalizers": [FINALIZER] },
        });
        api.patch(name, &apply(), &Patch::Apply(&finalizer)).await?;
        self.apply_service(&cluster, shard).await?;
        self.apply_stateful_set(&cluster, shard).await?;
        self.write_status(&cluster, shard).await
    }

    /// The user's spec change.
    async fn user_change(&self, name: &str) -> anyhow::Result<DatabaseCluster> {
        let user: Api<DatabaseCluster> = Api::namespaced(self.user.clone(), &self.namespace);
        let patch = json!({ "spec": { "image": "postgres:17.1" } });
        Ok(user
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?)
    }

    /// The operator's StatefulSet apply and status write after a spec change.
    async fn converge_change(&self, cluster: DatabaseCluster, shard: usize) -> anyhow::Result<()> {
        self.apply_stateful_set(&cluster, shard).await?;
        self.write_status(&cluster, shard).await
    }

    async fn apply_service(&self, cluster: &DatabaseCluster, shard: usize) -> anyhow::Result<()> {
        let services: Api<k8s_openapi::api::core::v1::Service> =
            Api::namespaced(self.shards[shard].clone(), &self.namespace);
        let name = cluster.metadata.name.clone().unwrap_or_default();
        services
            .patch(
                &format!("{name}-headless"),
                &apply(),
                &Patch::Apply(&service(cluster, shard)),
            )
            .await?;
        Ok(())
    }

    async fn apply_stateful_set(
        &self,
        cluster: &DatabaseCluster,
        shard: usize,
    ) -> anyhow::Result<()> {
        let stateful_sets: Api<k8s_openapi::api::apps::v1::StatefulSet> =
            Api::namespaced(self.shards[shard].clone(), &self.namespace);
        let name = cluster.metadata.name.clone().unwrap_or_default();
        stateful_sets
            .patch(
                &name,
                &apply(),
                &Patch::Apply(&stateful_set(cluster, shard)),
            )
            .await?;
        Ok(())
    }

    async fn write_status(&self, cluster: &DatabaseCluster, shard: usize) -> anyhow::Result<()> {
        let name = cluster.metadata.name.clone().unwrap_or_default();
        let status = json!({ "status": status_after_apply(cluster, jiff::Timestamp::now()) });
        let params = PatchParams {
            field_manager: Some(WORKER_FIELD_MANAGER.to_owned()),
            ..Default::default()
        };
        self.api(shard)
            .patch_status(&name, &params, &Patch::Merge(&status))
            .await?;
        Ok(())
    }

    fn api(&self, shard: usize) -> Api<DatabaseCluster> {
        Api::namespaced(self.shards[shard].clone(), &self.namespace)
    }
}

/// The status a perfect operator writes once it applied `cluster`'s StatefulSet, before
/// the StatefulSet controller reported on it: the fields and conditions a worker writes then
/// (its `status::desired_status`), so that the API server decodes, validates and stores as
/// much for each of the ideal writer's status writes as for shardop's. A status without
/// conditions or claim ordinals cost the API server about half as much per write (CPU
/// profile of `churn`), which no operator of this workload could get away with.
fn status_after_apply(cluster: &DatabaseCluster, now: jiff::Timestamp) -> DatabaseClusterStatus {
    let generation = cluster.metadata.generation;
    let desired = cluster.spec.replicas;
    let condition = |type_: &str, status: &str, reason: &str, message: String| Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(now),
    };
    DatabaseClusterStatus {
        observed_generation: generation,
        replicas: 0,
        ready_replicas: 0,
        conditions: vec![
            condition(
                AVAILABLE,
                "False",
                "ReplicasNotReady",
                format!("0/{desired} replicas ready"),
            ),
            condition(
                PROGRESSING,
                "True",
                "RollingOut",
                format!("0/{desired} replicas updated"),
            ),
            condition(
                DEGRADED,
                "False",
                "Reconciled",
                "the children match the spec".to_owned(),
            ),
        ],
        claim_ordinals: Some(desired),
    }
}

/// Server-side apply as the worker does it.
fn apply() -> PatchParams {
    PatchParams::apply(WORKER_FIELD_MANAGER).force()
}

/// The labels of a child: the worker's (pod selector, managed-by, shard).
fn child_labels(name: &str, shard: usize) -> Value {
    json!({
        INSTANCE_LABEL: name,
        NAME_LABEL: NAME_VALUE,
        MANAGED_BY_LABEL: MANAGED_BY_VALUE,
        SHARD_LABEL: shard.to_string(),
    })
}

fn child_metadata(cluster: &DatabaseCluster, name: &str, shard: usize) -> Value {
    let owner = cluster.controller_owner_ref(&());
    json!({
        "name": name,
        "labels": child_labels(&cluster.metadata.name.clone().unwrap_or_default(), shard),
        "ownerReferences": owner.map(|o| vec![o]),
    })
}

/// The worker's headless Service for `cluster`, as an apply patch.
fn service(cluster: &DatabaseCluster, shard: usize) -> Value {
    let name = cluster.metadata.name.clone().unwrap_or_default();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(cluster, &format!("{name}-headless"), shard),
        "spec": {
            "clusterIP": "None",
            "selector": { INSTANCE_LABEL: name, NAME_LABEL: NAME_VALUE },
            "publishNotReadyAddresses": true,
        },
    })
}

/// The worker's StatefulSet for `cluster`, as an apply patch.
fn stateful_set(cluster: &DatabaseCluster, shard: usize) -> Value {
    let name = cluster.metadata.name.clone().unwrap_or_default();
    let selector = json!({ INSTANCE_LABEL: name, NAME_LABEL: NAME_VALUE });
    let spec = &cluster.spec;
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": child_metadata(cluster, &name, shard),
        "spec": {
            "replicas": spec.replicas,
            "serviceName": format!("{name}-headless"),
            "selector": { "matchLabels": selector },
            "podManagementPolicy": "Parallel",
            "persistentVolumeClaimRetentionPolicy": { "whenDeleted": "Delete", "whenScaled": "Retain" },
            "template": {
                "metadata": { "labels": {
                    INSTANCE_LABEL: name, NAME_LABEL: NAME_VALUE, MANAGED_BY_LABEL: MANAGED_BY_VALUE,
                } },
                "spec": { "containers": [{
                    "name": "database",
                    "image": spec.image,
                    "volumeMounts": [{ "name": "data", "mountPath": "/var/lib/database" }],
                }] },
            },
            "volumeClaimTemplates": [{
                "metadata": { "name": "data", "labels": selector },
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": { "requests": { "storage": spec.storage.size } },
                },
            }],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ceiling(creates_per_s: f64, changes_per_s: f64) -> Ceiling {
        Ceiling {
            creates_per_s,
            changes_per_s,
            writes_per_create: 6,
            writes_per_change: 3,
        }
    }

    #[test]
    fn the_mixed_rate_adds_the_time_of_each_kind() {
        let c = ceiling(10.0, 40.0);
        assert!((c.mixed_rate(10, 0) - 10.0).abs() < 1e-9);
        assert!((c.mixed_rate(0, 10) - 40.0).abs() < 1e-9);
        // 10 creates take 1 s, 40 changes 1 s: 50 operations in 2 s.
        assert!((c.mixed_rate(10, 40) - 25.0).abs() < 1e-9);
    }

    #[test]
    fn checks_refuse_a_missing_or_absurd_ceiling() {
        let holds = |ceiling_per_s, efficiency| {
            checks(ceiling_per_s, efficiency)
                .iter()
                .all(|(_, holds)| *holds)
        };
        assert!(holds(50.0, 0.4));
        assert!(!holds(0.0, 0.4));
        assert!(!holds(50.0, f64::NAN));
        assert!(!holds(50.0, f64::INFINITY));
        assert!(!holds(f64::NAN, 0.4));
        assert!(!holds(50.0, 0.0));
    }

    #[test]
    fn children_are_the_workers_children() {
        let mut cluster = load::database_cluster("db-1", 3);
        cluster.metadata.namespace = Some("ns".to_owned());
        cluster.metadata.uid = Some("uid-1".to_owned());
        let set = stateful_set(&cluster, 2);
        assert_eq!(set["metadata"]["name"], "db-1");
        assert_eq!(set["metadata"]["labels"][SHARD_LABEL], "2");
        assert_eq!(set["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(set["spec"]["replicas"], 3);
        assert_eq!(set["spec"]["serviceName"], "db-1-headless");
        assert_eq!(
            set["spec"]["template"]["spec"]["containers"][0]["image"],
            "postgres:17"
        );
        let service = service(&cluster, 2);
        assert_eq!(service["metadata"]["name"], "db-1-headless");
        assert_eq!(service["spec"]["clusterIP"], "None");
        assert_eq!(service["spec"]["selector"][INSTANCE_LABEL], "db-1");
    }

    #[test]
    fn the_status_is_the_one_a_worker_writes_after_an_apply() {
        let mut cluster = load::database_cluster("db-1", 3);
        cluster.metadata.generation = Some(4);
        let status =
            serde_json::to_value(status_after_apply(&cluster, jiff::Timestamp::UNIX_EPOCH))
                .unwrap();
        assert_eq!(status["observedGeneration"], 4);
        assert_eq!(status["claimOrdinals"], 3);
        let conditions = status["conditions"].as_array().unwrap();
        let reasons: Vec<(&str, &str)> = conditions
            .iter()
            .map(|c| (c["type"].as_str().unwrap(), c["reason"].as_str().unwrap()))
            .collect();
        assert_eq!(
            reasons,
            [
                (AVAILABLE, "ReplicasNotReady"),
                (PROGRESSING, "RollingOut"),
                (DEGRADED, "Reconciled")
            ]
        );
        assert!(conditions.iter().all(|c| c["observedGeneration"] == 4));
        assert_eq!(conditions[1]["message"], "0/3 replicas updated");
    }
}
