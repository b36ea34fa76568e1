"""A cell's recipe, top to bottom: load the tokenizer, the model (its precision, its method, its
strategy's engine) and the data; train; evaluate (ROUGE of the test split's generations); run the
inference benchmark; and record what each step measured, through the runner (`log`,
harness/cell/to_runner.py). harness/cell/entry.py runs it in the cell's process, or in each rank.
"""

import csv
import math
import time

import pandas as pd
import psutil
import torch
from torch.utils.data import DataLoader

from harness.cell import evaluate, infer
from harness.cell.to_runner import ToRunner
from harness.cell.train import train
from harness.core import pauses
from harness.core.options import ADAPTER_METHODS, FUSED_METHODS
from harness.core.units import MIB
from harness.data import checks, encoding, loaders, sources
from harness.measure import accounting
from harness.model import families, methods, models
from harness.model.training_step import synchronize
from harness.strategy import registry
from harness.strategy import world as ranks
from harness.strategy.engines import Engine

# A memory-only cell's eval loss pass reads this many batches (eval.loss_max_batches=auto): its
# loss says nothing, and one batch of eval.batch_size shows the pass's memory.
MEMORY_ONLY_LOSS_BATCHES = 1


def resolved_eval(cfg, device: torch.device) -> dict:
    """eval.infer and eval.loss_max_batches with `auto` resolved. A cell on a CPU that only
    measures memory and time (random weights or synthetic data) skips the inference benchmark
    and bounds its eval loss pass; every other cell, and every cell on a GPU, runs both whole."""
    memory_only = device.type != "cuda" and (cfg.model.source == "random"
                                             or cfg.data.name == "synthetic")
    batches = cfg.eval.loss_max_batches
    # The inference benchmark measures one process's generation; ranks would only repeat it.
    infer = (not memory_only if cfg.eval.infer == "auto" else cfg.eval.infer) \
        and cfg.strategy.name == "single"
    return {"infer": infer,
            "loss_max_batches": (MEMORY_ONLY_LOSS_BATCHES if memory_only else None)
            if batches == "auto" else batches}


def run(cfg, cache_dir: str, log: ToRunner) -> None:
    device = log.device
    method = cfg.method.name
    evaluation = resolved_eval(cfg, device)
    log.params({f"eval.{key}_resolved": value for key, value in evaluation.items()})
    # What the process holds before the cell's own work: the interpreter and the libraries
    # imported (about 385 MiB in a CPU cell here, the same for every cell). A CPU store's
    # breakdown and "memory / full FT" show the cell above it.
    log.per_rank({"cpu_baseline_mib": psutil.Process().memory_info().rss / MIB})

    with log.phase("load"):
        load_start = time.perf_counter()
        tokenizer = models.load_tokenizer(cfg.model)
        model = models.load_model(cfg.model, cfg.precision, methods.base_frozen(method), device,
                                  registry.shards_weights(cfg.strategy))
        model = methods.prepare(model, cfg)
        engine = Engine(model, cfg, log.world)  # wrapped or sharded as cfg.strategy says
        with ranks.main_first(log.world):
            text, splits, lengths = encoding.load(cfg.data, cfg.model, tokenizer, cache_dir)
        if text is None:
            log.tag("rouge", f"not computed: data={cfg.data.name} has no text")
        # The cuts as numbers beside their specs (data.source_max_length=p85 -> 255).
        log.params({f"data.{key}_resolved": lengths[side] for side, key in checks.SIDES.items()})
        log.datasets({split: len(splits[split]) for split in sources.SPLITS})
        trainable, total = models.count_params(model)
        log({"trainable_params": trainable, "total_params": total,
             "trainable_pct": 100 * trainable / total,
             "load_time_s": time.perf_counter() - load_start})
        if device.type == "cuda":
            # Loading frees what it needed only on the way (half-precision casts, quantization's
            # copies), which the allocator would keep cached: give it back, so that the memory
            # of training is training's own.
            torch.cuda.empty_cache()

    family = families.of(cfg.model)
    collate = family.collate(tokenizer)
    with log.phase("train"):
        train_loader = loaders.training(splits["train"], cfg.train.batch_size, cfg.train.seed,
                                        collate)
        loss_examples = cfg.eval.max_samples
        if evaluation["loss_max_batches"] is not None:
            loss_examples = min(loss_examples or math.inf,
                                evaluation["loss_max_batches"] * cfg.eval.batch_size)
        validation_loader = DataLoader(_first(splits["validation"], loss_examples),
                                       batch_size=cfg.eval.batch_size, collate_fn=collate)
        def validation_rouge():  # ROUGE learning curves (eval.rouge_every_epoch)
            with engine.evaluating() as evaluated:
                return _rouge(evaluated, tokenizer, splits["validation"], text["validation"],
                              cfg, device)[0]

        per_epoch = cfg.eval.rouge_every_epoch and text is not None
        result = train(engine, train_loader, validation_loader, cfg, device, log,
                       validation_rouge if per_epoch else None)
    throughput = result.throughput(cfg.train.throughput_skip_steps)
    if "tokens_per_s" in throughput:  # the LOMO paper's figure: tokens per GPU per second
        throughput["tokens_per_rank_per_s"] = throughput["tokens_per_s"] / log.world.size
    log({"train_time_s": result.train_time_s, "train_steps": result.steps,
         "train_tokens": result.train_tokens, **throughput})
    breakdown = dict(result.breakdown)
    if device.type == "cuda" and breakdown:
        # Activations and everything else the step allocated beyond the tensors counted above.
        breakdown["mem_activations_mib"] = (log.peaks["torch_train_peak_allocated_mib"]
                                            - sum(breakdown.values()))
    log.per_rank(breakdown)
    if method in FUSED_METHODS:  # what LOMO's claim bounds its gradients by (the report's check)
        log({"mem_largest_weight_mib": accounting.largest_trained_mib(model)})

    if text is not None:
        with log.phase("eval"):
            pauses.at("eval", cfg.train.seed, log.world.rank)  # a test's moment: ROUGE is next
            eval_start = time.perf_counter()
            with engine.evaluating() as evaluated:
                scores, references, predictions = _rouge(evaluated, tokenizer, splits["test"],
                                                         text["test"], cfg, device)
            synchronize(device)
            log({**scores, "eval_time_s": time.perf_counter() - eval_start})
            _log_predictions(log, references, predictions)

    if method in ADAPTER_METHODS:
        whole = engine.state_dict()  # gathered from the shards: a collective
        if log.connection is not None:
            _log_adapter(log, model, whole)
    if evaluation["infer"]:  # last: an adapter is merged into its base here
        with log.phase("infer"):
            infer.benchmark(model, tokenizer, splits["test"], cfg, device, family, log)


def _rouge(model, tokenizer, tokens, references, cfg, device):
    """ROUGE of generations for the first eval.max_samples examples of one split:
    (scores, references, predictions)."""
    family = families.of(cfg.model)
    tokens, references = (_first(split, cfg.eval.max_samples) for split in (tokens, references))
    loader = DataLoader(tokens, batch_size=cfg.eval.batch_size,
                        collate_fn=family.generation_collate(tokenizer))
    predictions = evaluate.generate(model, tokenizer, loader, cfg.eval, cfg.precision,
                                    device, family)
    return (evaluate.rouge(predictions, references["target"], cfg.data.get("rouge_unit", "words")),
            references, predictions)


def _first(split, count: int | None):
    """The split's first `count` examples (every evaluation pass is bounded by eval.max_samples);
    all of them for None."""
    return split if count is None else split.select(range(min(count, len(split))))


def _log_predictions(log: ToRunner, references, predictions) -> None:
    path = log.scratch / "predictions.csv"
    # Quote every field: an untrained model's output can hold a bare carriage return.
    pd.DataFrame({"id": references["id"], "reference": references["target"],
                  "prediction": predictions}).to_csv(path, index=False, quoting=csv.QUOTE_ALL)
    log.artifact(path)


def _log_adapter(log: ToRunner, model, state_dict: dict | None = None) -> None:
    """The saved adapter as an artifact, its size on disk, and the size of the whole model it
    stands for; from `state_dict` where the model's own is sharded."""
    folder = log.scratch / "adapter"
    model.save_pretrained(folder, **({} if state_dict is None else {"state_dict": state_dict}))
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    log(infer.checkpoint_sizes(model, size))
    log.artifact(folder, "adapter")
