#!/usr/bin/env bash
# Builds hack/promql-check (Prometheus' own PromQL parser, pinned by hack/promql-check/go.mod
# and go.sum) through the Go module proxy into the tool cache, next to the control plane's
# tools, and prints the path of the binary on stdout. A no-op once it is cached.
#
# The cache key is the hash of the checker's sources, go.mod and go.sum, so editing it or
# bumping the Prometheus version builds a fresh binary instead of reusing a stale one.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib.sh
source "$here/lib.sh"

require_tool go "Go is needed to build the PromQL checker (https://go.dev/doc/install)"

src="$here/promql-check"
prometheus_version=$(awk '$1 == "github.com/prometheus/prometheus" { print $2; exit }' "$src/go.mod")
[[ -n "$prometheus_version" ]] || die "hack/promql-check/go.mod does not require github.com/prometheus/prometheus"
key=$(cat "$src/go.mod" "$src/go.sum" "$src"/*.go | sha256sum | cut -c1-12)
base="${SHARDOP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shardop}"
bin="$base/promql-check-$prometheus_version-$key/bin/promql-check"

if [[ ! -x "$bin" ]]; then
  echo "build-promql-check: building the PromQL parser of prometheus $prometheus_version" >&2
  mkdir -p "$(dirname "$bin")"
  # -mod=readonly: go.sum is committed, a build must never rewrite it.
  (cd "$src" && CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly -trimpath -buildvcs=false" \
    go build -ldflags "-s -w" -o "$bin.tmp" . >&2)
  mv "$bin.tmp" "$bin"
fi
echo "$bin"
