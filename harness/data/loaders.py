"""The loader a cell trains with: its examples shuffled by a generator of its own (the same order
on every rank and in every run of one seed) and collated into batches as the model's family
pads them. The time model measures a loader built here, too (harness/estimate/host_time.py).
"""

import torch
from torch.utils.data import DataLoader


def training(examples, batch_size: int, seed: int, collate) -> DataLoader:
    """Batches of `batch_size` of `examples` (a datasets.Dataset), in an order drawn from
    `seed`, each collated by `collate` (harness/model/families.py's)."""
    shuffle = torch.Generator().manual_seed(seed)
    return DataLoader(examples, batch_size=batch_size, shuffle=True, generator=shuffle,
                      collate_fn=collate)
