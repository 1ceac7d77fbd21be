# Image helpers shared by hack/build-image.sh and hack/node-up.sh. Source it after lib.sh.
# shellcheck shell=bash
# shellcheck disable=SC2034 # used by the scripts that source this file

# The chart's default image (values.yaml image.repository, Chart.yaml appVersion): tagged
# on the node too, so a plain `helm install` with chart defaults runs the local build.
SHARDOP_CHART_IMAGE="ghcr.io/shardop/shardop:$(awk -F'"' '/^appVersion:/ { print $2 }' "$repo_root/charts/shardop/Chart.yaml")"
# The same image under a tag that names its content (values-local.yaml pins it).
SHARDOP_LOCAL_IMAGE_REPOSITORY=shardop.local/shardop
# containerd's sandbox image and the DatabaseCluster pods' image on the local node.
SHARDOP_PAUSE_IMAGE=shardop.local/pause:3.10
SHARDOP_DB_STANDIN_IMAGE=shardop.local/db-standin:1

# The binaries hack/Dockerfile copies into /usr/local/bin.
dockerfile_binaries=(shardop-worker shardop-assigner)

# The USER line of a Dockerfile, e.g. 65532:65532.
dockerfile_user() { awk '$1 == "USER" { print $2 }' "$1" | tail -n 1; }

# The CMD line of a Dockerfile, in its JSON (exec) form.
dockerfile_cmd() { sed -n 's/^CMD \(\[.*\]\)$/\1/p' "$1" | tail -n 1; }

# The first 12 hex digits of a reproducible tar of <dir>: a tag that changes with the content.
layer_tag() { reproducible_tar "$1" | sha256sum | cut -c1-12; }

reproducible_tar() { # <dir>
  tar --sort=name --numeric-owner --mtime=@0 --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -C "$1" -c .
}

# Writes an OCI image layout tar with one uncompressed layer holding <rootfs>, named by
# every <reference> (io.containerd.image.name, which `ctr images import` reads).
oci_image() { # <out.tar> <rootfs> <user> <cmd JSON> <reference...>
  local tar_out=$1 rootfs=$2 user=$3 cmd=$4 layout
  shift 4
  layout=$(mktemp -d)
  mkdir -p "$layout/blobs/sha256"
  reproducible_tar "$rootfs" >"$layout/layer.tar"
  local layer_digest layer_size
  layer_digest=$(sha256sum <"$layout/layer.tar" | cut -d' ' -f1)
  layer_size=$(stat -c %s "$layout/layer.tar")
  mv "$layout/layer.tar" "$layout/blobs/sha256/$layer_digest"
  local config config_digest manifest manifest_digest
  config=$(jq -cn --arg user "$user" --argjson cmd "$cmd" --arg diff "sha256:$layer_digest" '{
    architecture: "amd64", os: "linux",
    config: { User: $user, Cmd: $cmd, Env: ["PATH=/usr/local/bin:/usr/bin:/bin"] },
    rootfs: { type: "layers", diff_ids: [$diff] } }')
  config_digest=$(printf '%s' "$config" | sha256sum | cut -d' ' -f1)
  printf '%s' "$config" >"$layout/blobs/sha256/$config_digest"
  manifest=$(jq -cn --arg c "sha256:$config_digest" --argjson cs "${#config}" \
    --arg l "sha256:$layer_digest" --argjson ls "$layer_size" '{
    schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
    config: { mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs },
    layers: [{ mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $l, size: $ls }] }')
  manifest_digest=$(printf '%s' "$manifest" | sha256sum | cut -d' ' -f1)
  printf '%s' "$manifest" >"$layout/blobs/sha256/$manifest_digest"
  local refs ref
  refs=$(for ref in "$@"; do echo "$ref"; done | jq -R . | jq -cs .)
  jq -cn --arg m "sha256:$manifest_digest" --argjson ms "${#manifest}" --argjson refs "$refs" '{
    schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
    manifests: [ $refs[] | { mediaType: "application/vnd.oci.image.manifest.v1+json",
      digest: $m, size: $ms, platform: { architecture: "amd64", os: "linux" },
      annotations: { "io.containerd.image.name": ., "org.opencontainers.image.ref.name": (split(":") | last) } } ] }' \
    >"$layout/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
  tar --sort=name --numeric-owner --mtime=@0 -C "$layout" -cf "$tar_out" oci-layout index.json blobs
  rm -rf "$layout"
}
