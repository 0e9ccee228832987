# OptiInfra Orchestrator.  `make run` and `make test` do all their own set-up.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
IMAGE ?= optiinfra-orchestrator
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' optiinfra/__init__.py)
SOURCES := setup.py pyproject.toml $(shell find optiinfra twisted -name '*.py' -o -name '*.sql' -o -path '*/console/static/*' 2>/dev/null)

.PHONY: help deps browser-deps build run test lint fmt clean docker-build docker-run docker-test bench soak api-key contract

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# A plain (non-editable) install, as production has it, redone when sources change.
$(VENV)/.installed: $(BIN)/python $(SOURCES)
	$(BIN)/pip install --quiet '.[dev]'
	@# Write Twisted's plugin cache now, so a read-only site-packages never needs it.
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	@touch $@

deps: $(VENV)/.installed ## Create .venv and install the service with its dev tools

# The console's browser tests drive Debian's chromium through Playwright (never
# `playwright install`, which downloads a browser build of its own).
CHROMIUM ?= /usr/bin/chromium
browser-deps: ## Install Debian's chromium for the browser tests, when missing
	@test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

build: deps ## Build the wheel into dist/
	$(BIN)/pip wheel --quiet --no-deps -w dist .

run: deps ## Start the service in the foreground on $(PORT)
	cd $(CURDIR) && exec $(BIN)/twistd -n --pidfile= optiinfra --port $(PORT)

lint: deps ## ruff (lint and format check), strict mypy, and the layers (import-linter)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy optiinfra
	$(BIN)/lint-imports --no-cache

fmt: deps ## Format and auto-fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint browser-deps ## Every check: lint, types, tests with the coverage gate, the contract
	$(BIN)/pytest --cov=optiinfra --cov-report=term-missing $(PYTEST_ARGS)
	$(MAKE) contract

# Schemathesis against a real twistd with operator, viewer and agent keys: every
# check, fixed seed.  CONTRACT_ARGS="--seed random --max-examples 200 --coverage"
# is the larger local run (see README, Contract tests).
contract: deps ## Schemathesis: the service against its own /openapi.json
	$(BIN)/python -m tests.contract.run $(CONTRACT_ARGS)

bench: deps ## Throughput and latency against baselines measured in the same run
	$(BIN)/python bench/health.py
	$(BIN)/python bench/registry.py
	$(BIN)/python bench/tasks.py
	$(BIN)/python bench/coordination.py
	$(BIN)/python bench/events.py

soak: deps ## Minutes of 3x overload, then of 80 % load, beside the unloaded rate
	$(BIN)/python bench/soak.py

api-key: deps ## New API key: make api-key NAME=cost-agent ROLE=agent [KEYS=api-keys] [AGENTS=id,id | AGENT_TYPE=cost]
	@test -n "$(NAME)" -a -n "$(ROLE)" || { echo "usage: make api-key NAME=... ROLE=agent|operator|viewer [KEYS=file] [AGENTS=id,... | AGENT_TYPE=type]" >&2; exit 2; }
	$(BIN)/python -m optiinfra.auth new "$(NAME)" "$(ROLE)" $(if $(KEYS),--file "$(KEYS)") $(if $(AGENTS),--agents "$(AGENTS)") $(if $(AGENT_TYPE),--agent-type "$(AGENT_TYPE)")

docker-build: ## Build the container image (no registry access needed)
	bash deploy/docker/build.sh $(IMAGE):$(VERSION)

docker-run: docker-build ## Run the image on the host network, port 8080
	bash deploy/docker/dockerd.sh run --rm --network host $(IMAGE):$(VERSION)

docker-test: ## Build, then check size, read-only run, health and a clean stop
	bash deploy/docker/test.sh $(IMAGE):$(VERSION)

clean: ## Remove the venv, build output and caches
	rm -rf $(VENV) build dist wheels *.egg-info .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.* htmlcov .hypothesis .schemathesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -name dropin.cache -delete
