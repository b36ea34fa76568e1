"""A deep model's step written out from a shallow one's (harness/estimate/depth.py) against a
simulation of the deep model itself: the same events in the same order, the same ops, the same
estimate; and where the step does not repeat, the deep model simulated as it is."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from harness.config import identity
from harness.estimate import allocator, depth, estimate, marks, simulate, steps, work
from harness.model import models
from tests.conftest import compose_cell

LENGTHS = {"source": 24, "target": 8}
BLOCKS = 8  # deeper than depth.SHALLOW: two centre copies besides the first and last middle


def _spec(*overrides, model="t5-tiny") -> dict:
    layers = (["model.architecture.num_hidden_layers=8"] if model == "tiny-llama" else
              ["model.architecture.num_layers=8", "model.architecture.num_decoder_layers=8"])
    cfg = compose_cell(f"model={model}", *layers, *overrides)
    return json.loads(estimate._spec(identity.cell_config(cfg), LENGTHS))


def _steps(spec: dict, marked: bool):
    cfg = OmegaConf.create({**spec, "train": {"optimizer_impl": "auto", **spec["train"],
                                              "lr": 1e-3, "warmup_steps": 0}})
    on_cuda = simulate.AsOnCuda(models.HALF_DTYPES.get(cfg.precision.name)
                                if models.compute_autocast(cfg.precision) else None)
    model = steps.meta_model(cfg, on_cuda)
    marked_by = marks.Marks(model, models.blocks(model)) if marked else None
    return steps.simulated_steps(model, cfg, spec["lengths"], steps.META, on_cuda,
                                 marks=marked_by), marked_by


def _written_out(spec: dict):
    shallow = {**spec, "model": {**spec["model"], "architecture": depth.shallow(
        spec["model"]["architecture"])}}
    found, marked_by = _steps(shallow, marked=True)
    assert len(found.events) < len(_steps(spec, marked=False)[0].events)
    return depth.deepened(found, marked_by, BLOCKS)


@pytest.mark.parametrize("overrides", [
    ["method=full"], ["method=lora", "precision=bf16"],
    ["method=lora", "precision=fp16", "train.gradient_checkpointing=true"],
    ["method=full", "precision=bf16", "train.gradient_checkpointing=true"],
    ["method=lomo", "precision=bf16"], ["method=lora_lomo", "train.gradient_checkpointing=true"],
    ["method=lora_lomo", "precision=fp16"], ["method=lora", "method.optimizer=adamw_8bit"],
    ["method=lora", "precision=int8"], ["method=lora", "precision=int8",
                                         "train.gradient_checkpointing=true"],
    ["model=tiny-llama", "method=full"], ["model=tiny-llama", "method=lora", "precision=int8"],
    ["model=tiny-llama", "method=full", "train.gradient_checkpointing=true"]],
    ids=lambda overrides: " ".join(overrides))
def test_a_deep_step_written_out_from_a_shallow_one_is_the_deep_steps_own(overrides):
    model = next((item.split("=")[1] for item in overrides if item.startswith("model=")),
                 "t5-tiny")
    spec = _spec(*[item for item in overrides if not item.startswith("model=")], model=model)
    deep = _written_out(spec)
    assert deep is not None
    own, _ = _steps(spec, marked=False)
    assert deep.weights == own.weights
    # every allocation and free, in order, to the byte; frees with no allocation between them
    # as a set (a torn-down graph frees in an order of its own: see depth.py)
    assert _free_runs_as_sets(deep.events) == _free_runs_as_sets(own.events)
    assert (deep.gradients, deep.states, deep.optimizer_steps) == (
        own.gradients, own.states, own.optimizer_steps)
    assert work.per_step(deep.ops, 1) == work.per_step(own.ops, 1)


def test_the_estimate_of_a_deep_model_is_the_same_either_way(monkeypatch):
    spec = _spec("method=lora", "precision=bf16", "train.gradient_checkpointing=true")
    written_out = dict(estimate._simulated_parts(spec))
    monkeypatch.setattr(depth, "depth", lambda architecture: None)
    assert written_out == dict(estimate._simulated_parts(spec))


def test_a_step_that_does_not_repeat_is_simulated_deep():
    # A LoRA LLaMA's step: its middle blocks' runs are broken (the graph torn down after the
    # step frees them interleaved with other blocks'): not written out, and the estimate
    # simulates the deep model.
    spec = _spec("method=lora", "precision=bf16", model="tiny-llama")
    assert _written_out(spec) is None
    parts = dict(estimate._simulated_parts(spec))
    own, _ = _steps(spec, marked=False)
    assert parts["weights"] * 2**20 == pytest.approx(sum(own.weights), rel=1e-12)


def test_the_estimate_reads_nothing_of_the_order_of_frees_between_two_allocations():
    # Why a written-out step may free in another order between two allocations: the peak comes
    # at an allocation, and the allocator's blocks after a run of frees are the same whatever
    # their order (each freed block merges with its free neighbours).
    spec = _spec("method=lora", "precision=int8")
    own, _ = _steps(spec, marked=False)
    reordered = []
    for event in own.events:
        reordered.append(event)
        if event[1] > 0:
            continue
        run = len(reordered)
        while run > 0 and reordered[run - 1][1] < 0:
            run -= 1
        reordered[run:] = reordered[run:][::-1]
    assert reordered != own.events
    assert simulate.peak(reordered) == simulate.peak(own.events)
    assert allocator.replay(reordered) == allocator.replay(own.events)


def _free_runs_as_sets(events: list) -> list:
    found, frees = [], []
    for event in events:
        if event[1] < 0:
            frees.append(event)
            continue
        found += [sorted(frees), event] if frees else [event]
        frees = []
    return found + [sorted(frees)] if frees else found


def test_only_models_deeper_than_the_shallow_one_with_equal_stacks_are_written_out():
    assert depth.depth({"num_layers": 24, "num_decoder_layers": 24}) == 24
    assert depth.depth({"num_hidden_layers": 32}) == 32
    assert depth.depth({"num_layers": 24, "num_decoder_layers": 12}) is None
    assert depth.depth({"num_layers": depth.SHALLOW}) is None
    assert depth.shallow({"num_layers": 24, "num_decoder_layers": 24, "d_model": 8}) == {
        "num_layers": depth.SHALLOW, "num_decoder_layers": depth.SHALLOW, "d_model": 8}


def test_a_foreach_ops_launches_follow_its_lists():
    meta = [torch.empty(70_000, device="meta")] * 3
    assert work._foreach_launches((meta, meta)) == work.foreach_launches(2, [70_000] * 3) == 1
    assert work.foreach_launches(1, [1] * 111) == 2  # 110 tensors a launch with one list
    assert work.foreach_launches(1, [65_536 * 321]) == 2  # 320 blocks a launch
