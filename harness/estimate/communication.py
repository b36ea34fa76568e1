"""What a strategy moves between ranks (and between a GPU and its host) in one optimizer step,
and how long the part that does not overlap compute takes: the plan adds it to the step's time, so
that "two GPUs, or one with offload?" has an answer in minutes and dollars.

Bytes per rank and step, for N ranks (ring collectives: each rank sends and receives (N - 1) / N
of the tensor; an all-reduce is a reduce-scatter and an all-gather, twice that); W the weights as
stored, T the trained weights (their gradients are as large), B the largest block:

  ddp           all-reduce the gradients: 2 T (N-1)/N. DDP's buckets overlap backward (about two
                thirds of the step's compute); the last bucket (25 MiB) never does.
  LOMO (ddp)    the same bytes, each weight's gradient all-reduced in its own hook, waiting:
                nothing overlaps; a clipped step's norm pass all-reduces them once more.
  fsdp          gather the weights for forward and again for backward (reshard_after_forward),
                reduce-scatter the gradients: (2 W + T) (N-1)/N. Prefetching overlaps them with
                compute, but for the first block's gather.
  fsdp_offload  the same between GPUs, and over the host link each rank's shards to the GPU for
                forward and backward and its gradients back: (2 W + T) / N; host copies wait.
  zero2         reduce-scatter the gradients, all-gather the updated trained weights: 2 T (N-1)/N,
                after backward (DeepSpeed overlaps neither by default at stage 2).
  zero3         as fsdp (its prefetch bucket overlaps the gathers); zero3_offload: the host copies
                of fsdp_offload.

The links are conf/peaks/'s: `link_gbs` between GPUs of a node (NVLink, else PCIe), per direction;
`host_gbs` to the host (PCIe); `internode_gbs` between nodes, which bounds a ring across them.
Left out: collectives' latency (small tensors), the optimizer's step on the host under offload,
and DDP's broadcast of buffers.
"""

from harness.core.options import DEEPSPEED_STRATEGIES, FSDP_STRATEGIES, FUSED_METHODS
from harness.core.units import MIB

DDP_BUCKET_MIB = 25.0  # DistributedDataParallel's bucket_cap_mb
BACKWARD_SHARE = 2 / 3  # backward's share of a step's compute: twice the forward's FLOPs


def bytes_per_step(parts: dict, strategy: dict, method: str, clipped: bool) -> dict:
    """{"gpu": bytes each rank sends between GPUs, "host": between its GPU and the host} per
    optimizer step; `parts` are the estimate's (MiB: weights, trained_weights)."""
    ranks = strategy["nproc_per_node"] * strategy["nnodes"]
    if strategy["name"] == "single" or ranks == 1:
        return {"gpu": 0.0, "host": 0.0}
    share = (ranks - 1) / ranks
    weights, trained = parts["weights"] * MIB, parts["trained_weights"] * MIB
    name = strategy["name"]
    if name == "ddp":
        passes = 2 if method in FUSED_METHODS and clipped else 1
        return {"gpu": 2 * trained * share * passes, "host": 0.0}
    if name in FSDP_STRATEGIES or (name in DEEPSPEED_STRATEGIES and strategy["stage"] == 3):
        gathers = 2 if strategy.get("reshard_after_forward", True) else 1
        moved = (gathers * weights + trained)
        offloaded = strategy.get("offload") or strategy.get("offload_param")
        return {"gpu": moved * share, "host": moved / ranks if offloaded else 0.0}
    return {"gpu": 2 * trained * share,  # zero2
            "host": 2 * trained / ranks if strategy.get("offload_optimizer") else 0.0}


def seconds(parts: dict, strategy: dict, method: str, clipped: bool, device: dict,
            compute_s: float) -> dict:
    """{"comm_s": the transfers' time, "exposed_s": the part not hidden behind `compute_s` (the
    step's compute, harness/estimate/timing.py)}, on `device`'s links; {} where conf/peaks/
    gives none for it."""
    moved = bytes_per_step(parts, strategy, method, clipped)
    if not moved["gpu"] and not moved["host"]:
        return {"comm_s": 0.0, "exposed_s": 0.0, "comm_bytes": 0.0}
    link = device.get("link_gbs")
    if strategy["nnodes"] > 1 and device.get("internode_gbs"):
        link = min(link or device["internode_gbs"], device["internode_gbs"])
    host = device.get("host_gbs")
    if link is None or (moved["host"] and host is None):
        return {}
    between = moved["gpu"] / (link * 1e9)
    to_host = moved["host"] / (host * 1e9) if moved["host"] else 0.0
    name, ranks = strategy["name"], strategy["nproc_per_node"] * strategy["nnodes"]
    if name == "ddp" and method in FUSED_METHODS:
        hidden = 0.0  # each gradient's all-reduce waits in its hook
    elif name == "ddp":
        last = min(DDP_BUCKET_MIB * MIB, parts["trained_weights"] * MIB) * 2 * (ranks - 1) / ranks
        hidden = min(BACKWARD_SHARE * compute_s, max(0.0, between - last / (link * 1e9)))
    elif name in FSDP_STRATEGIES or (name in DEEPSPEED_STRATEGIES and strategy["stage"] == 3):
        first = parts["largest_block"] * MIB * (ranks - 1) / ranks / (link * 1e9)
        hidden = min(compute_s, max(0.0, between - first))
    else:
        hidden = 0.0  # zero2: after backward, before the next forward
    return {"comm_s": between + to_host, "exposed_s": between - hidden + to_host,
            "comm_bytes": moved["gpu"] + moved["host"]}
