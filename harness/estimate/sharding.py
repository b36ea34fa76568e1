"""One rank's share of a cell's memory under its strategy, on its GPU and on the host.

The estimate simulates one rank's step at its micro-batch (train.batch_size / ranks), which gives
the activations, the allocator's overhead and, as if the rank held the whole model, the weights,
gradients and optimizer state. The strategy's engine then says what each rank holds of those
(its plan's per_rank: harness/strategy/<engine>/plan.py, where each engine's documented rules
are written down beside its runtime).

Where the simulated peak is the optimizer's step (foreach AdamW's whole-model temporaries), an
engine whose optimizer steps 1/N of the model shares its temporaries out too, and the peak is the
larger of that step's and the one outside it.

`host` is one rank's; a node holds strategy.nproc_per_node of them.
"""

from harness.strategy import registry
from harness.strategy.sizes import world_size


def per_rank(parts: dict, strategy_cfg: dict, method: str) -> dict:
    """`parts` (the simulated rank at its micro-batch, holding the whole model) as the strategy
    leaves them on one rank's GPU, with `host` (MiB) beside them and `total` summed again."""
    plan = registry.plan(strategy_cfg["name"])
    ranks = world_size(strategy_cfg)
    found = {**parts, "host": 0.0, **plan.per_rank(parts, strategy_cfg, method)}
    if plan.SHARDS_OPTIMIZER:  # the optimizer steps this rank's shard: temporaries 1/N
        found["activations"] = max(parts["activations_outside_step"], parts["activations"]
                                   - parts["step_temporaries"] * (1 - 1 / ranks))
    found["total"] = sum(found[part] for part in
                         ("weights", "gradients", "optimizer", "activations", "allocator",
                          "cuda_context"))
    found["allocated"] = found["total"] - found["allocator"] - found["cuda_context"]
    return found
