"""One cell, in its own process: load, apply method and precision, train, evaluate, log.

The runner starts `main` in a fresh process and reads back one (status, reason) message. Metrics
and artifacts go straight into the cell's MLflow run as they are produced.
"""

import csv
import resource
import tempfile
import time
import traceback
from pathlib import Path

import pandas as pd
import torch
from mlflow import MlflowClient
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from transformers import DataCollatorForSeq2Seq

from harness import config, data, evaluate, methods, models
from harness.memory import MIB
from harness.tracking import MetricLogger
from harness.train import Diverged, synchronize, train


def main(cell: dict, cache_dir: str, tracking_uri: str, run_id: str,
         cpu_memory_limit_mib, connection) -> None:
    """Process entry point: run the cell and send ("ok" | "diverged" | "oom" | "failed", reason)."""
    if cpu_memory_limit_mib:
        limit = int(cpu_memory_limit_mib * MIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        run(OmegaConf.create(cell), cache_dir, tracking_uri, run_id)
        outcome = ("ok", "")
    except Diverged as error:
        outcome = ("diverged", str(error))
    except (MemoryError, torch.OutOfMemoryError) as error:
        outcome = ("oom", f"{type(error).__name__}: {error}".strip().splitlines()[-1])
    except Exception as error:
        traceback.print_exc()
        outcome = ("failed", f"{type(error).__name__}: {error}".strip().splitlines()[-1])
    connection.send(outcome)


def run(cfg, cache_dir: str, tracking_uri: str, run_id: str) -> None:
    client = MlflowClient(tracking_uri)
    log = MetricLogger(client, run_id)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision, method = cfg.precision.name, cfg.method.name

    load_start = time.perf_counter()
    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg.model, precision, methods.base_frozen(method), device)
    model = methods.apply(model, cfg.method, precision)
    if data.has_text(cfg.data):
        text = data.load_text(cfg.data)
        splits = data.tokenize(text, tokenizer, cfg.data, cache_dir)
    else:
        text, splits = None, data.synthetic(cfg.data, vocab_size=len(tokenizer))
        client.set_tag(run_id, "rouge", f"not computed: data={cfg.data.name} has no text")
    trainable, total = models.count_params(model)
    log({"trainable_params": trainable, "total_params": total,
         "trainable_pct": 100 * trainable / total,
         "load_time_s": time.perf_counter() - load_start})

    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    shuffle = torch.Generator().manual_seed(cfg.train.seed)
    train_loader = DataLoader(splits["train"], batch_size=cfg.train.batch_size, shuffle=True,
                              generator=shuffle, collate_fn=collate)
    validation_loader = DataLoader(splits["validation"], batch_size=cfg.eval.batch_size,
                                   collate_fn=collate)
    result = train(model, train_loader, validation_loader, cfg.train, precision, device, log)
    log({"train_time_s": result.train_time_s, "train_steps": result.steps,
         "tokens_per_s": result.train_tokens / max(result.train_time_s, 1e-9)})
    log.flush()

    if text is not None:
        eval_start = time.perf_counter()
        test = splits["test"]
        references = text["test"]
        if cfg.eval.max_samples is not None:
            test = test.select(range(min(cfg.eval.max_samples, len(test))))
            references = references.select(range(len(test)))
        test_loader = DataLoader(test, batch_size=cfg.eval.batch_size, collate_fn=collate)
        predictions = evaluate.generate(model, tokenizer, test_loader, cfg.eval, precision, device)
        synchronize(device)
        log({**evaluate.rouge(predictions, references["summary"]),
             "eval_time_s": time.perf_counter() - eval_start})
        _log_predictions(client, run_id, references, predictions)

    if device.type == "cuda":
        log({"torch_peak_allocated_mib": torch.cuda.max_memory_allocated(device) / MIB,
             "torch_peak_reserved_mib": torch.cuda.max_memory_reserved(device) / MIB})
    if method in config.ADAPTER_METHODS:
        _log_adapter(client, run_id, model, log)
    log.flush()


def _log_predictions(client, run_id, references, predictions) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "predictions.csv"
        # Quote every field: an untrained model's output can hold a bare carriage return.
        pd.DataFrame({"id": references["id"], "reference": references["summary"],
                      "prediction": predictions}).to_csv(path, index=False,
                                                         quoting=csv.QUOTE_ALL)
        client.log_artifact(run_id, str(path))


def _log_adapter(client, run_id, model, log) -> None:
    """The saved adapter as an artifact, and its size on disk."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        size = sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
        log({"adapter_size_mib": size / MIB})
        client.log_artifacts(run_id, folder, "adapter")
