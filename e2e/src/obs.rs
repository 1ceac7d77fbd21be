//! The observability pipeline of `hack/obs-up.sh` from the tests' side: Prometheus
//! (scrape targets by file discovery, the chart's rules via `hack/obs-rules.sh`, queries and
//! alerts over its HTTP API), prometheus-adapter behind the custom metrics APIService, and
//! the OpenTelemetry collector's exported spans.
//!
//! One pipeline serves every test of a binary: tests keep apart by namespace (targets carry
//! the test's namespace as a label and the chart's rules are rendered per namespace) and by
//! object name (spans).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};

use crate::{Cluster, run_script_with};

/// The running pipeline, as `hack/obs-up.sh` described it in `<obs>/endpoints.env`.
#[derive(Debug, Clone)]
pub struct Observability {
    /// Prometheus' base URL.
    pub prometheus_url: String,
    /// The collector's OTLP/gRPC endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub otlp_endpoint: String,
    /// Where the collector writes the spans it receives (OTLP JSON, one batch a line).
    pub traces_file: PathBuf,
    targets_dir: PathBuf,
    repo_root: PathBuf,
}

static OBSERVABILITY: OnceLock<Result<Observability, String>> = OnceLock::new();

/// Starts (or reuses) the pipeline next to the harness' control plane, once per binary.
pub fn observability(cluster: &Cluster) -> &'static Observability {
    let result = OBSERVABILITY.get_or_init(|| start(cluster).map_err(|e| format!("{e:#}")));
    match result {
        Ok(obs) => obs,
        Err(message) => panic!("the observability pipeline is not available: {message}"),
    }
}

fn start(cluster: &Cluster) -> anyhow::Result<Observability> {
    if cluster.audit_log.is_none() {
        bail!("hack/obs-up.sh runs next to the harness' own control plane, not an attached one");
    }
    run_script_with(&cluster.repo_root, "hack/obs-up.sh", &[], &[])?;
    let cluster_dir = cluster
        .kubeconfig
        .parent()
        .context("the kubeconfig has no directory")?;
    let env_file = cluster_dir.join("obs/endpoints.env");
    let text = std::fs::read_to_string(&env_file)
        .with_context(|| format!("reading {}", env_file.display()))?;
    let values: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    let get = |key: &str| {
        values
            .get(key)
            .map(|v| v.to_string())
            .with_context(|| format!("{} has no {key}", env_file.display()))
    };
    Ok(Observability {
        prometheus_url: get("PROMETHEUS_URL")?,
        otlp_endpoint: get("OTEL_EXPORTER_OTLP_ENDPOINT")?,
        traces_file: get("TRACES_FILE")?.into(),
        targets_dir: get("TARGETS_DIR")?.into(),
        repo_root: cluster.repo_root.clone(),
    })
}

/// A Prometheus scrape target; removed from discovery when dropped.
#[derive(Debug)]
pub struct ScrapeTarget {
    path: PathBuf,
}

impl Drop for ScrapeTarget {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The chart's rules loaded for one namespace; unloaded when dropped.
#[derive(Debug)]
pub struct LoadedRules {
    path: PathBuf,
    prometheus_url: String,
}

impl Drop for LoadedRules {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = curl(&["-X", "POST", &format!("{}/-/reload", self.prometheus_url)]);
    }
}

/// One span the collector exported.
#[derive(Debug, Clone)]
pub struct ExportedSpan {
    /// `service.name` of the process that sent it.
    pub service: String,
    /// The attributes of the resource (the process) that sent it.
    pub resource: BTreeMap<String, String>,
    /// The span name, e.g. `reconcile`.
    pub name: String,
    /// Hex trace id, as in the JSON log lines.
    pub trace_id: String,
    /// String, integer and boolean attributes, rendered as strings.
    pub attributes: BTreeMap<String, String>,
}

impl Observability {
    /// Lets Prometheus scrape `addr` as pod `pod` of `namespace` (the labels a
    /// ServiceMonitor would add, which the chart's rules and adapter rules rely on).
    pub fn scrape(
        &self,
        namespace: &str,
        pod: &str,
        addr: SocketAddr,
    ) -> anyhow::Result<ScrapeTarget> {
        let targets = serde_json::json!([{
            "targets": [addr.to_string()],
            "labels": { "namespace": namespace, "pod": pod },
        }]);
        let path = self.targets_dir.join(format!("{namespace}.{pod}.json"));
        // Written aside and renamed: discovery must never read half a file.
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&targets)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(ScrapeTarget { path })
    }

    /// Renders the chart's PrometheusRule for release namespace `namespace` (with extra
    /// `helm template` arguments) and loads its groups (`hack/obs-rules.sh`).
    pub fn load_chart_rules(
        &self,
        namespace: &str,
        helm_args: &[&str],
    ) -> anyhow::Result<LoadedRules> {
        let mut args = vec![namespace];
        args.extend_from_slice(helm_args);
        let path = run_script_with(&self.repo_root, "hack/obs-rules.sh", &args, &[])?;
        Ok(LoadedRules {
            path: PathBuf::from(path.trim()),
            prometheus_url: self.prometheus_url.clone(),
        })
    }

    /// An instant query: the result vector (`[{"metric": {...}, "value": [t, "v"]}]`).
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let body = curl(&[
            "--data-urlencode",
            &format!("query={promql}"),
            &format!("{}/api/v1/query", self.prometheus_url),
        ])?;
        let response: serde_json::Value = serde_json::from_str(&body)?;
        if response["status"] != "success" {
            bail!("query {promql} failed: {body}");
        }
        Ok(response["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Every pending or firing alert (`/api/v1/alerts`).
    pub fn alerts(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let body = curl(&[&format!("{}/api/v1/alerts", self.prometheus_url)])?;
        let response: serde_json::Value = serde_json::from_str(&body)?;
        Ok(response["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Every span the collector has written so far.
    pub fn exported_spans(&self) -> Vec<ExportedSpan> {
        let text = std::fs::read_to_string(&self.traces_file).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .flat_map(|batch| spans_of_batch(&batch))
            .collect()
    }
}

/// The spans of one OTLP JSON `TracesData` object.
fn spans_of_batch(batch: &serde_json::Value) -> Vec<ExportedSpan> {
    let mut spans = Vec::new();
    for resource_spans in batch["resourceSpans"].as_array().into_iter().flatten() {
        let resource = attributes(&resource_spans["resource"]["attributes"]);
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for scope_spans in resource_spans["scopeSpans"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for span in scope_spans["spans"].as_array().into_iter().flatten() {
                spans.push(ExportedSpan {
                    service: service.clone(),
                    resource: resource.clone(),
                    name: span["name"].as_str().unwrap_or_default().to_owned(),
                    trace_id: span["traceId"].as_str().unwrap_or_default().to_owned(),
                    attributes: attributes(&span["attributes"]),
                });
            }
        }
    }
    spans
}

/// OTLP JSON `KeyValue`s as strings.
fn attributes(list: &serde_json::Value) -> BTreeMap<String, String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| {
            let key = kv["key"].as_str()?.to_owned();
            let value = &kv["value"];
            let text = value["stringValue"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| value["intValue"].as_str().map(str::to_owned))
                .or_else(|| value["intValue"].as_i64().map(|v| v.to_string()))
                .or_else(|| value["boolValue"].as_bool().map(|v| v.to_string()))
                .or_else(|| value["doubleValue"].as_f64().map(|v| v.to_string()))?;
            Some((key, text))
        })
        .collect()
}

fn curl(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .context("running curl")?;
    if !output.status.success() {
        bail!(
            "curl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The value of one instant-vector sample, `NaN` when it does not parse.
pub fn sample_value(sample: &serde_json::Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}
