#!/usr/bin/env bash
# Stops the local control plane started by hack/cluster-up.sh and removes its runtime
# state (etcd data, pid files, audit log, kubeconfigs), so the next cluster-up starts
# from an empty cluster. Idempotent: with nothing running it just cleans up.
#
# Kept by default: target/cluster/pki (regenerating the CA would invalidate kubeconfigs
# copied elsewhere, and costs time) and the component logs (for post-mortems of a CI run
# that tears the cluster down in a trap). `--purge` or SHARDOP_CLUSTER_PURGE=1 removes
# the whole cluster directory.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib.sh
source "$here/lib.sh"
# shellcheck source=hack/cluster-lib.sh
source "$here/cluster-lib.sh"
# shellcheck source=hack/obs-lib.sh
source "$here/obs-lib.sh"

purge="${SHARDOP_CLUSTER_PURGE:-0}"
for arg in "$@"; do
  case "$arg" in
    --purge) purge=1 ;;
    -h | --help)
      sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument '$arg' (usage: hack/cluster-down.sh [--purge])" ;;
  esac
done

require_tool flock "flock (util-linux) serialises cluster-up and cluster-down"

dir=$cluster_root
if [[ ! -d "$dir" ]]; then
  echo "cluster-down: nothing to do ($dir does not exist)" >&2
  exit 0
fi

take_cluster_lock

# A node (hack/node-up.sh) goes first: its kubelet and containers must not outlive the
# apiserver they talk to.
if [[ -d "$dir/node" ]]; then
  bash "$here/node-down.sh"
fi

# The observability pipeline (hack/obs-up.sh) belongs to this cluster: it goes first.
for ((i = ${#obs_components[@]} - 1; i >= 0; i--)); do
  stop_component "${obs_components[i]}"
done

# Clients first, etcd last: etcd then shuts down with no writer attached.
for ((i = ${#cluster_components[@]} - 1; i >= 0; i--)); do
  stop_component "${cluster_components[i]}"
done

if [[ "$purge" == 1 ]]; then
  # The lock file goes too; our fd 9 on it is released when the script exits.
  rm -rf "$dir"
  echo "cluster-down: stopped; removed $dir" >&2
else
  rm -rf "$dir/etcd" "$dir/obs/prometheus-data" "$dir/obs/traces.jsonl" "$dir/obs/targets" "$dir/obs/rules"
  rm -f "$dir"/*.pid "$dir"/audit*.log "$dir/kubeconfig" "$dir/kube-controller-manager.kubeconfig" "$dir"/*.tmp
  echo "cluster-down: stopped; removed runtime state, kept $dir/pki and the component logs" >&2
fi
