"""Real cells through the runner: a fresh process each, a real sqlite MLflow store."""

import json
import re

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from harness.cell import recipe
from harness.config import identity
from harness.estimate import estimate, work
from harness.measure import traces
from harness.run import runner
from harness.tracking import names
from tests.conftest import compose_cell, requires_cuda, runs_of

pytestmark = pytest.mark.slow

CONTRACT_PARAMS = {"model.name", "model.source", "method.name", "method.r", "method.alpha",
                   "method.target_modules", "method.optimizer", "precision.name", "data.name",
                   "train.epochs", "train.max_steps", "train.batch_size", "train.lr",
                   "train.warmup_steps", "train.seed", "runner.cpu_memory_limit_mib",
                   "tracking.uri", "tracking.experiment"}


def _run(store, overrides, *more):
    cfg = compose_cell(*overrides, *more)
    status = runner.run(cfg)
    runs = runs_of(store, cfg.tracking.experiment)
    return status, runs


def _rouge1(store, overrides, *more):
    status, runs = _run(store, overrides, *more)
    assert status == "ok", runs[0].data.tags
    return runs[0].data.metrics["rouge1"]


@pytest.mark.parametrize("method, lr, steps", [("full", 1e-3, 150), ("lora", 1e-2, 300)])
def test_training_beats_the_untrained_model(store, cell_overrides, method, lr, steps):
    untrained = _rouge1(store, cell_overrides, f"method={method}",
                        "train.max_steps=0", "tracking.experiment=untrained-" + method)
    trained = _rouge1(store, cell_overrides, f"method={method}", f"train.lr={lr}",
                      f"train.max_steps={steps}")
    assert trained > untrained + 1, (trained, untrained)


def test_a_finished_run_carries_every_contract_name(store, cell_overrides):
    status, runs = _run(store, cell_overrides, "method=lora", "train.max_steps=4",
                        "eval.max_samples=6", "eval.infer=true")
    assert status == "ok" and len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    # Every metric and tag harness/tracking/names.py declares for every run, and none it
    # leaves out (an adapter method's and the inference benchmark's too).
    for logged, declared in ((run.data.metrics, names.METRICS), (run.data.tags, names.TAGS)):
        assert names.undeclared(logged, declared) == set()
        assert names.missing(logged, declared) == set()
    assert {"adapter_size_mib", "infer_latency_ms_p50_merged"} <= set(run.data.metrics)
    assert CONTRACT_PARAMS <= set(run.data.params)
    assert run.data.tags["status"] == "ok" and len(run.data.tags["cell"]) == 12
    client = MlflowClient(store["uri"])
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "predictions.csv", "adapter", "memory_trace.csv",
            "memory_trace.png"} <= artifacts
    if not torch.cuda.is_available():
        # On CPU the allocator keeps no peak: activations are left out rather than guessed.
        assert not {"mem_activations_mib", "gpu_peak_mib"} & set(run.data.metrics)
    folder = download_artifacts(run_id=run.info.run_id, tracking_uri=store["uri"])
    predictions = pd.read_csv(f"{folder}/predictions.csv", keep_default_na=False)
    assert list(predictions.columns) == ["id", "reference", "prediction"]
    assert len(predictions) == 6 and predictions["id"].iloc[0] == "test-0000"
    trace = pd.read_csv(f"{folder}/memory_trace.csv")
    assert list(trace.columns) == ["time_s", "phase", "gpu_mib", "gpu_device_mib", "cpu_mib"]
    assert list(trace["phase"].unique()) == ["load", "train", "eval", "infer"]
    # The peaks: the sampled tree's, raised to the cell process's own high-water mark of each
    # phase (the kernel's) where that is higher; on a CPU cell sampled every cpu_interval_ms.
    marks = {phase: run.data.metrics[f"cpu_{phase}_hwm_mib"] for phase in traces.PHASES}
    for phase, mark in marks.items():
        sampled = trace.loc[trace["phase"] == phase, "cpu_mib"].max()
        assert run.data.metrics[f"cpu_{phase}_peak_mib"] == pytest.approx(max(sampled, mark),
                                                                         abs=0.01)
    assert run.data.metrics["cpu_peak_mib"] == pytest.approx(
        max(trace["cpu_mib"].max(), *marks.values()), abs=0.01)
    if not torch.cuda.is_available():
        assert 0.045 < trace["time_s"].diff().median() < 0.1
    # The process with its libraries imported, before the model: below every sample of the load
    # phase's peak, and well above a bare interpreter (torch alone is a few hundred MiB).
    baseline = run.data.metrics["cpu_baseline_mib"]
    assert 150 < baseline < run.data.metrics["cpu_load_peak_mib"]
    series = client.get_metric_history(run.info.run_id, "cpu_mib")
    assert 10 < len(series) <= 2000
    assert max(m.value for m in series) == pytest.approx(trace["cpu_mib"].max(), abs=0.01)
    # LoRA r=8 on q,v: AdamW keeps two moments per adapter weight.
    metrics = run.data.metrics
    assert metrics["mem_grads_mib"] == pytest.approx(metrics["trainable_params"] * 4 / 2**20)
    assert metrics["mem_optimizer_mib"] >= 2 * metrics["mem_grads_mib"]
    assert "adapter_model.safetensors" in {a.path.split("/")[-1] for a in
                                           client.list_artifacts(run.info.run_id, "adapter")}
    # What it trained and evaluated on, as MLflow dataset inputs (the UI's Dataset column).
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["fixture-test", "fixture-train", "fixture-validation"]
    assert {name: d.tags[0].value for name, d in inputs.items()} == {
        "fixture-train": "training", "fixture-validation": "validation",
        "fixture-test": "testing"}
    assert json.loads(inputs["fixture-train"].dataset.profile) == {"num_rows": 400}
    assert inputs["fixture-train"].dataset.source_type == "code"
    # The adapter as an MLflow model of the run (the UI's Models column): adapter weights only,
    # loadable back with MLflow's pyfunc flavour, summarising dialogues.
    logged = client.search_logged_models([run.info.experiment_id])
    assert [model.source_run_id for model in logged] == [run.info.run_id]
    files = {a.path for a in client.list_logged_model_artifacts(logged[0].model_id,
                                                                 "artifacts/adapter")}
    assert "artifacts/adapter/adapter_model.safetensors" in files
    assert not any(path.endswith("/model.safetensors") for path in files)
    mlflow.set_tracking_uri(store["uri"])
    summarizer = mlflow.pyfunc.load_model(f"models:/{logged[0].model_id}")
    summaries = summarizer.predict(["Anna: Shall we meet at 5?", "Ben: I left the keys."])
    assert len(summaries) == 2 and all(isinstance(text, str) for text in summaries)


def test_a_recipe_cell_logs_its_resolved_lengths_and_its_estimate(store, cell_overrides):
    # The study's LoRA recipe on the fixture: percentile cuts, padding, checkpointing.
    status, runs = _run(store, cell_overrides, "method=lora", "+recipe=samsum_lora",
                        "model.attn_implementation=sdpa", "train.max_steps=2",
                        "eval.max_samples=2")
    assert status == "ok"
    params, metrics = runs[0].data.params, runs[0].data.metrics
    assert (params["data.source_max_length"], params["data.target_max_length"]) == ("p85", "p90")
    assert (params["train.gradient_checkpointing"], params["data.padding"]) == ("True",
                                                                               "max_length")
    cut = {side: int(params[f"data.{side}_max_length_resolved"]) for side in ("source", "target")}
    assert 0 < cut["target"] < cut["source"] < 384
    # The plan's estimate of this cell, at the cuts it resolved, beside what it measured.
    parts = ("weights", "gradients", "optimizer", "activations", "allocator", "cuda_context")
    assert metrics["estimate_gpu_mib"] == pytest.approx(
        sum(metrics[f"estimate_{part}_mib"] for part in parts), abs=0.01)
    assert metrics["estimate_weights_mib"] == pytest.approx(metrics["mem_params_mib"], rel=1e-6)
    # Its work: the FLOPs of its step, at this CPU's measured peaks the predicted time beside
    # the measured, and what it achieved.
    flops, step_s = metrics["train_flops_per_step"], metrics["step_time_mean_s"]
    assert flops > 1e6 and metrics["train_tflops_per_s"] == pytest.approx(flops / step_s / 1e12)
    # Every batch padded to the cuts: the work counted is the cuts'.
    assert (metrics["train_source_length_mean"], metrics["train_target_length_mean"]) == (
        cut["source"], cut["target"])
    assert metrics["predicted_train_time_s"] == pytest.approx(metrics["predicted_step_s"]
                                                              * metrics["train_steps"])
    assert 0 < metrics["mfu"] < 2
    tags = runs[0].data.tags
    # (A machine where `make calibrate` ran says so after it: "; calibrated (make calibrate)".)
    assert tags["peaks_device"].startswith("CPU ") and tags["peaks_from"].startswith(
        "measured on this machine")


@pytest.mark.parametrize("bound, expected", [([], 64), (["eval.max_samples=10"], 10)])
def test_every_evaluation_pass_of_a_synthetic_cell_is_bounded(store, cell_overrides, bound,
                                                              expected):
    # Synthetic data measures memory and time: its eval-loss pass takes 64 examples unless told
    # (and, on a CPU, one batch unless told: eval.loss_max_batches).
    status, runs = _run(store, cell_overrides, "data=synthetic", "data.train_size=16",
                        "data.validation_size=300", "data.test_size=16", "train.max_steps=1",
                        "eval.loss_max_batches=null", *bound)
    assert status == "ok"
    assert runs[0].data.metrics["eval_examples"] == expected
    assert runs[0].data.params["eval.max_samples"] == str(expected)


def test_a_priced_run_logs_its_cost_and_training_tokens_per_dollar(store, cell_overrides):
    status, runs = _run(store, cell_overrides, "cost.usd_per_hour=3.6", "train.max_steps=2",
                        "eval.max_samples=2")
    assert status == "ok"
    metrics, tags = runs[0].data.metrics, runs[0].data.tags
    assert metrics["cost_usd"] == pytest.approx(metrics["train_time_s"] * 3.6 / 3600)
    assert metrics["train_tokens_per_usd"] == pytest.approx(metrics["train_tokens"]
                                                            / metrics["cost_usd"])
    assert (tags["cost_usd_per_hour"], tags["cost_price_from"]) == ("3.6", "cost.usd_per_hour")
    # Each batch padded to its longest: the work is counted at the mean padded lengths, less
    # than at the cuts.
    params = runs[0].data.params
    cuts = {side: int(params[f"data.{side}_max_length_resolved"]) for side in ("source", "target")}
    assert metrics["train_source_length_mean"] < cuts["source"]
    at_cuts = work.flops(estimate.step_work(identity.cell_config(compose_cell(
        *cell_overrides, "cost.usd_per_hour=3.6")), cuts))
    assert 0 < metrics["train_flops_per_step"] < at_cuts
    # Without a price (no GPU here to look one up by), no cost is made up.
    status, runs = _run(store, cell_overrides, "train.max_steps=2", "eval.max_samples=2",
                        "train.seed=7")
    assert status == "ok" and not any("cost_usd" in run.data.metrics for run in runs
                                      if run.data.params["train.seed"] == "7")


def test_an_oom_is_skipped_only_where_there_is_no_more_memory(store, cell_overrides):
    # The cap says how, not what: one cell, one fingerprint, three limits.
    cell = [*cell_overrides, "train.batch_size=400", "train.max_steps=2", "eval.max_samples=2"]
    assert _run(store, cell, "runner.cpu_memory_limit_mib=4000")[0] == "oom"
    status, runs = _run(store, cell, "runner.cpu_memory_limit_mib=3900")  # less room: skipped
    assert status == "oom" and len(runs) == 1
    assert (runs[0].data.tags["oom_limit"], runs[0].data.tags["oom_limit_mib"]) == ("cpu",
                                                                                   "4000")
    # The UI shows why with the run: its description.
    assert re.match(r"oom: (load|train): out of memory", runs[0].data.tags["mlflow.note.content"])
    status, runs = _run(store, cell, "runner.cpu_memory_limit_mib=30000")  # more: runs again
    assert status == "ok" and sorted(run.data.tags["status"] for run in runs) == ["ok", "oom"]
    assert len({run.data.tags["cell"] for run in runs}) == 1


def test_a_spawned_cell_without_sampler_trains_and_records_no_memory(store, cell_overrides):
    status, runs = _run(store, cell_overrides, "runner.start_method=spawn", "sampler.enabled=false",
                        "train.max_steps=2", "eval.max_samples=2")
    assert status == "ok"
    metrics = runs[0].data.metrics
    assert "train_time_s" in metrics and "rouge1" in metrics and "cpu_peak_mib" not in metrics


@pytest.mark.parametrize("method", ["lomo", "lora_lomo"])
def test_a_lomo_cell_trains_every_weight_holding_one_weight_gradient(store, cell_overrides,
                                                                      method):
    status, runs = _run(store, cell_overrides, f"method={method}", "train.max_steps=3",
                        "eval.max_samples=4")
    assert status == "ok"
    metrics = runs[0].data.metrics
    assert metrics["trainable_params"] == metrics["total_params"]
    # The largest weight of t5-tiny is a tenth of all: far less than every gradient at once.
    assert 0 < metrics["mem_grads_mib"] < metrics["mem_params_mib"] / 5


def test_int8_lora_cell_runs_on_cpu(store, cell_overrides):
    status, runs = _run(store, cell_overrides, "method=lora", "precision=int8",
                        "train.max_steps=3", "eval.max_samples=4")
    assert status == "ok"
    assert runs[0].data.params["precision.name"] == "int8"
    assert runs[0].data.metrics["trainable_params"] < runs[0].data.metrics["total_params"]


# Both families: the GPU check's OpenCALM-7B cell is a causal LoRA cell on synthetic data, in
# bf16 with checkpointing.
@pytest.mark.parametrize("family", [
    [], ["model=tiny-causal", "precision=bf16", "train.gradient_checkpointing=true"]],
    ids=["seq2seq", "causal"])
def test_synthetic_cell_measures_without_rouge(store, cell_overrides, family):
    status, runs = _run(store, cell_overrides, *family, "data=synthetic", "data.train_size=32",
                        "data.validation_size=8", "data.test_size=8", "train.max_steps=2",
                        "data.source_length_median=40", "data.target_length_median=10",
                        "eval.batch_size=2")
    assert status == "ok"
    metrics, params = runs[0].data.metrics, runs[0].data.params
    assert "rouge1" not in metrics and "eval_loss" in metrics
    assert "not computed" in runs[0].data.tags["rouge"]
    assert {"estimate_gpu_mib", "cpu_train_peak_mib"} <= set(metrics)
    # A memory-only cell: on a CPU no inference benchmark and an eval loss of one batch; on a
    # GPU both, whole (eval.infer=auto, eval.loss_max_batches=auto).
    cuda = torch.cuda.is_available()
    assert ("infer_latency_ms_p50_merged" in metrics) == cuda
    assert params["eval.infer_resolved"] == str(cuda)
    assert metrics["eval_examples"] == (8 if cuda else 2)


@pytest.mark.parametrize("overrides, on_cpu, on_gpu", [
    ([], (False, 1), (True, None)),  # random weights
    (["data=synthetic"], (False, 1), (True, None)),
    (["model.source=hub", "model=flan-t5-base", "data=samsum"], (True, None), (True, None)),
    (["eval.infer=true", "eval.loss_max_batches=null"], (True, None), (True, None)),
    (["model.source=hub", "model=flan-t5-base", "eval.infer=false", "eval.loss_max_batches=3"],
     (False, 3), (False, 3)),
])
def test_the_inference_benchmark_and_eval_loss_run_whole_where_they_measure_something(
        overrides, on_cpu, on_gpu):
    cfg = compose_cell(*overrides)
    for device, expected in ((torch.device("cpu"), on_cpu), (torch.device("cuda"), on_gpu)):
        resolved = recipe.resolved_eval(cfg, device)
        assert (resolved["infer"], resolved["loss_max_batches"]) == expected, device


def test_a_cell_that_raises_is_closed_as_failed(store, cell_overrides, tmp_path):
    # An existing folder passes validation; loading a model from it fails in the cell process.
    status, runs = _run(store, cell_overrides, f"model.source={tmp_path}", "model.tokenizer=byte")
    assert status == "failed"
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags["status"] == "failed"
    assert str(tmp_path) in runs[0].data.tags["status_reason"]


def test_a_finished_cell_is_not_run_again(store, cell_overrides):
    overrides = [*cell_overrides, "train.max_steps=1", "eval.max_samples=2"]
    assert _run(store, overrides)[0] == "ok"
    status, runs = _run(store, overrides)
    assert status == "ok" and len(runs) == 1
    status, runs = _run(store, overrides, "force=true")
    assert len(runs) == 2


@requires_cuda
@pytest.mark.gpu
def test_a_cuda_cell_has_nvml_and_allocator_peaks_and_the_whole_breakdown(store, cell_overrides):
    status, runs = _run(store, cell_overrides, "model=t5-mini", "method=full",
                        "train.max_steps=5", "eval.max_samples=4")
    assert status == "ok"
    metrics, tags = runs[0].data.metrics, runs[0].data.tags
    assert "NVML" in tags["gpu_memory_source"]
    # NVML sees the CUDA context on top of what the allocator reserved.
    assert metrics["gpu_peak_mib"] > metrics["torch_peak_reserved_mib"] \
        >= metrics["torch_peak_allocated_mib"] >= metrics["torch_train_peak_allocated_mib"]
    assert metrics["gpu_train_peak_mib"] > 0 and metrics["mem_activations_mib"] > 0
    parts = sum(metrics[f"mem_{part}_mib"] for part in ("params", "grads", "optimizer",
                                                          "activations"))
    assert parts == pytest.approx(metrics["torch_train_peak_allocated_mib"], rel=1e-6)


def test_rouge_every_epoch_gives_learning_curves_beside_eval_loss(store, cell_overrides):
    # What the rank sweep logs: per epoch, eval loss and ROUGE of the validation split.
    status, runs = _run(store, cell_overrides, "method=lora", "train.epochs=3",
                        "train.lr=1e-2", "data.train_size=32", "data.validation_size=8",
                        "eval.max_samples=4", "eval.rouge_every_epoch=true")
    assert status == "ok"
    client = MlflowClient(store["uri"])
    run_id = runs[0].info.run_id
    curves = {name: client.get_metric_history(run_id, name)
              for name in ("epoch", "eval_loss", "eval_rouge1", "eval_rouge2", "eval_rougeL")}
    # 32 examples at batch 8: 4 steps an epoch; one point per epoch, at its last step.
    assert [(m.step, m.value) for m in curves["epoch"]] == [(4, 1), (8, 2), (12, 3)]
    for name, history in curves.items():
        assert [m.step for m in history] == [4, 8, 12], name
    assert all(0 <= m.value <= 100 for m in curves["eval_rouge1"])
    # The test split's ROUGE stays the final, separate figure.
    assert "rouge1" in runs[0].data.metrics
