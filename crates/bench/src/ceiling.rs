//! The ideal writer: the best any operator could do on this control plane. For each object
//! it issues exactly the writes a perfect DatabaseCluster operator issues (shard label,
//! finalizer, headless Service, StatefulSet, status; for a spec change the StatefulSet and
//! the status), through shardop's rate-limited client with a worker's QPS, burst and
//! concurrency per shard, and nothing else: no watch, no cache, no reconcile logic. Its
//! objects/s, in the same run and on the same control plane as shardop, is the ceiling that
//! `efficiency` divides by; the controller manager reacts to its StatefulSets as it does to
//! shardop's.

use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Resource};
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::{Value, json};
use shardop::client::{ClientFactory, KubeClientArgs, KubeMetrics};
use shardop::constants::{FINALIZER, SHARD_LABEL, WORKER_FIELD_MANAGER};
use shardop_api::DatabaseCluster;
use shardop_api::constants::{
    INSTANCE_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, NAME_LABEL, NAME_VALUE,
};

use crate::env::{WORKER_KUBE_BURST, WORKER_KUBE_QPS};
use crate::load;

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
    /// The figures for a report.
    pub fn to_json(self, objects: usize, shards: u32) -> Value {
        json!({
            "objects": objects,
            "shards": shards,
            "concurrency": shards as usize * WORKER_CONCURRENCY,
            "kube_qps_per_shard": WORKER_KUBE_QPS,
            "creates_per_s": self.creates_per_s,
            "changes_per_s": self.changes_per_s,
            "writes_per_create": self.writes_per_create,
            "writes_per_change": self.writes_per_change,
        })
    }
}

/// The ideal operator of `shards` shards, writing into one namespace.
pub struct IdealWriter {
    namespace: String,
    /// The user's client (the load generator's, unlimited).
    user: Client,
    /// One client per shard, each with a worker's own rate limit.
    shards: Vec<Client>,
}

impl IdealWriter {
    /// A writer for `shards` shards into `namespace`, with clients built from `kubeconfig`.
    pub async fn new(
        kubeconfig: &std::path::Path,
        namespace: &str,
        shards: u32,
        user: Client,
    ) -> anyhow::Result<Self> {
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(kubeconfig)?,
            &KubeConfigOptions::default(),
        )
        .await?;
        let args = KubeClientArgs {
            kube_qps: WORKER_KUBE_QPS,
            kube_burst: WORKER_KUBE_BURST,
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
            user: user.clone(),
            shards,
        })
    }

    /// Creates `objects` objects and converges each (label, finalizer, Service,
    /// StatefulSet, status), then changes each one's spec and converges it again; returns
    /// the rate of each pass.
    pub async fn measure(&self, objects: usize) -> anyhow::Result<Ceiling> {
        let names: Vec<String> = (0..objects).map(|i| format!("ideal-{i:06}")).collect();
        let started = Instant::now();
        self.each(&names, |writer, name, shard| writer.create(name, shard))
            .await?;
        let creates_per_s = objects as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let started = Instant::now();
        self.each(&names, |writer, name, shard| writer.change(name, shard))
            .await?;
        let changes_per_s = objects as f64 / started.elapsed().as_secs_f64().max(1e-9);
        Ok(Ceiling {
            creates_per_s,
            changes_per_s,
            writes_per_create: 6,
            writes_per_change: 3,
        })
    }

    /// Runs `op` for every name with a worker's concurrency per shard in flight.
    async fn each<'a, F, Fut>(&'a self, names: &'a [String], op: F) -> anyhow::Result<()>
    where
        F: Fn(&'a Self, &'a str, usize) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + 'a,
    {
        let in_flight = self.shards.len() * WORKER_CONCURRENCY;
        futures::stream::iter(names.iter().enumerate())
            .map(|(i, name)| op(self, name.as_str(), i % self.shards.len()))
            .buffer_unordered(in_flight)
            .try_for_each(|()| async { Ok(()) })
            .await
    }

    /// The user's create, then every write the owning shard's operator makes for it.
    async fn create(&self, name: &str, shard: usize) -> anyhow::Result<()> {
        let user: Api<DatabaseCluster> = Api::namespaced(self.user.clone(), &self.namespace);
        let cluster = user
            .create(&PostParams::default(), &load::database_cluster(name, 1))
            .await?;
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
        let services: Api<k8s_openapi::api::core::v1::Service> =
            Api::namespaced(self.shards[shard].clone(), &self.namespace);
        services
            .patch(
                &format!("{name}-headless"),
                &apply(),
                &Patch::Apply(&service(&cluster, shard)),
            )
            .await?;
        self.apply_stateful_set(&cluster, shard).await?;
        self.write_status(name, cluster.metadata.generation, shard)
            .await
    }

    /// The user's spec change, then the operator's StatefulSet apply and status write.
    async fn change(&self, name: &str, shard: usize) -> anyhow::Result<()> {
        let user: Api<DatabaseCluster> = Api::namespaced(self.user.clone(), &self.namespace);
        let patch = json!({ "spec": { "image": "postgres:17.1" } });
        let cluster = user
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        self.apply_stateful_set(&cluster, shard).await?;
        self.write_status(name, cluster.metadata.generation, shard)
            .await
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

    async fn write_status(
        &self,
        name: &str,
        generation: Option<i64>,
        shard: usize,
    ) -> anyhow::Result<()> {
        let status = json!({ "status": {
            "observedGeneration": generation,
            "replicas": 1,
            "readyReplicas": 0,
            "shard": shard,
        } });
        let params = PatchParams {
            field_manager: Some(WORKER_FIELD_MANAGER.to_owned()),
            ..Default::default()
        };
        self.api(shard)
            .patch_status(name, &params, &Patch::Merge(&status))
            .await?;
        Ok(())
    }

    fn api(&self, shard: usize) -> Api<DatabaseCluster> {
        Api::namespaced(self.shards[shard].clone(), &self.namespace)
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
