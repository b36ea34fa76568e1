"""DeepSpeed's ZeRO engine, with the cell's own torch optimizer and linear schedule inside it
(DeepSpeedUpdates). LOMO runs under ZeRO-3 as its authors' implementation does: ZeRO-3's parameter
manager, without DeepSpeed's optimizer, partitions the weights and gathers each for its forward
and backward; each weight's whole gradient is all-reduced in its hook and the rank's own
partition updated from its slice (harness/model/lomo.py)."""

import contextlib

import torch
import torch.distributed as dist
from transformers import get_linear_schedule_with_warmup

from harness.core.options import FUSED_METHODS
from harness.model import optimizers
from harness.model.training_step import Updates
from harness.strategy import world as ranks
from harness.strategy.world import World


def prepare(model, cfg, world):
    return model  # DeepSpeed takes it over when the updates are built


def updates(engine, cfg, total_steps: int):
    if cfg.method.name in FUSED_METHODS:
        engine.partitions = _partitioned(engine.model, cfg, engine.world)
        found = Updates(engine.model, cfg, total_steps, engine.world.device)
        found.fused.reduce_gradient = ranks.averaging(engine.world)
        found.fused.partition_of = _partition_of
        found.fused.keep_graph = False  # ZeRO-3 releases what the graph saved
        found.stepping = _gathered  # LoRA+LOMO's adapters, for AdamW's step
        return found
    found = DeepSpeedUpdates(engine.model, cfg, total_steps, engine.world)
    engine.trained = found.engine
    return found


@contextlib.contextmanager
def evaluating(engine):
    yield engine.model  # ZeRO-3's hooks gather each layer for its forward


def state_dict(engine) -> dict | None:
    """Stage 3: the whole model's weights on this rank, gathered from the partitions."""
    if engine.strategy.stage != 3:
        return None
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.model.parameters())):
        return {key: value.detach().cpu().clone()
                for key, value in engine.model.state_dict().items()}


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
                                     train_cfg.weight_decay, train_cfg.optimizer_impl)
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
