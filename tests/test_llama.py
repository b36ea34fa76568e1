"""The LLaMA family (LLaMA-1, Llama 3.1, Mistral, Qwen2.5 and a tiny LLaMA) through the causal
family object: parameter counts against the published ones, LoRA's default targets, a gated model
refused without a token; and the LOMO paper's memory table as a plan."""

import re

import pytest
import torch
from omegaconf import OmegaConf

from harness.config import hub
from harness.core.errors import ConfigError
from harness.core.options import CONF_DIR
from harness.model import families, methods, models
from harness.report import report
from tests.conftest import (
    REPO,
    compose_cell,
    folder_store_overrides,
    free_port,
    run_harness,
    runs_of,
    without_a_gpu,
)

# The parameter counts their model cards or hub files publish (safetensors metadata).
PUBLISHED_PARAMETERS = {
    "llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320, "llama-30b": 32_528_943_616,
    "llama-65b": 65_285_660_672, "llama-3.1-8b": 8_030_261_248, "mistral-7b": 7_248_023_552,
    "qwen2.5-7b": 7_615_616_512, "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192, "llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824}


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_the_architectures_have_the_published_parameter_counts(name):
    model_cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    assert families.of(model_cfg).name == "causal"
    with torch.device("meta"):
        model = models.random_model(model_cfg)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]
    assert type(model).__name__.endswith("ForCausalLM")


def test_lora_targets_the_query_and_value_projections_by_default():
    cfg = compose_cell("model=tiny-llama", "method=lora", "method.r=4")
    model = methods.prepare(models.load_model(cfg.model, cfg.precision, True,
                                              torch.device("cpu")), cfg)
    adapted = {name.split(".")[-1] for name, module in model.named_modules()
               if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    architecture = cfg.model.architecture
    head_dim = architecture.hidden_size // architecture.num_attention_heads
    per_layer = 4 * (architecture.hidden_size + architecture.hidden_size) + 4 * (
        architecture.hidden_size + architecture.num_key_value_heads * head_dim)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        architecture.num_hidden_layers * per_layer


def test_a_gated_model_without_a_token_is_refused_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no token file saved by a login
    monkeypatch.setattr(hub.huggingface_hub.constants, "HF_TOKEN_PATH",
                        str(tmp_path / "token"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    gated = compose_cell("model=llama-3.1-8b")
    with pytest.raises(ConfigError, match="model meta-llama/Llama-3.1-8B is gated") as refused:
        hub.check([gated])
    assert "hf auth login" in str(refused.value) and "model.source=random" in str(refused.value)
    # An open model needs no token (here only a hub that answers); random weights fetch nothing.
    with pytest.raises(ConfigError, match="does not answer"):
        hub.check([compose_cell("model=llama-7b")])
    hub.check([compose_cell("model=llama-3.1-8b", "model.source=random")])
    monkeypatch.setenv("HF_TOKEN", "hf_a_token_of_the_user")
    with pytest.raises(ConfigError, match="does not answer"):
        hub.check([gated])


@pytest.fixture(scope="module")
def lomo_plan(published_plans):
    return published_plans["lomo_table"].set_index(["cell", "gradient_checkpointing"])


def test_the_lomo_table_plan_shows_six_cells_with_their_parts(lomo_plan):
    assert len(lomo_plan) == 6 and set(lomo_plan.plan) == {"run"}
    assert set(lomo_plan.lengths) == {"448/64"}  # 512 tokens, the paper's sequence
    for part in ("weights", "gradients", "optimizer", "activations"):
        assert lomo_plan[f"{part}_mib"].notna().all()
    # As the paper ran them: AdamW and SGD with float32 weights, LOMO in pure fp16.
    weights = lomo_plan.weights_mib.droplevel(1)
    assert weights["llama-7b/full/fp16"].iloc[0] == pytest.approx(6_738_415_616 * 4 / 2**20)
    assert weights["llama-7b/lomo/fp16-pure"].iloc[0] == pytest.approx(6_738_415_616 * 2 / 2**20)
    optimizer = lomo_plan.optimizer_mib.droplevel(1)
    assert optimizer["llama-7b/full/fp16"].tolist() == pytest.approx(
        (2 * weights["llama-7b/full/fp16"]).tolist(), abs=0.1)  # AdamW's step counts aside


def test_the_checkpointed_cells_are_within_25_percent_of_the_papers_tensors(lomo_plan):
    checkpointed = lomo_plan.xs(True, level="gradient_checkpointing")
    assert list(checkpointed.reference) == ["lomo_table"] * 3
    assert set(checkpointed.reference_measure) == {"allocated"}
    for ratio in checkpointed.estimate_ratio:
        assert 0.75 <= ratio <= 1.25, checkpointed.estimate_ratio
    plain = lomo_plan.xs(False, level="gradient_checkpointing")
    assert set(plain.reference) == {"lomo_table: other setup"}
    # AdamW's peak is its step, with or without checkpointing; the others' is backward's.
    assert (plain.activations_mib >= checkpointed.activations_mib).all()
    assert plain.activations_mib["llama-7b/lomo/fp16-pure"] > \
        5 * checkpointed.activations_mib["llama-7b/lomo/fp16-pure"]


def test_lomo_s_claim_holds_on_every_lomo_cell(lomo_plan):
    lomo = lomo_plan.xs("llama-7b/lomo/fp16-pure", level="cell")
    # The largest weight is the 32,000 x 4,096 embedding: 250 MiB in fp16. At most one weight's
    # gradient is alive at the peak: the embedding's without checkpointing; with it (and the
    # paper's eager attention) the peak falls in a block's recomputation, where a projection's
    # (86 MiB) is.
    largest = 32000 * 4096 * 2 / 2**20
    assert lomo.gradients_mib.tolist() == [largest, 4096 * 11008 * 2 / 2**20]
    assert (lomo.optimizer_mib == 0).all()
    assert [claim.split(",")[0] for claim in lomo.lomo_claim] == [
        "holds: gradients 250 MiB (largest weight 250)", "holds: gradients 86 MiB (largest "
                                                         "weight 250)"]
    assert lomo_plan.lomo_claim.isna().sum() == 4  # the claim is LOMO's alone


@without_a_gpu
def test_the_committed_lomo_plan_is_what_make_plan_writes_today(published_plans):
    assert published_plans["lomo_table"].to_csv(index=False) == \
        (REPO / "reports" / "lomo_table" / "plan.csv").read_text()


@pytest.mark.slow
def test_the_demo_s_llama_cells_train_in_pure_bf16_and_the_breakdown_checks_lomo(tmp_path):
    # experiments/demo_llama.yaml as make demo runs it after the demo grid, a few steps.
    result = run_harness(tmp_path, "-cd", str(REPO / "experiments"), "-cn", "demo_llama",
                         "train.max_steps=4", "eval.max_samples=4",
                         *folder_store_overrides(tmp_path, "demo"))
    assert result.returncode == 0, result.stderr[-3000:]
    store = {"uri": f"sqlite:///{tmp_path}/mlflow.db"}
    runs = {run.data.tags["mlflow.runName"]: run for run in runs_of(store, "demo")}
    assert set(runs) == {"tiny-llama/full/bf16-pure", "tiny-llama/lora-r8/bf16-pure",
                         "tiny-llama/lomo/bf16-pure"}
    for run in runs.values():
        assert run.data.tags["status"] == "ok"
        assert run.data.params["precision.master_weights"] == "False"
    lomo = runs["tiny-llama/lomo/bf16-pure"].data.metrics
    assert lomo["mem_grads_mib"] <= lomo["mem_largest_weight_mib"]
    assert lomo["mem_optimizer_mib"] == 0
    # Half weights: the full cell's are half of what float32 would hold, its moments as many.
    full = runs["tiny-llama/full/bf16-pure"].data.metrics
    assert full["mem_params_mib"] == pytest.approx(141_632 * 2 / 2**20, rel=0.01)
    assert full["mem_optimizer_mib"] == pytest.approx(2 * full["mem_params_mib"], rel=0.01)
    out = tmp_path / "report"
    assert report.main(["--experiment", "demo", "--tracking-uri", store["uri"],
                        "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert "LOMO's claim" in markdown and "holds for 1 of its 1 cells" in markdown
    assert re.search(r"\| tiny-llama \| lomo +\| bf16-pure +\|", markdown)

