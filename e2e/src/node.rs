//! The local node (`hack/node-up.sh`): kubelet, containerd and kube-proxy next to the
//! control plane, so charts/shardop runs in real pods. Tests that need it call
//! [`LocalNode::start`], which skips them with a message only when this machine cannot run
//! a node at all (not root, no network namespaces); any other failure fails the test.

use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{Context, bail};

use crate::Cluster;

/// `hack/node-up.sh`'s exit status for "this machine cannot run a node".
const UNSUPPORTED: i32 = 3;

/// A running local node, with the image of this workspace's binaries loaded. Stopped
/// (`hack/node-down.sh`) when dropped, so the tests that follow find a control plane
/// without a kubelet again; `SHARDOP_E2E_KEEP_NODE=1` leaves it running.
#[derive(Debug)]
pub struct LocalNode {
    repo_root: PathBuf,
    /// Chart values that run the locally built image (`image.pullPolicy: Never`).
    pub values_local: PathBuf,
    /// The image of the stand-in database, for DatabaseCluster specs.
    pub db_standin_image: &'static str,
    /// The node's name.
    pub name: &'static str,
    /// The iptables chain of [`LocalNode::partition`]'s rules.
    partition_chain: String,
}

impl LocalNode {
    /// Starts the node (idempotent: a Ready node is reused; the image is rebuilt from the
    /// binaries in [`crate::process::bin_dir`]). `Ok(None)`: this machine cannot run one,
    /// which is printed with the reason.
    pub fn start(cluster: &Cluster) -> anyhow::Result<Option<Self>> {
        let output = Command::new("bash")
            .arg(cluster.repo_root.join(NODE_UP))
            .current_dir(&cluster.repo_root)
            .envs(node_up_env())
            .output()
            .context("running hack/node-up.sh")?;
        if output.status.code() == Some(UNSUPPORTED) {
            eprintln!(
                "SKIPPED: no local node on this machine: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
            return Ok(None);
        }
        if !output.status.success() {
            bail!(
                "hack/node-up.sh failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(Some(Self {
            repo_root: cluster.repo_root.clone(),
            values_local: cluster.repo_root.join("target/images/values-local.yaml"),
            db_standin_image: "shardop.local/db-standin:1",
            name: "shardop-node",
            partition_chain: partition_chain(),
        }))
    }

    /// Runs `hack/node-up.sh` again on the running node, as the next test run would.
    pub fn start_again(&self) -> anyhow::Result<()> {
        crate::run_script_with(&self.repo_root, NODE_UP, &[], &node_up_env()).map(drop)
    }

    /// Drops every packet from `pod_ip` to the node (where the API server relay listens)
    /// until the returned [`Partition`] is dropped: the pod is cut off from the control
    /// plane.
    pub fn partition(&self, pod_ip: &str) -> anyhow::Result<Partition> {
        let rule = [self.partition_chain.as_str(), "-s", pod_ip, "-j", "DROP"].map(str::to_owned);
        iptables("-I", &rule)?;
        Ok(Partition { rule })
    }

    /// The rules of the node's partition chain, as `iptables -S` prints them.
    pub fn partitions(&self) -> anyhow::Result<Vec<String>> {
        let listing = iptables("-S", std::slice::from_ref(&self.partition_chain))?;
        Ok(listing
            .lines()
            .filter(|line| line.starts_with("-A "))
            .map(str::to_owned)
            .collect())
    }
}

/// A pod cut off from the node by [`LocalNode::partition`]; dropping it lifts the cut. A
/// test killed before that leaves the rule behind, and the next `hack/node-up.sh` removes it.
#[derive(Debug)]
pub struct Partition {
    rule: [String; 5],
}

impl Drop for Partition {
    fn drop(&mut self) {
        if let Err(error) = iptables("-D", &self.rule) {
            eprintln!("cleanup: lifting the partition {:?}: {error:#}", self.rule);
        }
    }
}

const NODE_UP: &str = "hack/node-up.sh";

fn node_up_env() -> [(String, String); 2] {
    [
        (
            "SHARDOP_IMAGE_BIN_DIR".to_owned(),
            crate::process::bin_dir().display().to_string(),
        ),
        ("SHARDOP_NODE_TIMEOUT".to_owned(), "300".to_owned()),
    ]
}

/// The node's partition chain: `partition_chain` in hack/node-lib.sh, named after the
/// node's bridge.
fn partition_chain() -> String {
    let bridge = std::env::var("SHARDOP_NODE_BRIDGE").unwrap_or_else(|_| "shardop0".to_owned());
    format!("SHARDOP-CUT-{bridge}")
}

/// `iptables <operation> <rule>`: its standard output, or an error with its standard error.
fn iptables(operation: &str, rule: &[String]) -> anyhow::Result<String> {
    let output = Command::new("iptables")
        .arg(operation)
        .args(rule)
        .output()
        .context("running iptables")?;
    if !output.status.success() {
        bail!(
            "iptables {operation} {rule:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        if std::env::var_os("SHARDOP_E2E_KEEP_NODE").is_some() {
            return;
        }
        match Command::new("bash")
            .arg(self.repo_root.join("hack/node-down.sh"))
            .current_dir(&self.repo_root)
            .output()
        {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "cleanup: hack/node-down.sh failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => eprintln!("cleanup: hack/node-down.sh: {error}"),
        }
    }
}

/// helm next to the harness's kubectl (both come from hack/build-tools.sh), else PATH.
pub fn helm(cluster: &Cluster, args: &[&str]) -> anyhow::Result<Output> {
    let helm = cluster
        .kubectl
        .parent()
        .map(|dir| dir.join("helm"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("helm"));
    Command::new(helm)
        .args(args)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .current_dir(&cluster.repo_root)
        .output()
        .context("running helm")
}

/// [`helm`], failing with its standard error unless it succeeds.
pub fn helm_ok(cluster: &Cluster, args: &[&str]) -> anyhow::Result<String> {
    let output = helm(cluster, args)?;
    if !output.status.success() {
        bail!(
            "helm {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A Helm release the test installed: `helm uninstall --wait` when the test ends, before
/// its namespaces go (`SHARDOP_E2E_KEEP_NAMESPACES` keeps it).
pub struct HelmRelease<'a> {
    /// The cluster it is installed in.
    pub cluster: &'a Cluster,
    /// The release name.
    pub name: &'a str,
    /// The release namespace.
    pub namespace: String,
}

impl Drop for HelmRelease<'_> {
    fn drop(&mut self) {
        if std::env::var_os("SHARDOP_E2E_KEEP_NAMESPACES").is_some() {
            return;
        }
        let args = [
            "uninstall",
            self.name,
            "-n",
            &self.namespace,
            "--wait",
            "--timeout",
            "120s",
        ];
        if let Err(error) = helm_ok(self.cluster, &args) {
            eprintln!("cleanup: {error:#}");
        }
    }
}
