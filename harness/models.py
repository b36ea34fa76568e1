"""Models and tokenizers: flan-t5 from the hub or a folder, or any T5 architecture built with
random weights offline; stored in the dtype the precision asks for.
"""

import contextlib
import tempfile
import warnings

import torch
from transformers import (AutoTokenizer, BitsAndBytesConfig, ByT5Tokenizer, T5Config,
                          T5ForConditionalGeneration)

# bitsandbytes warns on every int8 matmul that it casts float32 inputs to float16.
warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def load_tokenizer(model_cfg):
    """The model's own tokenizer, or the byte-level ByT5 tokenizer, which needs no files."""
    choice = model_cfg.tokenizer
    if choice == "byte" or (choice == "auto" and model_cfg.source == "random"):
        return ByT5Tokenizer()
    location = model_cfg.source if model_cfg.source not in ("hub", "random") else model_cfg.hub_id
    return AutoTokenizer.from_pretrained(location, revision=model_cfg.revision)


def load_model(model_cfg, precision: str, base_frozen: bool, device: torch.device):
    """The model on `device`, its weights stored as the precision says.

    fp32: float32. bf16 / fp16: frozen weights in the half dtype; weights that train stay float32
    (autocast does the half-precision compute), so full fine-tuning keeps float32 weights.
    int8: LLM.int8 base weights through bitsandbytes (transformers keeps T5's wo in float32).
    """
    dtype = HALF_DTYPES[precision] if precision in HALF_DTYPES and base_frozen else torch.float32
    if precision == "int8":
        return _load_int8(model_cfg, device)
    if model_cfg.source == "random":
        with torch.device(device):
            model = random_model(model_cfg)
        return model.to(dtype)
    return T5ForConditionalGeneration.from_pretrained(
        _location(model_cfg), revision=model_cfg.revision, dtype=dtype).to(device)


def _load_int8(model_cfg, device: torch.device):
    quantization = BitsAndBytesConfig(load_in_8bit=True)
    if model_cfg.source != "random":
        return T5ForConditionalGeneration.from_pretrained(
            _location(model_cfg), revision=model_cfg.revision,
            quantization_config=quantization, device_map={"": device})
    # bitsandbytes quantizes while loading saved weights, so random weights are saved first.
    model = random_model(model_cfg)
    with tempfile.TemporaryDirectory(prefix="harness-random-") as folder:
        model.save_pretrained(folder)
        del model
        return T5ForConditionalGeneration.from_pretrained(
            folder, quantization_config=quantization, device_map={"": device})


def random_model(model_cfg) -> T5ForConditionalGeneration:
    """The architecture with seeded random weights, parameter for parameter like the trained one."""
    torch.manual_seed(model_cfg.seed)
    architecture = dict(model_cfg.architecture)
    model = T5ForConditionalGeneration(T5Config(**architecture, decoder_start_token_id=0,
                                                pad_token_id=0, eos_token_id=1))
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


def autocast(device: torch.device, precision: str):
    """Half-precision compute for bf16 / fp16 (training and evaluation alike); none otherwise."""
    if precision not in HALF_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=HALF_DTYPES[precision])


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; int8 weights count one per stored value."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
