"""DistributedDataParallel. LOMO under ddp runs without DDP's wrapper: DDP reduces gradients in
buckets after backward, too late for an update fused into backward, so each fused weight's
gradient is all-reduced in its own hook."""

import contextlib

from torch.nn.parallel import DistributedDataParallel

from harness.core.options import FUSED_METHODS
from harness.model.training_step import Updates
from harness.strategy import world as ranks


def prepare(model, cfg, world):
    if cfg.method.name in FUSED_METHODS:
        return model
    device_ids = [world.local_rank] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def updates(engine, cfg, total_steps: int):
    found = Updates(engine.model, cfg, total_steps, engine.world.device)
    if found.fused is not None:
        found.fused.reduce_gradient = ranks.averaging(engine.world)
    return found


@contextlib.contextmanager
def evaluating(engine):
    yield engine.model


def state_dict(engine) -> dict | None:
    return None  # every rank holds the model whole
