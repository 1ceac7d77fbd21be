//! The `throttle` scenario's set-up: the workers run as a ServiceAccount (the admin user
//! is in `system:masters`, which API Priority and Fairness exempts), and a FlowSchema puts
//! that ServiceAccount's writes of DatabaseClusters, Shards and children into a
//! PriorityLevelConfiguration with one nominal share, nothing to borrow and a tiny queue,
//! so the real API server answers part of them with 429. As in the chart's APF objects,
//! reads (lists, watches) are a flow of their own and are not throttled here; Lease
//! renewals are left out so that the scenario measures throttled writes, not lost Leases.

use std::path::PathBuf;

use anyhow::Context;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use kube::config::Kubeconfig;
use serde_json::json;

use crate::run::Run;

/// The installed throttle; `remove` undoes it (the cluster may be reused).
pub struct Throttle {
    /// A kubeconfig with the ServiceAccount's token.
    pub kubeconfig: PathBuf,
    name: String,
}

const SERVICE_ACCOUNT: &str = "shardop-worker";

impl Throttle {
    /// Creates the ServiceAccount, its binding, a token kubeconfig, and the APF objects.
    pub async fn install(run: &Run) -> anyhow::Result<Self> {
        let cluster = run.env.cluster;
        let namespace = run.env.operator_ns.name.clone();
        let name = format!("bench-{namespace}");
        let accounts: Api<ServiceAccount> = Api::namespaced(run.env.client.clone(), &namespace);
        let account: ServiceAccount = serde_json::from_value(json!({
            "metadata": { "name": SERVICE_ACCOUNT }
        }))?;
        accounts.create(&PostParams::default(), &account).await?;
        // Not system:masters, so APF applies. cluster-admin keeps the set-up short; the
        // chart's least-privilege role is not what this scenario measures.
        let manifests = format!(
            r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {name}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: cluster-admin
subjects:
- kind: ServiceAccount
  name: {SERVICE_ACCOUNT}
  namespace: {namespace}
---
apiVersion: flowcontrol.apiserver.k8s.io/v1
kind: PriorityLevelConfiguration
metadata:
  name: {name}
spec:
  type: Limited
  limited:
    nominalConcurrencyShares: 1
    lendablePercent: 0
    borrowingLimitPercent: 0
    limitResponse:
      type: Queue
      queuing:
        queues: 2
        handSize: 1
        queueLengthLimit: 1
---
apiVersion: flowcontrol.apiserver.k8s.io/v1
kind: FlowSchema
metadata:
  name: {name}
spec:
  priorityLevelConfiguration:
    name: {name}
  matchingPrecedence: 500
  distinguisherMethod:
    type: ByUser
  rules:
  - subjects:
    - kind: ServiceAccount
      serviceAccount:
        name: {SERVICE_ACCOUNT}
        namespace: {namespace}
    resourceRules:
    - verbs: ["create", "update", "patch", "delete", "deletecollection"]
      apiGroups: ["shardop.dev", "apps", ""]
      resources: ["databaseclusters", "databaseclusters/status", "shards", "shards/status", "statefulsets", "services", "persistentvolumeclaims"]
      namespaces: ["*"]
"#
        );
        let output = cluster.kubectl_with_input(&["apply", "-f", "-"], &manifests)?;
        anyhow::ensure!(
            output.status.success(),
            "applying the APF objects failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let token = cluster
            .kubectl_ok(&[
                "create",
                "token",
                SERVICE_ACCOUNT,
                "-n",
                &namespace,
                "--duration",
                "4h",
            ])?
            .trim()
            .to_owned();
        let admin = Kubeconfig::read_from(&cluster.kubeconfig)?;
        let server_cluster = admin
            .clusters
            .first()
            .and_then(|c| c.cluster.as_ref())
            .context("the admin kubeconfig has no cluster")?;
        let server = server_cluster.server.clone().unwrap_or_default();
        let ca = server_cluster
            .certificate_authority_data
            .clone()
            .unwrap_or_default();
        let kubeconfig = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "bench", "cluster": {
                "server": server, "certificate-authority-data": ca } }],
            "users": [{ "name": SERVICE_ACCOUNT, "user": { "token": token } }],
            "contexts": [{ "name": "bench", "context": { "cluster": "bench", "user": SERVICE_ACCOUNT } }],
            "current-context": "bench",
        });
        let path = cluster
            .kubeconfig
            .with_file_name(format!("bench-throttle-{namespace}.kubeconfig"));
        std::fs::write(&path, serde_json::to_string_pretty(&kubeconfig)?)?;
        Ok(Self {
            kubeconfig: path,
            name,
        })
    }

    /// What the priority level looks like, for the report.
    pub fn describe(&self) -> serde_json::Value {
        json!({
            "name": self.name,
            "nominalConcurrencyShares": 1,
            "lendablePercent": 0,
            "borrowingLimitPercent": 0,
            "queues": 2,
            "handSize": 1,
            "queueLengthLimit": 1,
            "matches": "writes by the workers' ServiceAccount to DatabaseClusters (and status), Shards, StatefulSets, Services, claims; not reads, not Leases",
        })
    }

    /// Removes the cluster-scoped objects and the kubeconfig.
    pub async fn remove(&self, run: &Run) {
        for kind in [
            "flowschema",
            "prioritylevelconfiguration",
            "clusterrolebinding",
        ] {
            if let Err(error) =
                run.env
                    .cluster
                    .kubectl_ok(&["delete", kind, &self.name, "--ignore-not-found"])
            {
                tracing::warn!(%error, kind, "cleanup failed");
            }
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}
