"""Every configuration key, declared once: its type, its range or choices, its default and what
it means (how: harness/config/declared.py; the groups of what a cell trains, model, method,
precision and data, in harness/config/cell_schema.py; the others and the top level here). Hydra's
structured configs: the dataclasses are registered in its ConfigStore as
`schema/<group>/<kind>`, and each option of a group (conf/<group>/<option>.yaml) starts from
its kind's schema (`defaults: [/schema/<group>@_here_: <kind>, _self_]`), so that Hydra types
every key while it composes (an integer key refuses 3.5). What types alone cannot say (a range, a
choice, a finite number, a flag given as anything but true or false, a key the option does not
have, added with `+`) is checked by harness/config/keys.py against the same declarations, before
torch is imported. Importing this module registers the schemas (harness/config/keys.py, and so
every entry point that composes, imports it).
docs/configuration.md is generated from here (`python -m harness.config.keys --markdown`).

Options keep the keys they had: a key joins only the kinds whose options have it, so that each
cell composes as it did and keeps its fingerprint (harness/config/identity.py).
"""

from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from harness.config.cell_schema import (
    ClassificationData,
    DollyData,
    FixtureData,
    FullMethod,
    GatedModelConfig,
    InstructionsData,
    Int8Precision,
    LocalData,
    LomoMethod,
    LoraLomoMethod,
    LoraMethod,
    ModelConfig,
    Nf4Precision,
    PrecisionConfig,
    SamsumData,
    SyntheticData,
    Template,
)
from harness.config.declared import flag, key, named
from harness.core.files import NAME_MAX, name_problem
from harness.core.options import OPTIMIZER_IMPLEMENTATIONS, START_METHODS


def _experiment(value) -> str | None:
    if name_problem(value) is None:
        return None
    return (f"a name of 1 to {NAME_MAX} letters, digits, spaces, '.', '_' or '-', not starting "
            "with a dot (it names the folder reports/<name>/)")


def _auto_or(kind: type, what: str):
    def check(value) -> str | None:
        if value == "auto" or value is None and kind is int:
            return None
        if kind is int and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return None
        if kind is bool and isinstance(value, bool):
            return None
        return what
    return check


# -- train, eval -------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    epochs: int = key(1, "passes over the training split", at_least=1)
    max_steps: Optional[int] = key(None, "optimizer steps; when set it ends training, whatever "
                                   "train.epochs says; null: train.epochs", at_least=0)
    batch_size: int = key(8, "examples per optimizer step (the global batch, split across "
                          "ranks)", at_least=1)
    grad_accum_steps: int = key(1, "micro-batches per optimizer step", at_least=1)
    lr: float = key("${method.lr}", "the learning rate (the method's unless set)", above=0)
    weight_decay: float = key(0.0, "AdamW's decoupled weight decay", at_least=0)
    warmup_steps: int = key(0, "linear warm-up steps", at_least=0)
    optimizer_impl: str = key("auto", "how torch's AdamW or SGD runs its update: auto (torch "
                              "picks: foreach on a GPU), foreach (whole-model temporaries), "
                              "for_loop (tensor by tensor) or fused (no temporaries)",
                              choices=OPTIMIZER_IMPLEMENTATIONS)
    max_grad_norm: Optional[float] = key(1.0, "gradient clipping's global norm; null: no "
                                         "clipping", above=0)
    gradient_checkpointing: Any = flag(False, "each block keeps only its inputs and recomputes "
                                       "its activations in backward")
    log_every_steps: int = key(1, "train_loss is logged every this many optimizer steps",
                               at_least=1)
    seed: int = key(42, "the data order and the model's dropout", at_least=0)
    throughput_skip_steps: int = key(3, "warm-up steps left out of the throughput and "
                                     "step-time figures", at_least=0)


@dataclass
class EvalConfig:
    num_beams: int = key(1, "beams in generation (1: greedy)", at_least=1)
    max_new_tokens: int = key(64, "generated tokens at most", at_least=1)
    batch_size: int = key(16, "examples per evaluation batch", at_least=1)
    max_samples: Optional[int] = key("${oc.select:data.eval_max_samples,null}",
                                     "the first N examples of a split in every evaluation "
                                     "pass; null: all", at_least=1)
    loss_max_batches: Any = key("auto", "batches of the eval loss pass at most; null: all; "
                                "auto: 1 for a memory-only cell on a CPU",
                                expect="auto, null or a positive integer",
                                check=_auto_or(int, "auto, null or a positive integer"))
    rouge_every_epoch: Any = flag(False, "ROUGE of the validation split after every epoch")
    infer: Any = key("auto", "the inference benchmark after evaluation: true, false, or auto "
                     "(off for a memory-only cell on a CPU)", expect="true, false or auto",
                     check=_auto_or(bool, "true, false or auto"))
    infer_batch_size: int = key(8, "the inference benchmark's batch", at_least=1)
    infer_examples: int = key(32, "the inference benchmark's examples", at_least=1)
    infer_new_tokens: int = key(32, "new tokens per example in the inference benchmark",
                                at_least=1)


# -- strategy ----------------------------------------------------------------------------------

@dataclass
class StrategyConfig:
    name: str = named("single", "ddp")
    nproc_per_node: int = key(1, "ranks per node (torchrun's name)", at_least=1)
    nnodes: int = key(1, "nodes (torchrun's name)", at_least=1)
    timeout_s: float = key(1800, "a collective waiting longer than this ends the cell failed",
                           above=0)
    node_rank: Optional[int] = key(None, "this node's place among strategy.nnodes; null: from "
                                   "the SLURM job, else 0", at_least=0)
    master_addr: Optional[str] = key(None, "where the nodes' agents meet; null: the SLURM "
                                     "job's first host, else MASTER_ADDR, else this machine")
    master_port: int = key(29400, "the rendezvous port", at_least=1, at_most=65535)


@dataclass
class FsdpStrategy(StrategyConfig):
    name: str = named("fsdp", "fsdp_offload")
    reshard_after_forward: Any = flag(True, "free each gathered block after its forward "
                                      "(ZeRO-3's choice)")
    offload: Any = flag(False, "shards and optimizer state kept on the host")


@dataclass
class ZeroStrategy(StrategyConfig):
    name: str = named("zero2", "zero3", "zero3_offload")
    stage: int = key(2, "2: optimizer state and gradients sharded; 3: weights too",
                     choices=(2, 3))
    offload_optimizer: Any = flag(False, "optimizer state and step on the host")
    offload_param: Any = flag(False, "weights on the host (stage 3 only)")
    reduce_bucket_size: float = key(5.0e8, "elements per gradient reduction bucket", above=0)
    allgather_bucket_size: float = key(5.0e8, "stage 2: elements per weight all-gather bucket",
                                       above=0)
    stage3_prefetch_bucket_size: float = key(5.0e7, "stage 3: elements prefetched ahead",
                                             above=0)
    stage3_max_live_parameters: float = key(1.0e9, "stage 3: gathered elements kept before "
                                            "releasing any", above=0)
    stage3_param_persistence_threshold: float = key(1.0e5, "stage 3: a weight of fewer elements "
                                                    "is kept whole on every rank, not "
                                                    "partitioned (DeepSpeed's default)",
                                                    at_least=0)


# -- where and how: tracking, runner, sampler, cost, peaks -------------------------------------

@dataclass
class TrackingConfig:
    uri: str = key("sqlite:///mlflow.db", "the MLflow store: sqlite:///<file>, or the "
                   "http(s):// address of a server", expect="sqlite:///<file> or http(s)://")
    experiment: str = key("default", "the MLflow experiment the runs go to (and the folder of "
                          "its report)", expect="a name", check=_experiment)
    artifact_location: Optional[str] = key(None, "where a new experiment keeps its artifacts; "
                                           "null: the store's default")
    journal_dir: str = key(".harness/journal", "where each run is journaled before the store "
                           "takes it (make sync delivers what is left)")
    deliver_wait_s: float = key(60, "how long an ended run waits for a store that does not "
                                "answer", at_least=0)


@dataclass
class RunnerConfig:
    start_method: str = key("auto", "how a cell's fresh process starts: auto, forkserver or "
                            "spawn", choices=START_METHODS)
    cpu_memory_limit_mib: Optional[float] = key(None, "caps a cell's address space; over it "
                                                "the cell ends as oom", above=0)
    gpus: Optional[list[str]] = key(None, "GPUs cells may use (indices or UUIDs); null: "
                                    "CUDA_VISIBLE_DEVICES, else every GPU")
    gpu_lock_dir: str = key("/tmp/harness-gpus", "one lock file per GPU, shared by every sweep "
                            "on this machine")
    heartbeat_s: float = key(60, "how often a running cell's run says it is alive", above=0)
    stale_after_s: float = key(600, "a RUNNING run whose heartbeat is older is closed as "
                               "killed", above=0)
    claim_settle_s: float = key(2.0, "how long a claim through a server waits before it reads "
                                "the others back", at_least=0)


@dataclass
class SamplerConfig:
    enabled: Any = flag(True, "false: no memory sampler (the overhead benchmark's baseline)")
    interval_ms: float = key(10, "the sampling interval where the cell trains on a GPU",
                             above=0)
    cpu_interval_ms: float = key(50, "the sampling interval where the cell trains on the CPU: "
                                 "its threads take every core, and each wake-up of the sampler "
                                 "takes time from them (the host peaks are the kernel's "
                                 "high-water marks at any interval)", above=0)
    metric_max_points: int = key(2000, "points of the gpu_mib / cpu_mib series in MLflow",
                                 at_least=1)
    csv_max_rows: int = key(100000, "rows of memory_trace.csv at most", at_least=1)


@dataclass
class CostConfig:
    usd_per_hour: Optional[float] = key(None, "the price of a GPU-hour in US dollars", above=0)
    instance: Optional[str] = key(None, "an instance of cost.prices whose price applies")
    prices: dict[str, Any] = key({}, "instances: {usd_per_hour, gpu}")


@dataclass
class PeaksConfig:
    launch_us: float = key(10, "the host's time to dispatch one op and launch its kernel",
                           above=0)
    gpus: dict[str, Any] = key({}, "per GPU: dense TFLOP/s per dtype, memory bandwidth, and "
                               "the links to other GPUs (link_gbs) and the host (host_gbs), GB/s")
    internode_gbs: float = key(12.5, "GB/s between nodes, per direction (100 Gb/s Ethernet or "
                               "EFA; 400 Gb/s InfiniBand: 50)", above=0)
    calibrations: list[str] = key(["reports/gpu-*/calibration"],
                                  "folders (glob patterns, from the project's folder) of GPU "
                                  "calibrations measured elsewhere (make gpu-check's), beside "
                                  "the user's cache: a GPU not at hand is priced by the nearest "
                                  "of them, scaled by the peaks")


@dataclass
class PlanGpu:
    name: str = key(MISSING, "the GPU's name in the plan")
    memory_mib: int = key(MISSING, "its memory as nvidia-smi shows it", at_least=1)
    nvml_name: Optional[str] = key(None, "the name NVML gives it (its peaks and price)")


@dataclass
class Config:
    """The top level: the groups, and the keys of a whole run."""

    model: Any = MISSING
    method: Any = MISSING
    precision: Any = MISSING
    data: Any = MISSING
    train: Any = MISSING
    eval: Any = MISSING
    strategy: Any = MISSING
    tracking: Any = MISSING
    runner: Any = MISSING
    sampler: Any = MISSING
    cost: Any = MISSING
    peaks: Any = MISSING
    requires_gpu: Any = flag(False, "the experiment is meant for a GPU: refused without CUDA "
                             "unless allow_cpu")
    allow_cpu: Any = flag(False, "run an experiment meant for a GPU on this machine anyway")
    plan_gpu: Optional[PlanGpu] = key(None, "the GPU the plan compares estimates with on a "
                                      "machine without one")
    force: Any = flag(False, "rerun cells that finished already")
    cache_dir: str = key(".cache/harness", "tokenized data, simulated steps' estimates, "
                         "downloads")
    tables: dict[str, Any] = key({}, "an experiment's own lookup tables, read by its "
                                 "interpolations (${tables.<name>...}); the harness reads none")


# Each group's kinds, by the name Hydra's ConfigStore knows them by (schema/<group>/<kind>).
KINDS = {
    "model": {"model": ModelConfig, "gated_model": GatedModelConfig},
    "method": {"full": FullMethod, "lomo": LomoMethod, "lora": LoraMethod,
               "lora_lomo": LoraLomoMethod},
    "precision": {"float": PrecisionConfig, "int8": Int8Precision, "nf4": Nf4Precision},
    "data": {"fixture": FixtureData, "instructions": InstructionsData,
             "synthetic": SyntheticData, "samsum": SamsumData, "local": LocalData,
             "dolly_ja": DollyData, "twitter_complaints": ClassificationData},
    "train": {"train": TrainConfig},
    "eval": {"eval": EvalConfig},
    "strategy": {"single": StrategyConfig, "fsdp": FsdpStrategy, "zero": ZeroStrategy},
    "tracking": {"tracking": TrackingConfig},
    "runner": {"runner": RunnerConfig},
    "sampler": {"sampler": SamplerConfig},
    "cost": {"cost": CostConfig},
    "peaks": {"peaks": PeaksConfig},
}
GROUPS = tuple(KINDS)


def register() -> None:
    """Make the schemas known to Hydra (idempotent: the ConfigStore keeps the last)."""
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    for group, kinds in KINDS.items():
        for name, node in kinds.items():
            store.store(group=f"schema/{group}", name=name, node=node)
    store.store(group="schema/data/template", name="template", node=Template)


register()
