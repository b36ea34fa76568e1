"""The report reads MLflow alone: a row per run, formatted, with every non-ok cell's reason."""

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from harness import report


def _log(client, experiment_id, params, metrics, status, reason=""):
    run = client.create_run(experiment_id, tags={"status": status})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    if reason:
        client.set_tag(run.info.run_id, "status_reason", reason)
    client.set_terminated(run.info.run_id, "FINISHED" if status == "ok" else "FAILED")


@pytest.fixture
def demo_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("grid", artifact_location=str(tmp_path / "a"))
    cell = {"model.name": "t5-mini", "method.name": "lora", "precision.name": "fp32"}
    _log(client, experiment_id, {**cell, "method.r": 8},
         {"rouge1": 41.23456, "rouge2": 20.5, "train_time_s": 90.0, "cpu_peak_mib": 700.4,
          "gpu_peak_mib": 3298.0, "total_params": 2000}, "ok")
    _log(client, experiment_id, {**cell, "method.r": 4},
         {"rouge1": 40.0, "rouge2": 19.0, "train_time_s": 60.0, "cpu_peak_mib": 690.0,
          "total_params": 2000}, "ok")
    _log(client, experiment_id, {**cell, "method.name": "full", "precision.name": "int8"}, {},
         "skipped", "int8 weights cannot be updated")
    _log(client, experiment_id, {"model.name": "t5-tiny", "method.name": "full",
                                 "precision.name": "fp16"},
         {"total_params": 500}, "diverged", "loss nan at step 3")
    return uri


def test_one_row_per_run_in_a_stable_order(demo_store):
    table = report.table(report.load_runs("grid", demo_store))
    assert len(table) == 4
    assert list(table.columns) == [*report.COLUMNS, "status"]
    # Smallest model first, then method, precision and rank (4 before 8).
    assert list(zip(table["model"], table["method"], table["precision"], table["rank"])) == [
        ("t5-tiny", "full", "fp16", "—"), ("t5-mini", "full", "int8", "—"),
        ("t5-mini", "lora", "fp32", "4"), ("t5-mini", "lora", "fp32", "8")]
    last = table.iloc[-1]
    assert (last["ROUGE-1"], last["train time (min)"], last["GPU memory (MiB)"],
            last["CPU memory (MiB)"], last["status"]) == ("41.23", "1.50", "3298", "700", "ok")
    assert table.iloc[0]["status"] == "diverged: loss nan at step 3"
    assert table.iloc[1]["status"] == "skipped: int8 weights cannot be updated"


def test_report_file_is_written_and_deterministic(demo_store, tmp_path):
    out = tmp_path / "out"
    assert report.main(["--experiment", "grid", "--tracking-uri", demo_store,
                        "--out", str(out)]) == 0
    first = (out / "report.md").read_text()
    report.main(["--experiment", "grid", "--tracking-uri", demo_store, "--out", str(out)])
    assert (out / "report.md").read_text() == first
    table_lines = [line for line in first.splitlines() if line.startswith("| t5-")]
    assert len(table_lines) == 4
    assert first.splitlines()[0] == "# Experiment `grid`"


def test_unknown_experiment_names_the_ones_there(demo_store, capsys):
    assert report.main(["--experiment", "nope", "--tracking-uri", demo_store]) == 2
    error = capsys.readouterr().err
    assert "no experiment 'nope'" in error and "grid" in error
