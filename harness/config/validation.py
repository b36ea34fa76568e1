"""A composed config checked before any work: each key against its declaration
(harness/config/keys.py), then what no single key's declaration can say, each rule once: the
combinations of method, precision and strategy, what this machine can run, and the files and
stores the run will write to.
"""

import importlib.util
import os
import re
import tempfile
import urllib.parse
from pathlib import Path

from omegaconf import DictConfig

from harness.config import cost, keys
from harness.core.errors import ConfigError, shown
from harness.core.options import (
    ADAPTER_METHODS,
    FUSED_METHODS,
    HALF_PRECISIONS,
    PAGED_OPTIMIZERS,
    QUANTIZED,
)
from harness.data import checks
from harness.measure import gpus
from harness.strategy import registry
from harness.strategy.sizes import world_size


def invalid_cell_reason(cfg: DictConfig) -> str | None:
    """Why this combination cannot run at all, or None. Sweeps record such cells as skipped."""
    method, precision = cfg.method.name, cfg.precision.name
    if precision in QUANTIZED and method != "lora":
        return (f"method={method} updates the base weights, which precision={precision} stores "
                f"quantized and cannot update: use method=lora with {precision}, or "
                "precision=fp32 / bf16 / fp16 with this method")
    master_reason = _master_weights_reason(cfg) or _autocast_reason(cfg)
    if master_reason:
        return master_reason
    targets = cfg.method.get("target_modules")
    known = cfg.model.get("lora_targets")
    if method in ADAPTER_METHODS and known and not set(targets) <= set(known):
        return (f"method.target_modules={shown(list(targets))} names modules that model="
                f"{cfg.model.name} ({cfg.model.architecture.model_type}) does not have: its LoRA "
                f"targets are {', '.join(known)} (default {list(cfg.model.default_lora_targets)})")
    if cfg.model.family == "seq2seq" and cfg.data.get("train_on_inputs"):
        return (f"data.train_on_inputs=true is for causal models, whose labels are the prompt and "
                f"the response; model={cfg.model.name} is seq2seq, whose labels are the target "
                "alone: set data.train_on_inputs=false, or use a causal model")
    if cfg.train.optimizer_impl != "auto" and cfg.method.optimizer not in ("adamw", "sgd"):
        return (f"train.optimizer_impl={cfg.train.optimizer_impl} picks how torch's AdamW or SGD "
                f"runs its update; method.optimizer={cfg.method.optimizer} is bitsandbytes', "
                "which has one implementation: set train.optimizer_impl=auto, or "
                "method.optimizer=adamw")
    if method in FUSED_METHODS and cfg.train.grad_accum_steps != 1:
        return (f"method={method} updates each base weight inside backward and frees its "
                "gradient, so gradients cannot accumulate over micro-batches "
                f"(train.grad_accum_steps={cfg.train.grad_accum_steps}): set "
                "train.grad_accum_steps=1 and raise train.batch_size instead")
    return _strategy_reason(cfg)


def _strategy_reason(cfg: DictConfig) -> str | None:
    """Why the cell's strategy cannot train it, or None: the ranks must share the global batch,
    and the rest is the engine's own rules (harness/strategy/<engine>/plan.py)."""
    world = world_size(cfg.strategy)
    if cfg.train.batch_size % world:
        return (f"{world} ranks (strategy.nproc_per_node={cfg.strategy.nproc_per_node} x "
                f"strategy.nnodes={cfg.strategy.nnodes}) do not divide train.batch_size="
                f"{cfg.train.batch_size}, the global batch each step splits between them: use a "
                "number of ranks that divides it, or a batch size they divide")
    return registry.plan(cfg.strategy.name).reason(cfg)


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


def _autocast_reason(cfg: DictConfig) -> str | None:
    """Why precision.autocast=false cannot run this cell, or None: it is the style of a half
    base under float32 adapters, with nothing else to compute in half."""
    precision = cfg.precision
    if precision.get("autocast", True):
        return None
    if precision.name not in HALF_PRECISIONS:
        return (f"precision.autocast=false with precision={precision.name}: only bf16 and fp16 "
                "compute under autocast; leave precision.autocast=true")
    if cfg.method.name not in ADAPTER_METHODS:
        return (f"precision.autocast=false is a half base under float32 adapters (peft's own "
                f"scripts); method={cfg.method.name} trains float32 weights, which would then "
                f"compute in float32 (precision=fp32): use method=lora, or "
                "precision.autocast=true")
    if not precision.master_weights:
        return ("precision.autocast=false keeps the adapters in float32 beside a half base; "
                "with precision.master_weights=false they are half too and nothing is left to "
                "cast: drop one of the two")
    return None


def machine_reason(cfg: DictConfig, cuda: bool) -> str | None:
    """Why this machine cannot run the cell, or None (the plan still estimates it for a GPU)."""
    package = getattr(registry.plan(cfg.strategy.name), "REQUIRES", None)
    if package is not None and importlib.util.find_spec(package) is None:
        return (f"strategy={cfg.strategy.name} runs {package}'s engine, which is not installed "
                f"here: pip install {package} (or make install), or use strategy=fsdp")
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


def validate(cfg: DictConfig, sweep: bool = False) -> None:
    """Raise ConfigError naming the bad value, what was expected and what to do: first every key
    against its declaration (harness/config/keys.py: types, ranges, choices, unknown keys), then
    the rules between keys, then the files and stores the run will use. `sweep`: a grid point
    of a sweep (a LoRA key on a method without adapters is the sweep's rank axis)."""
    keys.check(cfg, sweep)
    if cfg.model.source == "hub" and not cfg.model.hub_id:
        raise ConfigError(f"model={cfg.model.name} has model.source=hub but no model.hub_id: "
                          "set model.hub_id, or use model.source=random to build it offline")
    if cfg.method.name == "lomo" and cfg.method.optimizer != "sgd":
        raise ConfigError(f"method=lomo with method.optimizer={cfg.method.optimizer!r}: LOMO "
                          "updates every weight by SGD inside backward; use method.optimizer=sgd, "
                          "or method=full for AdamW")
    if cfg.method.name in ADAPTER_METHODS and not cfg.method.target_modules:
        raise ConfigError("method.target_modules is empty; expected module names such as "
                          "[q,v] (T5 attention: q, k, v, o; feed-forward: wi_0, wi_1, wo; "
                          "GPT-NeoX and BLOOM: query_key_value, dense, ...)")
    cost.check(cfg.cost)
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
    if strategy.node_rank is not None and not 0 <= strategy.node_rank < strategy.nnodes:
        raise ConfigError(f"strategy.node_rank={strategy.node_rank}; expected 0 to "
                          f"{strategy.nnodes - 1} (strategy.nnodes={strategy.nnodes}), or null "
                          "(from the SLURM job)")
    registry.plan(strategy.name).check(strategy)


def _check_tracking(cfg: DictConfig) -> None:
    """The store's address and file, where the runs' journal and artifacts go, and the runner's
    timings of heartbeats: each refused before any run exists, so that none is left RUNNING."""
    uri = cfg.tracking.uri
    parts = urllib.parse.urlsplit(uri)
    shown_uri = masked(uri)
    if parts.password is not None or parts.username is not None:
        raise ConfigError(f"tracking.uri={shown_uri} has credentials inside it, which every run "
                          "would log as a param; give the address alone and the credentials "
                          "in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if uri.startswith("sqlite:///") and len(uri) > len("sqlite:///"):
        _check_sqlite_store(Path(uri.removeprefix("sqlite:///")), uri)
    elif parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"tracking.uri={shown(uri)!r}; expected sqlite:///<file> "
                          "(tracking=local) or the http(s):// address of an MLflow server "
                          "(tracking=server)")
    if cfg.runner.stale_after_s <= 2 * cfg.runner.heartbeat_s:
        raise ConfigError(f"runner.stale_after_s={cfg.runner.stale_after_s} is not more than "
                          f"twice runner.heartbeat_s={cfg.runner.heartbeat_s}: live runs on other "
                          "hosts would be closed as vanished; raise stale_after_s")
    _check_writable(cfg.tracking.journal_dir, "tracking.journal_dir", "each run's journal, "
                    "written before the store takes it")
    location = cfg.tracking.artifact_location
    if location is not None and urllib.parse.urlsplit(location).scheme in ("", "file"):
        _check_writable(urllib.parse.urlsplit(location).path, "tracking.artifact_location",
                        "a new experiment's artifacts")


# The first bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"


def _check_sqlite_store(path: Path, uri: str) -> None:
    """ConfigError where the sqlite store cannot be a database this user writes: a folder, a
    file of another kind, a file or folder without write permission."""
    if path.is_dir():
        raise ConfigError(f"tracking.uri={shown(uri)} names a folder; expected the path of an "
                          f"sqlite file (it is made if missing): e.g. tracking.uri=sqlite:///"
                          f"{path / 'mlflow.db'}")
    if path.exists():
        try:
            with open(path, "rb") as file:
                header = file.read(len(SQLITE_HEADER))
        except OSError as error:
            raise ConfigError(f"tracking.uri={shown(uri)} cannot be read ({error.strerror}); "
                              "expected an sqlite file this user can read and write: fix its "
                              "permissions or choose another") from None
        if header and header != SQLITE_HEADER:
            raise ConfigError(f"tracking.uri={shown(uri)} is not an SQLite database (it starts "
                              f"with {header[:8]!r}); expected an MLflow sqlite store or a new "
                              "file: choose another path")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"tracking.uri={shown(uri)} is read-only for this user; "
                              "expected an sqlite file it can write: fix its permissions "
                              f"(chmod u+w {path}) or choose another")
    _check_writable(str(path.parent), "tracking.uri", "the sqlite store (and its lock file)")


def masked(uri: str) -> str:
    """`uri` with any user and password in it replaced by ***."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return shown(uri)
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return shown(urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}")))


# scheme://user[:password]@host anywhere in a command line argument.
CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s@]+@")


def check_arguments(arguments: list[str]) -> None:
    """ConfigError for a command-line argument with credentials inside a URI, before Hydra
    writes the overrides into its output folder (.hydra/) where others may read them."""
    for argument in arguments:
        found = CREDENTIALS.search(argument)
        if found:
            key, _, value = argument.partition("=")
            raise ConfigError(f"{key.lstrip('+')}={masked(value)}: an argument holds "
                              "credentials inside a URI, which would be written to the run's "
                              "folder and logged; give the address alone and the credentials in "
                              "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or the "
                              "store's own variables)")
