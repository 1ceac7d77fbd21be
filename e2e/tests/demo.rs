//! `make demo` and `make test` side by side: the demo has a control plane of its own, and
//! `make demo-down` (`hack/demo.sh down`) only ever stops things, exactly the demo's.
//!
//! The scripts run from a scratch copy of `hack/`, so the checkout's own `target/` (and a
//! demo the developer may be running) is never touched.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// A scratch checkout: a copy of `hack/` under a fresh directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let root = std::env::temp_dir().join(format!(
            "shardop-demo-test-{}",
            shardop_e2e::random_suffix()
        ));
        copy_dir(&shardop_e2e::repo_root().join("hack"), &root.join("hack"));
        Self(root)
    }

    /// Runs `bash hack/<script> <args>` in the scratch checkout, with none of the cluster
    /// variables of the environment (the e2e harness may have set them).
    fn bash(&self, script: &str, args: &[&str]) -> Output {
        let mut command = Command::new("bash");
        command.arg(self.0.join("hack").join(script)).args(args);
        for var in [
            "SHARDOP_CLUSTER_DIR",
            "SHARDOP_APISERVER_PORT",
            "SHARDOP_ETCD_PORT",
            "SHARDOP_ETCD_PEER_PORT",
            "SHARDOP_DEMO_CLUSTER_DIR",
            "SHARDOP_DEMO_APISERVER_PORT",
            "SHARDOP_DEMO_ETCD_PORT",
            "SHARDOP_DEMO_ETCD_PEER_PORT",
        ] {
            command.env_remove(var);
        }
        command.output().expect("bash runs")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A process whose command line says `shardop-worker` (as the demo's workers do), or not.
fn sleeper(name: &str) -> Child {
    Command::new("bash")
        .args(["-c", &format!("exec -a {name} sleep 120")])
        .spawn()
        .unwrap()
}

fn exited(child: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn the_demo_has_a_control_plane_of_its_own() {
    let scratch = Scratch::new();
    let lib = scratch.0.join("hack/lib.sh");
    let script = format!(
        r#"source "{}"; echo "$(cluster_dir) ${{SHARDOP_APISERVER_PORT:-16443}}"; use_demo_cluster; echo "$(cluster_dir) $SHARDOP_APISERVER_PORT $SHARDOP_ETCD_PORT $SHARDOP_ETCD_PEER_PORT""#,
        lib.display()
    );
    let output = Command::new("bash")
        .args(["-c", &script])
        .env_remove("SHARDOP_CLUSTER_DIR")
        .env_remove("SHARDOP_APISERVER_PORT")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
    let (tests, demo) = (&lines[0], &lines[1]);
    assert_ne!(
        tests[0], demo[0],
        "the demo must not share the tests' cluster directory"
    );
    assert_ne!(
        tests[1], demo[1],
        "the demo must not share the tests' API server port"
    );
    // Neither of the tests' etcd ports (23790, 23800).
    for port in &demo[2..] {
        assert!(!["23790", "23800"].contains(port), "{text}");
    }
}

#[test]
fn demo_down_only_stops_things_and_only_the_demos_processes() {
    let scratch = Scratch::new();
    let pids = scratch.0.join("target/demo");
    std::fs::create_dir_all(&pids).unwrap();
    // A demo worker, and a pid file that by now names an unrelated process.
    let mut worker = sleeper("shardop-worker");
    let mut unrelated = sleeper("unrelated-sleeper");
    std::fs::write(pids.join("shardop-worker-0.pid"), worker.id().to_string()).unwrap();
    std::fs::write(
        pids.join("shardop-worker-1.pid"),
        unrelated.id().to_string(),
    )
    .unwrap();

    for run in 1..=2 {
        let output = scratch.bash("demo.sh", &["down"]);
        assert!(
            output.status.success(),
            "demo-down run {run} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(
        exited(&mut worker, Duration::from_secs(10)),
        "the demo's worker was not stopped"
    );
    assert!(
        unrelated.try_wait().unwrap().is_none(),
        "a process the demo did not start was stopped"
    );
    unrelated.kill().unwrap();
    let _ = unrelated.wait();
    // Nothing was started: no control plane directory, neither the demo's nor the tests'.
    for dir in ["target/demo-cluster", "target/cluster"] {
        assert!(
            !scratch.0.join(dir).join("kubeconfig").exists() && !scratch.0.join(dir).exists(),
            "demo-down created {dir}"
        );
    }
}
