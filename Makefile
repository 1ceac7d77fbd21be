# shardop — the two set-up commands are `make demo` and `make test`; everything they need
# (the control plane built from source, the Rust toolchain check) is set up on first use.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
# Keep the e2e suite's processes within a 2-core machine's means.
E2E_TEST_THREADS ?= 2

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{ printf "  %-14s %s\n", $$1, $$2 }'

.PHONY: toolchain
toolchain: ## Check that cargo, rustfmt and clippy are installed
	@command -v $(CARGO) >/dev/null || { echo "error: cargo is not installed (install Rust with rustup)" >&2; exit 1; }
	@$(CARGO) fmt --version >/dev/null 2>&1 || { echo "error: rustfmt is missing: rustup component add rustfmt" >&2; exit 1; }
	@$(CARGO) clippy --version >/dev/null 2>&1 || { echo "error: clippy is missing: rustup component add clippy" >&2; exit 1; }

.PHONY: tools
tools: ## Build etcd, kube-apiserver, kube-controller-manager, kubectl and helm from source (cached)
	@bash hack/build-tools.sh >/dev/null

.PHONY: obs-tools
obs-tools: ## Build Prometheus, prometheus-adapter and the OTel collector from source (cached)
	@bash hack/build-obs-tools.sh >/dev/null

.PHONY: cluster-up
cluster-up: ## Start the local control plane (target/cluster/kubeconfig)
	@bash hack/cluster-up.sh

.PHONY: cluster-down
cluster-down: ## Stop the local control plane and remove its state
	@bash hack/cluster-down.sh

.PHONY: node-tools
node-tools: ## Build kubelet, kube-scheduler, kube-proxy and containerd from source (cached)
	@bash hack/build-node.sh >/dev/null

.PHONY: image
image: build ## Build shardop's image and the node's helper images into target/images (no registry)
	@bash hack/build-image.sh

.PHONY: node-up
node-up: build tools node-tools ## Add a node to the local control plane (starting it if needed), shardop's image loaded
	@bash hack/node-up.sh

.PHONY: node-down
node-down: ## Stop the local node and remove its state (the control plane keeps running)
	@bash hack/node-down.sh

.PHONY: obs-up
obs-up: ## Start Prometheus, prometheus-adapter (custom metrics API) and the OTel collector next to the local control plane
	@bash hack/obs-up.sh

.PHONY: obs-down
obs-down: ## Stop what obs-up started (cluster-down stops it too)
	@bash hack/obs-down.sh

.PHONY: build
build: toolchain ## Build the binaries
	$(CARGO) build --workspace --bins

.PHONY: crds
crds: ## Regenerate charts/shardop/crds from the Rust types
	rm -f charts/shardop/crds/*.yaml
	$(CARGO) run -q -p shardop-worker -- crd --output-dir charts/shardop/crds

.PHONY: fmt-check
fmt-check: toolchain
	$(CARGO) fmt --all -- --check

.PHONY: clippy
clippy: toolchain
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: unit
unit: toolchain ## Unit tests (no cluster needed)
	$(CARGO) test --workspace --exclude shardop-e2e

.PHONY: e2e
e2e: build tools node-tools obs-tools ## End-to-end tests against the local control plane and node (KEEP_CLUSTER=1 leaves them running)
	@bash hack/cluster-up.sh
	@status=0; $(CARGO) test -p shardop-e2e --tests -- --test-threads=$(E2E_TEST_THREADS) || status=$$?; \
	  if [[ -z "$${KEEP_CLUSTER:-}" ]]; then bash hack/cluster-down.sh; fi; exit $$status

.PHONY: test
test: toolchain fmt-check clippy unit e2e bench-smoke ## The whole suite: fmt, clippy, unit, e2e tests and the benchmark smoke runs

.PHONY: demo
# The demo runs on a control plane of its own (target/demo-cluster, port 16543), so
# `make test` can run (and stop its own cluster) while the demo keeps running.
demo: build tools ## Run shardop on a control plane of its own (target/demo-cluster) and show the shard table
	@bash hack/demo.sh

.PHONY: demo-down
demo-down: ## Stop the demo: its operator processes and its control plane (only stops things)
	@bash hack/demo.sh down

CHART_ALL_FEATURES := metrics.serviceMonitor.enabled=true,prometheusRule.enabled=true,prometheusAdapter.rulesConfigMap=true,worker.autoscaling.enabled=true,apf.enabled=true,networkPolicy.enabled=true,dashboard.enabled=true

.PHONY: chart-lint
chart-lint: tools ## Lint charts/shardop (defaults, every feature, KEDA) and parse its PromQL with Prometheus' parser
	@helm="$$(bash hack/build-tools.sh)/helm"; promql="$$(bash hack/build-promql-check.sh)"; \
	  "$$helm" lint --strict charts/shardop; \
	  "$$helm" lint --strict charts/shardop --set '$(CHART_ALL_FEATURES)'; \
	  "$$helm" lint --strict charts/shardop --set keda.enabled=true,prometheusRule.enabled=true; \
	  report="$$("$$helm" template shardop charts/shardop --set '$(CHART_ALL_FEATURES)' | "$$promql")" \
	    || { echo "$$report" | grep -v '^ok'; exit 1; }; \
	  echo "PromQL: $$(echo "$$report" | tail -n 1)"

# ---------------------------------------------------------------------------------------
# Benchmarks (crates/bench, docs/performance.md). They run on a control plane of their own
# (target/bench-cluster, other ports), so they never disturb the e2e suite's cluster, and
# with worker builds that include the fault hook (cargo feature fault-injection).
# ---------------------------------------------------------------------------------------
BENCH_APISERVER_PORT ?= 17443
BENCH_ETCD_PORT ?= 24790
BENCH_ETCD_PEER_PORT ?= 24800
# The bench binary runs outside cargo, so it would find the checkout by the path it was
# compiled in; with a CARGO_TARGET_DIR shared between checkouts that may be another one.
BENCH_CLUSTER_ENV := CARGO_MANIFEST_DIR=$(CURDIR)/crates/bench SHARDOP_CLUSTER_DIR=$(CURDIR)/target/bench-cluster SHARDOP_APISERVER_PORT=$(BENCH_APISERVER_PORT) SHARDOP_ETCD_PORT=$(BENCH_ETCD_PORT) SHARDOP_ETCD_PEER_PORT=$(BENCH_ETCD_PEER_PORT)
# Where cargo puts binaries (.ci/run moves the target directory out of the clone).
TARGET_DIR = $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
BENCH_FEATURES := --features shardop-worker/fault-injection
# release (default) or dev; the figures in docs/performance.md are from release builds.
BENCH_PROFILE ?= release
BENCH_BIN_DIR = $(TARGET_DIR)/$(if $(filter dev,$(BENCH_PROFILE)),debug,$(BENCH_PROFILE))
SCENARIO ?= create

.PHONY: bench
bench: toolchain tools ## Run benchmark SCENARIO (one or more of raw create restart rescale failover delete throttle churn slowdep crash cleanupdep freeze tenants assign; knobs OBJECTS SHARDS DURATION RATE ...)
	$(CARGO) build --profile $(BENCH_PROFILE) -p shardop-worker -p shardop-assigner -p shardop-bench -p shardop-example-tenants $(BENCH_FEATURES)
	@export $(BENCH_CLUSTER_ENV) SHARDOP_BIN_DIR=$(BENCH_BIN_DIR); status=0; \
	  for scenario in $(SCENARIO); do \
	    "$(BENCH_BIN_DIR)/shardop-bench" "$$scenario" || status=$$?; \
	  done; \
	  if [[ -z "$${KEEP_CLUSTER:-}" ]]; then bash hack/cluster-down.sh 2>/dev/null; fi; exit $$status

.PHONY: bench-report
bench-report: ## Regenerate docs/performance.md from target/bench/*.json
	$(CARGO) run -q -p shardop-bench -- report

# Every scenario, small: OBJECTS=200 (60 for throttle, whose priority level admits only
# ~12 writes/s, and for freeze, whose frozen worker writes once a second), 30 s of churn, a
# 5 s slow dependency. They share one
# fresh control plane (REUSE_CLUSTER) to stay within a few minutes, and fail on any
# violated correctness field (writes on restart, dual ownership, relabels, overlap, stuck or
# orphaned objects, duplicated side effects, late writes after a Lease was taken).
# rescale-fixed is rescale with a fixed shard count (FIXED_SHARDS=6): shards move between
# workers instead of objects between shards. Last, `leftovers` checks that every namespace
# the scenarios created is gone (none stuck Terminating on finalizers nobody removes).
SMOKE_SCENARIOS := raw create restart rescale rescale-fixed failover delete throttle churn slowdep crash cleanupdep freeze tenants assign leftovers
SMOKE_KNOBS := OBJECTS=200 RAW_OBJECTS=100 SHARDS=3 DURATION=30s CREATE_RATE=40 SLOW_OBJECTS=3 SLOW_DELAY=5s CRASHES=2 TIMEOUT=240s BENCH_DIR=$(CURDIR)/target/bench-smoke REUSE_CLUSTER=true

.PHONY: bench-smoke
bench-smoke: toolchain tools ## A fast version of every benchmark scenario (part of the test suite)
	$(CARGO) build --workspace --bins $(BENCH_FEATURES)
	@export $(BENCH_CLUSTER_ENV) SHARDOP_BIN_DIR=$(TARGET_DIR)/debug; \
	  mkdir -p target/bench-smoke; bash hack/cluster-down.sh 2>/dev/null; status=0; passed=0; failed=0; \
	  for scenario in $(SMOKE_SCENARIOS); do \
	    started=$$SECONDS; extra=; run=$$scenario; \
	    if [[ "$$scenario" == throttle || "$$scenario" == freeze ]]; then extra=OBJECTS=60; fi; \
	    if [[ "$$scenario" == rescale-fixed ]]; then run=rescale; extra="FIXED_SHARDS=6 BENCH_DIR=$(CURDIR)/target/bench-smoke/fixed"; fi; \
	    if env $(SMOKE_KNOBS) $$extra "$(TARGET_DIR)/debug/shardop-bench" "$$run" \
	         >"target/bench-smoke/$$scenario.out" 2>"target/bench-smoke/$$scenario.log"; then \
	      passed=$$((passed + 1)); echo "bench-smoke: $$scenario ok ($$((SECONDS - started)) s)"; \
	    else \
	      status=1; failed=$$((failed + 1)); echo "bench-smoke: $$scenario FAILED ($$((SECONDS - started)) s); last lines of target/bench-smoke/$$scenario.log:"; \
	      tail -n 20 "target/bench-smoke/$$scenario.log"; cat "target/bench-smoke/$$scenario.out"; \
	    fi; \
	  done; \
	  bash hack/cluster-down.sh 2>/dev/null; \
	  echo "bench-smoke: $$passed passed, $$failed failed"; exit $$status
