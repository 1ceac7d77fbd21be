//! charts/shardop against a real API server: lint and render, install with every optional
//! feature, least-privilege RBAC proven with real ServiceAccount tokens, the binaries run
//! with those tokens through create → assign → rebalance → delete, and the metric names the
//! HPA, the alerts and the dashboard use checked against what the binaries export.
//!
//! Helm and kubectl are the ones `hack/build-tools.sh` builds; the PromQL checker is
//! Prometheus' own parser, built by `hack/build-promql-check.sh`.

// Tests fail by panicking; the workspace lints forbid unwrap/expect only in production code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, Config, ResourceExt};
use serde_json::json;
use shardop_e2e::process::{ProcessSpec, ShardopProcess};
use shardop_e2e::{Cluster, TestNamespace, audit, cluster, wait_for};

/// Every optional feature except KEDA, which excludes the chart's own HPA.
const ALL_FEATURES: &[&str] = &[
    "metrics.serviceMonitor.enabled=true",
    "prometheusRule.enabled=true",
    "prometheusAdapter.rulesConfigMap=true",
    "worker.autoscaling.enabled=true",
    "apf.enabled=true",
    "networkPolicy.enabled=true",
    "dashboard.enabled=true",
];
/// The KEDA variant of "everything on".
const KEDA_FEATURES: &[&str] = &[
    "metrics.serviceMonitor.enabled=true",
    "prometheusRule.enabled=true",
    "keda.enabled=true",
    "apf.enabled=true",
    "networkPolicy.enabled=true",
    "dashboard.enabled=true",
];

fn chart_dir() -> PathBuf {
    shardop_e2e::repo_root().join("charts/shardop")
}

fn log_dir(test: &str) -> PathBuf {
    shardop_e2e::repo_root().join("target/e2e-logs").join(test)
}

/// helm next to the harness's kubectl (both come from hack/build-tools.sh), else PATH.
fn helm_binary(cluster: &Cluster) -> PathBuf {
    cluster
        .kubectl
        .parent()
        .map(|dir| dir.join("helm"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("helm"))
}

fn helm(cluster: &Cluster, args: &[&str]) -> Output {
    Command::new(helm_binary(cluster))
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args(args)
        .output()
        .expect("running helm")
}

fn helm_ok(cluster: &Cluster, args: &[&str]) -> String {
    let output = helm(cluster, args);
    assert!(
        output.status.success(),
        "helm {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn set_args<'a>(sets: &[&'a str]) -> Vec<&'a str> {
    sets.iter().flat_map(|s| ["--set", *s]).collect()
}

/// `helm template` with `--set`s, as parsed documents.
fn render(cluster: &Cluster, namespace: &str, sets: &[&str]) -> (String, Vec<serde_json::Value>) {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        "shardop",
        chart.to_str().unwrap(),
        "-n",
        namespace,
    ];
    args.extend(set_args(sets));
    let text = helm_ok(cluster, &args);
    (text.clone(), parse_documents(&text))
}

fn parse_documents(text: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|doc| serde_json::Value::deserialize(doc).ok())
        .filter(|v| v.is_object())
        .collect()
}

fn kinds(docs: &[serde_json::Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for doc in docs {
        *counts
            .entry(doc["kind"].as_str().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    counts
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered chart"))
}

/// The PromQL checker binary (built on first use, then cached).
fn promql_check(cluster: &Cluster) -> PathBuf {
    let output = Command::new("bash")
        .arg(cluster.repo_root.join("hack/build-promql-check.sh"))
        .output()
        .expect("running hack/build-promql-check.sh");
    assert!(
        output.status.success(),
        "hack/build-promql-check.sh failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

fn run_with_stdin(binary: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(binary)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn container(workload: &serde_json::Value) -> &serde_json::Value {
    &workload["spec"]["template"]["spec"]["containers"][0]
}

fn string_args(container: &serde_json::Value) -> Vec<String> {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

fn arg_value(args: &[String], flag: &str) -> Option<String> {
    let prefix = format!("{flag}=");
    args.iter()
        .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
}

fn seconds(duration: &str) -> u64 {
    duration.trim_end_matches('s').parse().unwrap()
}

/// The restricted Pod Security Standard, as the templates must render it.
fn assert_restricted(workload: &serde_json::Value) {
    let name = workload["metadata"]["name"].as_str().unwrap();
    let pod = &workload["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{name}"
    );
    assert_ne!(pod["securityContext"]["runAsUser"], 0, "{name}");
    for c in pod["containers"].as_array().unwrap() {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["runAsNonRoot"], true, "{name}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
    }
}

#[test]
fn chart_lints_renders_and_rejects_bad_values() {
    let cluster = cluster();
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    for sets in [&[][..], ALL_FEATURES, KEDA_FEATURES] {
        let mut args = vec!["lint", "--strict", chart];
        args.extend(set_args(sets));
        helm_ok(cluster, &args);
    }

    // The chart ships the CRDs generated from crates/api (their content is checked by the
    // api crate's sync test).
    let with_crds = helm_ok(cluster, &["template", "shardop", chart, "--include-crds"]);
    let crds = parse_documents(&with_crds)
        .into_iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .filter_map(|d| d["metadata"]["name"].as_str().map(str::to_owned))
        .collect::<BTreeSet<_>>();
    assert_eq!(
        crds,
        BTreeSet::from([
            "databaseclusters.shardop.dev".to_owned(),
            "shards.shardop.dev".to_owned()
        ])
    );

    // Defaults: the two workloads, secure and wired as issue 5 describes.
    let (_, docs) = render(cluster, "shardop-system", &[]);
    let sts = find(&docs, "StatefulSet", "shardop-worker");
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    let worker = container(sts);
    let args = string_args(worker);
    assert_eq!(args[0], "run");
    assert_eq!(
        arg_value(&args, "--operator-namespace").as_deref(),
        Some("shardop-system")
    );
    let pod_name = worker["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "POD_NAME");
    assert_eq!(
        pod_name.unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name",
        "POD_NAME must come from the downward API"
    );
    let grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    let shutdown = seconds(&arg_value(&args, "--shutdown-timeout").unwrap());
    assert!(
        grace > shutdown,
        "grace period {grace}s must exceed the shutdown timeout {shutdown}s"
    );
    assert_eq!(worker["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(worker["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(worker["resources"]["requests"].is_object());
    assert!(sts["spec"]["template"]["spec"]["topologySpreadConstraints"].is_array());
    let assigner = find(&docs, "Deployment", "shardop-assigner");
    assert_eq!(assigner["spec"]["replicas"], 2);
    assert_eq!(
        arg_value(&string_args(container(assigner)), "--worker-statefulset").as_deref(),
        Some("shardop-worker")
    );
    assert_eq!(
        arg_value(&string_args(container(assigner)), "--shards").as_deref(),
        Some("12"),
        "12 shards spread over the workers unless assigner.shards says otherwise"
    );
    assert_eq!(
        arg_value(&string_args(container(assigner)), "--webhook-finalizers").as_deref(),
        Some("shardop.dev/cleanup"),
        "the webhook adds the DatabaseCluster worker's finalizer"
    );
    assert_restricted(sts);
    assert_restricted(assigner);
    let k = kinds(&docs);
    assert_eq!(k.get("PodDisruptionBudget"), Some(&2), "{k:?}");
    assert_eq!(k.get("ServiceAccount"), Some(&2), "{k:?}");
    for absent in [
        "HorizontalPodAutoscaler",
        "FlowSchema",
        "ServiceMonitor",
        "PrometheusRule",
        "NetworkPolicy",
    ] {
        assert!(!k.contains_key(absent), "{absent} must be opt-in: {k:?}");
    }
    // Another fixed shard count, and one shard per worker replica (`null`).
    let (_, fixed) = render(cluster, "shardop-system", &["assigner.shards=48"]);
    let fixed_args = string_args(container(find(&fixed, "Deployment", "shardop-assigner")));
    assert_eq!(arg_value(&fixed_args, "--shards").as_deref(), Some("48"));
    assert_eq!(
        arg_value(&fixed_args, "--worker-statefulset").as_deref(),
        Some("shardop-worker")
    );
    let (_, per_worker) = render(cluster, "shardop-system", &["assigner.shards=null"]);
    let per_worker_args = string_args(container(find(
        &per_worker,
        "Deployment",
        "shardop-assigner",
    )));
    assert_eq!(arg_value(&per_worker_args, "--shards"), None);
    assert_eq!(
        arg_value(&per_worker_args, "--worker-statefulset").as_deref(),
        Some("shardop-worker")
    );
    // No rule anywhere grants secrets, pods, configmaps or a wildcard; the exceptions are
    // the assigner's webhook certificate Secret (by name, and create, which cannot be
    // limited to a name) and the worker's deletecollection of pods.
    for doc in docs
        .iter()
        .filter(|d| d["kind"] == "Role" || d["kind"] == "ClusterRole")
    {
        for rule in doc["rules"].as_array().unwrap() {
            if rule["resources"] == json!(["secrets"])
                && (rule["resourceNames"] == json!(["shardop-assigner-webhook-tls"])
                    || rule["verbs"] == json!(["create"]))
            {
                continue;
            }
            // The worker's cleanup of pods left without their StatefulSet: a collection
            // by label, never one pod, never read.
            if rule["resources"] == json!(["pods"]) && rule["verbs"] == json!(["deletecollection"])
            {
                continue;
            }
            let text = rule.to_string();
            for forbidden in ["secrets", "\"pods\"", "configmaps", "\"*\""] {
                assert!(
                    !text.contains(forbidden),
                    "{}: {text}",
                    doc["metadata"]["name"]
                );
            }
        }
    }

    // Every optional feature.
    let (all_text, docs) = render(cluster, "shardop-system", ALL_FEATURES);
    let k = kinds(&docs);
    for (kind, count) in [
        ("HorizontalPodAutoscaler", 1),
        ("FlowSchema", 3),
        ("PriorityLevelConfiguration", 3),
        ("ServiceMonitor", 2),
        ("PrometheusRule", 1),
        ("NetworkPolicy", 2),
        ("ConfigMap", 2),
    ] {
        assert_eq!(k.get(kind), Some(&count), "{kind}: {k:?}");
    }
    // The NetworkPolicies let the API server reach the assigner's webhook (on by default),
    // and nothing reach the worker but scrapes and probes.
    let ingress_ports = |name: &str| -> Vec<u64> {
        find(&docs, "NetworkPolicy", name)["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|rule| rule["ports"].as_array().unwrap().clone())
            .map(|port| port["port"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(ingress_ports("shardop-assigner"), [8080, 8081, 9443]);
    assert_eq!(ingress_ports("shardop-worker"), [8080, 8081]);
    // The FlowSchemas classify the writes of every sharded kind, not only shardop's groups.
    let (_, apf_docs) = render(
        cluster,
        "shardop-system",
        &[
            "apf.enabled=true",
            "assigner.shardedResources={databaseclusters.v1alpha1.shardop.dev,widgets.v1.example.com}",
        ],
    );
    let writes = find(&apf_docs, "FlowSchema", "shardop-system-shardop-writes");
    let groups = &writes["spec"]["rules"][0]["resourceRules"][0]["apiGroups"];
    for group in ["example.com", "shardop.dev", "", "storage.k8s.io"] {
        assert!(
            groups.as_array().unwrap().contains(&json!(group)),
            "{group:?} not in {groups}"
        );
    }
    let hpa = find(&docs, "HorizontalPodAutoscaler", "shardop-worker");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "StatefulSet");
    assert_eq!(
        hpa["spec"]["metrics"][0]["pods"]["metric"]["name"],
        "shardop_queue_depth"
    );
    assert_eq!(
        hpa["spec"]["metrics"][0]["pods"]["target"]["type"],
        "AverageValue"
    );
    assert!(
        hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
            .as_u64()
            .unwrap()
            > 0
    );
    // With an autoscaler, a first install starts at the minimum.
    assert_eq!(
        find(&docs, "StatefulSet", "shardop-worker")["spec"]["replicas"],
        3
    );
    let (_, keda_docs) = render(cluster, "shardop-system", KEDA_FEATURES);
    let keda = kinds(&keda_docs);
    assert_eq!(keda.get("ScaledObject"), Some(&1), "{keda:?}");
    assert!(!keda.contains_key("HorizontalPodAutoscaler"), "{keda:?}");

    // watchNamespaces: Roles in those namespaces; cluster-wide only the worker's read of
    // StorageClasses (cluster-scoped, needed for volume expansion).
    let (_, docs) = render(
        cluster,
        "shardop-system",
        &["watchNamespaces={team-a,team-b}"],
    );
    let k = kinds(&docs);
    // The StorageClass reader, and the webhook's caBundle upkeep of its own configuration.
    assert_eq!(k.get("ClusterRole"), Some(&2), "{k:?}");
    assert_eq!(k.get("ClusterRoleBinding"), Some(&2), "{k:?}");
    let webhook_role = find(
        &docs,
        "ClusterRole",
        "shardop-system-shardop-assigner-webhook",
    );
    assert_eq!(
        webhook_role["rules"][0]["resourceNames"],
        json!(["shardop-system-shardop-assigner"])
    );
    for role in docs.iter().filter(|d| {
        d["kind"] == "ClusterRole"
            && d["metadata"]["name"] != "shardop-system-shardop-assigner-webhook"
    }) {
        assert_eq!(
            role["rules"],
            json!([{
                "apiGroups": ["storage.k8s.io"],
                "resources": ["storageclasses"],
                "verbs": ["get"],
            }]),
            "{}",
            role["metadata"]["name"]
        );
    }
    for ns in ["team-a", "team-b"] {
        let roles = docs
            .iter()
            .filter(|d| d["kind"] == "Role" && d["metadata"]["namespace"] == ns)
            .count();
        assert_eq!(roles, 2, "a worker and an assigner Role in {ns}");
    }

    // Tamper-proof labels: on by default, naming this release's ServiceAccounts wherever it
    // is installed, bound to the watched namespaces only (another release manages the rest).
    let chart_dir_path = chart_dir();
    let text = helm_ok(
        cluster,
        &[
            "template",
            "db-ops",
            chart_dir_path.to_str().unwrap(),
            "-n",
            "team-ops",
            "--set",
            "watchNamespaces={team-a}",
        ],
    );
    let docs = parse_documents(&text);
    let policy = find(
        &docs,
        "ValidatingAdmissionPolicy",
        "team-ops-db-ops-shardop-shard-labels",
    );
    let policy_text = policy.to_string();
    for user in [
        "system:serviceaccount:team-ops:db-ops-shardop-assigner",
        "system:serviceaccount:team-ops:db-ops-shardop-worker",
    ] {
        assert!(policy_text.contains(user), "{user} not in {policy_text}");
    }
    assert_eq!(
        policy["spec"]["matchConstraints"]["resourceRules"][0]["operations"],
        json!(["UPDATE"])
    );
    let binding = find(
        &docs,
        "ValidatingAdmissionPolicyBinding",
        "team-ops-db-ops-shardop-shard-labels",
    );
    assert_eq!(
        binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]["values"],
        json!(["team-a"])
    );
    let (_, docs) = render(cluster, "shardop-system", &["labelPolicy.enabled=false"]);
    let k = kinds(&docs);
    assert!(!k.contains_key("ValidatingAdmissionPolicy"), "{k:?}");
    assert!(!k.contains_key("ValidatingAdmissionPolicyBinding"), "{k:?}");

    // Bad values fail with a message that names the problem.
    for (set, message) in [
        ("worker.replicas=0", "/worker/replicas"),
        ("worker.replicas=three", "/worker/replicas"),
        (
            "workers.replicas=3",
            "additional properties 'workers' not allowed",
        ),
        ("logFormat=xml", "/logFormat"),
        ("securityContext.runAsUser=0", "/securityContext/runAsUser"),
        ("watchNamespaces={Not_A_Namespace}", "/watchNamespaces/0"),
        (
            "prometheusRule.errorRate.threshold=5",
            "/prometheusRule/errorRate/threshold",
        ),
        (
            "apf.writes.matchingPrecedence=100",
            "/apf/writes/matchingPrecedence",
        ),
        (
            "apf.enabled=true,apf.leases.matchingPrecedence=600",
            "apf.leases.matchingPrecedence must be lower than apf.writes.matchingPrecedence",
        ),
        (
            "worker.lease.renewDeadlineSeconds=20",
            "must be less than worker.lease.durationSeconds",
        ),
        (
            "worker.terminationGracePeriodSeconds=10",
            "must be greater than worker.shutdownTimeoutSeconds",
        ),
        (
            "worker.autoscaling.enabled=true,keda.enabled=true",
            "mutually exclusive",
        ),
        (
            "worker.autoscaling.minReplicas=5,worker.autoscaling.maxReplicas=4,worker.autoscaling.enabled=true",
            "must not exceed",
        ),
        (
            "assigner.shards=8,worker.autoscaling.enabled=true,worker.autoscaling.maxReplicas=12",
            "must be at least the most worker replicas",
        ),
    ] {
        let output = helm(cluster, &["template", "shardop", chart, "--set", set]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "--set {set} was accepted");
        assert!(
            stderr.contains(message),
            "--set {set}: expected {message:?} in:\n{stderr}"
        );
    }

    // The chart README documents every value.
    let values: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
            .unwrap();
    let readme = std::fs::read_to_string(chart_dir().join("README.md")).unwrap();
    let mut undocumented = Vec::new();
    value_keys("", &values, &mut |key| {
        if !readme.contains(&format!("| `{key}` |")) {
            undocumented.push(key.to_owned());
        }
    });
    assert!(
        undocumented.is_empty(),
        "values missing from charts/shardop/README.md: {undocumented:?}"
    );

    // Every alert links to a runbook entry that exists in docs/operations.md.
    let operations = std::fs::read_to_string(cluster.repo_root.join("docs/operations.md")).unwrap();
    let anchors: BTreeSet<String> = operations
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    let all_docs = parse_documents(&all_text);
    let rule = find(&all_docs, "PrometheusRule", "shardop");
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for alert in group["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["alert"].is_string())
        {
            let url = alert["annotations"]["runbook_url"].as_str().unwrap();
            let anchor = url.rsplit_once('#').unwrap().1;
            assert!(
                anchors.contains(anchor),
                "{}: no runbook heading for #{anchor}",
                alert["alert"]
            );
        }
    }

    // Every alert, recording rule, dashboard query and adapter query parses as PromQL.
    let checker = promql_check(cluster);
    let output = run_with_stdin(&checker, &[], &all_text);
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "PromQL check failed:\n{report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        report.contains("ShardopShardWithoutHolder") && report.contains(" 0 failed"),
        "{report}"
    );
}

/// Calls `f` with every documented key of values.yaml: leaves, and maps that are documented
/// as one value (resources, probe timings, HPA behavior, label sets).
fn value_keys(prefix: &str, value: &serde_json::Value, f: &mut dyn FnMut(&str)) {
    const WHOLE: &[&str] = &["resources", "behavior", "labels", "liveness", "readiness"];
    match value.as_object() {
        Some(map) if !map.is_empty() && !WHOLE.iter().any(|w| prefix.ends_with(w)) => {
            for (key, child) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                value_keys(&path, child, f);
            }
        }
        _ => f(prefix),
    }
}

/// A Helm release, uninstalled when dropped (its cluster-scoped objects outlive the
/// namespace otherwise).
struct Release<'a> {
    cluster: &'a Cluster,
    name: String,
    namespace: String,
}

impl<'a> Release<'a> {
    fn install(cluster: &'a Cluster, name: &str, namespace: &str, sets: &[&str]) -> Self {
        let chart = chart_dir();
        let mut args = vec!["install", name, chart.to_str().unwrap(), "-n", namespace];
        args.extend(set_args(sets));
        let output = helm(cluster, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "helm install failed:\n{stderr}");
        // The API server warns about workloads whose pods a namespace's Pod Security level
        // would reject; helm prints those warnings.
        assert!(!stderr.contains("PodSecurity"), "{stderr}");
        Self {
            cluster,
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        }
    }

    fn manifest(&self) -> String {
        helm_ok(
            self.cluster,
            &["get", "manifest", &self.name, "-n", &self.namespace],
        )
    }
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        if std::env::var_os("SHARDOP_E2E_KEEP_NAMESPACES").is_none() {
            let _ = helm(
                self.cluster,
                &["uninstall", &self.name, "-n", &self.namespace],
            );
        }
    }
}

/// The third-party CRDs the optional objects need (stand-ins, see the fixture's comment).
fn install_fixture_crds(cluster: &Cluster) {
    let fixture = cluster.repo_root.join("e2e/fixtures/third-party-crds.yaml");
    cluster
        .kubectl_ok(&[
            "apply",
            "--server-side",
            "--field-manager=shardop-e2e",
            "-f",
            fixture.to_str().unwrap(),
        ])
        .unwrap();
    cluster
        .kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
            "crd/scaledobjects.keda.sh",
        ])
        .unwrap();
}

/// Enforces the restricted Pod Security Standard on a namespace: the API server then
/// rejects any pod of the chart that is not restricted, and warns about such workloads.
fn enforce_restricted(cluster: &Cluster, namespace: &str) {
    cluster
        .kubectl_ok(&[
            "label",
            "namespace",
            namespace,
            "--overwrite",
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest",
            "pod-security.kubernetes.io/warn=restricted",
        ])
        .unwrap();
}

#[tokio::test]
async fn chart_installs_every_object_on_the_real_api_server() {
    let cluster = cluster();
    let client = cluster.client().await.unwrap();
    install_fixture_crds(cluster);
    let ns = TestNamespace::create(&client, "e2e-chart-all")
        .await
        .unwrap();
    let keda_ns = TestNamespace::create(&client, "e2e-chart-keda")
        .await
        .unwrap();
    let watched = TestNamespace::create(&client, "e2e-chart-watched")
        .await
        .unwrap();
    enforce_restricted(cluster, &ns.name);
    enforce_restricted(cluster, &keda_ns.name);

    // This release manages every namespace: its label policy would reject the label edits
    // of the tests running beside this one. The scoped release below keeps it.
    let mut cluster_wide = ALL_FEATURES.to_vec();
    cluster_wide.push("labelPolicy.enabled=false");
    let release = Release::install(cluster, "shardop", &ns.name, &cluster_wide);
    let watch_set = format!("watchNamespaces={{{}}}", watched.name);
    let mut keda_sets = KEDA_FEATURES.to_vec();
    keda_sets.push(&watch_set);
    let keda_release = Release::install(cluster, "shardop", &keda_ns.name, &keda_sets);

    // Every object of both releases was accepted and is stored (kubectl get fails on any
    // that is missing).
    for r in [&release, &keda_release] {
        let manifest = r.manifest();
        let expected = parse_documents(&manifest).len();
        let output = cluster
            .kubectl_with_input(&["get", "-f", "-", "-o", "name"], &manifest)
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(stdout.lines().count(), expected, "{stdout}");
        for kind in [
            "flowschema",
            "prioritylevelconfiguration",
            "servicemonitor",
            "prometheusrule",
            "networkpolicy",
            "poddisruptionbudget",
        ] {
            assert!(stdout.contains(kind), "no {kind} among:\n{stdout}");
        }
    }
    let policies = keda_release.manifest();
    assert!(
        policies.contains("kind: ValidatingAdmissionPolicy\n")
            && policies.contains("kind: ValidatingAdmissionPolicyBinding"),
        "the scoped release has no label policy"
    );
    let hpa = cluster
        .kubectl_ok(&[
            "get",
            "hpa",
            "shardop-worker",
            "-n",
            &ns.name,
            "-o",
            "jsonpath={.spec.metrics[0].pods.metric.name}",
        ])
        .unwrap();
    assert_eq!(hpa, "shardop_queue_depth");
    let so = cluster
        .kubectl_ok(&[
            "get",
            "scaledobject",
            "shardop-worker",
            "-n",
            &keda_ns.name,
            "-o",
            "name",
        ])
        .unwrap();
    assert!(so.contains("shardop-worker"));
    // watchNamespaces: the workload Roles landed in the watched namespace.
    let roles = cluster
        .kubectl_ok(&["get", "roles", "-n", &watched.name, "-o", "name"])
        .unwrap();
    assert!(
        roles.contains("shardop-worker-workload") && roles.contains("shardop-assigner-workload"),
        "{roles}"
    );

    // The controllers created the pods in namespaces that enforce the restricted standard:
    // the API server's PodSecurity admission accepted them (they never run: no kubelet).
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let names = wait_for(
        "5 restricted pods admitted",
        // The StatefulSet and ReplicaSet controllers share their queues with every other
        // namespace on the control plane; under a concurrent load test they take a while.
        Duration::from_secs(90),
        || {
            let pods = pods.clone();
            async move {
                let list = pods.list(&ListParams::default()).await.ok()?;
                let names: BTreeSet<String> = list.items.iter().map(|p| p.name_any()).collect();
                (names.len() == 5).then_some(names)
            }
        },
    )
    .await
    .unwrap_or_else(|e| {
        // A pod the restricted standard refuses shows up as a FailedCreate event.
        let events = cluster.kubectl(&["get", "events", "-n", &ns.name]).unwrap();
        panic!("{e}\n{}", String::from_utf8_lossy(&events.stdout))
    });
    for i in 0..3 {
        assert!(names.contains(&format!("shardop-worker-{i}")), "{names:?}");
    }
    let events = cluster
        .kubectl_ok(&["get", "events", "-n", &ns.name, "-o", "wide"])
        .unwrap();
    assert!(!events.contains("FailedCreate"), "{events}");

    // With an autoscaler, `helm upgrade` keeps the replica count the autoscaler chose (a
    // reset would start a rebalance).
    cluster
        .kubectl_ok(&[
            "scale",
            "statefulset",
            "shardop-worker",
            "-n",
            &ns.name,
            "--replicas=4",
        ])
        .unwrap();
    let chart = chart_dir();
    helm_ok(
        cluster,
        &[
            "upgrade",
            "shardop",
            chart.to_str().unwrap(),
            "-n",
            &ns.name,
            "--reuse-values",
        ],
    );
    let replicas = cluster
        .kubectl_ok(&[
            "get",
            "statefulset",
            "shardop-worker",
            "-n",
            &ns.name,
            "-o",
            "jsonpath={.spec.replicas}",
        ])
        .unwrap();
    assert_eq!(
        replicas, "4",
        "helm upgrade reset the autoscaled replica count"
    );

    // API Priority and Fairness classifies the ServiceAccounts' requests into the chart's
    // FlowSchemas: reads, Lease writes and other writes each into their own (the API server
    // names the schema in a response header).
    let dir = log_dir("chart_install");
    let worker = service_account_kubeconfig(cluster, &ns.name, "shardop-worker", &dir);
    let schema_uid = |name: &str| {
        cluster
            .kubectl_ok(&[
                "get",
                "flowschema",
                &format!("{}-shardop-{name}", ns.name),
                "-o",
                "jsonpath={.metadata.uid}",
            ])
            .unwrap()
    };
    let read = flow_schema_of(cluster, &worker, &["get", "services", "-n", &ns.name], "");
    assert_eq!(
        read,
        schema_uid("reads"),
        "a worker read is not in the reads FlowSchema"
    );
    let lease_read = flow_schema_of(cluster, &worker, &["get", "leases", "-n", &ns.name], "");
    assert_eq!(
        lease_read,
        schema_uid("leases"),
        "a worker Lease read is not in the leases FlowSchema"
    );
    let lease_probe = format!(
        "{{\"apiVersion\":\"coordination.k8s.io/v1\",\"kind\":\"Lease\",\"metadata\":{{\"name\":\"apf-probe\",\"namespace\":\"{}\"}}}}",
        ns.name
    );
    let lease_write = flow_schema_of(cluster, &worker, &["create", "-f", "-"], &lease_probe);
    assert_eq!(
        lease_write,
        schema_uid("leases"),
        "a worker Lease write is not in the leases FlowSchema"
    );
    let probe = format!(
        "{{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"name\":\"apf-probe\",\"namespace\":\"{}\"}},\"spec\":{{\"ports\":[{{\"port\":80}}]}}}}",
        ns.name
    );
    let write = flow_schema_of(cluster, &worker, &["create", "-f", "-"], &probe);
    assert_eq!(
        write,
        schema_uid("writes"),
        "a worker write is not in the writes FlowSchema"
    );

    drop(keda_release);
    drop(release);
    // Uninstall removes the cluster-scoped objects too.
    let leftover = cluster
        .kubectl_ok(&["get", "clusterroles,flowschemas", "-o", "name"])
        .unwrap();
    assert!(
        !leftover.contains(&ns.name) && !leftover.contains(&keda_ns.name),
        "{leftover}"
    );
}

/// A kubeconfig that authenticates with a TokenRequest token of `service_account`.
fn service_account_kubeconfig(
    cluster: &Cluster,
    namespace: &str,
    service_account: &str,
    dir: &Path,
) -> PathBuf {
    let token = cluster
        .kubectl_ok(&[
            "create",
            "token",
            service_account,
            "-n",
            namespace,
            "--duration=1h",
        ])
        .unwrap();
    let admin = cluster
        .kubectl_ok(&["config", "view", "--raw", "--minify", "-o", "json"])
        .unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&admin).unwrap();
    config["users"] = json!([{ "name": service_account, "user": { "token": token.trim() } }]);
    config["contexts"][0]["context"]["user"] = json!(service_account);
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(format!("{namespace}-{service_account}.kubeconfig"));
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path
}

/// The FlowSchema UID the API server reports for a kubectl request made with `kubeconfig`.
fn flow_schema_of(cluster: &Cluster, kubeconfig: &Path, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(&cluster.kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        // -v=8 logs the response headers.
        .arg("-v=8")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kubectl {args:?}:\n{log}");
    // The last response is the request's own (earlier ones are discovery).
    log.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("X-Kubernetes-Pf-Flowschema-Uid:"))
        .map(|uid| uid.trim().to_owned())
        .unwrap_or_else(|| panic!("no APF response header in:\n{log}"))
}

async fn client_from(kubeconfig: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// `kubectl auth can-i` as the token: a SelfSubjectAccessReview the real authorizer answers.
fn can_i(cluster: &Cluster, kubeconfig: &Path, args: &[&str]) -> bool {
    let output = Command::new(&cluster.kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["auth", "can-i"])
        .args(args)
        .output()
        .unwrap();
    match String::from_utf8_lossy(&output.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => panic!(
            "kubectl auth can-i {args:?}: {other} {}",
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

fn assert_forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>, what: &str) {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn chart_service_account_tokens_are_denied_outside_their_roles() {
    let cluster = cluster();
    let client = cluster.client().await.unwrap();
    let operator = TestNamespace::create(&client, "e2e-chart-rbac")
        .await
        .unwrap();
    let watched = TestNamespace::create(&client, "e2e-chart-rbac-w")
        .await
        .unwrap();
    let other = TestNamespace::create(&client, "e2e-chart-rbac-o")
        .await
        .unwrap();
    let scoped = format!("watchNamespaces={{{}}}", watched.name);
    let _release = Release::install(cluster, "shardop", &operator.name, &[scoped.as_str()]);
    let dir = log_dir("chart_rbac");
    let worker = service_account_kubeconfig(cluster, &operator.name, "shardop-worker", &dir);
    let assigner = service_account_kubeconfig(cluster, &operator.name, "shardop-assigner", &dir);
    let (op, w, o) = (
        operator.name.as_str(),
        watched.name.as_str(),
        other.name.as_str(),
    );

    // (who, verb and resource, namespace, allowed)
    let expectations: &[(&Path, &[&str], &str, bool)] = &[
        // The worker: its Leases and Shard status in the operator namespace ...
        (&worker, &["create", "leases.coordination.k8s.io"], op, true),
        (&worker, &["update", "leases.coordination.k8s.io"], op, true),
        (
            &worker,
            &["patch", "shards.shardop.dev", "--subresource=status"],
            op,
            true,
        ),
        // ... its slice and children in the watched namespace ...
        (&worker, &["watch", "databaseclusters.shardop.dev"], w, true),
        (
            &worker,
            &[
                "patch",
                "databaseclusters.shardop.dev",
                "--subresource=status",
            ],
            w,
            true,
        ),
        (&worker, &["patch", "statefulsets.apps"], w, true),
        (&worker, &["create", "services"], w, true),
        (&worker, &["delete", "persistentvolumeclaims"], w, true),
        (&worker, &["patch", "persistentvolumeclaims"], w, true),
        (&worker, &["get", "storageclasses.storage.k8s.io"], w, true),
        (&worker, &["list", "persistentvolumeclaims"], w, false),
        (&worker, &["patch", "persistentvolumeclaims"], o, false),
        // ... and nothing else.
        (&worker, &["get", "secrets"], op, false),
        (&worker, &["list", "secrets"], w, false),
        (&worker, &["list", "leases.coordination.k8s.io"], w, false),
        (&worker, &["create", "leases.coordination.k8s.io"], o, false),
        (
            &worker,
            &["delete", "leases.coordination.k8s.io"],
            op,
            false,
        ),
        (&worker, &["list", "databaseclusters.shardop.dev"], o, false),
        (&worker, &["patch", "statefulsets.apps"], o, false),
        (&worker, &["create", "shards.shardop.dev"], op, false),
        (
            &worker,
            &["delete", "databaseclusters.shardop.dev"],
            w,
            false,
        ),
        (&worker, &["create", "pods"], w, false),
        (&worker, &["delete", "pods"], w, false),
        (&worker, &["deletecollection", "pods"], w, true),
        (&worker, &["get", "configmaps"], op, false),
        // The assigner: labels of DatabaseClusters, Shards, Leases, the worker StatefulSet.
        (
            &assigner,
            &["patch", "databaseclusters.shardop.dev"],
            w,
            true,
        ),
        (&assigner, &["create", "shards.shardop.dev"], op, true),
        (
            &assigner,
            &["delete", "leases.coordination.k8s.io"],
            op,
            true,
        ),
        (
            &assigner,
            &["get", "statefulsets.apps/shardop-worker"],
            op,
            true,
        ),
        (
            &assigner,
            &["get", "statefulsets.apps/something-else"],
            op,
            false,
        ),
        (
            &assigner,
            &["patch", "statefulsets.apps/shardop-worker"],
            op,
            false,
        ),
        (
            &assigner,
            &[
                "patch",
                "databaseclusters.shardop.dev",
                "--subresource=status",
            ],
            w,
            false,
        ),
        (
            &assigner,
            &["patch", "databaseclusters.shardop.dev"],
            o,
            false,
        ),
        (&assigner, &["list", "leases.coordination.k8s.io"], w, false),
        (&assigner, &["create", "statefulsets.apps"], w, false),
        (&assigner, &["list", "secrets"], op, false),
        (
            &assigner,
            &["update", "leases.coordination.k8s.io"],
            op,
            false,
        ),
        (&assigner, &["patch", "shards.shardop.dev"], op, false),
    ];
    let mut wrong = Vec::new();
    for (who, what, namespace, allowed) in expectations {
        let mut args = what.to_vec();
        args.extend(["-n", namespace]);
        if can_i(cluster, who, &args) != *allowed {
            wrong.push(format!(
                "{}: {} -n {namespace} should be {}",
                who.display(),
                what.join(" "),
                if *allowed { "allowed" } else { "denied" }
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "RBAC differs from the least-privilege plan:\n{}",
        wrong.join("\n")
    );

    // And real requests with the worker's token are refused by the API server.
    let worker_client = client_from(&worker).await;
    assert_forbidden(
        Api::<Secret>::namespaced(worker_client.clone(), op)
            .list(&ListParams::default())
            .await,
        "worker lists secrets",
    );
    assert_forbidden(
        Api::<Lease>::namespaced(worker_client.clone(), o)
            .list(&ListParams::default())
            .await,
        "worker lists another namespace's leases",
    );
    let stray: Lease =
        serde_json::from_value(json!({ "metadata": { "name": "shardop-shard-0" } })).unwrap();
    assert_forbidden(
        Api::<Lease>::namespaced(worker_client.clone(), o)
            .create(&Default::default(), &stray)
            .await,
        "worker creates a lease in another namespace",
    );
    // While the same token works inside the role.
    Api::<Lease>::namespaced(worker_client, op)
        .list(&ListParams::default())
        .await
        .unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP GET (the metrics endpoint speaks HTTP/1.1).
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// Starts a binary with exactly the arguments the chart renders for it, except the listen
/// addresses (local ports instead of the pod's), authenticated as the chart's ServiceAccount.
/// The `SHARDOP_*` variables the chart sets on `container` with a plain value.
fn chart_env(container: &serde_json::Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .filter(|(name, _)| name.starts_with("SHARDOP_"))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

/// Runs `binary` as the chart's pod `pod_name` would: with `container`'s arguments and
/// `SHARDOP_*` variables, the ServiceAccount token of `kubeconfig`, and free local ports.
fn spawn_as_chart(
    cluster: &Cluster,
    binary: &str,
    pod_name: &str,
    container: &serde_json::Value,
    kubeconfig: &Path,
    test: &str,
) -> (ShardopProcess, u16) {
    let chart_args = string_args(container);
    let metrics = free_port();
    let health = free_port();
    let mut args: Vec<String> = chart_args
        .iter()
        .filter(|a| !a.starts_with("--metrics-addr=") && !a.starts_with("--health-addr="))
        .cloned()
        .collect();
    // The chart's fixed webhook port would collide between parallel tests.
    for arg in &mut args {
        if arg.starts_with("--webhook-addr=") {
            *arg = "--webhook-addr=127.0.0.1:0".to_owned();
        }
    }
    args.push(format!("--metrics-addr=127.0.0.1:{metrics}"));
    args.push(format!("--health-addr=127.0.0.1:{health}"));
    let mut env = chart_env(container);
    env.push(("KUBECONFIG".to_owned(), kubeconfig.display().to_string()));
    let spec = ProcessSpec {
        binary: binary.to_owned(),
        name: pod_name.to_owned(),
        args,
        env: env.into_iter().collect(),
        log_dir: log_dir(test),
    };
    (spec.spawn(cluster).unwrap(), metrics)
}

fn dbc_api(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("shardop.dev", "v1alpha1", "DatabaseCluster"),
        "databaseclusters",
    );
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// Objects per shard label (`<label_prefix>/shard`) once every object is labelled and
/// converged, else None.
async fn converged_shards(
    api: &Api<DynamicObject>,
    expected: usize,
    label_prefix: &str,
) -> Option<BTreeMap<String, usize>> {
    let list = api.list(&ListParams::default()).await.ok()?;
    if list.items.len() != expected {
        return None;
    }
    let mut shards = BTreeMap::new();
    for object in &list.items {
        let shard = object
            .labels()
            .get(&format!("{label_prefix}/shard"))?
            .clone();
        if object
            .labels()
            .contains_key(&format!("{label_prefix}/drain"))
        {
            return None;
        }
        let observed = object.data["status"]["observedGeneration"].as_i64()?;
        if Some(observed) != object.metadata.generation {
            return None;
        }
        *shards.entry(shard).or_default() += 1;
    }
    Some(shards)
}

#[tokio::test]
async fn chart_service_accounts_run_the_operator_end_to_end() {
    const TEST: &str = "chart_end_to_end";
    const OBJECTS: usize = 24;
    const OPERATOR: &str = "dbs";
    const LABEL_PREFIX: &str = "dbs.shardop.dev";
    let cluster = cluster();
    let client = cluster.client().await.unwrap();
    let operator = TestNamespace::create(&client, "e2e-chart-op")
        .await
        .unwrap();
    let workload = TestNamespace::create(&client, "e2e-chart-db")
        .await
        .unwrap();
    let scoped = format!("watchNamespaces={{{}}}", workload.name);
    let release = Release::install(
        cluster,
        "shardop",
        &operator.name,
        &[
            scoped.as_str(),
            "operatorName=dbs",
            "worker.replicas=2",
            // One shard per worker: the scale-out below adds a shard and the scale-in
            // retires it (the default, a fixed shard count, moves shards instead).
            "assigner.shards=null",
            // Every optional flag the chart can pass, so the binaries prove they accept them.
            "worker.concurrency=8",
            "worker.kubeQps=40",
            "worker.kubeBurst=80",
            "worker.kubeQpsMax=120",
            "assigner.maxConcurrentMoves=50",
            "assigner.kubeQps=20",
            "assigner.kubeBurst=40",
            "assigner.kubeQpsMax=60",
        ],
    );
    let manifest = parse_documents(&release.manifest());
    let worker = container(find(&manifest, "StatefulSet", "shardop-worker")).clone();
    let assigner = container(find(&manifest, "Deployment", "shardop-assigner")).clone();
    assert!(string_args(&worker).contains(&"--kube-qps-max=120".to_owned()));
    assert!(string_args(&assigner).contains(&"--kube-qps-max=60".to_owned()));
    // Not the default operator name: both binaries take it from the chart, so the workers
    // serve the Leases the assigner waits for and the labels it writes.
    for env in [chart_env(&worker), chart_env(&assigner)] {
        assert!(env.contains(&("SHARDOP_OPERATOR_NAME".to_owned(), OPERATOR.to_owned())));
    }
    let dir = log_dir(TEST);
    let worker_config = service_account_kubeconfig(cluster, &operator.name, "shardop-worker", &dir);
    let assigner_config =
        service_account_kubeconfig(cluster, &operator.name, "shardop-assigner", &dir);
    let started = jiff::Timestamp::now();

    // The pods the StatefulSet controller created never run (no kubelet); processes with
    // the same names and the ServiceAccounts' tokens stand in for them.
    let mut processes = Vec::new();
    let mut worker_metrics = Vec::new();
    for i in 0..2 {
        let (p, port) = spawn_as_chart(
            cluster,
            "shardop-worker",
            &format!("shardop-worker-{i}"),
            &worker,
            &worker_config,
            TEST,
        );
        processes.push(p);
        worker_metrics.push(port);
    }
    let (assigner, assigner_metrics) = spawn_as_chart(
        cluster,
        "shardop-assigner",
        "shardop-assigner-0",
        &assigner,
        &assigner_config,
        TEST,
    );
    processes.push(assigner);

    // create → assign → reconcile
    let dbcs = dbc_api(&client, &workload.name);
    for i in 0..OBJECTS {
        let mut object =
            shardop_e2e::database_cluster_json(&format!("db-{i:02}"), shardop_e2e::valid_spec(1));
        object["spec"]["storage"]["reclaimPolicy"] = json!("Delete");
        let object: DynamicObject = serde_json::from_value(object).unwrap();
        dbcs.create(&Default::default(), &object).await.unwrap();
    }
    let logs = |processes: &Vec<ShardopProcess>| {
        processes
            .iter()
            .map(|p| format!("--- {}\n{}", p.name, tail(&p.log())))
            .collect::<String>()
    };
    let shards = wait_for(
        "objects assigned to 2 shards and converged",
        Duration::from_secs(60),
        || converged_shards(&dbcs, OBJECTS, LABEL_PREFIX),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&processes)));
    assert_eq!(shards.keys().collect::<Vec<_>>(), ["0", "1"], "{shards:?}");

    // rebalance: the HPA (or kubectl scale) changes the StatefulSet; worker 2 joins.
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &operator.name);
    statefulsets
        .patch(
            "shardop-worker",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 3 } })),
        )
        .await
        .unwrap();
    let (p, port) = spawn_as_chart(
        cluster,
        "shardop-worker",
        "shardop-worker-2",
        &worker,
        &worker_config,
        TEST,
    );
    processes.push(p);
    worker_metrics.push(port);
    let shards = wait_for(
        "objects rebalanced over 3 shards and converged",
        Duration::from_secs(90),
        || {
            let dbcs = dbcs.clone();
            async move {
                converged_shards(&dbcs, OBJECTS, LABEL_PREFIX)
                    .await
                    .filter(|s| s.len() == 3)
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&processes)));
    assert_eq!(shards.values().sum::<usize>(), OBJECTS);

    // The series the HPA, the alerts and the dashboard use are exported: every metric name
    // the rendered PromQL selects is a family in the workers' or the assigner's /metrics,
    // the HPA's metric carries the shard label, and the SLO's bucket bound exists.
    let mut exposition = String::new();
    for port in worker_metrics.iter().chain([&assigner_metrics]) {
        exposition.push_str(&http_get(*port, "/metrics").expect("scraping /metrics"));
    }
    let (rendered, docs) = render(cluster, &operator.name, ALL_FEATURES);
    let checker = promql_check(cluster);
    let names = run_with_stdin(&checker, &["-metrics"], &rendered);
    assert!(names.status.success());
    let mut missing = Vec::new();
    for name in String::from_utf8_lossy(&names.stdout).lines() {
        let family = ["_bucket", "_count", "_sum", "_total"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        if exposition.contains(&format!("# TYPE {family} ")) {
            continue;
        }
        missing.push(name.to_owned());
    }
    assert!(
        missing.is_empty(),
        "metrics used by the chart but not exported: {missing:?}"
    );
    let hpa = find(&docs, "HorizontalPodAutoscaler", "shardop-worker");
    let hpa_metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
        .as_str()
        .unwrap();
    assert!(
        exposition.contains(&format!("{hpa_metric}{{shard=\"")),
        "no {hpa_metric}{{shard=...}} series"
    );
    // The lag SLO's threshold must be one of the histogram's bucket bounds.
    let bound = "le=\"5.0\"";
    assert!(
        rendered.contains(bound),
        "the default SLO threshold changed; update this test"
    );
    assert!(
        exposition
            .lines()
            .any(|l| l.starts_with("shardop_reconcile_lag_seconds_bucket{") && l.contains(bound)),
        "shardop_reconcile_lag_seconds has no bucket {bound}"
    );

    // scale-in: worker 2 goes away as its pod would (SIGTERM); the assigner retires shard 2
    // (Lease annotation, moves, then deletes the Shard and the Lease) with its own token.
    statefulsets
        .patch(
            "shardop-worker",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": 2 } })),
        )
        .await
        .unwrap();
    let mut worker_2 = processes.pop().unwrap();
    worker_2.terminate(Duration::from_secs(30)).unwrap();
    let shard_objects: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &operator.name,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("shardop.dev", "v1alpha1", "Shard"),
            "shards",
        ),
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), &operator.name);
    wait_for(
        "shard 2 retired and removed",
        Duration::from_secs(90),
        || {
            let (dbcs, shard_objects, leases) =
                (dbcs.clone(), shard_objects.clone(), leases.clone());
            async move {
                let shards = converged_shards(&dbcs, OBJECTS, LABEL_PREFIX).await?;
                let gone = shard_objects.get_opt("dbs-shard-2").await.ok()?.is_none()
                    && leases.get_opt("dbs-shard-2").await.ok()?.is_none();
                (shards.len() == 2 && gone).then_some(())
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&processes)));

    // delete: finalizers run, everything goes away.
    for i in 0..OBJECTS {
        dbcs.delete(&format!("db-{i:02}"), &DeleteParams::default())
            .await
            .unwrap();
    }
    wait_for(
        "every DatabaseCluster deleted",
        Duration::from_secs(60),
        || {
            let dbcs = dbcs.clone();
            async move {
                dbcs.list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .is_empty()
                    .then_some(())
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&processes)));

    // The audit log: both ServiceAccounts wrote (so the tokens were used, not the admin's),
    // and the API server refused none of their writes.
    let events = audit::read_events(cluster.audit_log().unwrap()).unwrap();
    for sa in ["shardop-worker", "shardop-assigner"] {
        let user = format!("system:serviceaccount:{}:{sa}", operator.name);
        let mine: Vec<_> = events
            .iter()
            .filter(|e| e.user.username == user && e.request_received_timestamp >= started)
            .collect();
        assert!(
            mine.iter().any(|e| e.is_successful_write()),
            "{sa} made no successful write"
        );
        let denied: Vec<String> = mine
            .iter()
            .filter(|e| e.response_status.as_ref().is_some_and(|s| s.code == 403))
            .map(|e| {
                format!(
                    "{} {:?}",
                    e.verb,
                    e.object_ref
                        .as_ref()
                        .map(|o| (&o.resource, &o.subresource, &o.namespace))
                )
            })
            .collect();
        assert!(denied.is_empty(), "{sa} was denied: {denied:?}");
    }
    for mut p in processes {
        let _ = p.terminate(Duration::from_secs(30));
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n") + "\n"
}

/// A label patch of DatabaseCluster `name` by `client`.
async fn patch_dbc_labels(
    client: &Client,
    namespace: &str,
    name: &str,
    labels: serde_json::Value,
) -> Result<DynamicObject, kube::Error> {
    dbc_api(client, namespace)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": labels } })),
        )
        .await
}

/// The policy's rejection: 403 with a message naming the label and who may change it.
fn assert_label_rejected(
    result: Result<DynamicObject, kube::Error>,
    label: &str,
    assigner: &str,
    worker: &str,
) {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => {
            for needle in [
                format!("label {label} may not be changed"),
                assigner.to_owned(),
                worker.to_owned(),
                "two shards".to_owned(),
            ] {
                assert!(
                    status.message.contains(&needle),
                    "{needle:?} missing from: {}",
                    status.message
                );
            }
        }
        other => panic!("change of {label}: expected the policy's 403, got {other:?}"),
    }
}

#[tokio::test]
async fn chart_label_policy_rejects_hand_edits_of_shard_labels() {
    let cluster = cluster();
    let admin = cluster.client().await.unwrap();
    let operator = TestNamespace::create(&admin, "e2e-chart-vap")
        .await
        .unwrap();
    let watched = TestNamespace::create(&admin, "e2e-chart-vap-w")
        .await
        .unwrap();
    let scoped = format!("watchNamespaces={{{}}}", watched.name);
    let _release = Release::install(cluster, "shardop", &operator.name, &[scoped.as_str()]);
    let dir = log_dir("chart_label_policy");
    let assigner_sa = format!("system:serviceaccount:{}:shardop-assigner", operator.name);
    let worker_sa = format!("system:serviceaccount:{}:shardop-worker", operator.name);
    let assigner = client_from(&service_account_kubeconfig(
        cluster,
        &operator.name,
        "shardop-assigner",
        &dir,
    ))
    .await;
    let worker = client_from(&service_account_kubeconfig(
        cluster,
        &operator.name,
        "shardop-worker",
        &dir,
    ))
    .await;
    let ns = watched.name.as_str();
    let create = |name: &str, labels: serde_json::Value| {
        let mut manifest = shardop_e2e::database_cluster_json(name, shardop_e2e::valid_spec(1));
        manifest["metadata"]["labels"] = labels;
        let object: DynamicObject = serde_json::from_value(manifest).unwrap();
        let api = dbc_api(&admin, ns);
        async move { api.create(&Default::default(), &object).await }
    };
    // CREATE is not checked, labels included (the workers ignore a label the assigner did
    // not write).
    create("orders", json!({})).await.unwrap();
    create("restored", json!({ "shardop.dev/shard": "1" }))
        .await
        .unwrap();

    // The API server enforces a new policy once it has compiled it: wait for that on a
    // harmless edit of an object nobody else touches.
    let mut attempt = 0_u32;
    wait_for(
        "the label policy to be enforced",
        Duration::from_secs(60),
        || {
            // A new value each time: an unchanged label is no change to reject.
            attempt += 1;
            let labels = json!({ "shardop.dev/drain": attempt.to_string() });
            let admin = admin.clone();
            async move {
                // Only the policy's own 403 counts: a passing 5xx or conflict is no sign
                // that the policy is in force.
                matches!(
                    patch_dbc_labels(&admin, ns, "restored", labels).await,
                    Err(kube::Error::Api(status)) if status.code == 403
                )
                .then_some(())
            }
        },
    )
    .await
    .unwrap();

    // The assigner stamps and drains; nobody else may change either label.
    patch_dbc_labels(&assigner, ns, "orders", json!({ "shardop.dev/shard": "0" }))
        .await
        .unwrap();
    assert_label_rejected(
        patch_dbc_labels(&admin, ns, "orders", json!({ "shardop.dev/shard": "1" })).await,
        "shardop.dev/shard",
        &assigner_sa,
        &worker_sa,
    );
    assert_label_rejected(
        patch_dbc_labels(&admin, ns, "orders", json!({ "shardop.dev/shard": null })).await,
        "shardop.dev/shard",
        &assigner_sa,
        &worker_sa,
    );
    assert_label_rejected(
        patch_dbc_labels(&admin, ns, "orders", json!({ "shardop.dev/drain": "1" })).await,
        "shardop.dev/drain",
        &assigner_sa,
        &worker_sa,
    );
    // Other labels, and the same value again, are no change of the protected labels.
    patch_dbc_labels(
        &admin,
        ns,
        "orders",
        json!({ "team": "payments", "shardop.dev/shard": "0" }),
    )
    .await
    .unwrap();
    patch_dbc_labels(&assigner, ns, "orders", json!({ "shardop.dev/drain": "1" }))
        .await
        .unwrap();
    // A worker only acknowledges: both labels removed at once.
    assert_label_rejected(
        patch_dbc_labels(&worker, ns, "orders", json!({ "shardop.dev/shard": "1" })).await,
        "shardop.dev/shard",
        &assigner_sa,
        &worker_sa,
    );
    assert_label_rejected(
        patch_dbc_labels(&worker, ns, "orders", json!({ "shardop.dev/drain": null })).await,
        "shardop.dev/drain",
        &assigner_sa,
        &worker_sa,
    );
    patch_dbc_labels(
        &worker,
        ns,
        "orders",
        json!({ "shardop.dev/shard": null, "shardop.dev/drain": null }),
    )
    .await
    .unwrap();
    patch_dbc_labels(&assigner, ns, "orders", json!({ "shardop.dev/shard": "1" }))
        .await
        .unwrap();
    let labels = dbc_api(&admin, ns)
        .get("orders")
        .await
        .unwrap()
        .labels()
        .clone();
    assert_eq!(
        labels.get("shardop.dev/shard").map(String::as_str),
        Some("1")
    );
    assert!(!labels.contains_key("shardop.dev/drain"), "{labels:?}");
}

/// `(apiGroup, resource)` of every rule of an RBAC role, with its verbs.
fn rule_resources(role: &serde_json::Value) -> BTreeMap<(String, String), Vec<String>> {
    let mut rules = BTreeMap::new();
    for rule in role["rules"].as_array().into_iter().flatten() {
        let strings = |key: &str| -> Vec<String> {
            rule[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        for group in strings("apiGroups") {
            for resource in strings("resources") {
                rules.insert((group.clone(), resource), strings("verbs"));
            }
        }
    }
    rules
}

fn sharded_rules(pairs: &[(&str, &str)]) -> BTreeMap<(String, String), Vec<String>> {
    pairs
        .iter()
        .map(|(group, resource)| {
            (
                ((*group).to_owned(), (*resource).to_owned()),
                ["get", "list", "watch", "patch"]
                    .map(str::to_owned)
                    .to_vec(),
            )
        })
        .collect()
}

/// The assigner's RBAC, arguments and label policy follow `operatorName` and
/// `assigner.shardedResources`: exactly the configured kinds, each in its own API group, a
/// cluster-scoped kind cluster-wide even with `watchNamespaces`.
#[test]
fn chart_renders_the_assigner_for_exactly_the_sharded_kinds() {
    let cluster = cluster();
    const MULTI: &[&str] = &[
        "operatorName=tenants",
        "assigner.shardedResources[0]=configmaps.v1",
        "assigner.shardedResources[1].name=widgets.v1.e2e.shardop.dev",
        "assigner.shardedResources[1].clusterScoped=true",
    ];
    let chart = chart_dir();
    let mut lint = vec!["lint", "--strict", chart.to_str().unwrap()];
    lint.extend(set_args(MULTI));
    helm_ok(cluster, &lint);

    // Defaults: DatabaseClusters only, today's names.
    let (_, docs) = render(cluster, "shardop-system", &[]);
    let assigner = find(&docs, "Deployment", "shardop-assigner");
    let args = string_args(container(assigner));
    assert_eq!(
        arg_value(&args, "--operator-name").as_deref(),
        Some("shardop")
    );
    assert_eq!(
        arg_value(&args, "--resource").as_deref(),
        Some("databaseclusters.v1alpha1.shardop.dev")
    );
    let role = find(&docs, "ClusterRole", "shardop-system-shardop-assigner");
    assert_eq!(
        rule_resources(role),
        sharded_rules(&[("shardop.dev", "databaseclusters")])
    );

    // Two kinds of another operator, all namespaces: one ClusterRole with both.
    let (_, docs) = render(cluster, "tenants-system", MULTI);
    let assigner = find(&docs, "Deployment", "shardop-assigner");
    let args = string_args(container(assigner));
    assert_eq!(
        arg_value(&args, "--operator-name").as_deref(),
        Some("tenants")
    );
    let resources: Vec<&String> = args
        .iter()
        .filter(|a| a.starts_with("--resource="))
        .collect();
    assert_eq!(
        resources,
        [
            "--resource=configmaps.v1",
            "--resource=widgets.v1.e2e.shardop.dev"
        ]
    );
    let role = find(&docs, "ClusterRole", "tenants-system-shardop-assigner");
    let both = sharded_rules(&[("", "configmaps"), ("e2e.shardop.dev", "widgets")]);
    assert_eq!(rule_resources(role), both);
    assert!(
        !docs
            .iter()
            .any(|d| d["metadata"]["name"] == "tenants-system-shardop-assigner-cluster-scoped"),
        "all namespaces: the one ClusterRole covers cluster-scoped kinds"
    );
    // The label policy guards the operator's own labels on exactly these kinds.
    let policy = find(
        &docs,
        "ValidatingAdmissionPolicy",
        "tenants-system-shardop-shard-labels",
    );
    let rules: BTreeSet<(String, String)> = policy["spec"]["matchConstraints"]["resourceRules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["apiGroups"][0].as_str().unwrap().to_owned(),
                r["resources"][0].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(rules, both.keys().cloned().collect());
    let variables = policy["spec"]["variables"].to_string();
    assert!(
        variables.contains("'tenants.shardop.dev/shard'"),
        "{variables}"
    );
    assert!(
        variables.contains("'tenants.shardop.dev/drain'"),
        "{variables}"
    );
    assert!(!variables.contains("'shardop.dev/shard'"), "{variables}");

    // Watched namespaces: the namespaced kind in each namespace's Role, the cluster-scoped
    // kind in a ClusterRole of its own.
    let mut sets = MULTI.to_vec();
    sets.push("watchNamespaces={team-a,team-b}");
    let (_, docs) = render(cluster, "tenants-system", &sets);
    for ns in ["team-a", "team-b"] {
        let role = docs
            .iter()
            .find(|d| {
                d["kind"] == "Role"
                    && d["metadata"]["name"] == "shardop-assigner-workload"
                    && d["metadata"]["namespace"] == ns
            })
            .unwrap_or_else(|| panic!("no assigner Role in {ns}"));
        assert_eq!(rule_resources(role), sharded_rules(&[("", "configmaps")]));
    }
    let cluster_scoped = find(
        &docs,
        "ClusterRole",
        "tenants-system-shardop-assigner-cluster-scoped",
    );
    assert_eq!(
        rule_resources(cluster_scoped),
        sharded_rules(&[("e2e.shardop.dev", "widgets")])
    );
    let binding = find(
        &docs,
        "ClusterRoleBinding",
        "tenants-system-shardop-assigner-cluster-scoped",
    );
    assert_eq!(binding["subjects"][0]["name"], "shardop-assigner");
    assert!(
        !docs.iter().any(|d| d["kind"] == "ClusterRole"
            && d["metadata"]["name"] == "tenants-system-shardop-assigner"),
        "no cluster-wide grant of the namespaced kind"
    );

    for bad in [
        "operatorName=Tenants",
        "assigner.shardedResources[0]=widgets",
        "assigner.shardedResources=null",
        "assigner.shardedResources={}",
    ] {
        let output = helm(
            cluster,
            &["template", "shardop", chart.to_str().unwrap(), "--set", bad],
        );
        assert!(!output.status.success(), "{bad} must be rejected");
    }
}
