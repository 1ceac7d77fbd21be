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
