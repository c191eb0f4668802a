"""Placement is a pure function of the host's inventory: test it on synthetic hosts."""
import pytest

from app.config import ConfigError
from app.control.placement import GpuInfo, parse_cores, plan_placement, resolve_device


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
