//! Control planes of a test's own, for tests that stop the API server or start it with
//! other feature gates: the shared control plane (and every other test on it) is never
//! touched.
//!
//! Each lives in `target/e2e-clusters/<name>` and listens on the shared control plane's
//! ports plus an offset (`SHARDOP_APISERVER_PORT`, `SHARDOP_ETCD_PORT` and
//! `SHARDOP_ETCD_PEER_PORT`, defaults 16443/23790/23800): tests that run at the same time
//! must use different offsets. It is stopped and removed when the guard drops.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use kube::api::{Api, PostParams};

use crate::Cluster;

/// A control plane started for one test.
#[derive(Debug)]
pub struct OwnControlPlane {
    /// Kubeconfig, kubectl and audit log of this control plane.
    pub cluster: Cluster,
    /// Its directory.
    pub dir: PathBuf,
    env: Vec<(String, String)>,
}

fn port(variable: &str, default: u16, offset: u16) -> anyhow::Result<String> {
    let base: u16 = match std::env::var(variable) {
        Ok(value) => value
            .parse()
            .with_context(|| format!("{variable}={value:?} is not a port"))?,
        Err(_) => default,
    };
    let port = base
        .checked_add(offset)
        .with_context(|| format!("{variable} + {offset} is not a port"))?;
    Ok(port.to_string())
}

impl OwnControlPlane {
    /// Starts `target/e2e-clusters/<name>` on the shared ports + `offset`, passing
    /// `feature_gates` (e.g. `WatchList=false`, or empty) to kube-apiserver, and installs
    /// the CRDs.
    pub async fn start(name: &str, offset: u16, feature_gates: &str) -> anyhow::Result<Self> {
        let repo_root = crate::repo_root();
        let dir = repo_root.join("target/e2e-clusters").join(name);
        let env = vec![
            ("SHARDOP_CLUSTER_DIR".to_owned(), dir.display().to_string()),
            (
                "SHARDOP_APISERVER_PORT".to_owned(),
                port("SHARDOP_APISERVER_PORT", 16443, offset)?,
            ),
            (
                "SHARDOP_ETCD_PORT".to_owned(),
                port("SHARDOP_ETCD_PORT", 23790, offset)?,
            ),
            (
                "SHARDOP_ETCD_PEER_PORT".to_owned(),
                port("SHARDOP_ETCD_PEER_PORT", 23800, offset)?,
            ),
            (
                "SHARDOP_APISERVER_FEATURE_GATES".to_owned(),
                feature_gates.to_owned(),
            ),
            // A loaded 2-core machine starts a control plane slowly.
            ("SHARDOP_CLUSTER_TIMEOUT".to_owned(), "180".to_owned()),
        ];
        let bin_dir = crate::run_script_with(&repo_root, "hack/build-tools.sh", &[], &env)?;
        let plane = Self {
            cluster: Cluster {
                kubeconfig: dir.join("kubeconfig"),
                audit_log: Some(dir.join("audit.log")),
                kubectl: PathBuf::from(bin_dir.trim()).join("kubectl"),
                repo_root,
            },
            dir,
            env,
        };
        // A leftover of an earlier run starts over (its PKI is kept: cheaper).
        plane.script("hack/cluster-down.sh", &[])?;
        plane.script("hack/cluster-up.sh", &[])?;
        crate::install_crds(&plane.cluster).await?;
        Ok(plane)
    }

    /// The API server's address.
    pub fn api_server(&self) -> String {
        let port = self
            .env
            .iter()
            .find(|(k, _)| k == "SHARDOP_APISERVER_PORT")
            .map_or("", |(_, v)| v.as_str());
        format!("https://127.0.0.1:{port}")
    }

    /// Stops kube-apiserver only (etcd and the controller manager keep running).
    pub fn stop_api_server(&self) -> anyhow::Result<()> {
        let script =
            "source hack/lib.sh && source hack/cluster-lib.sh && stop_component kube-apiserver";
        let output = Command::new("bash")
            .args(["-c", script])
            .current_dir(&self.cluster.repo_root)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("SHARDOP_STOP_TIMEOUT", "5")
            .output()
            .context("stopping kube-apiserver")?;
        if !output.status.success() {
            bail!(
                "stopping kube-apiserver failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Starts whatever component is not running (after [`Self::stop_api_server`]).
    pub fn restart(&self) -> anyhow::Result<()> {
        self.script("hack/cluster-up.sh", &[]).map(drop)
    }

    /// Creates namespace `name`.
    pub async fn create_namespace(&self, name: &str) -> anyhow::Result<()> {
        let client = self.cluster.client().await?;
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
        let namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name },
        }))?;
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(())
    }

    fn script(&self, script: &str, args: &[&str]) -> anyhow::Result<String> {
        crate::run_script_with(&self.cluster.repo_root, script, args, &self.env)
    }
}

impl Drop for OwnControlPlane {
    fn drop(&mut self) {
        if std::env::var_os("SHARDOP_E2E_KEEP_CLUSTERS").is_some() {
            return;
        }
        let _ = self.script("hack/cluster-down.sh", &[]);
    }
}

#[cfg(test)]
mod tests {
    /// The highest offset a test passes to [`OwnControlPlane::start`](super::OwnControlPlane::start).
    const MAX_OFFSET: u16 = 2;

    /// The default of each `${SHARDOP_..._PORT:-N}` in a hack/ script.
    fn default_ports(script: &str) -> Vec<(String, u16)> {
        let text = std::fs::read_to_string(crate::repo_root().join(script)).unwrap();
        text.split("${SHARDOP_")
            .skip(1)
            .filter_map(|rest| {
                let (variable, rest) = rest.split_once(":-")?;
                let (default, _) = rest.split_once('}')?;
                variable
                    .ends_with("_PORT")
                    .then(|| Some((variable.to_owned(), default.parse().ok()?)))?
            })
            .collect()
    }

    #[test]
    fn the_observability_ports_stay_clear_of_every_control_plane_the_tests_start() {
        let planes = default_ports("hack/cluster-lib.sh");
        assert!(planes.len() >= 3, "cluster ports not found: {planes:?}");
        let obs = default_ports("hack/obs-lib.sh");
        assert!(obs.len() >= 4, "observability ports not found: {obs:?}");
        for (plane_variable, base) in &planes {
            for offset in 0..=MAX_OFFSET {
                for (obs_variable, port) in &obs {
                    assert_ne!(
                        *port,
                        base + offset,
                        "SHARDOP_{obs_variable} defaults to SHARDOP_{plane_variable} + {offset}, \
                         which a test's own control plane listens on"
                    );
                }
            }
        }
    }
}
