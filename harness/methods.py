"""Fine-tuning methods: which weights train. full: all of them; lora: peft adapters only."""

from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training


def base_frozen(method: str) -> bool:
    """Whether the method leaves the base weights untouched (so they may be stored in half)."""
    return method != "full"


def apply(model, method_cfg, precision: str):
    """The model with the method's trainable weights marked; peft wraps it for LoRA."""
    if method_cfg.name == "full":
        model.requires_grad_(True)
        return model
    if precision == "int8":
        # Casts layer norms to float32 and lets gradients flow from the frozen int8 embeddings.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=method_cfg.r, lora_alpha=method_cfg.alpha,
                      lora_dropout=method_cfg.dropout,
                      target_modules=list(method_cfg.target_modules))
    # peft keeps the adapters in float32 when the base is in half precision.
    return get_peft_model(model, lora)
