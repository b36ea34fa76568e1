"""The MLflow names, said once (harness/tracking/names.py): the page generated from them is
current, and what the report and the GPU check read is among them. tests/test_cells.py and
tests/test_distributed_cells.py check real runs against them."""

from harness import gpu_check
from harness.report import runs
from harness.tracking import names
from tests.conftest import REPO


def test_the_names_page_is_generated_from_the_declarations():
    assert (REPO / "docs" / "mlflow-names.md").read_text() == names.markdown(), (
        "run `make docs`")


def test_a_pattern_stands_for_its_phases_kinds_and_ranks_and_nothing_else():
    assert names.undeclared(["cpu_train_peak_mib", "cpu_peak_mib_rank1",
                             "torch_eval_peak_reserved_mib", "estimate_weights_mib",
                             "infer_tokens_per_s_merged", "eval_rougeLsum"], names.METRICS) == set()
    assert names.undeclared(["cpu_peak", "train_loss_rank0", "rouge", "gpu_mib_rank0x"],
                            names.METRICS) == {"cpu_peak", "train_loss_rank0", "rouge",
                                               "gpu_mib_rank0x"}
    assert names.missing(["train_loss"], names.QUALITY) >= {"rouge<k>", "eval_loss"}


def test_what_the_report_and_the_gpu_check_read_is_declared():
    # The report's own figure, the peak less the baseline, is its, not a run's.
    assert names.undeclared(runs.METRICS, names.METRICS) == {"cpu_cell_peak_mib"}
    read = [column.split(".", 1)[1] for column in gpu_check.COLUMNS.values()
            if column.startswith("metrics.")]
    assert read and names.undeclared(read, names.METRICS) == set()
