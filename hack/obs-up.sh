#!/usr/bin/env bash
# Starts the observability pipeline next to the local control plane (hack/cluster-up.sh),
# as local processes on 127.0.0.1, built by hack/build-obs-tools.sh:
#
#   prometheus          scrapes the targets listed in <obs>/targets/*.json (file discovery:
#                       write a file, Prometheus picks it up within seconds), evaluates the
#                       rule files <obs>/rules/*.yaml (hack/obs-rules.sh renders the chart's).
#   otelcol             receives OTLP (gRPC and HTTP) and appends every span it receives
#                       to <obs>/traces.jsonl (OTLP JSON, one line per batch).
#   prometheus-adapter  serves custom.metrics.k8s.io from Prometheus with the chart's
#                       prometheus-adapter rules; registered as the APIService
#                       v1beta1.custom.metrics.k8s.io through a Service of type ExternalName
#                       (localhost): Endpoints and EndpointSlices refuse loopback addresses,
#                       an ExternalName Service does not need one.
#
# <obs> is <cluster dir>/obs (target/cluster/obs by default). Idempotent: what runs is left
# alone. Starts the control plane first when it is not running. hack/obs-down.sh (and
# hack/cluster-down.sh) stop it.
#
# Environment (besides cluster-up.sh's SHARDOP_CLUSTER_DIR and ports):
#   SHARDOP_PROMETHEUS_PORT   (19090)  Prometheus' HTTP port
#   SHARDOP_ADAPTER_PORT      (19443)  prometheus-adapter's HTTPS port
#   SHARDOP_OTLP_GRPC_PORT    (14317)  the collector's OTLP/gRPC port
#   SHARDOP_OTLP_HTTP_PORT    (14318)  the collector's OTLP/HTTP port
#   SHARDOP_PROMETHEUS_INTERVAL (2s)   scrape and rule evaluation interval
#   SHARDOP_OBS_LISTEN_ADDRESS (127.0.0.1) where the collector's OTLP receivers listen, e.g.
#                                     a node bridge's address that pods can reach
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib.sh
source "$here/lib.sh"
# shellcheck source=hack/cluster-lib.sh
source "$here/cluster-lib.sh"
# shellcheck source=hack/obs-lib.sh
source "$here/obs-lib.sh"

require_tool curl "curl probes the tools' readiness endpoints (apt-get install curl)"
require_tool openssl "openssl issues prometheus-adapter's serving certificate (apt-get install openssl)"

log() { echo "obs-up: $*" >&2; }
started=$SECONDS

"$here/cluster-up.sh" >/dev/null
tools=$("$here/build-tools.sh")
obs_bin=$("$here/build-obs-tools.sh")
kubeconfig="$cluster_root/kubeconfig"
pki="$cluster_root/pki"
interval="${SHARDOP_PROMETHEUS_INTERVAL:-2s}"
otlp_address="${SHARDOP_OBS_LISTEN_ADDRESS:-127.0.0.1}"
mkdir -p "$obs_dir/targets" "$obs_dir/rules"
# Serialises concurrent obs-up runs (parallel tests); spawn closes the fd in the children.
exec 8>"$obs_dir/.lock"
flock 8

port_in_use() { (: <>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Like cluster-up.sh's spawn: detached (setsid), inherited descriptors closed, pid file.
spawn() { # <component> <"ports it listens on"> <binary args...>
  local component=$1 ports=$2 log_file="$obs_dir/$1.log" fd port
  shift 2
  for port in $ports; do
    port_in_use "$port" && die "127.0.0.1:$port (for $component) is already in use;" \
      "pick another with SHARDOP_PROMETHEUS_PORT / SHARDOP_ADAPTER_PORT / SHARDOP_OTLP_*_PORT"
  done
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) started by hack/obs-up.sh: $*" >"$log_file"
  (
    for fd in /proc/"$BASHPID"/fd/*; do
      fd=${fd##*/}
      if ((fd > 2)); then eval "exec $fd>&-"; fi
    done
    exec setsid "$@" </dev/null >>"$log_file" 2>&1
  ) &
  echo "$!" >"$(pid_file "$component")"
  log "started $component (pid $!), log: $log_file"
}

wait_for() { # <what> <component> <command...>
  local what=$1 component=$2 deadline=$((SECONDS + ${SHARDOP_OBS_TIMEOUT:-60})) pid
  shift 2
  until "$@"; do
    pid=$(cat "$(pid_file "$component")" 2>/dev/null) || true
    if [[ -z "$pid" ]] || process_gone "$pid"; then
      tail -n 25 "$obs_dir/$component.log" >&2
      die "$component exited before $what; see $obs_dir/$component.log"
    fi
    ((SECONDS < deadline)) || die "timed out waiting for $what; see $obs_dir/$component.log"
    sleep 0.3
  done
}

start_prometheus() {
  cat >"$obs_dir/prometheus.yml" <<YAML
# Written by hack/obs-up.sh.
global:
  scrape_interval: $interval
  scrape_timeout: $interval
  evaluation_interval: $interval
rule_files:
  - $obs_dir/rules/*.yaml
scrape_configs:
  # Targets: [{"targets": ["127.0.0.1:<port>"], "labels": {"namespace": ..., "pod": ...}}].
  # The labels are the ones a ServiceMonitor would set; the chart's rules and
  # prometheus-adapter's rules need namespace and pod.
  - job_name: shardop
    file_sd_configs:
      - files: ["$obs_dir/targets/*.json"]
        refresh_interval: 2s
YAML
  spawn prometheus "$prometheus_port" "$obs_bin/prometheus" \
    --config.file="$obs_dir/prometheus.yml" \
    --storage.tsdb.path="$obs_dir/prometheus-data" \
    --storage.tsdb.retention.time=1d \
    --web.listen-address="127.0.0.1:$prometheus_port" \
    --web.enable-lifecycle
}

start_otelcol() {
  cat >"$obs_dir/otelcol.yaml" <<YAML
# Written by hack/obs-up.sh.
receivers:
  otlp:
    protocols:
      grpc: { endpoint: "$otlp_address:$otlp_grpc_port" }
      http: { endpoint: "$otlp_address:$otlp_http_port" }
exporters:
  file:
    path: $obs_dir/traces.jsonl
    flush_interval: 1s
service:
  # No metrics endpoint of its own (it would take port 8888).
  telemetry:
    metrics: { level: none }
  pipelines:
    traces: { receivers: [otlp], exporters: [file] }
YAML
  spawn otelcol "$otlp_grpc_port $otlp_http_port" "$obs_bin/otelcol" --config="$obs_dir/otelcol.yaml"
}

# Serving certificate signed by the cluster CA, for the name the aggregator checks
# (<service>.<namespace>.svc), so the APIService verifies it with caBundle.
adapter_certificate() {
  local cert="$obs_dir/adapter.crt" key="$obs_dir/adapter.key"
  if [[ -s "$cert" ]] && openssl verify -CAfile "$pki/ca.crt" "$cert" >/dev/null 2>&1; then
    return
  fi
  openssl req -new -newkey rsa:2048 -nodes -subj "/CN=prometheus-adapter" -keyout "$key" \
    -out "$obs_dir/adapter.csr" -config <(printf '%s\n' '[req]' 'distinguished_name=dn' '[dn]') 2>/dev/null
  openssl x509 -req -in "$obs_dir/adapter.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 825 -sha256 -out "$cert" \
    -extfile <(printf '%s\n' 'basicConstraints=critical,CA:FALSE' \
      'keyUsage=critical,digitalSignature,keyEncipherment' 'extendedKeyUsage=serverAuth' \
      "subjectAltName=DNS:prometheus-adapter.$obs_namespace.svc,DNS:localhost,IP:127.0.0.1") 2>/dev/null ||
    die "could not issue prometheus-adapter's certificate"
  rm -f "$obs_dir/adapter.csr"
}

# The chart's prometheus-adapter rules: the ConfigMap's config.yaml, four spaces less indented.
adapter_config() {
  "$tools/helm" template shardop "$repo_root/charts/shardop" \
    --set prometheusAdapter.rulesConfigMap=true --show-only templates/prometheus-adapter-rules.yaml |
    awk 'found { print substr($0, 5) } /^  config.yaml: \|$/ { found = 1 }' >"$obs_dir/adapter-config.yaml"
  grep -q '^rules:$' "$obs_dir/adapter-config.yaml" || die "no rules in the chart's prometheus-adapter ConfigMap"
}

start_adapter() {
  adapter_certificate
  adapter_config
  spawn prometheus-adapter "$adapter_port" "$obs_bin/prometheus-adapter" \
    --secure-port="$adapter_port" \
    --bind-address=127.0.0.1 \
    --tls-cert-file="$obs_dir/adapter.crt" \
    --tls-private-key-file="$obs_dir/adapter.key" \
    --lister-kubeconfig="$kubeconfig" \
    --authentication-kubeconfig="$kubeconfig" \
    --authorization-kubeconfig="$kubeconfig" \
    --prometheus-url="$(prometheus_url)/" \
    --metrics-relist-interval=5s \
    --config="$obs_dir/adapter-config.yaml"
}

register_adapter() {
  "$tools/kubectl" --kubeconfig "$kubeconfig" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata:
  name: $obs_namespace
---
apiVersion: v1
kind: Service
metadata:
  name: prometheus-adapter
  namespace: $obs_namespace
spec:
  type: ExternalName
  externalName: localhost
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: v1beta1.custom.metrics.k8s.io
spec:
  group: custom.metrics.k8s.io
  version: v1beta1
  groupPriorityMinimum: 100
  versionPriority: 100
  service:
    name: prometheus-adapter
    namespace: $obs_namespace
    port: $adapter_port
  caBundle: $(base64 -w0 <"$pki/ca.crt")
YAML
}

prometheus_ready() { curl -fsS --max-time 2 "$(prometheus_url)/-/ready" >/dev/null 2>&1; }
otelcol_ready() { (: <>"/dev/tcp/$otlp_address/$otlp_grpc_port") 2>/dev/null; }
apiservice_available() {
  [[ "$("$tools/kubectl" --kubeconfig "$kubeconfig" get apiservice v1beta1.custom.metrics.k8s.io \
    -o 'jsonpath={.status.conditions[?(@.type=="Available")].status}' 2>/dev/null)" == True ]]
}

[[ -n "$(running_pid prometheus)" ]] || start_prometheus
[[ -n "$(running_pid otelcol)" ]] || start_otelcol
wait_for "Prometheus to become ready" prometheus prometheus_ready
[[ -n "$(running_pid prometheus-adapter)" ]] || start_adapter
register_adapter
wait_for "the collector's OTLP ports" otelcol otelcol_ready
wait_for "the APIService v1beta1.custom.metrics.k8s.io to become Available" prometheus-adapter apiservice_available

# For scripts and tests that use the pipeline (e2e/src/obs.rs reads it).
cat >"$obs_dir/endpoints.env" <<EOF
PROMETHEUS_URL=$(prometheus_url)
OTEL_EXPORTER_OTLP_ENDPOINT=http://$otlp_address:$otlp_grpc_port
OTEL_EXPORTER_OTLP_HTTP_ENDPOINT=http://$otlp_address:$otlp_http_port
TRACES_FILE=$obs_dir/traces.jsonl
TARGETS_DIR=$obs_dir/targets
EOF

cat <<EOF
observability pipeline is ready ($((SECONDS - started)) s)
  prometheus:  $(prometheus_url)   targets: $obs_dir/targets/*.json, rules: $obs_dir/rules/*.yaml
  otelcol:     OTLP grpc $otlp_address:$otlp_grpc_port, http $otlp_address:$otlp_http_port -> $obs_dir/traces.jsonl
  adapter:     https://127.0.0.1:$adapter_port (APIService v1beta1.custom.metrics.k8s.io)
  logs:        $obs_dir/{prometheus,otelcol,prometheus-adapter}.log
EOF
