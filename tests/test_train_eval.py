"""The training loop and the ROUGE scorer on real tiny models."""

import math

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq

from harness.cell import evaluate
from harness.cell.train import train
from harness.data import encoding
from harness.model import methods, models
from harness.model.training_step import Diverged
from harness.strategy.engines import Engine
from tests.conftest import compose_cell

CPU = torch.device("cpu")


def _setup(tmp_path, *overrides):
    cfg = compose_cell("data.train_size=32", "data.validation_size=8", "data.test_size=8",
                       *overrides)
    tokenizer = models.load_tokenizer(cfg.model)
    model = methods.prepare(models.load_model(cfg.model, cfg.precision.name,
                                              methods.base_frozen(cfg.method.name), CPU), cfg)
    splits = encoding.load(cfg.data, cfg.model, tokenizer, str(tmp_path)).splits
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    loaders = [DataLoader(splits[s], batch_size=cfg.train.batch_size, collate_fn=collate)
               for s in ("train", "validation")]
    return cfg, model, loaders


def _train(tmp_path, *overrides):
    cfg, model, (train_loader, validation_loader) = _setup(tmp_path, *overrides)
    logged = []
    result = train(Engine(model, cfg), train_loader, validation_loader, cfg, CPU,
                   lambda metrics, step: logged.append((step, metrics)))
    return result, logged, model


def test_loss_falls_and_steps_follow_epochs_and_accumulation(tmp_path):
    # 32 examples at batch 4 with 2 accumulation steps: 4 optimizer steps per epoch.
    result, logged, _ = _train(tmp_path, "method=full", "train.lr=1e-3", "train.batch_size=4",
                               "train.grad_accum_steps=2", "train.epochs=3")
    assert (result.steps, result.epochs) == (12, 3)
    losses = [m["train_loss"] for _, m in logged if "train_loss" in m]
    assert len(losses) == 12 and losses[-1] < losses[0]
    eval_losses = [(step, m["eval_loss"]) for step, m in logged if "eval_loss" in m]
    assert [step for step, _ in eval_losses] == [4, 8, 12]
    assert eval_losses[-1][1] < eval_losses[0][1]
    assert result.train_time_s > 0 and result.train_tokens > 0


def test_max_steps_ends_training_and_warmup_schedules_the_rate(tmp_path):
    result, logged, _ = _train(tmp_path, "method=lora", "train.max_steps=5", "train.epochs=9",
                               "train.warmup_steps=2", "train.lr=0.01")
    assert (result.steps, result.epochs) == (5, 2)  # 4 steps per epoch at batch 8
    rates = [m["lr"] for _, m in logged if "lr" in m]
    assert rates[0] == pytest.approx(0.005) and rates[1] == pytest.approx(0.01)
    assert rates[-1] == pytest.approx(0.0)


def test_lora_training_changes_only_the_adapters(tmp_path):
    cfg, model, (train_loader, validation_loader) = _setup(tmp_path, "train.max_steps=3",
                                                           "train.lr=0.01")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(Engine(model, cfg), train_loader, validation_loader, cfg, CPU, lambda *a: None)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_B" in n or "lora_A" in n for n in changed)


@pytest.mark.parametrize("method, precision", [
    ("lora", "bf16"), ("lora", "fp16"), ("lora", "int8"), ("lomo", "fp16"), ("lora_lomo", "bf16")])
def test_every_precision_trains_on_cpu(tmp_path, method, precision):
    result, logged, _ = _train(tmp_path, f"method={method}", f"precision={precision}",
                               "train.max_steps=2", "train.lr=0.01")
    assert result.steps == 2
    assert all(math.isfinite(m["train_loss"]) for _, m in logged if "train_loss" in m)


@pytest.mark.parametrize("method, precision", [
    ("full", "fp32"), ("lora", "fp32"), ("lora", "int8"), ("lora", "bf16"), ("lomo", "fp32"),
    ("lora_lomo", "bf16")])
def test_checkpointing_trains_every_method_and_precision_to_the_same_weights(tmp_path, method,
                                                                            precision):
    # Recomputing activations in backward changes the memory, not the updates (no dropout in
    # t5-tiny): two SGD steps land on the same weights, and the adapters behind frozen int8 or
    # half-precision embeddings get their gradients. (SGD: AdamW's first steps are the sign of
    # each gradient, which rounding can flip where a gradient is near zero.)
    settings = [f"method={method}", f"precision={precision}", "method.optimizer=sgd",
                "train.lr=0.05"]
    trained = {}
    for checkpointing in ("false", "true"):
        _, logged, model = _train(tmp_path, *settings, "train.max_steps=2",
                                  f"train.gradient_checkpointing={checkpointing}")
        blocks = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        assert any(m.gradient_checkpointing for m in blocks) == (checkpointing == "true")
        trained[checkpointing] = {n: p.detach().float() for n, p in model.named_parameters()
                                  if p.requires_grad}
    _, _, untrained = _train(tmp_path, *settings, "train.max_steps=0")
    before = {n: p.detach().float() for n, p in untrained.named_parameters() if p.requires_grad}
    moved = [n for n, weight in trained["true"].items() if not torch.equal(weight, before[n])]
    assert moved and (method != "lora" or all("lora_" in n for n in moved))
    for name, weight in trained["true"].items():
        torch.testing.assert_close(weight, trained["false"][name], rtol=1e-3, atol=1e-4)


def test_a_non_finite_loss_ends_training_as_diverged(tmp_path):
    cfg, model, (train_loader, validation_loader) = _setup(tmp_path, "method=full",
                                                           "train.max_steps=2")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("inf"))
    with pytest.raises(Diverged, match="at step 0"):
        train(Engine(model, cfg), train_loader, validation_loader, cfg, CPU, lambda *a: None)


def test_rouge_is_f1_times_100_with_stemming():
    assert evaluate.rouge(["Anna meets Ben"], ["Anna meets Ben"])["rouge1"] == pytest.approx(100)
    assert evaluate.rouge(["cats"], ["dogs"])["rouge1"] == 0
    # Stemming: "meeting" and "meet" are one word to ROUGE.
    assert evaluate.rouge(["they are meeting"], ["they meet"])["rouge1"] == pytest.approx(80)
    scores = evaluate.rouge(["a b c d", "x"], ["a b c d", "y"])
    assert scores["rouge2"] == pytest.approx(50)
    assert set(scores) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}


def test_generation_is_deterministic(tmp_path):
    cfg, model, _ = _setup(tmp_path)
    tokenizer = models.load_tokenizer(cfg.model)
    splits = encoding.load(cfg.data, cfg.model, tokenizer, str(tmp_path)).splits
    loader = DataLoader(splits["test"], batch_size=4,
                        collate_fn=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    first = evaluate.generate(model, tokenizer, loader, cfg.eval, "fp32", CPU)
    assert len(first) == 8
    assert first == evaluate.generate(model, tokenizer, loader, cfg.eval, "fp32", CPU)
