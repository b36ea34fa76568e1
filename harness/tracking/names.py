"""Every name the harness gives a run's metrics and tags in MLflow, said once, with its meaning
(params are the config's own keys: docs/configuration.md). A name in <angle brackets> stands for
one of several: <phase> is load, train, eval or infer; <kind> allocated, reserved or active;
<part> a part of the plan's estimate; <k> 1, 2, L or Lsum. A name marked per rank also comes as
`<name>_rank<n>` for each rank of a distributed cell, its maximum under the bare name.

docs/mlflow-names.md is generated from here (`python -m harness.tracking.names`); a test checks
that a real run logs no metric or tag left out here, and every name `always` promises.
"""

import re
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Name:
    name: str
    meaning: str
    always: bool = False  # every trained cell's finished run has it, on a CPU too
    per_rank: bool = False


QUALITY = [
    Name("train_loss", "the global batch's mean loss, per optimizer step", always=True),
    Name("lr", "the learning rate, per step (lora_lomo: the adapters')", always=True),
    Name("lr_base", "lora_lomo: the base weights' learning rate, per step"),
    Name("epoch", "the epoch an eval_loss belongs to", always=True),
    Name("eval_loss", "the validation split's loss, per epoch", always=True),
    Name("eval_perplexity", "exp(eval_loss), capped where it overflows", always=True),
    Name("eval_examples", "the validation examples the eval loss was taken over", always=True),
    Name("eval_rouge<k>", "ROUGE on the validation split per epoch (eval.rouge_every_epoch)"),
    Name("rouge<k>", "ROUGE F1 x 100 on the test split (rouge-score, stemmed)", always=True),
]
TIME = [
    Name("load_time_s", "loading the model, tokenizer and data", always=True),
    Name("train_time_s", "the training loop, eval-loss passes left out (CUDA-synchronised)",
         always=True),
    Name("train_steps", "optimizer steps taken", always=True),
    Name("train_tokens", "target tokens trained on", always=True),
    Name("eval_time_s", "generation and ROUGE on the test split", always=True),
    Name("samples_per_s", "training throughput, without the first train.throughput_skip_steps",
         always=True),
    Name("tokens_per_s", "the same in target tokens", always=True),
    Name("tokens_per_rank_per_s", "tokens_per_s over the ranks (the LOMO paper's figure)",
         always=True),
    Name("step_time_mean_s", "an optimizer step's mean wall time (the same steps)", always=True),
    Name("step_time_p50_s", "its median", always=True),
    Name("step_time_p90_s", "its 90th percentile", always=True),
    Name("train_source_length_mean", "the mean length the batches' sources were padded to",
         always=True),
    Name("train_target_length_mean", "the same for the targets", always=True),
    Name("train_flops_per_step", "one rank's optimizer step, counted on the simulated step",
         always=True),
    Name("train_tflops_per_s", "train_flops_per_step over step_time_mean_s", always=True),
    Name("mfu", "the step's FLOPs at the device's peak over the measured step", always=True),
    Name("predicted_step_s", "the time model's step (harness/estimate/timing.py)", always=True),
    Name("predicted_train_time_s", "predicted_step_s x train_steps", always=True),
]
MEMORY = [
    Name("cpu_mib", "the series of the cell's host RSS (its process tree)", always=True),
    Name("gpu_mib", "the series of the cell's GPU memory (NVML)"),
    Name("cpu_peak_mib", "the cell's host RSS at its peak", always=True, per_rank=True),
    Name("cpu_<phase>_peak_mib", "the same within a phase", always=True, per_rank=True),
    Name("cpu_<phase>_hwm_mib", "the cell process's own host RSS at its peak within a phase, "
         "as the kernel keeps it (Linux's VmHWM; the two above are raised to it)",
         per_rank=True),
    Name("cpu_baseline_mib", "the cell process's RSS with its libraries imported, before "
         "loading", always=True, per_rank=True),
    Name("gpu_peak_mib", "the cell's GPU memory at its peak (NVML, CUDA context included)",
         per_rank=True),
    Name("gpu_<phase>_peak_mib", "the same within a phase", per_rank=True),
    Name("gpu_device_peak_mib", "the visible devices' used memory at its peak, whoever used it"),
    Name("torch_peak_<kind>_mib", "the torch allocator's peak (CUDA)", per_rank=True),
    Name("torch_<phase>_peak_<kind>_mib", "the same within a phase", per_rank=True),
    Name("mem_params_mib", "the breakdown at the peak step: weights", always=True,
         per_rank=True),
    Name("mem_grads_mib", "gradients", always=True, per_rank=True),
    Name("mem_optimizer_mib", "optimizer state", always=True, per_rank=True),
    Name("mem_activations_mib", "the allocator's peak beyond the three above (CUDA)",
         per_rank=True),
    Name("mem_largest_weight_mib", "LOMO: the largest trained weight (its claim's bound)"),
    Name("sampler_cpu_s", "the memory sampler's own CPU time", always=True),
    Name("estimate_gpu_mib", "the plan's estimate of the GPU peak", always=True),
    Name("estimate_<part>_mib", "each part of that estimate and the figures beside it "
         "(docs/estimator.md)", always=True),
]
SIZE_AND_COST = [
    Name("trainable_params", "parameters trained", always=True),
    Name("total_params", "parameters of the model", always=True),
    Name("trainable_pct", "trainable_params / total_params x 100", always=True),
    Name("adapter_size_mib", "an adapter method's saved adapter"),
    Name("full_checkpoint_mib", "the full model's checkpoint, for comparison"),
    Name("checkpoint_ratio", "full_checkpoint_mib / adapter_size_mib"),
    Name("infer_latency_ms_p50", "generation latency per example (eval.infer); adapters also "
         "with _base and _merged"),
    Name("infer_latency_ms_p90", "its 90th percentile"),
    Name("infer_tokens_per_s", "generated tokens per second"),
    Name("cost_usd", "train_time_s x the price of a GPU-hour (cost.usd_per_hour)"),
    Name("train_tokens_per_usd", "train_tokens / cost_usd"),
]
METRICS = QUALITY + TIME + MEMORY + SIZE_AND_COST

TAGS = [
    Name("status", "ok, oom, diverged, skipped, failed or killed (harness/core/outcome.py); "
         "claimed, then running, while a runner has it", always=True),
    Name("status_reason", "why a run did not end ok, starting with its phase (`train: ...`)"),
    Name("mlflow.note.content", "the same as the run's description, shown by the UI"),
    Name("mlflow.runName", "model/method(-r<rank>)/precision(/strategy)", always=True),
    Name("cell", "the fingerprint of what the cell computes (a rerun skips a finished one)",
         always=True),
    Name("phase", "the cell's latest phase: where a run whose runner vanished was",
         always=True),
    Name("host", "the cell process's host", always=True),
    Name("pid", "the cell process's pid", always=True),
    Name("rank_pids", "a distributed cell's rank processes, in rank order (host:pid elsewhere)"),
    Name("runner_host", "the runner that holds the run", always=True),
    Name("runner_pid", "its pid", always=True),
    Name("runner_started", "its start (unix seconds): a reused pid is not the runner",
         always=True),
    Name("heartbeat", "the runner's latest sign of life (unix seconds)", always=True),
    Name("device", "the GPU's name, or the CPU", always=True),
    Name("gpu", "the GPU(s) the cell held (CUDA_VISIBLE_DEVICES)"),
    Name("gpu_memory_source", "where gpu_mib comes from: per process, or the whole device"),
    Name("peaks_device", "the device whose peaks MFU and the time model used", always=True),
    Name("peaks_from", "where those peaks come from (conf/peaks/, or measured here)",
         always=True),
    Name("oom_limit", "an oom: which memory ran out (cpu or gpu)"),
    Name("oom_limit_mib", "an oom: how much of it there was"),
    Name("cost_usd_per_hour", "the price cost_usd used"),
    Name("cost_price_from", "where that price comes from"),
    Name("rouge", "why ROUGE was not computed (data without text)"),
    Name("infer_merged", "how the merged adapter's inference went (or why it was skipped)"),
    *(Name(added, "only where the runner failed to add it after the cell: `not recorded: "
           "<the error>` (the cell's outcome unchanged)")
      for added in ("estimate", "work", "memory_trace", "datasets", "adapter_model")),
]


# What each <placeholder> of a name stands for.
PLACEHOLDERS = {"phase": "load|train|eval|infer", "kind": "allocated|reserved|active",
                "k": "1|2|L|Lsum", "part": "[a-z0-9_]+"}


def _pattern(declared: Name) -> re.Pattern:
    """The names `declared` stands for, `_rank<n>` after a per-rank one."""
    body = "".join(f"({PLACEHOLDERS[piece[1:-1]]})" if piece.startswith("<") else re.escape(piece)
                   for piece in re.split(r"(<[a-z]+>)", declared.name))
    return re.compile(body + (r"(_rank\d+)?" if declared.per_rank else "")
                      + (r"(_base|_merged)?" if declared.name.startswith("infer_") else ""))


def undeclared(names, declared: list[Name]) -> set[str]:
    """Those of `names` that no Name of `declared` stands for."""
    patterns = [_pattern(each) for each in declared]
    return {name for name in names if not any(p.fullmatch(name) for p in patterns)}


def missing(names, declared: list[Name]) -> set[str]:
    """The Names of `declared` marked always that none of `names` is."""
    return {each.name for each in declared
            if each.always and not any(_pattern(each).fullmatch(name) for name in names)}


def markdown() -> str:
    lines = ["# MLflow names", "",
             "Generated from `harness/tracking/names.py` (`make docs`): every metric and tag "
             "of a run, with its meaning. Params are the resolved config's keys "
             "([configuration.md](configuration.md)), with the lengths a percentile resolved "
             "to (`data.source_max_length_resolved`). In a name, <phase> is load, train, eval "
             "or infer; <kind> allocated, reserved or active; <k> 1, 2, L or Lsum. *Per rank*: "
             "also `<name>_rank<n>` for each rank of a distributed cell, the maximum under the "
             "bare name. *Always*: on every trained cell's run, on a CPU too.", ""]
    for title, names in (("Quality", QUALITY), ("Time and speed", TIME),
                         ("Memory", MEMORY), ("Size, inference and cost", SIZE_AND_COST),
                         ("Tags", TAGS)):
        lines += [f"## {title}", "", "| name | meaning | always | per rank |", "|---|---|---|---|"]
        lines += [f"| `{each.name}` | {each.meaning} | {'yes' if each.always else ''} | "
                  f"{'yes' if each.per_rank else ''} |" for each in names]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown())
