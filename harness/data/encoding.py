"""Datasets: the splits a data config names, rendered as source and target texts, cut and padded
as it says, tokenised once per tokenizer and model family, and cached on disk.

Every text source yields a DatasetDict with splits train / validation / test in one of three
formats (data.format): `summary` (id, dialogue, summary: samsum, fixture, local), `instruction`
(instruction, input, output: dolly_ja, instructions, local) and `classification` (a text and a
class label: twitter_complaints). `pairs` renders each as id / source / target: a dialogue and
its summary; an instruction and input through data.template's prompt and the output; a text
through data.template and the label's name. A model's family (harness/model/families.py) then turns
a pair into token ids. `synthetic` yields token ids shaped like SAMSum directly.

Sources and targets are cut at data.source_max_length / target_max_length: a number of tokens, or
a percentile of the tokenized lengths (`p85`), measured as the public flan-t5 SAMSum recipes
measure it: the dialogues alone (no prefix) and the summaries, of train and test together, each
truncated at the tokenizer's model_max_length (512 for flan-t5). The lengths are measured once per
dataset and tokenizer and cached. data.padding says how batches are padded: `longest` (each batch
to its longest example) or `max_length` (every example to the cut, labels padded with -100, as
the recipes do).
"""

from pathlib import Path
from typing import NamedTuple

from datasets import DatasetDict

from harness.core.files import digest
from harness.data.checks import SIDES, has_text, percentile
from harness.data.length_policy import lengths_cache, resolve_lengths, token_lengths
from harness.data.sources import SPLITS, load_text, pairs
from harness.data.synthetic import seq2seq, synthetic, synthetic_lengths
from harness.model.tokenizers import tokenizer_identity


class Loaded(NamedTuple):
    text: DatasetDict | None   # id, source, target (see pairs); None for synthetic data
    splits: DatasetDict        # input_ids, attention_mask, labels
    lengths: dict              # the cut of each side in tokens: {"source": 255, "target": 50}


def load(data_cfg, model_cfg, tokenizer, cache_dir: str) -> Loaded:
    """The data a cell trains and evaluates on: text (if any), tokenised splits, resolved cuts."""
    from harness.model import (
        families,  # torch and peft: only a cell loading its data needs them
    )

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
        from harness.model import models  # torch and transformers: only to measure now

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


def tokenize(text: DatasetDict, tokenizer, data_cfg, lengths: dict, cache_dir: str,
             family=None) -> DatasetDict:
    """input_ids / attention_mask / labels for every split, as the model's family encodes a pair
    (harness/model/families.py), cut at `lengths` and padded as data.padding says, cached per
    dataset, tokenizer and family (default: seq2seq).

    A sweep runs each cell in a fresh process; the cache file lets every cell after the first
    load the tokenised splits instead of tokenising again.
    """
    family = family or seq2seq()
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
    return digest(identity, 16)
