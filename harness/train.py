"""The training loop, top to bottom: AdamW, linear schedule with warm-up, gradient accumulation,
clipping, mixed precision, per-step loss and per-epoch eval loss.
"""

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from harness import evaluate
from harness.models import autocast


class Diverged(RuntimeError):
    """The loss stopped being finite (T5 is known to overflow in fp16)."""


@dataclass
class TrainResult:
    steps: int
    epochs: int
    train_time_s: float
    train_tokens: int


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

    step, tokens, eval_time = 0, 0, 0.0
    synchronize(device)
    start = time.perf_counter()
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
            tokens += int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
            if (micro_step + 1) % train_cfg.grad_accum_steps and micro_step + 1 < len(train_loader):
                continue
            if train_cfg.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, train_cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update()
            if step % train_cfg.log_every_steps == 0 or step == total_steps:
                log_metrics({"train_loss": loss.item(), "lr": scheduler.get_last_lr()[0]}, step)
            if step == total_steps:
                break
        # The eval loss pass belongs to evaluation, not to the training time.
        synchronize(device)
        eval_start = time.perf_counter()
        log_metrics({"eval_loss": evaluate.loss(model, validation_loader, precision, device),
                     "epoch": epoch + 1}, step)
        eval_time += time.perf_counter() - eval_start
    synchronize(device)
    progress.close()
    return TrainResult(steps=step, epochs=epochs,
                       train_time_s=time.perf_counter() - start - eval_time, train_tokens=tokens)
