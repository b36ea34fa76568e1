"""The LoRA paper's claims, measured per cell: the inference benchmark (as trained, base, merged),
checkpoint sizes, and the report's computed verdicts."""

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from harness.cell import infer
from harness.data import synthetic
from harness.model import families, methods, models
from harness.report import claims
from tests.conftest import compose_cell

CPU = torch.device("cpu")


def _lora_with_trained_adapters(model_name):
    """A LoRA model whose adapters are not zero (peft starts B at zero), and its test batches."""
    cfg = compose_cell(f"model={model_name}", "method=lora", "data=synthetic",
                       "data.train_size=8", "data.validation_size=4", "data.test_size=8",
                       "data.source_max_length=24", "data.target_max_length=8")
    model = methods.prepare(models.load_model(cfg.model, cfg.precision, True, CPU), cfg)
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    family = families.of(cfg.model)
    tokenizer = models.load_tokenizer(cfg.model)
    split = synthetic.synthetic(cfg.data, len(tokenizer), family=family)["test"]
    loader = DataLoader(split, batch_size=4, collate_fn=family.generation_collate(tokenizer))
    return model, loader, tokenizer


@torch.no_grad()
def _greedy(model, loader, pad_id):
    model.eval()
    return [model.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                           num_beams=1, pad_token_id=pad_id).tolist() for batch in loader]


@pytest.mark.parametrize("model_name", ["t5-tiny", "tiny-causal"])
def test_merged_and_unmerged_fp32_lora_generate_the_same_tokens(model_name):
    model, loader, tokenizer = _lora_with_trained_adapters(model_name)
    unmerged = _greedy(model, loader, tokenizer.pad_token_id)
    with model.disable_adapter():
        base = _greedy(model, loader, tokenizer.pad_token_id)
    merged = _greedy(model.merge_and_unload(), loader, tokenizer.pad_token_id)
    assert merged == unmerged
    assert base != unmerged  # the adapters change what the model says: the check has teeth


def test_latency_times_every_batch_after_a_warm_up():
    model, loader, tokenizer = _lora_with_trained_adapters("t5-tiny")
    calls = []
    original = model.generate
    model.generate = lambda **kwargs: calls.append(kwargs) or original(**kwargs)
    figures = infer.latency(model, loader, 5, tokenizer.pad_token_id, "fp32", CPU)
    assert len(calls) == len(loader) + 1  # the warm-up, then every batch
    assert all(call["min_new_tokens"] == call["max_new_tokens"] == 5 for call in calls)
    assert set(figures) == {"infer_latency_ms_p50", "infer_latency_ms_p90", "infer_tokens_per_s"}
    assert 0 < figures["infer_latency_ms_p50"] <= figures["infer_latency_ms_p90"]
    # Tokens per second and latency per example describe the same timed batches.
    examples, seconds_per_example = len(loader.dataset), figures["infer_latency_ms_p50"] / 1000
    assert figures["infer_tokens_per_s"] == pytest.approx(5 / seconds_per_example, rel=0.5)
    assert examples == 8


def test_checkpoint_sizes_count_the_base_as_stored_and_leave_the_adapters_out():
    cfg = compose_cell("model=t5-mini", "method=lora")
    model = methods.prepare(models.load_model(cfg.model, cfg.precision, True, CPU), cfg)
    adapters = sum(p.numel() * 4 for name, p in model.named_parameters() if "lora_" in name)
    base = sum(p.numel() * 4 for name, p in model.named_parameters() if "lora_" not in name)
    sizes = infer.checkpoint_sizes(model, adapter_bytes=adapters)
    assert sizes["full_checkpoint_mib"] * 2**20 == base
    assert sizes["checkpoint_ratio"] == pytest.approx(base / adapters)
    half = compose_cell("model=t5-mini", "method=lora", "precision=bf16")
    stored_half = methods.prepare(models.load_model(half.model, half.precision, True, CPU), half)
    assert infer.checkpoint_sizes(stored_half, adapters)["full_checkpoint_mib"] == \
        pytest.approx(sizes["full_checkpoint_mib"] / 2, rel=0.01)


@pytest.mark.parametrize("claim, ours, expected", [
    ("no added latency, merged", 1.02, "holds"), ("no added latency, merged", 1.10,
                                                  "holds partly"),
    ("no added latency, merged", 1.30, "does not hold"), ("tiny checkpoints", 10000, "holds"),
    ("tiny checkpoints", 17, "holds partly"), ("tiny checkpoints", 3, "does not hold"),
    ("less training memory", 0.22, "holds"), ("less training memory", 0.98, "does not hold"),
    ("faster training", 1.3, "holds"), ("faster training", 1.0, "does not hold"),
    ("unmerged adapter latency", 1.2, "measured"), ("faster training", float("nan"), "—")])
def test_verdicts_follow_the_thresholds(claim, ours, expected):
    assert claims.verdict(claim, ours) == expected


def test_the_claims_table_compares_lora_with_full_fine_tuning_of_the_same_model():
    rows = pd.DataFrame([
        {"model": "m", "method": "full", "precision": "fp32", "rank": float("nan"),
         "status": "ok", "gpu_peak_mib": 10000.0, "tokens_per_s": 1000.0},
        {"model": "m", "method": "lora", "precision": "fp32", "rank": 8.0, "status": "ok",
         "gpu_peak_mib": 3000.0, "tokens_per_s": 1400.0, "infer_latency_ms_p50": 12.0,
         "infer_latency_ms_p50_base": 10.0, "infer_latency_ms_p50_merged": 10.1,
         "full_checkpoint_mib": 900.0, "adapter_size_mib": 3.0},
        {"model": "m", "method": "lora", "precision": "fp32", "rank": 4.0, "status": "oom",
         "gpu_peak_mib": float("nan"), "tokens_per_s": float("nan")}])
    table = claims.table(rows, "GPU").set_index("claim")
    assert set(table["LoRA cell"]) == {"m/lora-r8/fp32"}  # the ok one
    assert table.loc["no added latency, merged", ["figure", "verdict"]].tolist() == \
        ["1.01", "holds"]
    assert table.loc["unmerged adapter latency", "figure"] == "1.20"
    assert table.loc["tiny checkpoints", ["figure", "verdict"]].tolist() == ["300.00", "holds"]
    assert table.loc["less training memory", ["figure", "verdict"]].tolist() == ["0.30", "holds"]
    assert table.loc["faster training", ["figure", "verdict"]].tolist() == \
        ["1.40", "holds"]
