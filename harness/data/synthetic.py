"""Synthetic data: random token ids whose lengths are drawn to have SAMSum's published
percentiles, for memory-only cells; no text, so no ROUGE.
"""

import numpy as np
from datasets import Dataset, DatasetDict

from harness.data.checks import SIDES
from harness.data.length_policy import resolve_lengths
from harness.data.sources import SPLITS
from harness.model.tokenizers import EOS_ID, PAD_ID


def _synthetic_draws(data_cfg, split: str):
    """The split's random generator, and its source and target lengths drawn from it first:
    between the percentiles of data.length_percentiles where given (a source's distribution),
    else log-normal around the medians, clipped to [2, data.longest_source / longest_target]."""
    size = data_cfg[f"{split}_size"]
    rng = np.random.default_rng(data_cfg.seed * 1000 + SPLITS.index(split))
    percentiles = data_cfg.get("length_percentiles")

    def lengths(side, median, longest):
        if percentiles:
            return _between_percentiles(rng, percentiles[side], size)
        drawn = median * np.exp(data_cfg.length_sigma * rng.standard_normal(size))
        return np.clip(np.rint(drawn), 2, longest).astype(int)

    return (rng, lengths("source", data_cfg.source_length_median, data_cfg.longest_source),
            lengths("target", data_cfg.target_length_median, data_cfg.longest_target))


def _between_percentiles(rng, points: dict, size: int) -> np.ndarray:
    """`size` lengths whose percentiles are `points` ({p50: 120, ..., p100: 512}): the inverse
    of the piecewise-linear distribution through them (p0: 2 unless given)."""
    known = sorted((float(str(name).removeprefix("p")), length) for name, length in points.items())
    if known[0][0] > 0:
        known.insert(0, (0.0, 2))
    at, lengths = zip(*known)
    return np.rint(np.interp(rng.uniform(0, 100, size), at, lengths)).astype(int)


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
    family = family or seq2seq()
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


def seq2seq():
    """The seq2seq family (T5): how synthetic data is assembled unless a family is given."""
    from harness.model import (
        families,  # imported when used: config checks must not load torch
    )

    return families.FAMILIES["seq2seq"]
