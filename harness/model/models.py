"""Models and tokenizers: a model from the hub or a folder, or its architecture (written down in
conf/model/) built with random weights offline; stored as the precision asks: float32, half for
frozen weights, or bitsandbytes' LLM.int8 / 4-bit NormalFloat base weights. The model's family
(harness/model/families.py) says which transformers class builds it.
"""

import contextlib
import tempfile

import safetensors.torch
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoTokenizer, BitsAndBytesConfig, ByT5Tokenizer

from harness.core.options import CONF_DIR, QUANTIZED
from harness.model import families, tokenizers

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def load_tokenizer(model_cfg):
    """The model's own tokenizer, or the byte-level ByT5 tokenizer, which needs no files."""
    if tokenizers.tokenizer_identity(model_cfg) == "byte":
        return ByT5Tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(tokenizers.tokenizer_location(model_cfg),
                                              revision=model_cfg.revision)
    if tokenizer.pad_token is None:  # GPT-NeoX tokenizers have none; batches need one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_cfg, precision, base_frozen: bool, device: torch.device,
               shards_weights: bool = False):
    """The model on `device`, its weights stored as the precision (its name or its config) says.

    fp32: float32. bf16 / fp16: frozen weights in the half dtype; weights that train stay float32
    (autocast does the half-precision compute), so full fine-tuning keeps float32 weights, unless
    precision.master_weights=false: then every weight is stored in the half dtype.
    int8: LLM.int8 base weights; nf4: 4-bit NormalFloat base weights (QLoRA), both through
    bitsandbytes, the layers it leaves unquantized in float32. In fp16 and int8, transformers
    keeps T5's wo in float32 (T5's _keep_in_fp32_modules); random weights are stored the same way.
    `shards_weights`: the cell's strategy shards the weights (its 4-bit values are then stored in
    a float dtype it can cut, precision.quant_storage=auto).
    """
    precision_cfg = precision_config(precision)
    if precision_cfg.name in QUANTIZED:
        return _load_quantized(model_cfg, quantization(precision_cfg, shards_weights), device,
                               UNQUANTIZED.get(precision_cfg.get("unquantized_dtype", "auto"),
                                               "auto"))
    dtype = stored_dtype(precision_cfg, base_frozen)
    if model_cfg.source == "random":
        with torch.device(device):  # built in place, in its dtype: no float32 copy on the GPU
            return random_model(model_cfg, dtype)
    return families.of(model_cfg).auto_class.from_pretrained(
        _location(model_cfg), revision=model_cfg.revision, dtype=dtype,
        attn_implementation=model_cfg.attn_implementation).to(device)


def precision_config(precision):
    """The precision's config from its config or its name (options at their defaults)."""
    if not isinstance(precision, str):
        return precision
    return OmegaConf.load(CONF_DIR / "precision" / f"{precision}.yaml")


def stored_dtype(precision, base_frozen: bool) -> torch.dtype:
    """The dtype the model's weights are stored in: half for a frozen base, and for every weight
    without master weights; under int8 / nf4, that of the layers left unquantized
    (precision.unquantized_dtype; auto: float32, which peft's k-bit preparation casts them to)."""
    precision_cfg = precision_config(precision)
    if precision_cfg.name in QUANTIZED:
        return UNQUANTIZED.get(precision_cfg.get("unquantized_dtype", "auto"), torch.float32)
    if precision_cfg.name in HALF_DTYPES and (base_frozen or trained_in_half(precision_cfg)):
        return HALF_DTYPES[precision_cfg.name]
    return torch.float32


def trained_in_half(precision) -> bool:
    """Whether the trained weights (and so their gradients and optimizer state) are half:
    bf16 / fp16 with precision.master_weights=false."""
    precision_cfg = precision_config(precision)
    return precision_cfg.name in HALF_DTYPES and not precision_cfg.master_weights


def quantization(precision_cfg, shards_weights: bool = False) -> BitsAndBytesConfig:
    """bitsandbytes' settings for a quantized precision: LLM.int8 with its outlier threshold, or
    4-bit NormalFloat with QLoRA's double quantization, compute dtype and storage dtype."""
    if precision_cfg.name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True,
                                  llm_int8_threshold=precision_cfg.llm_int8_threshold)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=precision_cfg.quant_type,
                              bnb_4bit_use_double_quant=precision_cfg.double_quant,
                              bnb_4bit_compute_dtype=COMPUTE_DTYPES[precision_cfg.compute_dtype],
                              bnb_4bit_quant_storage=quant_storage(precision_cfg, shards_weights))


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
UNQUANTIZED = COMPUTE_DTYPES  # precision.unquantized_dtype (auto: not in it)
STORAGE_DTYPES = {**COMPUTE_DTYPES, "uint8": torch.uint8}


def quant_storage(precision_cfg, shards_weights: bool) -> torch.dtype:
    """The dtype 4-bit values are packed in: as precision.quant_storage says; auto: uint8, or the
    compute dtype where the strategy shards the weights (FSDP and ZeRO-3 cut float tensors only;
    the packed bytes are the same whatever their dtype)."""
    chosen = precision_cfg.get("quant_storage", "auto")
    if chosen == "auto":
        chosen = precision_cfg.compute_dtype if shards_weights else "uint8"
    return STORAGE_DTYPES[chosen]


def _load_quantized(model_cfg, quantization_config: BitsAndBytesConfig, device: torch.device,
                    dtype="auto"):
    """`dtype`: the layers left unquantized, or auto (the checkpoint's)."""
    auto_class = families.of(model_cfg).auto_class
    options = {"quantization_config": quantization_config, "device_map": {"": device},
               "attn_implementation": model_cfg.attn_implementation, "dtype": dtype}
    if model_cfg.source != "random":
        return _one_cpu_format(auto_class.from_pretrained(
            _location(model_cfg), revision=model_cfg.revision, **options))
    # bitsandbytes quantizes while loading saved weights, so random weights are saved first.
    model = random_model(model_cfg)
    with tempfile.TemporaryDirectory(prefix="harness-random-") as folder:
        # Written by every rank for itself: transformers' save_pretrained writes on rank 0 alone
        # in a process group.
        model.config.save_pretrained(folder)
        safetensors.torch.save_model(model, f"{folder}/model.safetensors",
                                     metadata={"format": "pt"})
        del model
        model = auto_class.from_pretrained(folder, **options)
    # Random weights come from no checkpoint (the folder is gone), as when built from a config:
    # nothing for peft to look up when it saves the adapter.
    model.name_or_path = model.config._name_or_path = ""
    return _one_cpu_format(model)


def _one_cpu_format(model):
    """4-bit layers kept in one storage format on a CPU: bitsandbytes' inference kernel for CPUs
    with AVX512-BF16 repacks a weight in place the first time it runs in eval mode, which fails
    on widths not divisible by 32 (tiny test models) and would hand FSDP a weight it did not
    shard; the training kernel serves evaluation as well."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def random_model(model_cfg, dtype: torch.dtype = torch.float32):
    """The architecture with seeded random weights, parameter for parameter like the trained one,
    stored in `dtype` as from_pretrained would store it. Special ids are the byte tokenizer's
    (padding 0, end of sequence 1), which random weights are trained with by default."""
    torch.manual_seed(model_cfg.seed)
    # Plain containers all the way down: transformers 5 checks nested fields' types (RoPE's).
    architecture = OmegaConf.to_container(OmegaConf.create(model_cfg.architecture), resolve=True)
    config = AutoConfig.for_model(**architecture, decoder_start_token_id=tokenizers.PAD_ID,
                                  pad_token_id=tokenizers.PAD_ID, bos_token_id=tokenizers.PAD_ID,
                                  eos_token_id=tokenizers.EOS_ID,
                                  attn_implementation=model_cfg.attn_implementation)
    model = families.of(model_cfg).auto_class.from_config(config, dtype=dtype)
    # from_pretrained keeps these in float32 (T5: wo, for fp16); from_config does not.
    keep = {*(model._keep_in_fp32_modules_strict or ())}
    if dtype == torch.float16:
        keep |= {*(model._keep_in_fp32_modules or ())}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in keep:
            module.to(torch.float32)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if architecture.get("tie_word_embeddings") is False and head.weight is embedding.weight:
        # transformers 5 always ties T5's lm_head to the input embedding when it builds a model
        # from a config; flan-t5 (T5 v1.1) checkpoints have their own lm_head, which
        # from_pretrained keeps. Untie it here so that a random model has the trained one's
        # parameters and memory (24.7M more for flan-t5-base).
        model.all_tied_weights_keys.pop("lm_head.weight", None)
        model.config.tie_word_embeddings = False  # as the checkpoint's config says
        head.weight = torch.nn.Parameter(torch.empty_like(embedding.weight))
        # T5's own init of an untied head: normal with std = initializer_factor.
        torch.nn.init.normal_(head.weight, std=model.config.initializer_factor)
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


def autocast(device: torch.device, precision):
    """Half-precision compute for bf16 / fp16 (training and evaluation alike); none for the other
    precisions, or with precision.autocast=false (a half base and float32 adapters, whose inputs
    peft casts itself). `precision`: its config, or its name (autocast where it is half)."""
    name = precision if isinstance(precision, str) else precision.name
    if name not in HALF_DTYPES or not compute_autocast(precision):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=HALF_DTYPES[name])


def compute_autocast(precision) -> bool:
    """Whether a half precision computes under autocast (precision.autocast, default true)."""
    return isinstance(precision, str) or precision.get("autocast", True)


def blocks(model) -> list:
    """The model's transformer blocks: the modules of the classes transformers keeps whole
    (_no_split_modules: T5Block, LlamaDecoderLayer, ...), under peft's wrapper too. FSDP2 shards
    each as one unit; the estimate's largest block is what it gathers at once."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts as peft's print_trainable_parameters counts them: an
    int8 weight one per stored value, a 4-bit weight (two values per stored byte) two."""
    def values(parameter):
        return parameter.numel() * (2 if parameter.__class__.__name__ == "Params4bit" else 1)
    trainable = sum(values(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(values(p) for p in model.parameters())
