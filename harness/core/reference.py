"""The published figures (reference.yaml): the study's table the harness must reproduce, peft's
README memory table and the OpenCALM-7B study, for the report (beside the cells that match a
row) and the plan (the estimate against the published GPU memory)."""

import copy
import functools
from pathlib import Path

import pandas as pd
import yaml

from harness.core.options import CONF_DIR

PATH = Path(__file__).with_name("reference.yaml")
KEYS = ("model", "method", "precision", "strategy")  # what makes a cell a row of a table
# What a table's GPU figure counts, and the part of the estimate that counts the same.
MEASURES = {"nvml": "total", "allocated": "allocated"}
# What a published figure depends on besides KEYS: a cell stands beside a row only where it runs
# the row's setup (its table's, a recipe's of conf/recipe/, the row's own; the LoRA rank where
# the source states one, and only for a cell that has a rank).
SETUP_KEYS = ("data.source_max_length", "data.target_max_length", "data.padding",
              "train.batch_size", "train.gradient_checkpointing", "method.r",
              "model.attn_implementation", "train.optimizer_impl")
# What each table declares of its source's software (reference.yaml's header says what each
# means); `make validity` shows them beside the figures.
DECLARED = ("experiment", "unit", "versions", "software", "unreproduced")
SOFTWARE = ("attention", "padding", "checkpointing", "optimizer", "precision_style", "allocator")
# Which way a choice left over leaves the estimate against the figure (none: no difference
# expected, declared all the same).
DIRECTIONS = ("high", "low", "either", "none")


def tables() -> list[dict]:
    """The tables as reference.yaml writes them, each checked to declare its source's setup."""
    found = _published()["tables"]
    for table in found:
        missing = [key for key in DECLARED if key not in table]
        missing += [f"software.{key}" for key in SOFTWARE if key not in table.get("software", {})]
        missing += [f"unreproduced: {left.get('choice', left)}" for left in
                    table.get("unreproduced", [])
                    if left.get("estimate") not in DIRECTIONS or not left.get("settles")]
        if missing:
            raise ValueError(f"{PATH}: table {table['name']} does not declare "
                             f"{', '.join(missing)} (the header says what each holds)")
    return found


def considered() -> list[dict]:
    """The sources looked at and left out (reference.yaml's `considered`): name, source, and
    what they do not state."""
    return _published().get("considered", [])


def _published() -> dict:
    """reference.yaml as YAML reads it: parsed once while the file stays as it is (a plan looks up
    each of its cells, full_grid's 288), a copy each time."""
    status = PATH.stat()
    return copy.deepcopy(_parsed(status.st_mtime_ns, status.st_size))


@functools.lru_cache(maxsize=1)
def _parsed(modified_ns: int, size: int) -> dict:
    return yaml.safe_load(PATH.read_text())


def load() -> pd.DataFrame:
    """One row per published row, with its table's name, source, measure and setup (a dict of
    SETUP_KEYS: the value as str() writes it, as MLflow's params hold it)."""
    return pd.DataFrame([{"strategy": "single",  # a row that names none ran in one process
                          **{key: value for key, value in row.items()
                             if key not in ("setup", "recipe")},
                          "table": table["name"], "source": table["source"],
                          "measure": table["measure"],
                          "setup": {**table.get("setup", {}), **_recipe(row.get("recipe")),
                                    **row.get("setup", {})}}
                         for table in tables() for row in table["rows"]])


@functools.cache
def _recipe(name: str | None) -> dict:
    """The SETUP_KEYS a recipe (conf/recipe/<name>.yaml) sets, by their dotted names, but its
    rank: that is the recipe's, not the published source's."""
    if name is None:
        return {}
    flat = pd.json_normalize(yaml.safe_load((CONF_DIR / "recipe" / f"{name}.yaml").read_text()),
                             sep=".").iloc[0].to_dict()
    return {key: value for key, value in flat.items() if key in SETUP_KEYS and key != "method.r"}


def differences(published: dict, settings: dict) -> list[str]:
    """What the cell runs otherwise than the published row's setup, as "key=ours (published:
    theirs)"; `settings` are the cell's params by dotted name (values as str() writes them). A
    setting the cell does not record counts as another."""
    found = []
    for key, value in published["setup"].items():
        ours = settings.get(key)
        if key == "method.r" and ours is None:  # a method without a rank
            continue
        if ours is None or str(ours) != str(value):
            found.append(f"{key.split('.')[-1]}={'?' if ours is None else ours} "
                         f"(published: {value})")
    return found


def row(model: str, method: str, precision: str, strategy: str = "single") -> dict | None:
    """The published row this cell matches, None for none."""
    rows = load()
    found = rows[(rows.model == model) & (rows.method == method) & (rows.precision == precision)
                 & (rows.strategy == strategy)]
    return found.iloc[0].to_dict() if len(found) else None


def gpu_mib(model: str, method: str, precision: str, strategy: str = "single") -> float | None:
    """The published GPU memory for the row this cell matches (a range's middle), None for no
    row or no figure. MB are read as what nvidia-smi shows (MiB), the unit the harness measures
    in."""
    found = row(model, method, precision, strategy)
    if found is None:
        return None
    figure = found.get("gpu_memory_mb")
    if pd.isna(figure) and not pd.isna(found.get("gpu_memory_low_mb")):
        figure = (found["gpu_memory_low_mb"] + found["gpu_memory_high_mb"]) / 2
    return None if pd.isna(figure) else float(figure)
