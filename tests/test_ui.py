"""The demo experiment in the real MLflow UI, seen through headless Chromium."""

import os

import pytest

from tests.conftest import REPO, folder_store_overrides, run_harness

pytestmark = pytest.mark.slow


@pytest.fixture
def chromium():
    path = os.environ.get("HARNESS_TEST_CHROMIUM", "/usr/bin/chromium")
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail("CI must run this test: .ci/services.sh installs chromium")
        pytest.skip("no Chromium: run `eval \"$(bash .ci/services.sh)\"` first")
    return path


def test_the_ui_shows_a_row_per_cell_and_each_runs_metrics_and_memory_plot(chromium, tmp_path):
    from tests.mlflow_ui import browse, mlflow_ui

    # The demo experiment, narrowed to t5-tiny: three cells run, one skipped.
    result = run_harness(tmp_path, "-cd", str(REPO / "experiments"), "-cn", "demo",
                         "model=t5-tiny", "method=full,lora,lomo", "precision=fp32",
                         "++method.r=8", "train.max_steps=5", "eval.max_samples=4",
                         *folder_store_overrides(tmp_path, "demo"))
    skipped = run_harness(tmp_path, "-cd", str(REPO / "experiments"), "-cn", "demo",
                          "model=t5-tiny", "method=full", "precision=int8",
                          *folder_store_overrides(tmp_path, "demo"))
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with mlflow_ui(uri, tmp_path / "ui.log") as address:
        seen = browse(address, uri, "demo", tmp_path / "table.png", tmp_path / "run.png")
    assert sorted(seen["table"]) == ["t5-tiny/full/fp32", "t5-tiny/full/int8",
                                     "t5-tiny/lomo/fp32", "t5-tiny/lora-r8/fp32"]
    assert seen["datasets"] >= 3 and seen["models"] == 1  # three trained; one LoRA adapter
    assert seen["why"]  # the skipped cell's reason, on its page
    assert seen["why_in_table"]  # and in the runs table's Description column
    assert {"rouge1", "train_loss", "cpu_peak_mib"} <= set(seen["metrics"])
    assert not seen["genai_view"]  # a model-training run, not GenAI evaluation runs
    width, height = seen["plot_size"]
    assert width > 300 and height > 150  # the memory plot itself, decoded by the browser
    assert (tmp_path / "table.png").stat().st_size > 10_000
    assert (tmp_path / "run.png").stat().st_size > 10_000
