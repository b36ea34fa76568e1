"""The command line as users type it: Hydra multirun of an experiment, the report, and errors."""

import json
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch

from harness.report import report
from tests.conftest import REPO, folder_store_overrides, free_port, run_harness, runs_of

pytestmark = pytest.mark.slow


def test_demo_grid_runs_and_reports_a_row_per_run(demo_sweep):
    # The demo experiment as `make demo` runs it, narrowed to t5-tiny and a few steps.
    result, tmp_path = demo_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    store = {"uri": f"sqlite:///{tmp_path}/mlflow.db"}
    runs = runs_of(store, "demo")
    outcome = sorted((run.data.tags["mlflow.runName"], run.data.tags["status"]) for run in runs)
    # Ranks collapse for the methods without adapters; int8 skips every method but lora.
    assert outcome == sorted([
        ("t5-tiny/full/fp32", "ok"), ("t5-tiny/full/int8", "skipped"),
        ("t5-tiny/full_sgd/fp32", "ok"), ("t5-tiny/full_sgd/int8", "skipped"),
        ("t5-tiny/lomo/fp32", "ok"), ("t5-tiny/lomo/int8", "skipped"),
        *[(f"t5-tiny/lora-r{r}/{p}", "ok") for r in (4, 8) for p in ("fp32", "int8")],
        *[(f"t5-tiny/lora_lomo-r{r}/fp32", "ok") for r in (4, 8)],
        *[(f"t5-tiny/lora_lomo-r{r}/int8", "skipped") for r in (4, 8)]])
    assert all(run.info.status != "RUNNING" for run in runs)
    # The plan's checks, made once and handed to each cell's runner in the sweep's folder: a
    # grid point that is another's cell (ranks of a method without adapters) is not run again.
    [handed] = (tmp_path / "outputs" / "sweeps").glob("*/checks.json")
    assert len(json.loads(handed.read_text())) == 20
    assert result.stdout.count("of this sweep (cell ") == 20 - 14
    # The plan comes first, one row per cell with skip reasons; the summary last, from MLflow.
    plan_start, summary_start = (result.stdout.index("[harness] plan of demo: 20 grid points, "
                                                     "14 cells: 9 to run, 5 to skip"),
                                 result.stdout.index("[harness] summary of demo:"))
    assert plan_start < result.stdout.index("[harness] cell 1/14: t5-tiny/full/fp32") \
        < result.stdout.index("[harness] cell 14/14 done: skipped") < summary_start
    plan_rows = [line for line in result.stdout[plan_start:summary_start].splitlines()
                 if line.startswith("| ") and "t5-tiny/" in line]
    assert len(plan_rows) == 14 and "| skip " in plan_rows[1]
    # The demo names no GPU: its cells' FLOPs, but no predicted time or bill, and why.
    assert "[harness] no predicted time: the plan knows no peaks for a machine without a GPU " \
           "(set plan_gpu)" in result.stdout[plan_start:summary_start]
    assert "which precision=int8 stores quantized and cannot update" in plan_rows[1]
    summary_rows = [line for line in result.stdout[summary_start:].splitlines()
                    if line.startswith("| t5-tiny/")]
    assert sorted(row.split("|")[1].strip() for row in summary_rows) == sorted(
        name for name, _ in outcome)

    # As make demo reports it: ending with the reference table's estimated plan.
    out = tmp_path / "report"
    assert report.main(["--experiment", "demo", "--tracking-uri", store["uri"], "--out", str(out),
                        "--plan", str(REPO / "reports" / "reference_table" / "plan.csv")]) == 0
    markdown = (out / "report.md").read_text()
    assert markdown.rindex("\n## ") == markdown.index(
        "\n## Estimated GPU memory: the plan of `reference_table`")
    main_table = markdown.split("\n## ")[0]  # the sections after it name cells too
    rows = [line for line in main_table.splitlines() if line.startswith("| t5-tiny")]
    assert len(rows) == len(runs) == 14
    # docs/demo/report.md, the sample README points to, is what this code writes: the same
    # sections and the same table columns (its figures are one machine's measurements).
    assert _skeleton((REPO / "docs" / "demo" / "report.md").read_text()) == _skeleton(markdown)
    header_line = next(line for line in markdown.splitlines() if line.startswith("| model"))
    header = [cell.strip() for cell in header_line.strip("|").split("|")]
    assert header[:11] == ["model", "method", "precision", "rank", "ROUGE-1", "ROUGE-2",
                           "train time (min)", "cost (USD)", "GPU memory (MiB)",
                           "GPU estimate (MiB)", "CPU memory (MiB)"]
    # The predicted training time beside the measured, and the MFU, for every run that trained.
    assert header[11:13] == ["predicted time (min)", "MFU"]
    assert all(line.split("|")[12].strip() != "—" and float(line.split("|")[13]) > 0
               for line in rows if "| ok " in line)
    # Every run that trained carries the plan's estimate of its cell, shown beside its memory.
    estimated = [line.split("|")[10].strip() for line in rows if "| ok " in line]
    assert estimated and all(value.isdigit() for value in estimated)


def _skeleton(markdown: str) -> list[str]:
    """A report's headings (one per chart kind: the model a chart is of left out) and the header
    row of each of its tables, in order."""
    kept, previous = [], ""
    for line in markdown.splitlines():
        if line.startswith("#"):
            line = re.sub(r"(Memory over time), .*", r"\1", line)
            if line not in kept[-1:]:
                kept.append(line)
        elif line.startswith("|") and not previous.startswith("|"):
            kept.append(re.sub(r" +", " ", line))
        previous = line
    return kept


@pytest.mark.parametrize("args, message", [
    (["model=flan-t5-huge"], "error: model=flan-t5-huge: no such option of model"),
    (["method=qlora"], "error: method=qlora: no such option of method"),
    (["method=full", "precision=int8"], "error: method=full updates the base weights"),
])
def test_bad_input_is_a_clear_error_and_leaves_no_run(tmp_path, args, message):
    result = run_harness(tmp_path, *args, *folder_store_overrides(tmp_path, "bad"))
    assert result.returncode == 2
    assert message in result.stderr
    assert runs_of({"uri": f"sqlite:///{tmp_path}/mlflow.db"}, "bad") == []


def test_unknown_model_lists_the_valid_ones(tmp_path):
    result = run_harness(tmp_path, "model=flan-t5-huge", *folder_store_overrides(tmp_path, "bad"))
    assert "flan-t5-base" in result.stderr and "t5-tiny" in result.stderr


def test_data_file_missing_a_column_is_refused_before_any_run(tmp_path):
    path = tmp_path / "mine.csv"
    pd.DataFrame({"id": ["1"], "dialogue": ["A: hi"]}).to_csv(path, index=False)
    result = run_harness(tmp_path, "data=local", f"data.path={path}",
                      *folder_store_overrides(tmp_path, "bad"))
    assert result.returncode == 2
    assert f"error: {path}: missing column summary" in result.stderr
    assert runs_of({"uri": f"sqlite:///{tmp_path}/mlflow.db"}, "bad") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("experiment", ["reference_table", "full_grid"])
def test_a_gpu_experiment_is_refused_without_cuda_and_points_to_the_demo(tmp_path, experiment):
    result = run_harness(tmp_path, "-cd", str(REPO / "experiments"), "-cn", experiment,
                      *folder_store_overrides(tmp_path, "bad"))
    assert result.returncode == 2
    assert "error: experiment bad is meant for a GPU" in result.stderr
    assert "`make demo`" in result.stderr and "allow_cpu=true" in result.stderr
    assert runs_of({"uri": f"sqlite:///{tmp_path}/mlflow.db"}, "bad") == []


# What a line that warns or fails looks like; the project shows none on a cell that works.
NOISE = re.compile(r"warn|error|traceback|deprecat|failed to|leaked", re.IGNORECASE)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_cell_that_works_prints_no_warning_and_ends_with_its_headline(tmp_path, precision):
    result = run_harness(tmp_path, f"precision={precision}", "train.max_steps=2",
                         "eval.max_samples=4", *folder_store_overrides(tmp_path, "quiet"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).replace("\r", "\n").splitlines()
    assert [line for line in lines if NOISE.search(line)] == []
    tail = result.stdout.strip().splitlines()[-4:]
    assert tail[0] == f"[harness] t5-tiny/lora-r8/{precision}: ok"
    assert tail[1].startswith("[harness] ROUGE-1 ") and "CPU peak" in tail[1]
    assert tail[2].startswith("[harness] logged to experiment 'quiet', run ")
    assert tail[3].startswith("[harness] browse it: make ui")


def test_a_config_error_is_refused_before_torch_transformers_or_mlflow_load(tmp_path):
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "harness", "train.lr=-1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "error: train.lr=-1" in result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert not {"torch", "transformers", "bitsandbytes", "mlflow", "peft"} & imported


def test_without_the_hub_a_cell_and_a_sweep_are_refused_before_anything_runs(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    single = run_harness(tmp_path, "model=flan-t5-base", *folder_store_overrides(tmp_path, "hub"))
    assert single.returncode == 2
    assert "model google/flan-t5-base must come from the Hugging Face hub" in single.stderr
    assert "model.source=random data=synthetic" in single.stderr
    sweep = run_harness(tmp_path, "-cd", str(REPO / "experiments"), "-cn", "reference_table",
                        "allow_cpu=true", *folder_store_overrides(tmp_path, "hub"))
    assert sweep.returncode == 2 and "dataset Samsung/samsum" in sweep.stderr
    assert "[harness] cell" not in sweep.stdout and "Traceback" not in sweep.stderr
    assert runs_of({"uri": f"sqlite:///{tmp_path}/mlflow.db"}, "hub") == []


def test_make_help_lists_the_targets_and_the_experiments():
    result = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    for target in ("install", "test", "demo", "plan", "sweep", "report", "ui", "bench",
                   "gpu-check"):
        assert f"make {target}" in result.stdout
    experiments = sorted(path.stem for path in (REPO / "experiments").glob("*.yaml"))
    assert f"experiments (EXP=...):  {' '.join(experiments)}" in result.stdout


def test_the_repository_stands_alone_and_a_demo_leaves_its_clone_clean():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert "docs/design.md" in tracked and "docs/demo/report.md" in tracked
    pointing = subprocess.run(["git", "grep", "-l", "DESIGN.md", "--", ".", ":!tests/test_cli.py"],
                              cwd=REPO, capture_output=True, text=True)
    assert pointing.stdout == ""  # no file points outside the repository
    assert "docs/design.md" in (REPO / "README.md").read_text()
    # What make demo writes is not tracked: a first `make demo` leaves `git status` clean.
    assert not [path for path in tracked if path.startswith("reports/demo/")]
    assert subprocess.run(["git", "check-ignore", "-q", "reports/demo/report.md"],
                          cwd=REPO).returncode == 0
