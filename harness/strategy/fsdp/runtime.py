"""FSDP2: fully_shard on every transformer block (models.blocks) as one unit, then the root with
what is left (embeddings, head, final norms). FSDP2 calls the post-accumulate-grad hooks of a
sharded weight once its gradient is reduce-scattered, so LOMO's fused update applies to each
rank's shard as it stands, and its clipping sums the shards' squared norms."""

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

from harness.model import models
from harness.model.training_step import Updates


def prepare(model, cfg, world):
    strategy = cfg.strategy
    mesh = dist.device_mesh.init_device_mesh(world.device.type, (world.size,))
    options = {"mesh": mesh, "reshard_after_forward": strategy.reshard_after_forward}
    if strategy.offload:
        # Pinned host memory needs a GPU; without one the shards are on the host already.
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in models.blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def updates(engine, cfg, total_steps: int):
    found = Updates(engine.model, cfg, total_steps, engine.world.device)
    if found.fused is not None:
        found.fused.reduce_squared_norm = _summed
    return found


def _summed(squared_norm: torch.Tensor) -> None:
    if dist.get_backend() == "nccl" and squared_norm.device.type == "cpu":  # offloaded shards
        on_gpu = squared_norm.cuda()
        dist.all_reduce(on_gpu)
        squared_norm.copy_(on_gpu)
        return
    dist.all_reduce(squared_norm)


@contextlib.contextmanager
def evaluating(engine):
    """The root stays gathered throughout: generation calls the encoder and the head apart from
    the root's forward, and a root that resharded after its first forward would leave them
    sharded (T5's generate() failed on "mixed torch.Tensor and DTensor"); its blocks gather and
    free themselves."""
    model = engine.model
    model.set_reshard_after_forward(False, recurse=False)
    model.unshard()
    try:
        yield model
    finally:
        model.set_reshard_after_forward(engine.strategy.reshard_after_forward, recurse=False)
        model.reshard()


def state_dict(engine) -> dict:
    """The whole model's weights on this rank, gathered from every rank's shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(engine.model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))
