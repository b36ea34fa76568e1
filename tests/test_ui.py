"""The demo experiment in the real MLflow UI, seen through headless Chromium."""

import os

import pytest
from mlflow import MlflowClient

from tests.conftest import runs_of

pytestmark = pytest.mark.slow


@pytest.fixture
def chromium():
    path = os.environ.get("HARNESS_TEST_CHROMIUM", "/usr/bin/chromium")
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail("CI must run this test: .ci/services.sh installs chromium")
        pytest.skip("no Chromium: run `eval \"$(bash .ci/services.sh)\"` first")
    return path


def test_the_ui_shows_a_row_per_cell_and_each_runs_metrics_and_memory_plot(chromium, demo_sweep,
                                                                            tmp_path):
    from tests.mlflow_ui import browse, mlflow_ui

    # The demo experiment, narrowed to t5-tiny: nine cells run, five skipped.
    result, folder = demo_sweep
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    runs = runs_of({"uri": uri}, "demo")
    with mlflow_ui(uri, tmp_path / "ui.log") as address:
        seen = browse(address, uri, "demo", tmp_path / "table.png", tmp_path / "run.png")
    assert sorted(seen["table"]) == sorted(run.info.run_name for run in runs)
    assert {"t5-tiny/full/fp32", "t5-tiny/full/int8"} <= set(seen["table"])
    trained = [run for run in runs if run.data.tags["status"] == "ok"]
    # Each trained run's dataset; each adapter a logged model of its own.
    adapters = client.search_logged_models([runs[0].info.experiment_id])
    assert seen["datasets"] >= len(trained) and seen["models"] == len(adapters) > 0
    assert seen["why"]  # the skipped cell's reason, on its page
    assert seen["why_in_table"]  # and in the runs table's Description column
    assert {"rouge1", "train_loss", "cpu_peak_mib"} <= set(seen["metrics"])
    assert not seen["genai_view"]  # a model-training run, not GenAI evaluation runs
    width, height = seen["plot_size"]
    assert width > 300 and height > 150  # the memory plot itself, decoded by the browser
    assert (tmp_path / "table.png").stat().st_size > 10_000
    assert (tmp_path / "run.png").stat().st_size > 10_000
