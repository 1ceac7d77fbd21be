#!/usr/bin/env bash
# shardop installed by its Helm chart on the local control plane, with the binaries run as
# local processes (there is no kubelet, so the chart's pods never start) that authenticate
# as the chart's ServiceAccounts: what RBAC allows them in a real cluster is exactly what
# they can do here.
#
#   hack/demo-chart.sh up [--set k=v ...]  install/upgrade the chart, start the assigner and
#                                          one worker per StatefulSet replica (idempotent)
#   hack/demo-chart.sh scale <N>           kubectl scale the worker StatefulSet to N and
#                                          start/stop worker processes to match (a stand-in
#                                          for the kubelet), then show the shard table
#   hack/demo-chart.sh down                stop the processes (the release stays)
#   hack/demo-chart.sh uninstall           stop the processes and uninstall the release
#
# Each process gets exactly the arguments the chart renders for its pod, except the listen
# addresses (local ports instead of the pod's). Logs and pid files: target/demo/.
# Environment: SHARDOP_DEMO_NAMESPACE (shardop-system), SHARDOP_DEMO_WORKERS (3).
# The control plane is the demo's own (use_demo_cluster in hack/lib.sh); `down` never
# starts it.
#
# Without watchNamespaces the workers serve every namespace, including those of e2e tests
# running on the same control plane; `up --set 'watchNamespaces={ns1,ns2}'` (namespaces
# that exist already) confines them, and shows the namespace-scoped RBAC at work.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib.sh
source "$here/lib.sh"
use_demo_cluster

namespace=${SHARDOP_DEMO_NAMESPACE:-shardop-system}
release=shardop
workers=${SHARDOP_DEMO_WORKERS:-3}
demo_dir="$repo_root/target/demo"
bin="${CARGO_TARGET_DIR:-$repo_root/target}/debug"
log() { echo "demo-chart: $*" >&2; }
case "${1:-}" in
  up | scale | down | uninstall) ;;
  *) die "usage: $0 up [--set k=v ...] | scale <N> | down | uninstall" ;;
esac

# Stops the processes started from pid files matching $1 (a glob below target/demo/):
# SIGTERM, then up to 30 s for them to release their Leases and exit, then SIGKILL.
stop() {
  local pidfile pid pids=() i alive
  for pidfile in "$demo_dir"/$1.pid; do
    [[ -e "$pidfile" ]] || continue
    pid=$(cat "$pidfile")
    # Only our own shardop processes: a stale pid may belong to something else by now.
    if is_shardop "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
    rm -f "$pidfile"
  done
  for ((i = 0; i < 300; i++)); do
    alive=0
    for pid in "${pids[@]}"; do is_shardop "$pid" && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do is_shardop "$pid" && kill -KILL "$pid" 2>/dev/null; done
  return 0
}

is_shardop() { # <pid>: a live (not zombie) shardop process
  local stat
  read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
  stat=${stat##*) }
  [[ "${stat:0:1}" != Z ]] && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q shardop-
}

if [[ "${1:-}" == down ]]; then
  stop 'shardop-*'
  log "stopped (the release stays installed: $0 uninstall removes it)"
  exit 0
fi

bash "$here/cluster-up.sh" >/dev/null
KUBECONFIG="$(cluster_dir)/kubeconfig"
export KUBECONFIG
tools=$("$here/build-tools.sh")
kubectl="$tools/kubectl"
helm="$tools/helm"
mkdir -p "$demo_dir"

running() {
  local pidfile="$demo_dir/$1.pid"
  [[ -e "$pidfile" ]] && [[ -r /proc/$(cat "$pidfile")/cmdline ]] &&
    tr '\0' ' ' <"/proc/$(cat "$pidfile")/cmdline" | grep -q shardop-
}

# A kubeconfig that authenticates with a fresh TokenRequest token of ServiceAccount $1.
service_account_kubeconfig() {
  local sa=$1 file="$demo_dir/$1.kubeconfig" ca="$demo_dir/ca.crt" server token
  server=$("$kubectl" config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')
  "$kubectl" config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' | base64 -d >"$ca"
  token=$("$kubectl" create token "$sa" -n "$namespace" --duration=24h)
  rm -f "$file"
  "$kubectl" --kubeconfig="$file" config set-cluster local --server="$server" --certificate-authority="$ca" --embed-certs=true >/dev/null
  "$kubectl" --kubeconfig="$file" config set-credentials "$sa" --token="$token" >/dev/null
  "$kubectl" --kubeconfig="$file" config set-context "$sa" --cluster=local --user="$sa" --namespace="$namespace" >/dev/null
  "$kubectl" --kubeconfig="$file" config use-context "$sa" >/dev/null
  echo "$file"
}

# The container args the chart rendered for workload $1 (kind/name), one per line, minus
# the listen addresses.
chart_args() {
  "$kubectl" get "$1" -n "$namespace" -o jsonpath='{range .spec.template.spec.containers[0].args[*]}{@}{"\n"}{end}' |
    grep -vE '^--(metrics|health)-addr='
}

# start <pod name> <binary> <kubeconfig> <metrics port> <health port> <workload>
start() {
  local name=$1 binary=$2 kubeconfig=$3 metrics=$4 health=$5 workload=$6 args
  running "$name" && return 0
  [[ -x "$bin/$binary" ]] || die "$bin/$binary is missing: run 'cargo build --bins' (make demo does)"
  mapfile -t args < <(chart_args "$workload")
  POD_NAME=$name KUBECONFIG=$kubeconfig RUST_LOG=${RUST_LOG:-info} setsid "$bin/$binary" "${args[@]}" \
    --metrics-addr="127.0.0.1:$metrics" --health-addr="127.0.0.1:$health" \
    >"$demo_dir/$name.log" 2>&1 </dev/null &
  echo $! >"$demo_dir/$name.pid"
  log "started $name as ServiceAccount $(basename "$kubeconfig" .kubeconfig) (metrics 127.0.0.1:$metrics)"
}

start_workers() {
  local n=$1 kubeconfig=$2 i
  for ((i = 0; i < n; i++)); do
    start "shardop-worker-$i" shardop-worker "$kubeconfig" $((19100 + i)) $((19200 + i)) statefulset/shardop-worker
  done
  # Workers beyond N: SIGTERM, as the StatefulSet controller would delete their pods.
  for pidfile in "$demo_dir"/shardop-worker-*.pid; do
    [[ -e "$pidfile" ]] || continue
    i=${pidfile##*-}; i=${i%.pid}
    ((i >= n)) && stop "shardop-worker-$i"
  done
  return 0
}

case "${1:-}" in
  up)
    shift || true
    # The chart's crds/ are installed by helm on first install; applying them first keeps
    # an upgraded CRD current on later runs (helm never upgrades CRDs).
    if compgen -G "$repo_root/charts/shardop/crds/*.yaml" >/dev/null; then
      "$kubectl" apply --server-side --field-manager=shardop-demo -f "$repo_root/charts/shardop/crds/" >/dev/null
    fi
    # --force-conflicts: `scale` below (like any `kubectl scale`) takes ownership of
    # .spec.replicas; re-running the demo resets it to the demo's worker count.
    log "helm upgrade --install $release charts/shardop -n $namespace --set worker.replicas=$workers $*"
    "$helm" upgrade --install "$release" "$repo_root/charts/shardop" -n "$namespace" --create-namespace \
      --force-conflicts --set "worker.replicas=$workers" "$@" >/dev/null
    worker_config=$(service_account_kubeconfig shardop-worker)
    assigner_config=$(service_account_kubeconfig shardop-assigner)
    replicas=$("$kubectl" get statefulset shardop-worker -n "$namespace" -o jsonpath='{.spec.replicas}')
    start_workers "$replicas" "$worker_config"
    assigners=$("$kubectl" get deployment shardop-assigner -n "$namespace" -o jsonpath='{.spec.replicas}')
    for ((i = 0; i < assigners; i++)); do
      start "shardop-assigner-$i" shardop-assigner "$assigner_config" $((19300 + 2 * i)) $((19301 + 2 * i)) deployment/shardop-assigner
    done
    ;;
  scale)
    [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "usage: $0 scale <N>"
    "$kubectl" scale statefulset shardop-worker -n "$namespace" --replicas="$2" >/dev/null
    start_workers "$2" "$demo_dir/shardop-worker.kubeconfig"
    log "N=$2; the assigner rebalances (about 1/N of the objects move)"
    sleep 5
    "$kubectl" get shards -n "$namespace"
    ;;
  uninstall)
    stop 'shardop-*'
    "$helm" uninstall "$release" -n "$namespace" >/dev/null || true
    log "uninstalled (the CRDs and DatabaseClusters stay; helm never deletes CRDs)"
    ;;
esac
