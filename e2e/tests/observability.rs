//! End-to-end tests of the observability pipeline for real (`hack/obs-up.sh`): Prometheus
//! scraping shardop's processes and evaluating the chart's PrometheusRule groups,
//! prometheus-adapter serving `shardop_queue_depth` through the custom metrics API, the
//! chart's HPA scaling the worker StatefulSet on it, and the OpenTelemetry collector
//! receiving the spans of a worker and the assigner started with the chart's OTel settings.
//!
//! The worker StatefulSet exists as an object only (no kubelet): its controller creates the
//! Pod objects `shardop-worker-<i>`, and the worker processes run under those names, which
//! is what prometheus-adapter needs to answer for `pods/*`.

// Tests fail by panicking; the workspace lints forbid unwrap/expect only in production code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, ListParams, PostParams};
use shardop_api::DatabaseCluster;
use shardop_api::constants::SHARD_LABEL;
use shardop_e2e::obs::{Observability, observability, sample_value};
use shardop_e2e::process::{FAST_LEASES, ShardopProcess};
use shardop_e2e::test_env::TestEnv;
use shardop_e2e::{Cluster, valid_spec, wait_for};

/// The test's cluster and namespaces, a worker StatefulSet, and the observability stack.
struct Env {
    base: TestEnv,
    obs: &'static Observability,
}

impl std::ops::Deref for Env {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.base
    }
}

impl Env {
    /// Namespaces of its own, and a worker StatefulSet of `shards` replicas (the assigner's
    /// N; its controller creates the Pod objects, one at a time, that never run).
    async fn new(test: &'static str, shards: i32) -> Self {
        let base = TestEnv::with_worker_stateful_set(test, shards).await;
        Self {
            obs: observability(base.cluster),
            base,
        }
    }

    fn worker(&self, ordinal: u32, extra: &[&str], env: &[(String, String)]) -> ShardopProcess {
        let mut spec = self
            .worker_spec(ordinal)
            .args(FAST_LEASES)
            .args(extra.iter().copied());
        for (key, value) in env {
            spec = spec.env(key, value);
        }
        spec.spawn(self.cluster).unwrap()
    }

    fn assigner(&self, env: &[(String, String)]) -> ShardopProcess {
        let mut spec = self
            .assigner_spec("shardop-assigner-0")
            .arg("--status-interval")
            .arg("1s");
        for (key, value) in env {
            spec = spec.env(key, value);
        }
        spec.spawn(self.cluster).unwrap()
    }

    /// `count` objects named `<prefix>-<i>`, unlabelled (the assigner places them).
    async fn create_objects(&self, prefix: &str, count: usize) {
        let api: Api<DatabaseCluster> = Api::namespaced(self.client.clone(), &self.objects.name);
        for i in 0..count {
            let manifest =
                shardop_e2e::database_cluster_json(&format!("{prefix}-{i}"), valid_spec(1));
            let object: DatabaseCluster = serde_json::from_value(manifest).unwrap();
            api.create(&PostParams::default(), &object).await.unwrap();
        }
    }

    /// Waits until every object carries a shard label and its status says it converged.
    async fn wait_converged(&self, count: usize, timeout: Duration) {
        let api: Api<DatabaseCluster> = Api::namespaced(self.client.clone(), &self.objects.name);
        wait_for("every object converged", timeout, || async {
            let list = api.list(&ListParams::default()).await.ok()?;
            (list.items.len() == count
                && list.items.iter().all(|o| {
                    o.metadata
                        .labels
                        .as_ref()
                        .is_some_and(|l| l.contains_key(SHARD_LABEL))
                        && o.status
                            .as_ref()
                            .is_some_and(|s| s.observed_generation == o.metadata.generation)
                }))
            .then_some(())
        })
        .await
        .unwrap();
    }

    /// Samples of `promql` (an instant query), once it has at least one.
    async fn wait_samples(&self, what: &str, promql: &str) -> Vec<serde_json::Value> {
        wait_for(what, Duration::from_secs(90), || async {
            let samples = self.obs.query(promql).ok()?;
            (!samples.is_empty()).then_some(samples)
        })
        .await
        .unwrap()
    }

    /// The alerts named `name` on this test's namespace, in `state` (pending or firing).
    fn alerts(&self, name: &str, state: &str) -> Vec<serde_json::Value> {
        self.obs
            .alerts()
            .unwrap()
            .into_iter()
            .filter(|a| {
                a["labels"]["alertname"] == name
                    && a["labels"]["namespace"] == self.operator.name.as_str()
                    && a["state"] == state
            })
            .collect()
    }
}

#[tokio::test]
async fn the_charts_rules_record_and_a_shard_without_holder_fires_once_its_worker_stays_dead() {
    let env = Env::new("obs-rules", 1).await;
    let assigner = env.assigner(&[]);
    let mut worker = env.worker(0, &[], &[]);
    let ns = env.operator.name.clone();
    let _targets = [
        env.obs
            .scrape(
                &ns,
                "shardop-assigner-0",
                assigner.metrics_addr().await.unwrap(),
            )
            .unwrap(),
        env.obs
            .scrape(
                &ns,
                "shardop-worker-0",
                worker.metrics_addr().await.unwrap(),
            )
            .unwrap(),
    ];
    // The chart's alert `for` is 2 m (longer than a normal failover); the chart value makes
    // it short here, the expression is the chart's own.
    let _rules = env
        .obs
        .load_chart_rules(&ns, &["--set", "prometheusRule.shardWithoutHolder.for=6s"])
        .unwrap();

    env.create_objects("first", 5).await;
    env.wait_converged(5, Duration::from_secs(90)).await;
    // The lag histogram now exists in Prometheus; a second batch makes its rate non-zero,
    // so the recording rule has a ratio to record, not 0/0.
    env.wait_samples(
        "the worker's lag histogram in Prometheus",
        &format!("shardop_reconcile_lag_seconds_count{{namespace=\"{ns}\"}} > 0"),
    )
    .await;
    env.create_objects("second", 5).await;
    env.wait_converged(10, Duration::from_secs(90)).await;
    let recorded = wait_for(
        "a finite sample of the lag SLO recording rule",
        Duration::from_secs(90),
        || async {
            let samples = env
                .obs
                .query(&format!(
                    "shardop:reconcile_lag_slo_errors:ratio_rate5m{{namespace=\"{ns}\"}}"
                ))
                .ok()?;
            samples.iter().map(sample_value).find(|v| v.is_finite())
        },
    )
    .await
    .unwrap();
    eprintln!("shardop:reconcile_lag_slo_errors:ratio_rate5m = {recorded}");
    assert!((0.0..=1.0).contains(&recorded), "a ratio: {recorded}");

    // While the worker holds shard 0 the alert's condition is false.
    env.wait_samples(
        "the worker's Lease in Prometheus",
        &format!("shardop_shard_leader{{namespace=\"{ns}\",shard=\"0\"}} == 1"),
    )
    .await;
    env.wait_samples(
        "the assigner's object count of shard 0",
        &format!("shardop_assigner_shard_objects{{namespace=\"{ns}\",shard=\"0\"}} > 0"),
    )
    .await;
    // (Polled: an evaluation from before the worker's first scrape may still show pending.)
    wait_for(
        "ShardopShardWithoutHolder inactive while the worker holds shard 0",
        Duration::from_secs(60),
        || async {
            (env.alerts("ShardopShardWithoutHolder", "pending")
                .is_empty()
                && env.alerts("ShardopShardWithoutHolder", "firing").is_empty())
            .then_some(())
        },
    )
    .await
    .unwrap();

    // The only worker dies and stays dead: nobody can take shard 0 over.
    worker.kill_9().unwrap();
    let firing = wait_for(
        "ShardopShardWithoutHolder firing",
        Duration::from_secs(120),
        || async {
            let firing = env.alerts("ShardopShardWithoutHolder", "firing");
            (!firing.is_empty()).then_some(firing)
        },
    )
    .await
    .unwrap();
    assert_eq!(firing[0]["labels"]["shard"], "0", "{firing:?}");
    assert_eq!(firing[0]["labels"]["severity"], "critical", "{firing:?}");
    let value: f64 = firing[0]["value"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        value, 10.0,
        "the alert's value is shard 0's object count: {firing:?}"
    );
}

/// A `resource.Quantity` as the custom metrics API writes a value: `12` or `12500m`.
fn quantity(value: &str) -> f64 {
    match value.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().unwrap() / 1000.0,
        None => value.parse().unwrap(),
    }
}

#[tokio::test]
async fn the_custom_metrics_api_serves_each_worker_pods_queue_depth() {
    let env = Env::new("obs-adapter", 1).await;
    let ns = env.operator.name.clone();
    // The Pod object the StatefulSet controller creates: what the adapter maps a series'
    // `pod` label to, and lists for `pods/*`.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(env.client.clone(), &ns);
    wait_for("Pod shardop-worker-0", Duration::from_secs(60), || async {
        pods.get_opt("shardop-worker-0").await.ok()?
    })
    .await
    .unwrap();
    let _assigner = env.assigner(&[]);
    // One reconcile at a time at 5 requests/s: a backlog that lasts tens of seconds.
    let worker = env.worker(
        0,
        &["--concurrency", "1", "--kube-qps", "5", "--kube-burst", "5"],
        &[],
    );
    let _target = env
        .obs
        .scrape(
            &ns,
            "shardop-worker-0",
            worker.metrics_addr().await.unwrap(),
        )
        .unwrap();

    let path =
        format!("/apis/custom.metrics.k8s.io/v1beta1/namespaces/{ns}/pods/*/shardop_queue_depth");
    let read = || -> Option<f64> {
        let body = env.cluster.kubectl_ok(&["get", "--raw", &path]).ok()?;
        let list: serde_json::Value = serde_json::from_str(&body).ok()?;
        let item = list["items"]
            .as_array()?
            .iter()
            .find(|i| i["describedObject"]["name"] == "shardop-worker-0")?;
        assert_eq!(item["describedObject"]["kind"], "Pod", "{item}");
        assert_eq!(item["metricName"], "shardop_queue_depth", "{item}");
        Some(quantity(item["value"].as_str()?))
    };
    // Served once Prometheus has scraped the worker and the adapter listed the series.
    wait_for(
        "shardop_queue_depth of shardop-worker-0",
        Duration::from_secs(90),
        || async { read() },
    )
    .await
    .unwrap();

    env.create_objects("db", 40).await;
    let busiest = wait_for(
        "a non-zero queue depth through the custom metrics API",
        Duration::from_secs(120),
        || async { read().filter(|depth| *depth > 0.0) },
    )
    .await
    .unwrap();
    eprintln!("queue depth of shardop-worker-0 through custom.metrics.k8s.io: {busiest}");
    env.wait_converged(40, Duration::from_secs(240)).await;
    wait_for(
        "the queue depth back at 0 once everything converged",
        Duration::from_secs(60),
        || async { read().filter(|depth| *depth == 0.0) },
    )
    .await
    .unwrap();
}

/// The `OTEL_*` and `RUST_LOG` environment the chart gives the container of `kind` (the
/// worker StatefulSet or the assigner Deployment) when its OTel values are set.
fn chart_otel_env(
    cluster: &Cluster,
    namespace: &str,
    endpoint: &str,
    kind: &str,
) -> Vec<(String, String)> {
    let helm = cluster
        .kubectl
        .parent()
        .map(|dir| dir.join("helm"))
        .unwrap_or_else(|| PathBuf::from("helm"));
    let output = Command::new(helm)
        .current_dir(&cluster.repo_root)
        .args([
            "template",
            "shardop",
            "charts/shardop",
            "--namespace",
            namespace,
        ])
        .args(["--set", &format!("otel.endpoint={endpoint}")])
        .args([
            "--set",
            &format!("otel.resourceAttributes=shardop.test={namespace}"),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let manifest = serde_yaml::Deserializer::from_str(&text)
        .filter_map(|doc| serde::Deserialize::deserialize(doc).ok())
        .find(|doc: &serde_json::Value| doc["kind"] == kind)
        .unwrap_or_else(|| panic!("the chart renders no {kind}"));
    let env = manifest["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let picked: Vec<(String, String)> = env
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .filter(|(name, _)| name.starts_with("OTEL_") || name == "RUST_LOG")
        .collect();
    assert!(
        picked
            .iter()
            .any(|(name, value)| name == "OTEL_EXPORTER_OTLP_ENDPOINT" && value == endpoint),
        "the chart's {kind} exports to the collector: {picked:?}"
    );
    picked
}

/// The JSON log lines of `process` whose message is `message`.
fn log_lines(process: &ShardopProcess, message: &str) -> Vec<serde_json::Value> {
    process
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["fields"]["message"] == message)
        .collect()
}

#[tokio::test]
async fn a_span_per_reconcile_reaches_the_collector_with_the_trace_id_of_its_log_line() {
    let env = Env::new("obs-otel", 1).await;
    let ns = env.operator.name.clone();
    let endpoint = env.obs.otlp_endpoint.clone();
    let worker_env = chart_otel_env(env.cluster, &ns, &endpoint, "StatefulSet");
    let assigner_env = chart_otel_env(env.cluster, &ns, &endpoint, "Deployment");
    let mut assigner = env.assigner(&assigner_env);
    let mut worker = env.worker(0, &[], &worker_env);

    env.create_objects("db", 3).await;
    env.wait_converged(3, Duration::from_secs(90)).await;
    // A deletion: its cleanup reconcile logs inside the reconcile span.
    let api: Api<DatabaseCluster> = Api::namespaced(env.client.clone(), &env.objects.name);
    api.delete("db-0", &Default::default()).await.unwrap();
    let cleanup = wait_for(
        "the cleanup's log line",
        Duration::from_secs(60),
        || async {
            log_lines(&worker, "cleanup finished, finalizer removed")
                .into_iter()
                .next()
        },
    )
    .await
    .unwrap();
    let trace_id = cleanup["trace_id"]
        .as_str()
        .expect("a trace id in the log line")
        .to_owned();

    // Every reconcile, by the worker's own count, once the count has settled (the
    // controller manager's StatefulSet status writes still trigger a few reconciles after
    // convergence); SIGTERM then flushes the exporter.
    let metrics_addr = worker.metrics_addr().await.unwrap();
    let reconcile_count = || async {
        let text = shardop_e2e::metrics::scrape(metrics_addr).await.ok()?;
        Some(shardop_e2e::metrics::metric_value(
            &text,
            "shardop_reconcile_duration_seconds_count",
            &[],
        ))
    };
    let reconciles = wait_for(
        "a settled reconcile count",
        Duration::from_secs(90),
        || async {
            let before = reconcile_count().await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            let after = reconcile_count().await?;
            (before == after).then_some(after)
        },
    )
    .await
    .unwrap();
    worker.terminate(Duration::from_secs(30)).unwrap();
    assigner.terminate(Duration::from_secs(30)).unwrap();

    let prefix = format!("{}/", env.objects.name);
    let ours = |span: &&shardop_e2e::obs::ExportedSpan| {
        span.attributes
            .get("object")
            .is_some_and(|o| o.starts_with(&prefix))
    };
    let spans = wait_for(
        "the worker's reconcile spans",
        Duration::from_secs(30),
        || async {
            let spans: Vec<_> = env
                .obs
                .exported_spans()
                .into_iter()
                .filter(|s| s.service == "shardop-worker" && s.name == "reconcile")
                .filter(|s| ours(&s))
                .collect();
            (spans.len() as f64 >= reconciles).then_some(spans)
        },
    )
    .await
    .unwrap();
    assert_eq!(spans.len() as f64, reconciles, "one span per reconcile");
    for span in &spans {
        assert_eq!(
            span.attributes.get("shard").map(String::as_str),
            Some("0"),
            "{span:?}"
        );
        assert!(span.attributes.contains_key("result"), "{span:?}");
    }
    let cleanup_span = spans
        .iter()
        .find(|s| s.trace_id == trace_id)
        .unwrap_or_else(|| panic!("no exported span has the log line's trace id {trace_id}"));
    assert_eq!(
        cleanup_span.attributes.get("object"),
        Some(&format!("{}/db-0", env.objects.name))
    );
    assert_eq!(
        cleanup_span.resource.get("shardop.test"),
        Some(&ns),
        "the chart's otel.resourceAttributes: {cleanup_span:?}"
    );

    // Each process flushed on SIGTERM; the collector writes its file every second.
    let assigner_spans = wait_for(
        "the assigner's label_write spans",
        Duration::from_secs(30),
        || async {
            let spans: Vec<_> = env
                .obs
                .exported_spans()
                .into_iter()
                .filter(|s| s.service == "shardop-assigner" && s.name == "label_write")
                .filter(|s| ours(&s))
                .collect();
            // One assignment per object.
            (spans.len() >= 3).then_some(spans)
        },
    )
    .await
    .unwrap();
    for span in &assigner_spans {
        assert_eq!(
            span.attributes.get("shard").map(String::as_str),
            Some("0"),
            "{span:?}"
        );
        assert_eq!(
            span.attributes.get("result").map(String::as_str),
            Some("applied"),
            "{span:?}"
        );
    }
}

/// What a kubelet would report for a started pod: the HPA only counts Running pods (there
/// is no kubelet here; the worker process plays the pod's container).
async fn mark_running(pods: &Api<k8s_openapi::api::core::v1::Pod>, name: &str) {
    let status = serde_json::json!({ "status": {
        "phase": "Running",
        "conditions": [{ "type": "Ready", "status": "True" }],
    }});
    pods.patch_status(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&status),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn the_charts_hpa_scales_the_workers_up_on_queue_depth_read_through_the_adapter() {
    let env = Env::new("obs-hpa", 1).await;
    let ns = env.operator.name.clone();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(env.client.clone(), &ns);
    wait_for("Pod shardop-worker-0", Duration::from_secs(60), || async {
        pods.get_opt("shardop-worker-0").await.ok()?
    })
    .await
    .unwrap();
    mark_running(&pods, "shardop-worker-0").await;
    let assigner = env.assigner(&[]);
    let worker = env.worker(
        0,
        &["--concurrency", "1", "--kube-qps", "5", "--kube-burst", "5"],
        &[],
    );
    let _target = env
        .obs
        .scrape(
            &ns,
            "shardop-worker-0",
            worker.metrics_addr().await.unwrap(),
        )
        .unwrap();

    // The chart's HPA, with a low target and no scale-up stabilization so that the test
    // does not wait out the production windows; the metric and the target are the chart's.
    let helm = env.cluster.kubectl.parent().unwrap().join("helm");
    let output = Command::new(helm)
        .current_dir(&env.cluster.repo_root)
        .args(["template", "shardop", "charts/shardop", "--namespace", &ns])
        .args(["--show-only", "templates/hpa.yaml"])
        .args(["--set", "worker.autoscaling.enabled=true"])
        .args(["--set", "worker.autoscaling.minReplicas=1"])
        .args(["--set", "worker.autoscaling.maxReplicas=2"])
        .args(["--set-string", "worker.autoscaling.targetQueueDepth=2"])
        .args([
            "--set",
            "worker.autoscaling.behavior.scaleUp.stabilizationWindowSeconds=0",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let applied = env
        .cluster
        .kubectl_with_input(
            &["-n", &ns, "apply", "-f", "-"],
            &String::from_utf8(output.stdout).unwrap(),
        )
        .unwrap();
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );

    env.create_objects("db", 40).await;
    let hpas: Api<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler> =
        Api::namespaced(env.client.clone(), &ns);
    let seen = wait_for(
        "the HPA reading a non-zero shardop_queue_depth",
        Duration::from_secs(120),
        || async {
            let hpa = hpas.get("shardop-worker").await.ok()?;
            let metric = hpa.status?.current_metrics?.into_iter().next()?.pods?;
            let value = quantity(&metric.current.average_value?.0);
            (value > 0.0).then_some(value)
        },
    )
    .await
    .unwrap();
    eprintln!("the HPA saw an average shardop_queue_depth of {seen}");
    let stateful_sets: Api<StatefulSet> = Api::namespaced(env.client.clone(), &ns);
    wait_for(
        "the HPA scaling the worker StatefulSet to 2",
        Duration::from_secs(120),
        || async {
            let sts = stateful_sets.get("shardop-worker").await.ok()?;
            (sts.spec?.replicas == Some(2)).then_some(())
        },
    )
    .await
    .unwrap();
    // The assigner follows: two shards desired.
    let assigner_metrics = assigner.metrics_addr().await.unwrap();
    wait_for(
        "the assigner expanding to 2 shards",
        Duration::from_secs(60),
        || async {
            let text = shardop_e2e::metrics::scrape(assigner_metrics).await.ok()?;
            let desired =
                shardop_e2e::metrics::metric_value(&text, "shardop_assigner_desired_shards", &[]);
            (desired == 2.0).then_some(())
        },
    )
    .await
    .unwrap();
}
