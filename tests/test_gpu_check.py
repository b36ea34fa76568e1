"""`make gpu-check`: a clear refusal without CUDA, and its tables from a real store (filled here
by CPU cells, whose GPU columns stay empty); on a GPU, the real thing."""

import subprocess
import sys

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from harness import gpu_check
from harness.config import grids, identity, validation
from harness.run import runner
from tests.conftest import REPO, compose_cell, requires_cuda


@pytest.mark.slow  # starts the command
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_refuses_at_once_and_writes_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "harness.gpu_check"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "error: make gpu-check measures the harness on a CUDA GPU" in result.stderr
    assert "make plan EXP=reference_table" in result.stderr
    assert not (tmp_path / "reports").exists() and not (tmp_path / "outputs").exists()


def test_a_part_it_does_not_know_is_refused():
    assert gpu_check.main(["--parts", "cells,warmup"]) == 2


def test_the_device_names_its_folder():
    assert gpu_check.device_folder("NVIDIA H100 80GB HBM3") == "gpu-nvidia-h100-80gb-hbm3"


def test_it_runs_every_reference_row_and_what_the_cpu_cannot_confirm():
    jobs = grids.compose_experiment(gpu_check.EXPERIMENT, [])
    options = {path.stem for path in (grids.EXPERIMENTS / "check_row").glob("*.yaml")}
    assert len(jobs) == len(options)  # every option of check_row is a cell, each once
    cells = {}
    for job in jobs:
        validation.validate(job)
        assert (job.model.source, job.data.name, job.train.max_steps) == ("random", "synthetic",
                                                                           30)
        cells[identity.run_name(identity.cell_config(job))] = job
    # Each reference row as the reference table runs it: model, method, precision, recipe.
    for row in grids.compose_experiment("reference_table", []):
        job = cells[identity.run_name(identity.cell_config(row))]
        for key in ("train.gradient_checkpointing", "data.padding", "data.source_max_length",
                    "data.target_max_length", "model.attn_implementation", "method.r"):
            assert OmegaConf.select(job, key) == OmegaConf.select(row, key), key
    assert cells["flan-t5-xl/lora-r16/nf4"].precision.double_quant
    for optimizer in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        assert cells[f"flan-t5-base/full_{optimizer}/fp32"].method.optimizer == optimizer
    causal = cells["opencalm-7b/lora-r8/bf16"]
    assert causal.model.family == "causal"
    assert list(causal.method.target_modules) == ["query_key_value"]
    # ROWS=... picks cells by their option's name.
    picked = grids.compose_experiment(gpu_check.EXPERIMENT, ["+check_row=xl_lora_nf4,base_full"])
    assert [identity.run_name(identity.cell_config(job)) for job in picked] == [
        "flan-t5-xl/lora-r16/nf4", "flan-t5-base/full/fp32"]


@pytest.mark.slow
def test_runs_csv_and_the_report_come_from_the_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for method in ("lora", "lora_lomo"):
        cfg = compose_cell(f"method={method}", "+recipe=samsum_lora", "data=synthetic",
                           "data.train_size=32", "data.validation_size=4", "data.test_size=32",
                           "train.max_steps=2", f"tracking.uri={uri}",
                           f"tracking.experiment={gpu_check.EXPERIMENT}",
                           f"cache_dir={tmp_path}/cache")
        assert runner.run(cfg) == "ok"
    runs = gpu_check.runs_table(uri)
    assert list(runs.cell) == ["t5-tiny/lora-r16/fp32", "t5-tiny/lora_lomo-r16/fp32"]
    assert set(runs.gradient_checkpointing) == {"True"} and set(runs.status) == {"ok"}
    parts = [f"estimate_{part}_mib" for part in ("weights", "gradients", "optimizer",
                                                 "activations", "allocator", "cuda_context")]
    assert (runs[parts].sum(axis=1) - runs.estimate_mib).abs().max() < 0.01
    assert runs.gpu_train_peak_mib.isna().all()  # no GPU here: nothing measured, nothing passed
    assert not runs.within_15_pct.any()
    text = gpu_check.report("a CPU", runs)
    assert text.startswith("# GPU check on a CPU") and "t5-tiny/lora_lomo-r16/fp32" in text
    assert "0 of 2 cells within 15%" in text
    # On this CPU, its measured peaks: the predicted step beside the measured, and the MFU.
    assert (runs.predicted_step_s > 0).all() and (runs.mfu > 0).all()
    assert (runs.measured_over_predicted == runs.step_time_mean_s / runs.predicted_step_s).all()
    assert "the mean measured step beside the time model's prediction" in text


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
def test_gpu_check_measures_a_row_and_its_estimate_holds(tmp_path):
    result = subprocess.run([sys.executable, "-m", "harness.gpu_check", "--rows", "base_lora",
                             "--parts", "cells"], cwd=REPO, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = REPO / "reports" / gpu_check.device_folder(torch.cuda.get_device_name(0))
    runs = pd.read_csv(folder / "runs.csv")
    row = runs[runs.cell == "flan-t5-base/lora-r16/fp32"].iloc[0]
    assert row.status == "ok" and row.within_15_pct, row.to_dict()


def test_the_report_sets_published_rows_measured_here_beside_their_figures():
    # make validity's GPU side: what a lent GPU measured of the reference rows (a runs.csv as
    # runs_table writes it; here two rows of the study, one of peft's and one of no table).
    runs = pd.DataFrame({
        "cell": ["flan-t5-base/full/fp32", "flan-t5-base/lora-r16/fp32", "t0-3b/lora-r8/fp32",
                 "t5-tiny/lora-r8/fp32"],
        "strategy": [None, "single", "single", None],
        "gpu_train_peak_mib": [14000.0, 3000.0, 16000.0, 500.0],
        "torch_peak_allocated_mib": [12000.0, 1500.0, 14000.0, 100.0],
        "estimate_mib": [14690.0, 2012.0, 19852.0, 600.0],
        "estimate_allocator_mib": [1000.0] * 4, "estimate_cuda_context_mib": [500.0] * 4})
    found = gpu_check.published_beside(runs)
    assert list(found.cell) == ["flan-t5-base/full/fp32", "flan-t5-base/lora-r16/fp32",
                                "t0-3b/lora-r8/fp32"]
    assert list(found.published_mib) == [14830.0, 3298.0, 14400.0]
    assert list(found.measure) == ["nvml", "nvml", "allocated"]  # peft's: torch's tensors
    assert list(found.measured_over_published) == [14000.0 / 14830.0, 3000.0 / 3298.0,
                                                   14000.0 / 14400.0]
    assert list(found.estimate_over_published) == [14690.0 / 14830.0, 2012.0 / 3298.0,
                                                   (19852.0 - 1500.0) / 14400.0]


def profiled(tmp_path, *overrides: str) -> pd.DataFrame:
    """bench/step_profile.py's figures for the base LoRA row, as make gpu-check's profile part
    writes them (profile.csv), and its report."""
    from bench import step_profile

    assert step_profile.main(["--out", str(tmp_path), "--rows", "base_lora",
                              f"cache_dir={tmp_path}/cache", *overrides]) == 0
    assert (tmp_path / "profile.md").read_text().startswith("# Where a step's time goes on")
    return pd.read_csv(tmp_path / "profile.csv")


@pytest.mark.slow  # trains the row's step a dozen times
def test_the_profile_says_where_a_step_s_time_goes(tmp_path):
    found = profiled(tmp_path, "allow_cpu=true", "model=t5-tiny", "+check_row=base_full")
    # Its own row, not the cells part's: the base LoRA recipe's batch, on t5-tiny.
    assert list(found.row) == ["base_lora"] and list(found.batch_size) == [8]
    row = found.iloc[0]
    assert row.step_ms > 0 and row.predicted_step_ms > 0 and row.op_calls > 100
    # The host's time per call of the tiny step, outside the ops on a CPU: a few microseconds
    # (none where the ops measured alone took as long as the step).
    assert 0 <= row.host_us_per_call < 1000
    # A CPU has no device activity to profile apart from its host.
    assert pd.isna(row.device_busy_ms) and pd.isna(row.predicted_with_host_ms)


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
def test_on_a_gpu_the_profile_parts_the_step_between_the_host_and_the_kernels(tmp_path):
    row = profiled(tmp_path).iloc[0]
    assert 0 < row.device_busy_share <= 1.05 and row.device_activities > 0
    # The GPU's step at one example of four tokens is the host's: microseconds per call.
    assert 1 < row.host_us_per_call < 1000
