# make install | test | test-fast | bench | demo | plan EXP=name | sweep EXP=name | report EXP=name
# | ui | server | gpu-check
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build lies on the project's machines; on a GPU machine PyPI's torch==2.13.0 is CUDA.
TORCH ?= torch==2.13.0
EXP ?= demo
PORT ?= 5000
TRACKING_URI ?= sqlite:///mlflow.db
# make server: a PostgreSQL database for the runs, a folder for the artifacts the server serves.
BACKEND_STORE_URI ?= postgresql://harness:harness@127.0.0.1:5432/harness
ARTIFACTS ?= mlartifacts

.PHONY: help install test test-fast bench demo plan sweep report ui server gpu-check

# The first target: `make` alone prints this.
help:
	@echo "make install            build .venv (torch $(TORCH), the project, its test extras)"
	@echo "make test               the whole test suite (slow end-to-end tests included)"
	@echo "make test-fast          the suite without the slow tests"
	@echo "make demo               the CPU demo grid, then its report in reports/demo/"
	@echo "make plan EXP=name      an experiment's plan and GPU memory estimates, nothing run"
	@echo "make sweep EXP=name     run an experiment (ARGS=\"key=value ...\" to adjust)"
	@echo "make report EXP=name    reports/name/: tables, recommendation, charts, slides"
	@echo "make ui                 the MLflow UI on http://127.0.0.1:$(PORT)"
	@echo "make server             a shared MLflow tracking server (PostgreSQL)"
	@echo "make bench              the benchmarks, into reports/bench/"
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

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

# Results land in reports/bench/<device>.md and .json.
bench: install
	$(PY) bench/run.py $(ARGS)

demo: install
	$(PY) -m harness -cd experiments -cn demo
	$(PY) -m harness.report --experiment demo --tracking-uri $(TRACKING_URI)

# The plan of an experiment, without a GPU and without running anything: reports/$(EXP)/plan.csv.
plan: install
	$(PY) -m harness.plan $(EXP) $(ARGS)

sweep: install
	$(PY) -m harness -cd experiments -cn $(EXP) $(ARGS)

report: install
	$(PY) -m harness.report --experiment $(EXP) --tracking-uri $(TRACKING_URI)

ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri $(TRACKING_URI) --host 127.0.0.1 --port $(PORT)

# A tracking server on this machine's loopback only; sweeps log to it with tracking=server
# (MLFLOW_TRACKING_URI=http://127.0.0.1:$(PORT)). Put a reverse proxy with authentication in
# front of it before opening it to a network.
server: install
	$(VENV)/bin/mlflow server --backend-store-uri $(BACKEND_STORE_URI) \
		--artifacts-destination $(ARTIFACTS) --host 127.0.0.1 --port $(PORT)

# On a CUDA GPU: the reference rows (and LoRA+LOMO, nf4, the 8-bit and paged optimizers, a causal
# 7B) with random weights for a few dozen steps, and the benchmarks; writes reports/gpu-<device>/.
# ROWS=base_full,xl_lora_nf4 (options of experiments/check_row/) and PARTS=cells,bench run a part
# of it into the same store.
gpu-check: install
	$(PY) -m harness.gpu_check $(if $(ROWS),--rows $(ROWS)) $(if $(PARTS),--parts $(PARTS))
