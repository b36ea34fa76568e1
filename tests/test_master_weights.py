"""precision.master_weights=false: trained weights, their gradients and optimizer state in the
half dtype itself (torchtune's bf16, the LOMO paper's fp16), on real tiny models; LOMO's update
of half weights against the reference implementation; what it is refused for; its identity."""

import copy

import pytest
import torch
from lomo_optim import Lomo

from harness.config import identity, validation
from harness.config.grids import compose_experiment
from harness.model import families, lomo, methods, models, tokenizers, training_step
from tests.conftest import compose_cell

CPU = torch.device("cpu")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
LR = 0.05


def _pure(*overrides):
    cfg = compose_cell("model=tiny-llama", "precision.master_weights=false", "train.lr=0.01",
                       *overrides)
    validation.validate(cfg)
    assert validation.invalid_cell_reason(cfg) is None
    if "dropout" in cfg.method:
        cfg.method.dropout = 0.0
    return cfg


def _model(cfg):
    return methods.prepare(models.load_model(cfg.model, cfg.precision,
                                             methods.base_frozen(cfg.method.name), CPU), cfg)


def _batch(cfg):
    return families.of(cfg.model).training_batch(4, {"source": 8, "target": 8}, CPU,
                                                 tokenizers.PAD_ID, tokenizers.EOS_ID + 5)


@pytest.mark.parametrize("overrides", [
    ["method=full", "precision=bf16"],
    ["method=full_sgd", "precision=bf16"], ["method=full_sgd", "precision=fp16"],
    ["method=lomo", "precision=bf16"], ["method=lomo", "precision=fp16"],
    ["method=lora", "precision=bf16"], ["method=lora", "precision=fp16", "method.optimizer=sgd"],
    ["method=lora_lomo", "precision=bf16"]], ids=" ".join)
def test_every_trained_weight_its_gradient_and_state_are_half_and_training_learns(overrides):
    cfg = _pure(*overrides)
    half = HALF[cfg.precision.name]
    model, batch = _model(cfg), _batch(cfg)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {half}
    seen_gradients, losses = set(), []
    for weight in model.parameters():
        if weight.requires_grad:  # registered first: they run before LOMO's frees the gradient
            weight.register_post_accumulate_grad_hook(
                lambda weight: seen_gradients.add(weight.grad.dtype))
    updates = training_step.Updates(model, cfg, 20, CPU)
    for _ in range(8):
        loss = training_step.forward(model, batch, cfg.precision.name, CPU)
        losses.append(loss.item())
        updates.backward(loss, update=True)
        if updates.optimizer is not None:  # AdamW's moments in half (its step count a scalar)
            assert {value.dtype for state in updates.optimizer.state.values()
                    for value in state.values() if value.dim()} <= {half}
        updates.next_step()
    updates.close()
    assert seen_gradients == {half}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {half}
    assert losses[-1] < losses[0] - 0.05, losses
    if cfg.precision.name == "fp16":  # the loss scale started at 2^16 and found its level
        assert updates.own_scale.enabled and not updates.scaler.is_enabled()


def test_an_fp16_overflow_without_master_weights_skips_the_step_and_halves_the_scale():
    cfg = _pure("method=full_sgd", "precision=fp16")
    model, batch = _model(cfg), _batch(cfg)
    before = copy.deepcopy(model)
    updates = training_step.Updates(model, cfg, 10, CPU)
    updates.own_scale.scale = 2.0**60  # every float16 gradient overflows
    updates.backward(training_step.forward(model, batch, "fp16", CPU), update=True)
    assert updates.skipped and updates.own_scale.scale == 2.0**59
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))


def test_a_half_lomo_step_is_the_reference_implementation_s():
    # lomo_optim.Lomo, the paper's code, on bfloat16 weights: each weight and its gradient cast
    # to float32 for the update, the result cast back.
    cfg = _pure("method=lomo", "precision=bf16")
    model, batch = _model(cfg), _batch(cfg)
    reference, before = copy.deepcopy(model), copy.deepcopy(model)
    fused = lomo.FusedSGD(methods.fused_parameters(model, "lomo"), lr=LR, weight_decay=0.0,
                          warmup_steps=0, total_steps=10, max_grad_norm=None)
    assert fused.step(model(**batch).loss)
    Lomo(reference, lr=LR).fused_backward(reference(**batch).loss, LR)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))


def test_a_scaled_fp16_lomo_step_unscales_each_gradient_in_float32():
    cfg = _pure("method=lomo", "precision=fp16")
    model, batch = _model(cfg), _batch(cfg)
    reference = copy.deepcopy(model)
    (reference(**batch).loss * 1024).backward()
    expected = [(p.float() - LR * p.grad.float() / 1024).half() for p in reference.parameters()]
    fused = lomo.FusedSGD(methods.fused_parameters(model, "lomo"), lr=LR, weight_decay=0.0,
                          warmup_steps=0, total_steps=10, max_grad_norm=None)
    assert fused.step(model(**batch).loss, grad_scale=1024.0)
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected))
    assert fused.largest_grad_bytes == max(p.numel() * 2 for p in model.parameters())


@pytest.mark.parametrize("overrides, expected", [
    (["precision=fp32"], "every weight is float32 already"),
    (["precision=int8", "method=lora"], "the base weights are quantized and frozen"),
    (["precision=nf4", "method=lora"], "the base weights are quantized and frozen"),
    (["precision=fp16", "method=full"], "use precision=bf16 (torchtune's pure half precision)"),
    (["precision=fp16", "method=lora"], "method.optimizer=adamw_8bit"),
])
def test_master_weights_off_is_refused_with_the_reason_where_it_means_nothing(overrides,
                                                                              expected):
    cfg = compose_cell("model=tiny-llama", "precision.master_weights=false", *overrides)
    reason = validation.invalid_cell_reason(cfg)
    assert reason and expected in reason and "master_weights=true" in reason


def test_master_weights_is_a_boolean_logged_named_and_fingerprinted():
    with pytest.raises(validation.ConfigError,
                       match="precision.master_weights=no; expected true or false"):
        validation.validate(compose_cell("precision=bf16", "precision.master_weights=no"))
    mixed, pure = (identity.cell_config(compose_cell("model=tiny-llama", "method=lomo",
                                                     "precision=bf16",
                                                     f"precision.master_weights={flag}"))
                   for flag in ("true", "false"))
    assert identity.run_name(mixed) == "tiny-llama/lomo/bf16"
    assert identity.run_name(pure) == "tiny-llama/lomo/bf16-pure"
    assert identity.fingerprint(mixed) != identity.fingerprint(pure)
    cfg = compose_cell("precision=bf16", "precision.master_weights=false")
    assert identity.flat_params(identity.cell_config(cfg), cfg)["precision.master_weights"] \
        is False


def test_full_grid_sweeps_master_weights_as_an_axis():
    jobs = compose_experiment("full_grid", ["model=flan-t5-base", "method=full,lomo",
                                            "++method.r=8", "train.gradient_checkpointing=false",
                                            "precision.master_weights=true,false"])
    cells = {identity.run_name(identity.cell_config(job)): validation.invalid_cell_reason(job)
             for job in jobs}
    assert cells["flan-t5-base/lomo/fp16-pure"] is None
    assert cells["flan-t5-base/full/bf16-pure"] is None
    assert "eps (1e-8) is zero" in cells["flan-t5-base/full/fp16-pure"]
    assert "every weight is float32 already" in cells["flan-t5-base/full/fp32-pure"]
    assert len(cells) == 2 * 4 * 2
