//! The end-to-end harness: every test in `e2e/tests/` runs against a real kube-apiserver.
//!
//! By default the harness starts (or reuses) the local control plane that `hack/` builds
//! from source (etcd, kube-apiserver, kube-controller-manager) and reads its audit log. When
//! `KUBECONFIG` is set explicitly it attaches to that cluster instead; tests that need the
//! audit log then report that it is unavailable.
//!
//! Each test gets its own namespaces, removed when their guard drops, so tests in one
//! binary can run in parallel.

#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod audit;
pub mod control_plane;
pub mod homes;
pub mod metrics;
pub mod node;
pub mod obs;
pub mod process;
pub mod reconciled;
pub mod test_env;
pub mod test_kinds;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// What the harness knows about the cluster it runs against.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The kubeconfig every client and child process uses.
    pub kubeconfig: PathBuf,
    /// The API server's audit log, when the harness runs the control plane itself.
    pub audit_log: Option<PathBuf>,
    /// The kubectl built from the pinned Kubernetes release (or from PATH when attached).
    pub kubectl: PathBuf,
    /// The repository root.
    pub repo_root: PathBuf,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// The repository root: the closest directory holding `Cargo.lock` above the package cargo
/// is running (an e2e test, or `cargo run -p shardop-bench`).
pub fn repo_root() -> PathBuf {
    // Cargo sets the variable at run time too; that value follows the checkout even when a
    // shared target directory reuses a binary built from another one.
    let manifest_dir =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    Path::new(&manifest_dir)
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").is_file())
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap_or(Path::new("."))
        })
        .to_path_buf()
}

/// A worker StatefulSet named `shardop-worker` with `replicas`: the assigner's source of N
/// (`--worker-statefulset`), as `kubectl scale` sets it. Its pods never run (no kubelet).
pub fn worker_stateful_set(replicas: i32) -> k8s_openapi::api::apps::v1::StatefulSet {
    worker_stateful_set_named("shardop-worker", replicas)
}

/// [`worker_stateful_set`] named `name` (another operator's workers, e.g. `tenants-worker`).
pub fn worker_stateful_set_named(
    name: &str,
    replicas: i32,
) -> k8s_openapi::api::apps::v1::StatefulSet {
    let manifest = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": { "name": name },
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": { "containers": [{ "name": "worker", "image": "shardop-worker:test" }] }
            }
        }
    });
    serde_json::from_value(manifest).expect("the worker StatefulSet manifest is well-formed")
}

/// The label (value `true`) on every namespace a test or bench scenario creates.
pub const TEST_NAMESPACE_LABEL: &str = "shardop.dev/e2e";

/// Starts or reuses the control plane and installs the CRDs, once per test binary.
///
/// Setup runs on a plain thread with its own runtime: a kube `Client` is bound to the
/// runtime that created it, and every `#[tokio::test]` has a runtime of its own.
pub fn cluster() -> &'static Cluster {
    let result = CLUSTER.get_or_init(|| {
        std::thread::spawn(|| setup().map_err(|e| format!("{e:#}")))
            .join()
            .unwrap_or_else(|_| Err("cluster setup panicked".to_owned()))
    });
    match result {
        Ok(cluster) => cluster,
        Err(message) => panic!("the e2e control plane is not available: {message}"),
    }
}

fn setup() -> anyhow::Result<Cluster> {
    let repo_root = repo_root();
    let cluster = match std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        Some(kubeconfig) => Cluster {
            kubeconfig: PathBuf::from(kubeconfig),
            audit_log: None,
            kubectl: PathBuf::from("kubectl"),
            repo_root,
        },
        None => {
            run_script(&repo_root, "hack/cluster-up.sh")?;
            let bin_dir = run_script(&repo_root, "hack/build-tools.sh")?;
            let cluster_dir = std::env::var_os("SHARDOP_CLUSTER_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo_root.join("target/cluster"));
            Cluster {
                kubeconfig: cluster_dir.join("kubeconfig"),
                audit_log: Some(cluster_dir.join("audit.log")),
                kubectl: PathBuf::from(bin_dir.trim()).join("kubectl"),
                repo_root,
            }
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(install_crds(&cluster))?;
    Ok(cluster)
}

fn run_script(repo_root: &Path, script: &str) -> anyhow::Result<String> {
    run_script_with(repo_root, script, &[], &[])
}

/// Runs `bash <repo_root>/<script> <args>` from the repository root with `env` added;
/// returns its standard output, or an error with its standard error.
pub(crate) fn run_script_with(
    repo_root: &Path,
    script: &str,
    args: &[&str],
    env: &[(String, String)],
) -> anyhow::Result<String> {
    let output = Command::new("bash")
        .arg(repo_root.join(script))
        .args(args)
        .current_dir(repo_root)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .with_context(|| format!("running {script}"))?;
    if !output.status.success() {
        bail!(
            "{script} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Server-side applies every shardop CRD and waits until the API server serves them.
pub async fn install_crds(cluster: &Cluster) -> anyhow::Result<()> {
    apply_crds(cluster, shardop_api::crd::all()).await
}

/// Server-side applies `crds` and waits until the API server serves each of them.
pub async fn apply_crds(
    cluster: &Cluster,
    crds: impl IntoIterator<Item = CustomResourceDefinition>,
) -> anyhow::Result<()> {
    let client = cluster.client().await?;
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let params = PatchParams::apply("shardop-e2e").force();
    let mut names = Vec::new();
    for crd in crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .with_context(|| format!("applying CRD {name}"))?;
        names.push(name);
    }
    for name in names {
        wait_for(
            &format!("CRD {name} Established"),
            Duration::from_secs(30),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let crd = api.get(&name).await.ok()?;
                    crd.status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                        .then_some(())
                }
            },
        )
        .await?;
    }
    Ok(())
}

impl Cluster {
    /// A fresh client for the calling test's runtime.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))?;
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// Runs kubectl against the cluster and returns its output, whatever the exit status.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .with_context(|| format!("running {} {}", self.kubectl.display(), args.join(" ")))
    }

    /// Runs kubectl and returns stdout, failing with stderr if it exits non-zero.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.kubectl(args)?;
        if !output.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `kubectl -n <namespace> scale statefulset <name> --replicas=<replicas>`: how the tests
    /// change an assigner's shard count.
    pub fn scale_stateful_set(&self, namespace: &str, name: &str, replicas: u32) {
        self.kubectl_ok(&[
            "-n",
            namespace,
            "scale",
            "statefulset",
            name,
            &format!("--replicas={replicas}"),
        ])
        .unwrap();
    }

    /// Runs kubectl with `stdin` as input (e.g. `apply -f -`).
    pub fn kubectl_with_input(&self, args: &[&str], stdin: &str) -> anyhow::Result<Output> {
        use std::io::Write;
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(stdin.as_bytes())?;
        Ok(child.wait_with_output()?)
    }

    /// The audit log, or an error that says why a test needing it cannot run.
    pub fn audit_log(&self) -> anyhow::Result<&Path> {
        self.audit_log.as_deref().context(
            "the audit log is only available on the harness's own control plane (KUBECONFIG is set)",
        )
    }
}

/// A namespace that exists for one test and is deleted when the guard drops.
#[derive(Debug)]
pub struct TestNamespace {
    /// The namespace name.
    pub name: String,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl TestNamespace {
    /// Creates `<prefix>-<random suffix>`.
    pub async fn create(client: &Client, prefix: &str) -> anyhow::Result<Self> {
        let cluster = cluster();
        let name = format!("{prefix}-{}", random_suffix());
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TEST_NAMESPACE_LABEL.to_owned(), "true".to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(Self {
            name,
            kubectl: cluster.kubectl.clone(),
            kubeconfig: cluster.kubeconfig.clone(),
        })
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var_os("SHARDOP_E2E_KEEP_NAMESPACES").is_some() {
            return;
        }
        // The test's workers are gone by now, so nobody would ever remove the finalizers of
        // DatabaseClusters it left behind, and the namespace would hang in Terminating.
        // Drop cannot await: do it on a thread with a runtime of its own.
        let name = self.name.clone();
        let kubeconfig = self.kubeconfig.clone();
        let cleaned = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(release_finalizers_and_delete(&kubeconfig, &name))
        })
        .join();
        if !matches!(cleaned, Ok(Ok(()))) {
            // Fall back to a plain deletion; the namespace controller does the rest.
            let _ = Command::new(&self.kubectl)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(["delete", "namespace", &self.name, "--wait=false"])
                .output();
        }
    }
}

async fn release_finalizers_and_delete(kubeconfig: &Path, namespace: &str) -> anyhow::Result<()> {
    use futures::StreamExt;
    use shardop_api::DatabaseCluster;

    let kubeconfig = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete(namespace, &DeleteParams::background())
        .await?;
    let clusters: Api<DatabaseCluster> = Api::namespaced(client, namespace);
    let names: Vec<String> = clusters
        .list_metadata(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|c| {
            c.metadata
                .finalizers
                .as_ref()
                .is_some_and(|f| !f.is_empty())
        })
        .filter_map(|c| c.metadata.name)
        .collect();
    let patch = serde_json::json!({ "metadata": { "finalizers": null } });
    futures::stream::iter(names)
        .for_each_concurrent(16, |name| {
            let clusters = clusters.clone();
            let patch = patch.clone();
            async move {
                let _ = clusters
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
            }
        })
        .await;
    Ok(())
}

/// Deletes a namespace and waits until it is gone.
pub async fn delete_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(name, &DeleteParams::default()).await;
    wait_for(
        &format!("namespace {name} gone"),
        Duration::from_secs(60),
        || {
            let namespaces = namespaces.clone();
            async move { namespaces.get_opt(name).await.ok()?.is_none().then_some(()) }
        },
    )
    .await
}

/// A short random suffix for names that must not collide between test runs.
pub fn random_suffix() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{:06x}", hasher.finish() & 0xff_ffff)
}

/// Polls `probe` every 200 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A ValidatingAdmissionPolicy named `name`, and its binding of the same name, that refuse
/// every PersistentVolumeClaim deletion in `namespace` with `message`: the finalizer
/// cleanup's dependency made unavailable, for the e2e tests and the `cleanupdep` benchmark.
/// A `List` to `kubectl apply`.
pub fn claim_deletion_refusal(name: &str, namespace: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicy",
                "metadata": { "name": name },
                "spec": {
                    "failurePolicy": "Fail",
                    "matchConstraints": {
                        "namespaceSelector": {
                            "matchLabels": { "kubernetes.io/metadata.name": namespace }
                        },
                        "resourceRules": [{
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["DELETE"],
                            "resources": ["persistentvolumeclaims"],
                        }],
                    },
                    "validations": [{ "expression": "false", "message": message }],
                },
            },
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": { "name": name },
                "spec": { "policyName": name, "validationActions": ["Deny"] },
            },
        ],
    })
}

/// A DatabaseCluster manifest as JSON, for tests that post raw (possibly invalid) specs.
pub fn database_cluster_json(name: &str, spec: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "shardop.dev/v1alpha1",
        "kind": "DatabaseCluster",
        "metadata": { "name": name },
        "spec": spec,
    })
}

/// A valid DatabaseCluster spec with `replicas` pods.
pub fn valid_spec(replicas: i32) -> serde_json::Value {
    serde_json::json!({
        "replicas": replicas,
        "image": "postgres:17",
        "storage": { "size": "1Gi" },
    })
}
