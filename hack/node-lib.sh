# Helpers shared by hack/node-up.sh and hack/node-down.sh. Source it after cluster-lib.sh.
# shellcheck shell=bash
# shellcheck disable=SC2034 # used by the scripts that source this file
# shellcheck source=hack/image-lib.sh
source "$hack_dir/image-lib.sh"

# In start order; node-down stops them in reverse.
node_components=(containerd socat kube-scheduler kube-proxy kubelet)

node_name=shardop-node
node_dir=$cluster_root/node
pod_cidr="${SHARDOP_POD_CIDR:-10.244.0.0/24}"
pod_prefix_len=${pod_cidr#*/}
# The node's own address is the first one of the pod range, on the bridge.
node_ip=$(awk -F'[./]' '{ printf "%d.%d.%d.%d", $1, $2, $3, $4 + 1 }' <<<"$pod_cidr")
node_bridge="${SHARDOP_NODE_BRIDGE:-shardop0}"
# The iptables chain (filter table, jumped to from INPUT) that holds the e2e tests' pod
# partitions on this node (e2e/src/node.rs builds the same name): one per node, so the
# demo's node and the tests' node never share it; at most 28 characters.
partition_chain="SHARDOP-CUT-$node_bridge"
kubelet_port="${SHARDOP_KUBELET_PORT:-10250}"
# Where socat relays the apiserver to pods (node address): the apiserver's own port.
api_relay_port=$apiserver_port
containerd_socket=$node_dir/containerd.sock
cni_bin_dir=/usr/lib/cni
values_local=$repo_root/target/images/values-local.yaml

# cgroup v2 hosts have a unified hierarchy with cgroup.controllers at its root; v1 and
# hybrid hosts (like this project's machines) do not. kubelet and runc use cgroupfs
# directly either way: no systemd is needed.
if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then cgroup_version=2; else cgroup_version=1; fi
cgroup_driver="${SHARDOP_CGROUP_DRIVER:-cgroupfs}"

# runc, the CNI plugins, iptables (kube-proxy), conntrack, socat (the apiserver relay)
# and the tools that build the images: from Debian packages, only if missing.
install_node_packages() {
  local -A packages=(
    [runc]=runc [/usr/lib/cni/bridge]=containernetworking-plugins [iptables]=iptables
    [conntrack]=conntrack [socat]=socat [jq]=jq [strip]=binutils [modprobe]=kmod
  )
  local tool missing=()
  for tool in "${!packages[@]}"; do
    if [[ "$tool" == /* ]]; then
      [[ -e "$tool" ]] || missing+=("${packages[$tool]}")
    else
      command -v "$tool" >/dev/null 2>&1 || missing+=("${packages[$tool]}")
    fi
  done
  [[ ${#missing[@]} -gt 0 ]] || return 0
  echo "installing ${missing[*]} (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 ||
    { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2; } ||
    die "could not install ${missing[*]}"
}

# Serialises node-up and node-down (not the cluster's lock: cluster-down stops the node
# while holding that one).
take_node_lock() {
  mkdir -p "$node_dir"
  exec 8>"$node_dir/.lock"
  if ! flock -n 8; then
    echo "waiting for another node-up/node-down to finish ($node_dir/.lock)" >&2
    flock 8
  fi
}

# The chart values that run the image just loaded: its content tag, never pulled.
write_values_local() {
  local tag
  tag=$(grep -o "$SHARDOP_LOCAL_IMAGE_REPOSITORY:[0-9a-f]*" "$node_dir/images" | head -n 1 | cut -d: -f2)
  [[ -n "$tag" ]] || die "the shardop image is not in containerd"
  mkdir -p "$(dirname "$values_local")"
  cat >"$values_local" <<EOF
# Written by hack/node-up.sh: the shardop image built from this workspace and loaded into
# the local node's containerd. Never pulled.
image:
  repository: $SHARDOP_LOCAL_IMAGE_REPOSITORY
  tag: "$tag"
  pullPolicy: Never
EOF
}

# Whether this shell has capability <bit> (linux/capability.h) in its effective set.
has_capability() {
  local eff
  eff=$(awk '$1 == "CapEff:" { print $2 }' /proc/self/status)
  (((16#$eff >> $1) & 1))
}

# The pid and command line of a kube-proxy of another cluster directory, if one runs: two
# nodes on one machine would rewrite each other's iptables rules.
other_node() {
  local p args
  for p in /proc/[0-9]*; do
    mapfile -d '' -t args 2>/dev/null <"$p/cmdline" || continue
    [[ ${#args[@]} -gt 0 && "${args[0]##*/}" == kube-proxy && "${args[*]}" != *"$cluster_root/"* ]] || continue
    echo "${p#/proc/} ${args[*]}"
    return
  done
}
