"""The training loop, top to bottom: AdamW, linear schedule with warm-up, gradient accumulation,
clipping, mixed precision, per-step loss and per-epoch eval loss, the time of every step, and the
memory breakdown of the live tensors at the step that set the allocator's peak.
"""

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from harness import evaluate, memory
from harness.models import autocast


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


def train(model, train_loader, validation_loader, train_cfg, precision: str,
          device: torch.device, log_metrics) -> TrainResult:
    """Train in place. `log_metrics(metrics: dict, step: int)` receives train_loss, lr, eval_loss."""
    torch.manual_seed(train_cfg.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_loader) / train_cfg.grad_accum_steps)
    total_steps = (train_cfg.max_steps if train_cfg.max_steps is not None
                   else steps_per_epoch * train_cfg.epochs)
    epochs = math.ceil(total_steps / steps_per_epoch) if total_steps else 0
    scheduler = get_linear_schedule_with_warmup(optimizer, train_cfg.warmup_steps, total_steps)
    # Scaling only matters for fp16, whose small range underflows gradients.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    step, eval_time = 0, 0.0
    result = TrainResult(steps=0, epochs=epochs, train_time_s=0.0, train_tokens=0)
    step_samples = step_tokens = peak_allocated = 0
    synchronize(device)
    start = step_start = time.perf_counter()
    progress = tqdm(total=total_steps, desc="training", unit="step")
    for epoch in range(epochs):
        model.train()
        for micro_step, batch in enumerate(train_loader):
            batch = {key: value.to(device) for key, value in batch.items()}
            with autocast(device, precision):
                loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise Diverged(f"loss {loss.item()} at step {step} (epoch {epoch}), "
                               f"precision {precision}")
            scaler.scale(loss / train_cfg.grad_accum_steps).backward()
            step_samples += len(batch["input_ids"])
            step_tokens += int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
            if (micro_step + 1) % train_cfg.grad_accum_steps and micro_step + 1 < len(train_loader):
                continue
            if train_cfg.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, train_cfg.max_grad_norm)
            scaler.step(optimizer)
            # Parameters, gradients and optimizer state are all alive here. Record them at the
            # step that raised the allocator's peak (on CPU, which keeps no peak: the first).
            allocated = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
            if step == 0 or allocated > peak_allocated:
                result.breakdown, peak_allocated = memory.breakdown(model, [optimizer]), allocated
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update()
            if step % train_cfg.log_every_steps == 0 or step == total_steps:
                log_metrics({"train_loss": loss.item(), "lr": scheduler.get_last_lr()[0]}, step)
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
        log_metrics({"eval_loss": evaluate.loss(model, validation_loader, precision, device),
                     "epoch": epoch + 1}, step)
        eval_time += time.perf_counter() - eval_start
        step_start = time.perf_counter()
    synchronize(device)
    progress.close()
    result.steps, result.train_tokens = step, sum(result.step_tokens)
    result.train_time_s = time.perf_counter() - start - eval_time
    return result
