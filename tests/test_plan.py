"""The plan before a sweep (and `make plan`): its memory estimate against the study's table, which
cells fit a GPU, and the GPU each cell holds while it runs."""

import multiprocessing
import socket
import time

import pandas as pd
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from harness.config import grids, identity, validation
from harness.core.errors import ConfigError
from harness.estimate import estimate
from harness.measure import gpus
from harness.run import preflight, runner
from harness.sweep import plan
from tests.conftest import REPO, compose_cell, requires_cuda, runs_of, without_a_gpu
from tests.test_config import grid


def test_the_plan_says_what_runs_what_is_skipped_and_what_does_not_fit(tmp_path):
    jobs = grid("demo", "model=t5-tiny", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                f"cache_dir={tmp_path}/cache")
    # Without a GPU nor one the experiment names: nothing about fitting.
    unnamed = plan.plan(jobs, [])
    assert set(unnamed.fits) == {""}
    needed = unnamed.estimate_mib.dropna()
    # A GPU between the smallest and the largest estimate: some cells fit, some do not.
    gpu = {"gpu": "0", "name": "small GPU", "total_mib": (needed.min() + needed.max()) / 2}
    table = plan.plan(jobs, [gpu])
    assert len(table) == 20 and table.fingerprint.nunique() == 14
    skipped = table[table.plan == "skip"]
    assert set(skipped.cell.str.split("/").str[2]) == {"int8"}
    assert skipped.why.str.contains("cannot update").all()
    assert skipped.estimate_mib.isna().all()
    runnable = table[table.plan == "run"]
    assert set(runnable.fits) == {"yes", "NO"}
    assert ((runnable.estimate_mib <= gpu["total_mib"]) == (runnable.fits == "yes")).all()
    assert set(table.gpu) == {"small GPU (this machine)"}
    parts = [f"{part}_mib" for part in estimate.PARTS]
    assert (runnable[parts].sum(axis=1) - runnable.estimate_mib).abs().max() < 1e-6
    # Without a GPU, against the one the experiment names.
    named = plan.plan(jobs, [], OmegaConf.create({"name": "A10G", "memory_mib": 23028}))
    assert set(named[named.plan == "run"].fits) == {"yes"} and set(named.gpu) == {"A10G"}


def test_a_cell_that_cannot_be_valid_stops_the_plan_before_anything_runs(tmp_path):
    jobs = grid("demo", "model=t5-tiny", "train.lr=-1",
                f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(ConfigError) as refused:
        plan.plan(jobs, [])
    # Every grid point named, by number, with the refusal they share.
    assert str(refused.value).startswith("20 of 20 grid points are refused, and so the sweep:\n"
                                         "- grid points 1-20 (method=full precision=fp32 "
                                         "++method.r=4, ...): train.lr=-1.0; expected a finite "
                                         "number > 0")


def test_a_sweeps_checks_are_made_once_for_every_grid_point(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    jobs = grid("demo", "model=t5-tiny", f"tracking.uri={uri}", "tracking.experiment=once")
    fingerprints = [identity.fingerprint(identity.cell_config(job)) for job in jobs]
    # One finished cell in the store, found by the plan's one read of it.
    client = MlflowClient(uri)
    finished = client.create_run(client.create_experiment("once"),
                                 tags={"cell": fingerprints[0], "status": "ok"})
    client.set_terminated(finished.info.run_id, "FINISHED")
    checked = plan.check(jobs)
    assert [found.fingerprint for found in checked] == fingerprints
    assert all(found.store_asked for found in checked)
    assert checked[0].done == {"status": "ok", "run_id": finished.info.run_id}
    first = {}
    for number, (job, found) in enumerate(zip(jobs, checked), start=1):
        same_as = first.setdefault(found.fingerprint, number)
        # A grid point whose method ignores the rank is the cell of the first such point.
        assert found.same_as == (same_as if same_as != number else None)
        assert found.invalid == validation.invalid_cell_reason(job)
        assert (found.done is not None) == (found.fingerprint == fingerprints[0])
    assert sum(found.same_as is not None for found in checked) == 20 - 14
    # The plan of a sweep is made from them: the same table as a plan that checks for itself.
    pd.testing.assert_frame_equal(plan.plan(jobs, [], checked=checked), plan.plan(jobs, []))
    # This machine's checks, once: where they were made, and why it cannot run a cell.
    here = preflight.on_this_machine(jobs, checked, cuda=False)
    assert {found.host for found in here} == {socket.gethostname()}
    assert preflight.on_this_machine(jobs, here, cuda=True) == here  # made on this host already


def test_a_runner_handed_its_checks_asks_nothing_again(cell_overrides, store, capsys):
    cfg = compose_cell(*cell_overrides)
    fingerprint = identity.fingerprint(identity.cell_config(cfg))
    # The store holds no run of this cell: the status comes from the checks handed down.
    done = preflight.Checked(fingerprint, host=socket.gethostname(), store_asked=True,
                          done={"status": "ok", "run_id": "0123abcd"})
    assert runner.run(cfg, done) == "ok"
    assert "already ok in run 0123abcd" in capsys.readouterr().out
    twin = preflight.Checked(fingerprint, host=socket.gethostname(), store_asked=True, same_as=3)
    assert runner.run(cfg, twin) == "duplicate"
    assert "the same cell as grid point 3 of this sweep" in capsys.readouterr().out
    assert runs_of(store, cfg.tracking.experiment) == []


# The study's rows the estimate misses by more than 25 %, and why (docs/estimator.md).
MISSES = {
    "base_lora": "0.61: flan-t5-base LoRA; the study's figure holds about 1.3 GB the model of "
                 "our run does not see (its CUDA context, of an older CUDA stack, is the "
                 "likeliest part); make gpu-check measures ours",
    "large_lora": "0.72: flan-t5-large LoRA; the same gap as base LoRA, 1.7 GB",
}


@pytest.mark.slow
def test_a_cell_of_another_setup_stands_beside_no_published_figure(tmp_path):
    # full_grid's cells are the study's model, method and precision, without its recipe.
    jobs = grids.compose_experiment("full_grid", [
        "model=flan-t5-base", "precision=fp32", "method=full,lora", "++method.r=4",
        "train.gradient_checkpointing=false", f"cache_dir={tmp_path}/cache",
        f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    table = plan.plan(jobs, [], jobs[0].plan_gpu)
    assert len(table) == 2 and set(table.reference) == {"reference_table: other setup"}
    assert table.get("estimate_ratio", pd.Series([None])).isna().all()
    full, lora = table.reference_setup
    assert "padding=longest (published: max_length)" in full
    assert "source_max_length=512 (published: p100)" in full
    assert "gradient_checkpointing=False (published: True)" in lora


@pytest.mark.slow
@without_a_gpu
def test_the_committed_plan_is_what_make_plan_writes_today(reference_plan):
    # reports/reference_table/plan.csv is what `make plan EXP=reference_table` writes on a machine
    # without a GPU and with an empty store: a change to the plan must update it.
    *_, written, _ = reference_plan
    assert written.read_text() == (REPO / "reports" / "reference_table" / "plan.csv").read_text()


@pytest.mark.slow
def test_make_plan_writes_the_plan_of_any_experiment_without_a_gpu(reference_plan):
    stdout, table, _, _ = reference_plan
    assert len(table) == 9 and set(table.plan) == {"run"}
    for column in ("cell", "model", "method", "precision", "gradient_checkpointing",
                   *(f"{part}_mib" for part in estimate.PARTS), "estimate_mib",
                   "reference_gpu_mib", "estimate_ratio", "fits"):
        assert column in table.columns, column
    # This machine has no GPU: the fit is against the experiment's, the study's A10G.
    assert set(table.gpu) == {"NVIDIA A10G (the study's)"}
    assert "fits: against NVIDIA A10G (the study's)" in stdout
    rows = table.dropna(subset=["reference_gpu_mib"])
    assert len(rows) == 6 and not (table.method == "lora_lomo").isin(rows.method).any()
    assert (rows.estimate_ratio == rows.estimate_mib / rows.reference_gpu_mib).all()
    # The recipes: LoRA rows checkpoint at 255 / 50, full fine-tuning at 512 / 95, padded.
    lora = table[table.method != "full"]
    assert lora.gradient_checkpointing.all() and set(lora.lengths) == {"255/50"}
    full = table[table.method == "full"].iloc[0]
    assert not full.gradient_checkpointing and full.lengths == "512/95"
    assert set(table.lengths_from) == {"published"}


@pytest.mark.slow
@pytest.mark.parametrize("row", [
    pytest.param(row, marks=pytest.mark.xfail(strict=True, reason=MISSES[row]))
    if row in MISSES else row
    for row in ("base_full", "base_lora", "large_lora", "xl_lora", "xl_lora_fp16",
                "xl_lora_int8")])
def test_each_reference_row_fits_an_a10g_and_is_within_25_percent_of_the_study(reference_plan,
                                                                               row):
    _, table, _, _ = reference_plan
    model, method, precision = {
        "base_full": ("flan-t5-base", "full", "fp32"), "base_lora": ("flan-t5-base", "lora",
                                                                      "fp32"),
        "large_lora": ("flan-t5-large", "lora", "fp32"), "xl_lora": ("flan-t5-xl", "lora", "fp32"),
        "xl_lora_fp16": ("flan-t5-xl", "lora", "fp16"),
        "xl_lora_int8": ("flan-t5-xl", "lora", "int8")}[row]
    found = table[(table.model == model) & (table.method == method)
                  & (table.precision == precision)].iloc[0]
    assert found.fits == "yes" and found.estimate_mib <= 23028
    assert 0.75 <= found.estimate_ratio <= 1.25, found.estimate_ratio


def _hold(lock_dir, candidates, hold_s, queue, count=1):
    with gpus.claim(candidates, lock_dir, announce=lambda message: None, count=count) as gpu:
        queue.put((gpu, time.time(), "start"))
        time.sleep(hold_s)
        queue.put((gpu, time.time(), "end"))


@pytest.mark.slow
def test_concurrent_cells_never_share_a_gpu_and_wait_for_a_free_one(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_hold, args=(tmp_path, ["0", "1"], 1.5, queue))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    events = sorted(queue.get() for _ in range(6))
    held = {}
    for gpu, moment, kind in sorted(events, key=lambda event: event[1]):
        if kind == "start":
            assert gpu not in held, f"GPU {gpu} given to two cells at once"
            held[gpu] = moment
        else:
            del held[gpu]
    assert {gpu for gpu, _, _ in events} == {"0", "1"}  # the third cell waited for one


@pytest.mark.slow  # starts processes that wait on GPU locks
def test_a_distributed_cell_holds_all_its_gpus_or_none_while_it_waits(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with gpus.claim(["0", "1", "2"], tmp_path, count=2) as held:
        assert held == "0,1"
        waiting = context.Process(target=_hold, args=(tmp_path, ["0", "1", "2"], 0.0, queue, 2))
        waiting.start()
        time.sleep(3)  # it found one GPU free of the two it needs: it holds none and waits
        assert queue.empty()
        with gpus.claim(["2"], tmp_path) as alone:  # so the free one is free still
            assert alone == "2"
        released = time.time()
    waiting.join(timeout=60)
    gpu, started, _ = queue.get()
    assert gpu == "0,1" and started >= released


def test_without_gpus_nothing_is_pinned(tmp_path):
    with gpus.claim([], tmp_path) as gpu:
        assert gpu is None
    assert gpus.candidates(["3", 5]) == ["3", "5"]


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
def test_the_estimate_is_near_what_a_cuda_cell_measures(store, cell_overrides):
    # Every batch padded to the cut, so that the batch the estimate assumes is the one that
    # runs; runner.gpus pins the cell to GPU 0. The runner logs the estimate beside the peak.
    overrides = [*cell_overrides, "model=flan-t5-base", "model.source=random", "method=lora",
                 "+recipe=samsum_lora", "data=synthetic", "data.train_size=64",
                 "data.validation_size=8", "data.test_size=8", "train.max_steps=8",
                 "runner.gpus=[0]"]
    cfg = compose_cell(*overrides)
    assert runner.run(cfg) == "ok"
    run = runs_of(store, cfg.tracking.experiment)[0]
    assert run.data.tags["gpu"] == "0"
    metrics = run.data.metrics
    assert 0.85 < metrics["estimate_gpu_mib"] / metrics["gpu_train_peak_mib"] < 1.15, metrics
    # The GPU's datasheet peaks (conf/peaks/) give its MFU and the predicted step time.
    assert run.data.tags["peaks_from"] == "conf/peaks/ (datasheet)", run.data.tags
    assert 0 < metrics["mfu"] < 1 and metrics["predicted_step_s"] > 0


def test_a_sweep_whose_plan_fails_runs_no_cell(tmp_path, monkeypatch, capsys):
    """Hydra only warns when a callback raises, and would run the cells anyway: a plan that
    fails (here, a bug planted in its composition) ends the sweep with code 1 and its
    traceback; one that refuses ends it with code 2."""
    from hydra import compose, initialize_config_dir

    from harness.sweep import progress

    with initialize_config_dir(config_dir=str(grids.EXPERIMENTS), version_base="1.3"):
        config = compose("demo", overrides=[f"hydra.searchpath=[file://{REPO / 'conf'}]",
                                            f"hydra.sweep.dir={tmp_path}/sweep",
                                            f"tracking.uri=sqlite:///{tmp_path}/m.db"],
                         return_hydra_config=True)

    def planted(*args):
        raise RuntimeError("a bug in the plan")

    monkeypatch.setattr(progress, "cells", planted)
    with pytest.raises(SystemExit) as ended:
        progress.SweepProgress().on_multirun_start(config)
    assert ended.value.code == 1
    assert "a bug in the plan" in capsys.readouterr().err

    def refusing(*args):
        raise ConfigError("train.lr=-1.0; expected a finite number > 0")

    monkeypatch.setattr(progress, "cells", refusing)
    with pytest.raises(SystemExit) as ended:
        progress.SweepProgress().on_multirun_start(config)
    assert ended.value.code == 2 and "error: train.lr=-1.0" in capsys.readouterr().err
    assert not (tmp_path / "sweep" / "checks.json").exists()
