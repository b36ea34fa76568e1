"""The option lists every layer checks against: where the Hydra config groups are, and every
choice a key may take. Imports nothing, so that a config error is refused before torch loads.
"""

import re
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the Hydra config groups
ADAPTER_METHODS = ("lora", "lora_lomo")  # methods with LoRA adapters (method.r, ...)
FUSED_METHODS = ("lomo", "lora_lomo")    # base weights updated inside backward (model/lomo.py)
ADAPTER_KEYS = ("r", "alpha", "dropout", "target_modules")
MODEL_SOURCES = ("hub", "random")
TOKENIZERS = ("auto", "byte", "hub")
# torch's, and bitsandbytes' 8-bit and paged AdamW (harness/model/optimizers.py; not imported here:
# a config error is refused before torch loads).
OPTIMIZERS = ("adamw", "sgd", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
PAGED_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit")
# How torch's AdamW and SGD run their update: auto (torch picks: foreach on a GPU), foreach (one
# kernel per op over every tensor, whole-model temporaries), for_loop (tensor by tensor), fused
# (one kernel per tensor, no temporaries).
OPTIMIZER_IMPLEMENTATIONS = ("auto", "foreach", "for_loop", "fused")
HALF_PRECISIONS = ("bf16", "fp16")  # precision.master_weights=false trains in these
QUANTIZED = ("int8", "nf4")  # bitsandbytes base weights (harness/model/models.py)
FAMILIES = ("seq2seq", "causal")
NF4_OPTIONS = {"quant_type": ("nf4", "fp4"), "compute_dtype": ("bf16", "fp16", "fp32")}
ATTENTION = ("sdpa", "eager")
START_METHODS = ("auto", "forkserver", "spawn")
# The groups that define what a cell computes; tracking, runner and sampler say where and how.
CELL_GROUPS = ("model", "method", "precision", "data", "train", "eval", "strategy")
OTHER_GROUPS = ("tracking", "runner", "sampler", "cost")
QUANT_STORAGES = ("auto", "uint8", "bf16", "fp16", "fp32")  # 4-bit weights' packed dtype
# A cut length given as a percentile of the tokenized lengths: p85, p100, p99.5.
PERCENTILE = re.compile(r"p(\d+(?:\.\d+)?)")
