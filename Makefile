# agentrun: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
K8S_VERSION ?= 1.34
PYTEST_ARGS ?=
export K8S_VERSION

##@ General
.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m\n"} \
	  /^[a-zA-Z_-]+:.*?##/ { printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Development
# Python dependencies come from uv.lock (a universal lock: the host's Python and the image's
# 3.11.2 alike), installed by a pinned uv that lives in the cache, outside the repository.
UV_VERSION := 0.13.9
AGENTRUN_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/agentrun
UV := $(AGENTRUN_CACHE)/uv-$(UV_VERSION)/bin/uv
# Never download a Python: the lock resolves for the interpreter this machine has.
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
DEPS := PYTHON=$(PYTHON) scripts/install-deps.sh

.PHONY: deps
deps: ## Install the missing system packages for everything (DEPS_FOR=demo|test|oldest|e2e|all)
	@$(DEPS) $(or $(DEPS_FOR),all)

# deps-demo, deps-test, ...: what one purpose needs (quiet when nothing is missing).
.PHONY: deps-%
deps-%:
	@$(DEPS) $*

$(UV):
	@$(DEPS) python
	@echo "installing uv $(UV_VERSION) into $(AGENTRUN_CACHE)/uv-$(UV_VERSION)"
	@rm -rf $(AGENTRUN_CACHE)/uv-$(UV_VERSION)
	@$(PYTHON) -m venv $(AGENTRUN_CACHE)/uv-$(UV_VERSION)
	@$(AGENTRUN_CACHE)/uv-$(UV_VERSION)/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.installed: pyproject.toml uv.lock | $(UV)
	@# --locked: a pyproject.toml that disagrees with uv.lock fails here (run `make lock`).
	$(UV) sync --locked --extra dev --python $(PYTHON) --quiet
	@touch $@

.PHONY: install
install: $(VENV)/.installed ## Create .venv with exactly the locked versions of agentrun's dependencies

.PHONY: lock
lock: | $(UV) ## Refresh uv.lock from pyproject.toml (newest versions allowed; review the diff)
	$(UV) lock --upgrade --python $(PYTHON)

.PHONY: check-lock
check-lock: | $(UV) ## Fail if uv.lock does not match pyproject.toml
	@$(UV) lock --check --python $(PYTHON) --quiet \
	  || { echo "uv.lock is out of date with pyproject.toml: run \`make lock\` and commit it"; exit 1; }

.PHONY: crds
crds: install ## Regenerate crds/ and the chart's copy from the pydantic models
	$(BIN)/python -m agentrun_operator.crdgen

.PHONY: check-crds
check-crds: install ## Fail if crds/ drifted from the models
	$(BIN)/python -m agentrun_operator.crdgen --check

.PHONY: lint
lint: install check-lock ## uv.lock up to date, ruff, mypy --strict and import-linter
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	MYPYPATH=tests $(BIN)/mypy tests bench
	$(BIN)/lint-imports

.PHONY: fmt
fmt: install ## Format and auto-fix with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

##@ Test
.PHONY: controlplane
controlplane: ## Build (once, cached by version) the Kubernetes binaries the tests run (K8S_VERSION=1.20|1.34)
	@$(DEPS) $(if $(filter 1.20%,$(K8S_VERSION)),build-oldest,demo)
	@scripts/build-controlplane.sh >/dev/null

.PHONY: jaeger
jaeger: ## Build (once, cached by version) the Jaeger the tracing tests export to
	@$(DEPS) demo
	@scripts/build-jaeger.sh >/dev/null

.PHONY: test
# The reference MCP server the MCP tests run, from the committed lock (npm ci).
MCP_NODE := tests/mcp/node_modules/.package-lock.json
$(MCP_NODE): tests/mcp/package-lock.json
	@echo "[make] npm ci: the reference MCP server for the MCP tests (tests/mcp/package-lock.json)"
	npm ci --prefix tests/mcp --no-audit --no-fund --loglevel=error

# The Kubernetes MCP server the e2e tests run in a pod (a static binary from npm).
KMS_NODE := tests/e2e/kubernetes-mcp-server/node_modules/.package-lock.json
$(KMS_NODE): tests/e2e/kubernetes-mcp-server/package-lock.json
	@echo "[make] npm ci: kubernetes-mcp-server for the e2e tests (tests/e2e/kubernetes-mcp-server/package-lock.json)"
	npm ci --prefix tests/e2e/kubernetes-mcp-server --no-audit --no-fund --loglevel=error

test: deps-test lint check-crds controlplane jaeger $(MCP_NODE) ## Lint, CRD drift, unit and integration tests on Kubernetes $(K8S_VERSION)
	TEST_UV=$(UV) $(BIN)/pytest -m "not e2e" $(PYTEST_ARGS)

.PHONY: test-oldest
test-oldest: deps-oldest install $(MCP_NODE) ## The unit and integration tests on the oldest supported Kubernetes (1.20)
	$(MAKE) --no-print-directory controlplane K8S_VERSION=1.20
	@# Unit tests are pure (no Kubernetes in them), and scenarios marked newest_only do not
	@# depend on the version: both run once, in `make test`.
	K8S_VERSION=1.20 TEST_UV=$(UV) $(BIN)/pytest -m "not e2e" --ignore=tests/unit $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: install ## Unit tests only (no control plane, no Redis)
	TEST_UV=$(UV) $(BIN)/pytest tests/unit $(PYTEST_ARGS)

##@ Demo
.PHONY: demo
demo: deps-demo install controlplane ## Start the local control plane, Redis, mock LLM, operator; stream an example run
	@scripts/demo.sh

.PHONY: demo-check
demo-check: deps-demo install controlplane ## `make demo` without a person: exit 0 only when its runs reach Succeeded and AwaitingApproval
	@scripts/demo.sh check

.PHONY: demo-down
demo-down: ## Stop everything `make demo` started
	@scripts/demo.sh down

##@ SSE server
.PHONY: sse-dev
sse-dev: install ## Run the SSE server on 127.0.0.1:8080 without auth (dev only; your kubeconfig)
	$(BIN)/python -m agentrun_sse --no-auth

.PHONY: bench
bench: deps-test install controlplane ## Benchmarks: operator (stop latency, 200 runs) and SSE fan-out
	$(BIN)/python bench/bench_operator.py
	$(BIN)/python bench/bench_sse.py

.PHONY: bench-e2e
bench-e2e: deps-e2e install ## End-to-end figures on the real node, NODE_K8S_VERSION=1.34|1.20 (helm install -> Ready, apply -> first event, pod deleted -> resumed)
	K8S_VERSION=$(NODE_K8S_VERSION) $(BIN)/python bench/bench_e2e.py --rounds 3

##@ Image
IMAGE ?= agentrun:dev

.PHONY: wheelhouse
wheelhouse: install ## The locked runtime wheels (markers for the image's Python 3.11.2) and agentrun's own
	@UV=$(UV) PY=$(BIN)/python scripts/build-wheelhouse.sh

.PHONY: image
image: deps-image install ## Build the image with buildah on a debootstrap base (no Docker, no registry)
	scripts/build-image.sh localhost/$(IMAGE) .work/images/agentrun.tar

.PHONY: deploy
deploy: ## Install or upgrade the chart in the current KUBECONFIG (CRDs first: Helm never upgrades them)
	kubectl apply --server-side --force-conflicts -f crds/
	$$(scripts/get-helm.sh) upgrade --install agentrun charts/agentrun \
	  --namespace agentrun-system --create-namespace $(HELM_ARGS)

##@ End-to-end cluster
.PHONY: cluster-up
cluster-up: deps-e2e install ## Bring up (or reuse) a real single-node cluster here (NODE_K8S_VERSION=1.20|1.34); KUBECONFIG=.work/cluster/kubeconfig
	@scripts/cluster-up.sh >/dev/null

.PHONY: cluster-down
cluster-down: ## Remove the cluster and everything it changed on this host
	@scripts/cluster-down.sh

E2E_CLUSTER ?= local
NODE_K8S_VERSION ?= 1.34
export NODE_K8S_VERSION
.PHONY: e2e
e2e: deps-e2e install jaeger $(KMS_NODE) ## End-to-end tests: E2E_CLUSTER=local (a real node here, NODE_K8S_VERSION=1.34|1.20), kind, or existing (KUBECONFIG, E2E_IMAGE)
ifeq ($(E2E_CLUSTER),local)
	@scripts/cluster-up.sh >/dev/null
endif
	E2E_CLUSTER=$(E2E_CLUSTER) K8S_VERSION=$(NODE_K8S_VERSION) $(BIN)/pytest tests/e2e -m e2e $(PYTEST_ARGS)

.PHONY: e2e-oldest
e2e-oldest: deps-e2e deps-build-oldest install ## The e2e tests on a Kubernetes 1.20 node (replaces a running cluster of another version)
	@scripts/cluster-down.sh >/dev/null
	$(MAKE) e2e NODE_K8S_VERSION=1.20

##@ Cleanup
.PHONY: clean
clean: demo-down cluster-down ## Remove .venv, .work and caches (not the cached Kubernetes build)
	rm -rf $(VENV) .work dist .mypy_cache .ruff_cache .pytest_cache tests/mcp/node_modules
	find . -name __pycache__ -prune -exec rm -rf {} +
