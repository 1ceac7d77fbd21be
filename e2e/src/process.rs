//! Running shardop's binaries as real processes, the way a StatefulSet would.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::Cluster;

/// Where `cargo build` put the binaries (`SHARDOP_BIN_DIR` overrides).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHARDOP_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target"));
    target.join("debug")
}

/// Worker Lease timing for tests that wait for expiry: 4 s / 3 s / 1 s instead of the
/// production 15 s / 10 s / 2 s, keeping the same ratios (renew deadline < duration).
pub const FAST_LEASES: [&str; 6] = [
    "--lease-duration",
    "4s",
    "--renew-deadline",
    "3s",
    "--retry-period",
    "1s",
];

/// The MutatingWebhookConfiguration of [`ProcessSpec::with_webhook`] for an assigner
/// serving `operator_namespace`.
pub fn webhook_configuration(operator_namespace: &str) -> String {
    format!("{operator_namespace}-assigner")
}

/// A running shardop process, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct ShardopProcess {
    /// A name for logs, e.g. `shardop-worker-1`.
    pub name: String,
    /// Where its stdout and stderr go.
    pub log_path: PathBuf,
    child: Child,
}

/// How to start one shardop process.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// `shardop-worker` or `shardop-assigner`.
    pub binary: String,
    /// A name for logs; also `POD_NAME`.
    pub name: String,
    /// Command-line arguments after the binary.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// A directory for the log file.
    pub log_dir: PathBuf,
}

impl ProcessSpec {
    /// A worker pod `pod_name` (its ordinal is its home shard) serving `operator_namespace`.
    pub fn worker(test: &str, pod_name: &str, operator_namespace: &str) -> Self {
        Self::new(test, "shardop-worker", pod_name)
            .arg("run")
            .arg("--operator-namespace")
            .arg(operator_namespace)
    }

    /// An assigner replica `name` serving `operator_namespace`.
    pub fn assigner(test: &str, name: &str, operator_namespace: &str) -> Self {
        Self::new(test, "shardop-assigner", name)
            .arg("run")
            .arg("--operator-namespace")
            .arg(operator_namespace)
    }

    /// The assigner's mutating admission webhook on a free loopback port, registered by URL
    /// (the local control plane has no Service routing) in a MutatingWebhookConfiguration
    /// named after `operator_namespace`, so parallel tests (and parallel control planes)
    /// never share a port or a configuration. See [`webhook_configuration`].
    pub fn with_webhook(self, operator_namespace: &str) -> Self {
        self.arg("--webhook-addr")
            .arg("127.0.0.1:0")
            .arg("--webhook-url")
            .arg("https://127.0.0.1:{port}/mutate")
            .arg("--webhook-configuration")
            .arg(webhook_configuration(operator_namespace))
    }

    /// Any binary of the workspace (e.g. an example operator), named `name` in logs and
    /// `POD_NAME`.
    pub fn binary(test: &str, binary: &str, name: &str) -> Self {
        Self::new(test, binary, name)
    }

    fn new(test: &str, binary: &str, name: &str) -> Self {
        Self {
            binary: binary.to_owned(),
            name: name.to_owned(),
            args: Vec::new(),
            env: BTreeMap::new(),
            log_dir: crate::repo_root().join("target/e2e-logs").join(test),
        }
    }

    /// Appends an argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Starts the process against `cluster`, with metrics and health on free ports unless
    /// the arguments say otherwise.
    pub fn spawn(&self, cluster: &Cluster) -> anyhow::Result<ShardopProcess> {
        let binary = bin_dir().join(&self.binary);
        if !binary.exists() {
            bail!(
                "{} is missing: build the binaries first (`cargo build --bins`, as `make test` does)",
                binary.display()
            );
        }
        std::fs::create_dir_all(&self.log_dir)?;
        let log_path = self.log_dir.join(format!("{}.log", self.name));
        let log = File::create(&log_path)?;
        let mut command = Command::new(&binary);
        command
            .args(&self.args)
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env("POD_NAME", &self.name)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if !self.args.iter().any(|a| a == "--metrics-addr") {
            command.env("SHARDOP_METRICS_ADDR", "127.0.0.1:0");
        }
        if !self.args.iter().any(|a| a == "--health-addr") {
            command.env("SHARDOP_HEALTH_ADDR", "127.0.0.1:0");
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(ShardopProcess {
            name: self.name.clone(),
            log_path,
            child,
        })
    }
}

impl ShardopProcess {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGKILL and reaps the process: a crash, as far as the cluster can tell.
    pub fn kill_9(&mut self) -> anyhow::Result<()> {
        self.child.kill().ok();
        self.child.wait()?;
        Ok(())
    }

    /// Sends SIGTERM (a pod deletion) and waits up to `timeout` for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        if !status.success() {
            bail!("could not signal {}", self.name);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill_9()?;
                bail!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The metrics address the process logged at start-up (tests bind port 0).
    pub async fn metrics_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        crate::wait_for(
            &format!("the metrics address in {}'s log", self.name),
            Duration::from_secs(30),
            || async {
                self.log().lines().find_map(|line| {
                    let value: serde_json::Value = serde_json::from_str(line).ok()?;
                    value["fields"]["metrics_addr"].as_str()?.parse().ok()
                })
            },
        )
        .await
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

/// How many of its last log lines a process shows when the test that ran it fails.
const LOG_LINES_ON_FAILURE: usize = 40;

impl Drop for ShardopProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what its processes did last: CI keeps only the test output.
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_LINES_ON_FAILURE)..];
            eprintln!(
                "--- last {} lines of {} ({}) ---\n{}",
                tail.len(),
                self.name,
                self.log_path.display(),
                tail.join("\n")
            );
        }
    }
}
