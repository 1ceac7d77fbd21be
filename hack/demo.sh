#!/usr/bin/env bash
# `make demo`: shardop on the local control plane. Starts the control plane and a local node
# (hack/node-up.sh) and installs the chart, so the assigner and three workers run in pods;
# on a machine that cannot run a node (it says why in one line) the binaries run as local
# processes with the chart's credentials instead (SHARDOP_DEMO_PROCESSES=1 forces that).
# Creates sample DatabaseClusters without shard labels and prints the shard table.
#
# The demo has a control plane of its own (target/demo-cluster, apiserver port 16543; see
# use_demo_cluster in hack/lib.sh), so `make test` and `make demo` coexist.
#
#   hack/demo.sh        start (idempotent) and print the tables
#   hack/demo.sh down   stop the demo's processes and its control plane (only stops
#                       things; idempotent)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib.sh
source "$here/lib.sh"
use_demo_cluster

operator_ns=shardop-system
workers=${SHARDOP_DEMO_WORKERS:-3}

if [[ "${1:-}" == down ]]; then
  bash "$here/demo-chart.sh" down
  bash "$here/cluster-down.sh"
  echo "demo: stopped (operator processes and the demo's control plane in $SHARDOP_CLUSTER_DIR)"
  exit 0
fi

bash "$here/cluster-up.sh"
KUBECONFIG="$(cluster_dir)/kubeconfig"
export KUBECONFIG
kubectl="$("$here/build-tools.sh")/kubectl"

"$kubectl" apply --server-side --field-manager=shardop-demo -f "$repo_root/charts/shardop/crds/" >/dev/null
"$kubectl" wait --for=condition=Established --timeout=30s crd/databaseclusters.shardop.dev crd/shards.shardop.dev >/dev/null
for ns in "$operator_ns" demo-payments demo-search; do
  "$kubectl" create namespace "$ns" --dry-run=client -o yaml | "$kubectl" apply -f - >/dev/null
done

# The operator, installed by its Helm chart. In pods on a local node (hack/node-up.sh) when
# this machine can run one; otherwise its binaries run as local processes with the chart's
# ServiceAccount tokens. The watch list keeps the demo's workers away from any e2e test
# namespaces on the same control plane.
watch_namespaces='watchNamespaces={demo-payments,demo-search}'
node_log="$(cluster_dir)/node-up.out"
mode=pods
db_image=shardop.local/db-standin:1
# Requests that let all 24 stand-in database pods fit a 2-core node.
db_requests='{ cpu: 10m, memory: 16Mi }'
if [[ "${SHARDOP_DEMO_PROCESSES:-}" == 1 ]]; then
  mode=processes
  echo "demo: SHARDOP_DEMO_PROCESSES=1: running shardop as local processes"
elif ! bash "$here/node-up.sh" >"$node_log" 2>&1; then
  mode=processes
  echo "demo: no local node ($(grep -m1 -E 'cannot run a node|error' "$node_log" || tail -n 1 "$node_log"); see $node_log): running shardop as local processes instead"
fi
if [[ "$mode" == pods ]]; then
  echo "demo: shardop in pods on the local node (image from this workspace, never pulled)"
  "$("$here/build-tools.sh")/helm" upgrade --install shardop "$repo_root/charts/shardop" -n "$operator_ns" \
    -f "$repo_root/target/images/values-local.yaml" --set "worker.replicas=$workers" \
    --set "$watch_namespaces" --wait --timeout 5m >/dev/null
else
  db_image=postgres:17
  db_requests='{ cpu: 250m, memory: 256Mi }'
  bash "$here/demo-chart.sh" up --set "$watch_namespaces"
fi

# Sample objects, created without shard labels: the assigner stamps them.
for ns in demo-payments demo-search; do
  for i in 1 2 3 4 5 6; do
    cat <<YAML
---
apiVersion: shardop.dev/v1alpha1
kind: DatabaseCluster
metadata:
  name: ${ns#demo-}-db-$i
  namespace: $ns
  labels:
    shardop.dev/demo: "true"
spec:
  replicas: $(( (i % 3) + 1 ))
  image: $db_image
  resources:
    requests: $db_requests
  storage:
    size: $((i * 5))Gi
    reclaimPolicy: $([[ $((i % 2)) == 0 ]] && echo Delete || echo Retain)
YAML
  done
done | "$kubectl" apply --server-side --field-manager=shardop-demo -f - >/dev/null

echo "demo: waiting for every DatabaseCluster to be assigned and reconciled..."
for _ in $(seq 1 60); do
  pending=$("$kubectl" get dbc -A -l shardop.dev/demo=true -o jsonpath='{range .items[*]}{.metadata.labels.shardop\.dev/shard}{"/"}{.status.observedGeneration}{"\n"}{end}' | grep -cE '^/|/$' || true)
  [[ "$pending" == 0 ]] && break
  sleep 1
done

if [[ "$mode" == pods ]]; then
  echo "demo: waiting for the DatabaseClusters' database pods to become Ready..."
  "$kubectl" wait --for=condition=Available dbc -A -l shardop.dev/demo=true --timeout=300s >/dev/null ||
    echo "demo: some DatabaseClusters are not Available yet (kubectl get pods -A shows why)"
fi

# The shard table's HOLDER and QUEUE columns come from the workers' status reports: wait
# for every shard's first one, so the first table is not half empty.
for _ in $(seq 1 60); do
  unreported=$("$kubectl" get shards -n "$operator_ns" -o jsonpath='{range .items[*]}{.status.holder}{"/"}{.status.queueDepth}{"\n"}{end}' | grep -cE '^/|/$' || true)
  [[ "$unreported" == 0 ]] && break
  sleep 1
done

if [[ "$mode" == pods ]]; then
  echo
  echo "\$ kubectl get pods -n $operator_ns"
  "$kubectl" get pods -n "$operator_ns"
fi
echo
echo "\$ kubectl get shards -n $operator_ns"
"$kubectl" get shards -n "$operator_ns"
echo
echo "\$ kubectl get dbc -A -l shardop.dev/demo=true"
"$kubectl" get dbc -A -l shardop.dev/demo=true
cat <<EOF

The operator keeps running in the background ($([[ "$mode" == pods ]] && echo "pods: $kubectl logs -n $operator_ns shardop-worker-0" || echo "logs: target/demo/*.log")).
  export KUBECONFIG=$KUBECONFIG
  $kubectl get shards -n $operator_ns -w      # watch the shard table
  make demo-down                              # stop the operator and the demo's control plane
EOF
