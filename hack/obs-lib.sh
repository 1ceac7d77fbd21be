# Helpers shared by hack/obs-up.sh, hack/obs-rules.sh and hack/obs-down.sh. Source it after
# lib.sh and cluster-lib.sh: the observability stack belongs to one local control plane and
# keeps its state and logs in <cluster dir>/obs, its pid files next to the control plane's
# (cluster-lib.sh's pid_file, running_pid and stop_component work for its components too).
# shellcheck shell=bash
# The variables below are used by the scripts that source this file.
# shellcheck disable=SC2034

# In start order; obs-down stops them in reverse.
obs_components=(prometheus otelcol prometheus-adapter)

obs_dir="$cluster_root/obs"
prometheus_port="${SHARDOP_PROMETHEUS_PORT:-19090}"
adapter_port="${SHARDOP_ADAPTER_PORT:-19443}"
otlp_grpc_port="${SHARDOP_OTLP_GRPC_PORT:-14317}"
otlp_http_port="${SHARDOP_OTLP_HTTP_PORT:-14318}"
# Where the custom metrics APIService points: a Service of type ExternalName (localhost).
obs_namespace=shardop-observability

prometheus_url() { echo "http://127.0.0.1:$prometheus_port"; }

# Asks Prometheus to re-read its configuration and rule files (--web.enable-lifecycle).
prometheus_reload() {
  curl -fsS --max-time 10 -X POST "$(prometheus_url)/-/reload" >/dev/null ||
    die "Prometheus at $(prometheus_url) did not accept the reload; see $obs_dir/prometheus.log"
}
