"""DistributedDataParallel: every rank holds the whole model and averages the gradients.

Memory: everything, and DDP's reducer keeps a flat bucket copy of every gradient beside it
(gradient_as_bucket_view=false, its default); LOMO under ddp runs without the reducer.
Transfers: an all-reduce of the gradients, 2 T (N-1)/N per rank and step; its buckets overlap
backward (about two thirds of the step's compute), the last one (25 MiB) never does. LOMO
all-reduces each weight's gradient in its hook and waits (a clipped step's norm pass once more).
"""

from harness.core.options import FUSED_METHODS
from harness.core.units import MIB
from harness.strategy.sizes import ring_share

NAMES = ("ddp",)
SHARDS_OPTIMIZER = False
BUCKET_MIB = 25.0  # DistributedDataParallel's bucket_cap_mb
BACKWARD_SHARE = 2 / 3  # backward's share of a step's compute: twice the forward's FLOPs


def shards_weights(strategy) -> bool:
    return False


def check(strategy) -> None:
    pass


def reason(cfg) -> str | None:
    return None  # every rank holds the model whole: any method, precision and optimizer


def per_rank(parts: dict, strategy, method: str) -> dict:
    if method in FUSED_METHODS:
        return {}
    return {"gradients": parts["gradients"] + parts["trained_weights"]}  # the reducer's buckets


def transfers(parts: dict, strategy, method: str, clipped: bool) -> dict:
    passes = 2 if method in FUSED_METHODS and clipped else 1
    return {"gpu": 2 * parts["trained_weights"] * MIB * ring_share(strategy) * passes,
            "host": 0.0}


def exposed(parts: dict, strategy, method: str, between_s: float, compute_s: float,
            link_gbs: float) -> float:
    if method in FUSED_METHODS:
        return between_s  # each gradient's all-reduce waits in its hook
    last = min(BUCKET_MIB, parts["trained_weights"]) * MIB * 2 * ring_share(strategy)
    return between_s - min(BACKWARD_SHARE * compute_s,
                           max(0.0, between_s - last / (link_gbs * 1e9)))
