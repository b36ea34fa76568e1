"""LOMO (arXiv 2306.09782): the SGD update fused into backward.

Each fused parameter gets a `torch.optim.SGD` of its own and a post-accumulate-grad hook: as soon
as backward has accumulated the parameter's gradient, the hook steps its optimizer and frees the
gradient. The gradients of all fused parameters therefore never exist at once; at most one is
alive. The learning-rate schedule is a transformers schedule per optimizer. A half weight
without a float32 master copy (precision.master_weights=false, the paper's pure fp16) is updated
as the paper's implementation does: it and its gradient cast to float32 for torch's SGD update,
one weight at a time, the result cast back.

Clipping by the global gradient norm needs that norm before any update, so a clipped step runs
backward twice, as the reference implementation (lomo_optim.Lomo) does: a norm pass that keeps the
graph and frees each gradient after measuring it, then the update pass. Parameters that are not
fused (LoRA+LOMO's adapters, trained by AdamW) are measured in the norm pass too, so that the whole
model is clipped by one norm; step() leaves their gradients clipped and unscaled for their own
optimizer.

Under a distributed strategy (harness/strategy/engines.py) each gradient is reduced across ranks
before it is used: `reduce_gradient` averages a whole gradient in its hook (ddp), or the gradient
arrives reduced and sharded and `reduce_squared_norm` sums the shards' squared norms (FSDP2).
Under ZeRO-3 (as the paper's own implementation runs) a weight is a partition on each rank:
`partition_of` gives it (the rank's slice of the flattened weight, and where the slice starts), and
the update applies the averaged whole gradient's matching slice to it, nothing else.
"""

import warnings

import torch
from torch.optim.sgd import sgd
from transformers import get_linear_schedule_with_warmup


class FusedSGD:
    """SGD on `parameters`, applied inside backward. `step(loss)` replaces loss.backward()."""

    def __init__(self, parameters, lr: float, weight_decay: float, warmup_steps: int,
                 total_steps: int, max_grad_norm: float | None, unfused=()):
        self.parameters = list(parameters)
        self.unfused = list(unfused)
        self.max_grad_norm = max_grad_norm
        # One weight per optimizer: the single-tensor update, in place on every device (a
        # "foreach" over one tensor saves nothing).
        self.optimizers = {parameter: torch.optim.SGD([parameter], lr=lr,
                                                      weight_decay=weight_decay, foreach=False)
                           for parameter in self.parameters}
        self.schedules = [get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
                          for optimizer in self.optimizers.values()]
        self.clip_coef = 1.0
        self.measuring = False
        self.squared_norms = []
        self.grad_scale = 1.0  # the fp16 loss scale the gradients carry
        self.largest_grad_bytes = 0  # the most gradient memory a fused step held at once
        self.reduce_gradient = self.reduce_squared_norm = None  # set under a strategy
        self.partition_of = None  # ZeRO-3: a weight's partition on this rank (see the module)
        self.keep_graph = True  # False: the update pass runs forward again (see step())
        self.hooks = [parameter.register_post_accumulate_grad_hook(self._on_gradient)
                      for parameter in self.parameters]

    @torch.no_grad()
    def _on_gradient(self, parameter: torch.Tensor) -> None:
        gradient = parameter.grad
        if self.reduce_gradient is not None:
            self.reduce_gradient(gradient)
        local = _local(gradient)
        self.largest_grad_bytes = max(self.largest_grad_bytes,
                                      local.numel() * local.element_size())
        partition = self.partition_of(parameter) if self.partition_of is not None else None
        if self.measuring:
            self.squared_norms.append(self._squared_norm(gradient))
        elif partition is not None:
            self._update_partition(parameter, gradient, *partition)
        elif parameter.dtype == torch.float32:
            gradient.mul_(self.clip_coef / self.grad_scale)
            self.optimizers[parameter].step()
        else:
            self._update_in_float32(parameter, gradient)
        parameter.grad = None

    def _update_in_float32(self, parameter: torch.Tensor, gradient: torch.Tensor) -> None:
        """A half weight without a master copy, as the paper's implementation updates it: the
        weight and its gradient cast to float32 (unscaled and clipped there, where fp16's range
        does not underflow), torch's SGD update, the result cast back; one weight at a time."""
        group = self.optimizers[parameter].param_groups[0]
        weight = parameter.float()
        sgd([weight], [gradient.float().mul_(self.clip_coef / self.grad_scale)], [None],
            weight_decay=group["weight_decay"], momentum=0.0, lr=group["lr"], dampening=0.0,
            nesterov=False, maximize=False, foreach=False)
        parameter.copy_(weight)

    def _update_partition(self, parameter: torch.Tensor, gradient: torch.Tensor,
                          partition: torch.Tensor, start: int) -> None:
        """SGD on this rank's partition of a ZeRO-3 weight from the matching slice of its whole
        (averaged) gradient, in float32 as a half weight's update is."""
        size = min(partition.numel(), gradient.numel() - start)
        whole = parameter.numel() == gradient.numel()  # ZeRO-3 keeps it whole (persistent)
        if whole:  # the whole weight updated, and this rank's partition of it kept in step
            if parameter.dtype == torch.float32:
                gradient.mul_(self.clip_coef / self.grad_scale)
                self.optimizers[parameter].step()
            else:
                self._update_in_float32(parameter, gradient)
            if size > 0:
                partition.narrow(0, 0, size).copy_(parameter.reshape(-1).narrow(0, start, size))
            return
        if size <= 0:  # a partition of padding alone
            return
        group = self.optimizers[parameter].param_groups[0]
        weight = partition.narrow(0, 0, size).float()
        sliced = gradient.reshape(-1).narrow(0, start, size).float()
        sgd([weight], [sliced.mul_(self.clip_coef / self.grad_scale)], [None],
            weight_decay=group["weight_decay"], momentum=0.0, lr=group["lr"], dampening=0.0,
            nesterov=False, maximize=False, foreach=False)
        partition.narrow(0, 0, size).copy_(weight)

    def step(self, loss: torch.Tensor, grad_scale: float = 1.0, again=None) -> bool:
        """Backward with the fused updates; False (nothing updated) when a gradient was not
        finite, which only the norm pass can see before it is too late. `again`: the same loss
        computed again (the same random numbers), for the update pass where the norm pass could
        not keep the graph (ZeRO-3 releases the weights the graph saved: `keep_graph` False)."""
        self.grad_scale = grad_scale
        self.clip_coef = 1.0
        if self.max_grad_norm is not None or grad_scale != 1.0:
            total_norm = self._norm_pass(loss)
            if not torch.isfinite(total_norm):
                return False
            if self.max_grad_norm is not None:
                self.clip_coef = min(1.0, self.max_grad_norm / (float(total_norm) + 1e-6))
            if not self.keep_graph:
                loss = again()
        (loss * grad_scale).backward()
        for parameter in self.unfused:
            if parameter.grad is not None:
                if self.reduce_gradient is not None:
                    self.reduce_gradient(parameter.grad)
                parameter.grad.mul_(self.clip_coef / grad_scale)
        with warnings.catch_warnings():
            # Half weights are updated by torch's functional SGD, never by their optimizer's
            # step(), which the schedule warns about; the rates it sets are read all the same.
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
            for schedule in self.schedules:
                schedule.step()
        return True

    def _norm_pass(self, loss: torch.Tensor) -> torch.Tensor:
        self.measuring, self.squared_norms = True, []
        try:
            (loss * self.grad_scale).backward(retain_graph=self.keep_graph)
        finally:
            self.measuring = False
        for parameter in self.unfused:  # measured, then cleared for the update pass
            if parameter.grad is not None:
                if self.reduce_gradient is not None:
                    self.reduce_gradient(parameter.grad)
                self.squared_norms.append(self._squared_norm(parameter.grad))
                parameter.grad = None
        squared = (torch.stack(self.squared_norms).sum() if self.squared_norms
                   else torch.zeros((), device=self.parameters[0].device))
        if self.reduce_squared_norm is not None:  # every rank, shards or not
            self.reduce_squared_norm(squared)
        return squared.sqrt()

    def _squared_norm(self, gradient: torch.Tensor) -> torch.Tensor:
        return (_local(gradient).float() / self.grad_scale).pow(2).sum()

    def last_lr(self) -> float:
        return self.schedules[0].get_last_lr()[0] if self.schedules else 0.0

    def remove(self) -> None:
        """Take the hooks off: evaluation and later code see ordinary parameters again."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) gradient; any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class LossScale:
    """fp16's dynamic loss scale for fused steps, with GradScaler's defaults: halve it when a
    gradient is not finite (that step updates nothing), double it after 2000 finite steps."""

    def __init__(self, enabled: bool, initial: float = 2.0**16, growth_interval: int = 2000):
        self.scale = initial if enabled else 1.0
        self.enabled, self.growth_interval = enabled, growth_interval
        self.finite_steps = 0

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        self.finite_steps = self.finite_steps + 1 if finite else 0
        if not finite:
            self.scale /= 2
        elif self.finite_steps % self.growth_interval == 0:
            self.scale *= 2
