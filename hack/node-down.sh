#!/usr/bin/env bash
# Stops the local node started by hack/node-up.sh and removes its runtime state: kubelet,
# kube-scheduler, kube-proxy (and its iptables rules), the tests' partition chain, every
# container and pod network namespace, containerd, the apiserver relay, the pods' bridge
# and the Node object. The control plane keeps running (hack/cluster-down.sh stops both).
# Idempotent: with nothing running it just cleans up. Logs stay in the cluster directory.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib.sh
source "$here/lib.sh"
# shellcheck source=hack/cluster-lib.sh
source "$here/cluster-lib.sh"
# shellcheck source=hack/node-lib.sh
source "$here/node-lib.sh"

log() { echo "node-down: $*" >&2; }

if [[ ! -d "$node_dir" ]]; then
  log "nothing to do ($node_dir does not exist)"
  exit 0
fi
take_node_lock
node_bin=$(node_bin_dir)
ctr=("$node_bin/ctr" --address "$containerd_socket" -n k8s.io)

# Every container (pods' and sandboxes'), through containerd while it still runs: the
# runc shims would otherwise outlive it with their containers.
remove_containers() {
  [[ -n "$(running_pid containerd)" ]] || return 0
  local id
  for id in $("${ctr[@]}" tasks ls -q 2>/dev/null); do
    "${ctr[@]}" tasks kill -s SIGKILL --all "$id" >/dev/null 2>&1 || true
  done
  for id in $("${ctr[@]}" tasks ls -q 2>/dev/null); do
    "${ctr[@]}" tasks delete --force "$id" >/dev/null 2>&1 || true
  done
  for id in $("${ctr[@]}" containers ls -q 2>/dev/null); do
    "${ctr[@]}" containers delete "$id" >/dev/null 2>&1 || true
  done
}

# Shims left behind (containerd killed hard before): ours name our socket in their arguments.
kill_leftover_shims() {
  local p args
  for p in /proc/[0-9]*; do
    mapfile -d '' -t args 2>/dev/null <"$p/cmdline" || continue
    [[ ${#args[@]} -gt 0 && "${args[0]##*/}" == containerd-shim-runc-v2 && "${args[*]}" == *"$containerd_socket"* ]] || continue
    kill -KILL "${p#/proc/}" 2>/dev/null || true
  done
}

# Network namespaces, overlay mounts and volume mounts: deepest first.
unmount_node_dir() {
  local m
  while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done < <(awk -v d="$node_dir/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r)
}

# The cgroups kubelet made for pods (cgroupfs driver), once their processes are gone.
remove_pod_cgroups() {
  local d
  for d in /sys/fs/cgroup/kubepods /sys/fs/cgroup/*/kubepods; do
    [[ -d "$d" ]] || continue
    find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

# The chains kubelet itself adds (kube-proxy --cleanup removes kube-proxy's).
remove_kubelet_chains() {
  local cmd table chain
  for cmd in iptables ip6tables; do
    command -v "$cmd" >/dev/null 2>&1 || continue
    "$cmd" -t filter -D INPUT -j KUBE-FIREWALL 2>/dev/null || true
    "$cmd" -t filter -D OUTPUT -j KUBE-FIREWALL 2>/dev/null || true
    for table in filter nat mangle; do
      for chain in KUBE-FIREWALL KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT; do
        "$cmd" -t "$table" -F "$chain" 2>/dev/null || true
        "$cmd" -t "$table" -X "$chain" 2>/dev/null || true
      done
    done
  done
}

for ((i = ${#node_components[@]} - 1; i >= 0; i--)); do
  c=${node_components[i]}
  [[ "$c" == containerd ]] && remove_containers
  stop_component "$c"
done
kill_leftover_shims
if [[ -x "$node_bin/kube-proxy" ]]; then
  "$node_bin/kube-proxy" --cleanup >/dev/null 2>&1 || true
fi
remove_kubelet_chains
iptables -D INPUT -j "$partition_chain" 2>/dev/null || true
iptables -F "$partition_chain" 2>/dev/null || true
iptables -X "$partition_chain" 2>/dev/null || true
unmount_node_dir
remove_pod_cgroups
ip link del "$node_bridge" 2>/dev/null || true
if [[ -s "$cluster_root/kubeconfig" ]]; then
  "$(tools_bin_dir)/kubectl" --kubeconfig "$cluster_root/kubeconfig" --request-timeout=5s \
    delete node "$node_name" --ignore-not-found >/dev/null 2>&1 || true
fi
# The lock file goes with the directory; our fd on it is released when the script exits.
rm -rf --one-file-system "$node_dir"
log "stopped; removed $node_dir (logs kept in $cluster_root)"
