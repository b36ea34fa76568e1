"""The plan before a sweep: its memory estimate, which cells fit a GPU, and the GPU each cell
holds while it runs."""

import multiprocessing
import time

import pytest
import torch

from harness import config, estimate, gpus, memory, methods, models, runner, sweep
from harness.errors import ConfigError
from tests.conftest import compose_cell, requires_cuda, runs_of
from tests.test_config import grid


def _estimate(*overrides: str) -> dict:
    return estimate.gpu_peak_mib(config.cell_config(compose_cell(*overrides)))


@pytest.mark.parametrize("method, optimizer", [("full", "adamw"), ("full", "sgd"),
                                               ("lora", "adamw"), ("lomo", "sgd")])
def test_weights_gradients_and_optimizer_state_match_a_real_step(method, optimizer):
    # The estimate works on the meta device; the breakdown counts the live tensors of a real
    # t5-mini after one optimizer step on CPU.
    cfg = compose_cell("model=t5-mini", f"method={method}", f"method.optimizer={optimizer}")
    model = methods.apply(models.load_model(cfg.model, "fp32", methods.base_frozen(method),
                                            torch.device("cpu")), cfg.method, "fp32")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer_ = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer](trainable, 1e-3)
    ids = torch.randint(3, 200, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer_.step()
    real = memory.breakdown(model, [optimizer_])
    if method == "lomo":  # one fused gradient at a time: the largest weight's
        real["mem_grads_mib"] = max(p.numel() for p in trainable) * 4 / memory.MIB
    estimated = _estimate("model=t5-mini", f"method={method}", f"method.optimizer={optimizer}")
    assert estimated["weights"] == pytest.approx(real["mem_params_mib"], rel=1e-6)
    assert estimated["gradients"] == pytest.approx(real["mem_grads_mib"], rel=1e-6)
    assert estimated["optimizer"] == pytest.approx(real["mem_optimizer_mib"], abs=1e-6)


@pytest.mark.slow
def test_activations_are_what_a_real_forward_keeps_for_backward():
    # flan-t5-base at full length, one example: the estimate's meta forward against a real one
    # on CPU, which runs the same operators as CUDA (counted: what autograd keeps).
    cfg = compose_cell("model=flan-t5-base", "model.source=random", "method=full",
                       "train.batch_size=1")
    model = models.load_model(cfg.model, "fp32", False, torch.device("cpu"))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    source, target = cfg.data.source_max_length, cfg.data.target_max_length
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(input_ids=torch.randint(3, 30000, (1, source)),
              labels=torch.randint(3, 30000, (1, target)))
    assert estimate.gpu_peak_mib(config.cell_config(cfg))["activations"] == pytest.approx(
        sum(kept.values()) / memory.MIB, rel=0.01)


def test_the_estimate_orders_methods_and_precisions_as_their_memory_does():
    xl = ["model=flan-t5-xl", "method=lora"]
    fp32, fp16, int8 = (_estimate(*xl, f"precision={p}") for p in ("fp32", "fp16", "int8"))
    assert int8["weights"] < fp16["weights"] < fp32["weights"]
    # flan-t5-xl has 2.85 B weights: 10.6 GiB in float32.
    assert fp32["weights"] == pytest.approx(2.85e9 * 4 / memory.MIB, rel=0.01)
    # Short sequences, where gradients outweigh activations: LOMO's single fused gradient shows.
    base = ["model=flan-t5-base", "train.batch_size=2", "data.source_max_length=64",
            "data.target_max_length=16"]
    full, sgd, lomo, lora = (_estimate(*base, f"method={m}")["total"]
                             for m in ("full", "full_sgd", "lomo", "lora"))
    assert full > sgd > lomo > lora
    doubled = _estimate(*base, "method=full", "train.batch_size=4")
    assert doubled["activations"] == pytest.approx(
        2 * _estimate(*base, "method=full")["activations"], rel=0.05)


def test_the_plan_says_what_runs_what_is_skipped_and_what_does_not_fit(tmp_path):
    jobs = grid("demo", "model=t5-mini", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    needed = [estimate.gpu_peak_mib(config.cell_config(job))["total"] for job in jobs
              if not config.invalid_cell_reason(job)]
    # A GPU between the smallest and the largest estimate: some cells fit, some do not.
    gpu = {"gpu": "0", "name": "small GPU", "total_mib": (min(needed) + max(needed)) / 2}
    table = sweep.plan(jobs, [gpu])
    assert len(table) == 20 and table.fingerprint.nunique() == 14
    skipped = table[table.plan == "skip"]
    assert set(skipped.cell.str.split("/").str[2]) == {"int8"}
    assert skipped.why.str.contains("cannot update").all()
    assert skipped["GPU estimate (MiB)"].isna().all()
    runnable = table[table.plan == "run"]
    assert set(runnable.fits) == {"yes", "NO"}
    assert ((runnable["GPU estimate (MiB)"] <= gpu["total_mib"])
            == (runnable.fits == "yes")).all()
    # Without a GPU the plan still estimates, and says nothing about fitting.
    assert set(sweep.plan(jobs, []).fits) == {""}


def test_a_cell_that_cannot_be_valid_stops_the_plan_before_anything_runs(tmp_path):
    jobs = grid("demo", "model=t5-tiny", "train.lr=-1",
                f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(ConfigError, match=r"cell 1 \(.*\): train.lr=-1"):
        sweep.plan(jobs, [])


def _hold(lock_dir, candidates, hold_s, queue):
    with gpus.claim(candidates, lock_dir, announce=lambda message: None) as gpu:
        queue.put((gpu, time.time(), "start"))
        time.sleep(hold_s)
        queue.put((gpu, time.time(), "end"))


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


def test_without_gpus_nothing_is_pinned(tmp_path):
    with gpus.claim([], tmp_path) as gpu:
        assert gpu is None
    assert gpus.candidates(["3", 5]) == ["3", "5"]


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
def test_the_estimate_is_near_what_a_cuda_cell_measures(store, cell_overrides):
    # Every batch at full length (synthetic lengths far above the caps), so that the longest
    # batch the estimate assumes is the one that runs; runner.gpus pins the cell to GPU 0.
    overrides = [*cell_overrides, "model=flan-t5-base", "model.source=random", "method=lora",
                 "data=synthetic", "data.source_length_median=100000",
                 "data.target_length_median=100000", "data.train_size=64",
                 "data.validation_size=8", "data.test_size=8", "train.max_steps=8",
                 "runner.gpus=[0]"]
    cfg = compose_cell(*overrides)
    assert runner.run(cfg) == "ok"
    run = runs_of(store, cfg.tracking.experiment)[0]
    assert run.data.tags["gpu"] == "0"
    estimated = estimate.gpu_peak_mib(config.cell_config(cfg))
    measured = run.data.metrics["gpu_peak_mib"]
    assert 0.75 < estimated["total"] / measured < 1.25, (estimated, measured)
