"""Fine-tuning methods: which weights train, and how.

full: every weight, by method.optimizer (AdamW, or plain SGD as the LOMO paper's baseline).
lora: peft adapters only, base frozen. lomo: every weight, by SGD fused into backward.
lora_lomo: peft adapters by method.optimizer, and every base weight by SGD fused into backward.
"""

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from harness.core.options import QUANTIZED
from harness.model import families, models


def base_frozen(method: str) -> bool:
    """Whether the method leaves the base weights untouched (so they may be stored in half)."""
    return method == "lora"


def prepare(model, cfg, **checkpoint_options):
    """The loaded model as a cell trains it: activation checkpointing where
    train.gradient_checkpointing says (before peft wraps the model, as peft's k-bit preparation
    does), then the method."""
    if cfg.train.gradient_checkpointing:
        models.checkpoint_activations(model, **checkpoint_options)
    return apply(model, cfg.method, cfg.precision, families.of(cfg.model))


def apply(model, method_cfg, precision, family=families.FAMILIES["seq2seq"]):
    """The model with the method's trainable weights marked; peft wraps it for LoRA, with the
    task type of the model's family. `precision`: its config or its name."""
    if method_cfg.name in ("full", "lomo"):
        model.requires_grad_(True)
        return model
    precision_cfg = models.precision_config(precision)
    if precision_cfg.name in QUANTIZED and \
            precision_cfg.get("unquantized_dtype", "auto") in ("auto", "fp32"):
        # peft's k-bit preparation (the study's recipe): the base frozen, the layers bitsandbytes
        # left unquantized cast to float32.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif precision_cfg.name in QUANTIZED:  # precision.unquantized_dtype chosen: kept in it
        model.requires_grad_(False)
    lora = LoraConfig(task_type=family.task_type, r=method_cfg.r, lora_alpha=method_cfg.alpha,
                      lora_dropout=method_cfg.dropout,
                      target_modules=list(method_cfg.target_modules))
    # peft keeps the adapters in float32 beside a half base (mixed precision); without master
    # weights they stay in the base's dtype.
    model = get_peft_model(model, lora,
                           autocast_adapter_dtype=not models.trained_in_half(precision))
    if method_cfg.name == "lora_lomo":
        for parameter in fused_parameters(model, method_cfg.name):
            parameter.requires_grad_(True)
    return model


def fused_parameters(model, method: str) -> list:
    """The weights the method updates inside backward: all for lomo, the base's for lora_lomo."""
    if method == "lomo":
        return list(model.parameters())
    if method == "lora_lomo":
        return [parameter for name, parameter in model.named_parameters() if "lora_" not in name]
    return []
