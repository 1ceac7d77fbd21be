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

.PHONY: cluster-up
cluster-up: ## Start the local control plane (target/cluster/kubeconfig)
	@bash hack/cluster-up.sh

.PHONY: cluster-down
cluster-down: ## Stop the local control plane and remove its state
	@bash hack/cluster-down.sh

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
e2e: build tools ## End-to-end tests against the local control plane (KEEP_CLUSTER=1 leaves it running)
	@bash hack/cluster-up.sh
	@status=0; $(CARGO) test -p shardop-e2e -- --test-threads=$(E2E_TEST_THREADS) || status=$$?; \
	  if [[ -z "$${KEEP_CLUSTER:-}" ]]; then bash hack/cluster-down.sh; fi; exit $$status

.PHONY: test
test: toolchain fmt-check clippy unit e2e ## The whole suite: fmt, clippy, unit and e2e tests

.PHONY: demo
demo: build tools ## Run shardop on the local control plane and show the shard table
	@bash hack/demo.sh

.PHONY: demo-down
demo-down: ## Stop the demo's operator processes
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
