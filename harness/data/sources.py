"""Text sources: the splits a data config names, from the hub, a local file or folder, or the
fixture's generator, and their rendering as id / source / target pairs.
"""

from pathlib import Path

import pandas as pd
from datasets import Dataset, DatasetDict, load_dataset

from harness.core.errors import ConfigError
from harness.data import fixture

SPLITS = ("train", "validation", "test")
FORMATS = {"summary": ("id", "dialogue", "summary"),  # format: the columns its rows have
           "instruction": ("instruction", "input", "output"),
           "classification": ()}
PAIR = ("id", "source", "target")
LOCAL_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")
GENERATED = ("fixture", "instructions")  # text the harness writes itself (data/fixture.py)


def from_hub(data_cfg) -> bool:
    """Whether the data's text comes from the Hugging Face hub: any data config with a hub_id
    that is neither generated nor local (samsum, dolly_ja, twitter_complaints). The hub check,
    the loader and the dataset inputs logged with a run all ask here."""
    return data_cfg.name not in (*GENERATED, "local") and bool(data_cfg.get("hub_id"))


def load_text(data_cfg) -> DatasetDict:
    """The train / validation / test splits with the columns of data.format."""
    if data_cfg.name in GENERATED:
        make = fixture.make_rows if data_cfg.name == "fixture" else fixture.make_instruction_rows
        rows = fixture.make_splits(data_cfg.train_size, data_cfg.validation_size,
                                   data_cfg.test_size, data_cfg.seed, make)
        return DatasetDict({split: Dataset.from_list(rows[split]) for split in SPLITS})
    if data_cfg.name == "local":
        return read_local(data_cfg)
    if from_hub(data_cfg):
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


def read_local(data_cfg) -> DatasetDict:
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
