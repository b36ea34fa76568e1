"""FSDP2 (fully_shard on every transformer block, then the root): weights, gradients and optimizer
state sharded across ranks, each block gathered for its forward and backward; fsdp_offload keeps
the shards and the optimizer step on the host (CPUOffloadPolicy).

Memory per rank: weights (a 4-bit layer's quantization state whole), gradients and optimizer
state / N; the block being computed gathered whole and the next one prefetched (2 x the largest
block), and the gathered block's unsharded gradient before it is reduce-scattered. With offload,
the shards and their optimizer state on the host; on the GPU only what is gathered.
Transfers: the weights gathered for forward and again for backward (reshard_after_forward), the
gradients reduce-scattered: (2 W + T) (N-1)/N; prefetching hides them but the first block's
gather. With offload, each rank's shards to the GPU and its gradients back over the host link:
(2 W + T) / N, waited for.
"""

from harness.core.units import MIB
from harness.strategy import sharded
from harness.strategy.sizes import ring_share, sharded_weights, world_size

NAMES = ("fsdp", "fsdp_offload")
SHARDS_OPTIMIZER = True


def shards_weights(strategy) -> bool:
    return True


def check(strategy) -> None:
    pass


def reason(cfg) -> str | None:
    return (sharded.weights_reason(cfg, shards_weights=True) or sharded.optimizer_reason(cfg)
            or sharded.loss_scale_reason(cfg))


def per_rank(parts: dict, strategy, method: str) -> dict:
    ranks = world_size(strategy)
    shards = {"weights": sharded_weights(parts, ranks), "gradients": parts["gradients"] / ranks,
              "optimizer": parts["optimizer"] / ranks}
    gathered = {"weights": 2 * parts["largest_block"],
                "gradients": parts["largest_block_trained"]}
    if strategy.get("offload"):
        return {"host": sum(shards.values()), "weights": gathered["weights"],
                "gradients": gathered["gradients"], "optimizer": 0.0}
    return {part: shards[part] + gathered.get(part, 0.0) for part in shards}


def transfers(parts: dict, strategy, method: str, clipped: bool) -> dict:
    gathers = 2 if strategy.get("reshard_after_forward", True) else 1
    moved = (gathers * parts["weights"] + parts["trained_weights"]) * MIB
    return {"gpu": moved * ring_share(strategy),
            "host": moved / world_size(strategy) if strategy.get("offload") else 0.0}


def exposed(parts: dict, strategy, method: str, between_s: float, compute_s: float,
            link_gbs: float) -> float:
    first = parts["largest_block"] * MIB * ring_share(strategy) / (link_gbs * 1e9)
    return between_s - min(compute_s, max(0.0, between_s - first))
