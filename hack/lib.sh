# Shared helpers for the hack/ scripts. Source it; do not run it.
# shellcheck shell=bash
hack_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$hack_dir/.." && pwd)
# shellcheck source=hack/versions.env
source "$hack_dir/versions.env"

die() { echo "error: $*" >&2; exit 1; }

require_tool() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed: $2"
}

# The cache lives outside the clone so fresh clones and CI runs reuse it.
tools_cache_dir() {
  local base="${SHARDOP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shardop}"
  echo "$base/k8s-$KUBERNETES_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION"
}

tools_bin_dir() { echo "$(tools_cache_dir)/bin"; }

cluster_dir() { echo "${SHARDOP_CLUSTER_DIR:-$repo_root/target/cluster}"; }

# `make demo` runs on a control plane of its own (target/demo-cluster, other ports), so the
# test suite, which starts and finally stops the default one (target/cluster), never pulls
# it from under the demo, and `make demo-down` never touches the tests' cluster.
# SHARDOP_DEMO_CLUSTER_DIR / SHARDOP_DEMO_APISERVER_PORT / SHARDOP_DEMO_ETCD_PORT /
# SHARDOP_DEMO_ETCD_PEER_PORT choose others.
use_demo_cluster() {
  export SHARDOP_CLUSTER_DIR="${SHARDOP_DEMO_CLUSTER_DIR:-$repo_root/target/demo-cluster}"
  export SHARDOP_APISERVER_PORT="${SHARDOP_DEMO_APISERVER_PORT:-16543}"
  export SHARDOP_ETCD_PORT="${SHARDOP_DEMO_ETCD_PORT:-23890}"
  export SHARDOP_ETCD_PEER_PORT="${SHARDOP_DEMO_ETCD_PEER_PORT:-23900}"
  # The demo's node (hack/node-up.sh) gets its own pod range, bridge and kubelet port.
  export SHARDOP_POD_CIDR="${SHARDOP_DEMO_POD_CIDR:-10.245.0.0/24}"
  export SHARDOP_NODE_BRIDGE="${SHARDOP_DEMO_NODE_BRIDGE:-shardop1}"
  export SHARDOP_KUBELET_PORT="${SHARDOP_DEMO_KUBELET_PORT:-10260}"
}

# The node's binaries (hack/build-node.sh) have a cache of their own, keyed by their pins.
node_cache_dir() {
  local base="${SHARDOP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shardop}"
  echo "$base/node-k8s-$KUBERNETES_VERSION-containerd-$CONTAINERD_VERSION"
}

node_bin_dir() { echo "$(node_cache_dir)/bin"; }

# The version hack/<module dir>/go.mod pins for <module path>.
pinned_version() { # <module dir> <module path>
  awk -v m="$2" '$1 == m { print $2; exit }' "$hack_dir/$1/go.mod"
}

# Where hack/build-obs-tools.sh caches Prometheus, prometheus-adapter and the collector. The
# key holds the pins and a hash of the wrapper modules, so changing any of them builds fresh
# binaries.
obs_tools_bin_dir() {
  local base="${SHARDOP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shardop}" key
  key=$(cat "$hack_dir"/{prometheus,prometheus-adapter,otelcol}/go.{mod,sum} "$hack_dir"/otelcol/*.go |
    sha256sum | cut -c1-12)
  echo "$base/obs-prometheus-$(pinned_version prometheus github.com/prometheus/prometheus)-adapter-$(pinned_version prometheus-adapter sigs.k8s.io/prometheus-adapter)-otelcol-$(pinned_version otelcol go.opentelemetry.io/collector/otelcol)-$key/bin"
}
