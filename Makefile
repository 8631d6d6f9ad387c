# atmorep-pipeline: `make demo` runs the whole pipeline on real ERA5, `make test` the test suite.
# Both create the virtual environment in .venv and install the project into it first.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin

# Telemetry off and gloo on loopback, before anything imports mlflow, prefect or torch.
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GLOO_SOCKET_IFNAME := lo
# Seconds Prefect waits for its temporary API server (default 20), which a busy machine can exceed.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

# Everything the pipeline writes goes under ATMOREP_HOME: data, catalog, checkpoints,
# the MLflow store and the Prefect database.
export ATMOREP_HOME ?= $(CURDIR)/runs
export PREFECT_HOME ?= $(ATMOREP_HOME)/prefect
export ATMOREP_PROJECT_DIR := $(CURDIR)

PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
WORK_POOL ?= atmorep-process

.PHONY: help venv demo skill test test-fast bench ui deploy worker clean docker-check

help:
	@echo "make demo    run ingest, pretraining, zero-shot evaluation and fine-tuning on the sample"
	@echo "make skill   the pipeline with the skill preset (about 45 min on 2 cores): the skill table of docs/skill.md"
	@echo "make test    run the test suite (needs ATMOREP_DATA_MIRROR or ../shared/data)"
	@echo "make ui      serve the Prefect UI on :$(PREFECT_PORT) and the MLflow UI on :$(MLFLOW_PORT)"
	@echo "make deploy  create the work pool and the deployments on the Prefect server of make ui"
	@echo "make worker  start a process worker for the deployments"
	@echo "make docker-check  validate docker/compose.yaml and lint the Dockerfiles (no Docker engine needed)"
	@echo "make bench   measure ingestion and training throughput, written to bench-results/ and BENCHMARKS.md"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/atmorep pipeline

# The skill table of docs/skill.md: longer training with hourly time tokens.
skill: venv
	$(BIN)/atmorep pipeline --preset skill

test: venv
	$(BIN)/pytest

test-fast: venv
	$(BIN)/pytest -m "not slow"

ui: venv
	@mkdir -p $(ATMOREP_HOME)/mlartifacts
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)   MLflow UI: http://127.0.0.1:$(MLFLOW_PORT)"
	@trap 'trap - EXIT INT TERM; kill 0' EXIT INT TERM; \
	$(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 \
		--backend-store-uri sqlite:///$(ATMOREP_HOME)/mlflow.db \
		--artifacts-destination $(ATMOREP_HOME)/mlartifacts & \
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) & \
	wait

deploy: venv
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/prefect work-pool create $(WORK_POOL) --type process --overwrite
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/prefect work-pool create atmorep-docker --type docker --overwrite
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/prefect --no-prompt deploy --all

worker: venv
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/prefect worker start --pool $(WORK_POOL)

docker-check: venv
	docker/check.sh $(BIN)/python

clean:
	rm -rf $(ATMOREP_HOME)

bench: venv
	ATMOREP_DATA_MIRROR=$${ATMOREP_DATA_MIRROR:-$(CURDIR)/../shared/data} $(BIN)/python tests/benchmarks/bench_ingest.py --update-page
	ATMOREP_DATA_MIRROR=$${ATMOREP_DATA_MIRROR:-$(CURDIR)/../shared/data} $(BIN)/python tests/benchmarks/bench_train.py --update-page
