"""Datasets: the splits a data config names, rendered as source and target texts, cut and padded
as it says, tokenised once per tokenizer and model family, and cached on disk.

Every text source yields a DatasetDict with splits train / validation / test in one of three
formats (data.format): `summary` (id, dialogue, summary: samsum, fixture, local), `instruction`
(instruction, input, output: dolly_ja, instructions, local) and `classification` (a text and a
class label: twitter_complaints). `pairs` renders each as id / source / target: a dialogue and
its summary; an instruction and input through data.template's prompt and the output; a text
through data.template and the label's name. A model's family (harness/families.py) then turns
a pair into token ids. `synthetic` yields token ids shaped like SAMSum directly.

Sources and targets are cut at data.source_max_length / target_max_length: a number of tokens, or
a percentile of the tokenized lengths (`p85`), measured as the public flan-t5 SAMSum recipes
measure it: the dialogues alone (no prefix) and the summaries, of train and test together, each
truncated at the tokenizer's model_max_length (512 for flan-t5). The lengths are measured once per
dataset and tokenizer and cached. data.padding says how batches are padded: `longest` (each batch
to its longest example) or `max_length` (every example to the cut, labels padded with -100, as
the recipes do).
"""

import hashlib
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset

from harness import fixture
from harness.errors import ConfigError

SPLITS = ("train", "validation", "test")
FORMATS = {"summary": ("id", "dialogue", "summary"),  # format: the columns its rows have
           "instruction": ("instruction", "input", "output"),
           "classification": ()}
PAIR = ("id", "source", "target")
LOCAL_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")
SIDES = {"source": "source_max_length", "target": "target_max_length"}  # side: its config key
PADDINGS = ("longest", "max_length")
PERCENTILE = re.compile(r"p(\d+(?:\.\d+)?)")
IGNORED_LABEL = -100  # what the loss skips: label padding, and a causal model's prompt
# T5's special ids: padding and end of sequence (synthetic data draws from the ids above them).
PAD_ID, EOS_ID = 0, 1


class Loaded(NamedTuple):
    text: DatasetDict | None   # id, source, target (see pairs); None for synthetic data
    splits: DatasetDict        # input_ids, attention_mask, labels
    lengths: dict              # the cut of each side in tokens: {"source": 255, "target": 50}


def has_text(data_cfg) -> bool:
    """Whether the data has summaries to score with ROUGE (synthetic data is token ids only)."""
    return data_cfg.name != "synthetic"


def check(data_cfg) -> None:
    """Cheap checks of the lengths, the padding and user-supplied data, run before any model is
    loaded."""
    for key in SIDES.values():
        percentile(data_cfg[key], f"data.{key}")
    if data_cfg.padding not in PADDINGS:
        raise ConfigError(f"data.padding={data_cfg.padding!r}; expected longest (each batch "
                          "padded to its longest example) or max_length (every example padded to "
                          "data.source_max_length / target_max_length, as the recipes do)")
    if data_cfg.get("format", "summary") not in FORMATS:
        raise ConfigError(f"data.format={data_cfg.format!r}; expected one of "
                          f"{', '.join(FORMATS)}")
    if data_cfg.name == "local":
        _read_local(data_cfg)


def percentile(spec, key: str = "the length") -> float | None:
    """85.0 for `p85`, None for a number of tokens; a ConfigError for anything else."""
    if isinstance(spec, int) and not isinstance(spec, bool) and spec > 0:
        return None
    found = PERCENTILE.fullmatch(spec) if isinstance(spec, str) else None
    if found and 0 < float(found.group(1)) <= 100:
        return float(found.group(1))
    raise ConfigError(f"{key}={spec!r}; expected a positive number of tokens (e.g. 512) or a "
                      "percentile of the tokenized lengths from p1 to p100 (e.g. p85; p100 is "
                      "the longest example)")


def cut(spec, lengths) -> int:
    """The length a side is cut at: the spec itself, or its percentile of `lengths` rounded down
    (as the recipes take int(np.percentile(...)))."""
    share = percentile(spec)
    return spec if share is None else int(np.percentile(lengths, share))


def load(data_cfg, model_cfg, tokenizer, cache_dir: str) -> Loaded:
    """The data a cell trains and evaluates on: text (if any), tokenised splits, resolved cuts."""
    from harness import families  # torch and peft: only a cell loading its data needs them

    family = families.of(model_cfg)
    if not has_text(data_cfg):
        lengths = resolve_lengths(data_cfg, lambda: synthetic_lengths(data_cfg))
        return Loaded(None, synthetic(data_cfg, len(tokenizer), lengths, family), lengths)
    text = pairs(load_text(data_cfg), data_cfg)
    lengths = resolve_lengths(data_cfg, lambda: token_lengths(text, tokenizer),
                              lengths_cache(data_cfg, model_cfg, cache_dir))
    return Loaded(text, tokenize(text, tokenizer, data_cfg, lengths, cache_dir, family), lengths)


def planned_lengths(data_cfg, model_cfg, cache_dir: str) -> tuple[dict | None, str]:
    """The cuts a cell will use, known before it runs: (lengths, where they come from), or
    (None, why not). Numbers need nothing. Percentiles come from the lengths measured here before
    (cached), else from measuring now where that downloads nothing (synthetic draws; fixture or
    local files under the byte tokenizer), else from the figures the data config publishes
    (data.published_lengths)."""
    specs = {side: data_cfg[key] for side, key in SIDES.items()}
    if all(percentile(spec) is None for spec in specs.values()):
        return specs, "config"
    if not has_text(data_cfg):
        return resolve_lengths(data_cfg, lambda: synthetic_lengths(data_cfg)), "synthetic draws"
    cache = lengths_cache(data_cfg, model_cfg, cache_dir)
    offline = data_cfg.name in ("fixture", "instructions", "local") and (
        tokenizer_identity(model_cfg) == "byte" or Path(model_cfg.source).is_dir())
    if cache.exists() or offline:
        from harness import models  # torch and transformers: only to measure now

        return resolve_lengths(data_cfg, lambda: token_lengths(
            pairs(load_text(data_cfg), data_cfg), models.load_tokenizer(model_cfg)),
            cache), "measured"
    published = data_cfg.get("published_lengths") or {}
    resolved = {}
    for side, spec in specs.items():
        resolved[side] = spec if percentile(spec) is None else published.get(side, {}).get(spec)
        if resolved[side] is None:
            return None, (f"data.{SIDES[side]}={spec} of {data_cfg.name} is not measured on "
                          "this machine yet; a first cell measures it")
    return resolved, "published"


def resolve_lengths(data_cfg, measure, cache: Path | None = None) -> dict:
    """{"source": tokens, "target": tokens}. Percentiles need the measured lengths: `measure()`
    gives them ({side: array}), read from / written to `cache` when one is given."""
    specs = {side: data_cfg[key] for side, key in SIDES.items()}
    if all(percentile(spec) is None for spec in specs.values()):
        return specs
    if cache is not None and cache.exists():
        with np.load(cache) as stored:
            measured = {side: stored[side] for side in SIDES}
    else:
        measured = measure()
        if cache is not None:  # written whole, then renamed: a parallel reader sees all or none
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(f"{cache.stem}.{os.getpid()}.partial.npz")
            np.savez(partial, **measured)
            partial.replace(cache)
    return {side: cut(spec, measured[side]) for side, spec in specs.items()}


def token_lengths(text: DatasetDict, tokenizer) -> dict:
    """Tokenized lengths of the sources (dialogues, without data.prefix) and targets of train and
    test together, each truncated at the tokenizer's model_max_length: what the recipes take
    percentiles of."""
    both = concatenate_datasets([text["train"], text["test"]])
    return {side: np.array([len(ids) for ids in
                            tokenizer(list(both[side]), truncation=True)["input_ids"]])
            for side in SIDES}


def lengths_cache(data_cfg, model_cfg, cache_dir: str) -> Path:
    """Where the measured lengths of this dataset under this model's tokenizer are kept; named
    from the config alone, so that a plan finds them without loading anything."""
    data_identity = {key: str(value) for key, value in data_cfg.items()
                     if key not in (*SIDES.values(), "padding")}
    identity = {"data": data_identity, "tokenizer": tokenizer_identity(model_cfg)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "lengths" / f"{key}.npz"


def tokenizer_identity(model_cfg) -> str:
    """Which tokenizer models.load_tokenizer gives for this model config, without loading it:
    `byte`, or where the model's own comes from."""
    choice = model_cfg.tokenizer
    if choice == "byte" or (choice == "auto" and model_cfg.source == "random"):
        return "byte"
    return f"{tokenizer_location(model_cfg)}@{model_cfg.revision}"


def tokenizer_location(model_cfg) -> str:
    # Random weights have no files of their own: their tokenizer=hub is model.hub_id's.
    return model_cfg.hub_id if model_cfg.source in ("hub", "random") else model_cfg.source


def load_text(data_cfg) -> DatasetDict:
    """The train / validation / test splits with the columns of data.format."""
    if data_cfg.name in ("fixture", "instructions"):
        make = fixture.make_rows if data_cfg.name == "fixture" else fixture.make_instruction_rows
        rows = fixture.make_splits(data_cfg.train_size, data_cfg.validation_size,
                                   data_cfg.test_size, data_cfg.seed, make)
        return DatasetDict({split: Dataset.from_list(rows[split]) for split in SPLITS})
    if data_cfg.name == "local":
        return _read_local(data_cfg)
    if data_cfg.get("hub_id"):
        return _load_hub(data_cfg)
    raise ConfigError(f"data={data_cfg.name} has no text and no data.hub_id; expected samsum, "
                      "dolly_ja, twitter_complaints, fixture, instructions or local")


def _load_hub(data_cfg) -> DatasetDict:
    """A hub dataset's splits; one with a train split only (dolly-15k, RAFT's labelled examples)
    is split 80 / 10 / 10 with data.seed, as a single local file is."""
    splits = load_dataset(data_cfg.hub_id, data_cfg.get("subset"), revision=data_cfg.revision)
    sizes = {split: len(splits[split]) for split in splits}
    expected = data_cfg.get("expected_sizes")
    if expected is not None and sizes != dict(expected):
        raise ConfigError(
            f"{data_cfg.hub_id}@{data_cfg.revision} has split sizes {sizes}, expected "
            f"{dict(expected)} ({data_cfg.name}): point data.hub_id / data.revision at a "
            "faithful copy")
    if not set(SPLITS) <= set(splits):
        return _split_whole(splits["train"], data_cfg.seed)
    return DatasetDict({split: splits[split] for split in SPLITS})


def pairs(text: DatasetDict, data_cfg) -> DatasetDict:
    """Every split as id / source / target texts, rendered as data.format says (the module's
    docstring)."""
    kind = data_cfg.get("format", "summary")

    def render(row: dict, index: int) -> dict:
        if kind == "summary":
            source, target = row["dialogue"], row["summary"]
        elif kind == "instruction":  # alpaca's two prompts: with an input, and without one
            prompt = data_cfg.template.prompt if row["input"].strip() else \
                data_cfg.template.prompt_no_input
            source, target = prompt.format(**row), row["output"]
        else:
            source = data_cfg.template.prompt.format(text=row[data_cfg.text_column])
            target = labels.int2str(row[data_cfg.label_column])
        return {"id": str(row.get("id", index)), "source": source, "target": target}

    rendered = {}
    for split in SPLITS:
        labels = text[split].features.get(data_cfg.get("label_column"))
        rendered[split] = text[split].map(render, with_indices=True,
                                          remove_columns=text[split].column_names,
                                          desc=f"rendering {split}")
    return DatasetDict(rendered)


def _read_local(data_cfg) -> DatasetDict:
    if not data_cfg.path:
        raise ConfigError("data=local needs data.path=<a csv, json or parquet file, or a folder "
                          "of train / validation / test files>")
    path = Path(data_cfg.path)
    if not path.exists():
        raise ConfigError(f"data.path={path} does not exist: expected a csv, json or parquet "
                          "file, or a folder of train / validation / test files")
    columns = FORMATS[data_cfg.get("format", "summary")]
    if path.is_dir():
        return DatasetDict({split: Dataset.from_pandas(
            _read_table(_split_file(path, split), columns), preserve_index=False)
            for split in SPLITS})
    return _split_whole(Dataset.from_pandas(_read_table(path, columns), preserve_index=False),
                        data_cfg.seed)


def _split_whole(whole: Dataset, seed: int) -> DatasetDict:
    """One table as 80 % train, 10 % validation, 10 % test, the same for the same seed."""
    train_rest = whole.train_test_split(test_size=0.2, seed=seed)
    validation_test = train_rest["test"].train_test_split(test_size=0.5, seed=seed)
    return DatasetDict({"train": train_rest["train"], "validation": validation_test["train"],
                        "test": validation_test["test"]})


def _split_file(folder: Path, split: str) -> Path:
    candidates = [p for p in sorted(folder.iterdir())
                  if p.stem == split and p.suffix in LOCAL_SUFFIXES]
    if len(candidates) != 1:
        raise ConfigError(f"data.path={folder} must hold exactly one {split} file "
                          f"({split}.csv, {split}.json, {split}.jsonl or {split}.parquet); "
                          f"found {[p.name for p in candidates] or 'none'}")
    return candidates[0]


def _read_table(path: Path, columns: tuple) -> pd.DataFrame:
    if path.suffix not in LOCAL_SUFFIXES:
        raise ConfigError(f"{path}: unsupported file type {path.suffix!r}; expected one of "
                          f"{', '.join(LOCAL_SUFFIXES)}")
    try:
        if path.suffix == ".csv":
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            table = pd.read_json(path, lines=path.suffix == ".jsonl", dtype=False)
    except (pd.errors.EmptyDataError, ValueError) as error:
        raise ConfigError(f"{path}: cannot be read as {path.suffix[1:]} ({error}); expected "
                          f"rows with columns {', '.join(columns)}") from error
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ConfigError(f"{path}: missing column {', '.join(missing)}; it has "
                          f"{', '.join(map(str, table.columns)) or 'no columns'}, expected "
                          f"{', '.join(columns)} (data.format)")
    if table.empty:
        raise ConfigError(f"{path}: the file is empty; expected rows with columns "
                          f"{', '.join(columns)}")
    kept = dict.fromkeys(column for column in ("id", *columns) if column in table)
    return table[list(kept)].astype(str)


def tokenize(text: DatasetDict, tokenizer, data_cfg, lengths: dict, cache_dir: str,
             family=None) -> DatasetDict:
    """input_ids / attention_mask / labels for every split, as the model's family encodes a pair
    (harness/families.py), cut at `lengths` and padded as data.padding says, cached per dataset,
    tokenizer and family (default: seq2seq).

    A sweep runs each cell in a fresh process; the cache file lets every cell after the first
    load the tokenised splits instead of tokenising again.
    """
    family = family or _seq2seq()
    key = _cache_key(data_cfg, tokenizer, family)
    folder = Path(cache_dir) / "tokenized"
    folder.mkdir(parents=True, exist_ok=True)
    prefix, pad = data_cfg.get("prefix", ""), data_cfg.padding == "max_length"

    def encode(batch):
        return family.encode(tokenizer, [prefix + source for source in batch["source"]],
                             batch["target"], lengths, pad, data_cfg.get("train_on_inputs", False))

    return DatasetDict({
        split: text[split].map(encode, batched=True, remove_columns=text[split].column_names,
                               cache_file_name=str(folder / f"{key}-{split}.arrow"),
                               desc=f"tokenising {split}")
        for split in SPLITS})


def _cache_key(data_cfg, tokenizer, family) -> str:
    identity = {"data": {key: str(value) for key, value in data_cfg.items()},
                "tokenizer": [type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer)],
                "family": family.name}
    if data_cfg.name == "local":
        # The same path with new contents must not hit the old cache.
        path = Path(data_cfg.path)
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        identity["files"] = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                             for p in files]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _synthetic_draws(data_cfg, split: str):
    """The split's random generator, and its source and target lengths drawn from it first:
    log-normal around the medians, clipped to [2, data.longest_source / longest_target]."""
    size = data_cfg[f"{split}_size"]
    rng = np.random.default_rng(data_cfg.seed * 1000 + SPLITS.index(split))

    def lengths(median, longest):
        drawn = median * np.exp(data_cfg.length_sigma * rng.standard_normal(size))
        return np.clip(np.rint(drawn), 2, longest).astype(int)

    return (rng, lengths(data_cfg.source_length_median, data_cfg.longest_source),
            lengths(data_cfg.target_length_median, data_cfg.longest_target))


def synthetic_lengths(data_cfg) -> dict:
    """The uncut lengths of synthetic train and test together, as token_lengths measures text."""
    draws = [_synthetic_draws(data_cfg, split) for split in ("train", "test")]
    return {side: np.concatenate([draw[index] for draw in draws])
            for index, side in enumerate(SIDES, start=1)}


def synthetic(data_cfg, vocab_size: int, lengths: dict | None = None,
              family=None) -> DatasetDict:
    """Random token ids with SAMSum-like source and target lengths (log-normal, clipped), cut at
    `lengths` (default: data.source_max_length / target_max_length resolved on these draws),
    assembled as the model's family does (a causal model: prompt and response as one sequence)
    and padded as data.padding says (default family: seq2seq)."""
    family = family or _seq2seq()
    lengths = lengths or resolve_lengths(data_cfg, lambda: synthetic_lengths(data_cfg))
    pad = data_cfg.padding == "max_length"

    def sequence(rng, length: int, cut_at: int) -> list:
        # Ids 0 and 1 are the pad and eos of T5 and the byte tokenizer: draw from the rest, end
        # every sequence with eos.
        length = min(length, cut_at)
        return rng.integers(EOS_ID + 1, vocab_size, length - 1).tolist() + [EOS_ID]

    def split_of(split: str) -> Dataset:
        rng, sources, targets = _synthetic_draws(data_cfg, split)
        source_ids = [sequence(rng, n, lengths["source"]) for n in sources]
        examples = [family.assemble(source, sequence(rng, n, lengths["target"]), lengths, pad,
                                    PAD_ID, data_cfg.get("train_on_inputs", False))
                    for source, n in zip(source_ids, targets)]
        return Dataset.from_list(examples)

    return DatasetDict({split: split_of(split) for split in SPLITS})


def _seq2seq():
    from harness import families  # imported when used: config checks must not load torch

    return families.FAMILIES["seq2seq"]
