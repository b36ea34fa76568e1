"""Text sources: the splits a data config names, from the hub, a local file or folder, or the
fixture's generator, and their rendering as id / source / target pairs.
"""

import math
import os
import stat
import warnings
from pathlib import Path

import pandas as pd
from datasets import Dataset, DatasetDict, load_dataset

from harness.core.errors import ConfigError, shown
from harness.data import fixture

SPLITS = ("train", "validation", "test")
FORMATS = {"summary": ("id", "dialogue", "summary"),  # format: the columns its rows have
           "instruction": ("instruction", "input", "output"),
           "classification": ()}
PAIR = ("id", "source", "target")
LOCAL_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")
LOCAL_FORMATS = ("summary", "instruction")
MIN_ROWS = 10  # a single file's 80 / 10 / 10 split gives each split a row at least
# The columns whose texts must not be empty (an instruction's input may be).
NEEDS_TEXT = {"summary": ("dialogue", "summary"), "instruction": ("instruction", "output")}
# Longer texts are refused, not tokenized: about 50,000 tokens, a hundred times flan-t5's
# 512-token cut; tokenizing and measuring them would cost minutes and their lengths would skew
# a percentile cut.
MAX_TEXT_CHARS = 200_000
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


def train_rows(data_cfg) -> int | None:
    """The training examples a cell will see, known before it loads any: the size generated or
    synthetic data is drawn at, or a hub dataset's expected train split (80 % of it where the
    hub has no other split: _split_whole); None where nothing says (local files)."""
    if data_cfg.get("train_size") is not None:
        return int(data_cfg.train_size)
    expected = data_cfg.get("expected_sizes")
    if expected is None or "train" not in expected:
        return None
    if not set(SPLITS) <= set(expected):  # datasets' train_test_split rounds the test part up
        return expected.train - math.ceil(0.2 * expected.train)
    return int(expected.train)


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
        raise ConfigError(f"data.path={shown(path)} does not exist: expected a csv, json or "
                          "parquet file, or a folder of train / validation / test files")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"data.path={shown(path)} is not readable by this user: expected a file "
                          f"or folder it can read; fix its permissions (chmod u+r {path})")
    data_format = data_cfg.get("format", "summary")
    if data_format not in LOCAL_FORMATS:
        raise ConfigError(f"data.format={data_format} with data=local; expected one of "
                          f"{', '.join(LOCAL_FORMATS)} (classification reads a hub dataset's "
                          "text_column and label_column): use data.format=summary or instruction")
    columns = _columns(data_cfg, data_format)
    if path.is_dir():
        return DatasetDict({split: Dataset.from_pandas(
            _read_table(_split_file(path, split), data_format, columns), preserve_index=False)
            for split in SPLITS})
    table = _read_table(path, data_format, columns)
    if len(table) < MIN_ROWS:
        raise ConfigError(f"data.path={shown(path)} has {len(table)} rows; expected at least "
                          f"{MIN_ROWS}, as it is split 80 / 10 / 10 into train, validation and "
                          "test: add rows, or give a folder of train / validation / test files")
    return _split_whole(Dataset.from_pandas(table, preserve_index=False), data_cfg.seed)


def _columns(data_cfg, data_format: str) -> dict:
    """{the file's column name: the name data.format reads} from data.columns."""
    mapping = dict(data_cfg.get("columns") or {})
    wanted = tuple(dict.fromkeys(("id", *FORMATS[data_format])))
    unknown = [name for name in mapping if name not in wanted]
    if unknown:
        raise ConfigError(f"data.columns names {', '.join(map(shown, unknown))}, which "
                          f"data.format={data_format} does not read; expected keys among "
                          f"{', '.join(wanted)}, each mapped to a column of the file "
                          "(data.columns={dialogue: text})")
    return {str(found): name for name, found in mapping.items()}


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
        raise ConfigError(f"data.path={shown(folder)} must hold exactly one {split} file "
                          f"({split}.csv, {split}.json, {split}.jsonl or {split}.parquet); "
                          f"found {[p.name for p in candidates] or 'none'}")
    return candidates[0]


def _read_table(path: Path, data_format: str, renamed: dict) -> pd.DataFrame:
    """The file's rows, with the columns data.format reads (named as it names them, through
    data.columns), each checked; never a column chosen by its position."""
    columns = FORMATS[data_format]
    if path.suffix not in LOCAL_SUFFIXES:
        raise ConfigError(f"{shown(path)}: unsupported file type {path.suffix!r}; expected one "
                          f"of {', '.join(LOCAL_SUFFIXES)}")
    kind = _special(path)
    if kind:  # reading a pipe or a device would wait, or read for ever
        raise ConfigError(f"{shown(path)} is {kind}; expected a regular file: copy the data "
                          "into one")
    try:
        if path.suffix == ".csv":
            # index_col=False: a row with more fields than the header is refused below, not
            # read with its first field as an index and every column shifted by one.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", pd.errors.ParserWarning)
                table = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
        elif path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            table = pd.read_json(path, lines=path.suffix == ".jsonl", dtype=False)
    except UnicodeDecodeError as error:
        raise ConfigError(f"{shown(path)}: not UTF-8 text ({error.reason} at byte {error.start}); "
                          f"expected UTF-8: convert it (iconv -f <its encoding> -t UTF-8 "
                          f"{path.name})") from None
    except OSError as error:
        raise ConfigError(f"{shown(path)}: cannot be read ({type(error).__name__}: "
                          f"{error.strerror}); expected a readable file") from None
    except (pd.errors.EmptyDataError, ValueError) as error:
        raise ConfigError(f"{shown(path)}: cannot be read as {path.suffix[1:]} "
                          f"({shown(error)}); expected rows with columns "
                          f"{', '.join(columns)}") from error
    if path.suffix == ".csv" and caught:
        raise ConfigError(f"{shown(path)}: a row has more fields than the header has columns "
                          f"({len(table.columns)}: {shown(', '.join(map(str, table.columns)))}); "
                          "expected as many fields in every row: quote fields that hold commas, "
                          "or name every column in the header")
    table = table.rename(columns=renamed)
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ConfigError(f"{shown(path)}: missing column {', '.join(missing)}; it has "
                          f"{shown(', '.join(map(str, table.columns))) or 'no columns'}, expected "
                          f"{', '.join(columns)} (data.format; data.columns maps other names)")
    unread = [str(column) for column in table.columns if column not in ("id", *columns)]
    if unread:
        raise ConfigError(f"{shown(path)}: column {shown(', '.join(unread))} is read by nothing "
                          f"(data.format={data_format} reads {', '.join(columns)}"
                          f"{'' if 'id' in columns else ' and an optional id'}); expected "
                          "those alone: drop it from the file, or map it to one "
                          "of them with data.columns (data.columns={dialogue: text})")
    if table.empty:
        raise ConfigError(f"{shown(path)}: the file is empty; expected rows with columns "
                          f"{', '.join(columns)}")
    kept = dict.fromkeys(column for column in ("id", *columns) if column in table)
    table = table[list(kept)].astype(str)
    _check_texts(path, table, NEEDS_TEXT.get(data_format, ()))
    return table


def _special(path: Path) -> str | None:
    """What `path` is when it is not a regular file: a named pipe, a device, a socket."""
    mode = path.stat().st_mode
    for test, kind in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return None


def _check_texts(path: Path, table: pd.DataFrame, needed: tuple) -> None:
    """Refuse the first empty text in a column that needs one, and the first enormous text."""
    for column in table.columns:
        lengths = table[column].str.len()
        empty = table[column].str.strip() == ""
        if column in needed and empty.any():
            row = int(empty.idxmax())
            raise ConfigError(f"{path}: row {row + 1}{_row_id(table, row)} has an empty {column}; "
                              f"expected text in every row's {column}: fill it or drop the row")
        if (lengths > MAX_TEXT_CHARS).any():
            row = int(lengths.idxmax())
            raise ConfigError(f"{path}: row {row + 1}{_row_id(table, row)} has a {column} of "
                              f"{lengths[row]:,} characters; expected at most {MAX_TEXT_CHARS:,} "
                              "(about 50,000 tokens, far beyond any cut): shorten or drop it")


def _row_id(table: pd.DataFrame, row: int) -> str:
    return f" (id {table['id'].iloc[row]})" if "id" in table else ""
