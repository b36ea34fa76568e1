"""How a cell's model trains under its strategy: wrapped by DDP, sharded by FSDP2's fully_shard
(every transformer block, then the root), or handed to DeepSpeed's ZeRO engine; what runs the
forward, how a loss becomes updated weights, and how the model is evaluated and saved afterwards.

LOMO under ddp runs without DDP's wrapper: DDP reduces gradients in buckets after backward, too
late for an update fused into backward, so each fused weight's gradient is all-reduced in its own
hook. FSDP2 calls the post-accumulate-grad hooks of a sharded weight once its gradient is
reduce-scattered, so the fused update applies to each rank's shard as it stands. Under ZeRO-3,
LOMO runs as its authors' implementation does: DeepSpeed's engine without an optimizer partitions
the weights and gathers each for its forward and backward; each weight's whole gradient is
all-reduced in its hook and the rank's own partition updated from its slice. ZeRO-2's engine
owns the optimizer step, and hosts no fused update (refused before the cell runs).
"""

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import get_linear_schedule_with_warmup

from harness.core.options import DEEPSPEED_STRATEGIES, FSDP_STRATEGIES, FUSED_METHODS
from harness.model import models, optimizers
from harness.model.training_step import Updates
from harness.strategy import world as ranks
from harness.strategy.world import World


class Engine:
    """The model under its strategy. `model` is the transformers (or peft) model, `trained` what
    the training forward calls; updates(cfg, total_steps) builds how a loss updates the weights."""

    def __init__(self, model, cfg, world: World = ranks.SINGLE):
        self.model, self.trained, self.world = model, model, world
        self.strategy = cfg.strategy
        name, fused = cfg.strategy.name, cfg.method.name in FUSED_METHODS
        ranks.broadcast_weights(model, world)
        if name == "ddp" and not fused:
            device_ids = [world.local_rank] if world.device.type == "cuda" else None
            self.trained = DistributedDataParallel(model, device_ids=device_ids)
        elif name in FSDP_STRATEGIES:
            shard(model, cfg.strategy, world)

    def updates(self, cfg, total_steps: int):
        if self.strategy.name in DEEPSPEED_STRATEGIES and cfg.method.name in FUSED_METHODS:
            self.partitions = _partitioned(self.model, cfg, self.world)
            updates = Updates(self.model, cfg, total_steps, self.world.device)
            updates.fused.reduce_gradient = _averaged(self.world)
            updates.fused.partition_of = _partition_of
            updates.fused.keep_graph = False  # ZeRO-3 releases what the graph saved
            updates.stepping = _gathered  # LoRA+LOMO's adapters, for AdamW's step
            return updates
        if self.strategy.name in DEEPSPEED_STRATEGIES:
            updates = DeepSpeedUpdates(self.model, cfg, total_steps, self.world)
            self.trained = updates.engine
            return updates
        updates = Updates(self.model, cfg, total_steps, self.world.device)
        if updates.fused is not None and self.strategy.name == "ddp":
            updates.fused.reduce_gradient = _averaged(self.world)
        elif updates.fused is not None and self.strategy.name != "single":
            updates.fused.reduce_squared_norm = _summed
        return updates

    @contextlib.contextmanager
    def evaluating(self):
        """The model to evaluate and generate with. Every rank runs the same evaluation on the
        same examples (a sharded model's forward is a collective). FSDP2's root stays gathered
        throughout: generation calls the encoder and the head apart from the root's forward, and
        a root that resharded after its first forward would leave them sharded (T5's generate()
        failed on "mixed torch.Tensor and DTensor"); its blocks gather and free themselves."""
        if isinstance(self.model, FSDPModule):
            self.model.set_reshard_after_forward(False, recurse=False)
            self.model.unshard()
            try:
                yield self.model
            finally:
                self.model.set_reshard_after_forward(self.strategy.reshard_after_forward,
                                                     recurse=False)
                self.model.reshard()
            return
        yield self.model

    def state_dict(self) -> dict | None:
        """The whole model's weights on this rank (gathered from every rank's shards), for saving
        an adapter; None where the model's own state_dict is whole already."""
        if isinstance(self.model, FSDPModule):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )
            return get_model_state_dict(self.model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        if self.strategy.name in DEEPSPEED_STRATEGIES and self.strategy.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
                return {key: value.detach().cpu().clone()
                        for key, value in self.model.state_dict().items()}
        return None


def shard(model, strategy_cfg, world: World) -> None:
    """FSDP2: every transformer block (models.blocks) sharded as one unit, then the root with
    what is left (embeddings, head, final norms)."""
    mesh = dist.device_mesh.init_device_mesh(world.device.type, (world.size,))
    options = {"mesh": mesh, "reshard_after_forward": strategy_cfg.reshard_after_forward}
    if strategy_cfg.offload:
        # Pinned host memory needs a GPU; without one the shards are on the host already.
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in models.blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)


def _averaged(world: World):
    def reduce(gradient: torch.Tensor) -> None:
        dist.all_reduce(gradient)
        gradient.div_(world.size)
    return reduce


def _partitioned(model, cfg, world: World):
    """The model's weights partitioned by ZeRO-3's parameter manager (DeepSpeedZeRoOffload, what
    DeepSpeed's engine runs without an optimizer), which gathers each for its forward and
    backward and releases it after; LOMO updates the partitions in its hooks, and AdamW steps
    LoRA+LOMO's (small) adapters gathered whole. The engine itself is not used: its backward
    expects its own optimizer to reduce the gradients."""
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.utils.timer import NoopTimer

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # DeepSpeed's view of our group
    strategy = cfg.strategy
    config = deepspeed_config(cfg, world)
    config.pop("gradient_clipping")  # LOMO clips by the global norm of its own norm pass
    offload = DeepSpeedConfig(config).zero_config.offload_param
    manager = DeepSpeedZeRoOffload(
        model, timers=NoopTimer(), ds_config=config,
        prefetch_bucket_size=int(strategy.stage3_prefetch_bucket_size),
        max_live_parameters=int(strategy.stage3_max_live_parameters),
        param_persistence_threshold=int(strategy.stage3_param_persistence_threshold),
        offload_param_config=offload)
    return manager


def _partition_of(parameter) -> tuple[torch.Tensor, int] | None:
    """A ZeRO-3 weight's partition on this rank and where it starts in the flattened weight;
    None for a weight ZeRO-3 does not manage. A weight it keeps whole on every rank (persistent)
    has its partition too, which ZeRO-3 gathers it from again: both are updated."""
    partition = getattr(parameter, "ds_tensor", None)
    if partition is None:
        return None
    rank = dist.get_rank(group=getattr(parameter, "ds_process_group", None))
    return partition, partition.numel() * rank


def _gathered(weights):
    """ZeRO-3 weights whole on every rank for the block (their averaged gradients are whole),
    their partitions taken from rank 0's afterwards (every rank stepped them alike)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(weights, modifier_rank=0)


def _summed(squared_norm: torch.Tensor) -> None:
    if dist.get_backend() == "nccl" and squared_norm.device.type == "cpu":  # offloaded shards
        on_gpu = squared_norm.cuda()
        dist.all_reduce(on_gpu)
        squared_norm.copy_(on_gpu)
        return
    dist.all_reduce(squared_norm)


class DeepSpeedUpdates:
    """DeepSpeed's ZeRO engine as Updates: the cell's torch optimizer and linear schedule inside
    it, clipping by its gradient_clipping, the bucket and live-parameter limits and the offload
    that conf/strategy/ sets. Weights stay float32 and the forward runs under the cell's autocast,
    as in a single process."""

    def __init__(self, model, cfg, total_steps: int, world: World):
        import deepspeed

        train_cfg = cfg.train
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = optimizers.build(cfg.method.optimizer, trained, train_cfg.lr,
                                     train_cfg.weight_decay)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, world),
            lr_scheduler=lambda inner: get_linear_schedule_with_warmup(
                inner, train_cfg.warmup_steps, total_steps))
        self.fused, self.skipped = None, False

    def backward(self, loss: torch.Tensor, update: bool, again=None) -> bool:
        self.engine.backward(loss)
        self.engine.step()  # DeepSpeed steps at the accumulation boundary only
        return update

    def next_step(self) -> None:
        pass  # the engine stepped the schedule and freed the gradients

    def rates(self) -> dict:
        return {"lr": self.scheduler.get_last_lr()[0]}

    def breakdown(self, model) -> dict:
        return {}  # DeepSpeed's flat partitions are not the model's tensors: see the estimate

    def close(self) -> None:
        pass


def deepspeed_config(cfg, world: World) -> dict:
    """DeepSpeed's config for the cell: its batch as DeepSpeed counts it, ZeRO's stage, offload,
    buckets and live-parameter limit from conf/strategy/."""
    strategy, train_cfg = cfg.strategy, cfg.train
    zero = {"stage": strategy.stage, "reduce_bucket_size": int(strategy.reduce_bucket_size),
            "allgather_bucket_size": int(strategy.allgather_bucket_size),
            "stage3_prefetch_bucket_size": int(strategy.stage3_prefetch_bucket_size),
            "stage3_max_live_parameters": int(strategy.stage3_max_live_parameters),
            "stage3_param_persistence_threshold": int(strategy.stage3_param_persistence_threshold)}
    pinned = torch.cuda.is_available()
    if strategy.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pinned}
    if strategy.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pinned}
    return {"train_micro_batch_size_per_gpu": train_cfg.batch_size // world.size,
            "gradient_accumulation_steps": train_cfg.grad_accum_steps,
            "train_batch_size": train_cfg.batch_size * train_cfg.grad_accum_steps,
            "gradient_clipping": train_cfg.max_grad_norm or 0.0,
            "zero_optimization": zero,
            # The cell's own torch optimizer, offloaded too (DeepSpeed's CPU Adam compiles
            # just in time and is a different kernel than the single process's).
            "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
