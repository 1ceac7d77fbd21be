#!/usr/bin/env bash
# Stops what hack/obs-up.sh started (Prometheus, the collector, prometheus-adapter) and
# removes the custom metrics APIService when the control plane still answers. Idempotent.
# The state under <cluster dir>/obs (logs, TSDB, traces) stays for post-mortems;
# hack/cluster-down.sh removes it with the rest of the cluster's state.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib.sh
source "$here/lib.sh"
# shellcheck source=hack/cluster-lib.sh
source "$here/cluster-lib.sh"
# shellcheck source=hack/obs-lib.sh
source "$here/obs-lib.sh"

kubeconfig="$cluster_root/kubeconfig"
kubectl="$(tools_bin_dir)/kubectl"
# An APIService left pointing at a stopped adapter makes discovery report the group as
# unavailable (kubectl warns on every call), so it goes first.
if [[ -n "$(running_pid kube-apiserver)" && -x "$kubectl" && -s "$kubeconfig" ]]; then
  "$kubectl" --kubeconfig "$kubeconfig" delete apiservice v1beta1.custom.metrics.k8s.io \
    --ignore-not-found --wait=false >/dev/null 2>&1 || true
fi
for ((i = ${#obs_components[@]} - 1; i >= 0; i--)); do
  stop_component "${obs_components[i]}"
done
