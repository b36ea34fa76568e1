"""Beyond flan-t5: the model family axis (seq2seq and causal), 4-bit base weights, bitsandbytes'
8-bit and paged AdamW, instruction data, and the peft and OpenCALM tables in the plan."""

import bitsandbytes as bnb
import pandas as pd
import pytest
import torch
from mlflow.artifacts import download_artifacts

from harness.cell import evaluate
from harness.config import identity, validation
from harness.core.errors import ConfigError
from harness.data import sources
from harness.estimate import estimate
from harness.measure import accounting
from harness.model import families, methods, models, tokenizers, training_step
from harness.run import runner
from tests.conftest import REPO, compose_cell, runs_of, without_a_gpu

CPU = torch.device("cpu")


def _prepared(*overrides):
    cfg = compose_cell(*overrides)
    model = models.load_model(cfg.model, cfg.precision, methods.base_frozen(cfg.method.name), CPU)
    return methods.prepare(model, cfg), cfg


@pytest.mark.parametrize("model_name", ["t5-tiny", "tiny-causal"])
@pytest.mark.parametrize("precision", ["fp32", "int8", "nf4"])
def test_trainable_and_total_counts_are_peft_s(model_name, precision):
    model, cfg = _prepared(f"model={model_name}", f"precision={precision}", "method=lora")
    assert models.count_params(model) == model.get_nb_trainable_parameters()
    assert model.peft_config["default"].task_type == families.of(cfg.model).task_type
    targets = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
               if hasattr(module, "lora_A")}
    assert targets == set(cfg.model.default_lora_targets)


def test_nf4_stores_two_weights_a_byte_with_double_quantized_block_scales():
    model, cfg = _prepared("model=tiny-causal", "precision=nf4", "method=lora")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    for layer in layers:
        weight = layer.weight
        assert weight.dtype == torch.uint8
        assert weight.numel() * 2 == layer.in_features * layer.out_features
        assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested
        assert layer.compute_dtype == torch.bfloat16  # QLoRA's compute dtype
    # The breakdown counts the packed weights and their scales, and so does the estimate (which
    # adds the buffers: rotary frequencies).
    measured = accounting.breakdown(model, [])["mem_params_mib"]
    estimated = estimate.gpu_peak_mib(identity.cell_config(cfg), {"source": 32, "target": 16})
    buffers = accounting.tensors_mib(model.buffers())
    assert estimated["weights"] == pytest.approx(measured + buffers, rel=1e-9)
    scales = sum(t.numel() * t.element_size() for layer in layers
                 for t in accounting.quant_state_tensors(layer.weight.quant_state))
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    assert measured * 2**20 == pytest.approx(parameters + scales)


def test_causal_examples_learn_the_response_only_unless_asked():
    tokenizer = models.load_tokenizer(compose_cell("model=tiny-causal").model)
    causal, lengths = families.FAMILIES["causal"], {"source": 6, "target": 4}
    encoded = causal.encode(tokenizer, ["prompt:", "a very long prompt"], ["ok", "yes!"],
                            lengths, pad=True, train_on_inputs=False)
    first, second = ({key: encoded[key][i] for key in encoded} for i in range(2))
    prompt = tokenizer("prompt:", add_special_tokens=False)["input_ids"][:6]
    response = tokenizer("ok", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert first["input_ids"][:len(prompt) + len(response)] == prompt + response
    assert first["labels"][:len(prompt)] == [families.IGNORED_LABEL] * len(prompt)
    assert first["labels"][len(prompt):len(prompt) + len(response)] == response
    assert all(len(example["input_ids"]) == 10 for example in (first, second))
    assert second["prompt_length"] == 6  # the prompt cut at the source length
    both = causal.encode(tokenizer, ["prompt:"], ["ok"], lengths, pad=False,
                         train_on_inputs=True)
    assert both["labels"][0] == both["input_ids"][0]


def test_causal_training_batches_pad_on_the_right_with_labels_ignored():
    causal = families.FAMILIES["causal"]
    examples = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
                {"input_ids": [9], "attention_mask": [1], "labels": [9]}]
    batch = causal.collate(type("T", (), {"pad_token_id": 0})())(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    assert {tensor.dtype for tensor in batch.values()} == {torch.int64}
    # Every key takes the width of the longest input_ids, shorter labels too.
    short = causal.collate(type("T", (), {"pad_token_id": 0})())(
        [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [7]}])
    assert short["labels"].tolist() == [[7, -100, -100]]


def test_causal_generation_sees_left_padded_prompts_and_returns_new_tokens_only():
    causal = families.FAMILIES["causal"]
    examples = [{"input_ids": [5, 6, 7, 8], "prompt_length": 3},
                {"input_ids": [9, 10, 11], "prompt_length": 1}]
    batch = causal.generation_collate(type("T", (), {"pad_token_id": 0})())(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    output = torch.tensor([[5, 6, 7, 20, 21], [0, 0, 9, 22, 23]])
    assert causal.new_tokens(output, batch["input_ids"]).tolist() == [[20, 21], [22, 23]]


def test_instruction_records_render_with_the_template_and_without_an_input(tmp_path):
    cfg = compose_cell("model=tiny-causal", "data=instructions")
    text = sources.load_text(cfg.data)
    rendered = sources.pairs(text, cfg.data)
    rows = list(zip(text["train"], rendered["train"]))
    with_input = next(pair for row, pair in rows if row["input"])
    without = next(pair for row, pair in rows if not row["input"])
    assert "### Input:" in with_input["source"] and "### Input:" not in without["source"]
    assert all(pair["target"] == row["output"] for row, pair in rows)
    japanese = compose_cell("data=instructions", "data/template=japanese").data
    assert sources.pairs(text, japanese)["train"][0]["source"].startswith("指示:")
    # A local JSONL file of instruction records: the same format, split 80 / 10 / 10.
    path = tmp_path / "mine.jsonl"
    pd.DataFrame(text["train"].to_list()[:50]).drop(columns="id").to_json(
        path, orient="records", lines=True, force_ascii=False)
    local = compose_cell("data=local", f"data.path={path}", "data.format=instruction").data
    assert [len(split) for split in sources.pairs(sources.load_text(local), local).values()] == \
        [40, 5, 5]


def test_japanese_rouge_counts_characters():
    unit_words = evaluate.rouge(["東京に行く"], ["東京に行った"])
    unit_characters = evaluate.rouge(["東京に行く"], ["東京に行った"], "characters")
    assert unit_words["rouge1"] == 0  # rouge-score's own tokens are ASCII only
    assert unit_characters["rouge1"] == pytest.approx(100 * 2 * 4 / (5 + 6))


def test_8bit_adamw_keeps_int8_moments_with_block_scales_and_the_estimate_counts_them():
    def optimizer_mib(optimizer):
        cfg = compose_cell("model=t5-mini", "method=full", f"method.optimizer={optimizer}")
        model = models.load_model(cfg.model, cfg.precision, False, CPU)
        model = methods.prepare(model, cfg)
        updates = training_step.Updates(model, cfg, 1, CPU)
        batch = families.of(cfg.model).training_batch(2, {"source": 8, "target": 4}, CPU,
                                                      tokenizers.PAD_ID, tokenizers.EOS_ID + 1)
        updates.backward(training_step.forward(model, batch, "fp32", CPU), update=True)
        measured = updates.breakdown(model)["mem_optimizer_mib"]
        estimated = estimate.gpu_peak_mib(identity.cell_config(cfg), {"source": 8, "target": 4})
        return updates.optimizer, measured, estimated["optimizer"]

    adamw_8bit, measured_8bit, estimated_8bit = optimizer_mib("adamw_8bit")
    _, measured_32bit, estimated_32bit = optimizer_mib("adamw")
    large = [state for state in adamw_8bit.state.values() if state["state1"].numel() >= 4096]
    assert large and all(state["state1"].dtype == torch.uint8 and "absmax1" in state
                         for state in large)
    # Int8 moments: a little over a quarter of float32's.
    assert 0.25 < measured_8bit / measured_32bit < 0.35
    assert estimated_8bit == pytest.approx(measured_8bit, rel=0.01)
    assert estimated_32bit == pytest.approx(measured_32bit, rel=0.01)


@pytest.mark.parametrize("overrides, expected", [
    (["precision=nf4", "method=full"], "precision=nf4 stores quantized"),
    (["model=tiny-causal", "method.target_modules=[q,v]"], "its LoRA targets are query_key_value"),
    (["data=instructions", "data.train_on_inputs=true"], "model=t5-tiny is seq2seq"),
])
def test_incoherent_cells_are_skipped_with_the_reason(overrides, expected):
    assert expected in validation.invalid_cell_reason(compose_cell(*overrides))


def test_paged_optimizers_need_cuda_and_options_are_checked():
    cfg = compose_cell("method.optimizer=paged_adamw_8bit")
    assert "no CUDA device" in validation.machine_reason(cfg, cuda=False)
    assert validation.machine_reason(cfg, cuda=True) is None
    with pytest.raises(ConfigError,
                       match="precision.compute_dtype=int4; expected one of bf16, fp16, fp32"):
        validation.validate(compose_cell("precision=nf4", "precision.compute_dtype=int4"))
    with pytest.raises(ConfigError, match="method.optimizer=adam8; expected one of adamw"):
        validation.validate(compose_cell("method.optimizer=adam8"))


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["model=t5-tiny", "precision=nf4", "method.optimizer=adamw_8bit"],
    ["model=tiny-causal", "data=instructions", "precision=fp32"],
    ["model=tiny-causal", "data=instructions", "precision=nf4"],
], ids=["t5-nf4-adamw8bit", "causal-instructions", "causal-instructions-nf4"])
def test_new_cells_train_end_to_end(store, cell_overrides, overrides):
    cfg = compose_cell(*cell_overrides, *overrides, "train.max_steps=6", "eval.max_samples=6",
                       "train.lr=1e-2", "eval.infer=true")  # random weights: asked for
    assert runner.run(cfg) == "ok"
    run = runs_of(store, cfg.tracking.experiment)[0]
    metrics = run.data.metrics
    assert {"rouge1", "eval_loss", "eval_perplexity", "estimate_gpu_mib",
            "estimate_allocated_mib", "adapter_size_mib"} <= set(metrics)
    assert metrics["eval_perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"])
    # The inference benchmark (issue: the LoRA paper's claims): as trained, base and merged.
    for suffix in ("", "_base", "_merged"):
        assert {f"infer_latency_ms_p50{suffix}", f"infer_latency_ms_p90{suffix}",
                f"infer_tokens_per_s{suffix}"} <= set(metrics)
    assert run.data.tags["infer_merged"].startswith("merged by peft's merge_and_unload")
    assert ("rounding" in run.data.tags["infer_merged"]) == (cfg.precision.name == "nf4")
    assert metrics["checkpoint_ratio"] == pytest.approx(metrics["full_checkpoint_mib"]
                                                        / metrics["adapter_size_mib"])
    assert metrics["cpu_infer_peak_mib"] > 0  # its own phase in the memory trace
    model, _ = _prepared(*overrides)
    assert metrics["trainable_params"] == model.get_nb_trainable_parameters()[0]
    predictions = pd.read_csv(download_artifacts(run_id=run.info.run_id,
                                                 artifact_path="predictions.csv",
                                                 tracking_uri=store["uri"]))
    assert len(predictions) == 6
    if cfg.data.name == "instructions":  # generations hold the response only, not the prompt
        assert not predictions.prediction.fillna("").str.contains("### Instruction").any()


@without_a_gpu
@pytest.mark.parametrize("name", ["peft_table", "opencalm", "lomo_table"])
def test_the_committed_plans_are_what_make_plan_writes_today(published_plans, name):
    # reports/<name>/plan.csv as `make plan EXP=<name>` writes it with an empty cache and store.
    assert published_plans[name].to_csv(index=False) == \
        (REPO / "reports" / name / "plan.csv").read_text()


def test_the_plan_puts_peft_s_lora_rows_within_25_percent_and_full_out_of_80_gb(
        published_plans):
    table = published_plans["peft_table"].set_index("cell")
    for cell in ("mt0-xxl/lora-r8/fp32", "bloomz-7b1/lora-r8/fp32"):
        assert table.loc[cell, "reference_measure"] == "allocated"
        assert 0.75 <= table.loc[cell, "estimate_ratio"] <= 1.25, table.loc[cell]
        assert table.loc[cell, "fits"] == "yes"
    for cell in ("mt0-xxl/full/fp32", "bloomz-7b1/full/fp32"):
        assert table.loc[cell, "fits"] == "NO" and "OOM" in table.loc[cell, "reference"]


def test_the_plan_of_the_opencalm_study_fits_its_rtx_3090(published_plans):
    table = published_plans["opencalm"].set_index("precision")
    assert set(table.fits) == {"yes"}
    # "A dozen-odd GB" for int8.
    assert 12000 <= table.loc["int8", "estimate_mib"] <= 20000
    # 4-bit saves half a byte per weight of the quantized layers (12 x 4096^2 per block, 32
    # blocks), less its block scales; the embeddings stay float32 in both.
    half_a_byte = 32 * 12 * 4096**2 / 2 / 2**20
    saved = table.loc["int8", "weights_mib"] - table.loc["nf4", "weights_mib"]
    assert 0.9 * half_a_byte < saved < half_a_byte
    assert list(table.index) == ["int8", "nf4", "bf16"]
