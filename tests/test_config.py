"""Config composition and validation: everything is refused before anything is loaded."""

import copy
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf, open_dict

from harness.config import grids, identity, validation
from harness.core.errors import ConfigError
from harness.core.files import digest
from harness.run import runner
from tests.conftest import REPO, compose_cell, runs_of


def test_defaults_compose_to_an_offline_cell():
    cfg = compose_cell()
    assert (cfg.model.name, cfg.method.name, cfg.precision.name, cfg.data.name) == \
        ("t5-tiny", "lora", "fp32", "fixture")
    assert cfg.model.source == "random"
    assert cfg.train.lr == cfg.method.lr  # train.lr follows the method's default
    validation.validate(cfg)


@pytest.mark.parametrize("name, d_model, layers", [("flan-t5-base", 768, 12),
                                                   ("flan-t5-large", 1024, 24),
                                                   ("flan-t5-xl", 2048, 24)])
def test_flan_t5_models_carry_their_architecture(name, d_model, layers):
    cfg = compose_cell(f"model={name}", "method=full", "precision=bf16")
    assert cfg.model.hub_id == f"google/{name}"
    assert cfg.model.architecture.d_model == d_model
    assert cfg.model.architecture.num_layers == layers
    assert cfg.train.lr == 5e-5


@pytest.mark.parametrize("group, valid", [("model", "flan-t5-base"), ("method", "lora"),
                                          ("precision", "int8"), ("data", "synthetic")])
def test_unknown_option_lists_the_valid_ones(group, valid):
    with pytest.raises(MissingConfigException) as error:
        compose_cell(f"{group}=nonexistent")
    assert "nonexistent" in str(error.value)
    assert valid in str(error.value)


@pytest.mark.parametrize("method", ["full", "lomo", "lora_lomo"])
def test_updating_base_weights_on_int8_is_an_invalid_cell(method):
    cfg = compose_cell(f"method={method}", "precision=int8")
    reason = validation.invalid_cell_reason(cfg)
    assert f"method={method}" in reason and "int8" in reason and "method=lora" in reason
    assert validation.invalid_cell_reason(compose_cell("method=lora", "precision=int8")) is None


@pytest.mark.parametrize("method", ["lomo", "lora_lomo"])
def test_lomo_with_gradient_accumulation_is_an_invalid_cell(method):
    reason = validation.invalid_cell_reason(compose_cell(f"method={method}",
                                                     "train.grad_accum_steps=4"))
    assert "train.grad_accum_steps=4" in reason and "train.grad_accum_steps=1" in reason
    assert validation.invalid_cell_reason(compose_cell(f"method={method}")) is None
    assert validation.invalid_cell_reason(compose_cell("method=full",
                                                   "train.grad_accum_steps=4")) is None


@pytest.mark.parametrize("overrides, reason", [
    (["strategy=ddp", "strategy.nproc_per_node=3"], "3 ranks (strategy.nproc_per_node=3 x "
                                                    "strategy.nnodes=1) do not divide "
                                                    "train.batch_size=8"),
    (["strategy=fsdp", "precision=int8"], "LLM.int8 weights are int8 tensors whose row scales "
                                          "live beside them"),
    (["strategy=zero3", "precision=nf4", "precision.quant_storage=uint8"],
     "FSDP and ZeRO-3 shard floating-point tensors only"),
    (["strategy=zero2", "precision=nf4"], "DeepSpeed's ZeRO-2 engine handles the frozen "
                                          "quantized weights"),
    (["strategy=zero2", "method=lomo"], "ZeRO-2 engine (strategy=zero2) owns the optimizer"),
    (["strategy=zero2", "method=lora_lomo"], "use strategy=zero3 (LOMO's own setting"),
    (["strategy=fsdp", "method.optimizer=adamw_8bit"], "method.optimizer=adamw_8bit is "
                                                       "bitsandbytes'"),
    (["strategy=fsdp", "precision=fp16"], "GradScaler decides on one rank's shard"),
    (["strategy=zero3", "precision=bf16", "precision.master_weights=false", "method=full"],
     "DeepSpeed's optimizer keeps float32 partitions"),
])
def test_combinations_a_strategy_cannot_train_are_invalid_cells(overrides, reason):
    assert reason in validation.invalid_cell_reason(compose_cell(*overrides))


@pytest.mark.parametrize("overrides", [
    ["strategy=ddp", "precision=int8"],            # every rank holds the quantized base whole
    ["strategy=fsdp", "precision=nf4"],            # QLoRA: 4-bit values stored in bf16, sharded
    ["strategy=fsdp_offload", "precision=nf4", "precision.quant_storage=fp32"],
    ["strategy=zero3", "precision=nf4"],
    ["strategy=fsdp", "method=lomo"],              # reduced shards reach LOMO's hooks
    ["strategy=zero3", "method=lomo"],             # LOMO's own: partitions updated in hooks
    ["strategy=zero3", "method=lomo", "precision=fp16", "precision.master_weights=false"],
    ["strategy=fsdp", "method=lomo", "precision=fp16", "precision.master_weights=false"],
    ["strategy=ddp", "precision=fp16", "method=full"],
    ["strategy=zero3_offload", "method=lora", "train.batch_size=3"],  # one rank by default
])
def test_combinations_a_strategy_trains_are_valid(overrides):
    cfg = compose_cell(*overrides)
    validation.validate(cfg)
    assert validation.invalid_cell_reason(cfg) is None


def test_a_world_larger_than_the_gpus_the_runner_may_claim_is_refused_on_a_gpu_machine():
    cfg = compose_cell("strategy=fsdp", "strategy.nproc_per_node=4", "runner.gpus=[0,1]")
    reason = validation.machine_reason(cfg, cuda=True)
    assert "strategy.nproc_per_node=4 ranks need as many GPUs" in reason
    assert "may claim 2 (0,1" in reason
    assert validation.machine_reason(cfg, cuda=False) is None  # CPU ranks are processes


def test_lomo_methods_have_their_own_rates():
    lora_lomo = compose_cell("method=lora_lomo", "method.lr_lora=2e-3")
    assert (lora_lomo.train.lr, lora_lomo.method.lr_base) == (2e-3, 1e-3)
    assert compose_cell("method=lomo").train.lr == 1e-3
    assert identity.run_name(identity.cell_config(
        compose_cell("method=full", "method.optimizer=sgd"))) == "t5-tiny/full_sgd/fp32"
    assert identity.run_name(identity.cell_config(compose_cell("method=lora_lomo"))) == \
        "t5-tiny/lora_lomo-r8/fp32"


def test_a_single_invalid_cell_is_refused_without_a_run(cell_overrides, store):
    cfg = compose_cell("method=full", "precision=int8", *cell_overrides)
    with pytest.raises(ConfigError, match="int8"):
        runner.run(cfg)
    assert runs_of(store, cfg.tracking.experiment) == []


def test_fingerprint_is_stable_and_ignores_where_runs_are_logged():
    first = identity.cell_config(compose_cell("method.r=4"))
    again = identity.cell_config(compose_cell("method.r=4", "tracking.experiment=other"))
    other = identity.cell_config(compose_cell("method.r=16"))
    checkpointed = identity.cell_config(compose_cell("method.r=4",
                                                   "train.gradient_checkpointing=true"))
    padded = identity.cell_config(compose_cell("method.r=4", "data.padding=max_length"))
    assert identity.fingerprint(first) == identity.fingerprint(again)
    assert len({identity.fingerprint(cell) for cell in (first, other, checkpointed, padded)}) == 4


# The fingerprints stores hold for the reference rows and a demo cell. A store counts a cell as
# finished by its fingerprint: changing one re-runs it for every user. A key added with a default
# that keeps what cells compute leaves them as they are (identity.SINCE); a change here is made
# on purpose, with a note in the change.
PINNED = {"reference_table": ["c0bb905f9aa8", "e71cad9da35f", "2d300a8737c0", "1d90c2114473",
                              "9ebe6d0b99a3", "9df90e19029a", "6764fef0e862", "66d4883dc555",
                              "d5d862951063"],
          # The demo's fixture halved (200 train, 25 test) and its steps with it, on purpose: it
          # was fffc8f1975e9 at 400 / 50 and 60 steps.
          "demo": ["8310fe2a599c"]}


@pytest.mark.parametrize("experiment", PINNED)
def test_fingerprints_are_pinned_across_upgrades(experiment):
    jobs = grid(experiment, "model=t5-tiny") if experiment == "demo" else grid(experiment)
    found = [identity.fingerprint(identity.cell_config(job)) for job in jobs]
    assert found[:len(PINNED[experiment])] == PINNED[experiment]


def test_a_key_added_at_its_default_leaves_the_fingerprint_as_it_was():
    cell_cfg = identity.cell_config(compose_cell())
    assert cell_cfg["eval"]["infer"] == "auto" and "loss_max_batches" in cell_cfg["eval"]
    before = copy.deepcopy(cell_cfg)  # as the version before SINCE's keys hashed it
    before["eval"]["infer"] = True
    del before["eval"]["loss_max_batches"]
    del before["precision"]["master_weights"]
    del before["precision"]["autocast"]
    del before["train"]["optimizer_impl"]
    del before["strategy"]  # a single process hashes as before the strategy axis came
    assert identity.fingerprint(cell_cfg) == digest(before, 12)
    # Away from its default a key is part of the cell.
    for override in ("eval.infer=false", "eval.loss_max_batches=5", "train.optimizer_impl=fused"):
        assert identity.fingerprint(identity.cell_config(compose_cell(override))) != \
            identity.fingerprint(cell_cfg)


def test_the_strategy_is_part_of_the_cell_and_its_name_but_its_timeout_is_not():
    single = identity.cell_config(compose_cell())
    fsdp = identity.cell_config(compose_cell("strategy=fsdp"))
    patient = identity.cell_config(compose_cell("strategy=fsdp", "strategy.timeout_s=60"))
    wider = identity.cell_config(compose_cell("strategy=fsdp", "strategy.nproc_per_node=4"))
    assert len({identity.fingerprint(cell) for cell in (single, fsdp, wider)}) == 3
    assert identity.fingerprint(patient) == identity.fingerprint(fsdp)
    assert identity.run_name(single) == "t5-tiny/lora-r8/fp32"
    assert identity.run_name(fsdp) == "t5-tiny/lora-r8/fp32/fsdp-x2"
    two_nodes = identity.cell_config(compose_cell("strategy=zero3", "strategy.nnodes=2",
                                                  "strategy.nproc_per_node=8"))
    assert identity.run_name(two_nodes).endswith("/zero3-2x8")
    params = identity.flat_params(fsdp, compose_cell("strategy=fsdp"))
    assert (params["strategy.name"], params["strategy.nproc_per_node"]) == ("fsdp", 2)


def test_rank_does_not_split_full_fine_tuning_cells():
    four = identity.cell_config(compose_cell("method=full", "++method.r=4"))
    eight = identity.cell_config(compose_cell("method=full", "++method.r=8"))
    assert "r" not in four["method"]
    assert identity.fingerprint(four) == identity.fingerprint(eight)


def test_params_are_the_flattened_resolved_config():
    cfg = compose_cell("method.r=16")
    params = identity.flat_params(identity.cell_config(cfg), cfg)
    assert params["model.name"] == "t5-tiny"
    assert params["method.r"] == 16
    assert params["method.target_modules"] == '["q", "v"]'
    assert params["train.lr"] == cfg.method.lr
    assert params["model.architecture.d_model"] == 64
    assert params["train.gradient_checkpointing"] is False
    assert (params["data.source_max_length"], params["data.padding"]) == (384, "longest")
    assert "tracking.uri" in params
    assert not any("hydra" in key for key in params)


def _experiment(name: str, *overrides: str, hydra_config: bool = False):
    """An experiment as `python -m harness -cd experiments -cn NAME` composes it."""
    with initialize_config_dir(config_dir=str(REPO / "experiments"), version_base="1.3"):
        return compose(name, overrides=[*overrides, f"hydra.searchpath=[file://{REPO / 'conf'}]"],
                       return_hydra_config=hydra_config)


def test_demo_experiment_extends_the_defaults_with_its_grid():
    # As `python -m harness -cd experiments -cn demo method=full` composes it.
    cfg = _experiment("demo", "method=full", hydra_config=True)
    assert cfg.tracking.experiment == "demo"
    assert cfg.train.lr == cfg.tables.demo_lr.full.adamw
    assert cfg.hydra.sweeper.params.model == "t5-tiny,t5-mini,tiny-causal"  # both families
    assert cfg.hydra.mode.name == "MULTIRUN"


REFERENCE_ROWS = {  # the study's table (docs/design.md), plus LoRA+LOMO for each size
    "base_full": ("flan-t5-base", "full", "fp32"), "base_lora": ("flan-t5-base", "lora", "fp32"),
    "large_lora": ("flan-t5-large", "lora", "fp32"), "xl_lora": ("flan-t5-xl", "lora", "fp32"),
    "xl_lora_fp16": ("flan-t5-xl", "lora", "fp16"), "xl_lora_int8": ("flan-t5-xl", "lora", "int8"),
    "base_lora_lomo": ("flan-t5-base", "lora_lomo", "fp32"),
    "large_lora_lomo": ("flan-t5-large", "lora_lomo", "fp32"),
    "xl_lora_lomo": ("flan-t5-xl", "lora_lomo", "fp32"),
}


def test_the_reference_table_experiment_has_the_studys_rows_and_settings():
    swept = _experiment("reference_table", hydra_config=True).hydra.sweeper.params
    assert swept["+reference_row"].split(",") == list(REFERENCE_ROWS)
    for row, (model, method, precision) in REFERENCE_ROWS.items():
        cfg = _experiment("reference_table", f"+reference_row={row}")
        assert (cfg.model.name, cfg.method.name, cfg.precision.name) == (model, method, precision)
        assert (cfg.data.name, cfg.train.epochs, cfg.train.batch_size) == ("samsum", 3, 8)
        assert cfg.train.lr == (5e-5 if method == "full" else 1e-3)
        # The recipes: padded to percentile lengths with checkpointing (LoRA), padded to the
        # longest without (full fine-tuning); eager attention, as in transformers 4.27.
        assert (cfg.data.padding, cfg.model.attn_implementation) == ("max_length", "eager")
        if method == "full":
            assert (cfg.data.source_max_length, cfg.data.target_max_length) == ("p100", "p100")
            assert not cfg.train.gradient_checkpointing
        else:
            assert (cfg.data.source_max_length, cfg.data.target_max_length) == ("p85", "p90")
            assert cfg.train.gradient_checkpointing
            assert (cfg.method.r, cfg.method.alpha, cfg.method.dropout) == (16, 32, 0.05)
            assert list(cfg.method.target_modules) == ["q", "v"]
        assert cfg.requires_gpu and validation.invalid_cell_reason(cfg) is None
        assert cfg.plan_gpu.memory_mib == 23028  # the plan's fit, without a GPU: the A10G
    # Memory-only on a GPU without downloads: the command line wins over the experiment.
    offline = _experiment("reference_table", "+reference_row=xl_lora", "data=synthetic",
                          "model.source=random")
    assert (offline.data.name, offline.model.source) == ("synthetic", "random")
    # The harness's earlier, heavier settings stay one override away (README, "Sweeps").
    heavier = _experiment("reference_table", "+reference_row=base_lora",
                          "data.source_max_length=512", "data.target_max_length=128",
                          "data.padding=longest", "train.gradient_checkpointing=false",
                          "model.attn_implementation=sdpa")
    assert (heavier.data.source_max_length, heavier.data.padding,
            heavier.train.gradient_checkpointing) == (512, "longest", False)


def grid(name: str, *overrides: str) -> list:
    """Every job of an experiment's sweep, composed as `make sweep EXP=name` composes them."""
    with initialize_config_dir(config_dir=str(REPO / "experiments"), version_base="1.3"):
        cfg = compose(name, overrides=[*overrides, f"hydra.searchpath=[file://{REPO / 'conf'}]"],
                      return_hydra_config=True)
        return grids.cells(cfg)


@pytest.mark.slow
def test_the_full_grid_collapses_ranks_and_skips_what_cannot_run():
    jobs = grid("full_grid")
    assert len(jobs) == 3 * 4 * 4 * 3 * 2  # sizes x precisions x methods x ranks x checkpointing
    runnable, skipped = set(), set()
    for cfg in jobs:
        cell = identity.fingerprint(identity.cell_config(cfg))
        (skipped if validation.invalid_cell_reason(cfg) else runnable).add(cell)
    # Per size, checkpointing off and on: full and lomo in 3 precisions, lora in 4 x 3 ranks,
    # lora_lomo in 3 x 3 ranks; skipped: full, lomo and lora_lomo (3 ranks) on int8.
    assert (len(runnable), len(skipped)) == (2 * 3 * (3 + 3 + 12 + 9), 2 * 3 * (1 + 1 + 3))
    assert {job.train.gradient_checkpointing for job in jobs} == {False, True}


def test_a_grid_composed_by_forked_workers_is_the_grid_composed_in_turn(monkeypatch, tmp_path):
    # A large grid's jobs are composed by a worker per core (grids.JOBS_PER_WORKER each at
    # least); here the three of rank_sweep by two (forked workers, each recording its pid).
    in_turn = grids.compose_experiment("rank_sweep", [])
    monkeypatch.setattr(grids, "usable_cores", lambda: 2)
    monkeypatch.setattr(grids, "JOBS_PER_WORKER", 1)
    monkeypatch.setattr(grids, "_composed", _composed_recording)
    monkeypatch.setenv("COMPOSED_IN", str(tmp_path))
    side_by_side = grids.compose_experiment("rank_sweep", [])
    composed_in = {path.name for path in tmp_path.iterdir()}
    assert composed_in and str(os.getpid()) not in composed_in
    assert [job.method.r for job in side_by_side] == [4, 8, 16]
    assert [OmegaConf.to_yaml(job) for job in side_by_side] == [
        OmegaConf.to_yaml(job) for job in in_turn]
    assert all(OmegaConf.is_struct(job) and OmegaConf.get_type(job.train).__name__ ==
               "TrainConfig" for job in side_by_side)


def _composed_recording(job):
    """grids._composed, and the worker that composed it (a file named by its pid)."""
    (Path(os.environ["COMPOSED_IN"]) / str(os.getpid())).touch()
    return grids._COMPOSING.job(job)


def test_jobs_choosing_the_same_groups_share_one_composition_and_are_hydras_own(monkeypatch):
    # Two choices of groups (method), six jobs each (rank x checkpointing), a value override
    # from the command line: Hydra composes twice, and every job is the config Hydra composes
    # for it alone, its hydra node (the overrides it records) included.
    overrides = ["model=flan-t5-base", "precision=bf16", "method=lora,full", "train.max_steps=5"]
    composing = []
    monkeypatch.setattr(grids, "JOBS_PER_WORKER", 100)  # composed here, where it is seen
    loading = ConfigLoaderImpl.load_sweep_config
    monkeypatch.setattr(ConfigLoaderImpl, "load_sweep_config", lambda loader, sweep, job: (
        composing.append(job), loading(loader, sweep, job))[1])
    with initialize_config_dir(config_dir=str(REPO / "experiments"), version_base="1.3"):
        sweep = compose("full_grid", overrides=[*overrides[:2], overrides[3],
                                                f"hydra.searchpath=[file://{REPO / 'conf'}]"],
                        return_hydra_config=True)
        with open_dict(sweep):
            sweep.hydra.overrides.task = overrides
        jobs = grids.cells(sweep)
        assert composing == [["model=flan-t5-base", "precision=bf16", "method=lora"],
                             ["model=flan-t5-base", "precision=bf16", "method=full"]]
        # Hydra's order: the sweeper's params, then the command line's (which replaced three).
        expected = [[*overrides[:2], f"method={method}", f"++method.r={rank}",
                     f"train.gradient_checkpointing={checkpointing}", overrides[3]]
                    for method in ("lora", "full") for rank in (4, 8, 16)
                    for checkpointing in ("False", "True")]
        assert [list(job.hydra.overrides.task) for job in jobs] == expected
        loader = GlobalHydra.instance().config_loader()
        hydras = [loading(loader, sweep, job) for job in expected]
    assert {(job.method.name, job.method.r, job.train.max_steps) for job in jobs} >= {
        ("lora", 16, 5), ("full", 4, 5)}
    assert [job.hydra.job.override_dirname for job in jobs] == [
        job.hydra.job.override_dirname for job in hydras]
    assert [OmegaConf.to_yaml(job) for job in jobs] == [OmegaConf.to_yaml(job) for job in hydras]
    assert all(OmegaConf.is_struct(job) and OmegaConf.get_type(job.method) ==
               OmegaConf.get_type(hydra.method) for job, hydra in zip(jobs, hydras))


def test_the_rank_sweep_trains_base_lora_at_three_ranks_with_rouge_every_epoch():
    jobs = grid("rank_sweep")
    assert [job.method.r for job in jobs] == [4, 8, 16]
    for job in jobs:
        assert (job.model.name, job.method.name, job.precision.name) == ("flan-t5-base", "lora",
                                                                        "fp32")
        assert (job.train.epochs, job.train.batch_size, job.method.alpha) == (15, 8, 32)
        assert job.eval.rouge_every_epoch and job.requires_gpu and job.data.name == "samsum"
