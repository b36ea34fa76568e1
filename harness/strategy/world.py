"""Who a rank is among its cell's ranks, the process group they share, and how a global batch is
split between them so that a sharded step equals the single-process step on the same batch.

train.batch_size is the global batch: every rank draws the same batches (one shuffle, seeded) and
keeps its own rows. Each rank's mean loss is weighed by its share of the global batch's target
tokens, times the ranks whose gradients the engines average, so that the averaged gradient is the
gradient of the global batch's mean loss, not a mean of per-rank means.
"""

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from harness.model.tokenizers import IGNORED_LABEL


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    distributed: bool = False  # in a process group (a world of one still runs every engine)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", self.local_rank) if self.distributed else torch.device("cuda")


SINGLE = World()


def join(timeout_s: float) -> World:
    """Join the process group that torch's elastic launcher describes in the environment (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): nccl on CUDA, gloo on CPU. A collective
    that waits longer than `timeout_s` raises instead of hanging."""
    local_rank = int(os.environ["LOCAL_RANK"])
    options = {"timeout": timedelta(seconds=timeout_s)}
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        options["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", **options)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, distributed=True)


def leave(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(world: World):
    """Rank 0 runs the block first (tokenising into the shared cache), then the others (reading
    it): no two ranks write one cache file at once."""
    if world.main or not world.distributed:
        yield
        if world.distributed:
            dist.barrier()
        return
    dist.barrier()
    yield


def target_tokens(labels: torch.Tensor, causal: bool) -> int:
    """The tokens a batch's mean loss is taken over, as transformers counts them: the labels that
    are not ignored (a causal model's shifted by one, its first label predicting nothing)."""
    return int(((labels[:, 1:] if causal else labels) != IGNORED_LABEL).sum())


def split(batch: dict, world: World, causal: bool) -> tuple[dict, float]:
    """This rank's rows of the global `batch`, and the weight of its mean loss: its share of the
    batch's target tokens times the world's size. A rank left without rows (a last batch smaller
    than the world) runs the first row with weight 0: it still joins every collective."""
    if not world.distributed:
        return batch, 1.0
    rows = torch.arange(len(batch["input_ids"])).tensor_split(world.size)[world.rank]
    total = target_tokens(batch["labels"], causal)
    if not len(rows):
        return {key: value[:1] for key, value in batch.items()}, 0.0
    own = {key: value[rows] for key, value in batch.items()}
    return own, target_tokens(own["labels"], causal) / total * world.size


def global_loss(weighted_loss: torch.Tensor, world: World) -> torch.Tensor:
    """The global batch's mean loss from each rank's weighted one (not finite on every rank when
    it is not finite on one, so that all ranks stop together)."""
    if not world.distributed:
        return weighted_loss.detach()
    total = weighted_loss.detach().float().clone()
    dist.all_reduce(total)
    return total / world.size


def dropout_seed(seed: int, world: World) -> int:
    """The seed of a rank's random numbers in training (dropout's masks): `seed` on rank 0, as
    in a single process, and a seed of its own on every other rank. With dropout on, a sharded
    step is the single-process step in distribution (every row dropped as often, each rank its
    own masks), not mask for mask; without dropout it is the same step."""
    return seed + RANK_SEED_STRIDE * world.rank


# Far apart enough that rank r's seed is never another cell's seed + r' (seeds are small).
RANK_SEED_STRIDE = 1_000_003


def averaging(world: World):
    """A function that averages a gradient across the ranks in place (a LOMO hook's)."""
    def reduce(gradient: torch.Tensor) -> None:
        dist.all_reduce(gradient)
        gradient.div_(world.size)
    return reduce


def gather(value, world: World) -> list:
    """`value` of every rank, in rank order (a list of one outside a process group)."""
    if not world.distributed:
        return [value]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_weights(model, world: World) -> None:
    """Every rank starts from rank 0's weights and buffers (FSDP2 and DeepSpeed do not broadcast
    them; DDP would, but one rule for all is simpler)."""
    if not world.distributed or world.size == 1:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
