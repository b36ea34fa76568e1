"""Datasets: the splits a data config names, tokenised once per tokenizer and cached on disk.

Every text source (samsum, fixture, local) yields a DatasetDict with splits train / validation /
test and columns id, dialogue, summary. `synthetic` yields token ids shaped like SAMSum directly.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Dataset, DatasetDict, load_dataset

from harness import fixture
from harness.errors import ConfigError

SPLITS = ("train", "validation", "test")
COLUMNS = ("id", "dialogue", "summary")
LOCAL_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")


def has_text(data_cfg) -> bool:
    """Whether the data has summaries to score with ROUGE (synthetic data is token ids only)."""
    return data_cfg.name != "synthetic"


def check(data_cfg) -> None:
    """Cheap checks of user-supplied data, run before any model is loaded."""
    if data_cfg.name == "local":
        _read_local(data_cfg)


def load_text(data_cfg) -> DatasetDict:
    """The train / validation / test splits with columns id, dialogue, summary."""
    if data_cfg.name == "fixture":
        rows = fixture.make_splits(data_cfg.train_size, data_cfg.validation_size,
                                   data_cfg.test_size, data_cfg.seed)
        return DatasetDict({split: Dataset.from_list(rows[split]) for split in SPLITS})
    if data_cfg.name == "samsum":
        return _load_samsum(data_cfg)
    if data_cfg.name == "local":
        return _read_local(data_cfg)
    raise ConfigError(f"data={data_cfg.name} has no text; expected samsum, fixture or local")


def _load_samsum(data_cfg) -> DatasetDict:
    splits = load_dataset(data_cfg.hub_id, revision=data_cfg.revision)
    sizes = {split: len(splits[split]) for split in splits}
    if sizes != dict(data_cfg.expected_sizes):
        raise ConfigError(
            f"{data_cfg.hub_id}@{data_cfg.revision} has split sizes {sizes}, expected "
            f"{dict(data_cfg.expected_sizes)} (SAMSum): point data.hub_id / data.revision at a "
            "faithful copy of SAMSum")
    return DatasetDict({split: splits[split].select_columns(list(COLUMNS)) for split in SPLITS})


def _read_local(data_cfg) -> DatasetDict:
    if not data_cfg.path:
        raise ConfigError("data=local needs data.path=<a csv, json or parquet file, or a folder "
                          "of train / validation / test files>")
    path = Path(data_cfg.path)
    if not path.exists():
        raise ConfigError(f"data.path={path} does not exist: expected a csv, json or parquet "
                          "file, or a folder of train / validation / test files")
    if path.is_dir():
        return DatasetDict({split: Dataset.from_pandas(_read_table(_split_file(path, split)),
                                                       preserve_index=False)
                            for split in SPLITS})
    whole = Dataset.from_pandas(_read_table(path), preserve_index=False)
    # A single file: 80 % train, 10 % validation, 10 % test, the same for the same seed.
    train_rest = whole.train_test_split(test_size=0.2, seed=data_cfg.seed)
    validation_test = train_rest["test"].train_test_split(test_size=0.5, seed=data_cfg.seed)
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


def _read_table(path: Path) -> pd.DataFrame:
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
                          f"rows with columns {', '.join(COLUMNS)}") from error
    missing = [column for column in COLUMNS if column not in table.columns]
    if missing:
        raise ConfigError(f"{path}: missing column {', '.join(missing)}; it has "
                          f"{', '.join(map(str, table.columns)) or 'no columns'}, expected "
                          f"{', '.join(COLUMNS)}")
    if table.empty:
        raise ConfigError(f"{path}: the file is empty; expected rows with columns "
                          f"{', '.join(COLUMNS)}")
    return table[list(COLUMNS)].astype(str)


def tokenize(text: DatasetDict, tokenizer, data_cfg, cache_dir: str) -> DatasetDict:
    """input_ids / attention_mask / labels for every split, cached per dataset and tokenizer.

    A sweep runs each cell in a fresh process; the cache file lets every cell after the first
    load the tokenised splits instead of tokenising again.
    """
    key = _cache_key(data_cfg, tokenizer)
    folder = Path(cache_dir) / "tokenized"
    folder.mkdir(parents=True, exist_ok=True)

    def encode(batch):
        encoded = tokenizer([data_cfg.prefix + dialogue for dialogue in batch["dialogue"]],
                            max_length=data_cfg.source_max_length, truncation=True)
        encoded["labels"] = tokenizer(text_target=batch["summary"],
                                      max_length=data_cfg.target_max_length,
                                      truncation=True)["input_ids"]
        return encoded

    return DatasetDict({
        split: text[split].map(encode, batched=True, remove_columns=text[split].column_names,
                               cache_file_name=str(folder / f"{key}-{split}.arrow"),
                               desc=f"tokenising {split}")
        for split in SPLITS})


def _cache_key(data_cfg, tokenizer) -> str:
    identity = {"data": {key: str(value) for key, value in data_cfg.items()},
                "tokenizer": [type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer)]}
    if data_cfg.name == "local":
        # The same path with new contents must not hit the old cache.
        path = Path(data_cfg.path)
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        identity["files"] = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
                             for p in files]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def synthetic(data_cfg, vocab_size: int) -> DatasetDict:
    """Random token ids with SAMSum-like source and target lengths (log-normal, clipped)."""
    def split_of(size: int, seed: int) -> Dataset:
        rng = np.random.default_rng(seed)

        def lengths(median, maximum):
            drawn = median * np.exp(data_cfg.length_sigma * rng.standard_normal(size))
            return np.clip(np.rint(drawn), 2, maximum).astype(int)

        sources = lengths(data_cfg.source_length_median, data_cfg.source_max_length)
        targets = lengths(data_cfg.target_length_median, data_cfg.target_max_length)
        # Ids 0 and 1 are T5's pad and eos: draw from the rest, end every sequence with eos.
        def ids(length):
            return rng.integers(2, vocab_size, length - 1).tolist() + [1]
        input_ids = [ids(n) for n in sources]
        return Dataset.from_dict({"input_ids": input_ids,
                                  "attention_mask": [[1] * len(x) for x in input_ids],
                                  "labels": [ids(n) for n in targets]})

    sizes = (data_cfg.train_size, data_cfg.validation_size, data_cfg.test_size)
    return DatasetDict({split: split_of(size, data_cfg.seed * 1000 + offset)
                        for offset, (split, size) in enumerate(zip(SPLITS, sizes))})
