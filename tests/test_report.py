"""The report reads MLflow alone and gives the same bytes for the same store: a golden test on a
store built here with known runs (two seeds of one cell, oom, diverged and skipped cells, learning
curves and memory series), its charts, its slide deck, and its errors."""

import re
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from harness.report import claims, report
from harness.report import findings as report_findings
from harness.report.findings import recommendation
from harness.report.runs import cells
from harness.tracking.runs import load_runs

GOLDEN = Path(__file__).with_name("golden")


def _log(client, experiment_id, name, params, metrics, status, reason="", series=()):
    """A finished run as the runner leaves it; series: (metric, [(step, value), ...])."""
    run = client.create_run(experiment_id, run_name=name, start_time=len(_log.started) * 1000,
                            tags={"status": status})
    _log.started.append(name)
    run_id = run.info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()])
    for metric, points in series:
        client.log_batch(run_id, metrics=[Metric(metric, value, step, step)
                                          for step, value in points])
    if reason:
        client.set_tag(run_id, "status_reason", reason)
    client.set_terminated(run_id, "FINISHED" if status in ("ok", "skipped") else "FAILED",
                          end_time=len(_log.started) * 1000 + 500)


_log.started = []


# The study's setup (its recipes at batch 8) as a run's params record it.
STUDY = {"full": {"data.source_max_length": "p100", "data.target_max_length": "p100",
                  "data.padding": "max_length", "train.batch_size": 8,
                  "train.gradient_checkpointing": False, "model.attn_implementation": "eager"},
         "lora": {"data.source_max_length": "p85", "data.target_max_length": "p90",
                  "data.padding": "max_length", "train.batch_size": 8,
                  "train.gradient_checkpointing": True, "model.attn_implementation": "eager"}}


def _cell(model, method, precision, rank=None, optimizer="adamw", seed=42, setup=None):
    params = {"model.name": model, "method.name": method, "method.optimizer": optimizer,
              "precision.name": precision, "train.seed": seed, "tracking.uri": "anywhere",
              **(STUDY.get(method, STUDY["lora"]) if setup is None else setup)}
    if rank is not None:
        params["method.r"] = rank
    return params


def _measured(rouge1, gpu, cpu=4000.0, tokens=3000.0, pct=100.0, params=850.0, grads=850.0,
              optimizer=1700.0, activations=3000.0):
    return {"rouge1": rouge1, "rouge2": rouge1 / 2, "train_time_s": 2400.0, "gpu_peak_mib": gpu,
            "estimate_gpu_mib": 0.9 * gpu, "cost_usd": 0.67 * (gpu or 1000) / 14000,
            "train_tokens_per_usd": 2400 * tokens / (0.67 * (gpu or 1000) / 14000),
            "cpu_peak_mib": cpu, "tokens_per_s": tokens, "trainable_pct": pct,
            "total_params": 2.5e8, "mem_params_mib": params, "mem_grads_mib": grads,
            "mem_optimizer_mib": optimizer, "mem_activations_mib": activations,
            "predicted_train_time_s": 0.4 * 2400.0, "mfu": 0.1 * tokens / 3000}


def _curve(losses, rouges):
    """Per epoch at steps 100, 200, ...: epoch, eval_loss, eval_rouge1."""
    steps = [100 * (i + 1) for i in range(len(losses))]
    return [("epoch", [(s, i + 1) for i, s in enumerate(steps)]),
            ("eval_loss", list(zip(steps, losses))), ("eval_rouge1", list(zip(steps, rouges)))]


def _memory(peak):
    return [("gpu_mib", [(0, 600.0), (1000, peak / 2), (2000, peak), (3000, peak * 0.9)])]


# The inference benchmark and checkpoint sizes of the golden store's LoRA r4 cell.
INFERENCE = {"infer_latency_ms_p50": 13.0, "infer_latency_ms_p50_base": 10.0,
             "infer_latency_ms_p50_merged": 10.3, "infer_tokens_per_s": 2400.0,
             "full_checkpoint_mib": 945.0, "adapter_size_mib": 1.8}


@pytest.fixture
def golden_store(tmp_path):
    _log.started.clear()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("golden", artifact_location=str(tmp_path / "a"))
    base = "flan-t5-base"
    _log(client, experiment, "full", _cell(base, "full", "fp32"),
         _measured(51.0, 14000.0), "ok", series=_memory(14000.0))
    # Two seeds of one LoRA cell: mean ± std.
    for seed, rouge1, gpu in ((1, 51.5, 3300.0), (2, 52.5, 3500.0)):
        _log(client, experiment, f"lora-r8 seed {seed}", _cell(base, "lora", "fp32", 8, seed=seed),
             _measured(rouge1, gpu, pct=0.36, grads=3.4, optimizer=6.8, activations=1500.0),
             "ok", series=[*_curve([1.5, 1.4, 1.45], [48.0, 50.0, 49.0]), *_memory(gpu)])
    # At batch 4: not the study's setup, so not beside its figures.
    _log(client, experiment, "lora-r4", _cell(base, "lora", "fp32", 4,
                                              setup={**STUDY["lora"], "train.batch_size": 4}),
         {**_measured(51.2, 3200.0, pct=0.18, grads=1.7, optimizer=3.4, activations=1450.0),
          **INFERENCE}, "ok",
         series=[*_curve([1.5, 1.38, 1.36], [48.5, 50.5, 51.0]), *_memory(3200.0)])
    _log(client, experiment, "lomo", _cell(base, "lomo", "fp32", optimizer="sgd"),
         _measured(49.0, 5200.0, tokens=2500.0, grads=9.0, optimizer=0.0), "ok")
    _log(client, experiment, "full fp16", _cell(base, "full", "fp16"), {"total_params": 2.5e8},
         "diverged", "loss nan at step 3 (epoch 0), precision fp16")
    _log(client, experiment, "full int8", _cell(base, "full", "int8"), {}, "skipped",
         "method=full updates the base weights, which precision=int8 stores quantized")
    _log(client, experiment, "xl lora", _cell("flan-t5-xl", "lora", "fp32", 8),
         {"total_params": 2.85e9, "cpu_peak_mib": 12000.0}, "oom",
         "train: out of memory: CUDA out of memory")
    return uri


def _render(uri, out):
    assert report.main(["--experiment", "golden", "--tracking-uri", uri, "--out", str(out)]) == 0
    return {path.name: path.read_bytes() for path in sorted(out.iterdir())}


def test_the_report_is_the_golden_markdown(golden_store, tmp_path):
    files = _render(golden_store, tmp_path / "out")
    assert files["report.md"].decode() == (GOLDEN / "report.md").read_text()


def test_the_same_store_gives_the_same_bytes(golden_store, tmp_path):
    assert _render(golden_store, tmp_path / "one") == _render(golden_store, tmp_path / "two")


def test_every_chart_is_drawn_and_referenced(golden_store, tmp_path):
    files = _render(golden_store, tmp_path / "out")
    charts = {"breakdown.png", "rouge_vs_memory.png", "rouge_vs_cost.png", "learning_curves.png",
              "memory_over_time_flan-t5-base.png"}
    assert charts <= set(files)
    for name in charts:
        assert files[name].startswith(b"\x89PNG") and len(files[name]) > 10_000
        assert f"]({name})" in files["report.md"].decode()
        assert f"]({name})" in files["slides.md"].decode()


def test_the_deck_is_marp_with_a_slide_per_section(golden_store, tmp_path):
    deck = _render(golden_store, tmp_path / "out")["slides.md"].decode()
    front, *slides = deck.split("\n---\n")  # front matter, then one slide per part
    assert front.startswith("---\n") and re.search(r"^marp: true$", front, re.MULTILINE)
    titles = [slide.strip().splitlines()[0] for slide in slides]
    assert titles == ["# Fine-tuning flan-t5: experiment `golden`", "## Results",
                      "## Memory breakdown", "## ROUGE-1 against memory",
                      "## ROUGE-1 against cost", "## Learning curves",
                      "## Memory over time, flan-t5-base", "## Findings",
                      "## The LoRA paper's claims, here", "## Recommendation"]
    assert deck == (GOLDEN / "slides.md").read_text()


def _cpu_only_store(tmp_path, left_out: tuple, params: dict | None = None,
                    series: bool = False) -> str:
    """Two t5-mini cells (full, lora-r8) measured on host memory only, each process holding
    500 MiB before its model loaded; the store's URI."""
    _log.started.clear()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("golden", artifact_location=str(tmp_path / "a"))
    for method, cpu, rouge1 in (("full", 700.0, 10.0), ("lora", 650.0, 9.0)):
        metrics = {key: value for key, value in
                   {**_measured(rouge1, 0.0, cpu=cpu), "cpu_baseline_mib": 500.0}.items()
                   if key not in left_out}
        cell = {**_cell("t5-mini", method, "fp32", 8 if method == "lora" else None),
                **(params or {})}
        _log(client, experiment, method, cell, metrics, "ok",
             series=[("cpu_mib", [(0, 300.0), (500, cpu)])] if series else ())
    return uri


def _table(markdown: str, column: str) -> list[dict]:
    """The rows of the first markdown table with this column, as {header: cell}."""
    lines = markdown.splitlines()
    start = next(number for number, line in enumerate(lines)
                 if line.startswith("|") and f" {column} " in line)
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))))
    return rows


def test_a_cpu_only_store_reports_host_memory_and_says_so(tmp_path):
    uri = _cpu_only_store(tmp_path, ("gpu_peak_mib", "mem_activations_mib"), series=True)
    files = _render(uri, tmp_path / "out")
    markdown = files["report.md"].decode()
    assert "This store has no GPU figures" in markdown
    # Ratios and breakdown compare the cells above their processes' 500 MiB baseline (150 vs
    # 200 MiB, not 650 vs 700); the table's CPU memory stays the whole peak.
    table = _table(markdown, "host memory / full FT")
    assert [row["host memory / full FT"] for row in table] == ["1.00", "0.75"]
    assert [row["CPU memory (MiB)"] for row in table] == ["700", "650"]
    assert "lora-r8/fp32 needs 75 % of full fine-tuning's host memory above the process's " \
           "baseline (150 vs 200 MiB) at a ROUGE-1 change of -1.00 points" in markdown
    assert "(cpu_baseline_mib) are left out of every bar" in markdown
    assert "no GPU in these runs" in files["slides.md"].decode()
    assert {"breakdown.png", "rouge_vs_memory.png", "memory_over_time_t5-mini.png"} <= set(files)
    # Runs logged before cpu_baseline_mib existed keep their whole peak.
    (tmp_path / "older").mkdir()
    older = _cpu_only_store(tmp_path / "older", ("gpu_peak_mib", "cpu_baseline_mib"))
    assert [row["host memory / full FT"] for row in _table(
        _render(older, tmp_path / "older-out")["report.md"].decode(),
        "host memory / full FT")] == ["1.00", "0.93"]


def test_the_recommendation_picks_per_gpu_budget_the_best_and_the_cheapest_close_to_it(
        golden_store):
    rows = cells(load_runs("golden", golden_store))
    advice = recommendation(rows).set_index("GPU budget")
    # 16 GB holds every flan-t5-base cell: the best is lora-r8 (52.00, two seeds), and within 1
    # point of it the cheapest is lora-r4 (51.20 at 3200 MiB, which costs least here).
    assert advice.loc["16 GB", "best ROUGE-1"] == "flan-t5-base/lora-r8/fp32: 52.00, 3400 MiB"
    assert advice.loc["16 GB", "cheapest within 1 point"].startswith(
        "flan-t5-base/lora-r4/fp32: 51.20, 3200 MiB, 0.153 USD")
    assert list(advice.index) == ["16 GB", "24 GB", "40 GB", "80 GB"]
    # A cell without a GPU measurement counts by its estimate, and says so.
    rows.loc[rows.label == "flan-t5-base/lora-r8/fp32", "gpu_peak_mib"] = float("nan")
    assert "(estimate)" in recommendation(rows).iloc[0]["best ROUGE-1"]


def test_toy_runs_say_what_they_cannot_show(tmp_path):
    # Random-init models on a CPU: no comparison, no recommendation, and the setup says so.
    uri = _cpu_only_store(tmp_path, ("gpu_peak_mib",),
                          {"model.source": "random", "data.name": "fixture"})
    markdown = _render(uri, tmp_path / "out")["report.md"].decode()
    assert "What ran: t5-mini (random weights); data fixture;" in markdown
    assert markdown.index("What ran:") < markdown.index("| model")
    findings = markdown[markdown.index("## Findings"):markdown.index("## Charts")]
    assert "not how the methods compare" in findings and "% of full fine-tuning" not in findings
    assert "None from these runs" in markdown


REFERENCE_PLAN = Path(__file__).parents[1] / "reports" / "reference_table" / "plan.csv"


def test_the_report_ends_with_the_reference_table_s_estimated_plan(golden_store, tmp_path):
    # As make demo adds it: the committed plan of the reference table, from make plan.
    out = tmp_path / "out"
    assert report.main(["--experiment", "golden", "--tracking-uri", golden_store,
                        "--out", str(out), "--plan", str(REFERENCE_PLAN)]) == 0
    markdown = (out / "report.md").read_text()
    section = markdown[markdown.index("## Estimated GPU memory: the plan of `reference_table`"):]
    assert markdown.index("## Recommendation") < markdown.index(section)
    assert "estimated here without one" in section and "NVIDIA A10G (the study's)" in section
    rows = {row["cell"]: row for row in _table(section, "estimate (MiB)")}
    # The study's six rows and LoRA+LOMO per size, by part, beside the published figures.
    assert len(rows) == 9
    full = rows["flan-t5-base/full/fp32"]
    fits = "fits NVIDIA A10G (the study's)"
    assert (full["estimate (MiB)"], full["published (MB)"], full[fits]) == ("14690", "14830", "yes")
    parts = ("weights", "gradients", "optimizer state", "activations", "allocator cache",
             "CUDA context")
    assert abs(sum(float(full[part]) for part in parts) - 14690) <= len(parts)
    assert rows["flan-t5-xl/lora_lomo-r16/fp32"]["published (MB)"] == "—"
    assert "![Estimated GPU memory, reference_table](plan_reference_table.png)" in section
    assert (out / "plan_reference_table.png").stat().st_size > 10_000
    deck = (out / "slides.md").read_text()
    assert "## Estimated GPU memory: `reference_table` (no GPU ran)" in deck
    assert "![h:480](plan_reference_table.png)" in deck


@pytest.mark.parametrize("content, message", [
    (None, "no such file; write it first with `make plan EXP=<experiment>`"),
    ("cell,estimate_mib\nx,1\n", "not a plan as `make plan` writes it today (no column "
                                   "fingerprint, gpu, gpu_mib, fits, weights_mib"),
])
def test_a_plan_that_is_not_one_is_refused_before_the_store_is_read(tmp_path, capsys, content,
                                                                     message):
    path = tmp_path / "reference_table" / "plan.csv"
    if content is not None:
        path.parent.mkdir()
        path.write_text(content)
    store = f"sqlite:///{tmp_path}/never.db"
    assert report.main(["--experiment", "golden", "--tracking-uri", store, "--out",
                        str(tmp_path / "out"), "--plan", str(path)]) == 2
    assert f"error: --plan {path}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "never.db").exists()


def test_unknown_experiment_names_the_ones_there(golden_store, capsys):
    assert report.main(["--experiment", "nope", "--tracking-uri", golden_store]) == 2
    error = capsys.readouterr().err
    assert "no experiment 'nope'" in error and "golden" in error


def test_published_tables_are_compared_like_with_like(tmp_path):
    """peft's figure is torch's allocated peak: our allocated peak and the estimate's tensors
    stand beside it; the OpenCALM study gives a range in words."""
    _log.started.clear()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("published", artifact_location=str(tmp_path / "a"))
    # Each in its table's setup (harness/core/reference.yaml).
    peft_setup = {"data.source_max_length": 128, "data.target_max_length": 8,
                  "data.padding": "longest", "train.batch_size": 8,
                  "train.gradient_checkpointing": False, "model.attn_implementation": "eager",
                  "train.optimizer_impl": "for_loop"}
    opencalm_setup = {**peft_setup, "data.target_max_length": 128, "train.batch_size": 4,
                      "train.gradient_checkpointing": True}
    _log(client, experiment, "mt0 lora", _cell("mt0-xxl", "lora", "fp32", 8, setup=peft_setup),
         {**_measured(40.0, 60000.0), "torch_peak_allocated_mib": 55000.0,
          "estimate_allocated_mib": 61600.0}, "ok")
    _log(client, experiment, "opencalm int8",
         _cell("opencalm-7b", "lora", "int8", 8, setup=opencalm_setup),
         _measured(30.0, 15000.0), "ok")
    # Another rank than peft's r=8: a cell of another setup, beside no figure.
    _log(client, experiment, "mt0 lora r16",
         _cell("mt0-xxl", "lora", "fp32", 16, setup=peft_setup), _measured(41.0, 61000.0), "ok")
    assert report.main(["--experiment", "published", "--tracking-uri", uri,
                        "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    lines = [[cell.strip() for cell in line.split("|")[1:-1]]
             for line in text.split("## Beside the reference")[1].splitlines()
             if line.startswith("| ")]
    header, rows = lines[0], {line[0]: line for line in lines[1:]}
    peft, opencalm = (dict(zip(header, rows[name])) for name in ("peft_table", "opencalm"))
    assert peft["GPU measured as"] == "torch allocated peak"
    assert peft["GPU memory (MiB)"] == "55000" and peft["GPU memory, reference (MB)"] == "56000"
    assert peft["GPU estimate (MiB)"] == "61600" and peft["estimate / reference"] == "1.10"
    assert opencalm["GPU measured as"] == "NVML peak" and opencalm["GPU memory (MiB)"] == "15000"
    assert opencalm["GPU memory, reference (MB)"] == "12000-20000 (a dozen-odd GB)"
    assert opencalm["estimate / reference"] == f"{0.9 * 15000 / 16000:.2f}"
    assert "peft_table: peft's README" in text and "opencalm: the OpenCALM-7B" in text
    section = text.split("## Beside the reference")[1].split("\n## ")[0]
    assert [line.split("|")[1].strip() for line in section.splitlines()
            if line.startswith("| ")][1:] == ["peft_table", "opencalm"]  # after the header
    assert "- mt0-xxl/lora-r16/fp32 (peft_table): r=16 (published: 8)" in text


def test_the_lora_claims_section_computes_its_verdicts_from_the_runs(golden_store, tmp_path):
    text = _render(golden_store, tmp_path / "out")["report.md"].decode()
    section = text.split("## The LoRA paper's claims, here")[1].split("\n## ")[0]
    rows = {cells[2]: cells for cells in ([c.strip() for c in line.split("|")[1:-1]]
                                          for line in section.splitlines()
                                          if line.startswith("| flan-t5-base"))}
    assert {row[1] for row in rows.values()} == {"flan-t5-base/lora-r4/fp32"}
    # (figure, verdict) from the runs: 10.3 / 10, 13 / 10, 945 / 1.8, 3200 / 14000, 3000 / 3000.
    assert [rows[claim][5:7] for claim in claims.CLAIMS] == [
        ["1.03", "holds"], ["1.30", "measured"], ["525.00", "holds"], ["0.23", "holds"],
        ["1.00", "does not hold"]]


def test_the_recommendation_per_gpu_count_takes_the_best_cell_that_fits_that_many():
    rows = pd.DataFrame([
        {"label": "m/full/fp32", "ranks": 1, "rouge1": 50.0, "gpu_peak_mib": 60_000},
        {"label": "m/full/fp32/fsdp-x4", "ranks": 4, "rouge1": 50.0, "gpu_peak_mib": 20_000},
        {"label": "m/lora-r8/fp32", "ranks": 1, "rouge1": 48.0, "gpu_peak_mib": 15_000},
        {"label": "m/lora-r8/fp32/zero3_offload-x1", "ranks": 1, "rouge1": 48.0,
         "gpu_peak_mib": 9_000, "cpu_peak_mib": 40_000},
        {"label": "m/full/fp32/fsdp-x8", "ranks": 8, "rouge1": 52.0, "gpu_peak_mib": 12_000,
         "status": "oom"}]).assign(estimate_gpu_mib=float("nan"))
    rows["status"] = rows.get("status").fillna("ok")
    rows["cpu_peak_mib"] = rows.cpu_peak_mib.fillna(3_000)
    table = report_findings.per_gpu_count(rows).set_index("GPUs")
    assert table.loc[1, "16 GB each"].startswith("m/lora-r8/fp32: 48.00, 15000 MiB")
    assert table.loc[1, "80 GB each"].startswith("m/full/fp32: 50.00")
    assert table.loc[4, "24 GB each"].startswith("m/full/fp32/fsdp-x4: 50.00, 20000 MiB")
    assert table.loc[2, "24 GB each"].startswith("m/lora-r8/fp32")  # fsdp-x4 needs four
    assert "fsdp-x8" not in table.to_string()  # it ran out of memory
    assert report_findings.per_gpu_count(rows[rows.ranks == 1]).empty  # one GPU's runs: no table


def test_a_store_with_distributed_cells_shows_their_strategy_and_a_table_per_gpu_count(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("golden", artifact_location=str(tmp_path / "a"))
    base = "flan-t5-base"
    _log(client, experiment, "full", _cell(base, "full", "fp32"), _measured(50.0, 14000.0), "ok")
    fsdp = {**_cell(base, "full", "fp32"), "strategy.name": "fsdp",
            "strategy.nproc_per_node": 4, "strategy.nnodes": 1}
    _log(client, experiment, "full fsdp", fsdp, _measured(50.1, 6000.0, cpu=9000.0), "ok")
    markdown = _render(uri, tmp_path / "out")["report.md"].decode()
    rows = {row["strategy"]: row for row in _table(markdown, "strategy")}
    assert set(rows) == {"single", "fsdp x4"}
    assert rows["fsdp x4"]["GPU memory (MiB)"] == "6000"  # its fullest GPU's
    section = markdown[markdown.index("## On 1, 2, 4 and 8 GPUs"):]
    per_count = {row["GPUs"]: row for row in _table(section, "16 GB each")}
    assert per_count["4"]["16 GB each"].startswith("flan-t5-base/full/fp32/fsdp-x4: 50.10, "
                                                   "6000 MiB")
    assert per_count["1"]["16 GB each"].startswith("flan-t5-base/full/fp32: 50.00")
