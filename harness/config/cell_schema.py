"""The schema of what a cell trains: the model, the method, the precision and the data groups
(harness/config/schema.py has the rest, the top level and the registration with Hydra)."""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING

from harness.config.declared import flag, key, named
from harness.core.options import (
    ATTENTION,
    FAMILIES,
    MODEL_SOURCES,
    NF4_OPTIONS,
    OPTIMIZERS,
    PERCENTILE,
    QUANT_STORAGES,
    TOKENIZERS,
)


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
