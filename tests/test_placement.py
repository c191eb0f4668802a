"""Placement is a pure function of the host's inventory: test it on synthetic hosts."""
import pytest

from app.config import ConfigError
from app.control.plan.placement import GpuInfo, Placement, place_one, plan_placement, resolve_device
from app.hardware.devices import parse_cores


def test_cpu_instances_get_disjoint_core_sets():
    plan = plan_placement(2, "cpu", [], cpu_cores=list(range(8)))
    assert [p.cpu_cores for p in plan] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [p.threads for p in plan] == [4, 4]
    uneven = plan_placement(3, "cpu", [], cpu_cores=list(range(8)))
    assert [len(p.cpu_cores) for p in uneven] == [3, 3, 2]
    assert len({c for p in uneven for c in p.cpu_cores}) == 8


def test_more_cpu_instances_than_cores_share_round_robin():
    plan = plan_placement(3, "cpu", [], cpu_cores=[0, 1])
    assert [p.cpu_cores for p in plan] == [(0,), (1,), (0,)]


def test_explicit_thread_count_caps_each_set():
    plan = plan_placement(2, "cpu", [], cpu_cores=list(range(8)), cpu_threads=2)
    assert [p.cpu_cores for p in plan] == [(0, 1), (4, 5)]


def test_gpu_instances_go_where_memory_is_free():
    gpus = [GpuInfo(0, "A", 80_000, 40_000), GpuInfo(1, "B", 80_000, 70_000)]
    plan = plan_placement(3, "cuda", gpus, cpu_cores=[0], instance_memory_mb=30_000)
    # 70 GB free on GPU 1 takes a 30 GB instance; then GPU 0's 40 GB beats GPU 1's 40 GB left by index.
    assert [p.gpu for p in plan] == [1, 0, 1]
    assert all(p.device == "cuda" for p in plan)


def test_gpu_instances_that_do_not_fit_are_refused_with_what_is_free():
    gpus = [GpuInfo(0, "A", 80_000, 10_000), GpuInfo(1, "B", 80_000, 70_000)]
    with pytest.raises(ConfigError) as err:
        plan_placement(3, "cuda", gpus, cpu_cores=[0], instance_memory_mb=30_000, headroom_mb=512)
    assert "room on the GPUs for 2 of 3 instances" in str(err.value)
    assert "gpu0 10000 MB free" in str(err.value) and "an instance needs 30512 MB" in str(err.value)


def test_one_more_gpu_instance_charges_the_starting_instances_but_not_the_running_ones():
    """NVML's free memory already holds every instance that has loaded: charging those again would
    count them twice; one still starting is not in it yet and must be charged."""
    gpus = [GpuInfo(0, "A", 24_000, 10_000), GpuInfo(1, "B", 24_000, 9_000)]
    running = [Placement("cuda", gpu=0)] * 3            # already inside gpu0's 10000 MB free
    # gpu0's 10000 MB beats gpu1's 9000; were the three running charged, gpu0 would have 4000 left.
    assert place_one(running, "cuda", gpus, [0], 1, instance_memory_mb=2_000).gpu == 0
    starting = [Placement("cuda", gpu=0)]
    # One starting on gpu0 leaves it 8000 MB, below gpu1's 9000.
    assert place_one(running + starting, "cuda", gpus, [0], 1, instance_memory_mb=2_000,
                     starting=starting).gpu == 1
    # A full-looking GPU: 2600 MB free with one instance running still takes one of 2000 + 512 headroom,
    # and not when that one is still starting.
    tight = GpuInfo(0, "A", 24_000, 2_600)
    one = [Placement("cuda", gpu=0)]
    assert place_one(one, "cuda", [tight], [0], 1, instance_memory_mb=2_000, headroom_mb=512).gpu == 0
    with pytest.raises(ConfigError, match="gpu0 600 MB free; an instance needs 2512 MB"):
        place_one(one, "cuda", [tight], [0], 1, instance_memory_mb=2_000, headroom_mb=512, starting=one)


def test_explicit_gpu_map_is_obeyed_and_checked():
    gpus = [GpuInfo(0, "A", 80_000, 1_000), GpuInfo(1, "B", 80_000, 70_000)]
    assert [p.gpu for p in plan_placement(2, "cuda", gpus, [0], gpu_map=[0, 0])] == [0, 0]
    with pytest.raises(ConfigError, match="GPU"):
        plan_placement(1, "cuda", gpus, [0], gpu_map=[3])


def test_device_resolution():
    assert resolve_device("auto", []) == "cpu"
    assert resolve_device("auto", [GpuInfo(0, "A", 1, 1)]) == "cuda"
    with pytest.raises(ConfigError, match="no NVIDIA GPU"):
        resolve_device("cuda", [])


def test_core_list_format():
    assert parse_cores("0-3,6") == [0, 1, 2, 3, 6]
    assert parse_cores("5") == [5]
