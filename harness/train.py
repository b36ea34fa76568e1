"""The training loop, top to bottom: AdamW or SGD, or LOMO's updates fused into backward (the
Updates of a cell); linear schedule with warm-up, gradient accumulation, clipping, mixed
precision, per-step loss and per-epoch eval loss (and ROUGE where asked), the time of every step,
and the memory breakdown of the live tensors at the step that set the allocator's peak.
"""

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from harness import evaluate, lomo, memory, methods, optimizers
from harness.models import autocast
from harness.sampler import MIB


MAX_LOG_PERPLEXITY = 80.0  # exp(80) ~ 5.5e34: a float still, and far beyond any vocabulary


class Diverged(RuntimeError):
    """The loss stopped being finite (T5 is known to overflow in fp16)."""


@dataclass
class TrainResult:
    steps: int
    epochs: int
    train_time_s: float
    train_tokens: int
    # Per optimizer step: wall time (data loading included), samples and tokens.
    step_times_s: list = field(default_factory=list)
    step_samples: list = field(default_factory=list)
    step_tokens: list = field(default_factory=list)
    # mem_params_mib, mem_grads_mib, mem_optimizer_mib (empty when no step ran).
    breakdown: dict = field(default_factory=dict)

    def throughput(self, skip_steps: int) -> dict:
        """samples_per_s, tokens_per_s and step time p50 / p90 without the first skip_steps
        (allocator and kernel warm-up); over every step when there are no more than that."""
        first = skip_steps if self.steps > skip_steps else 0
        times = np.array(self.step_times_s[first:])
        if not len(times):
            return {}
        return {"samples_per_s": sum(self.step_samples[first:]) / times.sum(),
                "tokens_per_s": sum(self.step_tokens[first:]) / times.sum(),
                "step_time_p50_s": float(np.percentile(times, 50)),
                "step_time_p90_s": float(np.percentile(times, 90))}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Updates:
    """How a loss becomes updated weights, as cfg.method says: an optimizer (AdamW, SGD, or
    bitsandbytes' 8-bit or paged AdamW: harness/optimizers.py) steps the weights it trains after
    backward, LOMO's FusedSGD updates its weights inside backward;
    with the linear schedule, gradient clipping, gradient accumulation and fp16's loss scaling.
    The training loop uses it, and so does the memory estimate (harness/estimate.py), which runs
    it on the meta device with `foreach=True` (what torch.optim picks on CUDA), no loss scale
    (GradScaler reads its overflow flag back from the device, which meta tensors cannot do) and
    no paging."""

    def __init__(self, model, cfg, total_steps: int, device: torch.device, foreach=None,
                 loss_scaling: bool = True, paging: bool = True):
        train_cfg = cfg.train
        self.accumulation, self.max_grad_norm = train_cfg.grad_accum_steps, train_cfg.max_grad_norm
        fused_weights = methods.fused_parameters(model, cfg.method.name)
        fused_ids = {id(weight) for weight in fused_weights}
        self.stepped = [p for p in model.parameters() if p.requires_grad and id(p) not in fused_ids]
        self.optimizer = self.scheduler = self.fused = None
        if self.stepped:
            self.optimizer = optimizers.build(cfg.method.optimizer, self.stepped, train_cfg.lr,
                                              train_cfg.weight_decay, foreach, paging)
            self.scheduler = get_linear_schedule_with_warmup(self.optimizer,
                                                             train_cfg.warmup_steps, total_steps)
        if fused_weights:
            self.fused = lomo.FusedSGD(fused_weights, lr=cfg.method.get("lr_base", train_cfg.lr),
                                       weight_decay=train_cfg.weight_decay,
                                       warmup_steps=train_cfg.warmup_steps,
                                       total_steps=total_steps,
                                       max_grad_norm=train_cfg.max_grad_norm,
                                       unfused=self.stepped)
        # Scaling only matters for fp16, whose small range underflows gradients. GradScaler
        # unscales through an optimizer step, which fused updates do not have: they keep a scale
        # of their own.
        scaling = loss_scaling and cfg.precision.name == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=scaling and self.fused is None)
        self.fused_scale = lomo.LossScale(enabled=scaling)
        self.skipped = False  # whether the last update was skipped (fp16 overflow)

    def backward(self, loss: torch.Tensor, update: bool) -> bool:
        """Backward of one micro-batch; with `update` (its last), the update too. False while
        gradients accumulate."""
        if self.fused is not None:  # the fused weights are updated during this backward
            finite = self.fused.step(loss, self.fused_scale.scale)
            self.fused_scale.update(finite)
            if self.optimizer is not None and finite:
                self.optimizer.step()
            self.skipped = not finite
            return True
        self.scaler.scale(loss / self.accumulation).backward()
        if not update:
            return False
        if self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.stepped, self.max_grad_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.skipped = self.scaler.get_scale() < scale  # fp16 overflow: no step was taken
        return True

    def next_step(self) -> None:
        """After an update: the schedule moves on (unless fp16 skipped the step, as
        transformers' Trainer does) and the gradients are freed."""
        if self.optimizer is not None:
            if not self.skipped:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def rates(self) -> dict:
        """lr (lora_lomo: the adapters', with the base weights' as lr_base)."""
        if self.scheduler is None:
            return {"lr": self.fused.last_lr()}
        rates = {"lr": self.scheduler.get_last_lr()[0]}
        if self.fused is not None:
            rates["lr_base"] = self.fused.last_lr()
        return rates

    def breakdown(self, model) -> dict:
        """mem_params_mib, mem_grads_mib, mem_optimizer_mib now; a fused step held one fused
        gradient at a time, the largest, which counts."""
        found = memory.breakdown(model, [self.optimizer] if self.optimizer else [])
        if self.fused is not None:
            found["mem_grads_mib"] += self.fused.largest_grad_bytes / MIB
        return found

    def close(self) -> None:
        if self.fused is not None:
            self.fused.remove()  # generation and later code must see ordinary parameters


def forward(model, batch: dict, precision: str, device: torch.device) -> torch.Tensor:
    """The training loss of one batch. No key/value cache: training never decodes step by step
    (and activation checkpointing cannot keep one)."""
    with autocast(device, precision):
        return model(**batch, use_cache=False).loss


def train(model, train_loader, validation_loader, cfg, device: torch.device, log_metrics,
          validation_rouge=None) -> TrainResult:
    """Train in place as cfg.method says. `log_metrics(metrics: dict, step: int)` receives
    train_loss and lr per step, eval_loss and eval_perplexity per epoch, and with
    `validation_rouge` (a function that returns ROUGE scores of the validation split)
    eval_rouge1, eval_rouge2, ... per epoch."""
    train_cfg, precision = cfg.train, cfg.precision.name
    torch.manual_seed(train_cfg.seed)
    steps_per_epoch = math.ceil(len(train_loader) / train_cfg.grad_accum_steps)
    total_steps = (train_cfg.max_steps if train_cfg.max_steps is not None
                   else steps_per_epoch * train_cfg.epochs)
    epochs = math.ceil(total_steps / steps_per_epoch) if total_steps else 0
    updates = Updates(model, cfg, total_steps, device)

    step, eval_time = 0, 0.0
    result = TrainResult(steps=0, epochs=epochs, train_time_s=0.0, train_tokens=0)
    step_samples = step_tokens = peak_allocated = 0
    synchronize(device)
    start = step_start = time.perf_counter()
    progress = tqdm(total=total_steps, desc="training", unit="step")
    try:
        for epoch in range(epochs):
            model.train()
            for micro_step, batch in enumerate(train_loader):
                batch = {key: value.to(device) for key, value in batch.items()}
                loss = forward(model, batch, precision, device)
                if not torch.isfinite(loss):
                    raise Diverged(f"loss {loss.item()} at step {step} (epoch {epoch}), "
                                   f"precision {precision}")
                step_samples += len(batch["input_ids"])
                step_tokens += (int(batch["attention_mask"].sum())
                                + int((batch["labels"] != -100).sum()))
                last_micro_step = (not (micro_step + 1) % train_cfg.grad_accum_steps
                                   or micro_step + 1 == len(train_loader))
                if not updates.backward(loss, update=last_micro_step):
                    continue
                # Parameters, gradients and optimizer state are all alive here. Record them at
                # the step that raised the allocator's peak (on CPU, which keeps no peak: the
                # first).
                allocated = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                             else 0)
                if step == 0 or allocated > peak_allocated:
                    result.breakdown = updates.breakdown(model)
                    peak_allocated = allocated
                updates.next_step()
                step += 1
                progress.update()
                if step % train_cfg.log_every_steps == 0 or step == total_steps:
                    log_metrics({"train_loss": loss.item(), **updates.rates()}, step)
                synchronize(device)
                now = time.perf_counter()
                result.step_times_s.append(now - step_start)
                result.step_samples.append(step_samples)
                result.step_tokens.append(step_tokens)
                step_samples = step_tokens = 0
                step_start = now
                if step == total_steps:
                    break
            # The eval loss pass belongs to evaluation, not to the training time.
            synchronize(device)
            eval_start = time.perf_counter()
            eval_loss = evaluate.loss(model, validation_loader, precision, device)
            epoch_metrics = {"eval_loss": eval_loss, "epoch": epoch + 1,
                             "eval_examples": len(validation_loader.dataset)}
            if eval_loss < MAX_LOG_PERPLEXITY:  # beyond it, a perplexity says nothing more
                epoch_metrics["eval_perplexity"] = math.exp(eval_loss)
            if validation_rouge is not None:  # learning curves of ROUGE (the rank sweep)
                epoch_metrics.update({f"eval_{key}": value
                                      for key, value in validation_rouge().items()})
            log_metrics(epoch_metrics, step)
            eval_time += time.perf_counter() - eval_start
            step_start = time.perf_counter()
    finally:
        updates.close()
    synchronize(device)
    progress.close()
    result.steps, result.train_tokens = step, sum(result.step_tokens)
    result.train_time_s = time.perf_counter() - start - eval_time
    return result
