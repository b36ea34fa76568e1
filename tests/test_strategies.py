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

from harness.cell.train import train
from harness.data import synthetic
from harness.model import families, methods, models
from harness.strategy import launch, world as ranks
from harness.strategy.engines import Engine
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
        single = _train_losses(_cell("single", method, *overrides), ranks.SINGLE)
        assert len(losses) == STEPS and single[0] != single[-1]  # the weights did move
        assert losses == pytest.approx(single, abs=1e-4), (strategy, method, overrides)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_a_sharded_step_equals_the_single_process_step(strategy, tmp_path):
    _compare(strategy, [(method, overrides) for method in ("full", "lora")
                        for overrides in UPDATES.values()], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lomo_under_a_strategy_equals_the_single_process_lomo(strategy, tmp_path):
    _compare(strategy, [(method, overrides) for method in ("lomo", "lora_lomo")
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
