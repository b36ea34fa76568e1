"""LOMO's fused updates against plain SGD, the reference implementation (lomo_optim), and two
ordinary optimizers for LoRA+LOMO; one gradient alive at a time; hooks gone after training."""

import copy

import pytest
import torch
from lomo_optim import Lomo
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq

from harness.cell.train import train
from harness.core.units import MIB
from harness.data import synthetic
from harness.model import lomo, methods, models
from harness.strategy.engines import Engine
from tests.conftest import compose_cell

CPU = torch.device("cpu")
LR = 0.05


def _model_and_batch(method: str, *overrides):
    cfg = compose_cell(f"method={method}", "data=synthetic", "data.train_size=16",
                       "data.validation_size=4", "data.test_size=4",
                       "data.source_length_median=20", "data.target_length_median=6",
                       "train.batch_size=4", *overrides)
    if "dropout" in cfg.method:  # LoRA dropout would make the compared forwards differ
        cfg.method.dropout = 0.0
    tokenizer = models.load_tokenizer(cfg.model)
    model = methods.prepare(models.load_model(cfg.model, "fp32", methods.base_frozen(method),
                                              CPU), cfg)
    splits = synthetic.synthetic(cfg.data, vocab_size=len(tokenizer))
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    loaders = [DataLoader(splits[split], batch_size=cfg.train.batch_size, collate_fn=collate)
               for split in ("train", "validation")]
    return cfg, model, next(iter(loaders[0])), loaders


def _fused(model, method, max_grad_norm=None, unfused=()):
    return lomo.FusedSGD(methods.fused_parameters(model, method), lr=LR, weight_decay=0.0,
                         warmup_steps=0, total_steps=10, max_grad_norm=max_grad_norm,
                         unfused=unfused)


def _largest_difference(model, reference) -> float:
    return max((a - b).abs().max().item()
               for a, b in zip(model.parameters(), reference.parameters()))


def _count_updates(fused: lomo.FusedSGD) -> dict:
    """How many times each fused weight's optimizer steps, by weight."""
    counts = {weight: 0 for weight in fused.parameters}
    for weight, optimizer in fused.optimizers.items():
        optimizer.register_step_post_hook(
            lambda *_, weight=weight: counts.__setitem__(weight, counts[weight] + 1))
    return counts


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_lomo_step_is_a_plain_sgd_step(max_grad_norm, checkpointing):
    # With activation checkpointing, backward recomputes each block: the fused update must still
    # run once per weight (the norm pass updates nothing).
    _, model, batch, _ = _model_and_batch(
        "lomo", f"train.gradient_checkpointing={str(checkpointing).lower()}")
    reference = copy.deepcopy(model)
    before = copy.deepcopy(model)

    fused = _fused(model, "lomo", max_grad_norm)
    updates = _count_updates(fused)
    model.train()
    assert fused.step(model(**batch).loss)
    assert set(updates.values()) == {1}

    sgd = torch.optim.SGD(reference.parameters(), lr=LR)
    reference(**batch).loss.backward()
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_grad_norm)
        assert norm > max_grad_norm  # the clipping path is really exercised
    sgd.step()
    assert _largest_difference(model, reference) <= 1e-6
    assert _largest_difference(model, before) > 1e-3  # and the step moved the weights


def test_lomo_matches_the_reference_implementation():
    _, model, batch, _ = _model_and_batch("lomo")
    reference = copy.deepcopy(model)

    assert _fused(model, "lomo", max_grad_norm=1.0).step(model(**batch).loss)

    lomo_optim = Lomo(reference, lr=LR, clip_grad_norm=1.0)
    loss = reference(**batch).loss
    lomo_optim.grad_norm(loss)
    lomo_optim.fused_backward(loss, LR)
    assert _largest_difference(model, reference) <= 1e-6


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_lora_lomo_step_is_sgd_on_the_base_and_adamw_on_the_adapters(max_grad_norm,
                                                                        checkpointing):
    _, model, batch, _ = _model_and_batch(
        "lora_lomo", f"train.gradient_checkpointing={str(checkpointing).lower()}")
    reference = copy.deepcopy(model)

    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    adamw = torch.optim.AdamW(adapters, lr=1e-3)
    fused = _fused(model, "lora_lomo", max_grad_norm, unfused=adapters)
    updates = _count_updates(fused)
    model.train()
    assert fused.step(model(**batch).loss)
    assert set(updates.values()) == {1}
    adamw.step()

    base = methods.fused_parameters(reference, "lora_lomo")
    reference_adapters = [p for n, p in reference.named_parameters() if "lora_" in n]
    sgd, reference_adamw = (torch.optim.SGD(base, lr=LR),
                            torch.optim.AdamW(reference_adapters, lr=1e-3))
    reference(**batch).loss.backward()
    if max_grad_norm is not None:  # one norm over the whole model, as full fine-tuning has
        torch.nn.utils.clip_grad_norm_([*base, *reference_adapters], max_grad_norm)
    sgd.step()
    reference_adamw.step()
    assert _largest_difference(model, reference) <= 1e-6


def test_at_most_one_base_gradient_is_alive_during_backward():
    _, model, batch, _ = _model_and_batch("lora_lomo")
    base = methods.fused_parameters(model, "lora_lomo")
    alive = []
    # Registered first, so it runs before the fused update of each weight.
    for weight in base:
        weight.register_post_accumulate_grad_hook(
            lambda _: alive.append(sum(p.grad is not None for p in base)))
    _fused(model, "lora_lomo").step(model(**batch).loss)
    assert len(alive) == len(base) and max(alive) == 1


def test_training_with_lomo_leaves_no_hooks_and_a_gradient_breakdown_of_one_weight():
    cfg, model, batch, (train_loader, validation_loader) = _model_and_batch(
        "lomo", "train.max_steps=2")
    result = train(Engine(model, cfg), train_loader, validation_loader, cfg, CPU, lambda *a: None)
    assert result.steps == 2
    largest = max(p.numel() * p.element_size() for p in model.parameters()) / MIB
    assert result.breakdown["mem_grads_mib"] == pytest.approx(largest)
    assert result.breakdown["mem_optimizer_mib"] == 0  # plain SGD keeps no state
    # With the hooks gone, an ordinary backward keeps every gradient.
    model(**batch).loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_sgd_baseline_keeps_no_optimizer_state_and_adamw_two_moments():
    states = {}
    for optimizer in ("sgd", "adamw"):
        cfg, model, _, (train_loader, validation_loader) = _model_and_batch(
            "full", f"method.optimizer={optimizer}", "train.max_steps=1")
        states[optimizer] = train(Engine(model, cfg), train_loader, validation_loader, cfg, CPU,
                                  lambda *a: None).breakdown
    assert states["sgd"]["mem_optimizer_mib"] == 0
    assert states["adamw"]["mem_optimizer_mib"] >= 2 * states["adamw"]["mem_grads_mib"]
    assert states["sgd"]["mem_grads_mib"] == states["adamw"]["mem_grads_mib"]


def test_an_fp16_loss_scale_overflow_updates_nothing_and_halves_the_scale():
    _, model, batch, _ = _model_and_batch("lomo")
    before = copy.deepcopy(model)
    scale = lomo.LossScale(enabled=True, initial=float("inf"))
    assert not _fused(model, "lomo").step(model(**batch).loss, scale.scale)
    scale.update(False)
    assert _largest_difference(model, before) == 0
    assert all(p.grad is None for p in model.parameters())
