#!/usr/bin/env bash
# The figures of docs/operations.md ("In pods"): on the local node (hack/node-up.sh), the
# chart with 3 workers and OBJECTS DatabaseClusters (default 1000), then
# `kubectl rollout restart` of the workers: its duration until every shard is back at home
# and the assigner's label writes meanwhile (from the audit log; must be 0). The node is
# tainted while it runs so that the DatabaseClusters' pods stay Pending (1,000 database pods
# do not fit a 2-core machine; the shard protocol does not need them); shardop's pods
# tolerate the taint. Cleans up after itself.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib.sh
source "$here/lib.sh"
# shellcheck source=hack/cluster-lib.sh
source "$here/cluster-lib.sh"

objects=${OBJECTS:-1000}
op=measure-op
db=measure-db
bash "$here/node-up.sh" >/dev/null
export KUBECONFIG=$cluster_root/kubeconfig
bin=$(tools_bin_dir)
kubectl=("$bin/kubectl")
taint=shardop.dev/measure
toleration="[{\"key\":\"$taint\",\"operator\":\"Exists\"}]"
now() { date +%s.%N; }
since() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.1f", e - s }'; }

cleanup() {
  "$bin/helm" uninstall shardop -n "$op" --wait >/dev/null 2>&1 || true
  "${kubectl[@]}" delete ns "$db" "$op" --wait=false >/dev/null 2>&1 || true
  "${kubectl[@]}" taint node shardop-node "$taint-" >/dev/null 2>&1 || true
}
trap cleanup EXIT
"${kubectl[@]}" taint node shardop-node "$taint=true:NoSchedule" --overwrite >/dev/null
"${kubectl[@]}" create ns "$op" >/dev/null
"${kubectl[@]}" create ns "$db" >/dev/null
"$bin/helm" install shardop "$repo_root/charts/shardop" -n "$op" -f "$repo_root/target/images/values-local.yaml" \
  --set worker.replicas=3 --set-json "worker.tolerations=$toleration" --set-json "assigner.tolerations=$toleration" \
  --set "watchNamespaces={$db}" --wait --timeout 5m >/dev/null

started=$(now)
for ((i = 0; i < objects; i++)); do
  printf -- '---\napiVersion: shardop.dev/v1alpha1\nkind: DatabaseCluster\nmetadata: {name: db-%d, namespace: %s}\nspec: {replicas: 1, image: shardop.local/db-standin:1, storage: {size: 1Gi}}\n' "$i" "$db"
done | "${kubectl[@]}" apply --server-side -f - >/dev/null
until [[ "$("${kubectl[@]}" get dbc -n "$db" -o jsonpath='{range .items[*]}{.metadata.labels.shardop\.dev/shard}{"/"}{.status.observedGeneration}{"\n"}{end}' | grep -cvE '^/|/$')" == "$objects" ]]; do sleep 2; done
echo "$objects DatabaseClusters assigned and reconciled in $(since "$started") s"

home() {
  local i
  for i in 0 1 2; do
    [[ "$("${kubectl[@]}" get lease -n "$op" "shardop-shard-$i" -o jsonpath='{.spec.holderIdentity}')" == "shardop-worker-$i" ]] || return 1
  done
  "${kubectl[@]}" wait -n "$op" --for=condition=Ready pod/shardop-worker-0 pod/shardop-worker-1 pod/shardop-worker-2 --timeout=1s >/dev/null 2>&1
}
restart_began=$(date -u +%Y-%m-%dT%H:%M:%S)
started=$(now)
"${kubectl[@]}" rollout restart -n "$op" statefulset/shardop-worker >/dev/null
"${kubectl[@]}" rollout status -n "$op" statefulset/shardop-worker --timeout=10m >/dev/null
until home; do sleep 0.5; done
elapsed=$(since "$started")
writes=$(grep "\"namespace\":\"$db\"" "$cluster_root/audit.log" | jq -r --arg t "$restart_began" \
  'select(.stage == "ResponseComplete" and .objectRef.resource == "databaseclusters" and (.objectRef.subresource // "") == ""
          and (.userAgent | startswith("shardop-assigner")) and (.verb == "patch" or .verb == "update")
          and .responseStatus.code < 300 and .requestReceivedTimestamp >= $t) | .objectRef.name' | wc -l)
echo "rollout restart of 3 workers with $objects objects: ${elapsed} s until every shard was back at home; assigner label writes: $writes"
