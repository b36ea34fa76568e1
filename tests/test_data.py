"""Data: the fixture, local files and their errors, SAMSum's split check, synthetic shapes, and
the tokenisation cache."""

import json

import numpy as np
import pandas as pd
import pytest
from transformers import ByT5Tokenizer

from harness.config import hub, validation
from harness.core.errors import ConfigError
from harness.data import checks, encoding, fixture, length_policy, sources, synthetic
from harness.model import models, tokenizers
from harness.tracking import mlflow_store
from tests.conftest import compose_cell


def test_fixture_is_deterministic_and_sized():
    first = fixture.make_splits(300, 50, 50, seed=0)
    assert first == fixture.make_splits(300, 50, 50, seed=0)
    assert [len(first[s]) for s in ("train", "validation", "test")] == [300, 50, 50]
    assert first != fixture.make_splits(300, 50, 50, seed=1)
    # Resizing train leaves the evaluation splits as they were.
    assert fixture.make_splits(100, 50, 50, seed=0)["test"] == first["test"]
    row = first["train"][0]
    assert set(row) == {"id", "dialogue", "summary"}
    assert ":" in row["dialogue"] and row["summary"]


def test_fixture_summaries_restate_their_dialogue():
    facts = [*fixture.NAMES, *fixture.PLACES, *fixture.DAYS, *fixture.TIMES, *fixture.ITEMS,
             *fixture.DISHES]
    for row in fixture.make_rows(50, seed=3, id_prefix="x"):
        stated = [fact for fact in facts if fact in row["summary"]]
        assert len(stated) >= 2
        assert all(fact in row["dialogue"] for fact in stated)


def _rows(count):
    return pd.DataFrame(fixture.make_rows(count, seed=5, id_prefix="local"))


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_local_file_is_split_80_10_10(tmp_path, suffix):
    path = tmp_path / f"mine{suffix}"
    table = _rows(100)
    {".csv": lambda: table.to_csv(path, index=False),
     ".json": lambda: table.to_json(path, orient="records"),
     ".jsonl": lambda: table.to_json(path, orient="records", lines=True),
     ".parquet": lambda: table.to_parquet(path)}[suffix]()
    splits = sources.load_text(compose_cell("data=local", f"data.path={path}").data)
    assert [len(splits[s]) for s in sources.SPLITS] == [80, 10, 10]
    assert set(splits["train"].column_names) == set(sources.FORMATS["summary"])
    everything = set(splits["train"]["id"]) | set(splits["validation"]["id"]) | \
        set(splits["test"]["id"])
    assert everything == set(table["id"])


def test_local_folder_of_split_files(tmp_path):
    for split, count in (("train", 30), ("validation", 5), ("test", 6)):
        _rows(count).to_csv(tmp_path / f"{split}.csv", index=False)
    splits = sources.load_text(compose_cell("data=local", f"data.path={tmp_path}").data)
    assert [len(splits[s]) for s in sources.SPLITS] == [30, 5, 6]


# Broken local files are refused in tests/test_bad_inputs.py's table.


def _samsum_like_folder(folder, sizes):
    for split, count in sizes.items():
        _rows(count).to_parquet(folder / f"{split}.parquet")


def test_samsum_split_sizes_are_checked(tmp_path):
    # load_dataset reads a local folder of parquet files the way it reads the hub's copy.
    _samsum_like_folder(tmp_path, {"train": 20, "validation": 3, "test": 3})
    cfg = compose_cell("data=samsum", f"data.hub_id={tmp_path}", "data.revision=null").data
    with pytest.raises(ConfigError, match="expected .*14732"):
        sources.load_text(cfg)


def test_samsum_with_the_expected_sizes_loads(tmp_path):
    _samsum_like_folder(tmp_path, {"train": 14732, "validation": 818, "test": 819})
    cfg = compose_cell("data=samsum", f"data.hub_id={tmp_path}", "data.revision=null").data
    splits = sources.load_text(cfg)
    assert [len(splits[s]) for s in sources.SPLITS] == [14732, 818, 819]


def test_synthetic_batches_are_shaped_like_samsum():
    cfg = compose_cell("data=synthetic", "data.train_size=400", "data.validation_size=10",
                       "data.test_size=10").data
    splits = synthetic.synthetic(cfg, vocab_size=32128)
    lengths = pd.Series([len(ids) for ids in splits["train"]["input_ids"]])
    assert 100 <= lengths.median() <= 160 and lengths.max() <= cfg.source_max_length
    targets = pd.Series([len(ids) for ids in splits["train"]["labels"]])
    assert 20 <= targets.median() <= 36
    assert all(ids[-1] == 1 for ids in splits["train"]["labels"])  # eos
    assert splits["train"]["input_ids"] == synthetic.synthetic(cfg, 32128)["train"]["input_ids"]
    assert not checks.has_text(cfg)


def _lengths(cfg) -> dict:
    return {side: cfg[key] for side, key in checks.SIDES.items()}


def test_tokenisation_is_cached_once_per_dataset_and_tokenizer(tmp_path):
    cfg = compose_cell("data.train_size=40", "data.validation_size=8", "data.test_size=8").data
    tokenizer = ByT5Tokenizer()
    text = sources.pairs(sources.load_text(cfg), cfg)
    first = encoding.tokenize(text, tokenizer, cfg, _lengths(cfg), str(tmp_path))
    cache_files = sorted((tmp_path / "tokenized").glob("*.arrow"))
    assert len(cache_files) == 3
    written = {path: path.stat().st_mtime_ns for path in cache_files}
    second = encoding.tokenize(text, tokenizer, cfg, _lengths(cfg), str(tmp_path))
    assert {path: path.stat().st_mtime_ns for path in cache_files} == written  # read, not rewritten
    assert second["train"]["input_ids"] == first["train"]["input_ids"]
    example = first["train"][0]
    assert tokenizer.decode(example["input_ids"], skip_special_tokens=True) \
        .startswith("summarize: ")
    assert len(example["labels"]) <= cfg.target_max_length
    # Another tokenizer (here: other lengths) gets its own cache entry.
    shorter = compose_cell("data.train_size=40", "data.validation_size=8", "data.test_size=8",
                           "data.source_max_length=32").data
    encoding.tokenize(text, tokenizer, shorter, _lengths(shorter), str(tmp_path))
    assert len(list((tmp_path / "tokenized").glob("*.arrow"))) == 6
    assert max(len(ids) for ids in encoding.tokenize(text, tokenizer, shorter, _lengths(shorter),
                                                 str(tmp_path))["train"]["input_ids"]) == 32
    json.dumps(example)  # plain lists, no tensors


def test_percentile_lengths_are_numpys_of_train_and_test_and_cached(tmp_path, monkeypatch):
    cfg = compose_cell("data.source_max_length=p85", "data.target_max_length=p90",
                       "data.padding=max_length")
    tokenizer = models.load_tokenizer(cfg.model)
    loaded = encoding.load(cfg.data, cfg.model, tokenizer, str(tmp_path))
    # As the recipe measures them: the dialogues alone and the summaries, train and test together.
    text = sources.load_text(cfg.data)
    dialogues = [*text["train"]["dialogue"], *text["test"]["dialogue"]]
    summaries = [*text["train"]["summary"], *text["test"]["summary"]]
    expected = {"source": int(np.percentile([len(tokenizer(d)["input_ids"]) for d in dialogues],
                                            85)),
                "target": int(np.percentile([len(tokenizer(s)["input_ids"]) for s in summaries],
                                            90))}
    assert loaded.lengths == expected
    assert 0 < expected["target"] < expected["source"]
    # Padded to the cut: every example has the cut's length, label padding is -100.
    train = loaded.splits["train"]
    assert {len(ids) for ids in train["input_ids"]} == {expected["source"]}
    assert {len(ids) for ids in train["labels"]} == {expected["target"]}
    assert any(tokenizers.IGNORED_LABEL in labels for labels in train["labels"])
    assert all(mask[-1] == 0 for mask, ids in zip(train["attention_mask"], train["input_ids"])
               if ids[-1] == tokenizer.pad_token_id)
    # The measured lengths are cached, keyed by the dataset and the tokenizer, not the spec.
    assert length_policy.lengths_cache(cfg.data, cfg.model, str(tmp_path)).exists()
    monkeypatch.setattr(length_policy, "token_lengths", lambda *args: pytest.fail("measured twice"))
    other = compose_cell("data.source_max_length=p50", "data.target_max_length=p100")
    assert encoding.load(other.data, other.model, tokenizer, str(tmp_path)).lengths["source"] \
        < expected["source"]


@pytest.mark.parametrize("key, value", [("source_max_length", "p0"), ("source_max_length", "p101"),
                                        ("target_max_length", "85%"), ("target_max_length", -3),
                                        ("source_max_length", "longest"), ("padding", "left")])
def test_lengths_and_padding_are_checked_before_anything_loads(key, value):
    cfg = compose_cell(f"data.{key}={value}")
    with pytest.raises(ConfigError) as error:
        validation.validate(cfg)
    assert str(error.value).startswith(f"data.{key}={value}; expected ")
    assert ("p85" in str(error.value)) or ("max_length" in str(error.value))


def test_synthetic_lengths_have_samsums_published_percentiles():
    # The generator is set so that its percentiles are the recipes' figures for SAMSum.
    cfg = compose_cell("data=synthetic").data
    drawn = synthetic.synthetic_lengths(cfg)
    assert len(drawn["source"]) == cfg.train_size + cfg.test_size
    assert (length_policy.cut("p85", drawn["source"]) == 255
            and length_policy.cut("p90", drawn["target"]) == 50)
    assert (length_policy.cut("p100", drawn["source"]) == 512
            and length_policy.cut("p100", drawn["target"]) == 95)
    padded = compose_cell("data=synthetic", "data.train_size=32", "data.validation_size=4",
                          "data.test_size=4", "data.source_max_length=p85",
                          "data.target_max_length=48", "data.padding=max_length").data
    splits = synthetic.synthetic(padded, vocab_size=384)
    cut = length_policy.cut("p85", synthetic.synthetic_lengths(padded)["source"])
    assert {len(ids) for ids in splits["train"]["input_ids"]} == {cut}
    assert {len(ids) for ids in splits["train"]["labels"]} == {48}
    assert all(labels[-1] in (tokenizers.EOS_ID, tokenizers.IGNORED_LABEL)
               for labels in splits["train"]["labels"])


PERCENTILES = "{source: {p50: 40, p90: 100, p100: 128}, target: {p10: 2, p50: 3, p100: 8}}"


def test_synthetic_lengths_follow_a_source_s_percentiles_and_batches_pad_to_their_longest(
        tmp_path):
    # A source's distribution (peft's tweets, alpaca's instructions) instead of SAMSum's shape.
    cfg = compose_cell("data=synthetic", f"data.length_percentiles={PERCENTILES}",
                       "data.train_size=2000", "data.test_size=2000",
                       "data.source_max_length=p100", "data.target_max_length=p100").data
    drawn = synthetic.synthetic_lengths(cfg)
    assert [length_policy.cut(spec, drawn["source"]) for spec in ("p50", "p90", "p100")] == \
        pytest.approx([40, 100, 128], abs=3)
    assert length_policy.cut("p100", drawn["target"]) == 8 and drawn["source"].min() >= 2
    # The plan reads its cuts from these draws; batches are padded to their longest.
    assert encoding.planned_lengths(cfg, compose_cell().model, str(tmp_path)) == (
        {"source": 128, "target": 8}, "synthetic draws")
    small = compose_cell("data=synthetic", f"data.length_percentiles={PERCENTILES}",
                         "data.train_size=32", "data.validation_size=4", "data.test_size=4",
                         "data.padding=longest").data
    assert len({len(ids) for ids in synthetic.synthetic(small, 384)["train"]["input_ids"]}) > 1


@pytest.mark.parametrize("value", [
    "{source: {p50: 40, p90: 10, p100: 128}, target: {p100: 8}}",  # falling
    "{source: {p50: 40}, target: {p100: 8}}",                      # no longest
    "{source: {x50: 40, p100: 99}, target: {p100: 8}}",            # not a percentile
    "{source: {p100: 99}}"])                                        # no target
def test_length_percentiles_that_are_not_a_distribution_are_refused(value):
    with pytest.raises(ConfigError, match=r"^data.length_percentiles=.*; expected "):
        validation.validate(compose_cell("data=synthetic", f"data.length_percentiles={value}"))


def test_the_plan_knows_lengths_before_any_data_is_loaded(tmp_path):
    numbers = compose_cell()
    assert encoding.planned_lengths(numbers.data, numbers.model, str(tmp_path)) == (
        {"source": 384, "target": 96}, "config")
    # SAMSum under flan-t5's tokenizer, not downloaded here: the recipes' published figures.
    samsum = compose_cell("model=flan-t5-base", "data=samsum", "+recipe=samsum_lora")
    assert encoding.planned_lengths(samsum.data, samsum.model, str(tmp_path)) == (
        {"source": 255, "target": 50}, "published")
    unknown = compose_cell("model=flan-t5-base", "data=samsum", "data.source_max_length=p99")
    lengths, why = encoding.planned_lengths(unknown.data, unknown.model, str(tmp_path))
    assert lengths is None and "data.source_max_length=p99" in why and "not measured" in why
    # Fixture text under the byte tokenizer downloads nothing: measured now, and cached.
    fixture = compose_cell("data.source_max_length=p85")
    lengths, source = encoding.planned_lengths(fixture.data, fixture.model, str(tmp_path))
    assert source == "measured" and lengths["target"] == 96
    assert length_policy.lengths_cache(fixture.data, fixture.model, str(tmp_path)).exists()


@pytest.mark.parametrize("name, on_hub", [("samsum", True), ("dolly_ja", True),
                                          ("twitter_complaints", True), ("fixture", False),
                                          ("instructions", False), ("synthetic", False)])
def test_one_predicate_says_which_data_comes_from_the_hub(name, on_hub):
    # The loader, the hub's pre-flight check and the run's dataset inputs all ask it, so that no
    # hub dataset skips the check or is logged as generated.
    cfg = compose_cell(f"data={name}")
    assert sources.from_hub(cfg.data) == on_hub
    assert (f"dataset {cfg.data.get('hub_id')}" in hub.needs(cfg)) == on_hub
    kind, _ = mlflow_store._dataset_source(cfg.data, "train")
    assert (kind == "hugging_face") == on_hub, kind
