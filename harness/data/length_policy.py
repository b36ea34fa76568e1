"""The length policy: where each side is cut (a number of tokens, or a percentile of the
tokenized lengths), and the lengths measured once per data and tokenizer, cached on disk.
"""

from pathlib import Path

import numpy as np
from datasets import DatasetDict, concatenate_datasets

from harness.core.files import digest, write_whole
from harness.data.checks import SIDES, percentile
from harness.model.tokenizers import tokenizer_identity


def cut(spec, lengths) -> int:
    """The length a side is cut at: the spec itself, or its percentile of `lengths` rounded down
    (as the recipes take int(np.percentile(...)))."""
    share = percentile(spec)
    return spec if share is None else int(np.percentile(lengths, share))


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
        if cache is not None:  # a parallel reader sees all of it or none
            write_whole(cache, lambda partial: np.savez(partial, **measured))
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
    key = digest(identity, 16)
    return Path(cache_dir) / "lengths" / f"{key}.npz"
