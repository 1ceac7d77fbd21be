//! What every DatabaseCluster test starts from: the cluster, an admin client, and two
//! namespaces of its own, one for the operator (Leases, Shards, the worker StatefulSet) and
//! one for the objects. Test files wrap it in their own `Env` (dereferencing to it) and add
//! what only they use.

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shardop_api::DatabaseCluster;

use crate::process::ProcessSpec;
use crate::{Cluster, TestNamespace, cluster};

/// One test's cluster, client and namespaces.
pub struct TestEnv {
    /// The cluster the harness runs against.
    pub cluster: &'static Cluster,
    /// An admin client.
    pub client: Client,
    /// The test's name: process log directories and namespace prefixes.
    pub test: &'static str,
    /// The operator's namespace (`<test>-op-…`).
    pub operator: TestNamespace,
    /// The objects' namespace (`<test>-…`).
    pub objects: TestNamespace,
}

impl TestEnv {
    /// Both namespaces, created.
    pub async fn new(test: &'static str) -> Self {
        let cluster = cluster();
        let client = cluster.client().await.unwrap();
        let operator = TestNamespace::create(&client, &format!("{test}-op"))
            .await
            .unwrap();
        let objects = TestNamespace::create(&client, test).await.unwrap();
        Self {
            cluster,
            client,
            test,
            operator,
            objects,
        }
    }

    /// [`new`](Self::new), and the worker StatefulSet with `replicas` (the assigner's shard
    /// count; its controller creates Pod objects that never run).
    pub async fn with_worker_stateful_set(test: &'static str, replicas: i32) -> Self {
        let env = Self::new(test).await;
        env.create_worker_stateful_set(replicas).await;
        env
    }

    /// Creates the worker StatefulSet `shardop-worker` with `replicas` in the operator's
    /// namespace.
    pub async fn create_worker_stateful_set(&self, replicas: i32) {
        Api::<StatefulSet>::namespaced(self.client.clone(), &self.operator.name)
            .create(
                &PostParams::default(),
                &crate::worker_stateful_set(replicas),
            )
            .await
            .unwrap();
    }

    /// `kubectl scale statefulset shardop-worker --replicas=<replicas>` in the operator's
    /// namespace: the assigner's shard count.
    pub fn scale_workers(&self, replicas: u32) {
        self.cluster
            .scale_stateful_set(&self.operator.name, "shardop-worker", replicas);
    }

    /// Worker `shardop-worker-<ordinal>` (home shard `ordinal`) watching the objects'
    /// namespace; add flags and spawn it.
    pub fn worker_spec(&self, ordinal: u32) -> ProcessSpec {
        ProcessSpec::worker(
            self.test,
            &format!("shardop-worker-{ordinal}"),
            &self.operator.name,
        )
        .arg("--watch-namespaces")
        .arg(&self.objects.name)
    }

    /// Assigner replica `name` for the `shardop-worker` StatefulSet, watching the objects'
    /// namespace; add flags and spawn it.
    pub fn assigner_spec(&self, name: &str) -> ProcessSpec {
        ProcessSpec::assigner(self.test, name, &self.operator.name)
            .arg("--worker-statefulset")
            .arg("shardop-worker")
            .arg("--watch-namespaces")
            .arg(&self.objects.name)
    }

    /// The DatabaseClusters of the objects' namespace.
    pub fn clusters(&self) -> Api<DatabaseCluster> {
        Api::namespaced(self.client.clone(), &self.objects.name)
    }

    /// The StatefulSets of the objects' namespace.
    pub fn stateful_sets(&self) -> Api<StatefulSet> {
        Api::namespaced(self.client.clone(), &self.objects.name)
    }

    /// Merges `spec` into the spec of DatabaseCluster `name`.
    pub async fn patch_spec(&self, name: &str, spec: serde_json::Value) {
        self.clusters()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .unwrap();
    }

    /// Removes every finalizer from every DatabaseCluster, so that the namespace can be
    /// deleted after the workers are gone (the harness deletes it on drop).
    pub async fn release_objects(&self) {
        let api = self.clusters();
        let Ok(list) = api.list(&ListParams::default()).await else {
            return;
        };
        futures::stream::iter(list.items)
            .for_each_concurrent(16, |object| {
                let api = api.clone();
                async move {
                    let _ = api
                        .patch(
                            &object.name_any(),
                            &PatchParams::default(),
                            &Patch::Merge(json!({ "metadata": { "finalizers": null } })),
                        )
                        .await;
                }
            })
            .await;
    }

    /// The Leases of the operator's namespace.
    pub fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.operator.name)
    }
}
