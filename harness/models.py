"""Models and tokenizers: flan-t5 from the hub or a folder, or any T5 architecture built with
random weights offline; stored in the dtype the precision asks for.
"""

import contextlib
import tempfile

import torch
from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, BitsAndBytesConfig,
                          ByT5Tokenizer, T5Config, T5ForConditionalGeneration)

from harness import data

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def load_tokenizer(model_cfg):
    """The model's own tokenizer, or the byte-level ByT5 tokenizer, which needs no files."""
    if data.tokenizer_identity(model_cfg) == "byte":
        return ByT5Tokenizer()
    return AutoTokenizer.from_pretrained(data.tokenizer_location(model_cfg),
                                         revision=model_cfg.revision)


def load_model(model_cfg, precision: str, base_frozen: bool, device: torch.device):
    """The model on `device`, its weights stored as the precision says.

    fp32: float32. bf16 / fp16: frozen weights in the half dtype; weights that train stay float32
    (autocast does the half-precision compute), so full fine-tuning keeps float32 weights.
    int8: LLM.int8 base weights through bitsandbytes. In fp16 and int8, transformers keeps T5's
    wo in float32 (T5's _keep_in_fp32_modules); random weights are stored the same way.
    """
    dtype = stored_dtype(precision, base_frozen)
    if precision == "int8":
        return _load_int8(model_cfg, device)
    if model_cfg.source == "random":
        with torch.device(device):  # built in place, in its dtype: no float32 copy on the GPU
            return random_model(model_cfg, dtype)
    return T5ForConditionalGeneration.from_pretrained(
        _location(model_cfg), revision=model_cfg.revision, dtype=dtype,
        attn_implementation=model_cfg.attn_implementation).to(device)


def stored_dtype(precision: str, base_frozen: bool) -> torch.dtype:
    """The dtype the model's weights are stored in (int8's unquantized layers: float32)."""
    return HALF_DTYPES[precision] if precision in HALF_DTYPES and base_frozen else torch.float32


def _load_int8(model_cfg, device: torch.device):
    quantization = BitsAndBytesConfig(load_in_8bit=True)
    if model_cfg.source != "random":
        return T5ForConditionalGeneration.from_pretrained(
            _location(model_cfg), revision=model_cfg.revision,
            quantization_config=quantization, device_map={"": device},
            attn_implementation=model_cfg.attn_implementation)
    # bitsandbytes quantizes while loading saved weights, so random weights are saved first.
    model = random_model(model_cfg)
    with tempfile.TemporaryDirectory(prefix="harness-random-") as folder:
        model.save_pretrained(folder)
        del model
        model = T5ForConditionalGeneration.from_pretrained(
            folder, quantization_config=quantization, device_map={"": device},
            attn_implementation=model_cfg.attn_implementation)
    # Random weights come from no checkpoint (the folder is gone), as when built from a config:
    # nothing for peft to look up when it saves the adapter.
    model.name_or_path = model.config._name_or_path = ""
    return model


def random_model(model_cfg, dtype: torch.dtype = torch.float32) -> T5ForConditionalGeneration:
    """The architecture with seeded random weights, parameter for parameter like the trained one,
    stored in `dtype` as from_pretrained would store it."""
    torch.manual_seed(model_cfg.seed)
    architecture = dict(model_cfg.architecture)
    config = T5Config(**architecture, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                      attn_implementation=model_cfg.attn_implementation)
    model = AutoModelForSeq2SeqLM.from_config(config, dtype=dtype)
    # from_pretrained keeps these in float32 (T5: wo, for fp16); from_config does not.
    keep = {*(model._keep_in_fp32_modules_strict or ())}
    if dtype == torch.float16:
        keep |= {*(model._keep_in_fp32_modules or ())}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in keep:
            module.to(torch.float32)
    if architecture.get("tie_word_embeddings") is False:
        # transformers 5 always ties T5's lm_head to the input embedding when it builds a model
        # from a config; flan-t5 (T5 v1.1) checkpoints have their own lm_head, which
        # from_pretrained keeps. Untie it here so that a random model has the trained one's
        # parameters and memory (24.7M more for flan-t5-base).
        model.all_tied_weights_keys.pop("lm_head.weight", None)
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
        # T5's own init of an untied head: normal with std = initializer_factor.
        torch.nn.init.normal_(model.lm_head.weight, std=model.config.initializer_factor)
    return model


def _location(model_cfg) -> str:
    return model_cfg.hub_id if model_cfg.source == "hub" else model_cfg.source


def checkpoint_activations(model, **checkpoint_options) -> None:
    """Activation (gradient) checkpointing through transformers' own API: each block keeps only
    its inputs in forward and recomputes its activations during backward. Non-reentrant (the
    default of transformers 5), which lets gradients reach adapters behind frozen embeddings and
    runs LOMO's per-weight hooks once per weight; transformers also makes the embeddings' output
    require grad, as peft's k-bit preparation does. `checkpoint_options` go to
    torch.utils.checkpoint.checkpoint."""
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, **checkpoint_options})


def autocast(device: torch.device, precision: str):
    """Half-precision compute for bf16 / fp16 (training and evaluation alike); none otherwise."""
    if precision not in HALF_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=HALF_DTYPES[precision])


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; int8 weights count one per stored value."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
