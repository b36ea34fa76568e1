"""The rules every engine that shards shares (fsdp/ and zero/: no torch): what its cut of the
weights, gradients or optimizer state cannot take."""

from harness.core.options import FUSED_METHODS, QUANTIZED


def weights_reason(cfg, shards_weights: bool) -> str | None:
    """Why a quantized base cannot be sharded (or kept whole) by this strategy, or None."""
    strategy, precision = cfg.strategy.name, cfg.precision.name
    if precision == "int8" and shards_weights:
        return (f"strategy={strategy} shards the weights, and bitsandbytes' LLM.int8 weights are "
                "int8 tensors whose row scales live beside them (not in the tensor FSDP or "
                "ZeRO-3 would cut): use precision=nf4 (QLoRA's 4-bit values, stored in a float "
                "dtype, shard), or strategy=ddp, where every rank holds the int8 base whole")
    if precision == "nf4" and shards_weights and cfg.precision.quant_storage == "uint8":
        return (f"precision.quant_storage=uint8 with strategy={strategy}: FSDP and ZeRO-3 shard "
                "floating-point tensors only; use precision.quant_storage=auto (the compute "
                "dtype, as PEFT's FSDP-QLoRA recipe) or bf16 / fp16 / fp32: the bytes are the "
                "same")
    if precision in QUANTIZED and not shards_weights:
        return (f"precision={precision} with strategy={strategy}: DeepSpeed's ZeRO-2 engine "
                "handles the frozen quantized weights it does not shard as its own; use "
                "strategy=zero3 or fsdp (which shard 4-bit weights), or ddp")
    return None


def optimizer_reason(cfg) -> str | None:
    """Why the optimizer cannot step this strategy's shards, or None."""
    if cfg.method.optimizer not in ("adamw", "sgd"):
        return (f"method.optimizer={cfg.method.optimizer} is bitsandbytes' and steps whole "
                f"tensors, which strategy={cfg.strategy.name} shards: use method.optimizer=adamw "
                "or sgd, or strategy=ddp")
    return None


def loss_scale_reason(cfg) -> str | None:
    """Why fp16's GradScaler cannot decide for a sharded step, or None."""
    if cfg.precision.name == "fp16" and cfg.method.name not in FUSED_METHODS:
        return (f"precision=fp16 with strategy={cfg.strategy.name}: GradScaler decides on one "
                "rank's shard of the gradients whether to skip a step; use precision=bf16 (no "
                "loss scale), strategy=ddp, or a LOMO method, whose loss scale sees the global "
                "norm")
    return None
