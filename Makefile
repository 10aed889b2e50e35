# The README's commands. Everything heavy (the virtualenv, Go modules and
# builds, Kubernetes binaries) is cached outside the checkout, keyed by version.
SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/derpfleet
PYTHON ?= python3
PYVER := $(shell $(PYTHON) -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
VENV ?= $(CACHE)/venv-py$(PYVER)
BIN := $(VENV)/bin
# The install is editable, so the stamp names the checkout too: a venv shared by
# two checkouts (say, CI's and a developer's) must import from the one running.
STAMP := $(VENV)/.installed-$(shell { cat pyproject.toml; echo '$(CURDIR)'; } | sha256sum | cut -c1-16)

.PHONY: setup speedups demo relay-demo test lint unit interop e2e node-packages cluster-build tailnet-build cluster-up cluster-down clean-venv chart-crds bundle bench bench-storm bench-smoke bench-profile

$(STAMP): pyproject.toml
	@echo ">> preparing the virtualenv in $(VENV) for $(CURDIR) (cached; redone when pyproject.toml changes)"
	@mkdir -p $(CACHE)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip
	@$(BIN)/pip install --quiet -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP)

## speedups: compile the per-packet modules with mypyc (cached in $(CACHE)/speedups by source, Python and mypyc) and link them into $(VENV)
speedups: setup
	$(BIN)/python relay/build_speedups.py --cache $(CACHE)/speedups

## demo: a local Kubernetes, the operator and the example region: prints the probed, published DERP map
demo: cluster-build
	$(CLUSTER_ENV) $(BIN)/python -m derpcluster.demo

## relay-demo: one relay on loopback in dev mode (self-signed TLS, STUN) and its DERP map
relay-demo: setup
	$(BIN)/derp-relay --dev

## test: everything CI runs: lint, type checks, unit and integration tests, Go interop
test: lint unit interop e2e bench-smoke

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy bench/hotpath.py bench/workerpath.py charts/derpfleet/files/helm_test.py relay/build_speedups.py

# The relay's tests run twice: on the compiled modules, then on their pure-Python source.
unit: speedups
	DERP_RELAY_EXPECT_SPEEDUPS=compiled $(BIN)/pytest
	DERP_RELAY_NO_SPEEDUPS=1 DERP_RELAY_EXPECT_SPEEDUPS=pure $(BIN)/pytest relay/tests

interop: setup
	@if [ -x e2e/interop/run ]; then PATH="$(BIN):$$PATH" CACHE="$(CACHE)" e2e/interop/run; \
	 else echo ">> e2e/interop not present yet"; fi

BENCH := PATH="$(BIN):$$PATH" CACHE="$(CACHE)" bench/run

## bench: derp-relay vs. Tailscale's derper, side by side; writes bench/results.json and bench/RESULTS.md
## BEFORE=<commit> measures that commit's relay too, in the same rounds (a git worktree in $(CACHE))
BEFORE_TREE = $(CACHE)/bench-before-$(shell git rev-parse --short $(BEFORE))
bench: setup
	$(if $(BEFORE),git worktree prune && { test -d $(BEFORE_TREE) || git worktree add --detach $(BEFORE_TREE) $(BEFORE); })
	$(BENCH) -json results.json -markdown RESULTS.md -notes method.md $(if $(BEFORE),-relay-before $(BEFORE_TREE)) $(BENCH_ARGS)

## bench-storm: handshakes/s and innocent pairs' latency during a connection storm, derp-relay vs. derper; writes bench/storm.json and bench/STORM.md
bench-storm: setup
	$(if $(BEFORE),git worktree prune && { test -d $(BEFORE_TREE) || git worktree add --detach $(BEFORE_TREE) $(BEFORE); })
	$(BENCH) -storm -json storm.json -markdown STORM.md $(if $(BEFORE),-relay-before $(BEFORE_TREE)) $(BENCH_ARGS)

## bench-smoke: a few seconds of the benchmark, both relays, and of bench/hotpath.py and bench/workerpath.py (checks delivery, not speed)
bench-smoke: setup
	$(BENCH) -smoke -rounds 1 -pairs 2 -sizes 1200 -peers 3 -sweep 1,2 -warmup 300ms -duration 1s -idle 20
	$(BIN)/python bench/hotpath.py --packets 2000 --repeats 1
	PATH="$(BIN):$$PATH" $(BIN)/python bench/workerpath.py --seconds 0.5

## bench-profile: py-spy flame graphs of derp-relay under the benchmark's load, in bench/profile/
bench-profile: setup
	$(BIN)/pip install --quiet py-spy
	$(BENCH) -rounds 1 -idle '' -sweep '' -profile profile $(BENCH_ARGS)

## chart-crds: copy the CRD (crds/ is its single source) into the Helm chart
chart-crds:
	cp crds/derpregion.yaml charts/derpfleet/crds/derpregion.yaml

## bundle: render the chart into deploy/derpfleet.yaml, the single-file `kubectl apply -f` install
bundle: cluster-build chart-crds
	$(CLUSTER_ENV) $(BIN)/python -m derpcluster.bundle

CLUSTER_ENV := PYTHONPATH=e2e/cluster CACHE="$(CACHE)" PATH="$(BIN):$$PATH"
CLUSTER := $(CLUSTER_ENV) $(BIN)/python -m derpcluster

## node-packages: Debian's containerd, runc, CNI plugins, iptables, buildah, debootstrap (once; skipped when present)
node-packages:
	e2e/cluster/install-node-packages

## cluster-build: build (once, cached in $(CACHE)) Kubernetes, its kubelet, etcd and helm for the local cluster
cluster-build: setup node-packages
	$(CLUSTER) build

## tailnet-build: build (once, cached in $(CACHE)) Headscale, tailscale and tailscaled for the tailnet test
tailnet-build: setup
	$(CLUSTER_ENV) $(BIN)/python -m derpcluster.tailnet_binaries

## cluster-up: a local Kubernetes on loopback (control plane + 3 fake nodes; REAL_NODE=1 adds a real kubelet node), left running
cluster-up: cluster-build
	$(CLUSTER) up $(if $(REAL_NODE),--real-node)

## cluster-down: stop what cluster-up started
cluster-down: setup
	$(CLUSTER) down

## e2e: the cluster's own tests, the operator's end-to-end tests, and real Headscale and tailscaled on the map
## E2E_ARGS="-k real_node" passes pytest options, e.g. to run a subset
e2e: cluster-build tailnet-build
	CACHE="$(CACHE)" PATH="$(BIN):$$PATH" $(BIN)/pytest e2e/tests $(E2E_ARGS)

clean-venv:
	rm -rf $(VENV)
