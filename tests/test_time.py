"""Time and cost before a cell runs: the FLOPs of the simulated step against PyTorch's own counter
on a real step, the time model's three bounds, the device peaks, the plan's predicted time and
bill, and its correction by measured runs in a real store."""

import json

import pytest
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from harness.config import grids, identity
from harness.estimate import estimate, host_time, simulate, steps, timing, work
from harness.measure import calibration, op_times, peaks
from harness.model import families, tokenizers, training_step
from harness.sweep import plan
from tests.conftest import compose_cell
from tests.test_estimate import CPU, LENGTHS, _cell, _on_cpu

A10G = {"name": "A10G", "fp32": 35.0, "bf16": 70.0, "fp16": 70.0, "int8": 140.0,
        "bandwidth_gbs": 600.0, "launch_us": 10.0, "source": "test"}


def _simulated(cfg) -> list:
    on_cuda = simulate.AsOnCuda(None)
    traced = steps.simulated_steps(steps.meta_model(cfg, on_cuda), cfg, LENGTHS, steps.META,
                                   on_cuda)
    return work.per_step(traced.ops, cfg.train.grad_accum_steps)


def _counted_on_cpu(cfg) -> int:
    """FlopCounterMode around the second of two real training steps of the cell's own code."""
    model = _on_cpu(cfg)
    batch = families.of(cfg.model).training_batch(cfg.train.batch_size, LENGTHS, CPU,
                                                  tokenizers.PAD_ID, tokenizers.EOS_ID + 1)
    updates = training_step.Updates(model, cfg, 2, CPU, implementation="foreach",
                                    loss_scaling=False, paging=False)
    model.train()
    updates.backward(training_step.forward(model, batch, "fp32", CPU), update=True)
    updates.next_step()
    with FlopCounterMode(display=False, custom_mapping=work.flop_formulas()) as counter:
        updates.backward(training_step.forward(model, batch, "fp32", CPU), update=True)
        updates.next_step()
    updates.close()
    return counter.get_total_flops()


CELLS = [["method=full"], ["method=full", "train.gradient_checkpointing=true"],
         ["method=lora"], ["method=lora", "train.gradient_checkpointing=true"],
         ["method=lomo"], ["method=lomo", "train.gradient_checkpointing=true"],
         ["method=lora_lomo"], ["method=lora", "precision=int8"]]


@pytest.mark.parametrize("overrides", CELLS, ids=lambda overrides: " ".join(overrides))
def test_the_simulated_step_counts_the_flops_a_real_step_does(overrides):
    # PyTorch's FlopCounterMode on a real CPU step of the cell's own code, and the estimate's
    # count on the meta device: the same FLOPs, recomputation and LOMO's passes included.
    cfg = _cell(*overrides)
    assert work.flops(_simulated(cfg)) == _counted_on_cpu(cfg) > 0


def test_the_count_sees_recomputation_skipped_weight_gradients_and_lomo_s_norm_pass():
    flops = {tuple(overrides): work.flops(_simulated(_cell(*overrides))) for overrides in CELLS}
    full, full_ckpt = flops[("method=full",)], flops[("method=full",
                                                      "train.gradient_checkpointing=true")]
    lora = flops[("method=lora",)]
    # Checkpointing runs each block's forward again inside backward: between 1 and 1.5 x.
    assert 1.1 * full < full_ckpt < 1.5 * full
    # LoRA's frozen weights get no weight gradient: about two thirds of full's FLOPs.
    assert 0.55 * full < lora < 0.8 * full
    # LOMO (clipping on) runs backward twice: once for the gradient norm, once to update.
    assert flops[("method=lomo",)] > 1.5 * full
    # The int8 matmul forward is counted as int8 work, its backward in the weights' float.
    kinds = work.flops_by_kind(_simulated(_cell("method=lora", "precision=int8")))
    assert set(kinds) == {"int8", "fp32"} and kinds["int8"] > 0


def test_the_memory_efficient_attention_kernel_counts_its_recomputed_scores():
    # The estimate runs CUDA's kernel on meta. It does eager attention's matmuls, and its
    # backward computes the scores again instead of keeping them: one matmul more per call,
    # about 1 % of t5-mini's step at these lengths.
    eager = work.flops(_simulated(_cell("method=full")))
    cfg = compose_cell("model=t5-mini", "model.attn_implementation=sdpa", "method=full")
    assert eager < work.flops(_simulated(cfg)) < 1.05 * eager


def test_accumulated_gradients_repeat_the_pass_not_the_update():
    once = _simulated(_cell("method=full"))
    twice = _simulated(_cell("method=full", "train.grad_accum_steps=2"))
    assert work.flops(twice) == 2 * work.flops(once)
    launches = [sum(row[3] * row[4] for row in rows) for rows in (once, twice)]
    assert launches[0] < launches[1] < 2 * launches[0]  # the optimizer's kernels run once


def test_foreach_ops_launch_as_multi_tensor_apply_fills_its_launches():
    small = [torch.ones(8) for _ in range(200)]
    assert work._foreach_launches((small,)) == 2  # 110 tensors a launch, one list
    assert work._foreach_launches((small, small, small, small)) == 6  # 36 with four lists
    large = [torch.ones(65536 * 100) for _ in range(4)]
    assert work._foreach_launches((large,)) == 2  # 400 blocks, 320 a launch


def test_each_kernel_takes_the_longest_of_compute_memory_and_launch():
    # A 4096 cube matmul in fp32, a 1 GB copy, a thousand one-element ops.
    rows = [["fp32", 2 * 4096 ** 3, 3 * 4096 ** 2 * 4, 1, 1], ["", 0, 10 ** 9, 1, 1],
            ["", 0, 8, 1, 1000]]
    found = timing.step_seconds(rows, A10G)
    assert found["compute"] == pytest.approx(2 * 4096 ** 3 / 35e12)
    assert found["memory"] == pytest.approx(1e9 / 600e9)
    assert found["launch"] == pytest.approx(1000 * 10e-6)
    assert found["step_s"] == pytest.approx(sum(found[bound] for bound in timing.BOUNDS))
    # Half precision runs at its own peak; a dtype without units at the fp32 pace.
    half = [["bf16", 2 * 4096 ** 3, 0, 1, 1]]
    assert timing.step_seconds(half, A10G)["step_s"] == pytest.approx(2 * 4096 ** 3 / 70e12)
    assert timing.step_seconds(half, {**A10G, "bf16": None})["step_s"] == pytest.approx(
        2 * 4096 ** 3 / 35e12)
    assert timing.ideal_seconds(rows, A10G) == pytest.approx(found["compute"])


# A calibration as make calibrate writes it: matmuls of 2e3 and 2e9 FLOPs, elementwise ops of 1 kB
# and 1 GB, 5 us of host time per op.
CALIBRATION = {"matmul": {"fp32": [[2e3, 10e-6], [2e9, 0.02]], "bf16": [[2e3, 10e-6],
                                                                      [2e9, 0.04]]},
               "memory": [[1e3, 5e-6], [1e9, 0.1]], "random": [[1e3, 10e-6], [1e9, 0.5]],
               "op_us": 5.0, "synchronous": True}


def test_a_calibrated_device_prices_each_op_by_what_an_op_of_its_size_achieved():
    # Exact at the points measured, log-log between them, the smallest's time below them, linear
    # in size beyond the largest.
    curve = CALIBRATION["memory"]
    assert timing._interpolated(curve, 1e3) == 5e-6 and timing._interpolated(curve, 10) == 5e-6
    assert timing._interpolated(curve, 1e6) == pytest.approx((5e-6 * 0.1) ** 0.5)
    assert timing._interpolated(curve, 2e9) == pytest.approx(0.2)
    device = {**A10G, "calibration": CALIBRATION}
    # A large matmul by its dtype's curve; its bytes cost less than its FLOPs.
    matmul = [["bf16", 2e9, 1e6, 1, 3]]
    assert timing.step_seconds(matmul, device) == pytest.approx(
        {"step_s": 0.12, "compute": 0.12, "memory": 0.0, "launch": 0.0})
    # A skinny matmul (LoRA's) moves more than its FLOPs take: priced by its bytes.
    skinny = [["fp32", 2e3, 1e9, 1, 1]]
    assert timing.step_seconds(skinny, device)["memory"] == pytest.approx(0.1)
    # Dropout's random numbers by what drawing them cost.
    assert timing.step_seconds([["random", 0, 2e9, 1, 1]], device)["memory"] == pytest.approx(1.0)
    # On a CPU ops run one after another: a foreach op's further launches add the host's time.
    foreach = [["", 0, 1e3, 11, 2]]
    assert timing.step_seconds(foreach, device) == pytest.approx(
        {"step_s": 2 * (5e-6 + 10 * 5e-6), "compute": 0.0, "memory": 2 * 5e-6,
         "launch": 2 * 10 * 5e-6})
    # On a GPU the host's dispatch overlaps the kernels: the longer of the two.
    overlapped = {**A10G, "calibration": {**CALIBRATION, "synchronous": False}}
    assert timing.step_seconds(foreach, overlapped) == pytest.approx(
        {"step_s": 2 * 11 * 5e-6, "compute": 0.0, "memory": 0.0, "launch": 2 * 11 * 5e-6})


def test_make_calibrate_measures_curves_once_and_the_cpu_device_carries_them(tmp_path):
    cpu = torch.device("cpu")
    assert calibration.load(cpu, tmp_path) is None
    uncalibrated = peaks.of_cpu(tmp_path)
    assert "calibration" not in uncalibrated
    found = calibration.calibrate(cpu, tmp_path, sizes=(16, 64, 256),
                                  memory_bytes=(4096, 2**20, 2**24), figure_s=0.02)
    assert [flops for flops, _ in found["matmul"]["fp32"]] == [2 * 16**3, 2 * 64**3, 2 * 256**3]
    assert all(seconds > 0 for points in (*found["matmul"].values(), found["memory"])
               for _, seconds in points)
    # A larger op takes longer at the large end of each curve; an op costs the host something.
    assert found["matmul"]["fp32"][-1][1] > found["matmul"]["fp32"][0][1]
    assert found["memory"][-1][1] > found["memory"][0][1] and 0 < found["op_us"] < 1e4
    assert found["random"][-1][1] > found["random"][0][1]
    assert found["synchronous"] and calibration.load(cpu, tmp_path) == found
    calibrated = peaks.of_cpu(tmp_path)
    assert calibrated["calibration"] == found and calibrated["source"].endswith(
        "calibrated (make calibrate)")
    rows = [["fp32", 2 * 64**3, 3 * 64**2 * 4, 1, 10]]
    assert timing.step_seconds(rows, calibrated)["step_s"] == pytest.approx(
        10 * max(found["matmul"]["fp32"][1][1],
                 timing._interpolated(found["memory"], 3 * 64**2 * 4)))


def test_a_gpu_s_peaks_come_from_conf_and_a_cpu_s_are_measured_once(tmp_path):
    cfg = compose_cell()
    a10g = peaks.of_gpu(cfg.peaks, "NVIDIA A10G")
    assert (a10g["bf16"], a10g["bandwidth_gbs"], a10g["launch_us"]) == (70.0, 600.0, 10.0)
    assert peaks.of_gpu(cfg.peaks, "NVIDIA Unknown 1") is None
    assert peaks.of_gpu(cfg.peaks, "Tesla T4")["bf16"] is None
    first = peaks.of_cpu(tmp_path)
    assert first["fp32"] > 0.001 and first["bandwidth_gbs"] > 0.1 and 0 < first["launch_us"] < 1e4
    assert [path.name for path in tmp_path.iterdir()] == [path.name for path in
                                                          tmp_path.glob("cpu-v*.json")]
    assert peaks.of_cpu(tmp_path) == first  # from the cache: not measured again


@pytest.mark.slow
def test_the_plan_predicts_each_cell_s_time_and_cost_on_the_study_s_gpu(reference_plan):
    stdout, table, _, _ = reference_plan
    # SAMSum's 14,732 dialogues at batch 8 for 3 epochs: the study's 5,526 steps.
    assert set(table.train_steps) == {5526}
    assert table.predicted_train_min.tolist() == pytest.approx(
        (table.predicted_step_s * 5526 / 60).tolist())
    assert table.predicted_cost_usd.tolist() == pytest.approx(
        (table.predicted_train_min / 60 * 1.006).tolist())
    published = table.dropna(subset=["reference_train_min"])
    assert published.reference_train_min.tolist() == [40.27, 49.11, 139.36, 350.24, 224.69,
                                                      331.53]
    assert published.time_ratio.tolist() == pytest.approx(
        (published.predicted_train_min / published.reference_train_min).tolist())
    # Bigger models take longer; fp16 runs the same FLOPs faster than fp32.
    lora = table[table.method == "lora"].set_index(["model", "precision"]).predicted_train_min
    assert lora["flan-t5-base", "fp32"] < lora["flan-t5-large", "fp32"] < lora["flan-t5-xl",
                                                                              "fp32"]
    assert lora["flan-t5-xl", "fp16"] < lora["flan-t5-xl", "fp32"]
    hours = table.predicted_train_min.sum() / 60
    assert (f"[harness] predicted training: {hours:.1f} GPU-hours on NVIDIA A10G (the study's) "
            f"for 9 of 9 cells to run, {table.predicted_cost_usd.sum():.2f} USD at 1.006 USD per "
            "GPU-hour (conf/cost/); uncorrected: the store holds no measured run on that GPU"
            ) in stdout


@pytest.mark.slow
def test_measured_runs_on_the_gpu_correct_the_prediction_of_their_method(reference_plan,
                                                                         tmp_path):
    # Two LoRA runs on an A10G that took 3 and 5 times their predicted step: the plan's LoRA
    # cells are corrected by the median, 4, and say so; full fine-tuning is not.
    *_, folder = reference_plan
    jobs = grids.compose_experiment("reference_table", [
        f"cache_dir={folder}/cache", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    experiment = client.create_experiment("measured-before")
    for measured in (3.0, 5.0):
        run = client.create_run(experiment, tags={"peaks_device": "NVIDIA A10G",
                                                  "status": "ok"})
        client.log_param(run.info.run_id, "method.name", "lora")
        for key, value in {"predicted_step_s": 0.5, "step_time_mean_s": 0.5 * measured}.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    table = plan.plan(jobs, [], jobs[0].plan_gpu, create_experiment=False)
    lora, full = table[table.method == "lora"], table[table.method == "full"]
    assert (lora.time_correction == 4.0).all()
    assert lora.predicted_step_s.tolist() == pytest.approx(
        (4.0 * lora.predicted_step_s_uncorrected).tolist())
    assert lora.predicted_train_min.tolist() == pytest.approx(
        (4.0 * lora.predicted_train_min_uncorrected).tolist())
    assert set(lora.corrected_from) == {"2 lora runs on NVIDIA A10G"}
    assert full.time_correction.isna().all()
    assert "5 of them corrected by measured runs" in plan.bill(table)


def test_the_steps_a_cell_will_run_are_the_loop_s():
    cfg = compose_cell("train.epochs=3", "train.grad_accum_steps=4")
    assert training_step.optimizer_steps(cfg.train, 10) == (9, 3)  # ceil(10 / 4) per epoch
    capped = compose_cell("train.max_steps=5")
    assert training_step.optimizer_steps(capped.train, 10) == (5, 1)



def test_a_cpu_s_step_is_the_ops_a_cpu_runs_with_the_same_flops():
    # On a CPU torch's AdamW runs tensor by tensor, attention takes the CPU's fused kernel (the
    # math path where T5's trained position bias needs a gradient, whose backward counts its own
    # matmuls); the FLOPs are the same to the attention path's.
    for model in ("t5-mini", "tiny-llama"):
        cell = identity.cell_config(compose_cell(f"model={model}", "method=full"))
        cuda, cpu = (estimate.step_work(cell, LENGTHS, device_type=kind)
                     for kind in ("cuda", "cpu"))
        assert work.flops(cpu) == pytest.approx(work.flops(cuda), rel=0.02)
        assert sum(row[3] * row[4] for row in cpu) > sum(row[3] * row[4] for row in cuda)
    # LoRA's dropout draws random numbers: in a CPU's step its ops are of their own kind (a
    # GPU's rows, which the committed plans price, stay as they were).
    lora = identity.cell_config(compose_cell("model=t5-mini", "method=lora",
                                             "method.dropout=0.1"))
    assert any(row[0] == "random" for row in estimate.step_work(lora, LENGTHS,
                                                                 device_type="cpu"))
    assert not any(row[0] == "random" for row in estimate.step_work(lora, LENGTHS))


def test_each_op_a_cpu_s_step_calls_is_measured_again_on_real_tensors(tmp_path, monkeypatch):
    # The simulated step's calls, made again on tensors of their shapes: every one of t5-tiny's
    # and tiny-llama's (LoRA: dropout's random numbers too), cached once measured.
    for model in ("t5-tiny", "tiny-llama"):
        cell = identity.cell_config(compose_cell(f"model={model}", "method=lora",
                                                 "method.dropout=0.1"))
        calls = estimate.step_calls(cell, LENGTHS)
        names = {json.loads(called)[0] for called, _ in calls}
        # Matmuls, dropout's random numbers, clipping's norms tensor by tensor (as on a CPU).
        assert {"aten::mm.default", "aten::bernoulli_.float",
                "aten::linalg_vector_norm.default"} <= names
        measured = op_times.seconds([called for called, _ in calls], CPU, tmp_path)
        assert all(seconds is not None and 0 < seconds < 0.1 for seconds in measured.values())
        monkeypatch.setattr(op_times, "measure", lambda *_: pytest.fail("measured again"))
        assert op_times.seconds([called for called, _ in calls], CPU, tmp_path) == measured
        monkeypatch.undo()


def test_a_call_is_made_again_as_it_was_made():
    # A view's offset and strides, an index tensor, a dtype argument: the call made again gets
    # arguments of the same description.
    weight = torch.randn(10, 4)
    view = torch.randn(6, 8)[1:, ::2]
    called = work.signature(torch.ops.aten.embedding.default, (weight, torch.tensor([[1, 2]])),
                            {})
    name, args, _ = json.loads(called)
    built = op_times._built(args, CPU)
    assert name == "aten::embedding.default" and built[0].shape == (10, 4)
    assert built[1].dtype == torch.int64 and int(built[1].sum()) == 0  # a valid index
    again = op_times._built(json.loads(work.signature(torch.ops.aten.sum.dim_IntList,
                                                       (view, [1]), {"dtype": torch.float64}))[1:],
                            CPU)
    assert (again[0][0].shape, again[0][0].stride(), again[0][0].storage_offset()) == (
        view.shape, view.stride(), view.storage_offset())
    assert again[1] == {"dtype": torch.float64}
    assert op_times.measure(called, CPU) > 0
    # What cannot be made again is priced by the host's time per op instead.
    unknown = work.signature(torch.ops.aten.add.Tensor, (torch.ones(2), object()), {})
    assert op_times.measure(unknown, CPU) is None


def test_a_replayed_step_sums_its_calls_as_measured():
    calls = [["a", 10], ["b", 2], ["c", 4]]
    found = timing.replayed_seconds(calls, {"a": 1e-3, "b": 5e-3, "c": None},
                                    {"op_us": 50.0})
    assert found == pytest.approx({"step_s": 10e-3 + 10e-3 + 4 * 50e-6, "host": 0.0,
                                   "loader": 0.0, "replayed": 12 / 16})
    # The time outside the ops, per call.
    assert timing.replayed_seconds(calls, {"a": 1e-3, "b": 5e-3, "c": None}, {"op_us": 50.0},
                                   2e-6)["step_s"] == pytest.approx(found["step_s"] + 16 * 2e-6)
    # And the loop's wait for the step's batches.
    assert timing.replayed_seconds(calls, {"a": 1e-3, "b": 5e-3, "c": None}, {"op_us": 50.0},
                                   0.0, 3e-4) == pytest.approx({**found, "step_s":
                                                                found["step_s"] + 3e-4,
                                                                "loader": 3e-4})


def test_a_cells_step_on_this_cpu_adds_its_own_time_outside_the_ops(tmp_path, monkeypatch):
    # The cell's own model and loop at one example of a few tokens: what its step spends beyond
    # its ops, per call (Python, autograd), is a few microseconds; the prediction adds it to the
    # ops measured one by one.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cell = identity.cell_config(compose_cell("model=t5-tiny", "method=full"))
    per_call = host_time.seconds_per_call(OmegaConf.create(cell))
    assert 1e-7 < per_call < 1e-4
    found = timing.on_this_cpu(cell, LENGTHS, None, {"calibration": {"op_us": 3.0}})
    assert found["replayed"] == 1.0 and 0 < found["host"] < found["step_s"]
    # The loop waits for each batch: the cell's loader over examples of the step's lengths.
    assert 0 < found["loader"] < found["step_s"] - found["host"]


def test_the_loop_waits_for_batches_of_the_cells_own_shape():
    # The loader's examples have the step's lengths, assembled and padded as the cell's family
    # does, in batches of the cell's size.
    for model, lengths, shapes in (
            ("t5-tiny", LENGTHS, {"input_ids": (3, LENGTHS["source"]),
                                  "labels": (3, LENGTHS["target"])}),
            ("tiny-llama", {"source": 20, "target": 6}, {"input_ids": (3, 26),
                                                         "labels": (3, 26)})):
        cfg = compose_cell(f"model={model}", "train.batch_size=3")
        loader = host_time.step_loader(cfg, lengths)
        assert len(loader) == host_time.LOADER_BATCHES
        assert all({key: batch[key].shape for key in shapes} == shapes for batch in loader)
        assert host_time.loader_seconds_per_batch(cfg, lengths) > 0
