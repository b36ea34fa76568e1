"""One rank's share of a cell's memory under its strategy, on its GPU and on the host.

The estimate simulates one rank's step at its micro-batch (train.batch_size / ranks), which gives
the activations, the allocator's overhead and, as if the rank held the whole model, the weights,
gradients and optimizer state. This module then applies what each engine does with those (its
documented rules; N ranks):

  ddp           every rank holds everything, and DDP's reducer keeps a flat bucket copy of every
                gradient beside it (gradient_as_bucket_view=false, its default). LOMO under ddp
                runs without the reducer: nothing more.
  fsdp          weights, gradients and optimizer state / N (a 4-bit layer's quantization state
                stays whole on every rank); the block being computed gathered
                whole, and the next one prefetched (2 x the largest block), and the gathered
                block's unsharded gradient before it is reduce-scattered.
  fsdp_offload  the shards and their optimizer state on the host; on the GPU only what is
                gathered (and its gradient).
  zero2         weights whole; DeepSpeed's float32 partition of the trained weights, gradients
                and optimizer state / N, and its reduce bucket (reduce_bucket_size elements).
  zero3         weights / N too, and the parameters it gathers: the largest layer and the
                prefetch bucket, at most stage3_max_live_parameters. LOMO under zero3: no
                DeepSpeed optimizer, its one whole gradient at a time (and LoRA+LOMO's
                adapters' AdamW state, whole: they are not partitioned).
  offload       (zero*: offload_optimizer / offload_param) what is offloaded is on the host:
                per rank, its partitions; the GPU keeps the gathered parameters and the buckets.

Where the simulated peak is the optimizer's step (foreach AdamW's whole-model temporaries), a
sharded optimizer steps 1/N of the model: its temporaries are shared out too, and the peak is the
larger of that step's and the one outside it.

`host` is one rank's; a node holds strategy.nproc_per_node of them.
"""

from harness.core.options import (
    DEEPSPEED_STRATEGIES,
    FSDP_STRATEGIES,
    FUSED_METHODS,
    SHARDED_STRATEGIES,
)
from harness.core.units import MIB

FLOAT32 = 4  # bytes: DeepSpeed's partitions and buckets are float32 for a float32 model

SHARDED_PARTS = ("weights", "gradients", "optimizer")


def world_size(strategy_cfg: dict) -> int:
    return strategy_cfg["nproc_per_node"] * strategy_cfg["nnodes"]


def per_rank(parts: dict, strategy_cfg: dict, method: str) -> dict:
    """`parts` (the simulated rank at its micro-batch, holding the whole model) as the strategy
    leaves them on one rank's GPU, with `host` (MiB) beside them and `total` summed again."""
    name, ranks = strategy_cfg["name"], world_size(strategy_cfg)
    found = {**parts, "host": 0.0}
    block, trained = parts["largest_block"], parts["trained_weights"]
    if name == "ddp" and method not in FUSED_METHODS:
        found["gradients"] += trained  # the reducer's buckets
    elif name in FSDP_STRATEGIES:
        shards = {part: parts[part] / ranks for part in SHARDED_PARTS}
        shards["weights"] = _sharded_weights(parts, ranks)
        gathered = {"weights": 2 * block, "gradients": parts["largest_block_trained"]}
        if strategy_cfg.get("offload"):
            found["host"] = sum(shards.values())
            found.update({"weights": gathered["weights"], "gradients": gathered["gradients"],
                          "optimizer": 0.0})
        else:
            found.update({part: shards[part] + gathered.get(part, 0.0) for part in shards})
    elif name in DEEPSPEED_STRATEGIES:
        _zero(found, parts, strategy_cfg, ranks, method in FUSED_METHODS)
    if name in SHARDED_STRATEGIES:  # the optimizer steps this rank's shard: temporaries 1/N
        found["activations"] = max(parts["activations_outside_step"], parts["activations"]
                                   - parts["step_temporaries"] * (1 - 1 / ranks))
    found["total"] = sum(found[part] for part in
                         ("weights", "gradients", "optimizer", "activations", "allocator",
                          "cuda_context"))
    found["allocated"] = found["total"] - found["allocator"] - found["cuda_context"]
    return found


def _sharded_weights(parts: dict, ranks: int) -> float:
    """One rank's share of the weights: the packed values / N, and every 4-bit layer's
    quantization state (block scales, code) whole, which FSDP and ZeRO-3 leave on the layer,
    unsharded (nothing before the key was in the estimate's cache: counted as sharded then)."""
    state = parts.get("quantization_state", 0.0)
    return (parts["weights"] - state) / ranks + state


def _zero(found: dict, parts: dict, strategy_cfg: dict, ranks: int, fused: bool) -> None:
    """DeepSpeed ZeRO-2 / ZeRO-3 on one rank, offload included. LOMO under ZeRO-3 (`fused`)
    runs without DeepSpeed's optimizer: no float32 partition and no reduce bucket; the one whole
    gradient alive at a time is the single process's."""
    trained_fp32 = parts["trained_weights_fp32"]
    bucket = min(strategy_cfg["reduce_bucket_size"] * FLOAT32 / MIB, trained_fp32)
    optimizer = parts["optimizer"] / ranks + trained_fp32 / ranks  # with the float32 partition
    gradients = parts["gradients"] / ranks
    if fused:
        bucket, optimizer, gradients = 0.0, parts["optimizer"], parts["gradients"]
    weights = parts["weights"]
    if strategy_cfg["stage"] == 3:
        live = min(parts["largest_layer"] + strategy_cfg["stage3_prefetch_bucket_size"]
                   * FLOAT32 / MIB, strategy_cfg["stage3_max_live_parameters"] * FLOAT32 / MIB,
                   parts["weights"])
        weights = _sharded_weights(parts, ranks) + live
        if strategy_cfg["offload_param"]:
            found["host"] += _sharded_weights(parts, ranks)
            weights = live
    if strategy_cfg["offload_optimizer"]:
        found["host"] += optimizer + gradients
        optimizer, gradients = 0.0, 0.0
    found.update({"weights": weights, "gradients": gradients + bucket, "optimizer": optimizer})
