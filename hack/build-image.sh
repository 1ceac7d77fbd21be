#!/usr/bin/env bash
# Builds the node's images without pulling anything: OCI image layouts (tar) made from
# files on this machine, written to target/images/:
#   shardop.tar     shardop-worker and shardop-assigner (stripped copies of the workspace's
#                   binaries), the shared libraries they load, /etc/passwd with the nonroot
#                   user: the layout hack/Dockerfile builds on distroless/cc (e2e/tests/image.rs
#                   checks the two agree: user, command, binaries).
#   pause.tar       the pod sandbox process (hack/images/cmd/pause).
#   db-standin.tar  the database stand-in of DatabaseCluster pods (hack/images/cmd/db-standin).
# Prints one line per image: <file> <reference>...
#
# Usage: hack/build-image.sh [BIN_DIR]   (BIN_DIR: where shardop-worker and
#        shardop-assigner are; default $CARGO_TARGET_DIR/debug or target/debug)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib.sh
source "$here/lib.sh"
# shellcheck source=hack/image-lib.sh
source "$here/image-lib.sh"

require_tool go "Go builds the pause and database stand-in images"
require_tool sha256sum "coreutils"
require_tool strip "binutils (apt-get install binutils) strips the debug info from the image's binaries"
require_tool ldd "libc-bin lists the shared libraries the binaries load"

bin_src=${1:-${CARGO_TARGET_DIR:-$repo_root/target}/debug}
out=$repo_root/target/images
work=$out/work
mkdir -p "$out"
log() { echo "build-image: $*" >&2; }

# The Dockerfile is the reference: the same user and default command.
image_user=$(dockerfile_user "$here/Dockerfile")
image_cmd=$(dockerfile_cmd "$here/Dockerfile")

copy_with_libraries() { # <rootfs> <binary> <destination>
  local root=$1 binary=$2 dest=$3 lib
  install -D -m 0755 "$binary" "$root$dest"
  strip --strip-debug "$root$dest"
  # ldd prints "name => /path (addr)" for libraries and "/path (addr)" for the loader.
  for lib in $(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    [[ -e "$root$lib" ]] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done
}

build_shardop_image() {
  local root=$work/shardop b
  for b in "${dockerfile_binaries[@]}"; do
    [[ -x "$bin_src/$b" ]] || die "$bin_src/$b is missing: build it first (cargo build -p shardop-worker -p shardop-assigner)"
    copy_with_libraries "$root" "$bin_src/$b" "/usr/local/bin/$b"
  done
  install -d -m 0755 "$root/etc"
  install -d -m 1777 "$root/tmp"
  # distroless' nonroot user, so a process (and `id`) in the image sees the same names.
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$root/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$root/etc/group"
  install -d -m 0700 -o 65532 -g 65532 "$root/home/nonroot"
  local tag
  tag=$(layer_tag "$root")
  oci_image "$out/shardop.tar" "$root" "$image_user" "$image_cmd" \
    "$SHARDOP_LOCAL_IMAGE_REPOSITORY:$tag" "$SHARDOP_CHART_IMAGE"
  echo "$out/shardop.tar $SHARDOP_LOCAL_IMAGE_REPOSITORY:$tag $SHARDOP_CHART_IMAGE"
}

build_go_image() { # <name> <reference> <user>
  local name=$1 ref=$2 user=$3 root=$work/$1
  mkdir -p "$root"
  (cd "$here/images" && CGO_ENABLED=0 GOFLAGS=-trimpath go build -ldflags "-s -w" -o "$root/$name" "./cmd/$name")
  oci_image "$out/$name.tar" "$root" "$user" "[\"/$name\"]" "$ref"
  echo "$out/$name.tar $ref"
}

# Unchanged inputs (binaries, helper sources, Dockerfile, these scripts): the images of the
# last build stand, which keeps a repeated `make node-up` at a few seconds.
inputs_stamp() {
  local b
  for b in "${dockerfile_binaries[@]}"; do [[ -f "$bin_src/$b" ]] && echo "$bin_src/$b"; done |
    cat - <(find "$here/images" "$here/Dockerfile" "$here/image-lib.sh" "${BASH_SOURCE[0]}" -type f | sort) |
    xargs sha256sum | sha256sum | cut -d' ' -f1
}
stamp=$(inputs_stamp)
if [[ -s "$out/refs" && "$(cat "$out/stamp" 2>/dev/null)" == "$stamp" ]]; then
  cat "$out/refs"
  exit 0
fi
rm -f "$out/stamp"
log "building the shardop image from $bin_src"
rm -rf "$work"
mkdir -p "$work"
{
  build_shardop_image
  build_go_image pause "$SHARDOP_PAUSE_IMAGE" 65535:65535
  build_go_image db-standin "$SHARDOP_DB_STANDIN_IMAGE" 65532:65532
} >"$out/refs"
rm -rf "$work"
echo "$stamp" >"$out/stamp"
cat "$out/refs"
