"""The optimizers method.optimizer names: torch's AdamW and SGD, and bitsandbytes' AdamW with
8-bit state (each moment quantized block by block, 256 values per block with one float32 scale;
tensors under 4,096 values keep float32 moments) and its paged variants, whose state lives in
CUDA unified memory that the driver pages out to the host when the GPU runs short, instead of
failing with out-of-memory.
"""

import torch

from harness.core.options import PAGED_OPTIMIZERS

# bitsandbytes' state bits for each of its names (core/options.py lists every name a config may
# give, and which are paged); torch's own optimizers for the rest.
BITSANDBYTES = {"adamw_8bit": 8, "paged_adamw_8bit": 8, "paged_adamw_32bit": 32}


# train.optimizer_impl as torch.optim's arguments (auto: torch's own choice).
IMPLEMENTATIONS = {"auto": {}, "foreach": {"foreach": True}, "for_loop": {"foreach": False},
                   "fused": {"fused": True}}


def build(name: str, parameters: list, lr: float, weight_decay: float,
          implementation: str = "auto", paging: bool = True) -> torch.optim.Optimizer:
    """The optimizer `name` over `parameters`. `implementation` (train.optimizer_impl) says how
    torch's AdamW or SGD runs its update; `paging=False` keeps a paged optimizer's state in
    ordinary device memory (the estimate: on the GPU a paged state is resident unless memory
    runs short)."""
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay,
                                 **IMPLEMENTATIONS[implementation])
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, weight_decay=weight_decay,
                               **IMPLEMENTATIONS[implementation])
    import bitsandbytes as bnb  # only these optimizers need it

    return bnb.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay,
                           optim_bits=BITSANDBYTES[name],
                           is_paged=name in PAGED_OPTIMIZERS and paging)
