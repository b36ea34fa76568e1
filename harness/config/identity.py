"""A cell's identity: the resolved groups that define what it computes, its fingerprint, its
flat MLflow params and its readable name.
"""

import copy
import functools
import json

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from harness.core.files import digest
from harness.core.options import (
    ADAPTER_KEYS,
    ADAPTER_METHODS,
    CELL_GROUPS,
    OTHER_GROUPS,
)


def cell_config(cfg: DictConfig) -> dict:
    """The resolved groups that define the cell, without knobs its method does not use.

    A sweep that crosses method=full,lora with method.r=4,8 gives full fine-tuning an r it
    ignores; dropping it makes both full cells one cell (one fingerprint), run once.
    """
    cell_cfg = {group: OmegaConf.to_container(cfg[group], resolve=True) for group in CELL_GROUPS}
    if cell_cfg["method"]["name"] not in ADAPTER_METHODS:
        for key in ADAPTER_KEYS:
            cell_cfg["method"].pop(key, None)
    return cell_cfg


# Keys that joined a cell after stores began to keep fingerprints, each with the version it came
# in, the default that computes what cells computed before it, and what the fingerprint hashed
# before (ABSENT: the key was not there). At that default a cell hashes as it did before the
# key came: its fingerprint, and so a store's record that it finished, survive the upgrade. A
# change that alters what a cell computes by default changes fingerprints on purpose: the test
# that pins them (tests/test_config.py) has to change with it, with a note. docs/design.md.
ABSENT = object()
SINCE = {
    # auto: the inference benchmark where it measures something; a GPU cell still runs it as
    # every cell did before (true).
    "eval.infer": ("0.2.0", "auto", True),
    "eval.loss_max_batches": ("0.2.0", "auto", ABSENT),
    # true: trained weights in float32, as every cell kept them before the key came.
    "precision.master_weights": ("0.2.0", True, ABSENT),
    # null: a local file's columns read by their own names, as they were before the key came.
    "data.columns": ("0.3.0", None, ABSENT),
    # auto: uint8 in one process, as before the key came (sharded 4-bit cells are new with it).
    "precision.quant_storage": ("0.3.0", "auto", ABSENT),
    # auto: the checkpoint's dtype, what transformers loaded before the key came.
    "precision.unquantized_dtype": ("0.3.0", "auto", ABSENT),
    # DeepSpeed's own default, which ZeRO-3 cells ran with before the key came.
    "strategy.stage3_param_persistence_threshold": ("0.3.0", 1.0e5, ABSENT),
    # true: autocast for bf16 / fp16, as every half cell computed before the key came.
    "precision.autocast": ("0.3.0", True, ABSENT),
    # auto: torch's own choice, what every optimizer ran before the key came.
    "train.optimizer_impl": ("0.3.0", "auto", ABSENT),
}


# Strategy keys that say how long to wait and where the nodes meet, not what is computed.
NOT_COMPUTED = ("timeout_s", "node_rank", "master_addr", "master_port")


def fingerprint(cell_cfg: dict) -> str:
    """A stable id of what the cell computes: the same config gives the same fingerprint, and a
    key that came later, at its default, leaves it as it was (SINCE)."""
    return digest(_as_before(cell_cfg), 12)


def _as_before(cell_cfg: dict) -> dict:
    """The cell as the fingerprint sees it: each SINCE key at its default hashed as before; a
    single-process cell without the strategy group that came after it, and none of a strategy's
    NOT_COMPUTED keys."""
    hashed = copy.deepcopy(cell_cfg)
    strategy = hashed.pop("strategy", None)
    if strategy is not None and strategy["name"] != "single":
        hashed["strategy"] = {key: value for key, value in strategy.items()
                              if key not in NOT_COMPUTED}
    for key, (_, default, before) in SINCE.items():
        *path, name = key.split(".")
        holder = functools.reduce(lambda node, part: node.get(part, {}), path, hashed)
        if name not in holder or holder[name] != default:
            continue
        if before is ABSENT:
            del holder[name]
        else:
            holder[name] = before
    return hashed


def flat_params(cell_cfg: dict, cfg: DictConfig) -> dict:
    """The resolved config as flat MLflow params: model.name, method.r, tracking.uri, ..."""
    whole = {**cell_cfg, **{group: OmegaConf.to_container(cfg[group], resolve=True)
                        for group in OTHER_GROUPS}}
    whole["cost"].pop("prices")  # the table of prices is the same for every run
    flat = pd.json_normalize(whole, sep=".").iloc[0].to_dict()
    return {key: json.dumps(value) if isinstance(value, list) else value
            for key, value in flat.items()}


def method_label(name: str, optimizer: str) -> str:
    """full, full_sgd, lora, lomo, lora_adamw_8bit, ...: the option's name (method=full_sgd is
    full fine-tuning with SGD), with the optimizer where it is not the method's own (AdamW; LOMO
    is SGD by definition)."""
    if optimizer == "adamw" or (optimizer == "sgd" and name == "lomo"):
        return name
    return f"{name}_{optimizer}"


def run_name(cell_cfg: dict) -> str:
    """A short readable name for the MLflow UI: model / method[-r] / precision[ / strategy]."""
    method, precision = cell_cfg["method"], cell_cfg["precision"]
    name = label(cell_cfg["model"]["name"], method["name"], method["optimizer"], method.get("r"),
                 precision_label(precision["name"], precision.get("master_weights", True),
                                 precision.get("autocast", True)))
    strategy = cell_cfg.get("strategy", {"name": "single"})
    if strategy["name"] == "single":
        return name
    return f"{name}/{strategy_label(strategy)}"


def strategy_label(strategy: dict) -> str:
    """fsdp-x2 (two ranks on one node), zero3-2x8 (two nodes of eight), single."""
    if strategy["name"] == "single":
        return "single"
    nodes, per_node = strategy["nnodes"], strategy["nproc_per_node"]
    world = f"x{per_node}" if nodes == 1 else f"{nodes}x{per_node}"
    return f"{strategy['name']}-{world}"


def precision_label(name: str, master_weights: bool = True, autocast: bool = True) -> str:
    """bf16; bf16-pure: trained in bfloat16 itself, without float32 master weights;
    bf16-noautocast: a bfloat16 base and float32 adapters without autocast (peft's scripts)."""
    if not master_weights:
        return f"{name}-pure"
    return name if autocast else f"{name}-noautocast"


def label(model: str, method: str, optimizer: str, rank: int | None, precision: str) -> str:
    """flan-t5-base/lora-r8/bf16: a cell's name wherever it is shown (runs, reports, claims);
    `precision` as precision_label writes it."""
    suffix = "" if rank is None else f"-r{rank}"
    return f"{model}/{method_label(method, optimizer)}{suffix}/{precision}"
