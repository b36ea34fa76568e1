"""One cell, in its own process: load, apply method and precision, train, evaluate.

The cell never talks to MLflow: the runner owns the run. The cell sends the runner messages as
it goes, which the runner records at once, so that nothing finished is lost if the cell dies:

  ("phase", name, unix time)               load, train, eval, infer start (splits the memory
                                           trace)
  ("metrics", {name: value}, step, unix ms)
  ("tag", name, value)
  ("params", {name: value})                params known only once the cell has loaded its data
  ("datasets", {split: rows})              the splits it loaded (the run's dataset inputs)
  ("artifact", local path, artifact folder) a file or folder the cell wrote under its scratch
  ("result", status, reason)               last: ok, diverged, oom or failed

Under a distributed strategy this process launches the cell's ranks (harness/strategy/launch.py)
and sends the result; rank 0 streams everything else, with the figures every rank measures on
its own (allocator peaks, host memory, the breakdown) gathered as `<name>_rank<n>` beside their
maximum under `<name>`.
"""

import contextlib
import csv
import errno
import functools
import math
import os
import resource
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

import pandas as pd
import psutil
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from harness.cell import evaluate, infer
from harness.cell.train import train
from harness.core import pauses
from harness.core.errors import disk_full
from harness.core.options import ADAPTER_METHODS, FUSED_METHODS
from harness.core.units import MIB
from harness.data import checks, encoding, sources
from harness.measure import accounting
from harness.model import families, methods, models
from harness.model.training_step import Diverged, synchronize
from harness.strategy import launch, nodes, registry
from harness.strategy import world as ranks
from harness.strategy.engines import Engine


def main(cell_cfg: dict, cache_dir: str, scratch: str, cpu_memory_limit_mib, connection) -> None:
    """Process entry point: run the cell, streaming to the runner, and send its result."""
    # A runner killed outright (SIGKILL, the OOM killer) leaves no cell holding its GPU.
    launch.die_with_parent()
    # The runner stops a cell with SIGTERM (Ctrl-C, a kill, a time limit): exit as Python exits,
    # releasing what the process holds (tqdm's lock, the pipe) rather than leaving it leaked.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # tqdm's default lock is a multiprocessing semaphore; a cell killed outright (SIGKILL, the
    # OOM killer) cannot release it, and the runner would print "leaked semaphore" at exit. The
    # cell's progress bars are its own: a thread lock serves them.
    tqdm.set_lock(threading.RLock())
    if cpu_memory_limit_mib:
        limit = int(cpu_memory_limit_mib * MIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cfg = OmegaConf.create(cell_cfg)
    if cfg.strategy.name == "single":
        outcome = _outcome(lambda: run(cfg, cache_dir, ToRunner(connection, Path(scratch))))
    else:
        # The first node's ranks stream to its runner, which owns the run; another node's
        # launch only their ranks.
        streams = nodes.node_rank(cfg.strategy) == 0
        outcome = launch.launch(cfg.strategy, Path(scratch), rank_main, cell_cfg, cache_dir,
                                scratch, connection if streams else None)
    connection.send(("result", *outcome))


def rank_main(cell_cfg: dict, cache_dir: str, scratch: str, connection) -> tuple[str, str]:
    """One rank of a distributed cell: join the ranks, run the cell (the first local rank of the
    node that owns the run streaming to its runner; `connection` is None on another node), and
    return its outcome; a rank that did not end ok reports it and fails, so that the launcher
    stops the others at once."""
    launch.die_with_parent()
    cfg = OmegaConf.create(cell_cfg)
    world = ranks.join(cfg.strategy.timeout_s)
    streams = connection is not None and world.local_rank == 0
    if not streams:  # one progress bar per cell: the streaming rank's
        tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)
    log = ToRunner(connection if streams else None, Path(scratch), world)
    # Which process is which rank, on which host: the runner samples those on its own.
    log.send("ranks", ranks.gather((socket.gethostname(), os.getpid()), world))
    outcome = _outcome(lambda: run(cfg, cache_dir, log))
    if outcome[0] != "ok":
        launch.report(Path(scratch), world.rank, *outcome)
        sys.exit(1)
    ranks.leave(world)
    return outcome


def _outcome(cell) -> tuple[str, str]:
    """How `cell()` ended: ("ok", ""), or diverged, oom or failed with the reason."""
    try:
        cell()
        return "ok", ""
    except Diverged as error:
        return "diverged", str(error)
    except Exception as error:
        last_line = f"{type(error).__name__}: {error}".strip().splitlines()[-1]
        if _out_of_memory(error):
            return "oom", last_line
        if disk_full(error):
            return "failed", disk_full(error)
        traceback.print_exc()
        return "failed", last_line


# How running out of host memory (or of runner.cpu_memory_limit_mib's address space) reads when it
# is not a MemoryError: torch's host allocator, and a library that cannot be mapped to import it.
OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "Cannot allocate memory",
                          "failed to map segment from shared object")


def _out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    if isinstance(error, OSError) and error.errno == errno.ENOMEM:
        return True
    return any(message in str(error) for message in OUT_OF_MEMORY_MESSAGES)


class ToRunner:
    """The cell's side of the pipe: metrics, tags, artifacts and phases, sent as they happen
    (by rank 0 alone: another rank's has no connection). On CUDA it also keeps the allocator's
    peaks per phase and over all (torch_train_peak_allocated_mib, ..., torch_peak_allocated_mib),
    each rank its own."""

    def __init__(self, connection, scratch: Path, world: ranks.World = ranks.SINGLE):
        self.connection, self.scratch, self.world = connection, scratch, world
        self.device = world.device
        self.peaks = {}

    def send(self, *message) -> None:
        if self.connection is not None:
            self.connection.send(message)

    def __call__(self, metrics: dict, step: int = 0) -> None:
        self.send("metrics", {key: float(value) for key, value in metrics.items()}, step,
                  int(time.time() * 1000))

    def per_rank(self, metrics: dict) -> None:
        """Figures every rank measures for itself: with several ranks, each as
        `<name>_rank<n>` and their maximum as `<name>` (the per-GPU figure a card is compared
        with). A collective: every rank calls it."""
        gathered = ranks.gather(metrics, self.world)
        if len(gathered) == 1:
            self(metrics)
            return
        for rank, figures in enumerate(gathered):
            self({f"{key}_rank{rank}": value for key, value in figures.items()})
        self({key: max(figures[key] for figures in gathered) for key in metrics})

    def tag(self, name: str, value: str) -> None:
        self.send("tag", name, value)

    def params(self, params: dict) -> None:
        self.send("params", params)

    def datasets(self, rows: dict) -> None:
        self.send("datasets", rows)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.send("artifact", str(path), folder)

    @contextlib.contextmanager
    def phase(self, name: str):
        self.send("phase", name, time.time())
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        yield
        if self.device.type == "cuda":
            stats = torch.cuda.memory_stats(self.device)
            for kind in ("allocated", "reserved", "active"):
                peak = stats[f"{kind}_bytes.all.peak"] / MIB
                self.peaks[f"torch_{name}_peak_{kind}_mib"] = peak
                overall = f"torch_peak_{kind}_mib"
                self.peaks[overall] = max(self.peaks.get(overall, 0.0), peak)
            self.per_rank(self.peaks)  # now: a cell that dies later keeps this phase's peaks


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
        shuffle = torch.Generator().manual_seed(cfg.train.seed)
        train_loader = DataLoader(splits["train"], batch_size=cfg.train.batch_size,
                                  shuffle=True, generator=shuffle, collate_fn=collate)
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
            pauses.at("eval")  # a test's moment: training is over, generation is next
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
