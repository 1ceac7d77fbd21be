#!/usr/bin/env bash
# Builds the observability pipeline's tools from pinned Go modules through the Go module
# proxy, into the tool cache next to the control plane's, and prints their bin directory on
# stdout. A no-op once they are cached. Nothing downloads a prebuilt binary.
#
#   prometheus          github.com/prometheus/prometheus/cmd/prometheus, with only the
#                       static, file and Kubernetes service discoveries
#   prometheus-adapter  sigs.k8s.io/prometheus-adapter/cmd/adapter
#   otelcol             hack/otelcol: OTLP receiver, file and debug exporters
#
# Each is built inside a wrapper module (hack/prometheus, hack/prometheus-adapter,
# hack/otelcol) whose committed go.mod and go.sum pin it and its dependencies, with
# -mod=readonly, so a build never resolves anything new. (`go install <pkg>@<version>` would
# also ask the proxy for the module's version list to check for deprecation, which a proxy
# may refuse.) The cache key holds every pin and a hash of the wrapper modules
# (hack/lib.sh, obs_tools_bin_dir).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib.sh
source "$here/lib.sh"

require_tool go "Go is needed to build Prometheus, prometheus-adapter and the collector (https://go.dev/doc/install)"

bin_dir=$(obs_tools_bin_dir)
log() { echo "build-obs-tools: $*" >&2; }

export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -trimpath -buildvcs=false"

build() { # <name> <command...>: runs the build into <name>.tmp, then moves it into place
  local name=$1
  shift
  [[ -x "$bin_dir/$name" ]] && return 0
  mkdir -p "$bin_dir"
  local started=$SECONDS
  "$@" >&2 || die "building $name failed"
  mv "$bin_dir/$name.tmp" "$bin_dir/$name"
  log "built $name in $((SECONDS - started)) s"
}

log_start() { [[ -x "$bin_dir/$1" ]] || log "building $1 $2 (first time: several minutes)"; }

# remove_all_sd drops the cloud service discoveries (AWS, Azure, GCE, ...), most of
# Prometheus' dependencies; static and file discovery are always built in.
prometheus_module=$(pinned_version prometheus github.com/prometheus/prometheus)
# Module v0.316.0 is Prometheus 3.16.0, which `prometheus --version` should say.
prometheus_release=$(awk -v v="${prometheus_module#v}" 'BEGIN { split(v, p, "."); printf "%d.%d.%s", p[2] / 100, p[2] % 100, p[3] }')
log_start prometheus "$prometheus_release"
build prometheus env -C "$here/prometheus" GOFLAGS="$GOFLAGS -mod=readonly" \
  go build -tags remove_all_sd,enable_kubernetes_sd \
  -ldflags "-s -w -X github.com/prometheus/common/version.Version=$prometheus_release" \
  -o "$bin_dir/prometheus.tmp" github.com/prometheus/prometheus/cmd/prometheus
log_start prometheus-adapter "$(pinned_version prometheus-adapter sigs.k8s.io/prometheus-adapter)"
build prometheus-adapter env -C "$here/prometheus-adapter" GOFLAGS="$GOFLAGS -mod=readonly" \
  go build -ldflags "-s -w" -o "$bin_dir/prometheus-adapter.tmp" sigs.k8s.io/prometheus-adapter/cmd/adapter
log_start otelcol "$(pinned_version otelcol go.opentelemetry.io/collector/otelcol)"
build otelcol env -C "$here/otelcol" GOFLAGS="$GOFLAGS -mod=readonly" \
  go build -ldflags "-s -w" -o "$bin_dir/otelcol.tmp" .

echo "$bin_dir"
