"""precision.autocast=false, peft's own scripts' style: a bfloat16 base, float32 adapters, no
autocast, each adapter's input cast to float32 by peft; on a real tiny LLaMA with real peft. And
train.optimizer_impl, how torch's AdamW runs its update, in the run and in the estimate."""

import pytest
import torch

from harness.config import identity, validation
from harness.estimate import estimate
from harness.model import families, methods, models, tokenizers, training_step
from tests.conftest import compose_cell

CPU = torch.device("cpu")
LENGTHS = {"source": 16, "target": 8}


def _cell(*overrides):
    cfg = compose_cell("model=tiny-llama", "method=lora", "train.lr=0.01", *overrides)
    if "dropout" in cfg.method:  # the same masks in every pass: not what is compared here
        cfg.method.dropout = 0.0
    validation.validate(cfg)
    assert validation.invalid_cell_reason(cfg) is None
    return cfg


def test_without_autocast_the_base_is_bf16_the_adapters_float32_and_their_inputs_cast():
    cfg = _cell("precision=bf16", "precision.autocast=false")
    model = methods.prepare(models.load_model(cfg.model, cfg.precision,
                                              methods.base_frozen(cfg.method.name), CPU), cfg)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    seen = {"autocast": set(), "adapter_inputs": set(), "adapter_outputs": set(),
            "gradients": set()}

    def adapter_ran(_, inputs, output) -> None:
        seen["autocast"].add(torch.is_autocast_enabled("cpu"))
        seen["adapter_inputs"].add(inputs[0].dtype)
        seen["adapter_outputs"].add(output.dtype)

    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(adapter_ran)
    for weight in model.parameters():
        if weight.requires_grad:
            weight.register_post_accumulate_grad_hook(
                lambda weight: seen["gradients"].add(weight.grad.dtype))
    batch = families.of(cfg.model).training_batch(4, LENGTHS, CPU, tokenizers.PAD_ID,
                                                  tokenizers.EOS_ID + 5)
    updates, losses = training_step.Updates(model, cfg, 20, CPU), []
    for _ in range(8):
        loss = training_step.forward(model, batch, cfg.precision, CPU)
        losses.append(loss.item())
        updates.backward(loss, update=True)
        updates.next_step()
    assert seen == {"autocast": {False}, "adapter_inputs": {torch.float32},
                    "adapter_outputs": {torch.float32}, "gradients": {torch.float32}}
    assert losses[-1] < losses[0] - 0.05, losses
    # The same model under the default style's autocast computes its adapters in bfloat16.
    for found in seen.values():
        found.clear()
    training_step.forward(model, batch, _cell("precision=bf16").precision, CPU)
    assert (seen["autocast"], seen["adapter_outputs"]) == ({True}, {torch.bfloat16})


@pytest.mark.parametrize("overrides, expected", [
    (["method=full", "precision=bf16", "precision.autocast=false"], "trains float32 weights"),
    (["precision=fp32", "precision.autocast=false"], "only bf16 and fp16"),
    (["precision=bf16", "precision.autocast=false", "precision.master_weights=false"],
     "nothing is left to cast"),
    (["method.optimizer=adamw_8bit", "train.optimizer_impl=fused"], "one implementation"),
], ids=" ".join)
def test_a_style_that_means_nothing_for_the_cell_is_refused_with_the_reason(overrides,
                                                                            expected):
    cfg = compose_cell("model=tiny-llama", *overrides)
    assert expected in validation.invalid_cell_reason(cfg)


def test_the_styles_are_named_and_fingerprinted_apart_and_their_defaults_change_nothing():
    default = identity.cell_config(_cell("precision=bf16"))
    at_defaults = identity.cell_config(_cell("precision=bf16", "precision.autocast=true",
                                             "train.optimizer_impl=auto"))
    assert identity.fingerprint(default) == identity.fingerprint(at_defaults)
    styled = identity.cell_config(_cell("precision=bf16", "precision.autocast=false"))
    fused = identity.cell_config(_cell("precision=bf16", "train.optimizer_impl=fused"))
    assert len({identity.fingerprint(cell) for cell in (default, styled, fused)}) == 3
    assert identity.run_name(styled) == "tiny-llama/lora-r8/bf16-noautocast"
    assert identity.run_name(default) == "tiny-llama/lora-r8/bf16"


# What the estimate simulates (tiny-llama at batch 8 and 16/8 tokens), pinned: a change that moves
# one says why. Without autocast the adapters' float32 inputs and outputs are kept for backward
# (more activations); foreach AdamW's step holds whole-model temporaries that a fused update
# (simulated tensor by tensor) does not.
# (allocated, the optimizer step's temporaries) in MiB.
PINNED_MIB = {"bf16": (2.0672, 0.041), "bf16-noautocast": (2.1677, 0.041),
              "full-foreach": (4.6398, 1.6209), "full-fused": (4.6398, 1.2684)}


def test_the_estimate_follows_the_style_and_the_optimizer_implementation():
    found = {
        "bf16": _parts("precision=bf16"),
        "bf16-noautocast": _parts("precision=bf16", "precision.autocast=false"),
        "full-foreach": _parts("method=full", "train.optimizer_impl=foreach"),
        "full-fused": _parts("method=full", "train.optimizer_impl=fused"),
    }
    assert found["bf16"]["activations"] != found["bf16-noautocast"]["activations"]
    assert found["full-fused"]["step_temporaries"] < found["full-foreach"]["step_temporaries"]
    assert (found["full-fused"]["optimizer"], found["full-fused"]["weights"]) == \
        (found["full-foreach"]["optimizer"], found["full-foreach"]["weights"])
    assert {name: (round(parts["allocated"], 4), round(parts["step_temporaries"], 4))
            for name, parts in found.items()} == PINNED_MIB


def _parts(*overrides) -> dict:
    cell = identity.cell_config(_cell("train.batch_size=8", *overrides))
    return estimate.gpu_peak_mib(cell, LENGTHS)


@pytest.mark.parametrize("implementation, expected", [
    ("auto", {"foreach": None, "fused": None}), ("foreach", {"foreach": True, "fused": None}),
    ("for_loop", {"foreach": False, "fused": None}), ("fused", {"foreach": None, "fused": True})])
def test_the_run_builds_torch_s_adamw_as_train_optimizer_impl_says(implementation, expected):
    cfg = _cell("method=full", f"train.optimizer_impl={implementation}")
    model = methods.prepare(models.load_model(cfg.model, cfg.precision, False, CPU), cfg)
    updates = training_step.Updates(model, cfg, 20, CPU)
    assert {key: updates.optimizer.defaults[key] for key in expected} == expected
    batch = families.of(cfg.model).training_batch(2, LENGTHS, CPU, tokenizers.PAD_ID,
                                                  tokenizers.EOS_ID + 5)
    before = [p.detach().clone() for p in model.parameters()]
    updates.backward(training_step.forward(model, batch, cfg.precision, CPU), update=True)
    assert any(not torch.equal(old, new) for old, new in zip(before, model.parameters()))
