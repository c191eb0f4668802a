"""Scaling policy for the elastic pool of model instances: how many there should be, and where.

``decide`` is a pure function in the manner of Ray Serve's autoscaling policy: it takes a snapshot
of the pool (``ScalingContext``), the configuration and the policy's own state, and returns a
``Decision`` plus the next state. It starts nothing, reads no clock and does no I/O: time comes in as
``ctx.now``, and the caller owns the loop, the actuation and ``last_change_at``. That keeps every
rule testable with synthetic traces over simulated time.

The steps, always applied in this order:

1. Bounds repair: a pool below ``min_instances`` or above ``max_instances`` (an instance vanished,
   the config changed) is brought back inside at once, skipping the delays and the cooldown, since
   the bounds are promises, not preferences.
2. Core rule: ``desired = ceil(current * load / (target * current))`` (which is ``ceil(load /
   target)``), but only when the load ratio leaves the dead band ``[downscale_threshold,
   upscale_threshold]``; inside it the pool keeps its size, so a load sitting near the target does
   not make the count twitch.
3. Bounds: clamp to ``[min_instances, max_instances]``.
4. Delay (hysteresis): ``PolicyState.consecutive`` counts consecutive "up" (positive) or "down"
   (negative) ticks and is reset when the direction changes or no change is wanted; a change happens
   only once the count passes ``delay_s / loop_interval_s`` ticks.
5. Cooldown: no change within ``cooldown_s`` of ``last_change_at``.
6. Room (up only): each new instance goes to the GPU with the most free memory that still has
   room for one instance plus ``gpu_headroom_mb`` and is below ``gpu_util_high_pct``
   (``app.control.plan.placement.choose_gpus``, the one placement rule; instances placed earlier in the
   same decision and instances not holding their memory yet, starting or loading again, are
   charged, as NVML does not show it yet; a draining one still holds its memory and is not). One
   instance's memory is what running instances measured after loading (``ctx.instance_memory_mb``),
   or ``instance_memory_mb`` until one has. A GPU with an NVML fault takes none. On a pool of CPU
   instances, a free CPU core set. Without room for all, the pool grows only as far as room allows.
7. Removal (down only): drain not-ready instances first (they hold no requests and serve nothing),
   then the least loaded ready ones, ties broken by name.

When a wanted change is held back by the cooldown or by lack of room, the counter is kept (not
reset), so the change happens on the first tick the obstacle is gone. Any change made resets it.

The caller must list instances that are still starting (``ready=False``) in ``ctx.instances``: they
count toward the current size, with zero load, so a scale-up is not repeated while its instances load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from app.config import ConfigError
from app.control.plan.placement import choose_gpus

# Float slack for "ceil" and "ticks": 5.000000001 requests must not become 6 instances.
_EPS = 1e-9


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ScalingConfig:
    """How the pool scales.

    Load is requests running plus waiting, per instance. The load ratio is
    ``load / (target_in_flight_per_instance * current)``: above ``upscale_threshold`` the pool grows,
    below ``downscale_threshold`` it shrinks, in between it holds. ``upscale_threshold`` must be at
    least 1.0 and ``downscale_threshold`` at most 1.0 (and strictly lower), so the count the core
    rule aims for is itself inside the dead band and the pool cannot flap between two sizes.
    """

    min_instances: int = 1
    max_instances: int = 4
    target_in_flight_per_instance: float = 2.0
    upscale_threshold: float = 1.0       # grow when load ratio > this
    downscale_threshold: float = 0.5     # shrink when load ratio < this
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 300.0
    cooldown_s: float = 60.0
    loop_interval_s: float = 10.0
    cpu_high_pct: float = 90.0           # host CPU at or above this: no new CPU instance
    gpu_headroom_mb: int = 512           # free memory a GPU keeps beyond the instances it takes
    gpu_util_high_pct: float = 90.0      # a GPU at or above this utilization takes no new instance
    instance_memory_mb: int = 2048       # GPU memory one instance holds, until one has measured it
    gpus_per_instance: int = 1           # GPUs one instance spans (vLLM's tensor parallelism)

    def __post_init__(self) -> None:
        _require_int("min_instances", self.min_instances, low=1)
        _require_int("max_instances", self.max_instances, low=1)
        if self.max_instances < self.min_instances:
            raise ConfigError(
                f"max_instances ({self.max_instances}) is below min_instances ({self.min_instances})")
        _require_number("target_in_flight_per_instance", self.target_in_flight_per_instance,
                        positive=True)
        _require_number("upscale_threshold", self.upscale_threshold)
        _require_number("downscale_threshold", self.downscale_threshold)
        if self.upscale_threshold < 1.0:
            raise ConfigError(f"upscale_threshold ({self.upscale_threshold}) must be at least 1.0, "
                              "or the pool would grow while under its target")
        if not 0.0 <= self.downscale_threshold <= 1.0:
            raise ConfigError(
                f"downscale_threshold ({self.downscale_threshold}) must be between 0.0 and 1.0")
        if self.downscale_threshold >= self.upscale_threshold:
            raise ConfigError(f"downscale_threshold ({self.downscale_threshold}) must be below "
                              f"upscale_threshold ({self.upscale_threshold})")
        for name in ("upscale_delay_s", "downscale_delay_s", "cooldown_s"):
            _require_number(name, getattr(self, name))
        _require_number("loop_interval_s", self.loop_interval_s, positive=True)
        for name in ("cpu_high_pct", "gpu_util_high_pct"):
            value = getattr(self, name)
            _require_number(name, value, positive=True)
            if value > 100:
                raise ConfigError(f"{name} ({value}) is a percentage: at most 100")
        _require_int("instance_memory_mb", self.instance_memory_mb, low=1)
        _require_int("gpu_headroom_mb", self.gpu_headroom_mb, low=0)


def _require_int(name: str, value: object, low: int) -> None:
    """Counts must be real ints: a bool or 1.5 instances is a config mistake, not a value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ConfigError(f"{name} must be at least {low}, got {value}")


def _require_number(name: str, value: object, positive: bool = False) -> None:
    """Rates and durations must be finite and not negative (or strictly positive where divided by)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{name} must be above 0, got {value}")
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {value}")


# ---------------------------------------------------------------------------------------------
# Inputs, state and output


@dataclass(frozen=True)
class InstanceLoad:
    """One instance as the control loop last saw it; ``gpu`` is its GPU index, None on CPU, and
    ``more_gpus`` the others of an instance that spans GPUs."""

    name: str
    in_flight: int
    queue_depth: int
    ready: bool
    gpu: int | None = None
    more_gpus: tuple[int, ...] = ()
    # Holds all the GPU memory it will (NVML's free figure shows it): False while it starts or loads
    # its model again, True while it drains. None: as ``ready`` says.
    loaded: bool | None = None

    @property
    def holds_its_memory(self) -> bool:
        return self.ready if self.loaded is None else self.loaded

    def __post_init__(self) -> None:
        if self.in_flight < 0 or self.queue_depth < 0:
            raise ValueError(f"instance {self.name}: in_flight and queue_depth must not be negative")

    @property
    def load(self) -> int:
        """Requests running plus waiting; an instance that is not ready carries none."""
        return self.in_flight + self.queue_depth if self.ready else 0


@dataclass(frozen=True)
class GpuLoad:
    """One GPU's figures from NVML; None where NVML gave none (``fault`` says why)."""

    index: int
    utilization_pct: float | None
    memory_free_mb: int | None
    memory_total_mb: int | None
    fault: str = ""

    @property
    def usable(self) -> bool:
        return not self.fault and self.memory_free_mb is not None


@dataclass(frozen=True)
class HostLoad:
    cpu_pct: float
    free_core_sets: int     # how many more disjoint CPU core sets could be handed out


@dataclass(frozen=True)
class ScalingContext:
    """A snapshot: the pool (starting instances included), the GPUs, the host, and the time."""

    instances: tuple[InstanceLoad, ...]
    gpus: tuple[GpuLoad, ...]           # empty on a pool of CPU instances, whatever the host has
    host: HostLoad
    now: float
    last_change_at: float | None = None
    instance_memory_mb: int | None = None  # measured by the running instances; None: none has yet
    gpu_pool: bool | None = None        # the pool runs on GPUs; None: it does when ``gpus`` lists any

    def __post_init__(self) -> None:
        object.__setattr__(self, "instances", tuple(self.instances))
        object.__setattr__(self, "gpus", tuple(self.gpus))
        names = [i.name for i in self.instances]
        if len(set(names)) != len(names):
            raise ValueError(f"instance names must be unique, got {names}")


@dataclass(frozen=True)
class PolicyState:
    """Consecutive ticks that wanted to scale up (positive) or down (negative)."""

    consecutive: int = 0


@dataclass(frozen=True)
class Decision:
    """What the pool should become.

    ``placement`` has one entry per NEW instance (a GPU index, a tuple of them for an instance that
    spans GPUs, or None for a CPU core set);
    ``remove`` names the instances to drain. At most one of them is non-empty, and
    ``desired == len(ctx.instances) + len(placement) - len(remove)``.
    """

    desired: int
    placement: tuple[int | tuple[int, ...] | None, ...]
    reason: str
    remove: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# The policy


def decide(ctx: ScalingContext, config: ScalingConfig,
           state: PolicyState) -> tuple[Decision, PolicyState]:
    """One tick of the policy: the decision for this snapshot and the state for the next tick."""
    current = len(ctx.instances)

    repaired = _repair_bounds(current, config)
    if repaired is not None:
        target, why = repaired
        return _act(ctx, config, current, target, [why], PolicyState(0), PolicyState(0))

    load = _total_load(ctx.instances)
    wanted, why_load = _desired_from_load(load, ctx.instances, config)
    notes = [why_load]

    bounded, why_bounds = _apply_bounds(wanted, config)
    if why_bounds:
        notes.append(why_bounds)

    if bounded == current:
        if bounded != wanted:
            notes.append(f"already at {'max' if wanted > bounded else 'min'} {current}")
        return _hold(current, notes), PolicyState(0)

    counter, due, why_delay = _apply_delay(bounded, current, config, state.consecutive)
    if not due:
        notes.append(why_delay)
        return _hold(current, notes), PolicyState(counter)

    waiting = _cooldown_left(ctx, config)
    if waiting > 0:
        notes.append(f"{'up' if bounded > current else 'down'}scale held by cooldown: last change "
                     f"{_num(ctx.now - ctx.last_change_at)}s ago, cooldown {_num(config.cooldown_s)}s")
        return _hold(current, notes), PolicyState(counter)

    return _act(ctx, config, current, bounded, notes, PolicyState(0), PolicyState(counter))


def _act(ctx: ScalingContext, config: ScalingConfig, current: int, target: int, notes: list[str],
         done: PolicyState, blocked: PolicyState) -> tuple[Decision, PolicyState]:
    """Carry out a change that passed the delay and cooldown: place new instances or pick drains.

    ``done`` is the next state when something changes; ``blocked`` when no room was found at all.
    """
    if target > current:
        placement, why_room = _place(target - current, ctx, config)
        if why_room:
            notes.append(why_room)
        if not placement:
            return _hold(current, notes), blocked
        desired = current + len(placement)
        notes.append(f"scaling up {current} -> {desired} on "
                     + ", ".join(_where(p) for p in placement))
        return Decision(desired, tuple(placement), "; ".join(notes)), done

    remove = _pick_removals(ctx.instances, current - target)
    notes.append(f"scaling down {current} -> {target}, draining " + ", ".join(remove))
    return Decision(target, (), "; ".join(notes), remove), done


def _hold(current: int, notes: list[str]) -> Decision:
    """No change this tick; the reason says what held it."""
    return Decision(current, (), "; ".join(notes))


# --- step 1: bounds repair -----------------------------------------------------------------


def _repair_bounds(current: int, config: ScalingConfig) -> tuple[int, str] | None:
    """A pool outside [min, max] is fixed now: the bounds are promises, so no delay or cooldown."""
    if current < config.min_instances:
        return config.min_instances, f"pool of {current} is below min {config.min_instances}"
    if current > config.max_instances:
        return config.max_instances, f"pool of {current} is above max {config.max_instances}"
    return None


# --- step 2: the core rule -----------------------------------------------------------------


def _total_load(instances: tuple[InstanceLoad, ...]) -> int:
    """Requests running plus waiting over ready instances; starting ones have none to count."""
    return sum(i.load for i in instances)


def _desired_from_load(load: int, instances: tuple[InstanceLoad, ...],
                       config: ScalingConfig) -> tuple[int, str]:
    """Ray's rule, ``ceil(current * load / (target * current))``, outside the dead band only.

    ``current * ratio`` is just ``load / target``; it is computed that way to keep float error out
    of the ceiling. Inside ``[downscale_threshold, upscale_threshold]`` the size is kept.
    """
    current = len(instances)
    target = config.target_in_flight_per_instance
    ratio = load / (target * current)
    starting = sum(1 for i in instances if not i.ready)
    head = (f"load {_num(load)} over {current} instance{_s(current)}"
            + (f" ({starting} not ready)" if starting else "")
            + f", target {_num(target)} each (ratio {ratio:.2f})")
    if ratio > config.upscale_threshold:
        wanted = _ceil(load / target)
        return wanted, f"{head} -> {wanted}"
    if ratio < config.downscale_threshold:
        wanted = _ceil(load / target)
        return wanted, f"{head} -> {wanted}"
    return current, (f"{head} within [{_num(config.downscale_threshold)}, "
                     f"{_num(config.upscale_threshold)}], keeping {current}")


# --- step 3: bounds ------------------------------------------------------------------------


def _apply_bounds(n: int, config: ScalingConfig) -> tuple[int, str]:
    """Clamp to [min, max]; the note says which bound bit, empty when none did."""
    if n > config.max_instances:
        return config.max_instances, f"capped at max {config.max_instances}"
    if n < config.min_instances:
        return config.min_instances, f"raised to min {config.min_instances}"
    return n, ""


# --- step 4: delay (hysteresis) ------------------------------------------------------------


def _delay_ticks(delay_s: float, loop_interval_s: float) -> int:
    """How many consecutive ticks a direction must be seen before the count may exceed it."""
    return int(delay_s / loop_interval_s + _EPS)


def _apply_delay(target: int, current: int, config: ScalingConfig,
                 consecutive: int) -> tuple[int, bool, str]:
    """Count this tick toward its direction; due once the count passes delay / loop interval.

    A change of direction starts the count afresh, so alternating load never accumulates.
    Returns (new counter, due, note while not due).
    """
    if target > current:
        counter = max(consecutive, 0) + 1
        needed = _delay_ticks(config.upscale_delay_s, config.loop_interval_s) + 1
        seen, word, delay = counter, "upscale", config.upscale_delay_s
    else:
        counter = min(consecutive, 0) - 1
        needed = _delay_ticks(config.downscale_delay_s, config.loop_interval_s) + 1
        seen, word, delay = -counter, "downscale", config.downscale_delay_s
    if seen >= needed:
        return counter, True, ""
    return counter, False, (f"{word} pending: {seen} of {needed} consecutive ticks "
                            f"({word}_delay_s {_num(delay)})")


# --- step 5: cooldown ----------------------------------------------------------------------


def _cooldown_left(ctx: ScalingContext, config: ScalingConfig) -> float:
    """Seconds until a change is allowed again; 0 when there was no change or it is long enough ago."""
    if ctx.last_change_at is None:
        return 0.0
    return max(0.0, config.cooldown_s - (ctx.now - ctx.last_change_at))


# --- step 6: room for new instances --------------------------------------------------------


def _place(count: int, ctx: ScalingContext, config: ScalingConfig) -> tuple[list[int | None], str]:
    """Where up to ``count`` new instances can go: GPUs when the host has any, else CPU core sets.

    The note is empty when all fit, else it says what ran out.
    """
    if ctx.gpu_pool or (ctx.gpu_pool is None and ctx.gpus):
        if not ctx.gpus:
            return [], _room_note(0, count, "no GPU figures from NVML")
        return _place_on_gpus(count, ctx, config)
    return _place_on_cpu(count, ctx.host, config)


def _place_on_gpus(count: int, ctx: ScalingContext,
                   config: ScalingConfig) -> tuple[list[int | None], str]:
    """Each new instance to the GPU with the most free memory that can still take one.

    Instances not holding their memory yet (starting, loading their model again, not answering) are
    charged one instance's memory on their GPU: the measured free memory does not show it yet.
    """
    instance_mb = ctx.instance_memory_mb or config.instance_memory_mb
    reserved: dict[int, int] = {}
    for inst in ctx.instances:
        if not inst.holds_its_memory and inst.gpu is not None:
            for gpu in (inst.gpu, *inst.more_gpus):
                reserved[gpu] = reserved.get(gpu, 0) + instance_mb
    room = choose_gpus(count, list(ctx.gpus), instance_mb, config.gpu_headroom_mb, reserved,
                       config.gpu_util_high_pct, per_instance=config.gpus_per_instance)
    placement: list = [g[0] if len(g) == 1 else g for g in room.instances]
    if len(placement) == count:
        return placement, ""
    return placement, _room_note(len(placement), count, room.problems())


def _place_on_cpu(count: int, host: HostLoad,
                  config: ScalingConfig) -> tuple[list[int | None], str]:
    """One free CPU core set per new instance, and none while the host CPU is already high.

    Free core sets on a host whose CPU is high are being used by something else: an instance
    pinned there would fight it for cores rather than add throughput.
    """
    if host.cpu_pct >= config.cpu_high_pct:
        return [], _room_note(0, count, f"host CPU {_num(host.cpu_pct)}% >= cpu_high_pct "
                                        f"{_num(config.cpu_high_pct)}%")
    fit = min(count, max(host.free_core_sets, 0))
    placement: list[int | None] = [None] * fit
    if fit == count:
        return placement, ""
    problem = ("no free CPU core set" if fit == 0
               else f"only {fit} free CPU core set{_s(fit)}")
    return placement, _room_note(fit, count, problem)


def _room_note(placed: int, wanted: int, problem: str) -> str:
    """'no room for 2 new instances: ...' or 'room for only 1 of 3 new instances: ...'."""
    if placed == 0:
        return f"no room for {wanted} new instance{_s(wanted)}: {problem}"
    return f"room for only {placed} of {wanted} new instances: {problem}"


# --- step 7: which instances to drain ------------------------------------------------------


def _pick_removals(instances: tuple[InstanceLoad, ...], count: int) -> tuple[str, ...]:
    """Not-ready instances first (they hold no requests and serve nothing), then least loaded.

    Keeping the ready ones keeps the most serving capacity for the size left; names break ties so
    the same snapshot always drains the same instances.
    """
    order = sorted(instances, key=lambda i: (i.ready, i.in_flight + i.queue_depth, i.name))
    return tuple(i.name for i in order[:count])


# --- formatting ----------------------------------------------------------------------------


def _ceil(x: float) -> int:
    return math.ceil(x - _EPS)


def _num(x: float) -> str:
    """9 -> '9.0', 2.5 -> '2.5', 0.333.. -> '0.33': short and unambiguous in reasons."""
    x = float(x)
    return f"{x:.1f}" if x == round(x, 1) else f"{x:.2f}"


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _where(p: int | tuple[int, ...] | None) -> str:
    if p is None:
        return "cpu"
    return "gpu" + "+".join(map(str, p)) if isinstance(p, tuple) else f"gpu{p}"
