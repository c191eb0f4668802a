"""The scaling policy, driven by synthetic traces over simulated time: no process is started.

``run_trace`` plays a load trace through ``decide`` one control-loop tick at a time, carrying the
policy state and ``last_change_at`` as the real loop would, and applies each decision to a
simulated pool (new instances are ready from the next tick; GPU memory and CPU core sets are used
up as instances are placed and given back as they are drained).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import pytest

from app.config import ConfigError
from app.control.plan.policy import (
    Decision,
    GpuLoad,
    HostLoad,
    InstanceLoad,
    PolicyState,
    ScalingConfig,
    ScalingContext,
    decide,
)


def config(**overrides) -> ScalingConfig:
    """A config with no delay or cooldown unless the test asks for one."""
    base = dict(min_instances=1, max_instances=8, target_in_flight_per_instance=2.0,
                upscale_threshold=1.0, downscale_threshold=0.5, upscale_delay_s=0.0,
                downscale_delay_s=0.0, cooldown_s=0.0, loop_interval_s=10.0)
    base.update(overrides)
    return ScalingConfig(**base)


# ---------------------------------------------------------------------------------------------
# The simulator


@dataclass
class Tick:
    now: float
    load: int
    before: int                 # pool size the decision saw
    decision: Decision
    state: PolicyState          # state after the decision

    @property
    def changed(self) -> bool:
        return self.decision.desired != self.before


@dataclass
class SimInstance:
    name: str
    gpu: int | None
    ready: bool


def spread(load: int, pool: list[SimInstance]) -> tuple[InstanceLoad, ...]:
    """The total load over the ready instances, as evenly as integers allow (extra to the first)."""
    ready = [i for i in pool if i.ready]
    base, extra = divmod(load, len(ready)) if ready else (0, 0)
    out, k = [], 0
    for inst in pool:
        if inst.ready:
            share = base + (1 if k < extra else 0)
            k += 1
            running = min(share, 2)
            out.append(InstanceLoad(inst.name, running, share - running, True, inst.gpu))
        else:
            out.append(InstanceLoad(inst.name, 0, 0, False, inst.gpu))
    return tuple(out)


def run_trace(cfg: ScalingConfig, loads: list[int], *, start: int = 1,
              gpus: list[tuple[int, int, float]] | None = None,
              host: HostLoad = HostLoad(cpu_pct=10.0, free_core_sets=16)) -> list[Tick]:
    """Run ``loads`` (one total load per tick) through ``decide``, carrying state and last change.

    ``gpus`` is (index, free MB now, utilization %); the ``start`` instances sit on the first GPU
    (already counted in its free memory), or on CPU core sets when there are no GPUs.
    """
    first_gpu = gpus[0][0] if gpus else None
    pool = [SimInstance(f"i{k}", first_gpu, True) for k in range(start)]
    next_id = start
    gpu_free = {i: free for i, free, _ in gpus or []}
    gpu_util = {i: util for i, _, util in gpus or []}
    free_sets = host.free_core_sets
    state, last_change = PolicyState(), None
    ticks = []
    for n, load in enumerate(loads):
        now = n * cfg.loop_interval_s
        ctx = ScalingContext(
            instances=spread(load, pool),
            gpus=tuple(GpuLoad(i, gpu_util[i], gpu_free[i], 80_000) for i in sorted(gpu_free)),
            host=HostLoad(host.cpu_pct, free_sets),
            now=now,
            last_change_at=last_change,
        )
        decision, state = decide(ctx, cfg, state)
        ticks.append(Tick(now, load, len(pool), decision, state))

        # Apply the decision as the supervisor would, and check it is self-consistent.
        assert not (decision.placement and decision.remove)
        assert cfg.min_instances <= decision.desired <= cfg.max_instances
        for inst in pool:  # everything that was there is ready by the next tick
            inst.ready = True
        for name in decision.remove:
            gone = next(i for i in pool if i.name == name)
            pool.remove(gone)
            if gone.gpu is None:
                free_sets += 1
            else:
                gpu_free[gone.gpu] += cfg.instance_memory_mb
        for where in decision.placement:
            pool.append(SimInstance(f"i{next_id}", where, False))
            next_id += 1
            if where is None:
                free_sets -= 1
                assert free_sets >= 0, "placed on a CPU core set that was not free"
            else:
                assert gpu_free[where] >= cfg.instance_memory_mb + cfg.gpu_headroom_mb, f"placed on full gpu{where}"
                gpu_free[where] -= cfg.instance_memory_mb
        assert len(pool) == decision.desired
        if decision.placement or decision.remove:
            last_change = now
    return ticks


def changes(ticks: list[Tick]) -> list[tuple[float, int, int]]:
    """(time, size before, size after) of every tick that changed the pool."""
    return [(t.now, t.before, t.decision.desired) for t in ticks if t.changed]


def ready(name: str, in_flight: int, queue: int = 0, gpu: int | None = None) -> InstanceLoad:
    return InstanceLoad(name, in_flight, queue, True, gpu)


def ctx_of(*instances: InstanceLoad, gpus=(), host=HostLoad(10.0, 16), now=1000.0,
           last_change_at=None) -> ScalingContext:
    return ScalingContext(tuple(instances), tuple(gpus), host, now, last_change_at)


# ---------------------------------------------------------------------------------------------
# Traces


def test_step_scales_up_only_after_the_upscale_delay_to_the_right_count():
    cfg = config(upscale_delay_s=30.0, downscale_delay_s=300.0)
    ticks = run_trace(cfg, [0] * 3 + [10] * 12)

    jump_at = 30.0
    # Ticks at 30, 40, 50 see the load and wait; the tick at 60 (30 s after the jump) acts.
    assert [t.state.consecutive for t in ticks[3:6]] == [1, 2, 3]
    assert all("upscale pending" in t.decision.reason for t in ticks[3:6])
    assert changes(ticks) == [(jump_at + 30.0, 1, 5)]     # ceil(10 / 2.0) = 5, in one step
    acted = ticks[6].decision
    assert acted.placement == (None,) * 4
    assert "load 10.0 over 1 instance, target 2.0 each" in acted.reason
    assert "-> 5" in acted.reason and "scaling up 1 -> 5" in acted.reason
    assert ticks[6].state == PolicyState(0)
    # At 5 instances the load is exactly on target: it holds there.
    assert all(t.decision.desired == 5 for t in ticks[7:])


def test_without_a_delay_the_step_is_taken_on_the_first_tick():
    ticks = run_trace(config(upscale_delay_s=0.0), [0, 10, 10])
    assert changes(ticks) == [(10.0, 1, 5)]


def test_spike_shorter_than_the_delay_changes_nothing():
    cfg = config(upscale_delay_s=30.0, downscale_delay_s=600.0)   # up needs 4 consecutive ticks
    ticks = run_trace(cfg, [0, 0, 20, 0, 0, 20, 20, 20, 0, 0])
    assert changes(ticks) == []
    assert ticks[2].state.consecutive == 1
    assert ticks[3].state.consecutive == 0    # back inside the band: counter reset
    assert ticks[7].state.consecutive == 3

    # The same trace with one more high tick crosses the delay: the boundary is real.
    ticks = run_trace(cfg, [0, 0, 20, 0, 0, 20, 20, 20, 20, 0])
    assert changes(ticks) == [(80.0, 1, 8)]


def test_slow_ramp_steps_up_one_by_one_and_never_overshoots_max():
    cfg = config(max_instances=5, upscale_delay_s=20.0, downscale_delay_s=600.0)
    loads = [t // 4 for t in range(100)]       # +1 request every 4 ticks, up to 24
    ticks = run_trace(cfg, loads)

    steps = changes(ticks)
    assert [(before, after) for _, before, after in steps] == [(1, 2), (2, 3), (3, 4), (4, 5)]
    assert max(t.decision.desired for t in ticks) == 5
    assert ticks[-1].decision.desired == 5
    late = ticks[-1].decision.reason
    assert "capped at max 5" in late and "already at max 5" in late
    # Each step waited for three consecutive "up" ticks after the load first asked for it.
    for when, before, _ in steps:
        first_asked = 4 * (2 * before + 1) * cfg.loop_interval_s   # load 2c+1 first exceeds c*2
        assert when == first_asked + 20.0


def test_flapping_load_changes_nothing_and_the_counter_resets_each_tick():
    cfg = config(upscale_delay_s=20.0, downscale_delay_s=20.0)
    ticks = run_trace(cfg, [20, 0] * 10, start=2)
    assert changes(ticks) == []
    assert [t.state.consecutive for t in ticks] == [1, -1] * 10


def test_load_stops_scales_down_after_the_delay_never_below_min():
    cfg = config(min_instances=2, downscale_delay_s=60.0, upscale_delay_s=0.0)
    ticks = run_trace(cfg, [8] * 3 + [0] * 20, start=4)   # 8 over 4 at target 2: steady

    stopped_at = 30.0
    assert changes(ticks) == [(stopped_at + 60.0, 4, 2)]
    acted = next(t.decision for t in ticks if t.changed)
    assert len(acted.remove) == 2 and acted.placement == ()
    assert "raised to min 2" in acted.reason and "scaling down 4 -> 2" in acted.reason
    assert [t.state.consecutive for t in ticks[3:9]] == [-1, -2, -3, -4, -5, -6]
    # At min it stays, however long the silence lasts.
    assert all(t.decision.desired == 2 for t in ticks[10:])
    assert "already at min 2" in ticks[-1].decision.reason


def test_partial_load_drop_scales_down_to_what_the_load_needs():
    cfg = config(downscale_delay_s=0.0)
    ticks = run_trace(cfg, [16, 16, 3, 3], start=8)        # 3 requests at 2 each -> 2 instances
    assert changes(ticks) == [(20.0, 8, 2)]


def test_scale_down_drains_not_ready_first_then_the_least_loaded():
    cfg = config(target_in_flight_per_instance=4.0)
    ctx = ctx_of(ready("a", 2, 1), ready("b", 0), ready("c", 1),
                 InstanceLoad("d", 0, 0, False, None), ready("e", 2, 2))
    # load 8 over 5 at target 4: ratio 0.4 < 0.5 -> ceil(8 / 4) = 2, so 3 are drained.
    decision, _ = decide(ctx, cfg, PolicyState())
    assert decision.desired == 2
    assert decision.remove == ("d", "b", "c")
    assert "(1 not ready)" in decision.reason
    assert "draining d, b, c" in decision.reason


def test_cooldown_blocks_a_second_change_and_then_lets_it_through():
    cfg = config(upscale_delay_s=0.0, cooldown_s=60.0)
    ticks = run_trace(cfg, [4] + [16] * 10)
    assert changes(ticks) == [(0.0, 1, 2), (60.0, 2, 8)]
    held = [t for t in ticks if 0.0 < t.now < 60.0]
    assert held and all("held by cooldown" in t.decision.reason for t in held)
    assert "last change 20.0s ago, cooldown 60.0s" in ticks[2].decision.reason
    # The pressure kept counting through the cooldown, so it acted on the first tick allowed.
    assert [t.state.consecutive for t in held] == [1, 2, 3, 4, 5]


def test_cooldown_also_holds_a_scale_down():
    cfg = config(cooldown_s=60.0)
    ctx = ctx_of(ready("a", 0), ready("b", 0), now=100.0, last_change_at=50.0)
    decision, state = decide(ctx, cfg, PolicyState())
    assert decision.desired == 2 and decision.remove == ()
    assert "downscale held by cooldown" in decision.reason
    assert state.consecutive == -1
    decision, _ = decide(dataclasses.replace(ctx, now=110.0), cfg, state)
    assert decision.desired == 1 and len(decision.remove) == 1


# ---------------------------------------------------------------------------------------------
# Room: GPUs and CPU core sets


def test_gpu_memory_full_nothing_is_placed_and_the_reason_says_so():
    cfg = config(upscale_delay_s=20.0)         # 3 ticks
    gpus = (GpuLoad(0, 10.0, 1000, 24_000), GpuLoad(1, 10.0, 2000, 24_000))
    ctx = ctx_of(ready("a", 2, 8, gpu=0), gpus=gpus)
    state = PolicyState()
    for n in range(5):
        decision, state = decide(dataclasses.replace(ctx, now=n * 10.0), cfg, state)
        assert decision.desired == 1 and decision.placement == ()
    assert "GPU memory full" in decision.reason
    assert "gpu0 1000 MB free" in decision.reason and "gpu1 2000 MB free" in decision.reason
    assert "no room for 4 new instances" in decision.reason
    # The wish to scale up was not forgotten: once a GPU frees up it acts at once.
    assert state.consecutive == 5
    roomy = dataclasses.replace(ctx, gpus=(GpuLoad(0, 10.0, 1000, 24_000),
                                           GpuLoad(1, 10.0, 8000, 24_000)), now=50.0)
    decision, state = decide(roomy, cfg, state)
    assert decision.placement == (1, 1, 1)     # 8000 -> 5952 -> 3904 -> 1856, below 2560
    assert state == PolicyState(0)


def test_gpu_partial_scale_up_uses_only_the_gpu_with_room():
    gpus = (GpuLoad(0, 10.0, 1000, 24_000), GpuLoad(1, 10.0, 4000, 24_000))
    decision, _ = decide(ctx_of(ready("a", 2, 8, gpu=0), gpus=gpus), config(), PolicyState())
    assert decision.placement == (1,)
    assert decision.desired == 2
    assert "room for only 1 of 4 new instances: GPU memory full" in decision.reason
    assert "gpu0 1000 MB free" in decision.reason
    assert "scaling up 1 -> 2 on gpu1" in decision.reason


def test_gpu_placement_counts_instances_placed_in_the_same_decision():
    gpus = (GpuLoad(0, 10.0, 6000, 24_000), GpuLoad(1, 10.0, 5000, 24_000))
    decision, _ = decide(ctx_of(ready("a", 2, 8, gpu=0), gpus=gpus), config(), PolicyState())
    # 6000/5000 -> gpu0 (3952/5000) -> gpu1 (3952/2952) -> gpu0 (1904/2952) -> gpu1 (1904/904)
    assert decision.placement == (0, 1, 0, 1)
    assert decision.desired == 5
    assert "full" not in decision.reason


def test_busy_gpu_takes_no_new_instance_however_much_memory_it_has():
    gpus = (GpuLoad(0, 95.0, 40_000, 80_000), GpuLoad(1, 10.0, 3000, 24_000))
    decision, _ = decide(ctx_of(ready("a", 2, 4, gpu=0), gpus=gpus), config(), PolicyState())
    assert decision.placement == (1,)          # 2 wanted; gpu1 has room for one
    assert "GPU busy (gpu0 at 95.0% >= 90.0%)" in decision.reason


def test_gpu_memory_of_a_starting_instance_is_reserved():
    gpus = (GpuLoad(0, 10.0, 4000, 24_000),)
    starting = InstanceLoad("b", 0, 0, False, 0)
    decision, _ = decide(ctx_of(ready("a", 2, 8, gpu=0), starting, gpus=gpus), config(),
                         PolicyState())
    assert decision.placement == ()
    assert "GPU memory full (gpu0 1952 MB free" in decision.reason


def test_gpu_room_uses_the_measured_instance_memory_not_the_configured_estimate():
    """Once an instance has loaded, what it measured (``ctx.instance_memory_mb``) is one instance's
    memory, for new instances and for those still starting alike; the configured 2048 MB is only the
    estimate before that."""
    cfg = config()
    assert cfg.instance_memory_mb == 2048 and cfg.gpu_headroom_mb == 512
    gpus = (GpuLoad(0, 10.0, 12_000, 24_000),)
    busy = ready("a", 2, 8, gpu=0)                     # wants 5 instances: 4 new
    estimated, _ = decide(ctx_of(busy, gpus=gpus), cfg, PolicyState())
    assert estimated.placement == (0, 0, 0, 0)         # 12000 -> 9952 -> 7904 -> 5856 -> 3808
    measured = dataclasses.replace(ctx_of(busy, gpus=gpus), instance_memory_mb=5_000)
    decision, _ = decide(measured, cfg, PolicyState())
    assert decision.placement == (0, 0)                # 12000 -> 7000 -> 2000, below 5512
    assert "room for only 2 of 4 new instances" in decision.reason and "needs 5512 MB" in decision.reason
    # A starting instance is charged the measured figure too: 12000 - 5000 leaves room for one.
    starting = InstanceLoad("b", 0, 0, False, 0)
    decision, _ = decide(dataclasses.replace(measured, instances=(busy, starting)), cfg, PolicyState())
    assert decision.placement == (0,) and "gpu0 2000 MB free" in decision.reason
    # Smaller than the estimate: more fit than the estimate would allow.
    small = dataclasses.replace(ctx_of(busy, gpus=(GpuLoad(0, 10.0, 4_000, 24_000),)), instance_memory_mb=1_000)
    assert decide(small, cfg, PolicyState())[0].placement == (0, 0, 0)  # 4000 -> 3000 -> 2000 -> 1000; estimated: 1


def test_gpu_trace_fills_one_gpu_and_never_touches_the_full_one():
    cfg = config()
    ticks = run_trace(cfg, [40] * 6, gpus=[(0, 9000, 10.0), (1, 1000, 10.0)])
    assert changes(ticks) == [(0.0, 1, 5)]
    assert ticks[0].decision.placement == (0, 0, 0, 0)
    assert all("GPU memory full" in t.decision.reason for t in ticks)
    assert all(1 not in t.decision.placement for t in ticks)


def test_cpu_host_without_a_free_core_set_does_not_scale_up():
    decision, state = decide(ctx_of(ready("a", 2, 8), host=HostLoad(40.0, 0)), config(),
                             PolicyState())
    assert decision.desired == 1 and decision.placement == ()
    assert "no room for 4 new instances: no free CPU core set" in decision.reason
    assert state.consecutive == 1


def test_cpu_host_scales_up_as_far_as_free_core_sets_allow():
    decision, _ = decide(ctx_of(ready("a", 2, 8), host=HostLoad(40.0, 1)), config(),
                         PolicyState())
    assert decision.placement == (None,) and decision.desired == 2
    assert "room for only 1 of 4 new instances: only 1 free CPU core set" in decision.reason


def test_cpu_host_that_is_already_busy_does_not_scale_up():
    decision, _ = decide(ctx_of(ready("a", 2, 8), host=HostLoad(95.0, 4)), config(),
                         PolicyState())
    assert decision.placement == ()
    assert "host CPU 95.0% >= cpu_high_pct 90.0%" in decision.reason


def test_cpu_trace_stops_growing_when_core_sets_run_out():
    ticks = run_trace(config(), [40] * 4, host=HostLoad(20.0, 2))
    assert changes(ticks) == [(0.0, 1, 3)]
    assert "no free CPU core set" in ticks[-1].decision.reason


# ---------------------------------------------------------------------------------------------
# Bounds, band and purity


def test_dead_band_keeps_the_size_and_resets_the_counter():
    # load 6 over 4 at target 2: ratio 0.75, between 0.5 and 1.0.
    ctx = ctx_of(*(ready(n, 2) for n in "abc"), ready("d", 0))
    decision, state = decide(ctx, config(), PolicyState(-3))
    assert decision.desired == 4 and "within [0.5, 1.0], keeping 4" in decision.reason
    assert state == PolicyState(0)


def test_not_ready_instances_count_as_current_with_zero_load():
    # A starting instance may already report requests routed to it; they are not counted, so
    # load 4 over 2 instances at target 2 is exactly on target (ratio 1.0): no scale-up.
    ctx = ctx_of(ready("a", 2, 2), InstanceLoad("b", 3, 5, False, None))
    decision, state = decide(ctx, config(), PolicyState())
    assert decision.desired == 2 and decision.placement == ()
    assert "load 4.0 over 2 instances (1 not ready)" in decision.reason
    assert state == PolicyState(0)


def test_thresholds_widen_the_band():
    ctx = ctx_of(ready("a", 2, 1))            # ratio 1.5
    assert decide(ctx, config(), PolicyState())[0].desired == 2
    assert decide(ctx, config(upscale_threshold=2.0), PolicyState())[0].desired == 1


def test_empty_pool_is_raised_to_min_at_once_despite_delay_and_cooldown():
    cfg = config(min_instances=2, upscale_delay_s=300.0, cooldown_s=600.0)
    decision, state = decide(ctx_of(now=10.0, last_change_at=5.0), cfg, PolicyState(-4))
    assert decision.desired == 2 and decision.placement == (None, None)
    assert "pool of 0 is below min 2" in decision.reason
    assert state == PolicyState(0)


def test_pool_above_max_is_drained_at_once():
    cfg = config(max_instances=2, downscale_delay_s=300.0, cooldown_s=600.0)
    ctx = ctx_of(ready("a", 2), ready("b", 0), ready("c", 1), ready("d", 2), last_change_at=999.0)
    decision, _ = decide(ctx, cfg, PolicyState())
    assert decision.desired == 2 and decision.remove == ("b", "c")
    assert "pool of 4 is above max 2" in decision.reason


def test_decide_is_pure_and_reads_no_clock(monkeypatch):
    def no_clock():
        raise AssertionError("decide read the clock")

    for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns"):
        monkeypatch.setattr(time, name, no_clock)
    ctx = ctx_of(ready("a", 2, 8, gpu=0), gpus=(GpuLoad(0, 10.0, 9000, 24_000),))
    cfg, state = config(upscale_delay_s=10.0), PolicyState(1)
    first = decide(ctx, cfg, state)
    assert decide(ctx, cfg, state) == first
    assert state == PolicyState(1)             # the input state is untouched
    assert first[0].placement == (0, 0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Config validation


def test_defaults_are_valid_and_frozen():
    cfg = ScalingConfig()
    assert cfg.min_instances >= 1 and cfg.max_instances >= cfg.min_instances
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_instances = 10                  # type: ignore[misc]


@pytest.mark.parametrize("overrides, message", [
    (dict(min_instances=0), "min_instances must be at least 1"),
    (dict(min_instances=1.5), "min_instances must be an integer"),
    (dict(min_instances=True), "min_instances must be an integer"),
    (dict(min_instances=4, max_instances=3), "max_instances (3) is below min_instances (4)"),
    (dict(target_in_flight_per_instance=0), "target_in_flight_per_instance must be above 0"),
    (dict(target_in_flight_per_instance=float("nan")), "must be a finite number"),
    (dict(upscale_threshold=0.9), "upscale_threshold (0.9) must be at least 1.0"),
    (dict(downscale_threshold=-0.1), "downscale_threshold must not be negative"),
    (dict(downscale_threshold=1.2, upscale_threshold=2.0), "must be between 0.0 and 1.0"),
    (dict(downscale_threshold=1.0, upscale_threshold=1.0), "must be below upscale_threshold"),
    (dict(upscale_delay_s=-1), "upscale_delay_s must not be negative"),
    (dict(downscale_delay_s=-1), "downscale_delay_s must not be negative"),
    (dict(cooldown_s=-5), "cooldown_s must not be negative"),
    (dict(loop_interval_s=0), "loop_interval_s must be above 0"),
    (dict(cpu_high_pct=0), "cpu_high_pct must be above 0"),
    (dict(cpu_high_pct=101), "cpu_high_pct (101) is a percentage"),
    (dict(gpu_util_high_pct=150), "gpu_util_high_pct (150) is a percentage"),
    (dict(instance_memory_mb=0), "instance_memory_mb must be at least 1"),
    (dict(gpu_headroom_mb=-1), "gpu_headroom_mb must be at least 0"),
])
def test_config_rejects_bad_bounds(overrides, message):
    with pytest.raises(ConfigError) as err:
        config(**overrides)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_config_accepts_edge_values():
    config(min_instances=3, max_instances=3, downscale_threshold=0.0, upscale_threshold=1.0,
           cpu_high_pct=100, gpu_util_high_pct=100, gpu_headroom_mb=0,
           instance_memory_mb=2048)


def test_context_rejects_duplicate_instance_names():
    with pytest.raises(ValueError, match="unique"):
        ctx_of(ready("a", 0), ready("a", 1))
