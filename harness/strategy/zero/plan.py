"""DeepSpeed's ZeRO: stage 2 (zero2) shards the optimizer state and the gradients, stage 3
(zero3) the weights too; zero3_offload keeps the optimizer state and the weights on the host.
LOMO runs under stage 3 without DeepSpeed's optimizer (runtime.py).

Memory per rank: the float32 partition of the trained weights, gradients and optimizer state / N,
and the reduce bucket (reduce_bucket_size elements); stage 3: weights / N too (a 4-bit layer's
quantization state whole), and what it gathers: the largest layer and the prefetch bucket, at
most stage3_max_live_parameters. Offload: what is offloaded on the host, per rank its partitions;
the GPU keeps the gathered parameters and the buckets. LOMO: no float32 partition and no bucket,
its one whole gradient at a time (and LoRA+LOMO's adapters' AdamW state whole).
Transfers: stage 2 reduce-scatters the gradients and all-gathers the updated trained weights,
2 T (N-1)/N, after backward (not overlapped by default); stage 3 moves what fsdp does, its
prefetch bucket hiding all but the first gather; offload copies over the host link, waited for.
"""

from harness.core.errors import ConfigError
from harness.core.options import FUSED_METHODS
from harness.core.units import MIB
from harness.strategy import sharded
from harness.strategy.sizes import ring_share, sharded_weights, world_size

NAMES = ("zero2", "zero3", "zero3_offload")
SHARDS_OPTIMIZER = True
REQUIRES = "deepspeed"  # the package whose engine runs it
FLOAT32 = 4  # bytes: DeepSpeed's partitions and buckets are float32 for a float32 model


def shards_weights(strategy) -> bool:
    return strategy["stage"] == 3


def check(strategy) -> None:
    if strategy.offload_param and strategy.stage != 3:
        raise ConfigError("strategy.offload_param=true needs strategy.stage=3: only ZeRO-3 "
                          "shards the weights it would keep on the host; use strategy="
                          "zero3_offload, or strategy.offload_optimizer=true alone")


def reason(cfg) -> str | None:
    strategy, method = cfg.strategy, cfg.method.name
    found = sharded.weights_reason(cfg, shards_weights(strategy)) or \
        sharded.optimizer_reason(cfg)
    if found:
        return found
    if method in FUSED_METHODS and not shards_weights(strategy):
        return (f"method={method} updates each weight inside backward, and DeepSpeed's "
                f"ZeRO-2 engine (strategy={strategy.name}) owns the optimizer step on the "
                "gradients it partitions: use strategy=zero3 (LOMO's own setting: the weights "
                "partitioned, each rank updating its partition in the hooks), fsdp or ddp")
    if not cfg.precision.master_weights and method not in FUSED_METHODS:
        return (f"precision.master_weights=false with strategy={strategy.name}: DeepSpeed's "
                "optimizer keeps float32 partitions of the weights it trains; use strategy=fsdp "
                "for weights trained in the half dtype itself (or a LOMO method, which steps "
                "ZeRO-3's half partitions itself)")
    return sharded.loss_scale_reason(cfg)


def per_rank(parts: dict, strategy, method: str) -> dict:
    ranks = world_size(strategy)
    trained_fp32 = parts["trained_weights_fp32"]
    bucket = min(strategy["reduce_bucket_size"] * FLOAT32 / MIB, trained_fp32)
    optimizer = parts["optimizer"] / ranks + trained_fp32 / ranks  # with the float32 partition
    gradients = parts["gradients"] / ranks
    if method in FUSED_METHODS:
        bucket, optimizer, gradients = 0.0, parts["optimizer"], parts["gradients"]
    weights, host = parts["weights"], 0.0
    if strategy["stage"] == 3:
        live = min(parts["largest_layer"] + strategy["stage3_prefetch_bucket_size"]
                   * FLOAT32 / MIB, strategy["stage3_max_live_parameters"] * FLOAT32 / MIB,
                   parts["weights"])
        weights = sharded_weights(parts, ranks) + live
        if strategy["offload_param"]:
            host += sharded_weights(parts, ranks)
            weights = live
    if strategy["offload_optimizer"]:
        host += optimizer + gradients
        optimizer, gradients = 0.0, 0.0
    return {"weights": weights, "gradients": gradients + bucket, "optimizer": optimizer,
            "host": host}


def transfers(parts: dict, strategy, method: str, clipped: bool) -> dict:
    trained = parts["trained_weights"] * MIB
    if not shards_weights(strategy):
        return {"gpu": 2 * trained * ring_share(strategy),
                "host": 2 * trained / world_size(strategy)
                if strategy.get("offload_optimizer") else 0.0}
    moved = 2 * parts["weights"] * MIB + trained
    return {"gpu": moved * ring_share(strategy),
            "host": moved / world_size(strategy) if strategy.get("offload_param") else 0.0}


def exposed(parts: dict, strategy, method: str, between_s: float, compute_s: float,
            link_gbs: float) -> float:
    if not shards_weights(strategy):
        return between_s  # stage 2: after backward, before the next forward
    first = parts["largest_block"] * MIB * ring_share(strategy) / (link_gbs * 1e9)
    return between_s - min(compute_s, max(0.0, between_s - first))
