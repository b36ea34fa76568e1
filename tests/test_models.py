"""Models, precisions and methods on real modules: transformers T5, peft LoRA, bitsandbytes int8."""

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel

from harness.core.options import OPTIMIZERS, PAGED_OPTIMIZERS
from harness.model import methods, models, optimizers
from tests.conftest import compose_cell, requires_cuda

CPU = torch.device("cpu")


def _model(*overrides, device=CPU):
    cfg = compose_cell(*overrides)
    model = models.load_model(cfg.model, cfg.precision.name,
                              methods.base_frozen(cfg.method.name), device)
    return methods.apply(model, cfg.method, cfg.precision.name), cfg


def test_random_weights_follow_the_seed():
    first, _ = _model("method=full")
    second, _ = _model("method=full")
    other, _ = _model("method=full", "model.seed=1")
    assert torch.equal(first.shared.weight, second.shared.weight)
    assert not torch.equal(first.shared.weight, other.shared.weight)


def test_flan_t5_base_architecture_offline_with_lora_r8_on_q_v():
    model, _ = _model("model=flan-t5-base", "model.source=random", "method=lora", "method.r=8")
    trainable, total = models.count_params(model)
    # 36 attention blocks (12 encoder self, 12 decoder self, 12 cross) x q and v x r(768+768).
    assert trainable == 884_736
    assert total - trainable == 247_577_856  # google/flan-t5-base
    assert isinstance(model, PeftModel)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_random_flan_style_models_keep_their_own_lm_head(precision):
    # transformers 5 ties T5's lm_head when building from a config; flan-t5 has its own.
    model, _ = _model("method=lora", f"precision={precision}")
    base = model.base_model.model
    assert base.lm_head.weight.data_ptr() != base.shared.weight.data_ptr()
    assert not torch.equal(base.lm_head.weight.float(), base.shared.weight.float())


def test_full_fine_tuning_trains_every_weight_in_fp32_even_under_bf16():
    model, _ = _model("method=full", "precision=bf16")
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_lora_stores_the_frozen_base_in_half_and_adapters_in_fp32(precision, dtype):
    model, _ = _model("method=lora", f"precision={precision}")
    frozen = {name: p.dtype for name, p in model.named_parameters() if not p.requires_grad}
    adapters = {p.dtype for p in model.parameters() if p.requires_grad}
    # As from_pretrained stores flan-t5 in fp16: T5's wo stays float32 (_keep_in_fp32_modules).
    kept = {torch.float32} if precision == "fp16" else {dtype}
    assert {d for name, d in frozen.items() if ".wo." in name} == kept
    assert {d for name, d in frozen.items() if ".wo." not in name} == {dtype}
    assert adapters == {torch.float32}


def test_int8_quantizes_the_base_with_bitsandbytes_and_keeps_wo_in_fp32():
    model, _ = _model("method=lora", "precision=int8")
    int8_layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert int8_layers and all(layer.weight.dtype == torch.int8 for layer in int8_layers)
    feed_forward = model.base_model.model.encoder.block[0].layer[1].DenseReluDense
    assert feed_forward.wo.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_lora_targets_the_configured_modules():
    model, _ = _model("method=lora", "method.target_modules=[q,k,v,o]", "method.r=2")
    targeted = {name.split(".")[-4] for name, p in model.named_parameters() if p.requires_grad}
    assert targeted == {"q", "k", "v", "o"}


@pytest.mark.gpu
@requires_cuda
def test_int8_lora_runs_a_step_on_cuda():
    model, _ = _model("method=lora", "precision=int8", device=torch.device("cuda"))
    ids = torch.randint(2, 300, (2, 16), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_every_optimizer_a_config_may_name_is_built_from_one_list():
    # core/options.py's names (checked before torch loads) are the ones optimizers.build knows.
    assert set(OPTIMIZERS) == {"adamw", "sgd", *optimizers.BITSANDBYTES}
    assert set(PAGED_OPTIMIZERS) <= set(optimizers.BITSANDBYTES)
