"""The estimate: its simulated steps against the same steps run for real on the CPU, its parts
against the live tensors of a real model, activation checkpointing, and the command line."""

import gc
import json
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from torch.utils._pytree import tree_map

from harness.config import identity
from harness.core.units import MIB
from harness.estimate import estimate, meta_outputs, simulate, steps
from harness.measure import accounting
from harness.model import methods, models
from tests.conftest import REPO, compose_cell

CPU = torch.device("cpu")
LENGTHS = {"source": 24, "target": 8}


def _cell(*overrides):
    # Eager attention: the CPU has no memory-efficient attention kernel to compare with.
    cfg = compose_cell("model=t5-mini", "model.attn_implementation=eager", *overrides)
    if "dropout" in cfg.method:
        cfg.method.dropout = 0.0
    return cfg


def _on_cpu(cfg):
    """The cell's model on the CPU, as the cell builds it; LLM.int8 without outlier columns, as
    the estimate counts it."""
    model = models.load_model(cfg.model, cfg.precision, methods.base_frozen(cfg.method.name),
                              CPU)
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear8bitLt):
            layer.state.threshold = 0.0
    return methods.prepare(model, cfg)


def _both(cfg) -> tuple:
    on_meta = steps.simulated_steps(steps.meta_model(cfg, simulate.AsOnCuda(None)), cfg,
                                       LENGTHS, steps.META, simulate.AsOnCuda(None))
    return on_meta, steps.simulated_steps(_on_cpu(cfg), cfg, LENGTHS, CPU)


@pytest.mark.parametrize("overrides", [
    ["method=full"], ["method=full", "method.optimizer=sgd"], ["method=lora"],
    ["method=lora", "train.gradient_checkpointing=true"],
    ["method=full", "train.gradient_checkpointing=true"],
    ["method=lomo", "train.gradient_checkpointing=true"], ["method=lora_lomo"],
    ["method=lora", "precision=int8", "train.gradient_checkpointing=true"],
    # Without master weights: weights, gradients and AdamW's moments in half; LOMO's float32
    # casts of one weight and its gradient at a time.
    ["method=full", "precision=bf16", "precision.master_weights=false"],
    ["method=full_sgd", "precision=fp16", "precision.master_weights=false"],
    ["method=lomo", "precision=fp16", "precision.master_weights=false"],
    ["method=lomo", "precision=bf16", "precision.master_weights=false",
     "train.gradient_checkpointing=true"]],
    ids=lambda overrides: " ".join(overrides))
def test_the_simulated_steps_are_the_steps_run_for_real(overrides):
    # Two training steps of the cell's own code on the meta device allocate and free what the
    # same steps allocate and free on real tensors: the same weights, the same peak.
    cfg = _cell(*overrides)
    on_meta, on_cpu = _both(cfg)
    assert on_meta.weights == on_cpu.weights
    assert simulate.peak(on_meta.events)[0] == simulate.peak(on_cpu.events)[0]
    if cfg.precision.name != "int8":  # bitsandbytes' CPU kernels return other shapes inside
        assert [size for _, size in on_meta.events] == [size for _, size in on_cpu.events]
    assert on_meta.bytes_of(on_meta.gradients) == on_cpu.bytes_of(on_cpu.gradients)
    assert on_meta.bytes_of(on_meta.states) == on_cpu.bytes_of(on_cpu.states)


@pytest.mark.parametrize("overrides", [
    ["method=lora", "train.gradient_checkpointing=true"], ["method=lomo", "precision=bf16"],
    ["method=lora", "precision=int8"], ["method=full", "precision=fp16"],
    ["model=tiny-llama", "method=lora_lomo"]], ids=lambda overrides: " ".join(overrides))
def test_outputs_made_from_their_shapes_change_nothing(overrides):
    # harness/estimate/meta_outputs.py makes an op's outputs from what it returned before on the
    # same shapes: the simulated steps allocate, free and count the same, to the byte.
    cfg = _cell(*overrides)
    on_cuda = simulate.AsOnCuda(torch.float16 if "fp16" in " ".join(overrides) else None)
    found = [steps.simulated_steps(steps.meta_model(cfg, on_cuda), cfg, LENGTHS,
                                      steps.META, on_cuda, reuse_outputs=reuse)
             for reuse in (False, True, True)]  # the second reuse: every op seen before
    assert simulate.Trace.SHARED.seen
    for reused in found[1:]:
        assert reused.events == found[0].events
        assert reused.ops == found[0].ops
        assert (reused.gradients, reused.states, reused.optimizer_steps) == (
            found[0].gradients, found[0].states, found[0].optimizer_steps)


def test_the_light_tree_map_maps_as_torchs_own():
    # meta_outputs.mapped stands in for torch's tree_map over an op's arguments (autocast's
    # casts, the FLOP formulas' shapes): the same leaves mapped, torch.Size kept whole.
    meta = torch.empty(2, 3, device="meta")
    arguments = ((meta, [meta, 1.5], torch.Size([2, 3]), None), {"weight": meta, "eps": 1e-6})
    shape = lambda value: value.shape if isinstance(value, torch.Tensor) else value  # noqa: E731
    assert meta_outputs.mapped(arguments, shape) == tree_map(shape, arguments)
    assert type(meta_outputs.mapped(arguments, shape)[0][2]) is torch.Size


def test_checkpointing_keeps_far_less_for_backward():
    # On real tensors: a step's peak beyond the weights and the adapters' state.
    peaks = {flag: simulate.peak(steps.simulated_steps(
        _on_cpu(cfg := _cell("method=lora", f"train.gradient_checkpointing={flag}")),
        cfg, {"source": 64, "target": 16}, CPU).events)[0] for flag in ("false", "true")}
    assert peaks["true"] < 0.5 * peaks["false"]


def _estimate(*overrides, lengths=LENGTHS) -> dict:
    return estimate.gpu_peak_mib(identity.cell_config(_cell(*overrides)), lengths)


@pytest.mark.parametrize("method, optimizer, precision", [
    ("full", "adamw", "fp32"), ("full", "sgd", "fp32"), ("lora", "adamw", "bf16"),
    ("lora", "adamw", "int8"), ("lomo", "sgd", "fp32")])
def test_weights_and_optimizer_state_are_a_real_steps(method, optimizer, precision):
    # The live tensors of a real model on the CPU after one optimizer step.
    cfg = _cell(f"method={method}", f"method.optimizer={optimizer}", f"precision={precision}")
    model = _on_cpu(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    step = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer](trainable, lr=1e-3)
    ids = torch.randint(3, 200, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    step.step()
    real = accounting.breakdown(model, [step])
    # LLM.int8's row scales, which its layers move from the weight to their state when they run.
    scales = sum(layer.state.SCB.numel() * 4 for layer in model.modules()
                 if isinstance(layer, bnb.nn.Linear8bitLt))
    parts = _estimate(f"method={method}", f"method.optimizer={optimizer}",
                      f"precision={precision}")
    assert parts["weights"] == pytest.approx(real["mem_params_mib"] + scales / MIB)
    # AdamW's step counts are host tensors on a GPU: the estimate counts them (4 bytes each).
    assert parts["optimizer"] == pytest.approx(real["mem_optimizer_mib"], abs=0.01)
    if method == "lomo":  # never more than the largest weight's gradient at once
        assert parts["gradients"] <= max(p.numel() for p in trainable) * 4 / MIB


@pytest.mark.slow
def test_the_estimate_orders_methods_precisions_and_checkpointing_as_their_memory_does():
    # (flan-t5-xl's three precisions are rows of the reference plan, tests/test_plan.py.)
    lora = ["model=flan-t5-base", "method=lora", "train.gradient_checkpointing=true"]
    lengths = {"source": 64, "target": 16}
    fp32, fp16, int8 = (_estimate(*lora, f"precision={p}", lengths=lengths)
                        for p in ("fp32", "fp16", "int8"))
    assert int8["weights"] < fp16["weights"] < fp32["weights"]
    # flan-t5-base has 247.6 M weights (and LoRA's 0.9 M): 948 MiB in float32.
    assert fp32["weights"] == pytest.approx(248.5e6 * 4 / MIB, rel=0.01)
    base = ["model=flan-t5-base", "train.batch_size=2"]
    full, sgd, lomo, lora = (_estimate(*base, f"method={m}")["total"]
                             for m in ("full", "full_sgd", "lomo", "lora"))
    assert full > sgd > lomo > lora
    plain, checkpointed = (_estimate("model=flan-t5-base", "method=lora",
                                     f"train.gradient_checkpointing={flag}",
                                     lengths={"source": 255, "target": 50})
                           for flag in ("false", "true"))
    assert checkpointed["activations"] < plain["activations"] / 4


@pytest.mark.parametrize("method", ["lora", "lomo"])
def test_what_a_simulation_frees_waits_for_no_garbage_collection(method):
    # estimate._estimate keeps the process's objects out of the collector's view while it
    # simulates: that must change no event. The same step with no collection at all and with
    # one every fifty new objects.
    spec = json.loads(estimate._spec(identity.cell_config(_cell(f"method={method}",
                                                                "train.max_grad_norm=1.0")),
                                     LENGTHS))
    threshold = gc.get_threshold()
    try:
        gc.disable()
        uncollected = estimate._simulated_parts(spec)
        gc.enable()
        gc.set_threshold(50, 2, 2)
        collected_often = estimate._simulated_parts(spec)
    finally:
        gc.enable()
        gc.set_threshold(*threshold)
    assert uncollected == collected_often


def test_cells_that_differ_only_in_what_the_step_does_not_read_share_one_simulation():
    # The key of the simulation's caches (estimate._spec): what changes the simulated step.
    def key(*overrides):
        return estimate._spec(identity.cell_config(_cell("method=lora", *overrides)), LENGTHS)

    same = key()
    for unread in ("train.seed=7", "train.epochs=9", "train.lr=0.5", "train.max_steps=3",
                   "eval.num_beams=4", "tracking.experiment=other", "data.train_size=64"):
        assert key(unread) == same, unread
    for read in ("train.batch_size=4", "train.gradient_checkpointing=true", "method.r=16",
                 "precision=bf16", "train.max_grad_norm=0.5", "train.optimizer_impl=for_loop",
                 "model=tiny-llama"):
        assert key(read) != same, read
    # One rank's share of the batch: two ranks at 16 are one process at 8.
    assert key("strategy=ddp", "strategy.nproc_per_node=2", "train.batch_size=16") == key(
        "train.batch_size=8")


def test_estimates_are_cached_on_disk_by_cell_and_code(tmp_path, monkeypatch):
    cell = identity.cell_config(_cell("method=lora"))
    first = estimate.gpu_peak_mib(cell, LENGTHS, str(tmp_path))
    assert len(list((tmp_path / "estimates").glob("*.json"))) == 1
    monkeypatch.setattr(estimate, "_estimate", lambda spec: pytest.fail("simulated again"))
    assert estimate.gpu_peak_mib(cell, LENGTHS, str(tmp_path)) == first


@pytest.mark.slow  # starts worker processes
def test_a_plans_estimates_are_simulated_side_by_side_once_each(tmp_path, monkeypatch):
    # Four requests, three cells, each simulated once in a worker process, forked from the first
    # cell on (what is appended to simulated_here there is not seen here); every result as
    # gpu_peak_mib gives it alone.
    cells = [identity.cell_config(_cell(f"method={method}")) for method in ("lora", "full", "lomo")]
    alone = [estimate.gpu_peak_mib(cell, LENGTHS) for cell in cells]
    simulated_here = []
    real_estimate = estimate._estimate

    def simulated(spec):
        # An op large enough for an OpenMP parallel region, which this process entered too:
        # a forked worker that did not keep to one thread would hang here.
        torch.ones(2**22).mul_(2)
        simulated_here.append(spec)
        return real_estimate(spec)

    torch.ones(2**22).mul_(2)
    monkeypatch.setattr(estimate, "_estimate", simulated)
    assert estimate._start_method() == "fork"  # no CUDA here
    requests = [(cell, LENGTHS, str(tmp_path)) for cell in [*cells, cells[0]]]
    assert estimate.gpu_peaks_mib(requests) == [*alone, alone[0]]
    assert simulated_here == []
    assert len(list((tmp_path / "estimates").glob("*.json"))) == 3
    # All cached now: nothing is simulated again, here or elsewhere.
    assert estimate.gpu_peaks_mib(requests) == [*alone, alone[0]] and simulated_here == []
    # Where workers are spawned (CUDA initialised here), the cells are simulated here, one by
    # one, until that has taken longer than a spawned worker takes to start.
    monkeypatch.setattr(estimate, "_start_method", lambda: "spawn")
    monkeypatch.setattr(estimate, "WORKER_START_S", 3600.0)
    here = tmp_path / "here"
    assert estimate.gpu_peaks_mib([(cell, LENGTHS, str(here)) for cell in cells]) == alone
    assert len(simulated_here) == 3


@pytest.mark.slow
def test_the_command_line_prints_one_cells_parts_as_json_last(tmp_path):
    result = subprocess.run([sys.executable, "-m", "harness.estimate", "model=t5-mini",
                             "method=lora", "train.gradient_checkpointing=true",
                             f"cache_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    parts = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(parts) == {"weights", "gradients", "optimizer", "activations", "allocator",
                          "cuda_context", "total", "allocated", "host", "largest_trained_weight",
                          # what a strategy shares out (harness/estimate/sharding.py)
                          "trained_weights", "trained_weights_fp32", "largest_block",
                          "largest_block_trained", "largest_layer", "step_temporaries",
                          # the quantized layers' scales, kept whole on every rank
                          "quantization_state",
                          "activations_outside_step"}
    assert parts["host"] == 0  # one process keeps nothing on the host
    assert parts["total"] == pytest.approx(sum(parts[name] for name in estimate.PARTS), abs=0.5)
    assert parts["allocated"] == pytest.approx(parts["total"] - parts["allocator"]
                                               - parts["cuda_context"], abs=0.5)
    assert "t5-mini/lora-r8/fp32, batch 8, lengths 384 / 96 (config)" in result.stdout
    refused = subprocess.run([sys.executable, "-m", "harness.estimate", "method=full",
                              "precision=int8"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "method=full" in refused.stderr
    offloaded = subprocess.run([sys.executable, "-m", "harness.estimate", "model=t5-mini",
                                "method=full", "strategy=zero3_offload", f"cache_dir={tmp_path}"],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert offloaded.returncode == 0, offloaded.stderr[-2000:]
    assert "one rank of zero3_offload-x1, at its share of the batch (8 examples)" in \
        offloaded.stdout
    assert json.loads(offloaded.stdout.strip().splitlines()[-1])["host"] > 0


def test_an_nf4_estimate_leaves_bitsandbytes_able_to_quantize_real_weights(monkeypatch):
    # bitsandbytes caches the code map of its double quantization on the device it first sees:
    # an estimate on the meta device must not leave it there for a real load afterwards.
    monkeypatch.setattr(bnb.functional, "name2qmap", {})
    cfg = _cell("method=lora", "precision=nf4")
    assert _estimate("method=lora", "precision=nf4")["weights"] > 0
    model = models.load_model(cfg.model, cfg.precision, True, CPU)
    assert bnb.functional.name2qmap["dynamic"].device == CPU
    assert any(isinstance(layer, bnb.nn.Linear4bit) for layer in model.modules())


LENGTHS = {"source": 64, "target": 16}


def _rank_estimate(*overrides: str) -> dict:
    return estimate.gpu_peak_mib(identity.cell_config(compose_cell(
        "model=t5-mini", "method=full", "train.batch_size=8", *overrides)), LENGTHS)


def test_a_ranks_estimate_shares_the_model_out_as_its_engine_does():
    single = _rank_estimate()
    # DeepSpeed's buckets and prefetch are larger than this model: left out, so that its
    # partitions show.
    buckets = ["strategy.reduce_bucket_size=0", "strategy.stage3_prefetch_bucket_size=0"]
    ranks = {name: _rank_estimate(f"strategy={name}", "strategy.nproc_per_node=4",
                                  *(buckets if name.startswith("zero") else []))
             for name in ("ddp", "fsdp", "fsdp_offload", "zero2", "zero3", "zero3_offload")}
    assert single["host"] == 0 and ranks["ddp"]["weights"] == single["weights"]
    # Each rank trains 2 of the 8 examples.
    assert ranks["ddp"]["activations"] < single["activations"]
    fsdp = ranks["fsdp"]
    assert fsdp["weights"] == pytest.approx(single["weights"] / 4 + 2 * single["largest_block"])
    assert fsdp["optimizer"] == pytest.approx(single["optimizer"] / 4)
    assert ranks["zero2"]["weights"] == single["weights"]  # ZeRO-2 keeps the weights whole
    assert ranks["zero3"]["weights"] < single["weights"]
    for offloaded in ("fsdp_offload", "zero3_offload"):  # what leaves the GPU is on the host
        assert ranks[offloaded]["host"] > 0
        assert ranks[offloaded]["total"] < ranks[offloaded.removesuffix("_offload")]["total"]
    assert ranks["zero3_offload"]["optimizer"] == 0
    # foreach AdamW's step allocates whole-model temporaries; a sharded one steps its shard.
    assert single["step_temporaries"] > 0
    for name in ("fsdp", "zero3"):
        assert ranks[name]["activations"] >= ranks[name]["activations_outside_step"]
        assert ranks[name]["activations"] <= max(
            ranks[name]["activations_outside_step"],
            ranks["ddp"]["activations"] - 0.75 * ranks["ddp"]["step_temporaries"]) + 1e-6


def test_zero_model_states_match_deepspeeds_own_estimate():
    """DeepSpeed's estimate_zero{2,3}_model_states_mem_needs_all_live count a mixed-precision
    model's states (16-bit weights and gradients, float32 master, moments and gradients); the
    harness trains float32 weights under autocast, whose master copy is the weight itself. The
    same accounting, with that difference written out, gives the same bytes."""
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        model_to_params,
    )
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = compose_cell("model=t5-mini", "method=full")
    params, largest_layer = model_to_params(models.random_model(cfg.model))
    ranks = 4
    for stage in (2, 3):
        ours = _rank_estimate(f"strategy=zero{stage}", f"strategy.nproc_per_node={ranks}",
                              "strategy.reduce_bucket_size=0",
                              "strategy.stage3_prefetch_bucket_size=0")
        # The model's own counts: DeepSpeed's, from a real model, and the estimate's, from meta.
        assert ours["trained_weights_fp32"] * MIB == pytest.approx(4 * params)
        states = (ours["weights"] + ours["optimizer"]) * MIB + 4 * params / ranks  # grads live
        if stage == 2:
            _, theirs = estimate_zero2_model_states_mem_needs(params, ranks, cpu_offload=False)
            # Float32 weights whole instead of 16-bit ones; no 16-bit gradient beside the
            # float32 partition.
            assert states == pytest.approx(theirs + 2 * params - 2 * params / ranks, rel=1e-3)
        else:
            assert ours["largest_layer"] * MIB == pytest.approx(4 * largest_layer)
            _, theirs, _ = estimate_zero3_model_states_mem_needs(
                params, largest_layer, ranks, cpu_offload=False)
            # Float32 partitions of weights and gradients: 2 bytes more of each per weight than
            # DeepSpeed's 16-bit ones, less the 16-bit gradient it keeps as well.
            assert states == pytest.approx(theirs + 2 * params / ranks, rel=1e-3)


def _stored(model) -> dict:
    """{name: (dtype, numel)} of every parameter and buffer: what the weights hold as stored."""
    return {name: (str(tensor.dtype), tensor.numel())
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("overrides", [
    ["model=t5-tiny", "precision=nf4"],
    ["model=tiny-llama", "precision=nf4", "precision.unquantized_dtype=bf16"],
    ["model=t5-tiny", "precision=int8", "precision.unquantized_dtype=bf16"],
    ["model=tiny-llama", "precision=int8"],
], ids=["t5-nf4-auto", "llama-nf4-bf16", "t5-int8-bf16", "llama-int8-auto"])
def test_a_quantized_estimate_stores_what_a_real_load_does(overrides):
    """The layers bitsandbytes leaves unquantized (embeddings, norms, the head) in the dtype a
    real load through transformers gives them (precision.unquantized_dtype; auto: the
    checkpoint's, float32 for random weights), and every 4-bit and 8-bit layer as it packs it."""
    cfg = compose_cell(*overrides, "method=lora")
    real = _stored(methods.prepare(models.load_model(cfg.model, cfg.precision, True, CPU), cfg))
    simulated = _stored(steps.meta_model(cfg, simulate.AsOnCuda(None)))
    assert simulated == real
    chosen = cfg.precision.unquantized_dtype
    norms = {dtype for name, (dtype, _) in real.items() if "norm" in name}
    assert norms == {"torch.float32" if chosen == "auto" else "torch.bfloat16"}
