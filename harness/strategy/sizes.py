"""What the engines' plans share (no torch): a cell's world size, the share of a tensor a rank
sends in a ring collective, and a rank's share of the weights once they are sharded."""


def world_size(strategy) -> int:
    """A cell's ranks, over all its nodes (one where a stored run's strategy omits a count)."""
    return strategy.get("nproc_per_node", 1) * strategy.get("nnodes", 1)


def ring_share(strategy) -> float:
    """What each rank sends of a tensor in a ring reduce-scatter or all-gather: (N - 1) / N."""
    ranks = world_size(strategy)
    return (ranks - 1) / ranks


def sharded_weights(parts: dict, ranks: int) -> float:
    """One rank's share of the weights (MiB): the packed values / N, and every 4-bit layer's
    quantization state (block scales, code) whole, which FSDP and ZeRO-3 leave on the layer,
    unsharded (an estimate cached before the figure came counts it as sharded)."""
    state = parts.get("quantization_state", 0.0)
    return (parts["weights"] - state) / ranks + state
