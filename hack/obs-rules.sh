#!/usr/bin/env bash
# Loads the chart's PrometheusRule groups for one release namespace into the Prometheus of
# hack/obs-up.sh: renders templates/prometheusrule.yaml with `helm template`, keeps its
# spec (the rule groups, in Prometheus' own rule-file format) and reloads Prometheus.
#
# Usage: hack/obs-rules.sh <release namespace> [helm template arguments...]
#   e.g. hack/obs-rules.sh shardop-system --set prometheusRule.shardWithoutHolder.for=10s
# The rule file is <cluster dir>/obs/rules/<namespace>.yaml; rerunning replaces it.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/lib.sh
source "$here/lib.sh"
# shellcheck source=hack/cluster-lib.sh
source "$here/cluster-lib.sh"
# shellcheck source=hack/obs-lib.sh
source "$here/obs-lib.sh"

[[ $# -ge 1 ]] || die "usage: hack/obs-rules.sh <release namespace> [helm template arguments...]"
namespace=$1
shift
bin_dir=$("$here/build-tools.sh")
mkdir -p "$obs_dir/rules"
rules="$obs_dir/rules/$namespace.yaml"

# The template ends with `spec:` and its groups; the groups, two spaces less indented, are a
# Prometheus rule file. Prometheus validates it on reload.
"$bin_dir/helm" template shardop "$repo_root/charts/shardop" --namespace "$namespace" \
  --set prometheusRule.enabled=true --show-only templates/prometheusrule.yaml "$@" |
  awk 'found { print substr($0, 3) } /^spec:$/ { found = 1 }' >"$rules.tmp"
grep -q '^groups:$' "$rules.tmp" || die "no rule groups in the rendered PrometheusRule ($rules.tmp)"
mv "$rules.tmp" "$rules"
prometheus_reload
echo "$rules"
