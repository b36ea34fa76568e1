# make install | test | test-fast | lint | bench | demo | plan EXP=name | validity | sweep EXP=name
# | report EXP=name | sync | faults | ui | server | gpu-wheels | gpu-rehearsal | gpu-check
PYTHON ?= python3
VENV := .venv
PY ?= $(VENV)/bin/python
# PY=python3 (the lent GPU machine, after `. gpu/env.sh`): that interpreter as it is, no install.
INSTALL := $(if $(filter $(VENV)/bin/python,$(PY)),install)
# The CPU build lies on the project's machines; on a GPU machine PyPI's torch==2.13.0 is CUDA.
TORCH ?= torch==2.13.0
EXP ?= demo
# make report: other experiments' plans (their plan.csv) as estimated sections at the end; the
# demo's report ends with the reference table's, so regenerating it gives the same report.
PLAN ?= $(if $(filter demo,$(EXP)),reports/reference_table/plan.csv)
PORT ?= 5000
HOST ?= 127.0.0.1
TRACKING_URI ?= sqlite:///mlflow.db
# make server: a PostgreSQL database for the runs, a folder for the artifacts the server serves.
BACKEND_STORE_URI ?= postgresql://harness:harness@127.0.0.1:5432/harness
ARTIFACTS ?= mlartifacts

.PHONY: help install test test-fast lint bench calibrate faults docs demo plan validity sweep report sync ui server gpu-wheels \
	gpu-rehearsal gpu-check

# The first target: `make` alone prints this.
help:
	@echo "make install            build .venv (torch $(TORCH), the project, its test extras)"
	@echo "make test               the whole test suite (slow end-to-end tests included)"
	@echo "make test-fast          the suite without the slow tests"
	@echo "make lint               ruff (pyproject's [tool.ruff]) on the code and tests"
	@echo "make demo               the CPU demo grid, then its report in reports/demo/"
	@echo "make plan EXP=name      an experiment's plan and GPU memory estimates, nothing run"
	@echo "make validity           every published figure beside its estimate: reports/validity.md"
	@echo "make sweep EXP=name     run an experiment (ARGS=\"key=value ...\" to adjust)"
	@echo "make report EXP=name    reports/name/: tables, recommendation, charts, slides"
	@echo "make sync               deliver what runs journaled while their store did not answer"
	@echo "make ui                 the MLflow UI on http://127.0.0.1:$(PORT)"
	@echo "make server             a shared MLflow tracking server (PostgreSQL)"
	@echo "make bench              the benchmarks, into reports/bench/"
	@echo "make calibrate          measure this device's operations for the time model"
	@echo "make faults             the fault suite on real processes, into reports/faults.md"
	@echo "make docs               docs/configuration.md and docs/mlflow-names.md from the code"
	@echo "make gpu-wheels         .whl/: the wheels the lent GPU machine lacks (docs/gpu-check.md)"
	@echo "make gpu-rehearsal      the GPU machine's set-up rehearsed here, offline, on the CPU"
	@echo "make gpu-check          on a CUDA GPU: reference rows, estimates, benchmarks"
	@echo "experiments (EXP=...):  $(basename $(notdir $(wildcard experiments/*.yaml)))"

install: $(VENV)/.installed

# Reinstalls only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,server]"
	touch $@

test: $(INSTALL)
	$(PY) -m pytest

test-fast: $(INSTALL)
	$(PY) -m pytest -m "not slow"

# The import layers are a test (tests/test_layers.py); style and likely bugs are ruff's.
lint: $(INSTALL)
	$(PY) -m ruff check harness bench gpu tests

# Results land in reports/bench/<device>.md and .json.
bench: $(INSTALL)
	$(PY) bench/run.py $(ARGS)
	$(PY) bench/time_model.py

# What this device's operations achieve, for the time model (harness/measure/calibration.py),
# cached per device and library versions; run again after an upgrade or on another machine.
calibrate: $(INSTALL)
	$(PY) -m harness.measure.calibration $(ARGS)

# Runners killed, a tracking server gone mid-cell, sweeps at once, bad inputs: reports/faults.md.
# The PostgreSQL cases need a server: eval "$$(bash .ci/services.sh)" first (as CI does).
faults: $(INSTALL)
	$(PY) bench/faults.py $(ARGS)

# The configuration reference, generated from the schema; tests/test_schema.py checks it is current.
docs: $(INSTALL)
	$(PY) -m harness.config.keys --markdown > docs/configuration.md
	$(PY) -m harness.tracking.names > docs/mlflow-names.md

# The demo grid, then its tiny LLaMA cells (bf16 without master weights), into one experiment.
# The demo's report ends with the reference table's plan: what flan-t5 needs on the study's A10G
# (runner.gpus=[]: against it, even on a machine with a GPU of its own), estimated here.
demo: $(INSTALL)
	$(PY) -m harness -cd experiments -cn demo
	$(PY) -m harness -cd experiments -cn demo_llama
	$(PY) -m harness.plan reference_table 'runner.gpus=[]'
	$(MAKE) report EXP=demo

# The plan of an experiment, without a GPU and without running anything: reports/$(EXP)/plan.csv.
plan: $(INSTALL)
	$(PY) -m harness.plan $(EXP) $(ARGS)

# Every published figure beside its estimate (harness/core/reference.yaml, the experiments' plans,
# cached): reports/validity.md, .csv and .png. docs/validity.md.
validity: $(INSTALL)
	$(PY) -m harness.validity $(ARGS)

sweep: $(INSTALL)
	$(PY) -m harness -cd experiments -cn $(EXP) $(ARGS)

report: $(INSTALL)
	$(PY) -m harness.report --experiment $(EXP) --tracking-uri $(TRACKING_URI) \
		$(foreach plan,$(PLAN),--plan $(plan))

# Runs whose tracking store did not answer by the time their cell ended kept the rest in their
# journal (tracking.journal_dir); this delivers it, idempotently: running it twice writes nothing
# twice.
sync: $(INSTALL)
	$(PY) -m harness.sync $(ARGS)

# Without MLflow's server job runner, as make server (harness/server.py says why).
ui: $(INSTALL)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
		$(VENV)/bin/mlflow ui --backend-store-uri $(TRACKING_URI) --host 127.0.0.1 --port $(PORT)

# A shared tracking server: on this machine's loopback only (HOST=127.0.0.1, the default), or on
# another interface (HOST=0.0.0.0, or the address colleagues and cluster nodes reach) with
# MLflow's basic-auth app and an admin password (MLFLOW_AUTH_ADMIN_PASSWORD, else one made in
# .harness/server/admin-password, readable by you alone); it refuses to listen beyond loopback
# without. Sweeps log to it with tracking=server (MLFLOW_TRACKING_URI=http://host:port) and
# authenticate with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. ARGS go to mlflow server.
server: $(INSTALL)
	$(PY) -m harness.server --host $(HOST) --port $(PORT) \
		--backend-store-uri $(BACKEND_STORE_URI) --artifacts-destination $(ARTIFACTS) \
		$(if $(ARGS),-- $(ARGS))

# The lent GPU machine has no network: what it lacks travels as wheels in .whl/ (git ignores it).
gpu-wheels: install
	$(PY) gpu/wheelhouse.py

# Here, offline: pip's resolver for the machine's Python against .whl/ and the machine's list, then
# gpu/env.sh and `make gpu-check PY=python3` on a stand-in for the machine, one tiny cell on the CPU.
gpu-rehearsal: install
	$(PY) gpu/rehearse.py

# On a CUDA GPU: the reference rows (and LoRA+LOMO, nf4, the 8-bit and paged optimizers, a causal
# 7B) with random weights for a few dozen steps, the GPU tests and the benchmarks; writes
# reports/gpu-<device>/. CALL=1|2|3|4 is one of the four device calls that make the whole check
# (docs/gpu-check.md); ROWS=base_full,xl_lora_nf4 (options of experiments/check_row/) and
# PARTS=preflight,cells,tests,bench run a part of it into the same store; ARGS="key=value ..."
# go to every cell. On the lent machine: `. gpu/env.sh && make gpu-check PY=python3 CALL=1`.
gpu-check: $(INSTALL)
	$(PY) -m harness.gpu_check $(if $(CALL),--call $(CALL)) $(if $(ROWS),--rows $(ROWS)) \
		$(if $(PARTS),--parts $(PARTS)) $(if $(OUT),--out $(OUT)) \
		$(if $(STORE),--store $(STORE)) $(ARGS)
