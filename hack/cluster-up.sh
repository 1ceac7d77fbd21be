#!/usr/bin/env bash
# Starts a real, minimal Kubernetes control plane on 127.0.0.1 for the e2e tests:
# etcd, kube-apiserver (RBAC, API Priority and Fairness, audit log) and
# kube-controller-manager (garbage collector, namespace, serviceaccount, statefulset, ...).
# There is no scheduler and no kubelet: Pods get created by controllers but never run,
# unless hack/node-up.sh adds a node to it.
#
# State, logs and the admin kubeconfig live in target/cluster/ (SHARDOP_CLUSTER_DIR).
# Idempotent: a healthy running cluster is left alone; missing components are (re)started.
#
# Environment:
#   SHARDOP_APISERVER_PORT   (16443)  kube-apiserver secure port on 127.0.0.1
#   SHARDOP_ETCD_PORT        (23790)  etcd client port
#   SHARDOP_ETCD_PEER_PORT   (23800)  etcd peer port
#   SHARDOP_CLUSTER_TIMEOUT  (90)     seconds to wait for the cluster to become ready
#   SHARDOP_APISERVER_FEATURE_GATES   (none) extra kube-apiserver --feature-gates, e.g.
#                                     WatchList=false (a server without streaming lists).
#                                     Applies when kube-apiserver starts: use a cluster
#                                     directory of its own rather than a running cluster.
#   SHARDOP_APISERVER_PROFILING (false) true serves kube-apiserver's /debug/pprof (CPU
#                                     profiles of a benchmark's phases); applies when it
#                                     starts, like the feature gates.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib.sh
source "$here/lib.sh"
# shellcheck source=hack/cluster-lib.sh
source "$here/cluster-lib.sh"

require_tool go "Go builds the pinned control plane (https://go.dev/doc/install)"
require_tool openssl "openssl generates the cluster's CA and certificates (apt-get install openssl)"
require_tool curl "curl probes the apiserver's health endpoints (apt-get install curl)"
require_tool setsid "setsid (util-linux) detaches the control plane from the terminal"
require_tool flock "flock (util-linux) serialises cluster-up and cluster-down"

started_ns=$(date +%s%N)
elapsed() { awk -v s="$started_ns" -v e="$(date +%s%N)" 'BEGIN { printf "%.1f", (e - s) / 1e9 }'; }
log() { echo "cluster-up: $*" >&2; }

dir=$cluster_root
pki="$dir/pki"
kubeconfig="$dir/kubeconfig"
timeout="${SHARDOP_CLUSTER_TIMEOUT:-90}"
api_url="https://127.0.0.1:$apiserver_port"
feature_gates="${SHARDOP_APISERVER_FEATURE_GATES:-}"

take_cluster_lock

# A no-op once the tools are cached; the first time it builds them from source.
bin_dir=$("$here/build-tools.sh")

api_get() {
  curl -fsS --max-time 3 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "$api_url$1" 2>/dev/null
}

cluster_ready() {
  local c
  [[ -s "$kubeconfig" ]] || return 1
  # A cluster started before the aggregation layer was configured gets restarted with it.
  [[ -s "$pki/front-proxy-client.crt" ]] || return 1
  for c in "${cluster_components[@]}"; do [[ -n "$(running_pid "$c")" ]] || return 1; done
  [[ "$(api_get /readyz)" == ok ]] || return 1
  # kube-system is created by the apiserver; the default ServiceAccount only appears once
  # kube-controller-manager's serviceaccount controller is working.
  api_get /api/v1/namespaces/kube-system >/dev/null || return 1
  api_get /api/v1/namespaces/default/serviceaccounts/default >/dev/null
}

summary() {
  cat <<EOF
local control plane is ready ($1)
  apiserver:  $api_url
  kubeconfig: $kubeconfig
  logs:       $dir/{etcd,kube-apiserver,kube-controller-manager}.log, audit: $dir/audit.log
  kubectl:    $bin_dir/kubectl
use it with:
  export KUBECONFIG=$kubeconfig PATH=$bin_dir:\$PATH
EOF
}

if cluster_ready; then
  summary "already running, checked in $(elapsed)s"
  exit 0
fi

# ---------------------------------------------------------------------------------------
# PKI. Generated once and reused, so a kubeconfig handed to a long-running shell keeps
# working across restarts; a certificate is only reissued when it is missing, about to
# expire, or no longer signed by the current CA.
# ---------------------------------------------------------------------------------------
mkdir -p "$pki"
chmod 700 "$pki"
pki_log="$pki/openssl.log"
: >"$pki_log"
pki_changed=0

if ! cert_valid ca; then
  log "generating the cluster CA"
  # Explicit config: the system openssl.cnf differs between distributions (or is absent).
  ossl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days 3650 \
    -subj "/CN=shardop-local-ca" -keyout "$pki/ca.key.tmp" -out "$pki/ca.crt.tmp" \
    -config <(printf '%s\n' '[req]' 'distinguished_name=dn' 'x509_extensions=ext' '[dn]' '[ext]' \
      'basicConstraints=critical,CA:TRUE' 'keyUsage=critical,keyCertSign,cRLSign,digitalSignature' \
      'subjectKeyIdentifier=hash')
  mv "$pki/ca.key.tmp" "$pki/ca.key"
  mv "$pki/ca.crt.tmp" "$pki/ca.crt"
  pki_changed=1
fi

# 10.0.0.1 is the first address of --service-cluster-ip-range: the `kubernetes` Service.
issue_cert apiserver "/CN=kube-apiserver" serverAuth \
  "IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
# O=system:masters is bound to cluster-admin by the default RBAC bootstrap policy.
issue_cert admin "/CN=shardop-admin/O=system:masters" clientAuth
# The default RBAC policy grants this exact user name the right to mint the per-controller
# ServiceAccount tokens (see --use-service-account-credentials below).
issue_cert kube-controller-manager "/CN=system:kube-controller-manager" clientAuth
# The apiserver's identity towards a kubelet (logs, exec) when a node runs (hack/node-up.sh).
issue_cert apiserver-kubelet-client "/CN=kube-apiserver-kubelet-client/O=system:masters" clientAuth
# The aggregation layer (APIServices such as custom.metrics.k8s.io, served by
# prometheus-adapter in hack/obs-up.sh) proxies with this client certificate; extension
# servers trust the user it names in X-Remote-User only from this CN.
issue_cert front-proxy-client "/CN=front-proxy-client" clientAuth

# The apiserver verifies ServiceAccount tokens with the public half, the controller
# manager and the TokenRequest API sign them with the private half.
if [[ ! -s "$pki/sa.key" || ! -s "$pki/sa.pub" ]]; then
  log "generating the service-account signing key"
  ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key.tmp"
  ossl pkey -in "$pki/sa.key.tmp" -pubout -out "$pki/sa.pub"
  mv "$pki/sa.key.tmp" "$pki/sa.key"
  pki_changed=1
fi

# Components still running from before would keep serving or trusting the old material.
if [[ "$pki_changed" == 1 ]]; then
  stop_component kube-controller-manager
  stop_component kube-apiserver
fi

# ---------------------------------------------------------------------------------------
# Kubeconfigs. The admin one embeds its credentials so it can be copied anywhere (CI
# artifacts, a container); it is rewritten atomically because tests may be reading it.
# ---------------------------------------------------------------------------------------
write_kubeconfig "$kubeconfig" shardop-admin "$pki/admin.crt" "$pki/admin.key"
write_kubeconfig "$dir/kube-controller-manager.kubeconfig" system:kube-controller-manager \
  "$pki/kube-controller-manager.crt" "$pki/kube-controller-manager.key"

# ---------------------------------------------------------------------------------------
# Processes.
# ---------------------------------------------------------------------------------------
# Fails fast, with the component's own words, instead of waiting out the timeout.
check_alive() {
  local c pid
  for c in "$@"; do
    pid=$(cat "$(pid_file "$c")" 2>/dev/null) || die "$c is not running (no pid file)"
    if process_gone "$pid"; then
      echo "error: $c (pid $pid) exited before the cluster became ready; last lines of $dir/$c.log:" >&2
      tail -n 25 "$dir/$c.log" >&2
      echo "(hack/cluster-down.sh stops the components that are still running)" >&2
      exit 1
    fi
  done
}

deadline=$((SECONDS + timeout))
wait_until() { # <what> <log component> <components to keep alive> -- <command...>
  local what=$1 component=$2 alive=()
  shift 2
  while [[ "$1" != -- ]]; do alive+=("$1"); shift; done
  shift
  until "$@"; do
    check_alive "${alive[@]}"
    if ((SECONDS >= deadline)); then
      die "timed out after ${timeout}s waiting for $what; see $dir/$component.log" \
        "(what did start is left running for inspection; hack/cluster-down.sh stops it)"
    fi
    sleep 0.2
  done
}

etcd_healthy() { [[ "$(curl -fsS --max-time 2 "http://127.0.0.1:$etcd_port/health" 2>/dev/null)" == *'"health":"true"'* ]]; }
api_healthz() { [[ "$(api_get /healthz)" == ok ]]; }
api_readyz() { [[ "$(api_get /readyz)" == ok ]]; }
default_sa_exists() {
  api_get /api/v1/namespaces/kube-system >/dev/null &&
    api_get /api/v1/namespaces/default/serviceaccounts/default >/dev/null
}

mkdir -p "$dir/etcd"
chmod 700 "$dir/etcd"

if [[ -z "$(running_pid etcd)" ]]; then
  # Plain HTTP on loopback only. --unsafe-no-fsync: the data is disposable and fsync on
  # slow CI disks is what makes a test etcd slow.
  spawn etcd "$etcd_port $etcd_peer_port" "$bin_dir/etcd" \
    --name=shardop \
    --data-dir="$dir/etcd" \
    --listen-client-urls="http://127.0.0.1:$etcd_port" \
    --advertise-client-urls="http://127.0.0.1:$etcd_port" \
    --listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster="shardop=http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster-state=new \
    --unsafe-no-fsync
fi
wait_until "etcd to become healthy" etcd etcd -- etcd_healthy

if [[ -z "$(running_pid kube-apiserver)" ]]; then
  # --advertise-address=127.0.0.1 keeps the apiserver from picking a host interface (and
  # from failing on hosts without a default route). Endpoints may not point at loopback,
  # so the `kubernetes` Service's endpoint reconciler is switched off: nothing in-cluster
  # could reach it anyway without nodes.
  spawn kube-apiserver "$apiserver_port" "$bin_dir/kube-apiserver" \
    --bind-address=127.0.0.1 \
    --secure-port="$apiserver_port" \
    --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --tls-cert-file="$pki/apiserver.crt" \
    --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" \
    --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$pki/sa.pub" \
    --service-account-signing-key-file="$pki/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --allow-privileged=true \
    --enable-priority-and-fairness=true \
    --audit-policy-file="$here/audit-policy.yaml" \
    --audit-log-path="$dir/audit.log" \
    --audit-log-format=json \
    --audit-log-mode=blocking \
    --audit-log-maxsize=1024 \
    --audit-log-maxbackup=1 \
    --profiling="${SHARDOP_APISERVER_PROFILING:-false}" \
    --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --proxy-client-cert-file="$pki/front-proxy-client.crt" \
    --proxy-client-key-file="$pki/front-proxy-client.key" \
    --requestheader-client-ca-file="$pki/ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    ${feature_gates:+"--feature-gates=$feature_gates"}
fi
# The controller manager gives up if the apiserver is not healthy within 10 s of its own
# start, so it is only started once /healthz answers.
wait_until "kube-apiserver /healthz" kube-apiserver etcd kube-apiserver -- api_healthz

if [[ -z "$(running_pid kube-controller-manager)" ]]; then
  # --use-service-account-credentials: every controller acts as its own ServiceAccount, as
  # in kubeadm clusters. The default RBAC policy only grants system:kube-controller-manager
  # enough to mint those tokens; using its own identity for everything ends in Forbidden.
  # Each controller fetches a token at startup, which the default client rate limit
  # (20 qps) stretches to ~5 s; a local test cluster can afford a higher limit.
  # --secure-port=0: no metrics endpoint, which also skips delegated authn/authz lookups
  # at startup. The CA doubles as the CSR signer so CertificateSigningRequests work too.
  # The host-path provisioner gives the local node (hack/node-up.sh) volumes for the
  # DatabaseClusters' claims; it only serves StorageClasses naming kubernetes.io/host-path.
  spawn kube-controller-manager "" "$bin_dir/kube-controller-manager" \
    --kubeconfig="$dir/kube-controller-manager.kubeconfig" \
    --controllers='*' \
    --leader-elect=false \
    --secure-port=0 \
    --use-service-account-credentials=true \
    --kube-api-qps=200 \
    --kube-api-burst=400 \
    --service-account-private-key-file="$pki/sa.key" \
    --root-ca-file="$pki/ca.crt" \
    --cluster-signing-cert-file="$pki/ca.crt" \
    --cluster-signing-key-file="$pki/ca.key" \
    --enable-hostpath-provisioner=true
fi
wait_until "kube-apiserver /readyz" kube-apiserver "${cluster_components[@]}" -- api_readyz
wait_until "the default ServiceAccount (created by kube-controller-manager)" kube-controller-manager \
  "${cluster_components[@]}" -- default_sa_exists

summary "started in $(elapsed)s"
