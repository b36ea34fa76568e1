"""The strategy axis: a sharded step equals the single-process step on the same global batch.

Two ranks on gloo, launched by torch's elastic agent as a cell launches them, train tiny T5s for
three steps under each strategy; the single process trains the same cells on the same batches.
SGD without clipping catches a gradient summed instead of averaged (AdamW's update hardly moves
with the gradient's scale, and clipping to a norm hides it too); SGD with clipping catches a norm
taken over one rank's shard instead of the whole model.
"""

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from harness.cell import evaluate
from harness.cell.train import train
from harness.data import encoding, synthetic
from harness.model import families, methods, models
from harness.strategy import launch
from harness.strategy import world as ranks
from harness.strategy.engines import Engine
from harness.strategy.registry import shards_weights
from tests.conftest import compose_cell

STEPS = 3
# (method, its overrides): the optimizer, and whether the global norm clips.
UPDATES = {"sgd": ["method.optimizer=sgd", "method.lr=0.5", "train.max_grad_norm=null"],
           "sgd_clipped": ["method.optimizer=sgd", "method.lr=0.5", "train.max_grad_norm=0.5"],
           "adamw": ["method.optimizer=adamw", "method.lr=0.01", "train.max_grad_norm=1.0"]}
LOMO_UPDATES = {"unclipped": ["train.max_grad_norm=null"], "clipped": ["train.max_grad_norm=0.5"]}


def _cell(strategy: str, method: str, *overrides) -> dict:
    cfg = compose_cell(f"strategy={strategy}", f"method={method}", "data=synthetic",
                       "data.train_size=24", "data.validation_size=4", "data.test_size=4",
                       "data.source_length_median=20", "data.target_length_median=6",
                       "train.batch_size=6", f"train.max_steps={STEPS}", *overrides)
    if "dropout" in cfg.method:  # LoRA dropout would make the compared forwards differ
        cfg.method.dropout = 0.0
    return OmegaConf.to_container(cfg, resolve=True)


def _train_losses(cell_cfg: dict, world: ranks.World) -> list[float]:
    """The global batch's train_loss at each step of one cell, trained as the cell trains."""
    cfg = OmegaConf.create(cell_cfg)
    tokenizer = models.load_tokenizer(cfg.model)
    model = methods.prepare(models.load_model(cfg.model, cfg.precision,
                                              methods.base_frozen(cfg.method.name),
                                              world.device), cfg)
    engine = Engine(model, cfg, world)
    splits = synthetic.synthetic(cfg.data, vocab_size=len(tokenizer))
    collate = families.of(cfg.model).collate(tokenizer)
    loaders = [DataLoader(splits[split], batch_size=cfg.train.batch_size, collate_fn=collate)
               for split in ("train", "validation")]
    losses = []
    train(engine, *loaders, cfg, world.device,
          lambda metrics, step: losses.append(metrics["train_loss"])
          if "train_loss" in metrics else None)
    return losses


def _on_ranks(cell_cfgs: list[dict]) -> list[list[float]]:
    """Rank 0's losses of each cell, the cells trained one after the other by two ranks."""
    world = ranks.join(timeout_s=300)
    try:
        return [_train_losses(cell_cfg, world) for cell_cfg in cell_cfgs]
    finally:
        ranks.leave(world)


def _sharded_losses(cell_cfgs: list[dict], tmp_path) -> list[list[float]]:
    strategy = OmegaConf.create(cell_cfgs[0]["strategy"])
    # This process has computed: its ranks start from the forkserver (harness/strategy/launch.py).
    return launch.run_ranks(strategy, tmp_path, _on_ranks, cell_cfgs,
                            start_method="forkserver")[0]


def _compare(strategy: str, methods_and_updates: list, tmp_path) -> None:
    sharded = _sharded_losses([_cell(strategy, method, *overrides)
                               for method, overrides in methods_and_updates], tmp_path)
    for (method, overrides), losses in zip(methods_and_updates, sharded):
        single = _train_losses(_cell("single", method, *[override for override in overrides
                                                         if not override.startswith("strategy")]),
                               ranks.SINGLE)
        assert len(losses) == STEPS and single[0] != single[-1]  # the weights did move
        assert losses == pytest.approx(single, abs=1e-4), (strategy, method, overrides)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_a_sharded_step_equals_the_single_process_step(strategy, tmp_path):
    _compare(strategy, [(method, overrides) for method in ("full", "lora")
                        for overrides in UPDATES.values()], tmp_path)


# ZeRO-3 keeps a weight under stage3_param_persistence_threshold elements whole on every rank
# (DeepSpeed's default: 100,000, every weight of a tiny model): at 1,000 a tiny T5's 64 x 64
# weights are partitioned, and LoRA+LOMO's adapters (8 x 64), which AdamW steps, stay whole.
PARTITIONED = {"zero3": ["strategy.stage3_param_persistence_threshold=1000"]}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_lomo_under_a_strategy_equals_the_single_process_lomo(strategy, tmp_path):
    _compare(strategy, [(method, [*overrides, *PARTITIONED.get(strategy, [])])
                        for method in ("lomo", "lora_lomo")
                        for overrides in LOMO_UPDATES.values()], tmp_path)


def test_a_global_batch_is_split_by_rows_and_weighed_by_target_tokens():
    labels = torch.tensor([[5, 6, -100], [7, -100, -100], [8, 9, 10]])
    batch = {"input_ids": torch.arange(9).view(3, 3), "labels": labels}
    shares = []
    for rank in range(2):
        own, weight = ranks.split(batch, ranks.World(rank, 2, rank, distributed=True),
                                  causal=False)
        shares.append((own["labels"].tolist(), weight))
    # Rows 0-1 hold 3 of the 6 target tokens, row 2 the other 3: each weight is share x 2.
    assert shares == [(labels[:2].tolist(), 1.0), (labels[2:].tolist(), 1.0)]
    own, weight = ranks.split({key: value[:1] for key, value in batch.items()},
                              ranks.World(1, 2, 1, distributed=True), causal=False)
    assert weight == 0.0 and len(own["labels"]) == 1  # no rows left: a row, weighed 0


# -- end to end: train, evaluate with generation of several batches ----------------------------

SHARDED = ["ddp", "fsdp", "fsdp_offload", "zero2", "zero3", "zero3_offload"]


def _generating(strategy: str, method: str, model: str, cache_dir, *overrides) -> dict:
    """A cell of fixture text that trains two steps and generates 12 test summaries in batches
    of 4; its rank count fixed at 2 for every strategy."""
    cfg = compose_cell(f"strategy={strategy}", f"method={method}", f"model={model}",
                       "data=fixture" if model.startswith("t5") else "data=instructions",
                       "data.train_size=24", "data.validation_size=4", "data.test_size=12",
                       "data.source_max_length=64", "data.target_max_length=16",
                       "train.batch_size=4", "train.max_steps=2", "eval.batch_size=4",
                       "eval.max_new_tokens=8", f"cache_dir={cache_dir}",
                       *([] if strategy == "single" else ["strategy.nproc_per_node=2"]),
                       *overrides)
    if "dropout" in cfg.method:  # equal predictions need equal masks: no dropout here
        cfg.method.dropout = 0.0
    return OmegaConf.to_container(cfg, resolve=True)


def _predictions(cell_cfg: dict, world: ranks.World) -> list[str]:
    """Train the cell as a cell trains, then generate for its test split as its eval phase does
    (harness/cell/entry.py), under its strategy's engine."""
    cfg = OmegaConf.create(cell_cfg)
    tokenizer = models.load_tokenizer(cfg.model)
    model = methods.prepare(models.load_model(cfg.model, cfg.precision,
                                              methods.base_frozen(cfg.method.name),
                                              world.device), cfg)
    engine = Engine(model, cfg, world)
    with ranks.main_first(world):
        text, splits, _ = encoding.load(cfg.data, cfg.model, tokenizer, cfg.cache_dir)
    family = families.of(cfg.model)
    loaders = [DataLoader(splits[split], batch_size=cfg.train.batch_size,
                          collate_fn=family.collate(tokenizer))
               for split in ("train", "validation")]
    train(engine, *loaders, cfg, world.device, lambda metrics, step: None)
    test = DataLoader(splits["test"], batch_size=cfg.eval.batch_size,
                      collate_fn=family.generation_collate(tokenizer))
    with engine.evaluating() as evaluated:
        return evaluate.generate(evaluated, tokenizer, test, cfg.eval, cfg.precision.name,
                                 world.device, family)


def _predictions_on_ranks(cell_cfgs: list[dict]) -> list[list[str]]:
    world = ranks.join(timeout_s=300)
    try:
        return [_predictions(cell_cfg, world) for cell_cfg in cell_cfgs]
    finally:
        ranks.leave(world)


def _generate_everywhere(cells: list[tuple], tmp_path) -> None:
    """Each (strategy, method, model) cell's predictions on 2 gloo ranks equal the
    single-process cell's."""
    cache = tmp_path / "cache"
    cell_cfgs = [_generating(*cell, cache) for cell in cells]
    sharded = launch.run_ranks(OmegaConf.create(cell_cfgs[0]["strategy"]), tmp_path,
                               _predictions_on_ranks, cell_cfgs, start_method="forkserver")[0]
    for cell, predictions in zip(cells, sharded):
        if cell[1:] not in SINGLES:
            SINGLES[cell[1:]] = _predictions(_generating("single", *cell[1:], cache),
                                             ranks.SINGLE)
        assert len(predictions) == 12 and predictions == SINGLES[cell[1:]], cell


# The same (method, model) cell in one process: made once for every strategy that shards it.
SINGLES: dict[tuple[str, str], list[str]] = {}


@pytest.mark.slow  # starts each strategy's ranks
def test_every_strategy_trains_and_generates_what_one_process_does(tmp_path):
    # Full fine-tuning of a seq2seq model: under fsdp its generation once failed on a root that
    # resharded after its first forward (the encoder then ran on shards).
    _generate_everywhere([(strategy, "full", "t5-tiny") for strategy in SHARDED], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", SHARDED)
def test_every_method_and_family_generates_under_each_strategy(strategy, tmp_path):
    allowed = ["full", "full_sgd", "lora", *(["lomo", "lora_lomo"] if strategy != "zero2"
                                             else [])]  # ZeRO-2 refuses LOMO
    _generate_everywhere([(strategy, method, model) for method in allowed
                          for model in ("t5-tiny", "tiny-llama")], tmp_path)


# -- dropout under sharding ---------------------------------------------------------------------

def _dropout_masks(p: float) -> list:
    """Each rank's dropout mask of one tensor, drawn after training seeds its random numbers."""
    world = ranks.join(timeout_s=120)
    try:
        torch.manual_seed(ranks.dropout_seed(42, world))
        mask = torch.nn.functional.dropout(torch.ones(4096), p) != 0
        return ranks.gather(mask.tolist(), world)
    finally:
        ranks.leave(world)


@pytest.mark.slow  # starts two ranks
def test_each_rank_draws_its_own_dropout_masks_and_rank_0_the_single_process_s(tmp_path):
    masks = launch.run_ranks(compose_cell("strategy=ddp").strategy, tmp_path, _dropout_masks,
                             0.25, start_method="forkserver")[0]
    rank0, rank1 = (torch.tensor(mask) for mask in masks)
    torch.manual_seed(42)  # what a single process seeds
    assert torch.equal(rank0, torch.nn.functional.dropout(torch.ones(4096), 0.25) != 0)
    assert not torch.equal(rank0, rank1)  # independent masks, not one mask for both rows
    for mask in (rank0, rank1):  # each drops a quarter of the units: the same distribution
        assert abs(1 - mask.float().mean().item() - 0.25) < 0.03
    assert abs((rank0 == rank1).float().mean().item() - (0.75**2 + 0.25**2)) < 0.03


# -- QLoRA under sharding -----------------------------------------------------------------------

def _qlora(strategy: str, *overrides) -> dict:
    # ZeRO-3 partitions the tiny 4-bit weights (512 packed float32 elements) below 100 elements.
    partitioned = ["strategy.stage3_param_persistence_threshold=100"] if strategy == "zero3" \
        else []
    return _cell(strategy, "lora", "model=tiny-llama", "precision=nf4",
                 "precision.compute_dtype=fp32", *UPDATES["sgd_clipped"], *partitioned,
                 *overrides)


def _packed_shares(cell_cfgs: list[dict]) -> list[tuple[int, int]]:
    """(elements of the 4-bit layers' packed weights this rank holds, elements in all) of each
    cell, its engine built as the cell builds it."""
    import bitsandbytes as bnb

    world = ranks.join(timeout_s=300)
    try:
        found = []
        for cell_cfg in cell_cfgs:
            cfg = OmegaConf.create(cell_cfg)
            model = methods.prepare(models.load_model(
                cfg.model, cfg.precision, True, world.device, shards_weights(cfg.strategy)), cfg)
            engine = Engine(model, cfg, world)
            engine.updates(cfg, total_steps=1)  # DeepSpeed partitions here
            weights = [module.weight for module in model.modules()
                       if isinstance(module, bnb.nn.Linear4bit)]
            held = sum(weight.to_local().numel() if hasattr(weight, "to_local")
                       else weight.ds_tensor.numel() if hasattr(weight, "ds_tensor")
                       else weight.numel() for weight in weights)
            whole = sum(getattr(weight, "ds_numel", weight.numel()) for weight in weights)
            found.append((held, whole))
        return found
    finally:
        ranks.leave(world)


QLORA_STRATEGIES = ["fsdp", "fsdp_offload", "zero3"]


@pytest.mark.slow
def test_qlora_under_sharding_equals_the_single_process_qlora_and_shards_its_4bit_weights(
        tmp_path):
    cells = [_qlora(strategy) for strategy in QLORA_STRATEGIES]
    for cell in cells:  # the packed values in the compute dtype: a tensor FSDP can cut
        assert models.quant_storage(OmegaConf.create(cell["precision"]), True) == torch.float32
    for cell in cells:
        losses = launch.run_ranks(OmegaConf.create(cell["strategy"]), tmp_path, _on_ranks,
                                  [cell], start_method="forkserver")[0][0]
        single = _train_losses(_qlora("single"), ranks.SINGLE)
        assert len(losses) == STEPS and single[0] != single[-1]
        assert losses == pytest.approx(single, abs=1e-5), cell["strategy"]["name"]
    shares = launch.run_ranks(OmegaConf.create(cells[0]["strategy"]), tmp_path, _packed_shares,
                              cells, start_method="forkserver")[0]
    for cell, (held, whole) in zip(cells, shares):  # each rank holds half of every 4-bit weight
        assert held <= whole / 2 + 64, (cell["strategy"]["name"], held, whole)


def test_4bit_weights_are_stored_in_a_float_dtype_where_the_strategy_shards_them():
    nf4 = compose_cell("precision=nf4").precision
    assert models.quant_storage(nf4, shards_weights=False) == torch.uint8  # as before
    assert models.quant_storage(nf4, shards_weights=True) == torch.bfloat16  # compute dtype
    chosen = compose_cell("precision=nf4", "precision.quant_storage=fp16").precision
    assert models.quant_storage(chosen, shards_weights=True) == torch.float16
    assert shards_weights(compose_cell("strategy=fsdp").strategy)
    assert shards_weights(compose_cell("strategy=zero3").strategy)
    assert not shards_weights(compose_cell("strategy=zero2").strategy)
    assert not shards_weights(compose_cell("strategy=ddp").strategy)
