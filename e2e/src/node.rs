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
}

impl LocalNode {
    /// Starts the node (idempotent: a Ready node is reused; the image is rebuilt from the
    /// binaries in [`crate::process::bin_dir`]). `Ok(None)`: this machine cannot run one,
    /// which is printed with the reason.
    pub fn start(cluster: &Cluster) -> anyhow::Result<Option<Self>> {
        let output = Command::new("bash")
            .arg(cluster.repo_root.join("hack/node-up.sh"))
            .current_dir(&cluster.repo_root)
            .env("SHARDOP_IMAGE_BIN_DIR", crate::process::bin_dir())
            .env("SHARDOP_NODE_TIMEOUT", "300")
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
        }))
    }
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
