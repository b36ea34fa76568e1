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

from harness.cell import evaluate
from harness.core import pauses
from harness.model import families
from harness.model.tokenizers import IGNORED_LABEL
from harness.model.training_step import (
    Diverged,
    forward,
    optimizer_steps,
    repeatable,
    synchronize,
)
from harness.strategy import world as ranks

MAX_LOG_PERPLEXITY = 80.0  # exp(80) ~ 5.5e34: a float still, and far beyond any vocabulary


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
    # The lengths each batch was padded to (families' padded_lengths): what its work was.
    batch_lengths: list = field(default_factory=list)
    # mem_params_mib, mem_grads_mib, mem_optimizer_mib (empty when no step ran).
    breakdown: dict = field(default_factory=dict)

    def throughput(self, skip_steps: int) -> dict:
        """samples_per_s, tokens_per_s and step time mean, p50 and p90 without the first
        skip_steps (allocator and kernel warm-up; over every step when there are no more than
        that), and the mean lengths the batches were padded to."""
        first = skip_steps if self.steps > skip_steps else 0
        times = np.array(self.step_times_s[first:])
        if not len(times):
            return {}
        lengths = {side: float(np.mean([batch[side] for batch in self.batch_lengths]))
                   for side in ("source", "target")} if self.batch_lengths else {}
        return {"samples_per_s": sum(self.step_samples[first:]) / times.sum(),
                **{f"train_{side}_length_mean": length for side, length in lengths.items()},
                "tokens_per_s": sum(self.step_tokens[first:]) / times.sum(),
                "step_time_mean_s": float(times.mean()),
                "step_time_p50_s": float(np.percentile(times, 50)),
                "step_time_p90_s": float(np.percentile(times, 90))}


def train(engine, train_loader, validation_loader, cfg, device: torch.device, log_metrics,
          validation_rouge=None) -> TrainResult:
    """Train engine.model in place as cfg.method and cfg.strategy say (harness/strategy/engines.py;
    every rank draws the global batch and trains on its rows). `log_metrics(metrics: dict, step:
    int)` receives train_loss (the global batch's) and lr per step, eval_loss and
    eval_perplexity per epoch, and with `validation_rouge` (a function that returns ROUGE scores
    of the validation split) eval_rouge1, eval_rouge2, ... per epoch."""
    train_cfg, precision = cfg.train, cfg.precision
    family = families.of(cfg.model)
    world, causal = engine.world, family.name == "causal"
    # Dropout's masks: each rank draws its own (the same seed on every rank would drop the same
    # units of different rows); rank 0's are the single process's. The batches' order has its
    # own generator, the same on every rank (harness/cell/recipe.py).
    torch.manual_seed(ranks.dropout_seed(train_cfg.seed, world))
    total_steps, epochs = optimizer_steps(train_cfg, len(train_loader))
    updates = engine.updates(cfg, total_steps)
    model = engine.model

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
                step_samples += len(batch["input_ids"])
                step_tokens += (int(batch["attention_mask"].sum())
                                + int((batch["labels"] != IGNORED_LABEL).sum()))
                result.batch_lengths.append(family.padded_lengths(batch))
                batch, weight = ranks.split(batch, world, causal)
                batch = {key: value.to(device) for key, value in batch.items()}
                loss, again = repeatable(
                    lambda batch=batch, weight=weight:
                    forward(engine.trained, batch, precision, device) * weight, device)
                batch_loss = ranks.global_loss(loss, world)
                if not torch.isfinite(batch_loss):
                    raise Diverged(f"loss {batch_loss.item()} at step {step} (epoch {epoch}), "
                                   f"precision {precision.name}")
                last_micro_step = (not (micro_step + 1) % train_cfg.grad_accum_steps
                                   or micro_step + 1 == len(train_loader))
                if not updates.backward(loss, update=last_micro_step, again=again):
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
                    log_metrics({"train_loss": batch_loss.item(), **updates.rates()}, step)
                if step == 1:
                    pauses.at("train", train_cfg.seed, world.rank)  # a test's moment: it trains
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
            with engine.evaluating() as evaluated:
                eval_loss = evaluate.loss(evaluated, validation_loader, precision, device)
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
