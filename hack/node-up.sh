#!/usr/bin/env bash
# Adds a worker node to the local control plane (starting the control plane first if it is
# not running): containerd + runc, kubelet, kube-scheduler and kube-proxy, a bridge pod
# network in network namespaces on this machine, and the images of hack/build-image.sh
# loaded into containerd (nothing is ever pulled). Leaves the node Ready, so that
#   helm install shardop charts/shardop -n shardop-system --create-namespace --set worker.replicas=3
# runs shardop in pods (target/images/values-local.yaml pins the locally built image).
#
# Needs root (network namespaces, mounts, iptables); exits with status 3 when this machine
# cannot run a node at all. Installs runc, the CNI plugins,
# iptables, conntrack and socat with apt-get when they are missing.
# State lives in <cluster dir>/node, logs next to the control plane's in <cluster dir>.
# Idempotent: a Ready node is left alone (its images are re-imported when they changed);
# missing components are (re)started. hack/node-down.sh stops exactly what this started.
#
# Environment (besides the control plane's SHARDOP_* variables, see hack/cluster-up.sh):
#   SHARDOP_POD_CIDR     (10.244.0.0/24)  the node's pod addresses; .1 is the node itself
#   SHARDOP_NODE_BRIDGE  (shardop0)       the pods' bridge
#   SHARDOP_KUBELET_PORT (10250)          kubelet's HTTPS port on the node address
#   SHARDOP_NODE_TIMEOUT (180)            seconds to wait for the node to become Ready
#   SHARDOP_IMAGE_BIN_DIR                 where shardop's binaries are (hack/build-image.sh)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib.sh
source "$here/lib.sh"
# shellcheck source=hack/cluster-lib.sh
source "$here/cluster-lib.sh"
# shellcheck source=hack/node-lib.sh
source "$here/node-lib.sh"

started_ns=$(date +%s%N)
elapsed() { awk -v s="$started_ns" -v e="$(date +%s%N)" 'BEGIN { printf "%.1f", (e - s) / 1e9 }'; }
log() { echo "node-up: $*" >&2; }

# Exit status 3: this machine cannot run a node at all (e2e/tests/pods.rs skips on it, and
# `make demo` falls back to local processes); any other failure is a bug to look at.
unsupported() {
  echo "node-up: this machine cannot run a node: $*" >&2
  exit 3
}
[[ $EUID -eq 0 ]] || unsupported "it needs root (network namespaces, mounts, iptables)"
probe_netns=shardop-probe-$$
ip netns add "$probe_netns" 2>/dev/null || unsupported "creating a network namespace failed (ip netns add)"
ip netns del "$probe_netns"
install_node_packages

bash "$here/cluster-up.sh" >&2
take_node_lock
other=$(other_node)
[[ -z "$other" ]] || die "another local node runs on this machine (kube-proxy: $other); stop it first" \
  "(make node-down or make demo-down with its settings): two nodes would rewrite each other's iptables rules"

tools_bin=$(tools_bin_dir)
node_bin=$("$here/build-node.sh")
kubectl=("$tools_bin/kubectl" --kubeconfig "$cluster_root/kubeconfig")
pki="$cluster_root/pki"
pki_log="$pki/openssl.log"
api_url="https://127.0.0.1:$apiserver_port"
timeout="${SHARDOP_NODE_TIMEOUT:-180}"
deadline=$((SECONDS + timeout))

wait_for() { # <what> <log component> -- <command...>
  local what=$1 component=$2
  shift 3
  until "$@"; do
    local c pid
    for c in "${node_components[@]}"; do
      pid=$(cat "$(pid_file "$c")" 2>/dev/null) || continue
      if process_gone "$pid"; then
        echo "error: $c (pid $pid) exited; last lines of $cluster_root/$c.log:" >&2
        tail -n 25 "$cluster_root/$c.log" >&2
        exit 1
      fi
    done
    ((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for $what; see $cluster_root/$component.log"
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------------------
# Certificates and kubeconfigs: one identity per component, bound by the default RBAC
# policy (kube-scheduler, kube-proxy) or by the binding applied below (the node).
# ---------------------------------------------------------------------------------------
issue_certs() {
  issue_cert kube-scheduler "/CN=system:kube-scheduler" clientAuth
  issue_cert kube-proxy "/CN=system:kube-proxy" clientAuth
  issue_cert kubelet "/CN=system:node:$node_name/O=system:nodes" clientAuth
  issue_cert kubelet-serving "/CN=$node_name" serverAuth "IP:$node_ip,DNS:$node_name"
  mkdir -p "$node_dir"
  write_kubeconfig "$node_dir/kube-scheduler.kubeconfig" system:kube-scheduler "$pki/kube-scheduler.crt" "$pki/kube-scheduler.key"
  write_kubeconfig "$node_dir/kube-proxy.kubeconfig" system:kube-proxy "$pki/kube-proxy.crt" "$pki/kube-proxy.key"
  write_kubeconfig "$node_dir/kubelet.kubeconfig" "system:node:$node_name" "$pki/kubelet.crt" "$pki/kubelet.key"
}

# ---------------------------------------------------------------------------------------
# Pod network: a bridge owning the node address; the CNI bridge plugin plugs every pod's
# network namespace into it and host-local hands out addresses. No masquerading: pod
# traffic never leaves this machine.
# ---------------------------------------------------------------------------------------
setup_network() {
  if ! ip link show "$node_bridge" >/dev/null 2>&1; then
    ip link add "$node_bridge" type bridge
  fi
  ip addr replace "$node_ip/$pod_prefix_len" dev "$node_bridge"
  ip link set "$node_bridge" up
  # Service traffic between two pods on the bridge must pass iptables (kube-proxy's DNAT).
  modprobe br_netfilter 2>/dev/null || true
  if [[ -w /proc/sys/net/bridge/bridge-nf-call-iptables ]]; then
    echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables
  fi
  echo 1 >/proc/sys/net/ipv4/ip_forward
  setup_partition_chain
  mkdir -p "$node_dir/cni"
  cat >"$node_dir/cni/10-shardop.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "shardop",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$node_bridge",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "$pod_cidr", "gateway": "$node_ip" }]],
        "routes": [{ "dst": "0.0.0.0/0" }],
        "dataDir": "$node_dir/cni-ipam"
      }
    }
  ]
}
EOF
}

# The e2e tests cut a pod off the node with a DROP rule in this node's partition chain and
# lift it when they end. A test process killed in between (a timeout, ^C) cannot lift it,
# and the rule would then cut off whichever pod gets that address next, in every later run:
# the chain starts empty whenever the node starts.
setup_partition_chain() {
  iptables -N "$partition_chain" 2>/dev/null || iptables -F "$partition_chain"
  iptables -C INPUT -j "$partition_chain" 2>/dev/null || iptables -I INPUT -j "$partition_chain"
  # Tests before the chain existed put their partitions straight into INPUT.
  local rule
  while read -ra rule; do
    rule[0]=-D
    iptables "${rule[@]}"
  done < <(iptables -S INPUT | grep -E "^-A INPUT -s ${node_ip%.*}\.[0-9]+/32 -j DROP$" || true)
}

# ---------------------------------------------------------------------------------------
# containerd: its own root, state and socket under the node directory; runc from Debian;
# network namespaces under the state directory, so node-down can unmount every one.
# ---------------------------------------------------------------------------------------
start_containerd() {
  [[ -z "$(running_pid containerd)" ]] || return 0
  # kubelet asks for negative OOM score adjustments (-998 for sandboxes), which need
  # CAP_SYS_RESOURCE; a container without it (like this project's CI machines) makes runc
  # fail with "can't get final child's PID from pipe". Clamp to containerd's own score then.
  local restrict_oom_score_adj=false
  has_capability 24 || restrict_oom_score_adj=true
  mkdir -p "$node_dir/containerd"
  cat >"$node_dir/containerd/config.toml" <<EOF
version = 3
root = "$node_dir/containerd/root"
state = "$node_dir/containerd/state"

[grpc]
  address = "$containerd_socket"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  # Every registry resolves to a closed local port: a pod naming an image that is not
  # loaded fails at once (ErrImagePull) instead of reaching out of the machine.
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "$node_dir/containerd/registries"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$SHARDOP_PAUSE_IMAGE"

[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = $restrict_oom_score_adj
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["$cni_bin_dir"]
    conf_dir = "$node_dir/cni"
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = $([[ "$cgroup_driver" == systemd ]] && echo true || echo false)
EOF
  mkdir -p "$node_dir/containerd/registries/_default"
  printf '%s\n' 'server = "http://127.0.0.1:9"' '' '[host."http://127.0.0.1:9"]' '  capabilities = ["pull", "resolve"]' \
    >"$node_dir/containerd/registries/_default/hosts.toml"
  # The shim is looked up on PATH.
  PATH="$node_bin:$PATH" spawn containerd "" "$node_bin/containerd" --config "$node_dir/containerd/config.toml"
}

containerd_ready() { "$node_bin/ctr" --address "$containerd_socket" version >/dev/null 2>&1; }

# Imports the images of hack/build-image.sh (rebuilt when the binaries changed) that
# containerd does not hold under every one of their names yet.
load_images() {
  local file refs
  local present ref loaded
  present=$("$node_bin/ctr" --address "$containerd_socket" -n k8s.io images ls -q 2>/dev/null)
  while read -r file refs; do
    loaded=1
    for ref in $refs; do grep -qxF "$ref" <<<"$present" || loaded=0; done
    ((loaded == 0)) || continue
    log "importing $refs"
    "$node_bin/ctr" --address "$containerd_socket" -n k8s.io images import "$file" >>"$cluster_root/node-images.log" 2>&1 ||
      die "could not import $file into containerd (see $cluster_root/node-images.log)"
  done < <(bash "$here/build-image.sh" ${SHARDOP_IMAGE_BIN_DIR:+"$SHARDOP_IMAGE_BIN_DIR"})
  "$node_bin/ctr" --address "$containerd_socket" -n k8s.io images ls -q 2>/dev/null | grep -v '^sha256:' >"$node_dir/images"
  write_values_local
}

# ---------------------------------------------------------------------------------------
# kubelet, kube-scheduler, kube-proxy.
# ---------------------------------------------------------------------------------------
start_kubelet() {
  [[ -z "$(running_pid kubelet)" ]] || return 0
  mkdir -p "$node_dir/kubelet"
  # failCgroupV1: this project's machines boot with cgroup v1 (hybrid), which kubelet 1.35+
  # refuses unless told. Low eviction thresholds: a busy CI disk must not evict the tests'
  # pods. No image garbage collection: the images cannot be pulled again.
  cat >"$node_dir/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $node_ip
port: $kubelet_port
readOnlyPort: 0
healthzPort: 0
tlsCertFile: $pki/kubelet-serving.crt
tlsPrivateKeyFile: $pki/kubelet-serving.key
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: $pki/ca.crt
authorization:
  mode: AlwaysAllow
containerRuntimeEndpoint: unix://$containerd_socket
cgroupDriver: $cgroup_driver
failCgroupV1: false
failSwapOn: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
syncFrequency: 10s
nodeStatusReportFrequency: 30s
serializeImagePulls: false
maxPods: 110
resolvConf: ""
EOF
  spawn kubelet "" "$node_bin/kubelet" \
    --config="$node_dir/kubelet/config.yaml" \
    --kubeconfig="$node_dir/kubelet.kubeconfig" \
    --root-dir="$node_dir/kubelet" \
    --hostname-override="$node_name" \
    --node-ip="$node_ip"
}

start_scheduler() {
  [[ -z "$(running_pid kube-scheduler)" ]] || return 0
  spawn kube-scheduler "" "$node_bin/kube-scheduler" \
    --kubeconfig="$node_dir/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="$node_dir/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="$node_dir/kube-scheduler.kubeconfig" \
    --leader-elect=false \
    --secure-port=0
}

start_kube_proxy() {
  [[ -z "$(running_pid kube-proxy)" ]] || return 0
  cat >"$node_dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $node_dir/kube-proxy.kubeconfig
hostnameOverride: $node_name
mode: iptables
clusterCIDR: $pod_cidr
healthzBindAddress: ""
metricsBindAddress: ""
conntrack:
  # Leave the host's conntrack sysctls alone (a container may not write them).
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
EOF
  spawn kube-proxy "" "$node_bin/kube-proxy" --config="$node_dir/kube-proxy.yaml"
}

# Pods reach the API server through the `kubernetes` Service (10.0.0.1:443). The apiserver
# listens on loopback only, and an Endpoint may not be a loopback address, so socat relays
# the node address to it; the Service's endpoints (the control plane runs without an
# endpoint reconciler) point at the relay.
start_api_relay() {
  if [[ -z "$(running_pid socat)" ]]; then
    spawn socat "" socat -L "$node_dir/socat.lock" \
      "TCP-LISTEN:$api_relay_port,bind=$node_ip,reuseaddr,fork" "TCP:127.0.0.1:$apiserver_port"
  fi
}

apply_cluster_objects() {
  "${kubectl[@]}" apply --server-side --force-conflicts --field-manager=shardop-node-up -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: shardop-node-up:nodes
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:node
subjects:
  - apiGroup: rbac.authorization.k8s.io
    kind: Group
    name: system:nodes
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes-node-relay
  namespace: default
  labels:
    kubernetes.io/service-name: kubernetes
    endpointslice.kubernetes.io/managed-by: shardop-node-up
addressType: IPv4
endpoints:
  - addresses: ["$node_ip"]
    conditions:
      ready: true
ports:
  - name: https
    port: $api_relay_port
    protocol: TCP
---
# Volumes for the DatabaseClusters' claims, provisioned by kube-controller-manager's
# host-path provisioner (--enable-hostpath-provisioner, hack/cluster-up.sh).
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local-hostpath
  annotations:
    storageclass.kubernetes.io/is-default-class: "true"
provisioner: kubernetes.io/host-path
reclaimPolicy: Delete
volumeBindingMode: Immediate
EOF
}

node_ready() {
  [[ "$("${kubectl[@]}" get node "$node_name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

summary() {
  cat <<EOF
local node $node_name is ready ($1)
  pods:       $pod_cidr on bridge $node_bridge, node address $node_ip
  runtime:    containerd at $containerd_socket ($cgroup_driver cgroups, cgroup v$cgroup_version)
  logs:       $cluster_root/{containerd,kubelet,kube-scheduler,kube-proxy,socat}.log
  images:     $(tr '\n' ' ' <"$node_dir/images")
  chart:      helm install shardop charts/shardop -n shardop-system --create-namespace \\
                --set worker.replicas=3 -f $values_local
EOF
}

issue_certs
setup_network
start_containerd
wait_for "containerd" containerd -- containerd_ready
load_images
start_api_relay
apply_cluster_objects
start_scheduler
start_kube_proxy
start_kubelet
wait_for "node $node_name to become Ready" kubelet -- node_ready
summary "ready in $(elapsed)s"
