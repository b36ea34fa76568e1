"""What a strategy moves between ranks (and between a GPU and its host) in one optimizer step,
and how long the part that does not overlap compute takes: the plan adds it to the step's time, so
that "two GPUs, or one with offload?" has an answer in minutes and dollars.

Bytes per rank and step, for N ranks (ring collectives: each rank sends and receives (N - 1) / N
of the tensor; an all-reduce is a reduce-scatter and an all-gather, twice that): each engine's
plan says what it moves and what of that compute hides (harness/strategy/<engine>/plan.py:
DDP's all-reduce, FSDP's and ZeRO-3's gathers and reduce-scatters, ZeRO-2's after backward,
offload's host copies, which are waited for).

The links are conf/peaks/'s: `link_gbs` between GPUs of a node (NVLink, else PCIe), per direction;
`host_gbs` to the host (PCIe); `internode_gbs` between nodes, which bounds a ring across them.
Left out: collectives' latency (small tensors), the optimizer's step on the host under offload,
and DDP's broadcast of buffers.
"""

from harness.strategy import registry


def bytes_per_step(parts: dict, strategy: dict, method: str, clipped: bool) -> dict:
    """{"gpu": bytes each rank sends between GPUs, "host": between its GPU and the host} per
    optimizer step; `parts` are the estimate's (MiB: weights, trained_weights)."""
    return registry.plan(strategy["name"]).transfers(parts, strategy, method, clipped)


def seconds(parts: dict, strategy: dict, method: str, clipped: bool, device: dict,
            compute_s: float) -> dict:
    """{"comm_s": the transfers' time, "exposed_s": the part not hidden behind `compute_s` (the
    step's compute, harness/estimate/timing.py), "comm_bytes"}, on `device`'s links; {} where
    conf/peaks/ gives none for it."""
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
    to_host = moved["host"] / (host * 1e9) if moved["host"] else 0.0  # host copies wait
    exposed = registry.plan(strategy["name"]).exposed(parts, strategy, method, between,
                                                      compute_s, link)
    return {"comm_s": between + to_host, "exposed_s": exposed + to_host,
            "comm_bytes": moved["gpu"] + moved["host"]}
