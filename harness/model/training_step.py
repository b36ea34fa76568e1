"""The training step the cell runs and the estimator simulates: the forward with its loss,
and the update (optimizers, LOMO's fused updates, loss scaling, clipping).
"""

import contextlib
import math
import time

import torch
from transformers import get_linear_schedule_with_warmup

from harness.core.units import MIB
from harness.measure import accounting
from harness.model import families, lomo, methods, models, optimizers, tokenizers
from harness.model.models import autocast


def optimizer_steps(train_cfg, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps, epochs begun) of a cell whose loader gives `batches_per_epoch` batches:
    train.max_steps when set, else train.epochs of them, gradients accumulated over
    train.grad_accum_steps batches (an epoch's last step takes what is left)."""
    per_epoch = math.ceil(batches_per_epoch / train_cfg.grad_accum_steps)
    total = (train_cfg.max_steps if train_cfg.max_steps is not None
             else per_epoch * train_cfg.epochs)
    return total, (math.ceil(total / per_epoch) if total and per_epoch else 0)


class Diverged(RuntimeError):
    """The loss stopped being finite (T5 is known to overflow in fp16)."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Updates:
    """How a loss becomes updated weights, as cfg.method says: an optimizer (AdamW, SGD, or
    bitsandbytes' 8-bit or paged AdamW: harness/model/optimizers.py) steps the weights it trains
    after backward, LOMO's FusedSGD updates its weights inside backward;
    with the linear schedule, gradient clipping, gradient accumulation and fp16's loss scaling.
    The training loop uses it, and so does the memory estimate (harness/estimate/estimate.py),
    which runs it on the meta device with `implementation` foreach where train.optimizer_impl
    is auto (what torch.optim picks on CUDA) and for_loop where it is fused (meta tensors have no
    fused kernel; its temporaries are a tensor's at most, the fused kernel's none), no loss
    scale (GradScaler reads its overflow flag back from the device, which meta tensors cannot do)
    and no paging."""

    def __init__(self, model, cfg, total_steps: int, device: torch.device, implementation=None,
                 loss_scaling: bool = True, paging: bool = True):
        train_cfg = cfg.train
        self.accumulation, self.max_grad_norm = train_cfg.grad_accum_steps, train_cfg.max_grad_norm
        fused_weights = methods.fused_parameters(model, cfg.method.name)
        fused_ids = {id(weight) for weight in fused_weights}
        self.stepped = [p for p in model.parameters() if p.requires_grad and id(p) not in fused_ids]
        self.optimizer = self.scheduler = self.fused = None
        if self.stepped:
            self.optimizer = optimizers.build(cfg.method.optimizer, self.stepped, train_cfg.lr,
                                              train_cfg.weight_decay,
                                              implementation or train_cfg.optimizer_impl,
                                              paging)
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
        # unscales through an optimizer step, which fused updates do not have, and only float32
        # gradients: fused updates and float16 weights without master copies keep a scale of
        # their own.
        scaling = loss_scaling and cfg.precision.name == "fp16"
        own_scale = self.fused is not None or models.trained_in_half(cfg.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=scaling and not own_scale)
        self.own_scale = lomo.LossScale(enabled=scaling and own_scale)
        self.skipped = False  # whether the last update was skipped (fp16 overflow)
        # Around the optimizer's step of the weights it steps (a strategy's: ZeRO-3 gathers them).
        self.stepping = lambda weights: contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, update: bool, again=None) -> bool:
        """Backward of one micro-batch; with `update` (its last), the update too. False while
        gradients accumulate. `again`: the loss computed again, where a fused update cannot
        backward twice through one graph (lomo.FusedSGD.step)."""
        if self.fused is not None:  # the fused weights are updated during this backward
            finite = self.fused.step(loss, self.own_scale.scale, again)
            self.own_scale.update(finite)
            if self.optimizer is not None and finite:
                with self.stepping(self.stepped):  # ZeRO-3: its weights gathered for the step
                    self.optimizer.step()
            self.skipped = not finite
            return True
        if self.own_scale.enabled:
            return self._backward_scaled(loss, update)
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

    def _backward_scaled(self, loss: torch.Tensor, update: bool) -> bool:
        """backward() for float16 weights without master copies: the loss scaled by our own
        scale; on the last micro-batch the gradients unscaled, measured, clipped, and the step
        taken only if they are finite (else the scale halves, as GradScaler does)."""
        scale = self.own_scale.scale
        (loss * (scale / self.accumulation)).backward()
        if not update:
            return False
        gradients = [p.grad for p in self.stepped if p.grad is not None]
        torch._foreach_mul_(gradients, 1.0 / scale)
        norm = torch.nn.utils.get_total_norm(gradients)
        finite = bool(torch.isfinite(norm))
        if finite:
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self.stepped, self.max_grad_norm, norm)
            self.optimizer.step()
        self.own_scale.update(finite)
        self.skipped = not finite
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
        found = accounting.breakdown(model, [self.optimizer] if self.optimizer else [])
        if self.fused is not None:
            found["mem_grads_mib"] += self.fused.largest_grad_bytes / MIB
        return found

    def close(self) -> None:
        if self.fused is not None:
            self.fused.remove()  # generation and later code must see ordinary parameters


def forward(model, batch: dict, precision, device: torch.device) -> torch.Tensor:
    """The training loss of one batch. No key/value cache: training never decodes step by step
    (and activation checkpointing cannot keep one)."""
    with autocast(device, precision):
        return model(**batch, use_cache=False).loss


def repeatable(compute, device: torch.device):
    """compute(), and a function that computes it again with the same random numbers (dropout's
    masks): (result, again)."""
    states = [torch.get_rng_state(), torch.cuda.get_rng_state(device)
              if device.type == "cuda" else None]

    def again():
        torch.set_rng_state(states[0])
        if states[1] is not None:
            torch.cuda.set_rng_state(states[1], device)
        return compute()
    return compute(), again


def one_batch_steps(cfg, batch_size: int, lengths: dict, device: torch.device,
                    total_steps: int, precision=None):
    """A cell's training step (`cfg`: a resolved cell config) on one batch of fixed shape, as
    often as it is called: (step, updates), where step() trains on the batch once and returns
    its loss and updates.close() ends it. Its model is built for it. For measuring a step's time
    alone (harness/estimate/host_time.py, bench/sampler_cost.py): no data loader, no loop."""
    model = methods.prepare(models.load_model(cfg.model, cfg.precision,
                                              methods.base_frozen(cfg.method.name), device), cfg)
    model.train()
    batch = families.of(cfg.model).training_batch(batch_size, lengths, device,
                                                  tokenizers.PAD_ID, tokenizers.EOS_ID + 1)
    updates = Updates(model, cfg, total_steps, device)

    def step() -> torch.Tensor:
        loss = forward(model, batch, precision or cfg.precision, device)
        updates.backward(loss, update=True)
        updates.next_step()
        return loss

    return step, updates


def best_seconds(step, device: torch.device, warmup: int, timed: int) -> float:
    """The fastest of `timed` calls of `step` (one_batch_steps'), each synchronized with the
    device, after `warmup` calls: what a step takes when nothing else slows it."""
    for _ in range(warmup):
        step()
    synchronize(device)
    best = float("inf")
    for _ in range(timed):
        started = time.perf_counter()
        step()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best
