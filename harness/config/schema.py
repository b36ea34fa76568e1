"""Every configuration key, declared once: its type, its range or choices, its default and what
it means. Hydra's structured configs: the dataclasses are registered in its ConfigStore as
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

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from harness.core.files import NAME_MAX, name_problem
from harness.core.options import (
    ATTENTION,
    FAMILIES,
    MODEL_SOURCES,
    NF4_OPTIONS,
    OPTIMIZER_IMPLEMENTATIONS,
    OPTIMIZERS,
    PERCENTILE,
    QUANT_STORAGES,
    START_METHODS,
    TOKENIZERS,
)


def key(default: Any, meaning: str, *, choices=None, at_least=None, above=None, at_most=None,
        below=None, expect: str | None = None, check=None):
    """A declared key: its default and what it means; `choices`, or a range (`at_least` /
    `above`, `at_most` / `below`), or `expect` (what a free-form key holds) with `check`: a
    function of the value that says what is wrong with it, or None."""
    metadata = {"meaning": meaning, "choices": choices, "at_least": at_least, "above": above,
                "at_most": at_most, "below": below, "expect": expect, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default.copy(), metadata=metadata)
    return field(default=default, metadata=metadata)


def flag(default: bool, meaning: str):
    """A key that is true or false, and nothing else: OmegaConf would read `no`, `off` or `0`
    given for a flag as false, which is not what everyone who types them means."""
    return key(default, meaning, expect="true or false", check=_flag)


def _flag(value) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def named(*names: str):
    """The `name` key of a kind whose options are `names` (it says which option composed it)."""
    return key(MISSING, "the option's name, as the group's choice gives it", choices=names)


def _length(value) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return None
    found = PERCENTILE.fullmatch(value) if isinstance(value, str) else None
    if found and 0 < float(found.group(1)) <= 100:
        return None
    return ("a positive number of tokens (e.g. 512) or a percentile of the tokenized lengths "
            "from p1 to p100 (e.g. p85; p100 is the longest example)")


def _source(value) -> str | None:
    if value in MODEL_SOURCES or Path(value).is_dir():
        return None
    return "hub, random, or an existing folder with a saved model"


def _names(value) -> str | None:
    if value is None or isinstance(value, Mapping) and all(
            isinstance(name, str) and isinstance(found, str) for name, found in value.items()):
        return None
    return "null or a mapping of column names ({dialogue: text})"


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


# -- model -------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    name: str = key(MISSING, "the model's name in runs and reports (conf/model/<name>.yaml)")
    family: str = key(MISSING, "seq2seq (encoder-decoder, T5) or causal (decoder-only)",
                      choices=FAMILIES)
    source: str = key("hub", "where the weights come from: hub, random (the architecture with "
                      "random weights, offline), or the folder of a saved model",
                      expect="hub, random, or an existing folder", check=_source)
    hub_id: Optional[str] = key(None, "the Hugging Face repository of the weights and tokenizer")
    revision: Optional[str] = key("main", "the hub revision; pin a commit sha for a "
                                  "reproducible study")
    tokenizer: str = key("auto", "auto: the model's own (byte-level for random weights); byte; "
                         "hub", choices=TOKENIZERS)
    seed: int = key(0, "initialises random weights (model.source=random)", at_least=0)
    attn_implementation: str = key("sdpa", "sdpa (PyTorch's fused kernels) or eager (matmul and "
                                   "softmax, keeping the probabilities for backward)",
                                   choices=ATTENTION)
    lora_targets: list[str] = key([], "the modules LoRA can target in this architecture")
    default_lora_targets: list[str] = key([], "the modules method=lora targets unless "
                                          "method.target_modules says")
    architecture: dict[str, Any] = key({}, "the transformers config fields (its config.json), "
                                       "so that model.source=random builds it offline")


@dataclass
class GatedModelConfig(ModelConfig):
    gated: Any = flag(False, "whether the hub asks for an accepted licence and a token")


# -- method ------------------------------------------------------------------------------------

@dataclass
class MethodConfig:
    optimizer: str = key("adamw", "the optimizer of the trained weights: adamw, sgd, or "
                         "bitsandbytes' adamw_8bit, paged_adamw_8bit, paged_adamw_32bit",
                         choices=OPTIMIZERS)
    lr: float = key(MISSING, "the learning rate; train.lr follows it unless set", above=0)


@dataclass
class FullMethod(MethodConfig):
    name: str = named("full")


@dataclass
class LomoMethod(MethodConfig):
    name: str = named("lomo")


@dataclass
class AdapterKeys:
    r: int = key(8, "LoRA's rank", at_least=1)
    alpha: int = key(16, "LoRA's scale numerator (the update is scaled by alpha / r)",
                     at_least=1)
    dropout: float = key(0.05, "dropout on the adapters' input", at_least=0, below=1)
    target_modules: list[str] = key("${model.default_lora_targets}",
                                    "the modules that get adapters (the model's by default)")


@dataclass
class LoraMethod(MethodConfig, AdapterKeys):
    name: str = named("lora")


@dataclass
class LoraLomoMethod(MethodConfig, AdapterKeys):
    name: str = named("lora_lomo")
    lr_lora: float = key(1.0e-3, "the adapters' learning rate", above=0)
    lr_base: float = key(1.0e-3, "the base weights' SGD rate (LOMO)", above=0)


# -- precision ---------------------------------------------------------------------------------

@dataclass
class PrecisionConfig:
    name: str = named("fp32", "bf16", "fp16")
    master_weights: Any = flag(True, "bf16 / fp16: trained weights kept in float32 under "
                               "autocast (true) or trained in the half dtype itself (false)")
    autocast: Any = flag(True, "bf16 / fp16: compute under autocast (true); false: no autocast, "
                         "peft's own scripts' style for adapters: a half base, float32 adapters, "
                         "each adapter's input cast to float32 by peft")


@dataclass
class Quantized:
    unquantized_dtype: str = key("auto", "the dtype the layers bitsandbytes leaves unquantized "
                                 "(embeddings, norms, the head) train in: auto, peft's k-bit "
                                 "preparation (loaded in the checkpoint's dtype, cast to float32 "
                                 "for training, as the study's recipe); or fp32, bf16, fp16, "
                                 "loaded and kept in it (QLoRA recipes that shard: bf16)",
                                 choices=("auto", "fp32", "bf16", "fp16"))


@dataclass
class Int8Precision(PrecisionConfig, Quantized):
    name: str = named("int8")
    llm_int8_threshold: float = key(6.0, "LLM.int8's outlier threshold: activations above it "
                                    "run in 16 bits", at_least=0)


@dataclass
class Nf4Precision(PrecisionConfig, Quantized):
    name: str = named("nf4")
    quant_type: str = key("nf4", "nf4 (4-bit NormalFloat, QLoRA's) or fp4",
                          choices=NF4_OPTIONS["quant_type"])
    double_quant: Any = flag(True, "quantize the per-block scales too")
    compute_dtype: str = key("bf16", "the dtype each matmul runs in",
                             choices=NF4_OPTIONS["compute_dtype"])
    quant_storage: str = key("auto", "the dtype the packed 4-bit values are stored as (the bytes "
                             "are the same): uint8, or a float dtype that FSDP and ZeRO-3 can "
                             "shard; auto: uint8, and the compute dtype under a strategy that "
                             "shards the weights (PEFT's FSDP-QLoRA recipe)",
                             choices=QUANT_STORAGES)


# -- data --------------------------------------------------------------------------------------

@dataclass
class Lengths:
    source_max_length: Any = key(512, "the sources' cut in tokens, or a percentile of the "
                                 "tokenized lengths of train and test (p85; p100: the longest)",
                                 expect="tokens or pNN", check=_length)
    target_max_length: Any = key(128, "the targets' cut, as source_max_length",
                                 expect="tokens or pNN", check=_length)
    padding: str = key("longest", "longest: each batch padded to its longest example; "
                       "max_length: every example padded to the cut",
                       choices=("longest", "max_length"))


@dataclass
class Text:
    prefix: str = key("summarize: ", "put before every source")


@dataclass
class Seeded:
    seed: int = key(0, "the seed that draws the examples, or splits a single table 80 / 10 / 10",
                    at_least=0)


@dataclass
class Drawn(Seeded):
    train_size: int = key(400, "training examples drawn", at_least=1)
    validation_size: int = key(50, "validation examples drawn", at_least=1)
    test_size: int = key(50, "test examples drawn", at_least=1)


@dataclass
class Template:
    prompt: str = key(MISSING, "the prompt of an example with an input ({instruction}, "
                      "{input}; {text} for classification)")
    prompt_no_input: str = key(MISSING, "the prompt of an example without one")


@dataclass
class Instructions:
    format: str = key("instruction", "the columns of the rows: summary (id, dialogue, "
                      "summary), instruction (instruction, input, output, optional id) or "
                      "classification (text_column, label_column)",
                      choices=("summary", "instruction", "classification"))
    train_on_inputs: Any = flag(False, "causal models: learn the prompt too")
    rouge_unit: str = key("words", "ROUGE's unit: words, or characters for languages without "
                          "spaces", choices=("words", "characters"))
    template: Template = key(MISSING, "the prompt template (conf/data/template/)")


@dataclass
class FromHub:
    hub_id: str = key(MISSING, "the Hugging Face dataset repository")
    revision: Optional[str] = key("main", "the hub revision; pin a commit sha for a "
                                  "reproducible study")


@dataclass
class FixtureData(Lengths, Drawn, Text):
    name: str = named("fixture")


@dataclass
class InstructionsData(Lengths, Drawn, Text, Instructions):
    name: str = named("instructions")


def _length_percentiles(value) -> str | None:
    """What is wrong with data.length_percentiles, or None: per side (source, target), lengths
    of at least 2 at percentiles p0-p100, not falling as the percentile rises."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != {"source", "target"}:
        return "a mapping with a source and a target"
    for side, points in value.items():
        if not isinstance(points, Mapping):
            return f"{side}: percentiles named p0-p100"
        try:
            pairs = sorted((float(str(name).removeprefix("p")), length)
                           for name, length in points.items())
        except (AttributeError, ValueError):
            return f"{side}: percentiles named p0-p100"
        if not pairs or any(not 0 <= at <= 100 for at, _ in pairs):
            return f"{side}: percentiles named p0-p100"
        lengths = [length for _, length in pairs]
        if any(not isinstance(length, int) or length < 2 for length in lengths):
            return f"{side}: lengths as whole numbers of tokens, at least 2"
        if lengths != sorted(lengths) or pairs[-1][0] != 100:
            return f"{side}: lengths that rise with the percentile, up to p100 (the longest)"
    return None


@dataclass
class SyntheticData(Lengths, Drawn):
    name: str = named("synthetic")
    source_length_median: float = key(136.5, "the drawn sources' median length", above=0)
    target_length_median: float = key(23.5, "the drawn targets' median length", above=0)
    length_sigma: float = key(0.6, "the log-normal lengths' sigma", above=0)
    longest_source: int = key(512, "the longest source drawn", at_least=2)
    longest_target: int = key(95, "the longest target drawn", at_least=2)
    length_percentiles: Any = key(None, "a source's length distribution instead of the "
                                  "log-normal: {source: {p50: 120, p90: 300, p100: 512}, target: "
                                  "{...}}, lengths drawn between the percentiles given (p0: 2 "
                                  "unless given); null: the log-normal above",
                                  expect="null, or percentiles (p0-p100) of source and target "
                                         "lengths, rising", check=_length_percentiles)
    eval_max_samples: int = key(64, "eval.max_samples' default for this data", at_least=1)


@dataclass
class SamsumData(Lengths, FromHub, Text):
    name: str = named("samsum")
    expected_sizes: dict[str, int] = key({}, "the split sizes the hub copy must have")
    published_lengths: dict[str, Any] = key({}, "published percentiles of the tokenized "
                                            "lengths, used by the plan until measured here")


@dataclass
class LocalData(Lengths, Seeded, Text, Instructions):
    name: str = named("local")
    path: Optional[str] = key(None, "a csv, json(l) or parquet file, or a folder of train / "
                              "validation / test files")
    columns: Any = key(None, "the file's column for each column data.format reads, where the "
                       "names differ: {dialogue: text, summary: headline}; null: the same names",
                       expect="null or a mapping of names", check=_names)


@dataclass
class DollyData(Lengths, Seeded, Text, Instructions, FromHub):
    name: str = named("dolly_ja")


@dataclass
class ClassificationData(Lengths, Seeded, Text, Instructions, FromHub):
    name: str = named("twitter_complaints")
    subset: str = key(MISSING, "the dataset's subset")
    text_column: str = key(MISSING, "the column of the text")
    label_column: str = key(MISSING, "the column of the label (its name is the target)")


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
    interval_ms: float = key(10, "the sampling interval", above=0)
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
