"""What a strategy moves per step and what of it compute does not hide
(harness/estimate/communication.py): the bytes of each collective pinned, and the plan's time
and cost of one cell on one GPU, on two, and on one with offload."""

import pytest
from omegaconf import OmegaConf

from harness.core.units import MIB
from harness.estimate import communication
from tests.conftest import compose_cell

# One rank's estimate, in MiB: 1000 of weights, all trained, in blocks of 50.
PARTS = {"weights": 1000.0, "trained_weights": 1000.0, "largest_block": 50.0}
A100 = {"link_gbs": 300.0, "host_gbs": 32.0, "internode_gbs": 12.5}


def _strategy(*overrides) -> dict:
    return OmegaConf.to_container(compose_cell(*overrides).strategy)


@pytest.mark.parametrize("overrides, method, gpu_mib, host_mib", [
    (["strategy=single"], "full", 0.0, 0.0),
    (["strategy=ddp"], "full", 1000.0, 0.0),                      # all-reduce: 2 T (N-1)/N
    (["strategy=ddp", "strategy.nproc_per_node=4"], "full", 1500.0, 0.0),
    (["strategy=fsdp"], "full", 1500.0, 0.0),                     # (2 W + T) (N-1)/N
    (["strategy=fsdp", "strategy.reshard_after_forward=false"], "full", 1000.0, 0.0),
    (["strategy=fsdp_offload"], "full", 1500.0, 1500.0),          # shards over the host link
    (["strategy=zero2"], "full", 1000.0, 0.0),                    # reduce-scatter + all-gather
    (["strategy=zero3"], "full", 1500.0, 0.0),
    (["strategy=zero3_offload", "strategy.nproc_per_node=2"], "full", 1500.0, 1500.0),
    (["strategy=zero3_offload"], "full", 0.0, 3000.0),           # one rank: the host link alone
])
def test_the_bytes_each_strategy_moves_per_step(overrides, method, gpu_mib, host_mib):
    moved = communication.bytes_per_step(PARTS, _strategy(*overrides), method, clipped=True)
    assert (moved["gpu"] / MIB, moved["host"] / MIB) == pytest.approx((gpu_mib, host_mib))


def test_lomo_all_reduces_in_its_hooks_twice_when_it_clips_and_hides_nothing():
    ddp = _strategy("strategy=ddp")
    clipped = communication.bytes_per_step(PARTS, ddp, "lomo", clipped=True)["gpu"]
    assert clipped == 2 * communication.bytes_per_step(PARTS, ddp, "lomo", clipped=False)["gpu"]
    timed = communication.seconds(PARTS, ddp, "lomo", True, A100, compute_s=1.0)
    assert timed["exposed_s"] == pytest.approx(timed["comm_s"]) == pytest.approx(
        2 * 1000 * MIB / 300e9)


def test_what_compute_hides_and_what_it_does_not():
    ddp = communication.seconds(PARTS, _strategy("strategy=ddp"), "full", True, A100, 0.1)
    assert ddp["comm_s"] == pytest.approx(1000 * MIB / 300e9)  # 3.5 ms
    assert ddp["exposed_s"] == pytest.approx(25 * MIB / 300e9)  # the last bucket, 0.09 ms
    fsdp = communication.seconds(PARTS, _strategy("strategy=fsdp"), "full", True, A100, 0.1)
    assert fsdp["exposed_s"] == pytest.approx(25 * MIB / 300e9)  # the first block's gather
    zero2 = communication.seconds(PARTS, _strategy("strategy=zero2"), "full", True, A100, 0.1)
    assert zero2["exposed_s"] == pytest.approx(zero2["comm_s"])  # after backward, waited for
    offload = communication.seconds(PARTS, _strategy("strategy=fsdp_offload"), "full", True,
                                    A100, 0.1)
    assert offload["exposed_s"] == pytest.approx(25 * MIB / 300e9 + 1500 * MIB / 32e9)
    # Across nodes the ring runs at the slower link.
    nodes = communication.seconds(PARTS, _strategy("strategy=ddp", "strategy.nnodes=2"), "full",
                                  True, A100, 0.0)
    assert nodes["comm_s"] == pytest.approx(2 * 1000 * MIB * 3 / 4 / 12.5e9)
    # A GPU whose links conf/peaks/ does not give: no figure, rather than a guess.
    assert communication.seconds(PARTS, _strategy("strategy=ddp"), "full", True, {}, 0.1) == {}


def test_the_plan_prices_one_gpu_two_and_one_with_offload(tmp_path):
    from harness.sweep import plan

    common = ["model=t5-mini", "method=full", "data=synthetic", "train.max_steps=100",
              f"cache_dir={tmp_path}/cache", f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    jobs = [compose_cell(*common, *strategy) for strategy in
            (["strategy=single"], ["strategy=ddp"], ["strategy=zero3_offload"])]
    h100 = OmegaConf.create({"name": "H100", "memory_mib": 81559,  # priced in conf/cost/
                             "nvml_name": "NVIDIA H100 80GB HBM3"})
    table = plan.plan(jobs, [], h100, create_experiment=False).set_index("strategy")
    one, two, offload = (table.loc[name] for name in ("single", "ddp-x2", "zero3_offload-x1"))
    assert one.comm_gb_per_step == 0 and two.comm_gb_per_step > 0
    # One GPU with offload moves its weights over the host link, and waits for them.
    assert offload.comm_exposed_s == pytest.approx(offload.comm_s) and offload.comm_s > 0
    for row in (one, two, offload):  # every row a time and a price on the GPU compared with
        assert row.predicted_step_s > 0 and row.predicted_cost_usd > 0
    # Two GPUs cost both GPUs' hours; the transfers are in the step's time and its bound.
    assert "transfers" in two.bound and two.comm_exposed_s > 0
    assert two.predicted_cost_usd == pytest.approx(
        two.predicted_step_s * two.train_steps / 3600 * 2 * two.usd_per_gpu_hour)
