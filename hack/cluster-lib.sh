# Helpers shared by hack/cluster-up.sh and hack/cluster-down.sh. Source it after lib.sh.
# shellcheck shell=bash
# The variables below are used by the scripts that source this file.
# shellcheck disable=SC2034

# In start order; cluster-down stops them in reverse.
cluster_components=(etcd kube-apiserver kube-controller-manager)

# Ports default away from the usual 2379/2380/6443 so a real kind/k3s/etcd on the same
# machine does not clash with the local control plane.
apiserver_port="${SHARDOP_APISERVER_PORT:-16443}"
etcd_port="${SHARDOP_ETCD_PORT:-23790}"
etcd_peer_port="${SHARDOP_ETCD_PEER_PORT:-23800}"

# Absolute, because it ends up in process arguments that identify our processes.
cluster_root=$(cluster_dir)
[[ "$cluster_root" == /* ]] || cluster_root="$PWD/$cluster_root"

pid_file() { echo "$cluster_root/$1.pid"; }

# A pid only counts as ours if it runs the component's binary *and* mentions this cluster
# directory in its arguments: pids get reused, and another checkout may run its own
# control plane from the same tool cache.
is_our_process() {
  local pid=$1 component=$2 stat args
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  # Builtins only: the fallback in running_pid runs this for every process on the machine.
  read -r stat 2>/dev/null <"/proc/$pid/stat" || return 1
  # A zombie has exited; when PID 1 does not reap (some containers) it lingers in /proc.
  stat=${stat##*) }
  [[ "${stat:0:1}" != Z ]] || return 1
  mapfile -d '' -t args 2>/dev/null <"/proc/$pid/cmdline" || return 1
  [[ ${#args[@]} -gt 0 && "${args[0]##*/}" == "$component" ]] || return 1
  [[ "${args[*]}" == *"$cluster_root/"* ]]
}

# Prints the pid of the running component of this cluster, or nothing.
running_pid() {
  local component=$1 pid
  pid=$(cat "$(pid_file "$component")" 2>/dev/null) || true
  if [[ -n "$pid" ]] && is_our_process "$pid" "$component"; then
    echo "$pid"
    return
  fi
  # The pid file can be gone while the process still runs (cargo clean wipes target/);
  # fall back to the exact identity test over every process, never to a name match.
  local p
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    if is_our_process "$p" "$component"; then
      echo "$p"
      return
    fi
  done
}

process_gone() {
  local stat
  read -r stat 2>/dev/null <"/proc/$1/stat" || return 0
  stat=${stat##*) }
  [[ "${stat:0:1}" == Z ]]
}

# SIGTERM first so etcd and the apiserver shut down cleanly; SIGKILL if that takes too long.
# The apiserver waits up to --request-timeout (60 s) for clients that keep connections open
# (an operator still running with watches), which is not worth waiting for here.
stop_component() {
  local component=$1 timeout=${SHARDOP_STOP_TIMEOUT:-10} pid i
  pid=$(running_pid "$component")
  if [[ -z "$pid" ]]; then
    rm -f "$(pid_file "$component")"
    return 0
  fi
  echo "stopping $component (pid $pid)" >&2
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < timeout * 10; i++)); do
    process_gone "$pid" && break
    sleep 0.1
  done
  if ! process_gone "$pid"; then
    echo "$component (pid $pid) still running ${timeout}s after SIGTERM; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      process_gone "$pid" && break
      sleep 0.1
    done
    process_gone "$pid" || die "$component (pid $pid) survived SIGKILL"
  fi
  rm -f "$(pid_file "$component")"
}

# Serialises cluster-up and cluster-down (parallel test jobs, make -j). The fd must not
# leak into the control-plane processes, or they would hold the lock forever.
take_cluster_lock() {
  local lock_file
  lock_file="$cluster_root/.lock"
  mkdir -p "$cluster_root"
  exec 9>"$lock_file"
  if ! flock -n 9; then
    echo "waiting for another cluster-up/cluster-down to finish ($lock_file)" >&2
    flock 9
  fi
}

port_in_use() { (: <>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# setsid: Ctrl-C on a `make test` must not take the shared cluster down with it.
# Inherited descriptors are closed so that a caller waiting for EOF on a pipe it handed
# us (a test harness, make's jobserver, our own lock) is not held open by etcd for hours.
spawn() { # <component> <"ports it listens on"> <binary args...>
  local component=$1 ports=$2 log_file="$cluster_root/$1.log" fd port
  shift 2
  for port in $ports; do
    if port_in_use "$port"; then
      die "127.0.0.1:$port (for $component) is already in use by another process." \
        "Stop it, or pick other ports with SHARDOP_APISERVER_PORT / SHARDOP_ETCD_PORT / SHARDOP_ETCD_PEER_PORT" \
        "(if it is a control plane left over from this checkout, run hack/cluster-down.sh)."
    fi
  done
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) started by hack/${0##*/}: $*" >"$log_file"
  (
    for fd in /proc/"$BASHPID"/fd/*; do
      fd=${fd##*/}
      if ((fd > 2)); then eval "exec $fd>&-"; fi
    done
    # Not a process-group leader here, so setsid execs in place and $! stays the pid.
    exec setsid "$@" </dev/null >>"$log_file" 2>&1
  ) &
  echo "$!" >"$(pid_file "$component")"
  echo "${0##*/}: started $component (pid $!), log: $log_file" >&2
}

# Certificates of the cluster's PKI ($pki, set by the caller; openssl's output goes to
# $pki_log). issue_cert sets pki_changed=1 when it writes one.
ossl() { openssl "$@" 2>>"$pki_log" || die "openssl $1 failed; see $pki_log"; }

cert_valid() { # <name>
  [[ -s "$pki/$1.key" && -s "$pki/$1.crt" ]] &&
    openssl x509 -in "$pki/$1.crt" -noout -checkend 86400 >/dev/null 2>&1 &&
    { [[ "$1" == ca ]] || openssl verify -CAfile "$pki/ca.crt" "$pki/$1.crt" >/dev/null 2>&1; }
}

issue_cert() { # <name> <subject> <extendedKeyUsage> [subjectAltName]
  local name=$1 subj=$2 eku=$3 san=${4:-}
  cert_valid "$name" && return 0
  log "issuing $name certificate ($subj)"
  ossl req -new -newkey rsa:2048 -nodes -subj "$subj" -keyout "$pki/$name.key.tmp" -out "$pki/$name.csr" \
    -config <(printf '%s\n' '[req]' 'distinguished_name=dn' '[dn]')
  # Strict TLS stacks (rustls/webpki) insist on CA:FALSE, a key usage and an EKU on leaves.
  ossl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days 825 -sha256 -out "$pki/$name.crt.tmp" \
    -extfile <(printf '%s\n' 'basicConstraints=critical,CA:FALSE' \
      'keyUsage=critical,digitalSignature,keyEncipherment' "extendedKeyUsage=$eku" \
      'subjectKeyIdentifier=hash' 'authorityKeyIdentifier=keyid,issuer' ${san:+"subjectAltName=$san"})
  rm -f "$pki/$name.csr"
  mv "$pki/$name.key.tmp" "$pki/$name.key"
  mv "$pki/$name.crt.tmp" "$pki/$name.crt"
  pki_changed=1
}

# A kubeconfig for $api_url that embeds its credentials, so it can be copied anywhere (CI
# artifacts, a container); rewritten atomically because tests may be reading it.
write_kubeconfig() { # <file> <user> <cert> <key>
  local tmp="$1.tmp"
  (
    umask 077
    cat >"$tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: shardop-local
  cluster:
    server: $api_url
    certificate-authority-data: $(base64 -w0 <"$pki/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(base64 -w0 <"$3")
    client-key-data: $(base64 -w0 <"$4")
contexts:
- name: shardop-local
  context:
    cluster: shardop-local
    user: $2
current-context: shardop-local
EOF
  )
  mv "$tmp" "$1"
}
