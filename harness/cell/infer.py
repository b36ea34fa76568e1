"""The inference benchmark of a cell (the LoRA paper's claim: no added latency once the adapter is
merged), and the size of the checkpoint an adapter replaces.

After evaluation, in its own phase (`infer`), the trained model generates for the first
eval.infer_examples examples of the test split, in batches of eval.infer_batch_size, exactly
eval.infer_new_tokens new tokens each (greedy), under the cell's precision. The first batch runs
once untimed (warm-up: kernels, caches, the allocator); then every batch is timed, with CUDA
synchronised before and after. Per batch, the latency per example is its time over its size:

  infer_latency_ms_p50 / _p90   the median and 90th percentile of that latency over batches
  infer_tokens_per_s            generated tokens over the timed seconds

An adapter method measures the model three ways: as trained (the adapter beside the base, which
adds work per token), `_base` (the adapter disabled: the base model alone, in the same process
and precision) and `_merged` (after peft's merge_and_unload: W = W0 + BA). peft merges into
float32 and half weights exactly, and into bitsandbytes int8 and 4-bit weights by dequantizing,
adding and quantizing again (rounding: generations may differ slightly); a merge peft refuses is
skipped, its reason in the tag `infer_merged`.
"""

import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from harness.core.units import MIB
from harness.measure import accounting
from harness.model.models import autocast
from harness.model.training_step import synchronize


def benchmark(model, tokenizer, split, cfg, device: torch.device, family, log) -> None:
    """Log the latency figures of the model as trained and, for an adapter, of its base and of
    the merged model. Merging changes the model: this runs last."""
    examples = split.select(range(min(cfg.eval.infer_examples, len(split))))
    loader = DataLoader(examples, batch_size=cfg.eval.infer_batch_size,
                        collate_fn=family.generation_collate(tokenizer))

    def measure(generator, variant: str) -> dict:
        return latency(generator, loader, cfg.eval.infer_new_tokens, tokenizer.pad_token_id,
                       cfg.precision, device, f"inference ({variant})")

    log(measure(model, "as trained"))
    if not hasattr(model, "merge_and_unload"):  # no adapter: the model is its own base
        return
    with model.disable_adapter():
        log(_suffixed(measure(model, "base"), "_base"))
    try:
        merged = model.merge_and_unload()
    except Exception as error:  # a layer peft cannot merge into: say why, keep the rest
        log.tag("infer_merged", f"skipped: {type(error).__name__}: {error}")
        return
    quantized = cfg.precision.name in ("int8", "nf4")
    log.tag("infer_merged", "merged by peft's merge_and_unload" + (
        f" into the {cfg.precision.name} base: dequantized, added, quantized again (rounding)"
        if quantized else ""))
    log(_suffixed(measure(merged, "merged"), "_merged"))


@torch.no_grad()
def latency(model, loader, new_tokens: int, pad_id: int, precision,
            device: torch.device, progress: str = "inference") -> dict:
    """infer_latency_ms_p50 / _p90 and infer_tokens_per_s of greedy generation over `loader`,
    its first batch run once untimed first; a progress bar named `progress` over the batches."""
    model.eval()

    def generate(batch) -> torch.Tensor:
        with autocast(device, precision):
            return model.generate(input_ids=batch["input_ids"].to(device),
                                  attention_mask=batch["attention_mask"].to(device),
                                  num_beams=1, do_sample=False, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, pad_token_id=pad_id)

    bar = tqdm(total=len(loader) + 1, desc=progress, unit="batch")
    generate(next(iter(loader)))  # warm-up
    bar.update()
    per_example_ms, tokens, seconds = [], 0, 0.0
    for batch in loader:
        synchronize(device)
        start = time.perf_counter()
        generate(batch)
        synchronize(device)
        elapsed = time.perf_counter() - start
        size = len(batch["input_ids"])
        per_example_ms.append(1000 * elapsed / size)
        tokens += size * new_tokens
        seconds += elapsed
        bar.update()
    bar.close()
    return {"infer_latency_ms_p50": float(np.percentile(per_example_ms, 50)),
            "infer_latency_ms_p90": float(np.percentile(per_example_ms, 90)),
            "infer_tokens_per_s": tokens / seconds}


def checkpoint_sizes(model, adapter_bytes: int) -> dict:
    """adapter_size_mib, full_checkpoint_mib (the model's weights as they are stored in the cell's
    precision, quantization scales included, adapters left out: what saving the whole fine-tuned
    model would take, computed, not written) and checkpoint_ratio (full over adapter)."""
    adapters = {id(weight) for name, weight in model.named_parameters() if "lora_" in name}
    full = accounting.tensors_mib(tensor for tensor in accounting.weight_tensors(model)
                              if id(tensor) not in adapters)
    adapter = adapter_bytes / MIB
    return {"adapter_size_mib": adapter, "full_checkpoint_mib": full,
            "checkpoint_ratio": full / adapter if adapter else float("nan")}


def _suffixed(figures: dict, suffix: str) -> dict:
    return {f"{name}{suffix}": value for name, value in figures.items()}

