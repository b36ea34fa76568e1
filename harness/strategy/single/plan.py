"""One process, one device: what every cell did before the strategy axis. Nothing shared out,
nothing moved."""

from harness.core.errors import ConfigError
from harness.strategy.sizes import world_size

NAMES = ("single",)
SHARDS_OPTIMIZER = False


def shards_weights(strategy) -> bool:
    return False


def check(strategy) -> None:
    if world_size(strategy) != 1:
        raise ConfigError(f"strategy=single runs one process, and strategy.nproc_per_node="
                          f"{strategy.nproc_per_node} / strategy.nnodes={strategy.nnodes} ask for "
                          "more: choose strategy=ddp, fsdp, zero2 or zero3 to run ranks")


def reason(cfg) -> str | None:
    return None


def per_rank(parts: dict, strategy, method: str) -> dict:
    return {}


def transfers(parts: dict, strategy, method: str, clipped: bool) -> dict:
    return {"gpu": 0.0, "host": 0.0}


def exposed(parts: dict, strategy, method: str, between_s: float, compute_s: float,
            link_gbs: float) -> float:
    return 0.0
