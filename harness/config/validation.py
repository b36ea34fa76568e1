"""The resolved config of a cell: validation before any work, its identity, and its params.

Hydra already refuses unknown group options (model=..., method=...) and lists the valid ones;
this module checks what Hydra cannot: values, combinations and user data.
"""

import difflib
import functools
import importlib.util
import tempfile
import urllib.parse
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness.config import cost
from harness.core.errors import ConfigError
from harness.core.options import (
    ADAPTER_METHODS,
    ATTENTION,
    CELL_GROUPS,
    CONF_DIR,
    DEEPSPEED_STRATEGIES,
    FAMILIES,
    FUSED_METHODS,
    HALF_PRECISIONS,
    MODEL_SOURCES,
    NF4_OPTIONS,
    OPTIMIZERS,
    OTHER_GROUPS,
    PAGED_OPTIMIZERS,
    QUANTIZED,
    SHARDED_STRATEGIES,
    START_METHODS,
    TOKENIZERS,
)
from harness.data import checks
from harness.measure import gpus


def invalid_cell_reason(cfg: DictConfig) -> str | None:
    """Why this combination cannot run at all, or None. Sweeps record such cells as skipped."""
    method, precision = cfg.method.name, cfg.precision.name
    if precision in QUANTIZED and method != "lora":
        return (f"method={method} updates the base weights, which precision={precision} stores "
                f"quantized and cannot update: use method=lora with {precision}, or "
                "precision=fp32 / bf16 / fp16 with this method")
    master_reason = _master_weights_reason(cfg)
    if master_reason:
        return master_reason
    targets = cfg.method.get("target_modules")
    known = cfg.model.get("lora_targets")
    if method in ADAPTER_METHODS and known and not set(targets) <= set(known):
        return (f"method.target_modules={list(targets)} names modules that model="
                f"{cfg.model.name} ({cfg.model.architecture.model_type}) does not have: its LoRA "
                f"targets are {', '.join(known)} (default {list(cfg.model.default_lora_targets)})")
    if cfg.model.family == "seq2seq" and cfg.data.get("train_on_inputs"):
        return (f"data.train_on_inputs=true is for causal models, whose labels are the prompt and "
                f"the response; model={cfg.model.name} is seq2seq, whose labels are the target "
                "alone: set data.train_on_inputs=false, or use a causal model")
    if method in FUSED_METHODS and cfg.train.grad_accum_steps != 1:
        return (f"method={method} updates each base weight inside backward and frees its "
                "gradient, so gradients cannot accumulate over micro-batches "
                f"(train.grad_accum_steps={cfg.train.grad_accum_steps}): set "
                "train.grad_accum_steps=1 and raise train.batch_size instead")
    return _strategy_reason(cfg)


def _strategy_reason(cfg: DictConfig) -> str | None:
    """Why the cell's strategy cannot train it, or None."""
    strategy, method, precision = cfg.strategy.name, cfg.method.name, cfg.precision.name
    world = cfg.strategy.nproc_per_node * cfg.strategy.nnodes
    if cfg.train.batch_size % world:
        return (f"{world} ranks (strategy.nproc_per_node={cfg.strategy.nproc_per_node} x "
                f"strategy.nnodes={cfg.strategy.nnodes}) do not divide train.batch_size="
                f"{cfg.train.batch_size}, the global batch each step splits between them: use a "
                "number of ranks that divides it, or a batch size they divide")
    if strategy not in SHARDED_STRATEGIES:
        return None
    if precision in QUANTIZED:
        return (f"strategy={strategy} shards the weights, and bitsandbytes' precision="
                f"{precision} weights (packed values with their scales) cannot be sharded: use "
                "strategy=ddp, where every rank holds the quantized base whole, or precision="
                "bf16 / fp16 with this strategy")
    if cfg.method.optimizer != "adamw" and cfg.method.optimizer != "sgd":
        return (f"method.optimizer={cfg.method.optimizer} is bitsandbytes' and steps whole "
                f"tensors, which strategy={strategy} shards: use method.optimizer=adamw or sgd, "
                "or strategy=ddp")
    if strategy in DEEPSPEED_STRATEGIES:
        if method in FUSED_METHODS:
            return (f"method={method} updates each weight inside backward, and DeepSpeed's "
                    f"engine (strategy={strategy}) owns backward and the optimizer step: use "
                    "strategy=fsdp, whose sharded gradients reach LOMO's hooks once reduced")
        if not cfg.precision.master_weights:
            return (f"precision.master_weights=false with strategy={strategy}: DeepSpeed's "
                    "engine keeps float32 partitions of the weights it trains; use strategy=fsdp "
                    "for weights trained in the half dtype itself")
    if precision == "fp16" and method not in FUSED_METHODS:
        return (f"precision=fp16 with strategy={strategy}: GradScaler decides on one rank's "
                "shard of the gradients whether to skip a step; use precision=bf16 (no loss "
                "scale), strategy=ddp, or a LOMO method, whose loss scale sees the global norm")
    return None


def _master_weights_reason(cfg: DictConfig) -> str | None:
    """Why precision.master_weights=false cannot run this cell, or None."""
    precision = cfg.precision.name
    if cfg.precision.master_weights:
        return None
    if precision not in HALF_PRECISIONS:
        kept = ("every weight is float32 already" if precision == "fp32" else
                "the base weights are quantized and frozen, and the adapters need float32 "
                "beside them")
        return (f"precision.master_weights=false with precision={precision}: {kept}, so there "
                "is no float32 copy to leave out; use precision=bf16 or fp16 with "
                "master_weights=false, or master_weights=true")
    if precision == "fp16" and cfg.method.optimizer == "adamw":
        return ("precision=fp16 with precision.master_weights=false keeps torch's AdamW "
                "moments in float16, where its eps (1e-8) is zero and squared gradients below "
                "6e-8 vanish: its first step divides 0 by 0 and the weights become NaN; use "
                "precision=bf16 (torchtune's pure half precision), method.optimizer=adamw_8bit "
                "(bitsandbytes computes the update in float32), or master_weights=true")
    return None


def machine_reason(cfg: DictConfig, cuda: bool) -> str | None:
    """Why this machine cannot run the cell, or None (the plan still estimates it for a GPU)."""
    if cfg.strategy.name in DEEPSPEED_STRATEGIES and importlib.util.find_spec("deepspeed") is None:
        return (f"strategy={cfg.strategy.name} runs DeepSpeed's ZeRO engine, which is not "
                "installed here: pip install deepspeed (or make install), or use strategy=fsdp")
    claimable = gpus.candidates(cfg.runner.gpus) if cuda else []
    if cuda and cfg.strategy.name != "single" and cfg.strategy.nproc_per_node > len(claimable):
        return (f"strategy.nproc_per_node={cfg.strategy.nproc_per_node} ranks need as many GPUs, "
                f"and the runner may claim {len(claimable)} ({','.join(claimable) or 'none'}; "
                "runner.gpus, else CUDA_VISIBLE_DEVICES, else every GPU): lower "
                "strategy.nproc_per_node, or give the runner more GPUs")
    if cfg.method.optimizer in PAGED_OPTIMIZERS and not cuda:
        return (f"method.optimizer={cfg.method.optimizer} pages its state between the GPU and the "
                "host through CUDA unified memory, and this machine has no CUDA device: use "
                "method.optimizer=adamw_8bit (the same 8-bit state, unpaged) or adamw here")
    return None


def check_machine(cfg: DictConfig, cuda: bool) -> None:
    """Refuse what a machine with (or without) CUDA cannot run at all, before any run is
    created."""
    if cfg.requires_gpu and not cfg.allow_cpu and not cuda:
        raise ConfigError(f"experiment {cfg.tracking.experiment} is meant for a GPU "
                          "(requires_gpu=true) and this machine has no CUDA device: run "
                          "`make demo` for the CPU grid, or add allow_cpu=true to run it here")
    if cfg.runner.start_method == "forkserver" and cuda:
        raise ConfigError("runner.start_method=forkserver cannot start a cell that uses CUDA: "
                          "the server imports bitsandbytes, which initialises CUDA, and a forked "
                          "child cannot use it; use runner.start_method=spawn (or auto)")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the bad value, what was expected and what to do."""
    _check_known_keys(cfg)
    source = cfg.model.source
    if source not in MODEL_SOURCES and not Path(source).is_dir():
        raise ConfigError(f"model.source={source!r} is neither {' nor '.join(MODEL_SOURCES)} nor "
                          "an existing folder: use hub, random, or the path of a saved model")
    if source == "hub" and not cfg.model.hub_id:
        raise ConfigError(f"model={cfg.model.name} has model.source=hub but no model.hub_id: "
                          "set model.hub_id, or use model.source=random to build it offline")
    if cfg.model.tokenizer not in TOKENIZERS:
        raise ConfigError(f"model.tokenizer={cfg.model.tokenizer!r}; expected one of "
                          f"{', '.join(TOKENIZERS)}")
    if cfg.model.family not in FAMILIES:
        raise ConfigError(f"model.family={cfg.model.family!r}; expected seq2seq (encoder-decoder "
                          "such as T5) or causal (decoder-only such as GPT-NeoX)")
    if cfg.precision.name == "nf4":
        for key, choices in NF4_OPTIONS.items():
            if cfg.precision[key] not in choices:
                raise ConfigError(f"precision.{key}={cfg.precision[key]!r}; expected one of "
                                  f"{', '.join(choices)}")
    if cfg.model.attn_implementation not in ATTENTION:
        raise ConfigError(f"model.attn_implementation={cfg.model.attn_implementation!r}; expected "
                          "sdpa (PyTorch's fused attention) or eager (matmul and softmax)")
    if not isinstance(cfg.precision.master_weights, bool):
        raise ConfigError(f"precision.master_weights={cfg.precision.master_weights!r}; expected "
                          "true (bf16 / fp16: trained weights kept in float32 under autocast) or "
                          "false (trained in the half dtype itself, optimizer state included)")
    if not isinstance(cfg.train.gradient_checkpointing, bool):
        raise ConfigError(f"train.gradient_checkpointing={cfg.train.gradient_checkpointing!r}; "
                          "expected true or false")
    if cfg.method.optimizer not in OPTIMIZERS:
        raise ConfigError(f"method.optimizer={cfg.method.optimizer!r}; expected one of "
                          f"{', '.join(OPTIMIZERS)}")
    if cfg.method.name == "lomo" and cfg.method.optimizer != "sgd":
        raise ConfigError(f"method=lomo with method.optimizer={cfg.method.optimizer!r}: LOMO "
                          "updates every weight by SGD inside backward; use method.optimizer=sgd, "
                          "or method=full for AdamW")
    if cfg.method.name == "lora_lomo":
        _check_positive(cfg, "method.lr_base")
    if cfg.method.name in ADAPTER_METHODS:
        _check_positive(cfg, "method.r", integer=True)
        _check_positive(cfg, "method.alpha")
        if not 0 <= cfg.method.dropout < 1:
            raise ConfigError(f"method.dropout={cfg.method.dropout}; expected 0 <= dropout < 1")
        if not cfg.method.target_modules:
            raise ConfigError("method.target_modules is empty; expected module names such as "
                              "[q,v] (T5 attention: q, k, v, o; feed-forward: wi_0, wi_1, wo; "
                              "GPT-NeoX and BLOOM: query_key_value, dense, ...)")
    for key in ("train.batch_size", "train.grad_accum_steps", "train.epochs", "eval.batch_size",
                "eval.num_beams", "eval.max_new_tokens", "eval.infer_batch_size",
                "eval.infer_examples", "eval.infer_new_tokens"):
        _check_positive(cfg, key, integer=True)
    if not (isinstance(cfg.eval.infer, bool) or cfg.eval.infer == "auto"):
        raise ConfigError(f"eval.infer={cfg.eval.infer!r}; expected true (the inference "
                          "benchmark after evaluation), false, or auto (on unless the cell only "
                          "measures memory on a CPU)")
    if cfg.eval.loss_max_batches not in ("auto", None):
        _check_positive(cfg, "eval.loss_max_batches", integer=True)
    if cfg.eval.max_samples is not None:
        _check_positive(cfg, "eval.max_samples", integer=True)
    _check_positive(cfg, "train.lr")
    for key in ("sampler.interval_ms", "sampler.metric_max_points", "sampler.csv_max_rows"):
        _check_positive(cfg, key, integer=key != "sampler.interval_ms")
    if cfg.runner.cpu_memory_limit_mib is not None:
        _check_positive(cfg, "runner.cpu_memory_limit_mib")
    cost.check(cfg.cost)
    if cfg.runner.start_method not in START_METHODS:
        raise ConfigError(f"runner.start_method={cfg.runner.start_method!r}; expected one of "
                          f"{', '.join(START_METHODS)} (each cell in a fresh process)")
    skip = cfg.train.throughput_skip_steps
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise ConfigError(f"train.throughput_skip_steps={skip!r}; expected an integer >= 0")
    if cfg.train.max_steps is not None and cfg.train.max_steps < 0:
        raise ConfigError(f"train.max_steps={cfg.train.max_steps}; expected null (train for "
                          "train.epochs) or a number of optimizer steps >= 0")
    _check_strategy(cfg)
    _check_tracking(cfg)
    _check_writable(cfg.cache_dir, "cache_dir", "the tokenized data, the simulated steps' "
                    "estimates and the models' downloads")
    checks.check(cfg.data)


def _check_writable(folder: str, key: str, holds: str) -> None:
    """ConfigError where `folder` cannot be made, or written in, by this user."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ConfigError(f"{key}={folder} is not a folder this user can write in "
                          f"({type(error).__name__}: {error.strerror}); it holds {holds}: "
                          f"choose another ({key}=/path/to/a/folder) or fix its permissions"
                          ) from None


def _check_strategy(cfg: DictConfig) -> None:
    strategy = cfg.strategy
    for key in ("strategy.nproc_per_node", "strategy.nnodes"):
        _check_positive(cfg, key, integer=True)
    _check_positive(cfg, "strategy.timeout_s")
    if strategy.name == "single" and strategy.nproc_per_node * strategy.nnodes != 1:
        raise ConfigError(f"strategy=single runs one process, and strategy.nproc_per_node="
                          f"{strategy.nproc_per_node} / strategy.nnodes={strategy.nnodes} ask for "
                          "more: choose strategy=ddp, fsdp, zero2 or zero3 to run ranks")
    if strategy.node_rank is not None and not 0 <= strategy.node_rank < strategy.nnodes:
        raise ConfigError(f"strategy.node_rank={strategy.node_rank}; expected 0 to "
                          f"{strategy.nnodes - 1} (strategy.nnodes={strategy.nnodes}), or null "
                          "(from the SLURM job)")
    if strategy.name in DEEPSPEED_STRATEGIES:
        if strategy.stage not in (2, 3):
            raise ConfigError(f"strategy.stage={strategy.stage!r}; expected 2 (optimizer state "
                              "and gradients sharded) or 3 (weights too)")
        if strategy.offload_param and strategy.stage != 3:
            raise ConfigError("strategy.offload_param=true needs strategy.stage=3: only ZeRO-3 "
                              "shards the weights it would keep on the host; use strategy="
                              "zero3_offload, or strategy.offload_optimizer=true alone")


def _check_tracking(cfg: DictConfig) -> None:
    """The store's address, and the runner's timings of claims, heartbeats and the journal."""
    uri = cfg.tracking.uri
    parts = urllib.parse.urlsplit(uri)
    if not (uri.startswith("sqlite:///") and len(uri) > len("sqlite:///")) \
            and parts.scheme not in ("http", "https"):
        raise ConfigError(f"tracking.uri={uri!r}; expected sqlite:///<file> (tracking=local) or "
                          "the http(s):// address of an MLflow server (tracking=server)")
    if parts.password is not None or parts.username is not None:
        shown = uri.replace(parts.netloc, f"***@{parts.hostname}"
                                          + (f":{parts.port}" if parts.port else ""))
        raise ConfigError(f"tracking.uri={shown} has credentials inside it, which every run "
                          "would log as a param; give the address alone and the credentials "
                          "in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    for key in ("runner.heartbeat_s", "runner.stale_after_s"):
        _check_positive(cfg, key)
    if cfg.runner.stale_after_s <= 2 * cfg.runner.heartbeat_s:
        raise ConfigError(f"runner.stale_after_s={cfg.runner.stale_after_s} is not more than "
                          f"twice runner.heartbeat_s={cfg.runner.heartbeat_s}: live runs on other "
                          "hosts would be closed as vanished; raise stale_after_s")
    for key in ("runner.claim_settle_s", "tracking.deliver_wait_s"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{key}={value!r}; expected a number of seconds >= 0")


def _check_known_keys(cfg: DictConfig) -> None:
    """Refuse a key that no option of its group has (`+method.rank=4`): nothing would read it,
    and the cell would run with the default it meant to change."""
    for group in (*CELL_GROUPS, *OTHER_GROUPS):
        known = _group_keys(group)
        for key in cfg[group]:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {group}.{close[0]}? " if close else ""
                raise ConfigError(f"{group}.{key}: no option of the {group} group has this key, "
                                  f"so nothing would read it; {hint}the keys of {group} are "
                                  f"{', '.join(sorted(known))}")


@functools.cache
def _group_keys(group: str) -> set:
    """Every top-level key of the options of a config group (conf/<group>/*.yaml), and its
    nested groups (conf/data/template/)."""
    folder = CONF_DIR / group
    return ({key for path in folder.glob("*.yaml") for key in OmegaConf.load(path)
             if key != "defaults"} | {path.name for path in folder.iterdir() if path.is_dir()})


def _check_positive(cfg: DictConfig, key: str, integer: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    kind = "integer" if integer else "number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
            or value <= 0:
        raise ConfigError(f"{key}={value!r}; expected a positive {kind}")
